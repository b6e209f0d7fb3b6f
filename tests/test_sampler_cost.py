"""What the fast sampler's approximate cache costs (models.fast_dllm.cache_cost, qrobust.sampler_cost)."""
import math

import pytest
import torch

from qrobust.errors import QrobustError
from qrobust.models import load_model
from qrobust.models.fast_dllm import cache_cost
from qrobust.models.tiny import tiny_config
from qrobust.models.transformer import TransformerLM
from qrobust.sampler_cost import SamplerCostConfig, sampler_cost


def _model(tokenizer, layers: int) -> TransformerLM:
    torch.manual_seed(3)
    model = TransformerLM(tiny_config(tokenizer, causal=False, num_hidden_layers=layers)).eval()
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _inputs(tokenizer):
    """Two left-padded prompts, solutions of 10 and 7 tokens (the second padded), reveal orders."""
    prompts = tokenizer(["def add(a, b):\n", "x = 1"], return_tensors="pt", padding=True, padding_side="left")
    g = torch.Generator().manual_seed(0)
    solution = torch.randint(5, len(tokenizer), (2, 10), generator=g)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    solution[~valid] = tokenizer.mask_token_id
    return prompts.input_ids, prompts.attention_mask, solution, valid, torch.rand(2, 10, generator=g)


def _cost(model, tokenizer, block: int, shift: bool = False):
    return cache_cost(model, *_inputs(tokenizer), tokenizer.mask_token_id, shift, block)


@pytest.mark.parametrize("shift", [False, True])
def test_one_layer_has_nothing_stale_so_the_cached_step_is_the_exact_forward(tokenizer, shift):
    """With one layer the keys of positions outside the block depend on their own tokens only, which
    a block's steps do not change, and a step rewrites every block position's (with shift, the one
    before too): any error in slots, positions or masks would show here."""
    cost = _cost(_model(tokenizer, 1), tokenizer, block=4, shift=shift)
    assert cost.revealed.max() == 3
    assert torch.allclose(cost.ce_fast, cost.ce_exact, atol=1e-4)
    assert float(cost.kl.abs().max()) < 1e-5 and bool(cost.top1_agree.all())


def test_deeper_models_pay_for_the_stale_keys_only_after_the_refresh(tokenizer):
    cost = _cost(_model(tokenizer, 2), tokenizer, block=4, shift=True)
    fresh = cost.revealed == 0
    assert float(cost.kl[fresh].abs().max()) < 1e-5  # the refresh is the full forward
    assert float(cost.kl[~fresh].mean()) > 1e-4
    # every valid position is predicted at each step while it is masked: block 4 over 10 and 7 tokens
    assert cost.row.numel() == (4 + 3 + 2 + 1) * 2 + 2 + 1 + (4 + 3 + 2 + 1) + 3 + 2 + 1


def test_blocks_of_one_position_cost_nothing(tokenizer):
    cost = _cost(_model(tokenizer, 2), tokenizer, block=1, shift=True)
    assert bool((cost.revealed == 0).all()) and float(cost.kl.abs().max()) < 1e-5


@pytest.fixture(scope="module")
def small_dllm(tiny_dirs):
    return load_model(str(tiny_dirs["diffusion"]))


def test_the_study_does_not_depend_on_how_problems_are_batched(small_dllm):
    """Padding (left for prompts, right for solutions) and the rows' return to problem order."""
    config = SamplerCostConfig(benchmarks=("humaneval",), limit=3, block_length=8, context_tokens=24,
                               solution_tokens=20)
    one = sampler_cost(small_dllm, SamplerCostConfig(**{**config.__dict__, "batch_size": 1}))["humaneval"]
    three = sampler_cost(small_dllm, SamplerCostConfig(**{**config.__dict__, "batch_size": 3}))["humaneval"]
    assert one["problems"] == three["problems"] == 3 and one["positions"] == three["positions"]
    for metric in ("ce_exact", "ce_fast", "kl", "top1_agreement"):
        assert math.isclose(one[metric]["value"], three[metric]["value"], rel_tol=1e-3, abs_tol=1e-5), metric
        assert one[metric]["ci_low"] <= one[metric]["value"] <= one[metric]["ci_high"]
    assert one["kl"]["value"] > 0 and all(v >= 0 for v in one["kl_by_revealed"].values())


def test_the_study_refuses_models_without_a_fast_sampler(tiny_dirs):
    with pytest.raises(QrobustError, match="native diffusion"):
        sampler_cost(load_model(str(tiny_dirs["ar"])), SamplerCostConfig(limit=1))
