"""The batched-decoding product (kernels.packed_matmul) and the table that picks each packed
product (quant.kernel_choice): on CPU under Triton's interpreter (conftest)."""
import re

import pytest
import torch

from qrobust import kernels
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.kernel_choice import packed_kernel
from qrobust.quant.qlinear import FORMAT_OFFSET, QuantLinear

pytestmark = pytest.mark.skipif(not kernels.triton_installed(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(bits: int, group_size: int, shuffled: bool, N: int = 64, K: int = 256) -> QuantLinear:
    g = torch.Generator().manual_seed(bits * 10 + K)
    result = rtn(torch.randn(N, K, generator=g), QuantSpec(bits, group_size, sym=bits != 3))
    if shuffled:  # act-order: each input's group is arbitrary
        perm = torch.randperm(K, generator=g)
        result.q, result.g_idx = result.q[:, perm], result.g_idx[perm]
    return QuantLinear.from_result(result, torch.randn(N, generator=g), torch.float32).to(DEVICE)


def test_table_sends_few_rows_to_the_gemv_batches_to_the_fused_matmul_and_prefill_to_dequantization():
    for bits in (2, 3, 4, 8):
        assert [packed_kernel("cuda", bits, m) for m in (1, 4, 5, 64, 65)] == \
            ["gemv", "gemv", "fused_matmul", "fused_matmul", "dequant_matmul"]
    assert packed_kernel("cuda", 5, 8) == "dequant_matmul"  # no fused entry for 5 bits
    assert packed_kernel("mps", 4, 2) == "gemv"


@pytest.mark.parametrize("bits,group_size,shuffled,split_k,in_thread", [
    (4, 64, False, 2, True), (3, 128, False, 1, False), (2, 32, True, 4, True), (8, 64, False, 1, True),
    (4, 32, False, 1, False)])
def test_split_k_matmul_matches_the_dequantized_weight(bits, group_size, shuffled, split_k, in_thread):
    """With and without arrival counters (the K-splits added up by the tile's last program, or
    afterwards), with the codes unpacked in the thread that loads their word (codes_in_thread,
    as for wgmma) or spread by a broadcast: the same sums, and the counters come back as zeros
    for the next call."""
    from qrobust.kernels.packed_matmul import MatmulTiling, matmul_locks, packed_matmul

    layer = _layer(bits, group_size, shuffled)
    x = torch.randn(9, layer.in_features, device=DEVICE)  # not a multiple of the row tile
    tiling = MatmulTiling(16, 32, 32, split_k, 4, 2, codes_in_thread=in_thread)
    args = (x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx if shuffled else None, bits, group_size,
            FORMAT_OFFSET[layer.format], layer.bias)
    locks = matmul_locks(layer.out_features, DEVICE)
    ref = x @ layer.dequantized_weight().t() + layer.bias
    afterwards = packed_matmul(*args, tiling=tiling)
    inside = packed_matmul(*args, tiling=tiling, locks=locks)
    torch.testing.assert_close(afterwards, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inside, ref, rtol=1e-4, atol=1e-4)
    assert not locks.any()
    if split_k > 1:
        with pytest.raises(ValueError, match="locks"):
            packed_matmul(*args, tiling=tiling, locks=locks[:1])


def test_tiling_splits_k_until_programs_are_short_and_many_enough():
    from qrobust.kernels.packed_matmul import MAX_INPUTS_PER_PROGRAM, MIN_PROGRAMS, packed_matmul_tiling

    down = packed_matmul_tiling(8, 2048, 6144, 128, act_order=False)  # 32 output tiles, 48 input tiles
    assert (down.block_m, down.block_k, down.split_k) == (16, 128, 8) and 6144 // 8 <= MAX_INPUTS_PER_PROGRAM
    k_proj = packed_matmul_tiling(32, 1024, 2048, 128, act_order=False)  # 16 output tiles: split for programs
    assert k_proj.split_k == 8 and 16 * 8 >= MIN_PROGRAMS
    gate_up = packed_matmul_tiling(64, 12288, 2048, 128, act_order=False)  # 192 output tiles: split for length
    assert gate_up.block_m == 64 and gate_up.split_k == 4
    small_groups = packed_matmul_tiling(32, 2048, 2048, 64, act_order=False)  # a tile stays within a group
    assert small_groups.block_k == 64 and small_groups.split_k == 4
    # codes stay in their thread only for wgmma's tiles of 64 rows, at 4 bits
    assert [packed_matmul_tiling(m, 2048, 2048, 128, False, bits, wgmma).codes_in_thread
            for m, bits, wgmma in ((64, 4, True), (32, 4, True), (64, 4, False), (64, 2, True))] == \
        [True, False, False, False]


def test_quant_linear_runs_batched_rows_on_the_fused_matmul(monkeypatch):
    """Eight rows go to the fused product (no dense weight is made or cached) and match the
    dequantized reference."""
    import qrobust.kernels.ops as ops
    import qrobust.quant.qlinear as qlinear

    monkeypatch.setattr(qlinear, "kernels_enabled", kernels.supports)
    monkeypatch.setattr(ops, "dequantize_op", None)  # would fail if called
    layer = _layer(4, 64, shuffled=False)
    x = torch.randn(2, 4, layer.in_features, device=DEVICE)
    assert layer.packed_kernel(8, x.device) == "fused_matmul"
    y = layer(x)
    assert layer._weight is None
    torch.testing.assert_close(y, x @ layer.dequantized_weight().t() + layer.bias, rtol=1e-4, atol=1e-4)


MATMUL_COMPILE = """
import sys
from qrobust.kernels.packed_matmul import compile_packed_matmul_for
print(compile_packed_matmul_for(90, int(sys.argv[1]), 2048, 2048, 4).asm["ptx"])
"""


@pytest.mark.parametrize("rows,instruction", [(32, "mma.sync"), (64, "wgmma")])
def test_the_matmul_compiles_for_hopper_without_a_gpu(rows, instruction):
    """compile_packed_matmul_for (benchmarks/kernel_asm.py --matmul) builds the kernel as
    packed_matmul launches it for sm_90, outside the interpreter (a separate process): row tiles
    of 64 reach Hopper's wgmma, narrower ones mma.sync; the K-splits' arrival counter is there.
    For wgmma each thread keeps its words' codes, so the 128 × 64 weight tile reaches shared
    memory in a few wide stores, where the broadcast spreads it over one store per weight."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ptx = subprocess.run([sys.executable, "-c", MATMUL_COMPILE, str(rows)], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert instruction in ptx and "atom" in ptx
    shared_stores = len(re.findall(r"\bst\.shared", ptx))
    assert shared_stores < 32 if rows == 64 else shared_stores >= 64


def test_the_gluon_candidate_compiles_to_tensor_cores_without_shared_memory():
    """benchmarks/gluon_matmul_probe.py's kernel (a candidate, not used yet) compiled for sm_90
    without a GPU: mma.sync fed from registers, no stores to shared memory and no barriers (the
    round trip kernel_asm.py --matmul shows in the Triton kernel)."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.experimental.gluon")
    root = Path(__file__).resolve().parents[1]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "benchmarks")])}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "gluon_matmul_probe.py"), "--compile-only",
                          "--bits", "4", "--rows", "32"], env=env, capture_output=True, text=True, check=True).stdout
    row = ast.literal_eval(out.strip().splitlines()[-1])
    assert row["HMMA"] > 0 and row["STS"] == row["LDS"] == row["BAR"] == 0 and row["shared"] == 0


@pytest.mark.parametrize("bits,split_k,xperm", [(2, 1, False), (4, 2, True), (8, 2, False), (4, 1, True)])
def test_the_swap_ab_candidate_matches_the_dequantized_weight(bits, split_k, xperm, monkeypatch):
    """benchmarks/swap_matmul_probe.py's kernel (a candidate, not used): the weights as wgmma's
    register operand give x Ŵᵀ, read in group order from x as it comes or permuted beforehand,
    with its K-splits added up by the last program and the counters left at zero. In float16:
    the interpreter's float16 → bf16 cast is not exact, and the kernel casts the weights to x's dtype."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import swap_matmul_probe as probe

    g = torch.Generator().manual_seed(bits)
    layer = QuantLinear.from_result(rtn(torch.randn(64, 256, generator=g), QuantSpec(bits, 128, sym=True)), None,
                                    torch.float16).to(DEVICE)
    x = torch.randn(9, 256, generator=g).to(DEVICE, torch.float16)
    locks = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    y = probe.swap_matmul(probe.permuted(x, bits, 128) if xperm else x, layer, probe.unpacked_zeros(layer), locks,
                          block_n=64, block_k=128, split_k=split_k, xperm=xperm)
    ref = x.float() @ layer.dequantized_weight().float().t()
    assert y.dtype == torch.float16 and y.shape == (9, 64)
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-3
    assert locks.eq(0).all()


def test_the_swap_ab_candidate_takes_the_weights_from_registers_and_stores_only_x():
    """The same kernel compiled for sm_90 without a GPU (a separate process, outside the
    interpreter): every wgmma reads the dequantized weights from registers, and the only tiles
    stored to shared memory are x's, wgmma's other operand (no dequantized weight round trip)."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "benchmarks")])}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "swap_matmul_probe.py"), "--compile-only",
                          "--bits", "2,8", "--rows", "64"], env=env, capture_output=True, text=True, check=True).stdout
    for line, sub_products in zip(out.strip().splitlines()[-2:], (8, 2)):
        facts = ast.literal_eval(line)
        assert facts["wgmma"] == facts["wgmma_weights_in_registers"] == sub_products
        assert facts["tiles_stored"] == facts["wgmma_x_operands"] and len(facts["tiles_stored"]) == 1
