import json

import pytest
import torch
from safetensors.torch import save_file

from qrobust.errors import QrobustError
from qrobust.models import DiffusionAdapter, SamplerConfig, TransformerLM, load_model
from qrobust.models.diffusion import masked_diffusion_loss
from qrobust.models.loading import load_native, read_config
from qrobust.models.tiny import tiny_config


def test_native_causal_model_matches_transformers_qwen3(tiny_dirs, calib):
    from qrobust.models.adapters import ARAdapter
    from qrobust.models.loading import load_transformers_causal

    model = load_transformers_causal(tiny_dirs["ar"], torch.float32, "cpu")
    hf = ARAdapter(model, None, "transformers", model.config.num_hidden_layers)
    assert type(hf.model).__name__ == "Qwen3ForCausalLM"
    native = load_native(tiny_dirs["ar"], read_config(tiny_dirs["ar"]), causal=True, dtype=torch.float32, device="cpu")
    mask = torch.ones(2, calib.shape[1], dtype=torch.long)
    mask[0, :7] = 0  # left padding
    with torch.no_grad():
        assert torch.allclose(native(calib[:2]), hf.logits(calib[:2]), atol=1e-5)
        assert torch.allclose(native(calib[:2], mask)[0, 7:], hf.logits(calib[:2], mask)[0, 7:], atol=1e-4)


def test_diffusion_attention_is_bidirectional(tiny_dirs, calib):
    adapter = load_model(str(tiny_dirs["diffusion"]))
    ids = calib[:1].clone()
    with torch.no_grad():
        before = adapter.logits(ids)
        ids[0, -1] = (ids[0, -1] + 1) % adapter.model.config.vocab_size
        after = adapter.logits(ids)
    assert not torch.allclose(before[0, 0], after[0, 0])  # the first position sees the last


def test_coda_checkpoint_loads_natively(tmp_path, tokenizer):
    """A CoDA-shaped checkpoint: model_type CoDA, config says tied, weights hold their own head."""
    config = tiny_config(tokenizer, causal=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = TransformerLM(config)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = {"model_type": "CoDA", "architectures": ["CoDALanguageModel"], "vocab_size": config.vocab_size,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "mask_token_id": tokenizer.mask_token_id, "mask_block_sizes": [4, 8]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tokenizer.save_pretrained(str(tmp_path))
    adapter = load_model(str(tmp_path))
    assert isinstance(adapter, DiffusionAdapter) and adapter.shift_logits
    assert not adapter.model.config.tie_word_embeddings
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(adapter.logits(ids), reference(ids))


def test_layers_are_listed_in_forward_order_by_block(tiny_dirs):
    blocks = load_model(str(tiny_dirs["diffusion"])).quantizable_layers()
    assert len(blocks) == 2
    short = [[n.rsplit(".", 1)[1] for n in g] for g in blocks[1].groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_masked_loss_weights_masked_tokens_by_one_over_t():
    vocab, ids = 5, torch.tensor([[1, 2, 3, 4]])
    uniform = lambda x, m: torch.zeros(x.shape[0], x.shape[1], vocab)  # noqa: E731
    t = torch.tensor([0.5])
    g = torch.Generator().manual_seed(0)
    loss = masked_diffusion_loss(uniform, ids, t, mask_token_id=0, shift=False, generator=g)
    g = torch.Generator().manual_seed(0)
    n_masked = (torch.rand(ids.shape, generator=g) < 0.5).sum()
    expected = n_masked * torch.log(torch.tensor(5.0)) / 0.5 / ids.numel()
    assert torch.isclose(loss, expected)


@pytest.mark.parametrize("block_length,steps", [(None, None), (4, 6)])
def test_diffusion_sampler_fills_every_mask_and_keeps_the_prompt(tiny_dirs, block_length, steps):
    adapter = load_model(str(tiny_dirs["diffusion"]), sampler=SamplerConfig(steps=steps, block_length=block_length))
    captured = {}
    original = adapter.logits

    def spy(ids, mask=None):
        captured["ids"] = ids.clone()
        return original(ids, mask)

    adapter.logits = spy
    prompts = ["def add(a, b):\n", "import os\nprint("]
    enc = adapter.tokenizer(prompts, return_tensors="pt", padding=True)
    from qrobust.models.diffusion import diffusion_generate

    out, passes = diffusion_generate(adapter.logits, enc["input_ids"], enc["attention_mask"], 12,
                                     adapter.mask_token_id, True, adapter.sampler)
    assert (out != adapter.mask_token_id).all()
    assert torch.equal(captured["ids"][:, :enc["input_ids"].shape[1]], enc["input_ids"])
    assert passes == (steps or 12)
    gens = adapter.generate(prompts, max_new_tokens=12, temperature=0.7, seed=3)
    assert len(gens) == 2 and all(g.forward_passes == (steps or 12) for g in gens)


def test_ar_generation_honours_stop_sequences(tiny_dirs):
    adapter = load_model(str(tiny_dirs["ar"]))
    free = adapter.generate(["def f(x):\n"], max_new_tokens=24)[0].text
    assert len(free) > 6
    stop = free[3:6]
    stopped = adapter.generate(["def f(x):\n"], max_new_tokens=24, stop=[stop])[0]
    assert stop not in stopped.text and stopped.text == free[:free.index(stop)]
    assert stopped.num_tokens < 24  # generation itself stopped, not just the text


def test_unknown_models_fail_clearly(tmp_path):
    with pytest.raises(QrobustError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(QrobustError, match="model hub"):
        load_model("no-such-org/no-such-model")
    (tmp_path / "x").mkdir()
    with pytest.raises(QrobustError, match="config.json"):
        load_model(str(tmp_path / "x"))


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_layer_groups_follow_shared_inputs_on_every_load(tiny_dirs, kind):
    """Groups decide which layers share a Hessian: o_proj must never join q/k/v (a reused id once did)."""
    for _ in range(10):
        for block in load_model(str(tiny_dirs[kind])).quantizable_layers():
            short = [[n.rsplit(".", 1)[-1] for n in g] for g in block.groups]
            assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def _without_tokenizer(model_dir, out):
    """A copy of a saved model with its weights and config.json but no tokenizer files."""
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((model_dir / name).read_bytes())
    return out


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_a_model_without_tokenizer_files_says_so(tiny_dirs, tmp_path, capsys, kind):
    """transformers hands out an empty tokenizer for a directory without tokenizer files; loading
    refuses it at once rather than letting calibration fail on text of no tokens."""
    from qrobust.cli import main

    bare = _without_tokenizer(tiny_dirs[kind], tmp_path / "bare")
    with pytest.raises(QrobustError, match="has no tokenizer files .*copy the tokenizer of the base model"):
        load_model(str(bare))
    code = main(["quantize", "--model", str(bare), "--method", "rtn", "--group-size", "32",
                 "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"qrobust: {bare} has no tokenizer files") and not (tmp_path / "q").exists()


def test_a_tokenizer_of_almost_no_tokens_is_refused(tiny_dirs, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = _without_tokenizer(tiny_dirs["ar"], tmp_path / "bare")
    tiny = Tokenizer(models.WordLevel({"<unk>": 0, "def": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tiny, unk_token="<unk>").save_pretrained(str(bare))
    with pytest.raises(QrobustError, match="a tokenizer of 2 tokens"):
        load_model(str(bare))


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_prompts_longer_than_the_positions_are_cut_from_the_left(tiny_dirs, kind):
    adapter = load_model(str(tiny_dirs[kind]))
    positions = adapter.model.config.max_position_embeddings
    long = "def f(x):\n    return x + 1\n" * 200
    full = adapter.tokenizer(long)["input_ids"]
    assert len(full) > positions
    ids = adapter.encode_prompts([long, "def g():\n"], 16)["input_ids"]
    assert len(ids[0]) == positions - 16 and ids[0][-20:] == full[-20:]  # the prompt's end is kept
    assert ids[1] == adapter.tokenizer("def g():\n")["input_ids"]  # short prompts are untouched
    seen = []  # the diffusion sampler's full passes (the AR engine runs its own step functions)
    real = adapter.model.forward
    adapter.model.forward = lambda input_ids, *a, **k: (seen.append(input_ids.shape[1]), real(input_ids, *a, **k))[1]
    out = adapter.generate([long], max_new_tokens=8, batch_size=1)
    assert len(out) == 1 and out[0].num_tokens == 8
    assert max(seen) == positions if kind == "diffusion" else not seen
    assert adapter.prompt_room(positions) is None  # no room left: the prompt is not cut to nothing


def test_held_out_losses_per_window_in_batches(tiny_dirs, calib):
    from qrobust.zoo.metrics import ar_nll, ar_nll_rows, diffusion_nelbo, diffusion_nelbo_rows

    ar, dllm = load_model(str(tiny_dirs["ar"])), load_model(str(tiny_dirs["diffusion"]))
    ids = calib[:6]
    rows = ar_nll_rows(ar.logits, ids, batch_size=4)
    alone = torch.tensor([ar_nll(ar.logits, ids[i:i + 1]) for i in range(6)])
    assert rows.shape == (6,) and torch.allclose(rows, alone, rtol=1e-5)
    masked = diffusion_nelbo_rows(dllm.logits, ids, dllm.mask_token_id, dllm.shift_logits, samples=3, batch_size=6)
    whole = diffusion_nelbo(dllm.logits, ids, dllm.mask_token_id, dllm.shift_logits, samples=3, batch_size=6)
    assert masked.shape == (6,) and float(masked.mean()) == pytest.approx(whole, rel=1e-5)
    assert masked.std() > 0  # the windows differ
    # each kind's adapter measures its own: exact NLL, or the seeded negative ELBO
    assert (ar.held_out_loss, dllm.held_out_loss) == ("nll", "neg_elbo")
    assert torch.equal(ar.held_out_loss_rows(ids, batch_size=4), rows)
    assert torch.equal(dllm.held_out_loss_rows(ids, samples=3, batch_size=6), masked)
    assert not torch.equal(dllm.held_out_loss_rows(ids, samples=3, seed=1, batch_size=6), masked)
