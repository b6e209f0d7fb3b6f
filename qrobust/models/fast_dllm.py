"""The fast masked-diffusion sampler (SamplerConfig(mode="fast")), after Fast-dLLM (Wu et al.,
2025): semi-autoregressive blocks over an approximate KV cache, several tokens per step.

At the start of each block one forward over the whole sequence (prompt, finished blocks, the
masked rest) writes every position's keys and values into a cache. Each later step of the
block runs only the block's positions (with shifted logits also the position before the block,
whose logits predict the block's first), rewriting their keys and values and attending to the
cached keys of every other position, which are stale until the next block refreshes them: that
is the approximation (Fast-dLLM's "dual cache"). A step commits every
masked position of the block whose proposed token has probability above `threshold`, and at
least the most confident one (by the config's rule), so a block takes at most its length in
steps and usually far fewer. On CUDA the block step is replayed as a CUDA graph.

`cache_cost` measures what the approximation costs on known text: the same sequence and the same
masks through both forwards, so it is not confounded by the two samplers' diverging tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qrobust.models.decode import capture
from qrobust.models.diffusion import SamplerConfig, block_choices
from qrobust.models.transformer import KVCache, TransformerLM


class DualCache:
    """The fast sampler's forwards over one batch. `x` [B, L] (left-padded prompts, then the
    response) is read in place, so callers commit tokens into it between calls: `refresh(lo, hi)`
    is the full forward that rewrites every slot's keys and values, `step()` the forward of the
    block's slots alone over that cache. Both return the aligned logits of positions lo … hi − 1."""

    def __init__(self, model: TransformerLM, x: torch.Tensor, attention_mask: torch.Tensor, shift: bool,
                 block_length: int, graphs: bool = True):
        B, L = x.shape
        device = x.device
        self.model, self.x, self.s = model, x, 1 if shift else 0
        self.position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.full_mask = model.padding_mask(attention_mask, L, device)  # padding queries see themselves
        self.keys_mask = attention_mask.bool()[:, None, None, :]  # a block's queries are never padding
        self.caches = model.new_caches(B, L, torch.arange(L, device=device))
        # the slots a step recomputes: the block's, and with shift the one before, which predicts its first
        self.window = torch.zeros(block_length + self.s, dtype=torch.long, device=device)
        self.block_caches = [KVCache(c.k, c.v, self.window) for c in self.caches]
        self.graphs = graphs and device.type == "cuda"
        self.steps: dict[int, object] = {}
        self.width = 0

    def refresh(self, lo: int, hi: int) -> torch.Tensor:
        """The full forward; with shift, position lo − 1 + j predicts lo + j."""
        self.width = hi - lo
        self.window[:self.width + self.s].copy_(torch.arange(lo - self.s, hi, device=self.x.device))
        return self.model.forward_slots(self.x, self.caches, self.position_ids, self.full_mask,
                                        logits_from=lo - self.s)[:, :self.width]

    def step(self) -> torch.Tensor:
        """The forward of the block's slots over the cache (a graph per width on CUDA)."""
        T = self.width
        if T not in self.steps:
            slots = self.window[:T + self.s]
            views = [KVCache(c.k, c.v, slots) for c in self.block_caches]

            def forward() -> torch.Tensor:  # with shift, slot lo − 1 + j predicts position lo + j
                return self.model.forward_slots(self.x.index_select(1, slots), views,
                                                self.position_ids.index_select(1, slots), self.keys_mask)[:, :T]

            self.steps[T] = capture(forward, self.x.device) if self.graphs else forward
        return self.steps[T]()


def commit_confident(x: torch.Tensor, block_logits: torch.Tensor, lo: int, hi: int, mask_token_id: int,
                     config: SamplerConfig, generator) -> None:
    """Commit in every row each masked position of lo … hi − 1 above the threshold, and the most confident one."""
    masked, tokens, prob, conf = block_choices(x, block_logits, lo, hi, mask_token_id, config, generator)
    best = torch.zeros_like(masked).scatter_(1, conf.argmax(-1, keepdim=True), True)
    take = masked & ((prob > config.threshold) | best)
    x[:, lo:hi] = torch.where(take, tokens, x[:, lo:hi])


def _masked_response(input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int,
                     mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts followed by `length` masks, the attention mask of that sequence)."""
    B = input_ids.shape[0]
    device = input_ids.device
    x = torch.cat([input_ids, torch.full((B, length), mask_token_id, device=device)], dim=1)
    attn = torch.cat([attention_mask, torch.ones(B, length, dtype=attention_mask.dtype, device=device)], 1)
    return x, attn


@torch.no_grad()
def fast_diffusion_generate(model: TransformerLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            max_new_tokens: int, mask_token_id: int, shift: bool, config: SamplerConfig,
                            generator: torch.Generator | None = None, graphs: bool = True) -> tuple[torch.Tensor, int]:
    """Fill max_new_tokens masks after left-padded prompts; returns (response ids, forward passes)."""
    P = input_ids.shape[1]
    if shift and P == 0:
        raise ValueError("a model with shifted logits needs a prompt of at least one token")
    x, attn = _masked_response(input_ids, attention_mask, max_new_tokens, mask_token_id)
    block = config.block_length or max_new_tokens
    cache = DualCache(model, x, attn, shift, block, graphs)
    passes = 0
    for lo in range(P, x.shape[1], block):
        hi = min(lo + block, x.shape[1])
        logits = cache.refresh(lo, hi)
        passes += 1
        while True:
            logits[..., mask_token_id] = float("-inf")  # a committed token is never the mask
            commit_confident(x, logits, lo, hi, mask_token_id, config, generator)
            if not bool((x[:, lo:hi] == mask_token_id).any()):
                break
            logits = cache.step()
            passes += 1
    return x[:, P:], passes


def _without_mask(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """float32 logits with the mask token ruled out, as the samplers choose (a committed token is never
    the mask); a finite floor rather than −inf, so that KL's 0 · log 0 terms stay 0."""
    logits = logits.float().clone()
    logits[..., mask_token_id] = -1e9
    return logits


@dataclass
class CacheCost:
    """Per predicted position, flattened over rows, blocks and steps: which row it belongs to, how
    many of its block's positions were revealed since the block's refresh, the cross-entropy of the
    true token under the exact forward and under the cached step, KL(exact ‖ cached) of the two
    distributions and whether their most likely tokens agree."""

    row: torch.Tensor
    revealed: torch.Tensor
    ce_exact: torch.Tensor
    ce_fast: torch.Tensor
    kl: torch.Tensor
    top1_agree: torch.Tensor


@torch.no_grad()
def cache_cost(model: TransformerLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               solution: torch.Tensor, valid: torch.Tensor, order: torch.Tensor, mask_token_id: int,
               shift: bool, block_length: int) -> CacheCost:
    """What the dual cache costs the model's predictions of known text (teacher-forced).

    input_ids/attention_mask [B, P]: left-padded prompts; solution [B, S]: the text to predict,
    valid [B, S] its real positions (the rest is padding, hidden from attention); order [B, S]: the
    order in which each block reveals its positions (ascending). Blocks of `block_length` go left to
    right with every earlier block revealed, as the sampler leaves them. Within a block, after j of
    its positions are revealed (j = 0 … block − 1), the still-masked valid positions are predicted by
    the exact sampler's full forward and by the fast sampler's step over the cache its refresh wrote
    at j = 0 (where the two are the same forward). One token per step, so every count of tokens
    committed since the refresh is measured."""
    B, P = input_ids.shape
    S = solution.shape[1]
    x, attn = _masked_response(input_ids, attention_mask, S, mask_token_id)
    attn[:, P:] = valid  # a shorter solution's padding is hidden like a prompt's, not extra masks to attend to
    cache = DualCache(model, x, attn, shift, block_length, graphs=False)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in CacheCost.__dataclass_fields__}
    rows = torch.arange(B, device=x.device)[:, None]
    order = order.masked_fill(~valid, float("inf"))  # padding last, so valid positions' steps ignore it
    for lo in range(0, S, block_length):
        hi = min(lo + block_length, S)
        rank = order[:, lo:hi].argsort(-1).argsort(-1)  # each position's place in its block's order
        truth = solution[:, lo:hi]
        for j in range(hi - lo):
            shown = rank < j
            x[:, P + lo:P + hi] = torch.where(shown, truth, mask_token_id)
            if j == 0:  # the refresh is the exact sampler's full forward
                fast = exact = cache.refresh(P + lo, P + hi)
            else:
                fast, exact = cache.step(), model(x, attn, logits_from=P + lo - cache.s)[:, :hi - lo]
            scored = ~shown & valid[:, lo:hi]
            if not bool(scored.any()):
                continue
            target = truth[scored]
            log_p, log_q = (F.log_softmax(_without_mask(logits[scored], mask_token_id), -1) for logits in (exact, fast))
            parts["row"].append(rows.expand_as(scored)[scored])
            parts["revealed"].append(torch.full_like(target, j))
            parts["ce_exact"].append(-log_p.gather(-1, target[:, None]).squeeze(-1))
            parts["ce_fast"].append(-log_q.gather(-1, target[:, None]).squeeze(-1))
            parts["kl"].append((log_p.exp() * (log_p - log_q)).sum(-1))
            parts["top1_agree"].append(log_p.argmax(-1) == log_q.argmax(-1))
    return CacheCost(**{name: torch.cat(v).cpu() if v else torch.empty(0) for name, v in parts.items()})
