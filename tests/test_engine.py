"""The batched generation engine (models.engine) on CPU, where it runs its steps eagerly, and
on a GPU, where it replays CUDA graphs."""
import pytest
import torch

from qrobust.models import load_model
from qrobust.models.adapters import ARAdapter
from qrobust.models.engine import (AREngine, DecodeSettings, StopRule, batch_buckets, cache_slots, length_groups,
                                   sample_token)
from qrobust.models.loading import load_transformers_causal, resolve_source

PROMPTS = ["def add(a, b):\n", 'import os\n\ndef list_files(path):\n    """Return the files."""\n',
           "class Stack:\n    def push(self, x):", "x = 1", "for i in range(10):\n    print("]


@pytest.fixture(scope="module")
def tiny_ar():
    return load_model("tiny-ar")


@pytest.fixture(scope="module")
def small_ar(tiny_dirs):
    """The test suite's random tiny AR model (cheaper than the built-in one)."""
    return load_model(str(tiny_dirs["ar"]))


@pytest.fixture(scope="module")
def hf_tiny_ar(tiny_ar):
    model = load_transformers_causal(resolve_source("tiny-ar"), torch.float32, "cpu")
    return ARAdapter(model, tiny_ar.tokenizer, "tiny-ar (transformers)", model.config.num_hidden_layers)


def test_qwen3_checkpoints_load_into_the_native_model(tiny_ar):
    assert tiny_ar.native and type(tiny_ar.model).__name__ == "TransformerLM"


def test_greedy_tokens_equal_transformers_generate_on_padded_batches(tiny_ar, hf_tiny_ar):
    """Five prompts of different lengths in batches of 3 (left padding, a last batch of 2), the
    engine retiring and compacting rows every 4 steps, against transformers' generate."""
    tiny_ar._engine = AREngine(tiny_ar.model, check_every=4)
    ours = tiny_ar.generate(PROMPTS, max_new_tokens=16, batch_size=3)
    theirs = hf_tiny_ar.generate(PROMPTS, max_new_tokens=16, batch_size=3)
    assert [g.text for g in ours] == [g.text for g in theirs]
    assert [g.num_tokens for g in ours] == [g.num_tokens for g in theirs]
    assert sorted(g.batch_size for g in ours) == [2, 2, 3, 3, 3]


def test_the_attention_kernel_decodes_left_padded_batches_to_the_same_tokens(small_ar):
    """for_generation's one attention kernel per layer (models.decode.use_attention_kernel, where
    Triton runs; here its interpreter): rows of different padding, each attending from its own first
    slot at its own rotary position, decode the torch path's greedy tokens, through retiring and
    compacting rows too."""
    from qrobust import kernels
    from qrobust.models.decode import use_attention_kernel

    model = small_ar.model
    if not kernels.supports(model.device):
        pytest.skip("Triton cannot run here")
    ids = [small_ar.tokenizer(p)["input_ids"] for p in PROMPTS]
    eos = StopRule(frozenset([AREngine(model).generate(ids[:1], DecodeSettings(6), StopRule(frozenset()), 1)
                              .tokens[0][-1]]))  # a token some row reaches: rows retire at different steps
    before = AREngine(model, check_every=2).generate(ids, DecodeSettings(12), eos, batch_size=4).tokens
    assert use_attention_kernel(model) == model.config.num_hidden_layers
    try:
        after = AREngine(model, check_every=2).generate(ids, DecodeSettings(12), eos, batch_size=4).tokens
    finally:
        use_attention_kernel(model, on=False)
    assert after == before and len({len(t) for t in before}) > 1


def test_the_fused_residual_norm_and_swiglu_kernels_decode_to_the_same_tokens(small_ar, monkeypatch):
    """Where the kernels run (here Triton's interpreter), each residual add runs inside the norm
    after it (kernels.rms_norm.add_rms_norm) and SwiGLU over fused gate/up in one kernel
    (kernels.swiglu): float32 greedy tokens equal the torch path's, and both kernels ran."""
    import copy

    from qrobust import kernels
    import qrobust.kernels.rms_norm as rms_norm_module
    import qrobust.kernels.swiglu as swiglu_module
    import qrobust.models.transformer as transformer
    import qrobust.quant.qlinear as qlinear
    from qrobust.models.decode import fuse_projections

    if not kernels.supports(small_ar.model.device):
        pytest.skip("Triton cannot run here")
    model = copy.deepcopy(small_ar.model)
    fuse_projections(model)
    ids = [small_ar.tokenizer(p)["input_ids"] for p in PROMPTS]
    rule = StopRule(frozenset())
    before = AREngine(model).generate(ids, DecodeSettings(8), rule, batch_size=3).tokens
    calls = []
    for module, name in ((rms_norm_module, "add_rms_norm"), (swiglu_module, "swiglu")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    for module in (transformer, qlinear):
        monkeypatch.setattr(module, "kernels_enabled", kernels.supports)
    after = AREngine(model).generate(ids, DecodeSettings(8), rule, batch_size=3).tokens
    assert after == before
    assert {"add_rms_norm", "swiglu"} <= set(calls)


def test_rows_end_at_eos_and_stop_strings_but_not_before_min_new_tokens(small_ar):
    tok = small_ar.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = AREngine(small_ar.model, check_every=3)
    free = engine.generate(ids, DecodeSettings(20), StopRule(frozenset()), batch_size=4).tokens
    eos = free[0][5]  # pretend the sixth token of the first row ends a sequence
    out = engine.generate(ids, DecodeSettings(20), StopRule(frozenset([eos])), batch_size=4)
    assert out.tokens[0] == free[0][:free[0].index(eos) + 1]
    assert all(t == f[:len(t)] for t, f in zip(out.tokens, free))  # retiring rows changes no other row
    forced = engine.generate(ids, DecodeSettings(20, min_new_tokens=20), StopRule(frozenset([eos]), min_new_tokens=20),
                             batch_size=4)
    assert forced.tokens == free
    text = tok.decode(free[1])
    stop = text[len(text) // 2:len(text) // 2 + 2]
    rule = StopRule(frozenset(), (stop,), tok.decode)
    n = rule.kept_length(free[1])
    assert stop in tok.decode(free[1][:n]) and stop not in tok.decode(free[1][:n - 1])


def test_sampling_is_reproducible_by_seed(small_ar):
    runs = [small_ar.generate(PROMPTS, 12, temperature=0.8, top_p=0.9, seed=s, batch_size=4) for s in (1, 1, 2)]
    texts = [[g.text for g in r] for r in runs]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_sample_token_draws_by_quantile_within_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    pick = [int(sample_token(logits, 1.0, 0.7, torch.tensor([u]))) for u in (0.1, 0.7, 0.99)]
    assert pick == [0, 1, 1]  # top-p 0.7 keeps 0.5 and 0.3: quantile 0.7 of their 0.8 falls in the second
    assert int(sample_token(logits, 0.0, 1.0, torch.tensor([0.99]))) == 0


def test_graphed_caches_hold_whole_groups_of_length_buckets():
    """With graphs a cache holds a multiple of four 128-slot buckets, so a benchmark's batch and the
    next one's (prompts some tokens longer) share it and its graphs; eager caches hold what is needed."""
    assert [cache_slots(n, 128) for n in (1, 512, 958, 1000, 1025)] == [512, 512, 1024, 1024, 1536]
    assert cache_slots(958, 1) == 958


def test_batches_group_prompts_by_length_and_buckets_are_powers_of_two():
    assert length_groups([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(8) == [1, 2, 4, 8]


# ---- diffusion -------------------------------------------------------------------------------------
def _per_row_reference(logits_fn, input_ids, attention_mask, n, mask_id, shift, config):
    """The sampler as it was before its commits were vectorized: one row at a time (greedy)."""
    from qrobust.models.diffusion import _commit_schedule, align_logits, choose

    B, P = input_ids.shape
    x = torch.cat([input_ids, torch.full((B, n), mask_id)], dim=1)
    attn = torch.cat([attention_mask, torch.ones(B, n, dtype=attention_mask.dtype)], 1)
    block = config.block_length or n
    for b in range(-(-n // block)):
        lo, hi = P + b * block, min(P + (b + 1) * block, P + n)
        for k in _commit_schedule(hi - lo, min(max(1, (config.steps or n) // -(-n // block)), hi - lo)):
            logits = align_logits(logits_fn(x, attn), shift)
            logits[..., mask_id] = float("-inf")
            for row in range(B):
                pos = (x[row, lo:hi] == mask_id).nonzero().squeeze(-1) + lo
                if pos.numel():
                    c = choose(logits[row, pos], config, None)
                    chosen = c.confidence.topk(min(k, pos.numel())).indices
                    x[row, pos[chosen]] = c.tokens[chosen]
    return x[:, P:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine replays CUDA graphs on a GPU")
@pytest.mark.parametrize("bits", [16, 4])
def test_graphed_decoding_gives_the_same_tokens_on_every_run(bits):
    """Greedy decoding from CUDA graphs (bf16, and 4-bit layers in the layout the GPU runs) is
    reproducible bit for bit: a second run, whose prefill allocates memory after the graphs were
    captured, and a second engine give the same tokens, also after rows retire and the batch
    moves to a smaller graph."""
    from qrobust.bench_generate import small_decoder
    from qrobust.kernels.fragments import runs_fragments
    from qrobust.quant.qlinear import QuantLinear

    model = small_decoder(bits)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (8,), generator=g)]
    settings, first = DecodeSettings(40), AREngine(model)
    unstopped = first.generate(prompts, settings, StopRule(frozenset()), 8).tokens
    # tokens five rows reach by step 10 end them there or earlier, so the rest go to a smaller graph
    rule = StopRule(frozenset(row[10] for row in unstopped[:5]))
    runs = [first.generate(prompts, settings, rule, 8).tokens, first.generate(prompts, settings, rule, 8).tokens,
            AREngine(model).generate(prompts, settings, rule, 8).tokens]
    assert runs[0] == runs[1] == runs[2]
    assert all(r[:11] == u[:len(r[:11])] for r, u in zip(runs[0], unstopped))  # the first run's graphs agree
    assert sum(len(row) <= 11 for row in runs[0]) >= 5
    layout = "fragments" if runs_fragments(model.device) else "gptq"
    assert bits == 16 or all(m.layout == layout for m in model.modules() if isinstance(m, QuantLinear))


@pytest.fixture(scope="module")
def tiny_dllm():
    adapter = load_model("tiny-dllm")
    adapter.tokenizer.padding_side = "left"
    return adapter


@pytest.fixture(scope="module")
def small_dllm(tiny_dirs):
    """The test suite's random tiny diffusion model (cheaper than the built-in one)."""
    adapter = load_model(str(tiny_dirs["diffusion"]))
    adapter.tokenizer.padding_side = "left"
    return adapter


def _batch(adapter):
    return adapter.tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)


@pytest.mark.parametrize("config", [dict(steps=8, block_length=8),
                                    pytest.param(dict(block_length=8, alg="confidence"), marks=pytest.mark.slow)])
def test_vectorized_diffusion_commits_equal_the_per_row_loop(tiny_dllm, config):
    from qrobust.models.diffusion import SamplerConfig, diffusion_generate

    enc, a = _batch(tiny_dllm), tiny_dllm
    cfg = SamplerConfig(**config)
    ours, _ = diffusion_generate(a.logits, enc.input_ids, enc.attention_mask, 16, a.mask_token_id, a.shift_logits, cfg)
    ref = _per_row_reference(a.logits, enc.input_ids, enc.attention_mask, 16, a.mask_token_id, a.shift_logits, cfg)
    assert torch.equal(ours, ref)


def test_fast_sampler_with_one_token_blocks_is_the_exact_sampler(small_dllm):
    """Blocks of one position: every block is decided by the refreshing full forward."""
    from qrobust.models.diffusion import SamplerConfig, diffusion_generate
    from qrobust.models.fast_dllm import fast_diffusion_generate

    enc, a = _batch(small_dllm), small_dllm
    exact, _ = diffusion_generate(a.logits, enc.input_ids, enc.attention_mask, 6, a.mask_token_id, a.shift_logits,
                                  SamplerConfig(block_length=1))
    fast, passes = fast_diffusion_generate(a.model, enc.input_ids, enc.attention_mask, 6, a.mask_token_id,
                                           a.shift_logits, SamplerConfig(block_length=1, mode="fast"))
    assert torch.equal(fast, exact) and passes == 6


def test_fast_sampler_commits_confident_positions_together_and_fills_every_mask(small_dllm):
    from qrobust.models.diffusion import SamplerConfig
    from qrobust.models.fast_dllm import fast_diffusion_generate

    enc, a = _batch(small_dllm), small_dllm
    run = {th: fast_diffusion_generate(a.model, enc.input_ids, enc.attention_mask, 16, a.mask_token_id,
                                       a.shift_logits, SamplerConfig(block_length=8, mode="fast", threshold=th))
           for th in (0.0, 2.0)}
    assert run[0.0][1] == 2  # every position is above 0: a block per forward
    assert run[2.0][1] == 16  # none is above 2: one token per step
    assert all(bool((out != a.mask_token_id).all()) for out, _ in run.values())


def test_block_step_over_a_fresh_cache_gives_the_full_forwards_logits(small_dllm):
    """The fast sampler's block forward (slots of one block over the cached keys) equals the
    full forward at those positions while the cache is fresh: the padding and window are right."""
    model, enc = small_dllm.model, _batch(small_dllm)
    ids, attn = enc.input_ids, enc.attention_mask
    L = ids.shape[1]
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    caches = model.new_caches(ids.shape[0], L, torch.arange(L))
    with torch.no_grad():
        full = model.forward_slots(ids, caches, positions, model.padding_mask(attn, L, ids.device))
        window = torch.arange(L - 4, L)
        for c in caches:
            c.positions = window
        part = model.forward_slots(ids[:, window], caches, positions[:, window], attn.bool()[:, None, None, :])
        assert torch.allclose(part, full[:, window], atol=1e-5)
        assert torch.allclose(full, model(ids, attn), atol=1e-5)


def test_the_engine_reads_only_the_responses_logits_and_samples_as_the_full_forward_does(small_dllm):
    """DiffusionEngine skips the prompt's logits (logits_from); greedy and sampled responses equal
    the sampler's over the full forward's logits at the same seed."""
    from qrobust.models.diffusion import SamplerConfig, diffusion_generate
    from qrobust.models.engine import DiffusionEngine

    enc, a = _batch(small_dllm), small_dllm
    engine = DiffusionEngine(a.model)
    for cfg in (SamplerConfig(steps=4, block_length=4), SamplerConfig(temperature=0.7, top_p=0.9, block_length=4)):
        ours, _ = engine.generate(enc.input_ids, enc.attention_mask, 8, a.mask_token_id, a.shift_logits, cfg,
                                  torch.Generator().manual_seed(3))
        full, _ = diffusion_generate(lambda ids, m: a.model(ids, m), enc.input_ids, enc.attention_mask, 8,
                                     a.mask_token_id, a.shift_logits, cfg, torch.Generator().manual_seed(3))
        assert torch.equal(ours, full)


# ---- the sampler's token choice -------------------------------------------------------------------
def _nucleus_reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The nucleus distribution by its definition: sort, keep a token while the mass before it is at
    most top_p, renormalize (in float64)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    kept = sorted_p * (sorted_p.cumsum(-1) - sorted_p <= top_p)
    return torch.zeros_like(probs).scatter(-1, order, kept / kept.sum(-1, keepdim=True))


@pytest.mark.parametrize("alg", ["confidence", "margin", "entropy"])
def test_choice_among_candidates_equals_the_full_sort(monkeypatch, alg):
    """Rows whose nucleus lies among the top candidates and rows that fall back to a full sort (flat
    logits) get the same tokens, probabilities and confidences as a full sort of every row."""
    from qrobust.models import diffusion
    from qrobust.models.diffusion import SamplerConfig, choose

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 500, generator=g)
    logits[::2] *= 12  # peaked rows: their nucleus is a few tokens; odd rows are flat
    cfg = SamplerConfig(temperature=0.8, top_p=0.9, alg=alg)
    short = choose(logits, cfg, torch.Generator().manual_seed(1))
    monkeypatch.setattr(diffusion, "NUCLEUS_CANDIDATES", 500)
    monkeypatch.setattr(diffusion, "CHOOSE_CHUNK_ROWS", 7)  # chunks give the same as one pass
    full = choose(logits, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(short.tokens, full.tokens)
    assert torch.allclose(short.prob, full.prob) and torch.allclose(short.confidence, full.confidence, atol=1e-5)
    q = _nucleus_reference(logits, 0.8, 0.9)
    assert torch.allclose(short.prob.double(), q.gather(-1, short.tokens[:, None]).squeeze(-1), atol=1e-5)
    if alg == "entropy":
        assert torch.allclose(short.confidence.double(), (q * q.clamp_min(1e-300).log()).sum(-1), atol=1e-4)


def test_draws_follow_the_nucleus_distribution():
    from qrobust.models.diffusion import SamplerConfig, choose

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]]).repeat(20000, 1)
    c = choose(logits, SamplerConfig(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(0))
    freq = torch.bincount(c.tokens, minlength=6).double() / len(c.tokens)
    assert torch.allclose(freq, _nucleus_reference(logits[:1], 1.0, 0.9)[0], atol=0.01)
    assert set(c.tokens.tolist()) == {0, 1, 2}  # the rest lies outside the nucleus
    greedy = choose(logits[:2], SamplerConfig(alg="confidence"), None)
    assert greedy.tokens.tolist() == [0, 0] and torch.allclose(greedy.prob, torch.softmax(logits[:2], -1)[:, 0])


def test_ar_and_diffusion_samplers_draw_the_same_token_at_the_same_quantile():
    """The AR engine's graph-safe draw (full sort) and the diffusion sampler's (top candidates,
    full sort where the nucleus is wider) share nucleus_draw: same logits and quantiles, same tokens."""
    from qrobust.models.diffusion import NUCLEUS_CANDIDATES, SamplerConfig, _choose_chunk

    g = torch.Generator().manual_seed(3)
    vocab = 4 * NUCLEUS_CANDIDATES  # some rows' nuclei are wider than the candidates, some narrower
    logits = torch.randn(64, vocab, generator=g) * torch.linspace(0.5, 12.0, 64)[:, None]
    u = torch.rand(64, generator=g)
    diffusion = _choose_chunk(logits, SamplerConfig(temperature=0.8, top_p=0.9, alg="confidence"), u, u)
    assert sample_token(logits, 0.8, 0.9, u).squeeze(-1).tolist() == diffusion.tokens.tolist()


def test_the_measured_tiling_variant_calls_each_product_at_its_fastest_tiling(monkeypatch, tmp_path):
    """benchmarks/engine_gpu.py --tiling: each fragments product of a width, row count and shape
    in the fragments_splits.py files runs at the fastest split, program rows and warpgroups they
    hold (one where a file has no warpgroups); others keep the chosen tiling (None)."""
    import json
    from pathlib import Path

    pytest.importorskip("triton.experimental.gluon")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from engine_gpu import fastest_tilings, measured_tiling
    from qrobust.kernels import fragments_matmul as module

    def row(split, per_program, us, N=2048, bits=8, **warpgroups):
        return {"bits": bits, "rows": 64, "N": N, "K": 2048, "split_k": split, "rows_per_program": per_program,
                "us_fragments": us, **warpgroups}

    eight, four = tmp_path / "splits_8.json", tmp_path / "splits_4.json"
    eight.write_text(json.dumps({"rows": [row(4, 32, 8.45), row(4, 64, 8.06), row(1, 64, 13.3, N=6144),
                                          row(2, 32, 15.2, N=6144)]}))
    four.write_text(json.dumps({"rows": [row(2, 64, 6.1, bits=4, warpgroups=1), row(8, 32, 5.9, bits=4, warpgroups=2)]}))
    calls = []

    def product(x, qweight, *args, **kwargs):
        calls.append((x.shape[0], qweight.shape[1], kwargs["split_k"], kwargs["rows_per_program"], kwargs["warpgroups"]))

    monkeypatch.setattr(module, "fragments_matmul", product)
    with measured_tiling(fastest_tilings([str(eight), str(four)])):
        for M, N, bits in ((64, 2048, 8), (64, 6144, 8), (32, 2048, 8), (64, 2048, 4)):
            module.fragments_matmul(torch.zeros(M, 2048), torch.zeros(2048 * bits // 32, N), None, None, bits, 1)
    assert calls == [(64, 2048, 4, 64, 1), (64, 6144, 1, 64, 1), (32, 2048, None, None, None), (64, 2048, 8, 32, 2)]
    assert module.fragments_matmul is product  # given back on leaving


def test_the_swiglu_epilogue_variant_switches_every_packed_layer_on_and_back(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from engine_gpu import swiglu_epilogue
    from qrobust.quant import QuantSpec
    from qrobust.quant.qlinear import QuantLinear

    model = torch.nn.Sequential(*(QuantLinear(128, 64, QuantSpec(bits=4, group_size=128), False) for _ in range(2)))
    with swiglu_epilogue(model):
        assert all(m.swiglu_epilogue for m in model)
    assert not any(m.swiglu_epilogue for m in model)


def test_the_ceiling_variant_replaces_every_block_product_and_still_generates(monkeypatch):
    """benchmarks/engine_gpu.py's ceiling: every linear layer inside the blocks (bf16 or packed)
    becomes one zero-writing module, lm_head stays, and the engine still runs every row to length."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from engine_gpu import ZeroProduct, build, engine_rows, tiny_plan, zero_products
    from qrobust.quant.qlinear import QuantLinear

    plan = tiny_plan()
    for bits in (16, 4):
        model = build(plan, "ar", bits, "cpu")
        products = [m for block in model.model.layers for m in block.modules()
                    if isinstance(m, (torch.nn.Linear, QuantLinear))]
        assert zero_products(model) == len(products) == 7 * len(model.model.layers)
        assert not any(isinstance(m, (torch.nn.Linear, QuantLinear)) for block in model.model.layers
                       for m in block.modules())
        assert isinstance(model.lm_head, torch.nn.Linear)
        down = model.model.layers[0].mlp.down_proj
        assert isinstance(down, ZeroProduct)
        assert torch.equal(down(torch.randn(2, 3, model.config.intermediate_size)),
                           torch.zeros(2, 3, model.config.hidden_size))
    rows = engine_rows(model, plan, 16, variant="products write zeros")
    assert [r["tokens"] for r in rows] == [b * plan.new_tokens for b in plan.batches]


def test_on_cuda_only_the_ar_kind_is_fused_and_fusing_a_diffusion_model_keeps_its_samples(tiny_dirs, monkeypatch):
    """for_generation fuses by default on CUDA where it measured faster, the AR kind's engine; the
    diffusion kind's fast sampler ran slower fused, so it is left alone. Fused when asked, the
    exact and the fast sampler give the unfused model's responses (greedy, float32)."""
    from qrobust import kernels
    from qrobust.models.adapters import ModelAdapter
    from qrobust.models.diffusion import SamplerConfig

    ar, diffusion = load_model(str(tiny_dirs["ar"])), load_model(str(tiny_dirs["diffusion"]))  # own copies
    with monkeypatch.context() as m:
        m.setattr(ModelAdapter, "device", property(lambda self: torch.device("cuda")))
        assert (ar.for_generation(), diffusion.for_generation()) == (2 * ar.num_layers, 0)
    # the attention kernel goes where the kernels run on the model's own (CPU) tensors: in Triton's
    # interpreter on CPU machines, nowhere on a GPU machine, where Triton runs CUDA tensors only
    attention = kernels.supports(ar.model.device)
    assert all((b.self_attn.decode_attention is not None) == attention for b in ar.model.model.layers)
    assert all(b.self_attn.decode_attention is None for b in diffusion.model.model.layers)
    samplers = (SamplerConfig(block_length=4), SamplerConfig(block_length=4, mode="fast", threshold=0.5))

    def responses() -> list[str]:
        out = []
        for sampler in samplers:
            diffusion.sampler = sampler
            out += [g.text for g in diffusion.generate(PROMPTS[:3], max_new_tokens=8, batch_size=3)]
        return out

    before = responses()
    assert diffusion.for_generation(fuse=True) == 2 * diffusion.num_layers
    assert responses() == before and any(before)


def test_the_diffusion_widths_benchmark_times_each_width_plain_and_fused(tmp_path, monkeypatch):
    """benchmarks/engine_gpu.py --parts diffusion-widths: a row per width and variant, ratios to
    bf16 with the same layers, and fused projections sampling today's tokens."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from dataclasses import replace

    from engine_gpu import diffusion_widths, tiny_plan

    rows = diffusion_widths(replace(tiny_plan(), bits=(16, 4)), "cpu")
    assert [(r["bits"], r["variant"]) for r in rows] == [(16, "today"), (16, "fused projections"), (4, "today"),
                                                         (4, "fused projections")]
    assert [r["ratio_to_bf16_same_rewrite"] for r in rows[:2]] == [1.0, 1.0]
    assert rows[2]["ratio_to_bf16_same_rewrite"] == rows[2]["tokens_per_s"] / rows[0]["tokens_per_s"]
    assert all(r["token_agreement_with_today"] == 1.0 and r["forward_passes"] > 0 for r in rows)
    assert rows[3]["weights_gib"] < rows[1]["weights_gib"]


def test_readying_for_generation_drops_the_engine_built_on_the_unfused_layers(tiny_dirs):
    """An engine's CUDA graphs replay the layers they were captured on: after fusion the adapter
    builds a new one, and its quantizable layers are traced again."""
    adapter = load_model(str(tiny_dirs["ar"]))  # its own copy: fusion changes it
    old_engine = adapter._engine_of(AREngine)
    assert adapter.quantizable_layers() and adapter.for_generation(fuse=True) == 2 * 2
    assert adapter._engine_of(AREngine) is not old_engine
    assert adapter.for_generation() == 0  # on CPU nothing is fused by default


def test_engine_pdl_launches_the_fragments_products_attention_and_norm_kernels_dependently(monkeypatch):
    """models.decode.use_engine_pdl: where dependent launches exist (faked here), every packed layer's
    fragments product is called with pdl, each layer's attention kernel launches with it and so
    does every norm's kernel (unless norms=False); the layers keep their layout (unlike use_pdl,
    which the GEMV needs); off, all go back. Where they do not exist (this CPU), nothing changes."""
    import functools

    from qrobust.bench_generate import small_decoder
    from qrobust import kernels
    from qrobust.kernels import fragments_matmul as fm, launch, rms_norm as rms_norm_module
    from qrobust.kernels.decode_attention import decode_attention_op
    from qrobust.models import transformer
    from qrobust.models.transformer import RMSNorm
    from qrobust.models.decode import fuse_projections, use_attention_kernel, use_engine_pdl
    from qrobust.quant import qlinear
    from qrobust.quant.qlinear import QuantLinear

    model = small_decoder(4, "cpu")
    fuse_projections(model)
    use_attention_kernel(model)
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert use_engine_pdl(model) == 0 and not any(m.fragments_pdl for m in packed)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    monkeypatch.setattr(launch, "pdl_supported", lambda device: True)
    assert use_engine_pdl(model, norms=False) == len(packed) + len(model.model.layers)
    assert not any(n.pdl for n in norms)
    assert use_engine_pdl(model) == len(packed) + len(model.model.layers) + len(norms)
    assert norms and all(n.pdl for n in norms)
    launched = []
    monkeypatch.setattr(rms_norm_module, "_launch", lambda *args: launched.append(args[-1]) or (args[0], args[0]))
    monkeypatch.setattr(transformer, "kernels_enabled", lambda device: True)
    x = torch.zeros(2, norms[0].weight.shape[0], dtype=norms[0].weight.dtype)
    with torch.no_grad():
        norms[0](x), norms[0].forward_add(x, x)
    assert launched == [True, True]  # rms_norm's and add_rms_norm's pdl
    attention = [b.self_attn.decode_attention for b in model.model.layers]
    assert all(isinstance(a, functools.partial) and a.keywords == {"pdl": True} for a in attention)
    calls = []
    monkeypatch.setattr(fm, "fragments_matmul_op", lambda *args: calls.append(args) or args[0].new_zeros(
        args[0].shape[0], args[1].shape[1]))
    monkeypatch.setattr(qlinear, "kernels_enabled", kernels.supports)  # the interpreter's kernels
    layer = packed[0]
    assert layer.uses_kernels(torch.device("cpu")) and layer.layout == "gptq"
    layer._fragments_matmul_product(torch.zeros(2, layer.in_features, dtype=torch.bfloat16), False)
    assert calls[-1][-1] is True  # the op's pdl argument
    use_engine_pdl(model, on=False)
    assert not any(m.fragments_pdl for m in packed) and not any(n.pdl for n in norms)
    assert all(b.self_attn.decode_attention is decode_attention_op for b in model.model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="dependent launches run on a GPU")
def test_dependent_launches_give_the_graphed_engine_the_same_tokens():
    """use_engine_pdl changes when the kernels start, not what they compute: the graphed engine's
    greedy tokens at 4 bits (fused, the attention kernel) are the same with and without it, on
    Hopper in the fragments layout with K-splits added up inside."""
    from qrobust.bench_generate import small_decoder
    from qrobust.models.decode import fuse_projections, use_attention_kernel, use_engine_pdl

    model = small_decoder(4)
    fuse_projections(model)
    use_attention_kernel(model)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (8,), generator=g)]
    settings, rule = DecodeSettings(40), StopRule(frozenset())
    expected = AREngine(model).generate(prompts, settings, rule, 8).tokens
    use_engine_pdl(model)
    assert AREngine(model).generate(prompts, settings, rule, 8).tokens == expected
