"""The fragments layout of 2-, 3-, 4- and 8-bit weights (kernels.fragments) and its Hopper product
(kernels.fragments_matmul): the layout, its dequantization and QuantLinear's use of it on CPU
(Triton's interpreter, conftest); the product compiled for sm_90 without a GPU, and run on a
Hopper GPU where there is one."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrobust import kernels
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.kernel_choice import packed_kernel
from qrobust.quant.pack import unpack_qweight
from qrobust.quant.qlinear import FORMAT_OFFSET, QuantLinear

pytestmark = pytest.mark.skipif(not kernels.triton_installed(), reason="Triton is not installed")
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(N: int = 128, K: int = 256, sym: bool = True, bias: bool = False, seed: int = 0,
           bits: int = 4) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    result = rtn(torch.randn(N, K, generator=g), QuantSpec(bits, 128, sym=sym))
    return QuantLinear.from_result(result, torch.randn(N, generator=g) if bias else None, torch.float32)


def _hopper() -> bool:
    from qrobust.kernels.fragments import runs_fragments

    return torch.cuda.is_available() and runs_fragments(torch.device("cuda", torch.cuda.current_device()))


@pytest.mark.parametrize("bits", [4, 2, 8, 3])
def test_each_word_holds_one_threads_a_fragment_codes(bits):
    """Lane 4g + c of warp w feeds wgmma, per 16-input step t of a 64 × 128 tile, the codes of
    pairs J = 0..3: output 16w + 8(J & 1) + g, inputs 16t + 8(J >> 1) + 2c + h (rows g, g + 8;
    inputs 2c, 2c + 1, 2c + 8, 2c + 9). Its pair e = 4t + J sits in its word e div R at bits
    b·(e mod R) + 16h, R = 16/b: at 4 bits a word per step, at 2 one per two steps, at 8 two per
    step. 3-bit tiles hold the codes' low two bits so, then their high bits as b = 1. And the
    layout goes back to GPTQ's exactly."""
    from qrobust.kernels.fragments import from_fragments, to_fragments

    layer = _layer(N=128, K=256, bits=bits)
    words = to_fragments(layer.qweight, 256, bits)
    assert words.shape == layer.qweight.shape and torch.equal(from_fragments(words, 256, bits), layer.qweight)
    codes = unpack_qweight(layer.qweight, bits, 256)  # [N, K]
    tiles = words.reshape(2, 2, -1).to(torch.int64) & 0xFFFFFFFF  # [N/64, K/128, 256·bits]
    first = 0
    for width, low in ((2, 0), (1, 2)) if bits == 3 else ((bits, 0),):
        R, mask = 16 // width, (1 << width) - 1
        w = tiles[..., first:first + 256 * width].reshape(2, 2, 4, 8, 4, 2 * width)
        g = torch.Generator().manual_seed(1)
        for tile, step, warp, lane_g, c, t, j, h in torch.randint(0, 2, (64, 8), generator=g).tolist():
            warp, lane_g, c, t, j = 3 * warp, 7 * lane_g, 3 * c, 7 * t, 3 * j
            n = 64 * tile + 16 * warp + 8 * (j & 1) + lane_g
            k = 128 * step + 16 * t + 8 * (j >> 1) + 2 * c + h
            e = 4 * t + j
            word = w[tile, step, warp, lane_g, c, e // R]
            assert (word >> (width * (e % R) + 16 * h)) & mask == (codes[n, k] >> low) & mask
        first += 256 * width
    assert first == tiles.shape[-1]


@pytest.mark.parametrize("bits", [4, 2, 8, 3])
@pytest.mark.parametrize("sym", [True, False])
def test_dequantizing_the_fragments_layout_gives_the_dequantized_weight(sym, bits):
    from qrobust.kernels.fragments import dequantize_fragments, to_fragments

    layer = _layer(sym=sym, seed=2, bits=bits).to(DEVICE)
    w = dequantize_fragments(to_fragments(layer.qweight, 256, bits), layer.scales, layer.qzeros,
                             FORMAT_OFFSET[layer.format], 256, torch.float32, bits)
    assert torch.equal(w, layer.dequantized_weight().t())


def test_widths_the_layout_does_not_hold_are_refused():
    from qrobust.kernels.fragments import fragments_apply, to_fragments

    assert [fragments_apply(b, 128, True, 128, 256) for b in (1, 2, 3, 4, 5, 8)] == [False, True, True, True, False,
                                                                                  True]
    assert not fragments_apply(4, 64, True, 128, 256) and not fragments_apply(2, 128, False, 128, 256)
    with pytest.raises(ValueError, match="holds"):
        to_fragments(_layer(bits=4).qweight, 256, 5)


@pytest.mark.parametrize("bits", [4, 2, 8, 3])
def test_a_layer_in_the_fragments_layout_saves_gptq_and_computes_the_same(monkeypatch, bits):
    """QuantLinear repacks where fragments are chosen (forced here: CPU has no wgmma): its codes,
    dequantized weight and saved checkpoint are unchanged, its products (float32 rows: the
    dequantized weight, by the table's dequant_matmul) equal the GPTQ layout's, and a checkpoint
    loaded into it is repacked again."""
    from qrobust.kernels import fragments

    layer = _layer(bias=True, seed=3, bits=bits).to(DEVICE)
    gptq = layer.qweight.clone()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    expected = layer(x)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    monkeypatch.setattr(fragments, "runs_fragments", lambda device: True)
    layer._kernel_args = None
    assert layer.uses_kernels(x.device) == kernels.kernels_enabled(x.device)
    if not kernels.kernels_enabled(x.device):
        layer.use_fragments(x.device)
    assert layer.layout == "fragments" and not torch.equal(layer.qweight, gptq)
    assert torch.equal(layer.gptq_qweight(), gptq) and torch.equal(layer.state_dict()["qweight"], gptq)
    assert torch.equal(layer.dequantized_weight(), _layer(bias=True, seed=3, bits=bits).to(DEVICE).dequantized_weight())
    torch.testing.assert_close(layer(x), expected)
    layer.load_state_dict(saved)
    assert layer.layout == "fragments" and torch.equal(layer.gptq_qweight(), gptq)
    assert not layer.leaves_split_sums(x.device)


def test_the_table_sends_fragments_layers_to_their_product_and_larger_batches_to_dequantization():
    assert [packed_kernel("cuda", 4, m, "fragments") for m in (1, 4, 64, 65)] == \
        ["fragments_matmul"] * 3 + ["dequant_matmul"]
    assert packed_kernel("cuda", 4, 1) == "gemv"  # GPTQ's layout keeps its table


def test_layers_set_up_for_the_batch_1_decoder_keep_the_gptq_layout(monkeypatch):
    """The decoder's fused GEMVs (models.decode: pdl, fused norms, split sums, half2) read GPTQ's
    layout, so a layer with one of them on is not repacked; the others are, and both compute the
    same few rows."""
    from qrobust.kernels import fragments
    import qrobust.quant.qlinear as qlinear

    monkeypatch.setattr(qlinear, "kernels_enabled", kernels.supports)
    monkeypatch.setattr(fragments, "runs_fragments", lambda device: True)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    plain, decoder_layer = (_layer(N=128, K=256, bias=True, seed=7).to(DEVICE) for _ in range(2))
    decoder_layer.fuse_norm = True  # models.decode.fuse_norms
    expected = x @ plain.dequantized_weight().t() + plain.bias
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(decoder_layer(x), expected, rtol=1e-5, atol=1e-4)
    assert plain.layout == "fragments" and plain.packed_kernel(3, x.device) == "fragments_matmul"
    assert decoder_layer.layout == "gptq" and decoder_layer.packed_kernel(3, x.device) == "gemv"


def test_programs_of_warpgroups_that_do_not_tile_the_outputs_are_refused():
    pytest.importorskip("triton.experimental.gluon")
    from qrobust.kernels.fragments_matmul import fragments_matmul

    x, qweight = torch.zeros(8, 128, dtype=torch.bfloat16), torch.zeros(16, 192, dtype=torch.int32)
    for warpgroups in (2, 3):  # 192 outputs are three tiles of 64: not two programs of 128, no program of 3 warpgroups
        with pytest.raises(ValueError, match="do not tile 192 outputs"):
            fragments_matmul(x, qweight, None, None, 4, 1, warpgroups=warpgroups)


def test_the_tiling_fills_the_gpu_keeps_whole_steps_and_reads_large_layers_once_for_64_rows():
    from qrobust.kernels.fragments_matmul import MAX_SPLIT, fragments_tiling

    for M in (1, 8, 32, 33, 64):
        for N, K in ((2048, 2048), (1024, 2048), (6144, 2048), (2048, 6144), (12288, 2048), (64, 128)):
            rows, split, warpgroups = fragments_tiling(M, N, K)
            assert warpgroups == 1
            steps, tiles = K // 128, N // 64
            assert steps % split == 0 and split <= MAX_SPLIT
            if rows == 64:  # one program for all the rows: only where it still fills the GPU
                assert M > 32 and tiles * split >= 96 and (split == 1 or steps // split >= 12)
                continue
            assert rows == min(32, max(8, 1 << (M - 1).bit_length()))
            programs = tiles * -(-M // rows)
            target, min_steps = (512, 2) if M <= 8 else (256, 4)
            assert steps // split >= min(min_steps, steps)
            # not split further only where the layer has its programs or a split would be too short
            assert (programs * split >= target or split == MAX_SPLIT or steps % (2 * split)
                    or steps // (2 * split) < min_steps)
    # the measured best (results/engine/fragments_splits*.json): k_proj at 64 and 8 rows, and at 64
    # rows one program for the fused gate/up and down_proj, two of 32 for q_proj and q/k/v
    assert fragments_tiling(64, 1024, 2048)[:2] == (32, 4) and fragments_tiling(8, 1024, 2048)[:2] == (8, 8)
    assert fragments_tiling(64, 12288, 2048)[:2] == (64, 1) and fragments_tiling(64, 2048, 6144)[:2] == (64, 4)
    assert fragments_tiling(64, 2048, 2048)[:2] == (32, 4) and fragments_tiling(64, 4096, 2048)[:2] == (32, 2)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        fragments_tiling(65, 2048, 2048)


# 32-row programs; one of 64; one of 64 rows and 128 outputs (two warpgroups)
@pytest.mark.parametrize("shape, warpgroups, steps", [((64, 2048, 2048), 1, 4), ((64, 12288, 2048), 1, 16),
                                                      ((64, 12288, 2048), 2, 16)])
@pytest.mark.parametrize("bits", [4, 2, 8, 3])
def test_the_product_compiles_to_wgmma_from_registers_without_weight_stores(bits, shape, warpgroups, steps):
    """kernels.fragments_matmul compiled for sm_90 without a GPU, as it runs q_proj's and the fused
    gate/up's 64 rows: 8 wgmma instructions per 128-input step, x's tiles by asynchronous copies,
    no weight tile stored to shared memory (one store: the arrival counter's answer shared by the
    program's threads), no spills; a thread's words of a step in as few loads as its bytes need,
    whatever the program's warpgroups."""
    pytest.importorskip("triton.experimental.gluon")
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    code = ("import sys; from qrobust.kernels.fragments_matmul import compile_fragments_matmul_for, fragments_tiling;"
            "from kernel_asm import sass_facts;"
            f"M, N, K = {shape}; cubin = compile_fragments_matmul_for(M, N, K, bits={bits}, warpgroups={warpgroups})"
            ".asm['cubin'];"
            "ops, res = sass_facts(cubin); loads = sass_facts(cubin, modifiers=True)[0];"
            "print({**res, **ops, 'steps': K // 128 // fragments_tiling(M, N, K)[1],"
            "       'loads_128': loads['LDG.E.EF.128'], 'loads_64': loads.get('LDG.E.EF.64', 0)})")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    facts = ast.literal_eval(out.strip().splitlines()[-1])
    assert facts.get("STS", 0) <= 1 and facts["local"] == 0 and facts["LDGSTS"] > 0 and facts["steps"] == steps
    assert warpgroups == 1 or facts["stack"] == 0  # 128 outputs: a thread's share as with 64, no spills
    if bits in (3, 8) and shape[1] > 4096:
        # one 64-row program at 3 and 8 bits needs 255 and 242 registers, and its loop is left partly
        # rolled: fewer instructions in the code than it runs, so only spills and stores are checked
        return
    assert facts["HGMMA"] == 8 * facts["steps"]
    # a step's 4·bits bytes of a thread: 128-bit loads, and a 64-bit one for 3 bits' high bits
    assert (facts["loads_128"], facts["loads_64"]) == (facts["steps"] * max(1, bits // 2), facts["steps"] * (bits == 3))


@pytest.mark.parametrize("bits, shape", [(4, (64, 2048, 2048)), (3, (32, 12288, 2048))])
def test_as_a_dependent_launch_the_product_reads_only_weights_before_it_waits(bits, shape):
    """kernels.fragments_matmul with pdl, compiled for sm_90 without a GPU: one wait, then the
    launch of the next kernel; before the wait only the packed words, scales and zero points are
    loaded (the first steps' worth), never x (its asynchronous copies) and nothing is written,
    as the kernel before may still write x or read memory this one writes."""
    import re

    pytest.importorskip("triton.experimental.gluon")
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": str(ROOT)}
    code = ("from qrobust.kernels.fragments_matmul import compile_fragments_matmul_for;"
            f"print(compile_fragments_matmul_for(*{shape}, bits={bits}, pdl=True).asm['ptx'])")
    ptx = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert ptx.count("griddepcontrol.wait") == 1 and ptx.count("griddepcontrol.launch_dependents") == 1
    before, after = ptx.split("griddepcontrol.wait")
    assert "griddepcontrol.launch_dependents" in after
    loads = re.findall(r"ld\.global\S*", before)
    assert loads and not re.search(r"cp\.async|st\.global|atom\.|red\.", before)
    assert "cp.async" in after and "st.global" in after


@pytest.mark.skipif(not _hopper(), reason="kernels.fragments_matmul runs on Hopper GPUs")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 20, 64])  # programs of 8 rows; of 32 (or 16); two of 32 (or one of 64)
@pytest.mark.parametrize("bits", [4, 2, 8, 3])
def test_the_hopper_product_matches_the_dequantized_weight(dtype, rows, bits):
    """Every split (added up inside by the tile's last program, or afterwards), with a bias and
    with rows short of wgmma's tile: within half-precision rounding of x Ŵᵀ, the counters left at
    zero; in programs of one, two and four warpgroups (64, 128 and 256 outputs); with SwiGLU applied
    as the outputs are stored, the swiglu kernel's values; QuantLinear on the GPU repacks and runs it."""
    from qrobust.kernels.fragments import to_fragments
    from qrobust.kernels.fragments_matmul import fragments_locks, fragments_matmul

    layer = _layer(N=256, K=768, sym=False, bias=True, seed=rows, bits=bits)
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(5)).to("cuda", dtype)
    w = layer.dequantized_weight().to("cuda", dtype).float()
    ref = x.float() @ w.t() + layer.bias.cuda().float()
    words = to_fragments(layer.qweight.cuda(), 768, bits)
    scales, qzeros, bias = layer.scales.cuda(), layer.qzeros.cuda(), layer.bias.to("cuda", dtype)
    locks = fragments_locks(256, "cuda")
    for split in (1, 2, 3, 6):
        for lk in (locks, None):
            for per_program, warpgroups in ((None, None), (8, 1), (64, 1), (None, 2), (64, 4)):
                y = fragments_matmul(x, words, scales, qzeros, bits, FORMAT_OFFSET[layer.format], bias, lk,
                                     split_k=split, warpgroups=warpgroups,
                                     rows_per_program=per_program and max(per_program, 8 if rows <= 8 else 16))
                assert y.dtype == dtype and (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert not locks.any()
    from qrobust.kernels.swiglu import swiglu

    for split, lk, warpgroups in ((1, locks, None), (2, locks, None), (3, None, None), (2, locks, 2)):
        # SwiGLU as the outputs are stored: the swiglu kernel's values on the same sums, rounded alike
        args = (x, words, scales, qzeros, bits, FORMAT_OFFSET[layer.format], bias, lk)
        y = fragments_matmul(*args, split_k=split, warpgroups=warpgroups, swiglu=True)
        assert torch.equal(y, swiglu(fragments_matmul(*args, split_k=split, warpgroups=warpgroups)))
    assert not locks.any()
    for split in (1, 2):  # a programmatic dependent launch computes the same, launched after a kernel
        args = (x, words, scales, qzeros, bits, FORMAT_OFFSET[layer.format], bias, locks)
        expected = fragments_matmul(*args, split_k=split)
        assert torch.equal(fragments_matmul(*args, split_k=split, pdl=True), expected)
    assert not locks.any()
    cuda_layer = layer.to("cuda")
    y = cuda_layer(x)
    assert cuda_layer.layout == "fragments" and (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    cuda_layer.swiglu_epilogue = True  # its 256 outputs read as 128 interleaved (gate, up) pairs
    assert torch.equal(cuda_layer.forward_swiglu(x), swiglu(cuda_layer(x)))
