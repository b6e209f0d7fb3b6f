"""Overhead-free batch-1 generation for qrobust's native TransformerLM, for latency benchmarks.

At batch 1 a 1.7B model's step is a few milliseconds of memory traffic, and launching its
hundreds of small kernels one by one from Python costs as much again. So both kinds replay a
captured CUDA graph: the AR decoder one decoding step over a static KV cache (greedy: the
argmax and the position update are inside the graph), the diffusion sampler one full-sequence
forward; optionally torch.compile fuses the small kernels inside the graph first. Inference-only
rewrites cut the kernels per layer further: fused q/k/v and SwiGLU layers (fuse_projections),
the residual adds and norms before them inside their GEMVs (fuse_norms) and one attention
kernel per layer (use_attention_kernel). On CPU the same code runs eagerly,
which is how it is tested.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.models.transformer import RMSNorm, TransformerLM


def concat_linears(layers: list[nn.Module], interleave: bool = False) -> nn.Module | None:
    """One layer for several that read the same input (outputs side by side, or alternating with
    `interleave`), or None where they cannot be joined."""
    from qrobust.quant.qlinear import QuantLinear, join_outputs  # the quant package builds on models

    if all(isinstance(m, QuantLinear) for m in layers):
        return QuantLinear.concat(layers, interleave)
    if not all(type(m) is nn.Linear for m in layers) or len({m.in_features for m in layers}) > 1 \
            or len({m.bias is None for m in layers}) > 1 or (interleave and len({m.out_features for m in layers}) > 1):
        return None
    first = layers[0]
    out = nn.Linear(first.in_features, sum(m.out_features for m in layers), bias=first.bias is not None,
                    device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(join_outputs([m.weight for m in layers], 0, interleave))
        if first.bias is not None:
            out.bias.copy_(join_outputs([m.bias for m in layers], 0, interleave))
    return out


class SwiGLU(nn.Module):
    """silu(gate(x))·up(x) through one layer whose outputs interleave gate and up (g₀, u₀, g₁, u₁,
    …): a packed layer on the GEMV applies the activation as it stores its outputs, so decoding
    runs no separate activation kernel and writes no [2·I] intermediate."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from qrobust.quant.qlinear import QuantLinear, interleaved_swiglu

        if isinstance(self.linear, QuantLinear):
            return self.linear.forward_swiglu(x)
        return interleaved_swiglu(self.linear(x))

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                         norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """QuantLinear.forward_add_norm's one-kernel residual add, norm and SwiGLU product, or None."""
        from qrobust.quant.qlinear import QuantLinear

        if isinstance(self.linear, QuantLinear):
            return self.linear.forward_add_norm(x, residual, norm, swiglu=True)
        return None


def fuse_projections(model: TransformerLM) -> int:
    """For inference: q/k/v become one layer, and gate/up one SwiGLU, wherever their kinds and
    specs match, so a block launches four products instead of seven. The separate layers are
    removed (so memory is not doubled), which changes the state dict: fuse only models you will
    not save. Returns how many groups were fused."""
    fused = 0
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        qkv = None if attn.qkv_proj is not None else concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
            fused += 1
        gate_up = None if mlp.swiglu is not None else concat_linears([mlp.gate_proj, mlp.up_proj], interleave=True)
        if gate_up is not None:
            mlp.swiglu = SwiGLU(gate_up)
            del mlp.gate_proj, mlp.up_proj
            fused += 1
    return fused


def use_attention_kernel(model: TransformerLM, on: bool = True) -> int:
    """For inference: each attention layer computes a single new token's attention over its cache
    with one kernel (kernels.decode_attention), which also applies the q/k norms and the rotary
    embedding and writes the new key and value into the cache, instead of separate kernels for
    those, repeating the grouped keys, building a mask and running SDPA over the whole static
    cache; on=False goes back. The kernel runs where
    Triton does (kernels.supports) and needs a power-of-two head size: otherwise nothing changes.
    Returns how many layers changed."""
    from qrobust.kernels.decode_attention import decode_attention_op

    if model.config.head_dim & (model.config.head_dim - 1):
        return 0
    for block in model.model.layers:
        block.self_attn.decode_attention = decode_attention_op if on else None
    return len(model.model.layers)


def generation_layers(model: TransformerLM) -> int:
    """The layers `eval` and `sweep` generate with (ModelAdapter.for_generation): fused projections
    (fuse_projections) and, for causal models where the kernels run, one attention kernel per
    layer (use_attention_kernel). Returns how many groups were fused."""
    from qrobust import kernels

    if model.config.causal and kernels.supports(model.device):
        use_attention_kernel(model)
    return fuse_projections(model)


def use_pdl(model: TransformerLM, on: bool = True) -> int:
    """For inference on Hopper or later GPUs: the packed layers' GEMVs and the attention kernel
    launch as programmatic dependent launches, so each may start while the kernel before it
    finishes, reading its weights before it waits for that kernel's outputs (kernels.gemv).
    Only for decoding, where nothing rewrites the weights between steps. Elsewhere nothing
    changes; on=False goes back. Returns how many layers changed."""
    return _dependent_launches(model, "pdl", on)


def use_half2(model: TransformerLM, on: bool = True) -> int:
    """The packed layers' GEMVs sum each chunk of 32 inputs two codes at a time in float16
    (kernels.gemv_tiles._half2_sums) where they can (float16 activations, inputs in group order,
    2, 3, 4 or 8 bits; QuantLinear.takes_half2): fewer instructions per code, at about twice the
    float32 sums' error (README: GPU performance). 3-bit layers repack their codes for it
    (QuantLinear.half2). on=False goes back. Returns how many layers changed."""
    return _set_packed(model, "half2", on)


def use_engine_pdl(model: TransformerLM, on: bool = True, norms: bool = True) -> int:
    """For the batched engine on Hopper or later: the fragments products (QuantLinear.fragments_pdl),
    the attention kernel and, with `norms`, the RMSNorm kernels (RMSNorm.pdl) launch as
    programmatic dependent launches, so each loads its weights and launches while the kernel
    before it finishes. Unlike use_pdl, the layers keep the fragments layout. Elsewhere nothing
    changes; on=False goes back (norms too). Returns how many layers changed."""
    from qrobust.kernels import pdl_supported

    if not pdl_supported(model.device):
        return 0
    norm_layers = [m for m in model.modules() if isinstance(m, RMSNorm)]
    for norm in norm_layers:
        norm.pdl = on and norms
    return _dependent_launches(model, "fragments_pdl", on) + (len(norm_layers) if norms else 0)


def _dependent_launches(model: TransformerLM, switch: str, on: bool) -> int:
    """use_pdl and use_engine_pdl: the packed layers' `switch` and the attention kernel's PDL."""
    from qrobust.kernels.decode_attention import decode_attention_op
    from qrobust.kernels import pdl_supported

    if not pdl_supported(model.device):
        return 0
    changed = _set_packed(model, switch, on)
    for block in model.model.layers:
        if block.self_attn.decode_attention is not None:
            block.self_attn.decode_attention = functools.partial(decode_attention_op, pdl=True) if on \
                else decode_attention_op
            changed += 1
    return changed


def _set_packed(model: TransformerLM, switch: str, on: bool) -> int:
    """Sets the QuantLinear switch `switch` (pdl, fragments_pdl, half2) of every packed layer; returns how many."""
    from qrobust.quant.qlinear import QuantLinear

    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for module in packed:
        setattr(module, switch, on)
    return len(packed)


def fuse_norms(model: TransformerLM, on: bool = True) -> int:
    """For batch-1 decoding with fused projections (fuse_projections): the packed q/k/v and
    SwiGLU layers add the residual and apply the RMSNorm before them in their GEMV's prologue
    (QuantLinear.forward_add_norm), which removes the two element-wise kernels a block has left
    besides its products and attention. In such blocks the packed down projection, whose GEMV
    splits K, leaves its split sums for the next block's q/k/v product to add up
    (QuantLinear.forward_split_sums): the last split no longer gathers them, a fence and a read
    of L2 on the critical path of every block. Takes effect where the packed kernels run;
    on=False goes back. Returns how many layers changed."""
    changed = 0
    for block in model.model.layers:
        fused = [layer for layer in (block.self_attn.qkv_proj, getattr(block.mlp.swiglu, "linear", None))
                 if hasattr(layer, "fuse_norm")]
        for layer in fused:
            layer.fuse_norm = on
        down = block.mlp.down_proj
        if fused and hasattr(down, "split_sums"):
            down.split_sums = on
            fused.append(down)
        changed += len(fused)
    return changed


def compile_options(pdl: bool) -> dict:
    """torch.compile options: with `pdl`, Inductor's own kernels launch as programmatic dependent
    launches too (its triton.enable_pdl, where this PyTorch has it)."""
    import torch._inductor.config as inductor

    return {"triton.enable_pdl": True} if pdl and hasattr(inductor.triton, "enable_pdl") else {}


def greedy_token(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """argmax over the last dimension of logits [B, V] as [B, 1], in two passes (each chunk's
    maximum, then the best chunk), the first maximum on ties as torch.argmax: one pass over a
    150k vocabulary is one program's work, a two-pass one spreads it over the GPU."""
    B, V = logits.shape
    chunks = -(-V // chunk)
    padded = F.pad(logits, (0, chunks * chunk - V), value=float("-inf")).view(B, chunks, chunk)
    values, within = padded.max(-1)
    best = values.argmax(-1, keepdim=True)
    return best * chunk + within.gather(-1, best)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int = 2,
            reset: Callable[[], None] | None = None, pool=None) -> Callable[[], torch.Tensor]:
    """A function that replays `fn` (which reads and writes only static tensors) as a CUDA graph;
    on CPU, `fn` itself. `fn` runs `warmup` times first, so lazy setup happens outside the graph;
    `reset`, where given, runs after each of those runs to undo what `fn` advanced (a graph
    captured in the middle of generation). `pool`: a memory pool shared with other graphs that
    are never replayed at the same time (torch.cuda.graph_pool_handle)."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
            if reset is not None:
                reset()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return Replay(graph, out, fn)


@dataclass
class Replay:
    """A captured graph as a function: replays it and returns its static output."""

    graph: torch.cuda.CUDAGraph
    out: torch.Tensor
    # The graph reads the tensors that fn's closure made outside the capture (an engine step's key
    # indices, its caches' counters) by address: kept alive with the graph, or the allocator hands
    # their memory to the next eager allocation and replays read whatever that writes.
    fn: Callable[[], torch.Tensor]

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


def fused(fn: Callable[[], torch.Tensor], compile: bool, pdl: bool = False) -> Callable[[], torch.Tensor]:
    """`fn` compiled by torch.compile, which fuses the small element-wise kernels (norms, rotary,
    residuals) that dominate a batch-1 step once weights are small; `fn` runs once eagerly first
    so that layers settle their lazy, data-dependent setup outside the traced code. `pdl`: see
    compile_options."""
    if not compile:
        return fn
    with torch.no_grad():
        fn()
    return torch.compile(fn, dynamic=False, options=compile_options(pdl) or None)


@dataclass
class DecodeTiming:
    tokens: torch.Tensor  # [new tokens]
    ttft_s: float  # prompt forward and first token
    decode_s: float  # the remaining tokens

    @property
    def tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else float("nan")


class GreedyDecoder:
    """Greedy AR decoding of one sequence with a static KV cache of `max_len` positions."""

    def __init__(self, model: TransformerLM, max_len: int, graphs: bool = True, compile: bool = False,
                 pdl: bool = False):
        if not model.config.causal:
            raise ValueError("GreedyDecoder decodes causal models; diffusion models use GraphedForward")
        self.model, self.max_len = model, max_len
        self.device = model.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.caches = model.new_caches(1, max_len, self.position)
        self._step = capture(fused(self._eager_step, compile, pdl), self.device) if graphs else self._eager_step

    def _use_positions(self, positions: torch.Tensor) -> None:
        for cache in self.caches:
            cache.positions = positions

    def _eager_step(self) -> torch.Tensor:
        """Feed self.token at self.position; leave the next token and position in place."""
        logits = self.model.forward_cached(self.token, self.caches)
        self.token.copy_(greedy_token(logits[:, -1]))
        self.position.add_(1)
        return self.token

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> DecodeTiming:
        """prompt [P] token ids; returns max_new_tokens greedy tokens and the time they took."""
        P = prompt.numel()
        if P + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {P} + {max_new_tokens} new tokens exceed the cache's {self.max_len} positions")
        out = torch.empty(max_new_tokens, dtype=torch.long, device=self.device)
        sync(self.device)
        t0 = time.perf_counter()
        self._use_positions(torch.arange(P, device=self.device))
        logits = self.model.forward_cached(prompt.to(self.device)[None], self.caches)
        self._use_positions(self.position)
        self.token.copy_(greedy_token(logits[:, -1]))
        self.position.fill_(P)
        out[0] = self.token[0, 0]
        sync(self.device)
        t1 = time.perf_counter()
        for i in range(1, max_new_tokens):
            out[i] = self._step()[0, 0]
        sync(self.device)
        return DecodeTiming(out.cpu(), t1 - t0, time.perf_counter() - t1)


class GraphedForward:
    """Logits of a fixed-shape batch, for a diffusion sampler's steps: copies the input into a
    static buffer and replays the forward. Takes (input_ids, attention_mask) like the sampler's
    logits function; without `padded` the mask must be all ones, with it the mask goes into a
    static buffer too (left-padded batches). `pool`: capture's shared graph memory pool.
    logits_from: only positions from there on get logits (a sampler reads the response's only)."""

    def __init__(self, model: TransformerLM, shape: tuple[int, int], graphs: bool = True, compile: bool = False,
                 padded: bool = False, pool=None, logits_from: int = 0):
        self.model, self.padded, self.logits_from = model, padded, logits_from
        device = model.device
        self.input_ids = torch.zeros(shape, dtype=torch.long, device=device)
        self.attention_mask = torch.ones(shape, dtype=torch.long, device=device) if padded else None
        self._forward = capture(fused(self._eager, compile), device, pool=pool) if graphs else self._eager

    @torch.no_grad()
    def _eager(self) -> torch.Tensor:
        return self.model(self.input_ids, self.attention_mask, sync_free=True, logits_from=self.logits_from)

    def replay(self) -> torch.Tensor:
        """The forward on the input already in the static buffer: one denoising step's model cost."""
        return self._forward()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.padded:
            self.attention_mask.copy_(attention_mask) if attention_mask is not None else self.attention_mask.fill_(1)
        elif attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("GraphedForward runs unpadded batches only: build it with padded=True")
        self.input_ids.copy_(input_ids)
        return self._forward()
