"""The batched generation engine (models.engine) on CPU, where it runs its steps eagerly."""
import pytest
import torch

from qrobust.models import load_model
from qrobust.models.adapters import ARAdapter
from qrobust.models.engine import AREngine, DecodeSettings, StopRule, batch_buckets, length_groups, sample_token
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


def test_batches_group_prompts_by_length_and_buckets_are_powers_of_two():
    assert length_groups([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(8) == [1, 2, 4, 8]
