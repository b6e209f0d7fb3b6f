"""Batched generation for evaluation: many prompts through the native causal TransformerLM.

Prompts are grouped by length and decoded in batches of left-padded rows over one static KV
cache. Every row writes the same cache slot at each step; a row's rotary position is that slot
less its padding, and its mask hides its padding and the slots not yet written. The prompt
runs as one forward; each later step is one replay of a CUDA graph captured per (batch bucket,
cache-length bucket), so a step costs its kernels and no Python (on CPU the same step runs
eagerly, which is how it is tested). Every `check_every` steps the host reads the new tokens,
retires rows that reached an end-of-sequence token or a stop string, and once the rows left
fit a smaller bucket moves them to the front of the cache and replays that bucket's graph.
Greedy decoding takes the argmax (models.decode.greedy_token); sampling draws from the
temperature- and top-p-filtered distribution with uniforms from a seeded host generator, so
runs are reproducible and the graph holds no random state.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qrobust.models.decode import GraphedForward, capture, greedy_token, sync
from qrobust.models.diffusion import SamplerConfig, diffusion_generate
from qrobust.models.nucleus import nucleus_sample
from qrobust.models.transformer import KVCache, TransformerLM


@dataclass(frozen=True)
class DecodeSettings:
    """What to generate. min_new_tokens: rows do not finish before this many tokens (eos and
    stop strings before it are ignored, not suppressed), so benchmarks can force full length."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    seed: int = 0


@dataclass(frozen=True)
class StopRule:
    """When a row is done: at its first end-of-sequence token, or once its text holds a stop
    string, but not before min_new_tokens tokens."""

    eos_ids: frozenset[int]
    stop: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None
    min_new_tokens: int = 0

    def kept_length(self, tokens: list[int]) -> int | None:
        """How many of a row's tokens it keeps if it is done (the end token or the token that
        completes a stop string included), else None."""
        first = max(self.min_new_tokens, 1)
        ends = [n for n in (self._eos_length(tokens, first), self._stop_length(tokens, first)) if n is not None]
        return min(ends, default=None)

    def _eos_length(self, tokens: list[int], first: int) -> int | None:
        return next((i + 1 for i in range(first - 1, len(tokens)) if tokens[i] in self.eos_ids), None)

    def _stop_length(self, tokens: list[int], first: int) -> int | None:
        stops = [s for s in self.stop if s]
        if not stops or self.decode is None or len(tokens) < first:
            return None

        def holds(n: int) -> bool:
            text = self.decode(tokens[:n])
            return any(s in text for s in stops)

        if not holds(len(tokens)):
            return None
        lo, hi = first, len(tokens)  # the shortest prefix from `first` on whose text holds a stop
        if holds(lo):
            return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(mid) else (mid, hi)
        return hi


@dataclass
class BatchRecord:
    """One batch: its rows (prompt indices), forward passes and wall time."""

    rows: list[int]
    forward_passes: int = 0
    seconds: float = 0.0


@dataclass
class EngineOutput:
    tokens: list[list[int]]  # per prompt, in input order
    batch_of: list[int]  # per prompt, its index in batches
    batches: list[BatchRecord] = field(default_factory=list)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes with a graph of their own: powers of two below max_batch, and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def cache_slots(needed: int, quantum: int) -> int:
    """The slots a cache holds for `needed`: with graphs (quantum > 1, the length buckets) a
    multiple of four buckets, so that calls whose prompts differ somewhat in length (one
    benchmark's batch, then the next's) share one cache and, with it, the graphs captured on it."""
    if quantum <= 1:
        return needed
    return -(-needed // (4 * quantum)) * 4 * quantum


def length_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of at most batch_size, longest prompts first, so that rows of a
    batch need little padding (a stable sort: equal lengths keep their order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Next tokens [B, 1] for logits [B, V]: the argmax for temperature 0, else the token at
    quantile uniform [B] of the nucleus (top_p) of softmax(logits / temperature), without a sync."""
    if temperature <= 0:
        return greedy_token(logits)
    # not diffusion.choose's shortcut through the top candidates, which needs a sync
    return nucleus_sample(logits, temperature, top_p, uniform)


class AREngine:
    """Batched decoding of a causal TransformerLM (see the module docstring). Buffers and graphs
    are kept between calls and rebuilt only when a call needs a larger batch or cache."""

    def __init__(self, model: TransformerLM, graphs: bool = True, check_every: int = 16, length_quantum: int = 128):
        if not model.config.causal:
            raise ValueError("AREngine decodes causal models")
        self.model, self.device = model, model.device
        self.graphs = graphs and self.device.type == "cuda"
        # eager steps attend to exactly the slots written so far; graphs to the next multiple of the quantum
        self.check_every, self.length_quantum = check_every, length_quantum if self.graphs else 1
        self.max_batch = self.max_len = 0
        self._steps: dict[tuple[int, int, float, float], Callable[[], torch.Tensor]] = {}

    # ---- buffers ----------------------------------------------------------------------------
    def _allocate(self, batch: int, max_len: int) -> None:
        if batch <= self.max_batch and max_len <= self.max_len:
            return
        self.max_batch = max(batch, self.max_batch)
        self.max_len = max(cache_slots(max_len, self.length_quantum), self.max_len)
        self._steps.clear()  # graphs read the old buffers
        device = self.device
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the slot every row writes next
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # where new tokens go
        self.token = torch.zeros(self.max_batch, 1, dtype=torch.long, device=device)
        self.pad = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.uniform = torch.zeros(self.max_batch, device=device)
        self.generated = torch.zeros(self.max_batch, self.max_len, dtype=torch.long, device=device)
        self.caches = self.model.new_caches(self.max_batch, self.max_len, self.slot)
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def _views(self, batch: int, length: int, positions: torch.Tensor) -> list[KVCache]:
        return [KVCache(c.k[:batch, :, :length], c.v[:batch, :, :length], positions, self.pad[:batch])
                for c in self.caches]

    # ---- one step ---------------------------------------------------------------------------
    def _step(self, batch: int, length: int, temperature: float, top_p: float) -> Callable[[], torch.Tensor]:
        """Feed the last tokens of the first `batch` rows at the current slot, keep the next ones
        (in token and generated) and advance; attends to the first `length` cache slots."""
        key = (batch, length, temperature, top_p)
        if key in self._steps:
            return self._steps[key]
        caches = self._views(batch, length, self.slot)
        keys = torch.arange(length, device=self.device)

        def step() -> torch.Tensor:
            pad = self.pad[:batch, None]
            positions = self.slot[None] - pad
            mask = ((keys[None] >= pad) & (keys[None] <= self.slot))[:, None, None]
            logits = self.model.forward_slots(self.token[:batch], caches, positions, mask)[:, -1]
            token = sample_token(logits, temperature, top_p, self.uniform[:batch])
            self.token[:batch].copy_(token)
            self.generated[:batch].index_copy_(1, self.step_index, token)
            self.slot.add_(1)
            self.step_index.add_(1)
            return token

        if self.graphs:
            state = [t.clone() for t in (self.slot, self.step_index, self.token, self.generated)]

            def reset() -> None:
                for t, saved in zip((self.slot, self.step_index, self.token, self.generated), state):
                    t.copy_(saved)

            step = capture(step, self.device, reset=reset, pool=self.pool)
            self._steps[key] = step  # eager steps are cheap to rebuild (and of every length)
        return step

    def _length_bucket(self, slots: int) -> int:
        q = self.length_quantum
        return min(self.max_len, -(-slots // q) * q)

    # ---- a batch ----------------------------------------------------------------------------
    def _prefill(self, prompts: list[list[int]], settings: DecodeSettings, generator: torch.Generator) -> int:
        """The prompts' forward into the cache and each row's first token; returns the prompt length."""
        n, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, P, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        pad = torch.tensor([P - len(p) for p in prompts], device=self.device)
        self.pad[:n].copy_(pad)
        slots = torch.arange(P, device=self.device)
        positions = (slots[None] - pad[:, None]).clamp(min=0)
        # a query sees the keys from its row's first real token up to itself; padding sees itself
        mask = ((slots[None, None] >= pad[:, None, None]) & (slots[None, None] <= slots[None, :, None])) \
            | torch.eye(P, dtype=torch.bool, device=self.device)
        logits = self.model.forward_slots(ids.to(self.device), self._views(n, P, slots), positions, mask[:, None],
                                          last_only=True)[:, -1]
        self._draw(n, settings, generator)
        token = sample_token(logits, settings.temperature, settings.top_p, self.uniform[:n])
        self.token[:n].copy_(token)
        self.generated[:n, :1].copy_(token)
        self.slot.fill_(P)
        self.step_index.fill_(1)
        return P

    def _draw(self, n: int, settings: DecodeSettings, generator: torch.Generator) -> None:
        if settings.temperature > 0:
            self.uniform[:n].copy_(torch.rand(n, generator=generator), non_blocking=True)

    def _compact(self, keep: list[int]) -> None:
        """Rows `keep` (in order) become rows 0 … len(keep) − 1."""
        index = torch.tensor(keep, device=self.device)
        slots = int(self.slot)
        for c in self.caches:
            for t in (c.k, c.v):
                t[:len(keep), :, :slots].copy_(t[index, :, :slots])
        for t in (self.token, self.pad, self.generated):
            t[:len(keep)].copy_(t[index])

    def _run_batch(self, prompts: list[list[int]], settings: DecodeSettings, rule: StopRule,
                   generator: torch.Generator) -> tuple[list[list[int]], int]:
        """Tokens of each prompt and the forward passes they took."""
        n = len(prompts)
        P = self._prefill(prompts, settings, generator)
        rows: list[int | None] = list(range(n))  # the prompt in each cache row; None once it is done
        done: dict[int, list[int]] = {}
        step, passes, max_new = 1, 1, settings.max_new_tokens
        while step < max_new:
            live = sum(r is not None for r in rows)
            bucket = next(b for b in batch_buckets(self.max_batch) if b >= live)
            self._draw(bucket, settings, generator)
            self._step(bucket, self._length_bucket(P + step), settings.temperature, settings.top_p)()
            step, passes = step + 1, passes + 1
            if step % self.check_every == 0 or step == max_new:
                rows = self._retire(rows, step, rule, done, final=step == max_new)
                if not any(r is not None for r in rows):
                    break
        if step >= max_new:
            self._retire(rows, step, rule, done, final=True)
        return [done[i] for i in range(n)], passes

    def _retire(self, rows: list[int | None], step: int, rule: StopRule, done: dict[int, list[int]],
                final: bool) -> list[int | None]:
        """Records rows that are done (all of them if `final`); compacts the rest when they fit
        a smaller bucket. Returns the new row map."""
        new = self.generated[:len(rows), :step].tolist()
        for i, r in enumerate(rows):
            if r is None:
                continue
            kept = rule.kept_length(new[i])
            if kept is not None or final:
                done[r] = new[i][:kept or step]
                rows[i] = None
        live = [i for i, r in enumerate(rows) if r is not None]
        if live and next(b for b in batch_buckets(self.max_batch) if b >= len(live)) < len(rows):
            self._compact(live)
            return [rows[i] for i in live]
        return rows

    # ---- many prompts -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], settings: DecodeSettings, rule: StopRule,
                 batch_size: int) -> EngineOutput:
        """New tokens for each prompt (token ids), in input order, batched by prompt length."""
        prompts = [list(p) for p in prompts]
        if not prompts or settings.max_new_tokens < 1:
            return EngineOutput([[] for _ in prompts], [0] * len(prompts))
        if any(not p for p in prompts):
            raise ValueError("AREngine: every prompt needs at least one token")
        self._allocate(min(batch_size, len(prompts)), max(len(p) for p in prompts) + settings.max_new_tokens)
        generator = torch.Generator().manual_seed(settings.seed)
        out = EngineOutput([[] for _ in prompts], [0] * len(prompts))
        for group in length_groups([len(p) for p in prompts], batch_size):
            record = BatchRecord(group)
            sync(self.device)
            t0 = time.perf_counter()
            tokens, record.forward_passes = self._run_batch([prompts[i] for i in group], settings, rule, generator)
            sync(self.device)
            record.seconds = time.perf_counter() - t0
            for i, t in zip(group, tokens):
                out.tokens[i], out.batch_of[i] = t, len(out.batches)
            out.batches.append(record)
        return out


class DiffusionEngine:
    """Batched masked-diffusion sampling on the native TransformerLM(causal=False): the exact
    sampler's steps replay one graphed forward of the padded batch (GraphedForward, on CUDA;
    prompts left-padded further to a multiple of `length_quantum` so that batches share
    shapes), the fast sampler runs models.fast_dllm. On CPU both run eagerly."""

    def __init__(self, model: TransformerLM, graphs: bool = True, length_quantum: int = 64):
        self.model, self.device = model, model.device
        self.graphs = graphs and self.device.type == "cuda"
        self.length_quantum = length_quantum if self.graphs else 1
        self._forward: GraphedForward | None = None  # the last shape's; one at a time bounds graph memory
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def logits_fn(self, shape: tuple[int, int], logits_from: int = 0):
        """The logits function of diffusion_generate for batches of `shape` (with padding), giving
        the logits of positions logits_from … on (the response's: the prompt's are never read)."""
        if not self.graphs:
            return lambda ids, mask: self.model(ids, mask, logits_from=logits_from)
        f = self._forward
        if f is None or tuple(f.input_ids.shape) != tuple(shape) or f.logits_from != logits_from:
            self._forward = None
            self._forward = GraphedForward(self.model, shape, padded=True, pool=self.pool, logits_from=logits_from)
        return self._forward

    def _pad(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
        extra = -input_ids.shape[1] % self.length_quantum
        if not extra:
            return input_ids, attention_mask
        B = input_ids.shape[0]
        return (torch.cat([input_ids.new_full((B, extra), pad_id), input_ids], 1),
                torch.cat([attention_mask.new_zeros(B, extra), attention_mask], 1))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 mask_token_id: int, shift: bool, config: SamplerConfig, generator: torch.Generator | None = None,
                 on_step: Callable[[], None] | None = None) -> tuple[torch.Tensor, int]:
        """Response ids [B, max_new_tokens] and forward passes (diffusion_generate's contract)."""
        if config.mode == "fast":
            from qrobust.models.fast_dllm import fast_diffusion_generate

            return fast_diffusion_generate(self.model, input_ids, attention_mask, max_new_tokens, mask_token_id,
                                           shift, config, generator, graphs=self.graphs)
        input_ids, attention_mask = self._pad(input_ids, attention_mask, mask_token_id)
        P = input_ids.shape[1]
        logits = self.logits_fn((input_ids.shape[0], P + max_new_tokens), max(P - int(shift), 0))
        return diffusion_generate(logits, input_ids, attention_mask, max_new_tokens, mask_token_id, shift, config,
                                  generator, on_step)
