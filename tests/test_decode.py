import contextlib
import dataclasses
import gc
import weakref

import pytest
import torch

from qrobust.bench_generate import GenerateBench, bench_generate, model_bytes, quantize_blocks_rtn, summary_lines
from qrobust.errors import QrobustError
from qrobust.models.decode import GraphedForward, GreedyDecoder, capture
from qrobust.models.transformer import TransformerConfig, TransformerLM
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.qlinear import QuantLinear, replace_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CUDA the decoder replays graphs

def _model(causal=True, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, causal=causal,
                            mask_token_id=96)
    model = TransformerLM(cfg).eval()
    for p in model.parameters():  # larger weights than the init, so greedy tokens vary
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.2)
    return model.to(DEVICE)


def test_cached_decoding_matches_full_forward():
    """Every cached step's logits equal the full forward's over the whole prefix, and greedy
    tokens match re-running the model on the growing sequence; a second, shorter prompt
    reuses the cache without leaking the first one's keys."""
    model = _model()
    decoder = GreedyDecoder(model, max_len=24)
    for prompt in (torch.tensor([5, 17, 3, 44, 8, 2, 61]), torch.tensor([9, 1])):
        timing = decoder.generate(prompt, 12)
        ids = prompt[None].to(DEVICE)
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert timing.tokens.tolist() == ids[0, prompt.numel():].tolist()
        assert len(set(timing.tokens.tolist())) > 1
    caches = model.new_caches(1, 16, torch.arange(6, device=DEVICE))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_cached(ids, caches), model(ids), rtol=1e-4, atol=1e-4)


def test_decoder_refuses_diffusion_models_and_overlong_requests():
    with pytest.raises(ValueError, match="causal"):
        GreedyDecoder(_model(causal=False), 8)
    with pytest.raises(ValueError, match="exceed"):
        GreedyDecoder(_model(), 8).generate(torch.tensor([1, 2, 3]), 6)


def test_graphed_forward_returns_model_logits():
    model = _model(causal=False)
    forward = GraphedForward(model, (1, 10))
    ids = torch.randint(0, 96, (1, 10), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(forward(ids, torch.ones_like(ids)), model(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unpadded"):
        forward(ids, torch.zeros_like(ids))


def test_capture_keeps_the_function_and_its_tensors_alive(monkeypatch):
    """On CPU, with torch.cuda's streams and graphs replaced by stand-ins: the tensor that only the
    captured function's closure holds outlives the capture (the GPU test below checks what
    freeing it did: later allocations overwrote it under the replays)."""
    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())

    def make_fn():
        keys = torch.arange(8)
        return lambda: keys * 2, weakref.ref(keys)

    fn, keys = make_fn()
    replay = capture(fn, torch.device("cuda"))
    del fn
    gc.collect()
    assert keys() is not None and torch.equal(replay(), torch.arange(8) * 2) and Graph.replays == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_a_captured_graph_keeps_the_tensors_its_function_made():
    """The graph reads by address a tensor made before the capture that only the function's
    closure holds (as an engine step's key indices): it lives as long as the graph, so what is
    allocated after the capture cannot overwrite it."""
    def make_fn():
        keys = torch.arange(4096, device="cuda", dtype=torch.float32)
        return lambda: keys * 2

    replay = capture(make_fn(), torch.device("cuda"))
    for _ in range(64):  # each would take a freed block and leave -1 in it
        torch.full((4096,), -1.0, device="cuda")
    assert torch.equal(replay(), torch.arange(4096, device="cuda", dtype=torch.float32) * 2)


def test_rtn_packing_shrinks_weights_by_the_bit_ratio():
    model = _model()
    before = model_bytes(model)
    embed = model.model.embed_tokens.weight.numel() * 4
    assert quantize_blocks_rtn(model, QuantSpec(4, 32)) == 14
    assert all(isinstance(model.get_submodule(f"model.layers.0.{n}"), QuantLinear)
               for n in ("self_attn.q_proj", "mlp.down_proj"))
    linear = before - embed - sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    after = model_bytes(model) - embed - sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert after < linear * (4 / 32) * 1.6  # 4-bit codes plus scales, zeros and g_idx of 32-input groups


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_bench_generate_on_cpu(tmp_path, kind):
    bench = GenerateBench(shape="qwen3-0.6b", kind=kind, bits=(16, 4), prompt_len=4, new_tokens=4, repeats=1,
                          layers=1, vocab_size=256, device="cpu")
    out = tmp_path / "gen.json"
    results = bench_generate(bench, out, progress=False)
    assert out.exists() and [r["bits"] for r in results["runs"]] == [16, 4]
    fp16, q4 = results["runs"]
    assert q4["weight_gib"] < fp16["weight_gib"]
    # AR decoding runs 4-bit layers on tinygemm (the CPU variant here); diffusion steps do not
    assert q4["tinygemm_layers"] == (7 if kind == "ar" else 0) and fp16["tinygemm_layers"] == 0
    assert (fp16.get("tokens_per_s") or fp16.get("ms_per_step")) > 0
    lines = summary_lines(results)
    assert len(lines) == 3 and "1.00x" in lines[1] and "dense" in lines[1]
    assert ("tinygemm" if kind == "ar" else "torch") in lines[2]  # CPU: no Triton kernels


def test_pdl_keeps_4_bit_layers_on_our_gemv_unless_tinygemm_is_asked_for():
    """tinygemm, a PyTorch kernel, cannot start before the kernel ahead of it ends, so with pdl the
    4-bit layers stay on qrobust's GEMV by default; an explicit choice wins either way."""
    from qrobust.bench_generate import build_model
    from qrobust.kernels.tinygemm import TinyGemmLinear

    bench = GenerateBench(shape="qwen3-0.6b", bits=(4,), layers=1, vocab_size=256, device="cpu")
    assert bench.uses_tinygemm and not GenerateBench(pdl=True).uses_tinygemm
    assert GenerateBench(pdl=True, tinygemm=True).uses_tinygemm and not GenerateBench(tinygemm=False).uses_tinygemm
    tinygemm_layers = {pdl: sum(isinstance(m, TinyGemmLinear) for m in
                                build_model(dataclasses.replace(bench, pdl=pdl), 4).modules()) for pdl in (False, True)}
    assert tinygemm_layers == {False: 7, True: 0}


def test_fused_norms_go_to_the_layers_after_each_norm():
    """bench generate's fuse_norms marks the fused q/k/v and SwiGLU layers of AR models, the two
    that follow a block's norms, and nothing for diffusion steps."""
    from qrobust.bench_generate import build_model

    bench = GenerateBench(shape="qwen3-0.6b", bits=(4,), layers=2, vocab_size=256, device="cpu", fuse=True,
                          fuse_norms=True, tinygemm=False)
    marked = {name for name, m in build_model(bench, 4).named_modules() if getattr(m, "fuse_norm", False)}
    assert marked == {f"model.layers.{i}.{layer}" for i in (0, 1)
                      for layer in ("self_attn.qkv_proj", "mlp.swiglu.linear")}
    diffusion = dataclasses.replace(bench, kind="diffusion")
    assert not any(getattr(m, "fuse_norm", False) for m in build_model(diffusion, 4).modules())


def test_bench_generate_rejects_bad_bits():
    with pytest.raises(QrobustError, match="bit widths"):
        GenerateBench(bits=(16, 5))
    with pytest.raises(QrobustError, match="lm_head width"):
        GenerateBench(lm_head_bits=5)
    with pytest.raises(QrobustError, match="add --fuse"):
        GenerateBench(fuse_norms=True)


def test_bench_generate_can_quantize_the_output_layer(tmp_path):
    """With lm_head_bits the packed widths' output layer is packed too (on tinygemm at 4 bits),
    untied from the fp16 embedding, which the decoder still reads; fp16 keeps the tied layer."""
    bench = GenerateBench(shape="qwen3-0.6b", kind="ar", bits=(16, 4, 2), prompt_len=4, new_tokens=4, repeats=1,
                          layers=1, vocab_size=256, device="cpu", lm_head_bits=4)
    results = bench_generate(bench, progress=False)
    fp16, q4, q2 = results["runs"]
    assert (fp16["lm_head_bits"], q4["lm_head_bits"], q2["lm_head_bits"]) == (16, 4, 4)
    assert q4["tinygemm_layers"] == 7 + 1 and q2["tinygemm_layers"] == 1 and q4["tokens_per_s"] > 0
    lines = summary_lines(results)  # 2-bit blocks are not tinygemm's, though their output layer is
    assert "tinygemm" in lines[2] and "tinygemm" not in lines[3]
    from qrobust.bench_generate import build_model
    from qrobust.kernels.tinygemm import TinyGemmLinear

    model = build_model(dataclasses.replace(bench, tinygemm=False), 3)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.spec.bits == 4
    assert model.device.type == "cpu" and model.model.embed_tokens.weight.dtype == torch.float32
    assert isinstance(build_model(bench, 4).lm_head, TinyGemmLinear)


@pytest.mark.parametrize("bits", [None, 4, 3])
def test_fused_projections_give_the_same_logits(bits, monkeypatch):
    """q/k/v fused into one layer and gate/up into one SwiGLU (fp32, or packed at 4 and 3 bits,
    where the fused layers also run the packed kernel, SwiGLU's with the activation in it) leave
    the logits unchanged and the separate layers gone."""
    from qrobust import kernels
    from qrobust.models.decode import fuse_projections

    model = _model()
    if bits:
        quantize_blocks_rtn(model, QuantSpec(bits, 32, sym=bits == 4))
    ids = torch.randint(0, 96, (1, 9), device=DEVICE)
    with torch.no_grad():
        before = model(ids)
        assert fuse_projections(model) == 2 * 2
        block = model.model.layers[0]
        assert not hasattr(block.self_attn, "q_proj") and not hasattr(block.mlp, "up_proj")
        assert block.self_attn.qkv_proj.out_features == 64 + 2 * 32
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
        assert fuse_projections(model) == 0  # already fused: nothing left to do
        if bits and kernels.supports(DEVICE):
            import qrobust.quant.qlinear as qlinear

            monkeypatch.setattr(qlinear, "kernels_enabled", kernels.supports)
            x = torch.randn(1, 64, device=DEVICE)
            qkv = block.self_attn.qkv_proj
            torch.testing.assert_close(qkv(x), x @ qkv.dequantized_weight().t(), rtol=1e-4, atol=1e-4)
            assert qkv.uses_kernels(x.device)
            swiglu = block.mlp.swiglu
            h = x @ swiglu.linear.dequantized_weight().t()
            torch.testing.assert_close(swiglu(x), torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2], rtol=1e-4,
                                       atol=1e-4)
            assert swiglu.linear.uses_kernels(x.device)


def test_layers_of_different_widths_are_not_fused():
    from qrobust.models.decode import concat_linears
    from qrobust.quant.grid import rtn

    w = torch.randn(32, 64)
    a = QuantLinear.from_result(rtn(w, QuantSpec(4, 32)), None, torch.float32)
    b = QuantLinear.from_result(rtn(w, QuantSpec(2, 32)), None, torch.float32)
    assert concat_linears([a, b]) is None
    assert concat_linears([a, torch.nn.Linear(64, 32)]) is None


def test_greedy_token_is_argmax_with_first_index_on_ties():
    from qrobust.models.decode import greedy_token

    logits = torch.randn(3, 2500)
    logits[1, 7] = logits[1, 2100] = 99.0  # a tie across chunks: the first wins
    logits[2, 2499] = 99.0  # in the padded last chunk
    assert greedy_token(logits, chunk=1024).squeeze(1).tolist() == [int(logits[0].argmax()), 7, 2499]
    assert torch.equal(greedy_token(logits, chunk=1000), logits.argmax(-1, keepdim=True))


def test_attention_kernel_decodes_the_same_tokens(monkeypatch):
    """Greedy decoding with each layer's attention on the decode kernel gives the tokens of the torch path."""
    from qrobust import kernels
    from qrobust.models.decode import use_attention_kernel

    if not kernels.supports(DEVICE):
        pytest.skip("Triton cannot run here")
    model = _model()
    prompt = torch.tensor([5, 17, 3, 44, 8])
    expected = GreedyDecoder(model, max_len=20).generate(prompt, 10).tokens
    assert use_attention_kernel(model) == 2
    assert model.model.layers[0].self_attn.decode_attention is not None
    assert GreedyDecoder(model, max_len=20).generate(prompt, 10).tokens.tolist() == expected.tolist()
    use_attention_kernel(model, on=False)
    assert model.model.layers[1].self_attn.decode_attention is None
    model.config.head_dim = 24  # not a power of two: the kernel cannot take it
    assert use_attention_kernel(model) == 0 and model.model.layers[0].self_attn.decode_attention is None


def test_norms_fused_into_the_gemvs_decode_the_same_tokens(monkeypatch):
    """With q/k/v and gate/up fused and packed, fuse_norms moves each block's residual adds and
    RMSNorms into those layers' GEMVs: every decoding step runs them there (two per block), and
    greedy decoding gives the tokens of the torch path. A down projection whose GEMV splits K
    (here, with 64-deep tiles) leaves its split sums for the next block's q/k/v product or, in
    the last block, for the final norm: the same tokens again."""
    from qrobust import kernels
    from qrobust.kernels import gemv, ops
    from qrobust.models.decode import fuse_norms, fuse_projections

    if not kernels.supports(DEVICE):
        pytest.skip("Triton cannot run here")
    config = gemv.gemv_config  # before any layer on a GPU caches its tiling
    monkeypatch.setattr(gemv, "gemv_config", lambda K, group_size, act_order: config(K, group_size, act_order)
                        if K <= 64 else gemv.GemvConfig(32, 64, K // 64, 1))
    model = _model()
    with torch.no_grad():
        for block in model.model.layers:  # norms that are not the identity
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
    quantize_blocks_rtn(model, QuantSpec(3, 32, sym=False))
    prompt = torch.tensor([5, 17, 3, 44, 8])
    new_tokens = 6  # five one-token steps after the prompt's forward
    expected = GreedyDecoder(model, max_len=20).generate(prompt, new_tokens).tokens
    assert fuse_norms(model) == 0  # nothing fused to take the norms yet
    fuse_projections(model)
    import qrobust.quant.qlinear as qlinear

    monkeypatch.setattr(qlinear, "kernels_enabled", kernels.supports)
    calls, split_calls = [], []
    fused_op, split_op = ops.gemv_add_norm_op, ops.gemv_split_sums_op
    monkeypatch.setattr(ops, "gemv_add_norm_op",
                        lambda *args: calls.append((args[1] is None, args[0].dim())) or fused_op(*args))
    monkeypatch.setattr(ops, "gemv_split_sums_op", lambda *args: split_calls.append(1) or split_op(*args))
    assert fuse_norms(model) == 2 * 3
    leaving = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)
               and m.leaves_split_sums(torch.device(DEVICE))}
    assert leaving == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    eager = GreedyDecoder(model, max_len=20, graphs=False)  # a graph would replay the calls uncounted
    assert eager.generate(prompt, new_tokens).tokens.tolist() == expected.tolist()
    # one-token steps (the prompt's forward has too many rows); only the first block's first
    # product starts the stream without a residual, and the second block's takes split sums
    steps = new_tokens - 1
    assert len(calls) == steps * 2 * 2 and sum(first for first, _ in calls) == steps
    assert sum(dim == 3 for _, dim in calls) == steps and len(split_calls) == steps * 2
    fuse_norms(model, on=False)
    calls.clear()
    eager.generate(prompt, 3)
    assert not calls


def test_pdl_decodes_the_same_tokens():
    """Programmatic dependent launches change when kernels start, not what they compute: greedy
    tokens stay the same, bit for bit, on a Hopper GPU; elsewhere use_pdl changes nothing."""
    from qrobust import kernels
    from qrobust.kernels import pdl_supported
    from qrobust.models.decode import use_attention_kernel, use_pdl

    model = _model()
    quantize_blocks_rtn(model, QuantSpec(4, 32, sym=True))
    if kernels.supports(DEVICE):
        use_attention_kernel(model)
    prompt = torch.tensor([5, 17, 3, 44, 8])
    expected = GreedyDecoder(model, max_len=20).generate(prompt, 10).tokens
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    changed = use_pdl(model)
    if not pdl_supported(DEVICE):
        assert changed == 0 and not any(m.pdl for m in packed)
        return
    assert changed == len(packed) + 2 and all(m.pdl for m in packed)
    assert GreedyDecoder(model, max_len=20).generate(prompt, 10).tokens.tolist() == expected.tolist()
    use_pdl(model, on=False)
    assert not any(m.pdl for m in packed)


def test_half2_runs_the_gemvs_of_float16_models_on_its_sums(monkeypatch):
    """use_half2 on a float16 model: a forward of one token (few enough rows for the GEMV)
    passes half2 to every packed layer's GEMV, the 3-bit one in the pairs layout (which goes back
    to the GPTQ layout's words with half2 off), and the logits are the torch path's up to float16
    rounding."""
    from qrobust import kernels
    from qrobust.kernels import ops
    from qrobust.models.decode import use_half2

    if not kernels.supports(DEVICE):
        pytest.skip("Triton cannot run here")
    model = _model().half()
    replace_linear(model, "model.layers.1.mlp.down_proj",
                   rtn(model.model.layers[1].mlp.down_proj.weight, QuantSpec(3, 32, sym=True)))
    quantize_blocks_rtn(model, QuantSpec(4, 32, sym=True))
    ids = torch.tensor([[5]], device=DEVICE)
    import qrobust.quant.qlinear as qlinear

    monkeypatch.setattr(qlinear, "kernels_enabled", lambda device: False)
    with torch.no_grad():
        expected = model(ids).float()
    monkeypatch.setattr(qlinear, "kernels_enabled", kernels.supports)
    calls = []
    op = ops.gemv_op
    monkeypatch.setattr(ops, "gemv_op", lambda *args: calls.append(args[-2:]) or op(*args))
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    gptq_words = model.model.layers[1].mlp.down_proj.qweight.clone()
    assert use_half2(model) == len(packed) == 14
    assert all(m.takes_half2(model.device) for m in packed)  # model.device: with its index
    with torch.no_grad():
        logits = model(ids).float()
    assert len(calls) == 14 and all(half2 for half2, _ in calls)
    assert sorted(layout for _, layout in calls) == ["gptq"] * 13 + ["pairs"]
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))
    use_half2(model, on=False)
    assert not any(m.half2 for m in packed)
    assert torch.equal(model.model.layers[1].mlp.down_proj.qweight, gptq_words)


def test_compile_options_turn_on_inductors_dependent_launches_only_when_asked():
    import torch._inductor.config as inductor

    from qrobust.models.decode import compile_options

    assert compile_options(False) == {}
    expected = {"triton.enable_pdl": True} if hasattr(inductor.triton, "enable_pdl") else {}
    assert compile_options(True) == expected
    if expected:  # torch.compile accepts them as given
        torch.compile(lambda x: x + 1, options=expected)
