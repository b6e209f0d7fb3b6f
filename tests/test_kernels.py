"""The Triton kernels against their torch references: on CUDA where there is one, else on CPU
under Triton's interpreter (conftest sets TRITON_INTERPRET=1 on machines without a GPU)."""
import dataclasses

import pytest
import torch

from qrobust import kernels
from qrobust.quant.gptq import gptq_solve
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.qlinear import FORMAT_OFFSET, KernelArgs, QuantLinear

pytestmark = pytest.mark.skipif(not kernels.triton_installed(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _hessian(columns: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * columns, columns, generator=g) @ torch.randn(columns, columns, generator=g) * 0.1
    return (X.t() @ X / X.shape[0]).to(DEVICE)


@pytest.mark.parametrize("bits,group_size,sym,act_order", [
    (4, 128, True, False), (3, 32, False, True), (2, -1, True, False), (8, 256, False, True), (4, 64, True, True),
])
def test_gptq_block_kernel_matches_torch_loop(bits, group_size, sym, act_order):
    """Same codes, grids and losses as the column-at-a-time loop, for groups inside a block,
    groups spanning blocks, per-channel grids and act-order."""
    columns = 256
    H = _hessian(columns)
    W = torch.randn(40, columns, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    spec = QuantSpec(bits, group_size, sym)
    ref, ref_loss = gptq_solve(W, H, spec, 128, 0.01, act_order, use_kernel=False)
    out, loss = gptq_solve(W, H, spec, 128, 0.01, act_order, use_kernel=True)
    mismatch = (ref.q != out.q).float().mean().item()
    assert mismatch <= (0 if DEVICE == "cpu" else 1e-3)  # a GPU may round a tie differently
    assert torch.equal(ref.g_idx, out.g_idx)
    torch.testing.assert_close(out.scales, ref.scales, rtol=1e-3, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-6)


def _layer(bits, group_size, sym, shuffled, bias=True, N=96, K=256, seed=0):
    g = torch.Generator().manual_seed(bits * 100 + K + seed)
    result = rtn(torch.randn(N, K, generator=g), QuantSpec(bits, group_size, sym))
    if shuffled:  # act-order checkpoints: each input's group is arbitrary
        perm = torch.randperm(K, generator=g)
        result.q, result.g_idx = result.q[:, perm], result.g_idx[perm]
    layer = QuantLinear.from_result(result, torch.randn(N, generator=g) if bias else None, torch.float32)
    return layer.to(DEVICE)


CASES = [(4, 128, True, False), (3, 64, False, False), (2, 32, True, True), (8, -1, False, False),
         (3, 128, True, True)]


# act-order at 3 bits and per-channel 8 bits are the slowest to interpret (~45 s of the default run): act-order
# stays covered by the 2-bit case, 3 bits by the 64-group case, 8 bits by the products test below
SLOW_CASES = {(3, 128, True, True), (8, -1, False, False)}


@pytest.mark.parametrize("bits,group_size,sym,shuffled",
                         [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_gemv_and_dequantize_match_the_torch_dequantization(bits, group_size, sym, shuffled):
    from qrobust.kernels import gemv_locks, gptq_dequantize, gptq_gemv

    layer = _layer(bits, group_size, sym, shuffled)
    K = layer.in_features
    ref = layer.dequantized_weight()
    g_idx = layer.g_idx if shuffled else None
    gs = K if group_size == -1 else group_size
    args = (layer.qweight, layer.scales, layer.qzeros, g_idx, bits, gs, FORMAT_OFFSET[layer.format])
    assert torch.equal(gptq_dequantize(*args, K=K, dtype=torch.float32).t(), ref)
    x = torch.randn(3, K, device=DEVICE)
    # depth 256 spans two groups of 128 (or eight of 32) in one tile; with locks the last split
    # of each tile adds the partial sums, which leaves the locks at zero
    locks = gemv_locks(layer.out_features, x.device, rows=3, block_n=32)
    tilings = ((1, 128, None), (2, 128, None), (1, 256, None), (2, 128, locks), (2, 64, locks))
    for splits, depth, lock in tilings[::2] if shuffled else tilings:  # act-order is slow to interpret
        y = gptq_gemv(x, *args, bias=layer.bias, splits=splits, block_depth=depth, locks=lock)
        assert not locks.any()
        torch.testing.assert_close(y, x @ ref.t() + layer.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shuffled", [False, True])
def test_float32_sums_read_16_bit_inputs_as_words(dtype, shuffled):
    """3 bits in the GPTQ layout (no half2 plan) with 16-bit inputs: the float32 sums take each
    input out of the chunk's words (_x_words, _half_of), low half first, float16 and bfloat16
    alike; a view whose rows start off 16 bytes is copied first (aligned_rows)."""
    from qrobust.kernels import gptq_gemv

    layer = _layer(3, 64, False, shuffled, bias=False, N=64)
    K = layer.in_features
    x = torch.randn(2, K).to(DEVICE, dtype)
    args = (layer.qweight, layer.scales, layer.qzeros, layer.g_idx if shuffled else None, 3, 64,
            FORMAT_OFFSET[layer.format])
    ref = (x.double() @ layer.dequantized_weight().double().t()).to(dtype)
    y = gptq_gemv(x, *args)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    shifted = torch.empty(x.numel() + 1, dtype=dtype, device=x.device)[1:].view_as(x).copy_(x)
    assert torch.equal(gptq_gemv(shifted, *args), y)


def test_gemv_tiles_may_cut_groups_of_whole_chunks():
    """Groups of 96 inputs (three chunks of 32): tiles of 128 start mid-group; without a tiling
    given, gemv_config's: three K-splits of 128 (384 has no deeper power-of-two divisor)."""
    from qrobust.kernels import gptq_gemv

    layer = _layer(3, 96, False, False, K=384)
    x = torch.randn(1, 384, device=DEVICE)
    args = (layer.qweight, layer.scales, layer.qzeros, None, 3, 96, FORMAT_OFFSET[layer.format])
    ref = x @ layer.dequantized_weight().t() + layer.bias
    for tiling in ({"splits": 3, "block_depth": 128}, {}):
        torch.testing.assert_close(gptq_gemv(x, *args, bias=layer.bias, **tiling), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 3])
def test_gemv_applies_swiglu_to_interleaved_gate_and_up(bits):
    """A gate and an up layer interleaved into one: the GEMV's silu(gate)·up output equals torch's
    on the separate layers, in one split, with the last split adding up, and with a second kernel;
    a layer on the torch path (CPU default) gives the same through forward_swiglu."""
    from qrobust.kernels import gemv_locks, gptq_gemv

    gate, up = _layer(bits, 64, False, False, N=64), _layer(bits, 64, False, False, N=64, seed=1)
    fused = QuantLinear.concat([gate, up], interleave=True)
    assert torch.equal(fused.dequantized_weight()[1::2], up.dequantized_weight())
    x = torch.randn(2, 256, device=DEVICE)
    expected = torch.nn.functional.silu(gate(x)) * up(x)
    torch.testing.assert_close(fused.forward_swiglu(x), expected, rtol=1e-5, atol=1e-5)
    args = (fused.qweight, fused.scales, fused.qzeros, None, bits, 64, FORMAT_OFFSET[fused.format])
    locks = gemv_locks(fused.out_features, x.device, rows=2, block_n=32)
    for splits, lock in ((1, None), (2, locks), (4, None)):
        y = gptq_gemv(x, *args, bias=fused.bias, splits=splits, block_depth=256 // splits, locks=lock, swiglu=True)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="pairs"):
        gptq_gemv(x, fused.qweight[:, :-1], *args[1:], swiglu=True)


@pytest.mark.parametrize("swiglu,shuffled", [(False, False), (True, False), (False, True)])
def test_gemv_adds_the_residual_and_normalizes_in_its_prologue(swiglu, shuffled):
    """gptq_gemv_add_norm: the product of RMSNorm(residual + x) (of x alone without a residual)
    and the packed weight, as torch's norm then product, and the sum h exactly; in one K-split
    and in several (each program normalizing its split of the row, the last one or a second
    kernel adding up), for two rows, with SwiGLU's activation on the way out too, and for an
    act-order layer (two splits only: slow to interpret)."""
    from qrobust.kernels import AddNorm, gemv_locks, gptq_gemv_add_norm
    from qrobust.models.transformer import RMSNorm

    layer = _layer(4, 64, False, shuffled, N=64, bias=False)
    K = layer.in_features
    norm = RMSNorm(K, 1e-6).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K, generator=g) + 0.5)
    x, residual = torch.randn(2, K, generator=g).to(DEVICE), 4 * torch.randn(2, K, generator=g).to(DEVICE)
    args = (layer.qweight, layer.scales, layer.qzeros, layer.g_idx if shuffled else None, 4, 64,
            FORMAT_OFFSET[layer.format])
    locks = gemv_locks(layer.out_features, x.device, rows=2, block_n=32)
    tilings = ((2, locks),) if shuffled else ((1, None), (2, locks), (4, None))
    for r in (residual, None):
        h_ref = x if r is None else r + x
        with torch.no_grad():
            y_ref = norm(h_ref) @ layer.dequantized_weight().t()
        if swiglu:
            y_ref = torch.nn.functional.silu(y_ref[:, 0::2]) * y_ref[:, 1::2]
        for splits, lock in tilings:
            y, h = gptq_gemv_add_norm(x, AddNorm(r, norm.weight.detach(), norm.eps), *args, splits=splits,
                                      block_depth=K // splits, locks=lock, swiglu=swiglu)
            assert torch.equal(h, h_ref)
            torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_sums_feed_the_next_gemvs_norm_as_the_added_product_would(dtype):
    """gptq_gemv_split_sums leaves a product as its K-splits' float32 partial sums, which
    gptq_gemv_add_norm adds up in its prologue: the same h and outputs, bit for bit, as adding
    the splits first (locks) and passing the product; without a residual, or with locks, SwiGLU
    or one split, split sums are refused."""
    from qrobust.kernels import AddNorm, gemv_locks, gptq_gemv, gptq_gemv_add_norm, gptq_gemv_split_sums
    from qrobust.models.transformer import RMSNorm

    down, up = _layer(4, 64, False, False, N=128, K=256, bias=False), _layer(4, 64, False, False, N=64, K=128,
                                                                           bias=False, seed=1)
    g = torch.Generator().manual_seed(4)
    x, residual = torch.randn(2, 256, generator=g).to(DEVICE, dtype), torch.randn(2, 128, generator=g).to(DEVICE, dtype)
    norm = RMSNorm(128, 1e-6).to(DEVICE, dtype)
    down_args = (down.qweight, down.scales, down.qzeros, None, 4, 64, FORMAT_OFFSET[down.format])
    up_args = (up.qweight, up.scales, up.qzeros, None, 4, 64, FORMAT_OFFSET[up.format])
    add_norm = AddNorm(residual, norm.weight.detach(), norm.eps)
    sums = gptq_gemv_split_sums(x, *down_args, splits=4, block_depth=64)
    assert sums.shape == (4, 2, 128) and sums.dtype == torch.float32
    product = gptq_gemv(x, *down_args, splits=4, block_depth=64, locks=gemv_locks(128, x.device, 2, 32))
    for y_ref, y in zip(gptq_gemv_add_norm(product, add_norm, *up_args, half2=True),
                        gptq_gemv_add_norm(sums, add_norm, *up_args, half2=True)):
        assert y.dtype == dtype and torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="residual"):
        gptq_gemv_add_norm(sums, AddNorm(None, norm.weight.detach(), norm.eps), *up_args)
    for bad in ({"splits": 1, "block_depth": 256}, {"locks": gemv_locks(128, x.device, 2, 32)}):
        with pytest.raises(ValueError, match="split sums"):
            gptq_gemv_split_sums(x, *down_args, **{"splits": 4, "block_depth": 64, **bad})


def _pair_codes(words: list[int], pair) -> tuple[int, int]:
    """What the half2 sums take out of a chunk's words for one pair (half2_pairs): its two codes,
    read from the OR of its masked parts at bits t and 16 + t."""
    _, _, t, parts = pair
    v = 0
    for r, s, mask in parts:
        v |= (words[r] >> s) & (mask * 0x10001)
    return (v >> t) & 0xFFFF, v >> (16 + t)


@pytest.mark.parametrize("bits,layout", [(2, "gptq"), (4, "gptq"), (8, "gptq"), (3, "pairs")])
def test_half2_pairs_take_every_code_of_a_chunk_once_from_its_place(bits, layout):
    """Packed in `layout`, a chunk of random codes comes out of its words pair by pair as the plan
    says: every code once, each within float16 1024's mantissa (t + b ≤ 10); in the GPTQ layout
    word by word (_half2_sums reads a word's inputs together), in the pairs layout inputs 2i and
    2i + 1 together (one word of x, no permutation). 3 bits have no plan in the GPTQ layout."""
    from qrobust.kernels.layouts import half2_pairs
    from qrobust.quant.pack import pack_qweight

    q = torch.randint(0, 2 ** bits, (1, 32), generator=torch.Generator().manual_seed(bits))
    words = [int(w) & 0xFFFFFFFF for w in pack_qweight(q, bits, layout)[:, 0]]
    pairs = half2_pairs(bits, layout)
    assert sorted(j for p in pairs for j in p[:2]) == list(range(32))
    for k, pair in enumerate(pairs):
        j_lo, j_hi, t, parts = pair
        assert _pair_codes(words, pair) == (q[0, j_lo], q[0, j_hi]) and t + bits <= 10
        if layout == "pairs":
            assert (j_lo, j_hi) == (2 * k, 2 * k + 1)
        else:
            assert [r for r, _, _ in parts] == [k // (16 // bits)] and j_lo // (32 // bits) == parts[0][0]
    assert half2_pairs(3) is None and half2_pairs(4, "pairs") is None


def _half2_reference(x: torch.Tensor, layer: QuantLinear, group_size: int) -> torch.Tensor:
    """x [M, K] (float16) times the layer as the half2 sums compute it, in float64 but for their
    float16 roundings: per chunk of 32 inputs, d = (q − 2ᵇ⁻¹)/2ᵇ⁻¹ times x added pair by pair
    (half2_pairs' order) into two float16 sums, rounded at each step."""
    from qrobust.kernels.layouts import half2_pairs

    bits = layer.spec.bits
    half = 2 ** (bits - 1)
    d = (layer.codes().double() - half) / half
    z, s, xd = layer.zero_points().double(), layer.scales.double(), x.double()
    out = torch.zeros(x.shape[0], layer.out_features, dtype=torch.float64, device=x.device)
    for c in range(0, layer.in_features, 32):
        sums = [torch.zeros_like(out, dtype=torch.float16) for _ in range(2)]
        for pair in half2_pairs(bits, layer.layout):
            for i, j in enumerate(pair[:2]):
                sums[i] = (xd[:, c + j, None] * d[None, :, c + j] + sums[i].double()).half()
        g = c // group_size
        chunk_x = xd[:, c:c + 32].sum(1, keepdim=True)
        out += s[g] * (half * (sums[0].double() + sums[1].double()) - (z[g] - half) * chunk_x)
    return out


def _ulps(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest difference in units of float16's spacing at the reference's values."""
    spacing = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -14))) - 10)
    return float(((y.double() - ref).abs() / spacing).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_half2_gemv_rounds_its_float16_sums_as_planned(bits):
    """With half2 the GEMV's outputs are within a float16 spacing or two of _half2_reference, in
    one K-split and in two; the float32 sums (no half2) are tens of spacings away at these
    sizes, so the half2 path ran. Float32 inputs fall back to the float32 sums. 3 bits: in the
    pairs layout (the GPTQ layout has no plan)."""
    from qrobust.kernels import gemv_locks, gptq_gemv

    layer = _layer(bits, 64, False, False, bias=False, N=64)
    layer.half2 = True
    assert layer.layout == ("pairs" if bits == 3 else "gptq")
    g = torch.Generator().manual_seed(bits)
    x = (3 * torch.randn(2, layer.in_features, generator=g)).half().to(DEVICE)
    args = (layer.qweight, layer.scales, layer.qzeros, None, bits, 64, FORMAT_OFFSET[layer.format])
    ref = _half2_reference(x, layer, 64)
    locks = gemv_locks(layer.out_features, x.device, rows=2, block_n=32)
    for splits, lock in ((1, None), (2, locks)):
        y = gptq_gemv(x, *args, splits=splits, block_depth=256 // splits, locks=lock, half2=True,
                      layout=layer.layout)
        assert _ulps(y, ref) <= 2
    assert _ulps(gptq_gemv(x, *args, layout=layer.layout), ref) > 10
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view_as(x).copy_(x)
    assert torch.equal(gptq_gemv(shifted, *args, half2=True, layout=layer.layout),
                       gptq_gemv(x, *args, half2=True, layout=layer.layout))
    x32 = x.float()
    assert torch.equal(gptq_gemv(x32, *args, half2=True, layout=layer.layout),
                       gptq_gemv(x32, *args, layout=layer.layout))


@pytest.mark.parametrize("shuffled", [False, True])
def test_kernels_read_the_3_bit_pairs_layout_as_the_gptq_layout(shuffled):
    """The same 3-bit codes packed in the pairs layout give the GPTQ layout's results exactly:
    the dequantization, the fused matmul, and the GEMV's float32 sums (same codes, same order of
    additions), act-order included; a layout the width lacks is refused."""
    from qrobust.kernels import gptq_dequantize, gptq_gemv, gptq_matmul
    from qrobust.quant.pack import repack_qweight

    layer = _layer(3, 64, False, shuffled, N=64)
    K = layer.in_features
    pairs = repack_qweight(layer.qweight, 3, K, "gptq", "pairs")
    assert not torch.equal(pairs, layer.qweight)
    g_idx = layer.g_idx if shuffled else None
    rest = (layer.scales, layer.qzeros, g_idx, 3, 64, FORMAT_OFFSET[layer.format])
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(gptq_dequantize(pairs, *rest, K=K, dtype=dtype, layout="pairs"),
                           gptq_dequantize(layer.qweight, *rest, K=K, dtype=dtype))
    for xs in (x, x.half()):
        assert torch.equal(gptq_gemv(xs[:2], pairs, *rest, bias=layer.bias, layout="pairs"),
                           gptq_gemv(xs[:2], layer.qweight, *rest, bias=layer.bias))
    assert torch.equal(gptq_matmul(x, pairs, *rest, bias=layer.bias, layout="pairs"),
                       gptq_matmul(x, layer.qweight, *rest, bias=layer.bias))
    with pytest.raises(ValueError, match="no 'pairs' layout for 4-bit"):
        gptq_gemv(x, layer.qweight, layer.scales, layer.qzeros, None, 4, 64, 1, layout="pairs")


def test_rows_for_the_half2_reads_start_at_16_bytes():
    """aligned_rows leaves aligned rows alone and copies a view whose first row (or whose row
    stride) is off 16 bytes, values unchanged: the half2 sums read x 16 bytes at a time."""
    from qrobust.kernels.gemv import aligned_rows

    x = torch.randn(3, 40).half()
    assert aligned_rows(x) is x
    for view in (torch.empty(121, dtype=torch.float16)[1:].view(3, 40).copy_(x), x[:, :36]):
        y = aligned_rows(view.contiguous())
        assert torch.equal(y, view) and y.data_ptr() % 16 == 0 and y.stride(0) * 2 % 16 == 0


def test_half2_gemv_with_the_norm_and_swiglu_sums_the_normalized_row():
    """gptq_gemv_add_norm with half2 (and SwiGLU, two K-splits): the half2 sums of the float16
    RMSNorm(residual + x), then silu(gate)·up."""
    from qrobust.kernels import AddNorm, gemv_locks, gptq_gemv_add_norm
    from qrobust.models.transformer import RMSNorm

    layer = _layer(4, 64, False, False, bias=False, N=64)
    K = layer.in_features
    norm = RMSNorm(K, 1e-6).to(DEVICE).half()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K, generator=g) + 0.5)
    x, residual = (torch.randn(2, K, generator=g).half().to(DEVICE) for _ in range(2))
    with torch.no_grad():
        ref = _half2_reference(norm(residual + x), layer, 64)
    ref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
    locks = gemv_locks(layer.out_features, x.device, rows=2, block_n=32)
    y, _ = gptq_gemv_add_norm(x, AddNorm(residual, norm.weight.detach(), norm.eps), layer.qweight, layer.scales,
                              layer.qzeros, None, 4, 64, FORMAT_OFFSET[layer.format], splits=2, block_depth=128,
                              locks=locks, swiglu=True, half2=True)
    assert _ulps(y, ref) <= 2


@pytest.mark.parametrize("bits,group_size,sym,shuffled", CASES)
def test_fused_matmul_matches_the_torch_dequantization(bits, group_size, sym, shuffled):
    from qrobust.kernels import gptq_matmul

    layer = _layer(bits, group_size, sym, shuffled)
    layer = layer.half() if DEVICE == "cuda" else layer
    K = layer.in_features
    dtype = layer.bias.dtype
    x = torch.randn(37, K, device=DEVICE, dtype=dtype)  # not a multiple of the row tile
    y = gptq_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx if shuffled else None, bits,
                    K if group_size == -1 else group_size, FORMAT_OFFSET[layer.format], bias=layer.bias)
    ref = x.float() @ layer.dequantized_weight().t() + layer.bias.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)


def test_tile_depth_divides_groups_or_cuts_them_at_whole_chunks():
    from qrobust.kernels.launch import block_k

    assert block_k(2048, 128, act_order=False, preferred=512) == 128
    assert block_k(2048, 128, act_order=False, preferred=512, chunked=True) == 512
    assert block_k(2048, 64, act_order=True, preferred=512) == 512
    assert block_k(6144, 96, act_order=False, preferred=128) == 32
    assert block_k(6144, 96, act_order=False, preferred=128, chunked=True) == 128
    with pytest.raises(ValueError, match="divisible by 32"):
        block_k(2000, 128, act_order=False, preferred=128)
    with pytest.raises(ValueError, match="divisible by 32"):
        block_k(2048, 48, act_order=False, preferred=128, chunked=True)


def test_gemv_config_gives_each_program_one_deep_tile():
    from qrobust.kernels import GemvConfig, gemv_config

    assert gemv_config(2048, 128, act_order=False) == GemvConfig(32, 2048, 1, 8)  # all of K, 256 codes a thread
    assert gemv_config(6144, 128, act_order=False) == GemvConfig(32, 2048, 3, 8)  # deeper: K-splits of 2048
    assert gemv_config(1536, 96, act_order=False) == GemvConfig(32, 512, 3, 2)  # the deepest tile dividing K
    assert gemv_config(256, 32, act_order=True) == GemvConfig(32, 256, 1, 1)


def test_gemv_rejects_tiles_narrower_than_a_chunk():
    from qrobust.kernels import gptq_gemv

    layer = _layer(4, 128, True, False)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        gptq_gemv(torch.randn(1, 256, device=DEVICE), layer.qweight, layer.scales, layer.qzeros, None, 4, 128,
                  FORMAT_OFFSET[layer.format], block_n=16)


@pytest.mark.parametrize("rows", [1, 7])
def test_quant_linear_forward_takes_the_packed_path(monkeypatch, rows):
    """With kernels on, forward reads the packed buffers (GEMV for few rows, dequantize-and-matmul
    for more) and caches no dense weight."""
    import qrobust.quant.qlinear as qlinear

    monkeypatch.setattr(qlinear, "kernels_enabled", kernels.supports)
    layer = _layer(4, 64, False, shuffled=False)
    x = torch.randn(2, rows, layer.in_features, device=DEVICE)
    y = layer(x)
    assert layer.uses_kernels(x.device) and layer._weight is None
    torch.testing.assert_close(y, x @ layer.dequantized_weight().t() + layer.bias, rtol=1e-4, atol=1e-4)


def test_quant_linear_reads_an_unindexed_cuda_device_as_the_current_one(monkeypatch):
    """uses_kernels(torch.device("cuda")) answers for the current CUDA device, as tensors placed
    on "cuda" go there, rather than No because "cuda" is not "cuda:0" (checked on CPU against a
    layer whose choice was cached for cuda:1)."""
    layer = _layer(4, 64, False, shuffled=False)
    layer._kernel_args = KernelArgs(torch.device("cuda", 1), *(None,) * 5)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert layer.uses_kernels(torch.device("cuda")) and layer.uses_kernels(torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert not layer.uses_kernels(torch.device("cuda"))


def test_quant_linear_falls_back_when_tiles_do_not_fit(monkeypatch):
    import qrobust.quant.qlinear as qlinear

    monkeypatch.setattr(qlinear, "kernels_enabled", kernels.supports)
    layer = _layer(4, 16, True, shuffled=False, bias=False, K=80)  # 80 inputs: no whole 32-input tiles
    x = torch.randn(1, layer.in_features, device=DEVICE)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t())
    assert not layer.uses_kernels(x.device) and layer._weight is not None


def test_kernels_are_off_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("QROBUST_KERNELS", raising=False)
    assert not kernels.kernels_enabled("cpu")
    monkeypatch.setenv("QROBUST_KERNELS", "0")
    assert not kernels.kernels_enabled("cuda")


@pytest.mark.parametrize("shuffled", [False, True])
def test_tinygemm_operands_reproduce_the_gptq_weight(shuffled):
    """(q − 8)·s + m over the permuted inputs is the GPTQ layer's s·(q − z), up to bfloat16."""
    from qrobust.kernels.tinygemm import applies, operands

    layer = _layer(4, 64, sym=False, shuffled=shuffled, K=256).cpu()
    assert applies(layer)
    ops = operands(layer)
    assert (ops.perm is not None) == shuffled
    groups = torch.arange(layer.in_features) // 64
    s, m = ops.scales_and_zeros.float().unbind(-1)
    w = (ops.codes.float() - 8) * s[groups].t() + m[groups].t()
    ref = layer.dequantized_weight()
    ref = ref[:, ops.perm] if shuffled else ref
    torch.testing.assert_close(w, ref, rtol=0, atol=float(ref.abs().max()) * 2 ** -7)


def test_tinygemm_layer_matches_the_quant_layer_and_repacks_only_what_applies():
    from qrobust.kernels.tinygemm import TinyGemmLinear, applies, repack_int4

    model = torch.nn.Sequential(_layer(4, 64, True, shuffled=True, K=256).cpu(), torch.nn.ReLU(),
                                _layer(3, 32, True, shuffled=False, N=256, K=96).cpu())  # 3 bits: stays
    x = torch.randn(5, 256)
    expected = model(x)
    assert not applies(_layer(4, 16, True, shuffled=False, K=256).cpu())  # group size tinygemm lacks
    assert repack_int4(model) == 1
    assert isinstance(model[0], TinyGemmLinear) and isinstance(model[2], QuantLinear)
    torch.testing.assert_close(model(x), expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))


def test_products_are_custom_ops_that_torch_compile_can_trace():
    """The fake (shape-only) implementations agree with the kernels, which torch.compile and
    CUDA graphs rely on."""
    from qrobust.kernels import dequantize_op, gemv_locks, gemv_op

    layer = _layer(4, 64, True, shuffled=False)
    x = torch.randn(2, layer.in_features, device=DEVICE)
    packed = (layer.qweight, layer.scales, layer.qzeros, None)
    locks = gemv_locks(layer.out_features, x.device, rows=2, block_n=32)
    gemv_args = (x, *packed, layer.bias, locks, 4, 64, FORMAT_OFFSET[layer.format], 32, 64, 2, 4)
    torch.library.opcheck(gemv_op, gemv_args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(gemv_op, gemv_args + (True,), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(dequantize_op,
                          (*packed, 4, 64, FORMAT_OFFSET[layer.format], layer.in_features, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("heads,kv_heads,position", [(4, 2, 0), (6, 2, 37), (4, 4, 63), (8, 2, 40)])
def test_decode_attention_matches_masked_sdpa(heads, kv_heads, position):
    """One token's grouped-query attention over the cache up to its position equals SDPA over the
    repeated keys with the positions past it masked (stale cache entries beyond are ignored): in
    one program per KV head, and split along the cache (splits past the position hold nothing),
    over several key blocks and a partial last one, three query heads per KV head padded to four."""
    from qrobust.kernels.decode_attention import attention_splits, decode_attention

    g = torch.Generator().manual_seed(position)
    B, L, D = 2, 64, 16
    q = torch.randn(B, heads, 1, D, generator=g).to(DEVICE)
    k, v = (torch.randn(B, kv_heads, L, D, generator=g).to(DEVICE) for _ in range(2))
    pos = torch.tensor([position], device=DEVICE)
    rep = heads // kv_heads
    mask = (torch.arange(L, device=DEVICE) <= position)[None, None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                           attn_mask=mask)
    locks = torch.zeros(B * kv_heads, dtype=torch.int32, device=DEVICE)
    for splits, lock in ((1, None), (4, locks), (2, locks)):  # 2 splits: position 0 … 31 in the first alone
        out = decode_attention(q, k, v, pos, lock, block_l=16, splits=splits)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert not locks.any()
    assert attention_splits(160, 64) == (1, 256) and attention_splits(4096, 64) == (16, 256)
    assert attention_splits(64, 4) == (4, 16)
    torch.testing.assert_close(decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, pos, locks),
                               ref, rtol=1e-4, atol=1e-4)  # a non-contiguous q
    half = decode_attention(q.half(), k.half(), v.half(), pos, locks, block_l=16, splits=2)
    torch.testing.assert_close(half.float(), ref, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention(q.expand(B, heads, 2, D), k, v, pos)
    with pytest.raises(ValueError, match="locks"):
        decode_attention(q, k, v, pos, splits=2)


@pytest.mark.parametrize("position", [0, 37])
def test_decode_attention_normalizes_rotates_and_caches_the_new_token(position):
    """From the new token's projections (rows of one fused q/k/v output, as the model passes them),
    the kernel gives the torch path's attention: per-head RMSNorm and rotary embedding, the new
    key and value written into the caches at the position, then attention up to it; in one
    program and split along the cache."""
    from qrobust.kernels.decode_attention import NewToken, decode_attention, decode_attention_op
    from qrobust.models.transformer import RMSNorm, RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(position)
    B, H, H_kv, L, D = 2, 6, 2, 64, 16
    qkv = torch.randn(B, 1, (H + 2 * H_kv) * D, generator=g).to(DEVICE)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    k_cache, v_cache = (torch.randn(B, H_kv, L, D, generator=g).to(DEVICE) for _ in range(2))
    q_norm, k_norm = RMSNorm(D, 1e-6).to(DEVICE), RMSNorm(D, 1e-6).to(DEVICE)
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
        k_norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
        cos, sin = RotaryEmbedding(D, 10000.0).to(DEVICE)(torch.tensor([[position]], device=DEVICE), torch.float32)
        qh = apply_rotary(q_norm(q.reshape(B, 1, H, D)).transpose(1, 2), cos, sin)
        kh = apply_rotary(k_norm(k.reshape(B, 1, H_kv, D)).transpose(1, 2), cos, sin)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[:, :, position], v_ref[:, :, position] = kh[:, :, 0], v.reshape(B, H_kv, D)
    mask = (torch.arange(L, device=DEVICE) <= position)[None, None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(qh, k_ref.repeat_interleave(H // H_kv, 1),
                                                           v_ref.repeat_interleave(H // H_kv, 1), attn_mask=mask)
    new = NewToken(k, v, q_norm.weight.detach(), k_norm.weight.detach(), 1e-6, cos.reshape(-1), sin.reshape(-1))
    locks = torch.zeros(B * H_kv, dtype=torch.int32, device=DEVICE)
    for splits, lock in ((1, None), (4, locks)):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = decode_attention(q, kc, vc, torch.tensor([position], device=DEVICE), lock, block_l=16, splits=splits,
                               new=new)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kc, k_ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(vc, v_ref)
    args = (q, k, v, k_cache.clone(), v_cache.clone(), torch.tensor([position], device=DEVICE), locks,
            new.q_weight, new.k_weight, 1e-6, new.cos, new.sin)
    torch.library.opcheck(decode_attention_op, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="rows of contiguous heads"):
        decode_attention(q, k_cache, v_cache, torch.tensor([position], device=DEVICE),
                         new=dataclasses.replace(new, k=k[:, :, :D]))


def test_decode_attention_of_a_left_padded_batch_starts_each_row_at_its_first_key():
    """The batched engine's step: rows padded on the left by different amounts share the slot
    index, each rotated at its own position (slot − padding) and attending from its first real
    key; the kernel gives what the torch path gives with the engine's mask, in one program and
    split along the cache (a row whose padding fills whole splits)."""
    from qrobust.kernels.decode_attention import NewToken, decode_attention
    from qrobust.models.transformer import RMSNorm, RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(5)
    B, H, H_kv, L, D, slot = 3, 4, 2, 64, 16, 45
    pad = torch.tensor([0, 7, 40], device=DEVICE)
    q, k, v = (torch.randn(B, 1, n * D, generator=g).to(DEVICE) for n in (H, H_kv, H_kv))
    k_cache, v_cache = (torch.randn(B, H_kv, L, D, generator=g).to(DEVICE) for _ in range(2))
    q_norm, k_norm = RMSNorm(D, 1e-6).to(DEVICE), RMSNorm(D, 1e-6).to(DEVICE)
    positions = (slot - pad)[:, None]
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
        cos, sin = RotaryEmbedding(D, 10000.0).to(DEVICE)(positions, torch.float32)  # [B, 1, D]
        qh = apply_rotary(q_norm(q.reshape(B, 1, H, D)).transpose(1, 2), cos, sin)
        kh = apply_rotary(k_norm(k.reshape(B, 1, H_kv, D)).transpose(1, 2), cos, sin)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[:, :, slot], v_ref[:, :, slot] = kh[:, :, 0], v.reshape(B, H_kv, D)
    keys = torch.arange(L, device=DEVICE)
    mask = ((keys[None] >= pad[:, None]) & (keys[None] <= slot))[:, None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(qh, k_ref, v_ref, attn_mask=mask, enable_gqa=True)
    new = NewToken(k, v, q_norm.weight.detach(), k_norm.weight.detach(), 1e-6, cos.reshape(B, D), sin.reshape(B, D))
    locks = torch.zeros(B * H_kv, dtype=torch.int32, device=DEVICE)
    for splits, lock in ((1, None), (4, locks)):  # 4 splits of 16: the last row's padding fills two
        kc, vc = k_cache.clone(), v_cache.clone()
        out = decode_attention(q, kc, vc, torch.tensor([slot], device=DEVICE), lock, block_l=16, splits=splits,
                               new=new, start=pad)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kc, k_ref, rtol=1e-5, atol=1e-5)
        assert not locks.any()
    with pytest.raises(ValueError, match="cos and sin"):
        decode_attention(q, k_cache, v_cache, torch.tensor([slot], device=DEVICE),
                         new=dataclasses.replace(new, cos=cos.reshape(B, D)[:2], sin=sin.reshape(B, D)[:2]))
    with pytest.raises(ValueError, match="start"):
        decode_attention(q, k_cache, v_cache, torch.tensor([slot], device=DEVICE), new=new, start=pad[:2])


PDL_COMPILE = """
import json, sys
from qrobust.kernels import compile_gemv_for
overrides, dtype, form, norm_dtype = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
constants = dict(BITS=3, LAYOUT="gptq", OFFSET=1, GS=128, ACT_ORDER=False, HAS_BIAS=True, BLOCK_N=32, BLOCK_K=256,
                 SPLITS=2, LAST_SUMS=True, SWIGLU=False, ONE_TILE=True, PDL=True, NORM=False, HAS_RES=False, K_POW2=512,
                 X_SPLITS=1, HALF2=False, ASM=True)
print(compile_gemv_for(90, {**constants, **overrides}, dtype=dtype, num_warps=1,
                       norm_dtype=norm_dtype).asm[form])
"""


def _compiled_with_pdl(overrides: dict, dtype: str, form: str, norm_dtype: str = "fp16") -> tuple[str, str]:
    """The GEMV compiled for an H100 as a programmatic dependent launch (no GPU needed; outside
    the interpreter, hence a separate process), activations of `dtype` and norm weights of
    `norm_dtype`, its `form` (ttir, ptx) split at its one wait."""
    import json
    import os
    import subprocess
    import sys

    import triton.language as tl

    if not hasattr(tl.extra.cuda, "gdc_wait"):
        pytest.skip("this Triton has no griddepcontrol calls")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = subprocess.run([sys.executable, "-c", PDL_COMPILE, json.dumps(overrides), dtype, form, norm_dtype],
                          env=env, capture_output=True, text=True, check=True).stdout
    assert code.count("griddepcontrol.wait") == 1 and code.count("griddepcontrol.launch_dependents") == 1
    before, after = code.split("griddepcontrol.wait")
    return before, after


@pytest.mark.parametrize("variant", ["plain", "norm"])
def test_gemv_with_pdl_reads_only_weights_before_it_waits(variant):
    """Launched as a programmatic dependent launch, the GEMV may run while the kernel before it
    still writes x: everything before its wait loads the packed weights and zero points (int32)
    or the scales and the norm's weights (fp16), and every read of x (here fp32) and every write
    comes after, once; so do the residual's reads and the norm's writes where the residual add
    and the norm come first. Nothing reads fp16 after the wait: the norm's weights too come before
    it, not after the mean of squares, where their load held up every program (faster decoding)."""
    import re

    norm = variant == "norm"
    before, after = _compiled_with_pdl({"NORM": norm, "HAS_RES": norm}, "fp32", "ttir")
    pointee = r"tt\.load [^:]*: (?:tensor<[^>]*)?!tt\.ptr<(\w+)>"
    assert set(re.findall(pointee, before)) == {"i32", "f16"}
    assert not re.search(r"tt\.(store|atomic)", before)
    assert "f32" in re.findall(pointee, after) and "f16" not in re.findall(pointee, after)


def test_gemv_reads_weights_as_first_to_leave_l2():
    """The GEMV reads its packed words, zero points and scales (all of them before its PDL wait)
    with L2's evict_first policy, so that the stream of weights does not push activations and
    the KV cache out of L2, and x (after the wait) without it."""
    import re

    before, after = _compiled_with_pdl({}, "fp32", "ptx")
    assert "createpolicy.fractional.L2::evict_first" in before
    loads = re.findall(r"ld\.global[\w:.]*", before)
    assert loads and all("L2::cache_hint" in load for load in loads)
    assert any("cache_hint" not in load for load in re.findall(r"ld\.global[\w:.]*", after))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_half2_gemv_reads_x_16_bytes_at_a_time(bits):
    """The half2 sums read a chunk's inputs as 16-byte vectors (8 bytes at 8 bits, whose words
    take 4 inputs each) and pair them with byte permutations, not as one 16-bit load per input:
    one load of x per input cost about 2% of 4-bit decoding on an H100. The one 16-bit read
    left after the wait is _after_wait's x₀."""
    import re

    _, after = _compiled_with_pdl({"BITS": bits, "HALF2": True, "HAS_BIAS": False}, "fp16", "ptx")
    vector = r"ld\.global\.v2\.u32" if bits == 8 else r"ld\.global\.v4\.u32"
    assert len(re.findall(vector, after)) >= 2 and len(re.findall(r"ld\.global\.b16", after)) == 1
    assert len(re.findall(r"prmt\.b32", after)) >= 16


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_half2_gemv_with_pdl_unpacks_codes_only_after_it_waits(bits):
    """Under PDL the half2 sums mask their codes out of the words after the wait, each pair in
    one lop3 with `one`, which is read after it: the LLVM of Triton 3.6 moved plain masks (PTX
    and.b32) ahead of the wait wherever the words alone fed them, and ptxas then held every
    masked pair in registers while the loads were in flight (184 to 255 registers instead of 71
    to 127 at 2 to 8 bits, and a slower product)."""
    import re

    from qrobust.kernels.layouts import half2_pairs

    layout = "pairs" if bits == 3 else "gptq"
    before, after = _compiled_with_pdl({"BITS": bits, "LAYOUT": layout, "HALF2": True, "HAS_BIAS": False}, "fp16",
                                       "ptx")
    masks = {mask * 0x10001 for *_, parts in half2_pairs(bits, layout) for _, _, mask in parts}
    masked = r"(?:and\.b32\s+%r\d+, %r\d+|lop3\.b32\s+%r\d+, (?:%r\d+|t)), (\d+)[,;]"
    assert not masks & {int(m) for m in re.findall(masked, before)}
    assert masks <= {int(m) for m in re.findall(masked, after)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,transposed", [((3, 5, 2048), False), ((2, 7, 4, 128), True), ((1, 1, 96), False)])
def test_rms_norm_kernel_matches_the_torch_form(dtype, shape, transposed):
    """One kernel for RMSNorm: rows of the hidden size and many short rows (q/k norms, given
    transposed as attention holds them), equal to the torch form up to a rounding step."""
    from qrobust.kernels.rms_norm import rms_norm
    from qrobust.models.transformer import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    if transposed:
        x = x.transpose(1, 2)
    norm = RMSNorm(shape[-1], 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
        norm.kernel = False
        ref = norm(x)
    out = rms_norm(x, norm.weight, norm.eps)
    assert out.shape == x.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2 ** -5  # bfloat16: a step in each of its two roundings
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    if dtype == torch.bfloat16 and DEVICE == "cuda":  # (Triton's interpreter truncates to bfloat16, a GPU rounds)
        assert (out == ref).float().mean() > 0.9  # the roundings are the torch form's: most elements bit for bit
    if kernels.pdl_supported(DEVICE):  # as a programmatic dependent launch, the same
        assert torch.equal(rms_norm(x, norm.weight, norm.eps, pdl=True), out)


NORM_PDL_COMPILE = """
from qrobust.kernels.launch import compile_for
from qrobust.kernels.rms_norm import _rms_norm_kernel
pointers = {name: "*bf16" for name in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "h_ptr")}
print(compile_for(_rms_norm_kernel, 90, pointers, {"n_rows": "i32", "n_cols": "i32", "eps": "fp32"},
                  dict(ROWS=2, BLOCK=2048, HAS_RESIDUAL=True, PDL=True), num_warps=8, launch_pdl=True).asm["ttir"])
"""


def test_as_a_dependent_launch_the_norm_kernel_reads_only_its_weight_before_it_waits():
    """kernels.rms_norm with pdl, compiled for sm_90 without a GPU: one wait, then the next kernel's
    launch; before the wait one load (the norm's weight) and no store, as the kernel before may
    still write the rows and the residual stream; their loads and every store come after."""
    import os
    import re
    import subprocess
    import sys

    import triton.language as tl

    if not hasattr(tl.extra.cuda, "gdc_wait"):
        pytest.skip("this Triton has no griddepcontrol calls")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ttir = subprocess.run([sys.executable, "-c", NORM_PDL_COMPILE], env=env, capture_output=True, text=True,
                          check=True).stdout
    assert ttir.count("griddepcontrol.wait") == 1 and ttir.count("griddepcontrol.launch_dependents") == 1
    before, after = ttir.split("griddepcontrol.wait")
    assert len(re.findall(r"tt\.load", before)) == 1 and not re.search(r"tt\.store", before)
    assert len(re.findall(r"tt\.load", after)) == 2 and len(re.findall(r"tt\.store", after)) == 2


def test_rms_norm_keeps_the_torch_form_where_gradients_flow(monkeypatch):
    """The norm kernel has no backward: where the kernels run, RMSNorm uses it without gradients
    (inference) and keeps the torch form where a gradient flows (hawq differentiates the model
    twice), with the same values both ways."""
    import qrobust.kernels.rms_norm as rms_norm_module
    import qrobust.models.transformer as transformer
    from qrobust.models.transformer import RMSNorm

    monkeypatch.setattr(transformer, "kernels_enabled", kernels.supports)
    calls = []
    kernel = rms_norm_module.rms_norm
    monkeypatch.setattr(rms_norm_module, "rms_norm", lambda *a: calls.append(1) or kernel(*a))
    norm = RMSNorm(64, 1e-6).to(DEVICE)
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        y_kernel = norm(x)
    assert calls == [1]
    y = norm(x)
    assert calls == [1] and y.grad_fn is not None
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(y.detach(), y_kernel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_kernel_adds_the_residual_and_normalizes_as_the_torch_form(dtype):
    """The residual add and the norm after it in one kernel: the stream h = residual + x as
    torch's add gives it, and RMSNorm(h) as the torch form gives it."""
    from qrobust.kernels.rms_norm import add_rms_norm
    from qrobust.models.transformer import RMSNorm

    g = torch.Generator().manual_seed(1)
    x, residual = ((torch.randn(3, 5, 2048, generator=g) * 3).to(DEVICE, dtype) for _ in range(2))
    norm = RMSNorm(2048, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(2048, generator=g) + 0.5)
        norm.kernel = False
        h_ref = residual + x
        ref = norm(h_ref)
    normed, h = add_rms_norm(x, residual, norm.weight, norm.eps)
    assert normed.shape == h.shape == x.shape and normed.dtype == h.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2 ** -5
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(normed.float(), ref.float(), rtol=tol, atol=tol)
    if dtype == torch.float32 or DEVICE == "cuda":  # (the interpreter truncates to bfloat16, a GPU rounds)
        assert torch.equal(h, h_ref)
    with pytest.raises(ValueError, match="does not match"):
        add_rms_norm(x, residual[:, :1], norm.weight, norm.eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_matches_the_interleaved_torch_form(dtype):
    """silu(gate)·up over (gate, up) pairs in one kernel: the torch form's values, shape [..., I]."""
    from qrobust.kernels.swiglu import swiglu
    from qrobust.quant.qlinear import interleaved_swiglu_torch

    g = torch.Generator().manual_seed(2)
    y = (torch.randn(2, 3, 2 * 1500, generator=g) * 4).to(DEVICE, dtype)  # not a multiple of the block
    out = swiglu(y)
    ref = interleaved_swiglu_torch(y)
    assert out.shape == (2, 3, 1500) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="pairs"):
        swiglu(y[..., :-1])
