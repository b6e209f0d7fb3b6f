"""Whether the engine and the fragments product give the same bits on every run, on one GPU:
greedy tokens of AREngine over a small random model (bf16 dense, 4-bit fragments layout, 4-bit
GPTQ layout; with and without CUDA graphs; without K-splits; with PyTorch's math attention), four
runs each, the eager forward of a prefill, and fragments_matmul on two inputs in turn at each
K-split. Prints one line per check; reproducible code prints 200/200, True and None throughout.

    cd benchmarks && PYTHONPATH=..:. python3 engine_determinism.py
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine_gpu import first_difference, gptq_layout
from qrobust.bench_generate import small_decoder
from qrobust.kernels import fragments_matmul as fragments_matmul_module
from qrobust.kernels.fragments import to_fragments
from qrobust.kernels.fragments_matmul import fragments_locks, fragments_matmul
from qrobust.models.engine import AREngine, DecodeSettings, StopRule
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.qlinear import FORMAT_OFFSET, QuantLinear

def engine_runs(bits: int, layout: str, graphs: bool) -> None:
    """Four greedy runs (three on one engine, one on a new one) of 8 prompts × 40 tokens."""
    model = small_decoder(bits)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (8,), generator=g)]
    settings, rule = DecodeSettings(40), StopRule(frozenset())
    engine = AREngine(model, graphs=graphs)
    runs = [engine.generate(prompts, settings, rule, 8).tokens for _ in range(3)]
    runs.append(AREngine(model, graphs=graphs).generate(prompts, settings, rule, 8).tokens)
    firsts = [first_difference(r0, r1) for r0, r1 in zip(runs[0], runs[1])]
    layouts = {m.layout for m in model.modules() if isinstance(m, QuantLinear)}
    print(f"engine {bits:>2}-bit {layout:>9} {layouts} graphs {graphs}: runs equal {[runs[0] == r for r in runs[1:]]}, "
          f"first difference per row (run 0 vs 1) {firsts}", flush=True)


def product_runs() -> None:
    """fragments_matmul on two inputs in turn, 100 times each: every output equal to the first
    of its input (a stale partial sum would show as the other input's)."""
    for bits in (4, 8):
        for M, K in ((8, 512), (8, 2048), (64, 2048)):
            N = 512
            g = torch.Generator().manual_seed(0)
            layer = QuantLinear.from_result(rtn(torch.randn(N, K, generator=g), QuantSpec(bits, 128)), None,
                                            torch.bfloat16)
            words = to_fragments(layer.qweight.cuda(), K, bits)
            scales, qzeros = layer.scales.cuda(), layer.qzeros.cuda()
            xs = [torch.randn(M, K, generator=g).to("cuda", torch.bfloat16) for _ in range(2)]
            locks = fragments_locks(N, "cuda")
            for split in (1, 2, 4):
                if (K // 128) % split:
                    continue
                outs = [fragments_matmul(xs[i % 2], words, scales, qzeros, bits, FORMAT_OFFSET[layer.format], None,
                                         locks, split_k=split) for i in range(200)]
                same = sum(torch.equal(outs[i % 2], o) for i, o in enumerate(outs))
                print(f"product {bits}-bit M {M} K {K} split {split}: {same}/200 equal to the first of their input, "
                      f"locks left {int(locks.abs().sum())}", flush=True)


def prefill_runs() -> None:
    """The eager forward of 8 prompts of 19 tokens (152 rows: packed layers dequantize, as in the
    engine's prefill), three times: the second and third logits equal to the first?"""
    for bits in (16, 4):
        model = small_decoder(bits)
        ids = torch.randint(0, 512, (8, 19), generator=torch.Generator().manual_seed(1)).cuda()
        with torch.no_grad():
            logits = [model(ids).float() for _ in range(3)]
        print(f"forward {bits:>2}-bit, 152 rows: equal {[torch.equal(logits[0], x) for x in logits[1:]]}", flush=True)


@contextlib.contextmanager
def no_k_splits():
    """fragments_matmul without K-splits (no partial sums, no arrival counters)."""
    saved = fragments_matmul_module.fragments_tiling

    def unsplit(M: int, N: int, K: int) -> tuple[int, int, int]:
        rows, _, warpgroups = saved(M, N, K)
        return rows, 1, warpgroups

    fragments_matmul_module.fragments_tiling = unsplit
    try:
        yield
    finally:
        fragments_matmul_module.fragments_tiling = saved


def main() -> None:
    product_runs()
    prefill_runs()
    for graphs in (True, False):
        engine_runs(16, "dense", graphs)
        engine_runs(4, "fragments", graphs)
        with gptq_layout():
            engine_runs(4, "gptq", graphs)
    # the suspects one at a time, with graphs: the K-split sums, then attention (PyTorch's math backend)
    with no_k_splits():
        engine_runs(4, "fragments, no K-splits", True)
    with sdpa_kernel(SDPBackend.MATH):
        engine_runs(16, "dense, math attention", True)
        engine_runs(4, "fragments, math attention", True)


if __name__ == "__main__":
    main()
