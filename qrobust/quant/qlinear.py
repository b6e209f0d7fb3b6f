"""A linear layer stored as a GPTQ checkpoint stores it: packed codes, scales, zero points.

On CUDA, forward runs Triton kernels that read the packed buffers directly, the one that
quant.kernel_choice's table names for the bit width and rows (a GEMV for a few rows, as in
batch-1 decoding; a fused dequantize-in-the-loop matmul for batched decoding; a dequantized
weight for the dense matmul for prefill), so the weights stay packed in memory. On CPU (or with
QROBUST_KERNELS=0) forward dequantizes in torch and caches the result. Either way the buffers
are the packed tensors. They hold the GPTQ layout, but for 3-bit layers with half2 on, whose
codes are repacked for the GEMV (qrobust.quant.pack's pairs layout), and for layers with groups
of 128 in input order on a Hopper GPU, repacked on their first product there in
kernels.fragments' layout for kernels.fragments_matmul; what is saved is always the GPTQ layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.kernels import kernels_enabled
from qrobust.quant.grid import QuantResult, QuantSpec
from qrobust.quant.kernel_choice import FUSED_MAX_ROWS, GEMV_MAX_ROWS, packed_kernel
from qrobust.quant.pack import pack_qweight, pack_qzeros, repack_qweight, unpack_qweight, unpack_qzeros

# "gptq" (v1) stores zero − 1, the historical AutoGPTQ convention; "gptq_v2" stores zero as is.
# Asymmetric grids can have zero = 0, which v1 cannot represent, so they are written as v2.
FORMAT_OFFSET = {"gptq": 1, "gptq_v2": 0}


@dataclass(frozen=True)
class KernelArgs:
    """What a layer's packed kernels take besides its buffers, fixed once per load (uses_kernels)."""
    device: torch.device
    g_idx: torch.Tensor | None  # None where the inputs are in group order
    group_size: int
    gemv: object  # kernels.GemvConfig
    gemv_locks: torch.Tensor  # the GEMV's arrival counters (kernels.gemv_locks)
    matmul_locks: torch.Tensor | None  # the fused matmul's (packed_matmul.matmul_locks); None: sums afterwards


def checkpoint_format(spec: QuantSpec) -> str:
    return "gptq" if spec.sym else "gptq_v2"


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.format = checkpoint_format(spec)
        n_groups = spec.groups_for(in_features)
        b = spec.bits
        self.register_buffer("qweight", torch.zeros(in_features * b // 32, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * b // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._weight: torch.Tensor | None = None
        # the packed kernels' arguments; False where they cannot run, None until asked (uses_kernels)
        self._kernel_args: KernelArgs | bool | None = None
        # GEMV calls as programmatic dependent launches (models.decode.use_pdl): for decoding only
        self.pdl = False
        # forward_add_norm on one GEMV that adds the residual and normalizes first (models.decode.fuse_norms)
        self.fuse_norm = False
        # forward_split_sums leaves a K-split product unadded, for such a GEMV to add (models.decode.fuse_norms)
        self.split_sums = False
        # GEMV sums codes two at a time in float16 where it can (takes_half2; models.decode.use_half2)
        self._half2 = False
        # forward_swiglu on the fragments product applies SwiGLU as it stores the outputs
        # (kernels.fragments_matmul swiglu=True); off until measured on a GPU (benchmarks/engine_gpu.py)
        self.swiglu_epilogue = False
        # the fragments product as a programmatic dependent launch (models.decode.use_engine_pdl)
        self.fragments_pdl = False
        # how qweight packs codes: "gptq", "pairs" for 3-bit half2 layers (the half2 setter; quant.pack),
        # "fragments" where kernels.fragments_matmul runs (uses_kernels; kernels.fragments)
        self.layout = "gptq"
        self._fragments = False

    @classmethod
    def from_result(cls, result: QuantResult, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuantLinear":
        out_features, in_features = result.q.shape
        spec = result.spec
        layer = cls(in_features, out_features, spec, bias is not None, dtype, result.q.device)
        offset = FORMAT_OFFSET[layer.format]
        layer.qweight.copy_(pack_qweight(result.q.to(torch.int32), spec.bits))
        zeros = (result.zeros.round().to(torch.int64) - offset) & spec.maxq
        layer.qzeros.copy_(pack_qzeros(zeros, spec.bits))
        layer.scales.copy_(result.scales.to(torch.float16))
        layer.g_idx.copy_(result.g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def concat(cls, layers: list["QuantLinear"], interleave: bool = False) -> "QuantLinear | None":
        """One layer computing the given layers' outputs side by side (they read the same input),
        or, with `interleave`, alternating (a₀, b₀, a₁, b₁, … for equally wide layers); None where
        their specs, formats, input groupings or (interleaved) widths differ. Packed codes and
        scales are joined along the outputs as stored; zero points are unpacked and packed again."""
        first = layers[0]
        same = all(m.spec == first.spec and m.format == first.format and m.in_features == first.in_features
                   and (m.bias is None) == (first.bias is None) and torch.equal(m.g_idx, first.g_idx)
                   and (not interleave or m.out_features == first.out_features) for m in layers[1:])
        bits, N = first.spec.bits, sum(m.out_features for m in layers)
        if not same or N * bits % 32:
            return None
        out = cls(first.in_features, N, first.spec, first.bias is not None,
                  first.scales.dtype if first.bias is None else first.bias.dtype, first.qweight.device)

        for name in ("qweight", "scales") + (("bias",) if first.bias is not None else ()):
            getattr(out, name).copy_(join_outputs([m.gptq_qweight() if name == "qweight" else getattr(m, name)
                                                   for m in layers], -1, interleave))
        zeros = [unpack_qzeros(m.qzeros, bits, m.out_features) for m in layers]
        out.qzeros.copy_(pack_qzeros(join_outputs(zeros, -1, interleave), bits))
        out.g_idx.copy_(first.g_idx)
        out.half2 = first.half2
        return out

    @property
    def half2(self) -> bool:
        return self._half2

    @half2.setter
    def half2(self, on: bool) -> None:
        """Switches the half2 sums; a 3-bit layer in group order repacks its codes in the pairs
        layout, whose pairs of codes the half2 sums read with a mask each (and back without)."""
        self._half2 = on
        self._relayout()

    def _group_len(self) -> int:
        return self.spec.group_size if self.spec.group_size != -1 else self.in_features

    def _in_group_order(self) -> bool:
        """Whether input k belongs to group k // group size (no act-order permutation)."""
        return torch.equal(self.g_idx.long(), torch.arange(self.in_features, device=self.g_idx.device)
                           // self._group_len())

    def _relayout(self) -> None:
        """Repacks qweight in the layout asked for: fragments where uses_kernels chose them, pairs
        for a 3-bit half2 layer in group order, else GPTQ's."""
        if self._fragments:
            layout = "fragments"
        else:
            layout = "pairs" if self.half2 and self.spec.bits == 3 and self._in_group_order() else "gptq"
        if layout == self.layout:
            return
        gptq = self.gptq_qweight()
        if layout == "fragments":
            from qrobust.kernels.fragments import to_fragments

            self.qweight.copy_(to_fragments(gptq, self.in_features, self.spec.bits))
        else:
            self.qweight.copy_(repack_qweight(gptq, self.spec.bits, self.in_features, "gptq", layout))
        self.layout = layout

    def gptq_qweight(self) -> torch.Tensor:
        """qweight in the GPTQ layout (itself, but for repacked layers)."""
        if self.layout == "fragments":
            from qrobust.kernels.fragments import from_fragments

            return from_fragments(self.qweight, self.in_features, self.spec.bits)
        return repack_qweight(self.qweight, self.spec.bits, self.in_features, self.layout, "gptq")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "gptq":
            destination[prefix + "qweight"] = self.gptq_qweight()

    def codes(self) -> torch.Tensor:
        if self.layout == "fragments":
            return unpack_qweight(self.gptq_qweight(), self.spec.bits, self.in_features)
        return unpack_qweight(self.qweight, self.spec.bits, self.in_features, self.layout)

    def zero_points(self) -> torch.Tensor:
        z = unpack_qzeros(self.qzeros, self.spec.bits, self.out_features).to(torch.int64)
        return (z + FORMAT_OFFSET[self.format]) & self.spec.maxq

    def qzeros_as(self, fmt: str) -> torch.Tensor:
        """qzeros as checkpoint format `fmt` stores these zero points (FORMAT_OFFSET)."""
        if fmt == self.format:
            return self.qzeros
        return pack_qzeros((self.zero_points() - FORMAT_OFFSET[fmt]) & self.spec.maxq, self.spec.bits)

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float32 weight: scale · (q − zero), the same arithmetic as the quantizer."""
        g = self.g_idx.long()
        q = self.codes().float()
        return self.scales.float()[g].t() * (q - self.zero_points().float()[g].t())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loads the GPTQ layout, and repacks it where half2 asks (the half2 setter)."""
        self._weight, self._kernel_args = None, None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "qweight" in state_dict:
            self.layout = "gptq"
        self._relayout()

    def uses_kernels(self, device: torch.device) -> bool:
        """Whether forward on `device` runs the packed kernels (checked once per load: inputs must
        come in multiples of 32 and groups in whole tiles). Later calls read only the cached
        answer, which keeps forward traceable by torch.compile. An unindexed `cuda` means the
        current CUDA device, as it does for tensors."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._kernel_args is not None:
            return bool(self._kernel_args) and self._kernel_args.device == device
        if not kernels_enabled(device) or self.qweight.device != device:
            return False
        from qrobust.kernels import gemv_config, gemv_locks
        from qrobust.kernels.packed_matmul import matmul_locks

        gs, in_order = self._group_len(), self._in_group_order()
        try:
            config = gemv_config(self.in_features, gs, not in_order)
        except ValueError:
            self._kernel_args = False
            return False
        self._kernel_args = KernelArgs(device, None if in_order else self.g_idx, gs, config,
                                       gemv_locks(self.out_features, device, GEMV_MAX_ROWS, config.block_n),
                                       matmul_locks(self.out_features, device, FUSED_MAX_ROWS))
        self.use_fragments(device)
        return True

    def use_fragments(self, device: torch.device) -> None:
        """Repacks a layer in the fragments layout where kernels.fragments_matmul runs on
        `device` (a Hopper GPU with Gluon) and the layer fits it (kernels.fragments.fragments_apply).
        A layer already set up for the batch-1 decoder's GEMV (pdl, fused norms, split sums, half2:
        models.decode) keeps GPTQ's layout, which those kernels read."""
        from qrobust.kernels.fragments import fragments_apply, runs_fragments

        fits = fragments_apply(self.spec.bits, self._group_len(), self._in_group_order(), self.out_features,
                               self.in_features)
        for_the_gemv = self.pdl or self.fuse_norm or self.split_sums or self._half2
        if fits and not for_the_gemv and runs_fragments(device):
            self._fragments = True
            self._relayout()

    def _tiling_args(self) -> tuple:
        """bits, group size, zero offset and the GEMV's tiling, as the GEMV ops take them."""
        a = self._kernel_args
        c = a.gemv
        return (self.spec.bits, a.group_size, FORMAT_OFFSET[self.format], c.block_n, c.block_depth, c.splits,
                c.num_warps)

    def _gemv_args(self, dtype: torch.dtype, swiglu: bool) -> tuple:
        """What the GEMV ops (kernels.ops) take after their inputs, for inputs of `dtype`."""
        a = self._kernel_args
        return (self.qweight, self.scales, self.qzeros, a.g_idx, None if self.bias is None else self.bias.to(dtype),
                a.gemv_locks, *self._tiling_args(), swiglu, self.pdl, self.half2, self.layout)

    def takes_half2(self, device: torch.device) -> bool:
        """Whether the GEMV on `device` sums codes two at a time in float16 for float16 inputs:
        asked for (half2) and possible for this layer (kernels.layouts.half2_applies)."""
        from qrobust.kernels import half2_applies

        return (self.half2 and self.uses_kernels(device)
                and half2_applies(self.spec.bits, self._kernel_args.g_idx is not None, torch.float16, self.layout))

    def packed_kernel(self, rows: int, device: torch.device) -> str:
        """The packed product for `rows` rows on `device` (quant.kernel_choice)."""
        return packed_kernel(device.type, self.spec.bits, rows, self.layout)

    def _packed_forward(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        product = _PACKED_PRODUCTS[self.packed_kernel(rows.shape[0], x.device)]
        y = product(self, rows, swiglu)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _gemv_product(self, rows: torch.Tensor, swiglu: bool) -> torch.Tensor:
        from qrobust.kernels import gemv_op

        return gemv_op(rows, *self._gemv_args(rows.dtype, swiglu))

    def _fused_matmul_product(self, rows: torch.Tensor, swiglu: bool) -> torch.Tensor:
        from qrobust.kernels.packed_matmul import packed_matmul_op

        a = self._kernel_args
        bias = None if self.bias is None else self.bias.to(rows.dtype)
        y = packed_matmul_op(rows, self.qweight, self.scales, self.qzeros, a.g_idx, bias, a.matmul_locks,
                             self.spec.bits, a.group_size, FORMAT_OFFSET[self.format], self.layout)
        return interleaved_swiglu(y) if swiglu else y

    def _fragments_matmul_product(self, rows: torch.Tensor, swiglu: bool) -> torch.Tensor:
        if rows.dtype not in (torch.bfloat16, torch.float16):  # its PTX is half precision
            return self._dequant_matmul_product(rows, swiglu)
        from qrobust.kernels.fragments_matmul import fragments_matmul_op

        bias = None if self.bias is None else self.bias.to(rows.dtype)
        # in the epilogue, the [rows, 2·I] outputs are neither written nor read again
        epilogue = swiglu and self.swiglu_epilogue
        y = fragments_matmul_op(rows, self.qweight, self.scales, self.qzeros, bias, self._kernel_args.matmul_locks,
                                self.spec.bits, FORMAT_OFFSET[self.format], epilogue, self.fragments_pdl)
        return interleaved_swiglu(y) if swiglu and not epilogue else y

    def _dequant_matmul_product(self, rows: torch.Tensor, swiglu: bool) -> torch.Tensor:
        from qrobust.kernels import dequantize_op

        a = self._kernel_args
        w = dequantize_op(self.qweight, self.scales, self.qzeros, a.g_idx, self.spec.bits, a.group_size,
                          FORMAT_OFFSET[self.format], self.in_features, rows.dtype, self.layout)
        bias = None if self.bias is None else self.bias.to(rows.dtype)
        y = rows @ w if bias is None else torch.addmm(bias, rows, w)
        return interleaved_swiglu(y) if swiglu else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernels(x.device):
            return self._packed_forward(x)
        if self._weight is None or self._weight.dtype != x.dtype or self._weight.device != x.device:
            self._weight = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
        return F.linear(x, self._weight, None if self.bias is None else self.bias.to(x.dtype))

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                         swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(norm(h)), h) for the residual stream h = residual + x (x alone without a residual)
        and an RMSNorm `norm`, computed by one GEMV that adds and normalizes in its prologue (with
        `swiglu`, forward_swiglu's product): where fuse_norm is on, the packed kernels run, rows
        are few and the norm's weights have the stream's dtype. With a residual, x may be the split
        sums [S, ..., K] of forward_split_sums, which the prologue adds up first. Otherwise None,
        and the caller adds and normalizes itself (models.transformer.add_norm_linear)."""
        stream = x if residual is None else residual  # x may be split sums (forward_split_sums)
        rows = stream.reshape(-1, self.in_features)
        if not (self.fuse_norm and self.uses_kernels(x.device) and self.packed_kernel(rows.shape[0], x.device) == "gemv"
                and norm.weight.dtype == stream.dtype):
            return None
        from qrobust.kernels import gemv_add_norm_op

        x_rows = x.reshape(x.shape[0], *rows.shape) if x.dim() > stream.dim() else x.reshape(rows.shape)
        res = None if residual is None else rows
        y, h = gemv_add_norm_op(x_rows, res, norm.weight, norm.eps, *self._gemv_args(stream.dtype, swiglu))
        return y.reshape(*stream.shape[:-1], y.shape[-1]), h.reshape(stream.shape)

    def leaves_split_sums(self, device: torch.device) -> bool:
        """Whether forward_split_sums on `device` leaves split sums (for few rows): split_sums is
        on, the packed kernels run, the GEMV splits K and there is no bias to add."""
        return (self.split_sums and self.bias is None and self.uses_kernels(device) and self.layout != "fragments"
                and self._kernel_args.gemv.splits > 1)

    def forward_split_sums(self, x: torch.Tensor) -> torch.Tensor | None:
        """This layer's product left as the float32 partial sums of its GEMV's K-splits,
        [splits, *x.shape[:-1], out_features], for the next block's first GEMV to add up in its
        prologue with the residual and the norm (forward_add_norm; models.transformer.residual_sum
        adds them up anywhere else): where split_sums is on, the packed kernels run, rows are few,
        the GEMV splits K, and there is no bias. Otherwise None, and the caller runs forward."""
        rows = x.reshape(-1, self.in_features)
        if not (self.leaves_split_sums(x.device) and self.packed_kernel(rows.shape[0], x.device) == "gemv"):
            return None
        from qrobust.kernels import gemv_split_sums_op

        g_idx, splits = self._kernel_args.g_idx, self._kernel_args.gemv.splits
        sums = gemv_split_sums_op(rows, self.qweight, self.scales, self.qzeros, g_idx, *self._tiling_args(), self.pdl,
                                  self.half2, self.layout)
        return sums.reshape(splits, *x.shape[:-1], self.out_features)

    def forward_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate)·up of a layer whose outputs interleave gate and up (concat with interleave):
        on the GEMV, the activation is applied as the kernel stores the outputs."""
        return self._packed_forward(x, swiglu=True) if self.uses_kernels(x.device) else interleaved_swiglu(self(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, sym={self.spec.sym}")


# quant.kernel_choice's kernel names → QuantLinear's products (rows [M, K], swiglu) → [M, N or N/2]
_PACKED_PRODUCTS = {
    "gemv": QuantLinear._gemv_product,
    "fused_matmul": QuantLinear._fused_matmul_product,
    "fragments_matmul": QuantLinear._fragments_matmul_product,
    "dequant_matmul": QuantLinear._dequant_matmul_product,
}


def join_outputs(tensors: list[torch.Tensor], dim: int, interleave: bool) -> torch.Tensor:
    """Several layers' per-output tensors (outputs along `dim`) as one layer's: side by side, or
    alternating (a₀, b₀, a₁, b₁, …) with `interleave`, the layout interleaved_swiglu reads."""
    if not interleave:
        return torch.cat(tensors, dim=dim)
    d = dim % tensors[0].dim()
    return torch.stack(tensors, dim=d + 1).flatten(d, d + 1)


def interleaved_swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up of outputs interleaved as (gate, up) pairs: [..., 2·I] → [..., I]; in one
    kernel (kernels.swiglu) where the kernels run, outside torch.compile and without gradients."""
    if kernels_enabled(y.device) and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and y.requires_grad):
        from qrobust.kernels.swiglu import swiglu

        return swiglu(y)
    return interleaved_swiglu_torch(y)


def interleaved_swiglu_torch(y: torch.Tensor) -> torch.Tensor:
    """interleaved_swiglu's torch form: the CPU path and the kernel's reference."""
    return F.silu(y[..., 0::2]) * y[..., 1::2]


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def replace_linear(root: nn.Module, name: str, result: QuantResult) -> QuantLinear:
    """Swap the nn.Linear at `name` for a QuantLinear holding `result` (its bias and dtype kept)."""
    old = root.get_submodule(name)
    new = QuantLinear.from_result(result, old.bias, old.weight.dtype)
    set_module(root, name, new)
    return new


def dequantize_modules(root: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight (fake quantization),
    for code that needs plain Linear layers with gradients, such as attribution. Returns the count."""
    names = [n for n, m in root.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        q = root.get_submodule(name)
        w_dtype = dtype or (q.bias.dtype if q.bias is not None else q.scales.dtype)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.device,
                           dtype=w_dtype)
        with torch.no_grad():
            linear.weight.copy_(q.dequantized_weight())
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        set_module(root, name, linear)
    return len(names)
