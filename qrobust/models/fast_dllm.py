"""The fast masked-diffusion sampler (SamplerConfig(mode="fast")), after Fast-dLLM (Wu et al.,
2025): semi-autoregressive blocks over an approximate KV cache, several tokens per step.

At the start of each block one forward over the whole sequence (prompt, finished blocks, the
masked rest) writes every position's keys and values into a cache. Each later step of the
block runs only the block's positions (with shifted logits, the position before each one),
attending to the cached keys of every other position, which are stale until the next block
refreshes them: that is the approximation (Fast-dLLM's "dual cache"). A step commits every
masked position of the block whose proposed token has probability above `threshold`, and at
least the most confident one (by the config's rule), so a block takes at most its length in
steps and usually far fewer. On CUDA the block step is replayed as a CUDA graph.
"""
from __future__ import annotations

import torch

from qrobust.models.decode import capture
from qrobust.models.diffusion import SamplerConfig, block_choices
from qrobust.models.transformer import KVCache, TransformerLM


def commit_confident(x: torch.Tensor, block_logits: torch.Tensor, lo: int, hi: int, mask_token_id: int,
                     config: SamplerConfig, generator) -> None:
    """Commit in every row each masked position of lo … hi − 1 above the threshold, and the most confident one."""
    masked, tokens, prob, conf = block_choices(x, block_logits, lo, hi, mask_token_id, config, generator)
    best = torch.zeros_like(masked).scatter_(1, conf.argmax(-1, keepdim=True), True)
    take = masked & ((prob > config.threshold) | best)
    x[:, lo:hi] = torch.where(take, tokens, x[:, lo:hi])


@torch.no_grad()
def fast_diffusion_generate(model: TransformerLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            max_new_tokens: int, mask_token_id: int, shift: bool, config: SamplerConfig,
                            generator: torch.Generator | None = None, graphs: bool = True) -> tuple[torch.Tensor, int]:
    """Fill max_new_tokens masks after left-padded prompts; returns (response ids, forward passes)."""
    B, P = input_ids.shape
    if shift and P == 0:
        raise ValueError("a model with shifted logits needs a prompt of at least one token")
    device = input_ids.device
    L = P + max_new_tokens
    x = torch.cat([input_ids, torch.full((B, max_new_tokens), mask_token_id, device=device)], dim=1)
    attn = torch.cat([attention_mask, torch.ones(B, max_new_tokens, dtype=attention_mask.dtype, device=device)], 1)
    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
    full_mask = model.padding_mask(attn, L, device)  # padding queries see themselves
    keys_mask = attn.bool()[:, None, None, :]  # a block's queries are never padding
    caches = model.new_caches(B, L, torch.arange(L, device=device))
    block = config.block_length or max_new_tokens
    s = 1 if shift else 0
    window = torch.zeros(block, dtype=torch.long, device=device)  # the slots a block step recomputes
    block_caches = [KVCache(c.k, c.v, window) for c in caches]
    steps: dict[int, object] = {}

    def block_step(T: int):
        """The forward of the T slots in window[:T] over the cache (a graph per width on CUDA)."""
        if T not in steps:
            slots = window[:T]
            views = [KVCache(c.k, c.v, slots) for c in block_caches]

            def step() -> torch.Tensor:
                return model.forward_slots(x.index_select(1, slots), views, position_ids.index_select(1, slots),
                                           keys_mask)

            steps[T] = capture(step, device) if graphs and device.type == "cuda" else step
        return steps[T]

    passes = 0
    for lo in range(P, L, block):
        hi = min(lo + block, L)
        # the block's aligned logits only: with shift, position lo − 1 + j predicts lo + j
        logits = model.forward_slots(x, caches, position_ids, full_mask, logits_from=lo - s)[:, :hi - lo]
        passes += 1
        window[:hi - lo].copy_(torch.arange(lo - s, hi - s, device=device))
        while True:
            logits[..., mask_token_id] = float("-inf")  # a committed token is never the mask
            commit_confident(x, logits, lo, hi, mask_token_id, config, generator)
            if not bool((x[:, lo:hi] == mask_token_id).any()):
                break
            logits = block_step(hi - lo)()  # with shift, slot lo − 1 + j predicts position lo + j
            passes += 1
    return x[:, P:], passes
