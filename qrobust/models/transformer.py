"""A Qwen3-style decoder transformer, readable top to bottom.

One class serves both kinds of model in this project: with `causal=True` it is the
autoregressive Qwen3 architecture (parameter names match transformers' Qwen3ForCausalLM, so the
weights load there); with `causal=False` it is the masked-diffusion sibling of CoDA / Dream /
LLaDA, whose parameter names match CoDA's checkpoints. The two differ only in the attention mask.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.kernels import kernels_enabled


@dataclass
class TransformerConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    causal: bool = True
    # Logits at position i predict token i+1. True for AR models and for CoDA/Dream-style
    # diffusion models (a masked token at i is read from the logits at i-1); LLaDA uses False.
    shift_logits: bool = True
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# scaled_dot_product_attention takes grouped keys and values (enable_gqa) from PyTorch 2.5 on
SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Where the Triton kernels run (kernels.kernels_enabled), outside torch.compile (which fuses
    the torch form itself) and where no gradient flows through it (the kernel has no backward;
    hawq's Hessian traces differentiate the model twice), one kernel (kernels.rms_norm) computes
    the same; `kernel = False` keeps the torch form (for comparisons)."""

    kernel = True
    # the kernel as a programmatic dependent launch (models.decode.use_engine_pdl; Hopper and later)
    pdl = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_kernel(x):
            from qrobust.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, self.pdl)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def _uses_kernel(self, *tensors: torch.Tensor) -> bool:
        """Whether the kernels take these inputs: on, where they run, of the weight's dtype, outside
        torch.compile and with no gradient to flow through them or the weight."""
        x = tensors[0]
        return self.kernel and kernels_enabled(x.device) and all(t.dtype == self.weight.dtype for t in tensors) \
            and not torch.compiler.is_compiling() \
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, self.weight)))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(h), h) for the residual stream h = residual + x (x where residual is None; x may be
        split sums, residual_sum). Where forward would use the kernel and x is one tensor of the
        stream's shape, one kernel adds and normalizes (kernels.rms_norm.add_rms_norm)."""
        if residual is not None and x.shape == residual.shape and self._uses_kernel(x, residual):
            from qrobust.kernels.rms_norm import add_rms_norm

            return add_rms_norm(x, residual, self.weight, self.eps, self.pdl)
        h = residual_sum(x, residual)
        return self(h), h


def residual_sum(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """residual + x (x where residual is None). x may be a product's split sums, one dimension
    more than the residual (QuantLinear.forward_split_sums): added up in order in float32 and
    rounded to the residual's dtype, as the GEMV would have."""
    if residual is None:
        return x
    if x.dim() > residual.dim():
        total = x[0]
        for part in x[1:]:
            total = total + part
        x = total.to(residual.dtype)
    return residual + x


def add_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                    linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(h)), h) for the residual stream h = residual + x (x where residual is None):
    in one kernel where the layer can (a forward_add_norm that does not return None: packed
    layers on the GEMV, QuantLinear.forward_add_norm), else as three steps."""
    fused = getattr(linear, "forward_add_norm", None)
    out = None if fused is None else fused(x, residual, norm)
    if out is None:
        normed, h = norm.forward_add(x, residual)
        out = linear(normed), h
    return out


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """One layer's keys and values for a fixed maximum length, written at `positions` (a device
    tensor the decoder advances), so a decoding step has fixed shapes and can be replayed as a
    CUDA graph. Slots past the current position hold stale values; the attention mask hides them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, start: torch.Tensor | None = None):
        self.k, self.v, self.positions = k, v, positions
        self.start = start  # [B]: each row's first slot (left padding before it), where rows differ
        # arrival counters for a decode-attention kernel that splits the cache (kernels.decode_attention)
        self.locks = torch.zeros(k.shape[0] * k.shape[1], dtype=torch.int32, device=k.device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, self.positions, k)
        self.v.index_copy_(2, self.positions, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.causal = c.causal
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qkv_proj: nn.Module | None = None  # q/k/v as one layer, for inference (models.decode)
        # one new token's attention over the cache, its q/k norms, rotation and cache writes included, as
        # one kernel (models.decode.use_attention_kernel)
        self.decode_attention: Callable[..., torch.Tensor] | None = None

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv = self.n_kv_head * self.head_dim
        return qkv.split([self.n_head * self.head_dim, kv, kv], dim=-1)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self._split_qkv(self.qkv_proj(x))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        return self.attend(*self._qkv(x), rope, mask, cache)

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                         rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                         cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(norm(h)), h) for the residual stream h = residual + x (add_norm_linear)."""
        if self.qkv_proj is None:
            normed, h = norm.forward_add(x, residual)
            return self(normed, rope, mask, cache), h
        qkv, h = add_norm_linear(x, residual, norm, self.qkv_proj)
        return self.attend(*self._split_qkv(qkv), rope, mask, cache), h

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The output projection of the attention of q over k and v, as they come from the q/k/v
        products [B, T, heads·head_dim]."""
        B, T, _ = q.shape
        cos, sin = rope
        if cache is not None and T == 1 and self.decode_attention is not None:
            # one kernel normalizes, rotates and caches the new token's heads and attends
            rows = cos.shape[0]  # one rotary position for all rows, or one per row
            y = self.decode_attention(q, k, v, cache.k, cache.v, cache.positions, cache.locks, self.q_norm.weight,
                                      self.k_norm.weight, self.q_norm.eps, cos.reshape(rows, -1), sin.reshape(rows, -1),
                                      start=cache.start)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        q = self.q_norm(q.reshape(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.reshape(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        rep = self.n_head // self.n_kv_head
        gqa = {}
        if rep > 1 and SDPA_GQA:  # the grouped heads read in place, not copied rep times (4x faster on CPU)
            gqa = {"enable_gqa": True}
        elif rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # mask None: no padding, so the plain causal (or full) pattern, which fused kernels handle
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and self.causal, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.swiglu: nn.Module | None = None  # silu(gate)·up from one fused layer, for inference (models.decode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu is not None:
            return self.down_proj(self.swiglu(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                         norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(norm(h)), h) for the residual stream h = residual + x (add_norm_linear)."""
        if self.swiglu is None:
            normed, h = norm.forward_add(x, residual)
            return self(normed), h
        gated, h = add_norm_linear(x, residual, norm, self.swiglu)
        split_sums = getattr(self.down_proj, "forward_split_sums", None)
        out = None if split_sums is None else split_sums(gated)
        return (self.down_proj(gated) if out is None else out), h


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        out, h = self.forward_deferred(x, None, rope, mask, cache)
        return residual_sum(out, h)

    def forward_deferred(self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                         mask: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on residual + x (x where residual is None) with its last residual add left
        to the caller: (the MLP's output, the stream it adds to). The next block adds it, so that
        with fused layers each add and the norm after it run inside a GEMV (add_norm_linear); the
        output may be split sums (residual_sum)."""
        attended, h = self.self_attn.forward_add_norm(x, residual, self.input_layernorm, rope, mask, cache)
        return self.mlp.forward_add_norm(attended, h, self.post_attention_layernorm)


class Backbone(nn.Module):
    """Embeddings, blocks and final norm; named `model` inside the LM as in Qwen3 and CoDA."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class TransformerLM(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:  # as transformers models have; Bergson's collectors read it
        return self.model.embed_tokens.weight.device

    def attention_mask(self, attention_mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [B or 1, 1, T, T] mask: causal or not, padded keys hidden, every row non-empty;
        None without padding (attention then applies the causal pattern itself)."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return self.padding_mask(attention_mask, T, device)

    def padding_mask(self, attention_mask: torch.Tensor, T: int, device: torch.device) -> torch.Tensor:
        """attention_mask's boolean mask without looking at the padding first (no host sync, so
        a CUDA graph can hold it; models.decode.GraphedForward)."""
        allowed = torch.ones(T, T, dtype=torch.bool, device=device)
        if self.config.causal:
            allowed = allowed.tril()
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        # Padding queries would see no key at all (NaN in softmax): let them see themselves.
        return allowed | torch.eye(T, dtype=torch.bool, device=device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                sync_free: bool = False, logits_from: int = 0) -> torch.Tensor:
        """Logits [B, T − logits_from, vocab] of positions logits_from … T − 1. attention_mask [B, T]:
        1 for real tokens, 0 for (left) padding. sync_free: build the mask even where nothing is
        padded (no host sync: graph capture)."""
        B, T = input_ids.shape
        if attention_mask is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(position_ids, x.dtype)
        if sync_free and attention_mask is not None:
            mask = self.padding_mask(attention_mask, T, input_ids.device)
        else:
            mask = self.attention_mask(attention_mask, T, input_ids.device)
        for block in self.model.layers:
            x = block(x, rope, mask)
        return self.lm_head(self.model.norm(x[:, logits_from:] if logits_from else x))

    def forward_cached(self, input_ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Logits [B, T, vocab] of tokens at positions caches[0].positions [T], attending to the
        cached keys up to their own position (causal models only)."""
        positions = caches[0].positions
        max_len = caches[0].k.shape[2]
        mask = (torch.arange(max_len, device=positions.device)[None, :] <= positions[:, None])[None, None]
        return self.forward_slots(input_ids, caches, positions[None], mask)

    def forward_slots(self, input_ids: torch.Tensor, caches: list[KVCache], position_ids: torch.Tensor,
                      mask: torch.Tensor, last_only: bool = False, logits_from: int = 0) -> torch.Tensor:
        """Logits [B, T, vocab] of tokens written into the cache slots caches[0].positions [T]
        (shared by every row), each row at its own rotary positions position_ids [B or 1, T] and
        seeing the cache slots `mask` [B or 1, 1, T, slots] allows: how a batch of left-padded
        prompts decodes with one slot index (models.engine). last_only: the last position's
        logits [B, 1, vocab] only (a prompt's forward needs no more); logits_from: those of
        positions logits_from … T − 1 only."""
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(position_ids, x.dtype)
        residual = None
        for block, cache in zip(self.model.layers, caches):
            x, residual = block.forward_deferred(x, residual, rope, mask, cache)
        first = x.shape[-2] - 1 if last_only else logits_from  # (x may be split sums: one dimension more)
        normed, _ = self.model.norm.forward_add(x[..., first:, :], None if residual is None else residual[:, first:])
        return self.lm_head(normed)

    def new_caches(self, batch: int, max_len: int, positions: torch.Tensor) -> list[KVCache]:
        c = self.config
        shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
        w = self.model.embed_tokens.weight

        def zeros() -> torch.Tensor:
            return torch.zeros(shape, device=w.device, dtype=w.dtype)

        return [KVCache(zeros(), zeros(), positions) for _ in range(c.num_hidden_layers)]
