"""Evaluation presets: how each registered model's authors evaluate it on code, as one dataclass.

A preset is the starting point of `qrobust eval` and `qrobust sweep`; every flag given on the
command line replaces its field (GENERATION_FIELDS), and the effective settings are recorded with
every result. Models that are not registered (a local directory or a hub id) get DEFAULT_PRESET.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from qrobust.errors import QrobustError
from qrobust.models.diffusion import SamplerConfig

# The fast sampler's block when a preset names none: Fast-dLLM's default. One block over the whole
# response would make every cached step recompute the whole response, no cheaper than the exact sampler.
FAST_BLOCK_LENGTH = 32


@dataclass(frozen=True)
class EvalPreset:
    """Generation settings; dtype None means the device's default (qrobust.precision)."""

    style: str | None = None  # None: each benchmark's default style; "instruct": the chat template, answer pre-filled
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    dtype: str | None = None
    steps: int | None = None  # diffusion: denoising steps over the response (None: one per token)
    block_length: int | None = None  # diffusion: semi-autoregressive block (None: one block)
    alg: str = "entropy"  # diffusion: the confidence rule that picks which masks to commit
    diffusion_sampler: str = "exact"  # SamplerConfig.mode: "exact", or "fast" (cached blocks, threshold commits)
    threshold: float = 0.9  # fast sampler: commit every mask whose confidence exceeds this
    source: str = "qrobust default"  # where these settings come from

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise QrobustError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.diffusion_sampler not in ("exact", "fast"):
            raise QrobustError(f"unknown diffusion sampler {self.diffusion_sampler!r}: use exact or fast")
        if self.steps is not None and self.steps < 1:
            raise QrobustError(f"steps must be at least 1, got {self.steps}")
        if self.diffusion_sampler == "fast" and self.block_length is None:
            object.__setattr__(self, "block_length", FAST_BLOCK_LENGTH)  # frozen; recorded as used

    def sampler(self) -> SamplerConfig:
        try:
            return SamplerConfig(steps=self.steps, block_length=self.block_length, alg=self.alg,
                                 temperature=self.temperature, top_p=self.top_p, mode=self.diffusion_sampler,
                                 threshold=self.threshold)
        except ValueError as e:
            raise QrobustError(f"{e}: use --alg confidence, margin, entropy or random") from None

    def record(self) -> dict[str, Any]:
        """The effective settings, as stored with results."""
        return asdict(self)


# The flags that override a preset, by field name (all but `source`).
GENERATION_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EvalPreset) if f.name != "source")

DEFAULT_PRESET = EvalPreset()

# CoDA's own code evaluation (SalesforceAIResearch/CoDA, evaluation/lm_eval/eval_mbpp_humaneval.sh: one
# script for Base and Instruct): lm-eval's humaneval_instruct / mbpp_instruct through the chat template,
# 0-shot, HumanEval's answer pre-filled with "Here is the completed function:\n```python\n{prompt}",
# 768 new tokens in 768 steps (one token per step), entropy confidence, temperature 0.1, top-p 0.9, bf16
# (the device default on CUDA and on CPUs with native bfloat16; float32 on other CPUs unless --dtype says so).
CODA_PRESET = EvalPreset(style="instruct", max_new_tokens=768, temperature=0.1, top_p=0.9, steps=768, alg="entropy",
                         source="published: CoDA evaluation/lm_eval/eval_mbpp_humaneval.sh")

# Qwen3-1.7B: CoDA's table reports it without its settings, and Qwen's card gives sampling advice for
# chat (non-thinking: temperature 0.7, top-p 0.8, top-k 20), not a code-eval recipe. Our choice: the
# same prompts, token budget, sampling and dtype as CoDA's, so the AR/diffusion pair differ in the model only.
QWEN3_PRESET = replace(CODA_PRESET, steps=None,
                       source="our choice: CoDA's published settings applied to the AR model (none published)")

# The built-in pair is ours: each benchmark's default style, greedy, 128 new tokens (their functions are
# short), the device's default dtype (qrobust.precision).
TINY_PRESET = EvalPreset(style=None, max_new_tokens=128, temperature=0.0, top_p=0.95,
                         source="our choice: the built-in pair's own evaluation (qrobust zoo)")


def with_overrides(preset: EvalPreset, overrides: dict[str, Any]) -> EvalPreset:
    """The preset with each given (not None) flag replacing its field."""
    unknown = set(overrides) - set(GENERATION_FIELDS)
    if unknown:
        raise QrobustError(f"unknown generation setting(s) {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return preset
    return replace(preset, **given, source=f"{preset.source}; overridden: {', '.join(sorted(given))}")
