"""The batched-decoding product (kernels.packed_matmul) and the table that picks each packed
product (quant.kernel_choice): on CPU under Triton's interpreter (conftest)."""
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


@pytest.mark.parametrize("bits,group_size,shuffled,split_k", [(4, 64, False, 2), (3, 128, False, 1),
                                                               (2, 32, True, 4), (8, 64, False, 1)])
def test_split_k_matmul_matches_the_dequantized_weight(bits, group_size, shuffled, split_k):
    """With and without arrival counters (the K-splits added up by the tile's last program, or
    afterwards): the same sums, and the counters come back as zeros for the next call."""
    from qrobust.kernels.packed_matmul import MatmulTiling, matmul_locks, packed_matmul

    layer = _layer(bits, group_size, shuffled)
    x = torch.randn(9, layer.in_features, device=DEVICE)  # not a multiple of the row tile
    tiling = MatmulTiling(16, 32, 32, split_k, 4, 2)
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
    of 64 reach Hopper's wgmma, narrower ones mma.sync; the K-splits' arrival counter is there."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ptx = subprocess.run([sys.executable, "-c", MATMUL_COMPILE, str(rows)], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert instruction in ptx and "atom" in ptx


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
