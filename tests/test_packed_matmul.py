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
    # codes stay in their thread only for wgmma's tiles of 64 rows, at 4 bits; half-precision pairs never
    cases = ((64, 4, True), (32, 4, True), (64, 4, False), (64, 2, True))
    tilings = [packed_matmul_tiling(m, 2048, 2048, 128, False, bits, wgmma) for m, bits, wgmma in cases]
    assert [t.codes_in_thread for t in tilings] == [True, False, False, False]
    assert not any(t.half_pairs for t in tilings)


def test_pairs_apply_to_2_and_4_bit_gptq_words_in_group_order_with_half_precision_inputs():
    from qrobust.kernels.layouts import pairs_apply

    assert pairs_apply(4, "gptq", False, torch.bfloat16) and pairs_apply(2, "gptq", False, torch.float16)
    assert not any([pairs_apply(8, "gptq", False, torch.bfloat16), pairs_apply(3, "pairs", False, torch.bfloat16),
                    pairs_apply(4, "gptq", True, torch.bfloat16), pairs_apply(4, "gptq", False, torch.float32)])


def test_split_scale_fma_rounds_bf16_weights_once():
    """The arithmetic _pair_weight_tile runs in bf16 pairs: with s_hi = bf16(s) and s_lo = s − s_hi
    of a float16 scale, d·s_lo is exact for every 4-bit difference d = q − z, so one FMA
    d·s_hi + d·s_lo gives bf16(d·s), the float32 form's weight, for every code, zero point and
    scale (float64 stands in for the FMA's exact sum). Rounding the scale to bf16 alone would not."""
    s = torch.logspace(-5, 1, 20_000, dtype=torch.float64).to(torch.float16).unique()
    s_hi = s.to(torch.bfloat16)
    s_lo = (s.double() - s_hi.double()).to(torch.bfloat16)
    assert torch.equal(s_lo.double() + s_hi.double(), s.double())  # the split is exact
    d = torch.arange(-15, 16, dtype=torch.float64)[:, None]
    lo = (d * s_lo.double()).to(torch.bfloat16)
    assert torch.equal(lo.double(), d * s_lo.double())  # d·s_lo needs no rounding
    reference = (d * s.double()).float().to(torch.bfloat16)
    assert torch.equal((d * s_hi.double() + lo.double()).float().to(torch.bfloat16), reference)
    assert not torch.equal((d * s_hi.double()).float().to(torch.bfloat16), reference)


@pytest.mark.skipif(DEVICE != "cuda", reason="half-precision pairs are inline PTX: CUDA only")
@pytest.mark.parametrize("bits,rows,dtype", [(4, 64, torch.bfloat16), (4, 32, torch.float16), (2, 64, torch.bfloat16),
                                             (2, 16, torch.bfloat16), (4, 16, torch.bfloat16)])
def test_half_pairs_give_every_weight_of_the_float32_form(bits, rows, dtype):
    """One-hot rows make the product read out single weights: with half-precision pairs every
    weight, at every code, zero point and K-split, is the float32 form's, bit for bit."""
    from qrobust.kernels.packed_matmul import MatmulTiling, matmul_locks, packed_matmul

    g = torch.Generator().manual_seed(bits + rows)
    layer = QuantLinear.from_result(rtn(torch.randn(128, 512, generator=g), QuantSpec(bits, 128, sym=False)), None,
                                    dtype).to(DEVICE)
    locks = matmul_locks(128, DEVICE)
    args = (layer.qweight, layer.scales, layer.qzeros, None, bits, 128, FORMAT_OFFSET[layer.format])
    for first in range(0, 512, rows):
        x = torch.eye(512, device=DEVICE, dtype=dtype)[first:first + rows]
        for split_k in (1, 2):
            plain = MatmulTiling(rows, 64, 128, split_k, 4, 3)
            paired = MatmulTiling(rows, 64, 128, split_k, 4, 3, codes_in_thread=True, half_pairs=True)
            assert torch.equal(packed_matmul(x, *args, tiling=paired, locks=locks),
                               packed_matmul(x, *args, tiling=plain, locks=locks))
    assert not locks.any()


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
from dataclasses import replace
from qrobust.kernels.packed_matmul import compile_packed_matmul_for, packed_matmul_tiling
M, pairs = int(sys.argv[1]), sys.argv[2] == "pairs"
tiling = replace(packed_matmul_tiling(M, 2048, 2048, 128, False, 4, wgmma=True), half_pairs=pairs)
print(compile_packed_matmul_for(90, M, 2048, 2048, 4, tiling=tiling).asm["ptx"])
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
    def ptx(pairs: str) -> str:
        return subprocess.run([sys.executable, "-c", MATMUL_COMPILE, str(rows), pairs], env=env, capture_output=True,
                              text=True, check=True).stdout

    default = ptx("default")
    assert instruction in default and "atom" in default
    shared_stores = len(re.findall(r"\bst\.shared", default))
    assert shared_stores < 32 if rows == 64 else shared_stores >= 64
    # half-precision pairs (off by default): three packed bf16 FMAs per two weights
    assert "fma.rn.bf16x2" not in default and "fma.rn.bf16x2" in ptx("pairs")


def test_the_tile_grid_flips_the_default_tilings_switches(monkeypatch):
    """engine_breakdown.py --parts tiles: -1 keeps a field of the default tiling, so a grid of
    the two switches alone gives the default and its three other combinations, each once."""
    from dataclasses import replace
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import engine_breakdown
    from qrobust.kernels.packed_matmul import packed_matmul_tiling

    monkeypatch.setattr(engine_breakdown, "runs_wgmma", lambda device: True)
    keep = (-1,)
    grid = engine_breakdown.TileGrid(keep, keep, keep, keep, keep, codes_in_thread=(0, 1), half_pairs=(0, 1))
    found = engine_breakdown.tilings(64, 2048, 2048, 128, 4, grid)
    default = packed_matmul_tiling(64, 2048, 2048, 128, False, 4, wgmma=True)
    assert found[0] == default and len(found) == len(set(found)) == 4
    assert {(t.codes_in_thread, t.half_pairs) for t in found} == {(a, b) for a in (False, True) for b in (False, True)}
    assert all(replace(t, codes_in_thread=default.codes_in_thread, half_pairs=default.half_pairs) == default
               for t in found)
