"""Quantize a whole model, block by block, with GPTQ or round-to-nearest.

GPTQ follows the reference driver: capture the first block's inputs on calibration data, then
for each block accumulate every linear layer's Hessian from its inputs — which come from the
already-quantized blocks before it — quantize, and run the block again to feed the next one.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from qrobust.errors import QrobustError
from qrobust.models.adapters import CALIB_MASKINGS, ModelAdapter
from qrobust.quant.gptq import GPTQ, output_error, quantize_jointly
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.pack import values_per_chunk
from qrobust.quant.plan import check_plan_layers
from qrobust.quant.qlinear import QuantLinear, replace_linear

METHODS = ("gptq", "rtn")


@dataclass
class QuantizeConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True
    fuse_shared: bool = True  # layers sharing their input (q/k/v, gate/up): one Hessian, one GPTQ solve
    batch_size: int = 1  # calibration sequences per block forward; more is faster on GPUs
    nsamples: int = 128
    seqlen: int = 2048
    calib: str = "stdlib"
    calib_masking: str = "stratified"  # diffusion models: masked calibration inputs (or 'none': clean text)
    seed: int = 0
    plan: dict[str, QuantSpec] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise QrobustError(f"calibration batch size {self.batch_size} must be at least 1")
        if self.method not in METHODS:
            raise QrobustError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        QuantSpec(self.bits, self.group_size, self.sym)  # validates bits and group size
        if self.calib_masking not in CALIB_MASKINGS:
            raise QrobustError(f"unknown calibration masking {self.calib_masking!r}: choose one of "
                               f"{', '.join(CALIB_MASKINGS)}")

    @property
    def default_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("plan")
        d["plan"] = None if self.plan is None else {k: asdict(v) for k, v in self.plan.items()}
        return d


@dataclass
class LayerRecord:
    """One row of the per-layer log written next to a checkpoint."""

    name: str
    block: int
    bits: int
    group_size: int
    method: str
    weight_error: float  # ‖W − Ŵ‖²_F
    output_error: float | None  # mean per sequence ‖WX − ŴX‖² on calibration inputs (GPTQ only)
    gptq_loss: float | None
    seconds: float


class StageTimer:
    """Seconds per named stage. On CUDA it synchronizes at each boundary, so asynchronous kernels
    are charged to the stage that launched them."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device is not None and device.type == "cuda"

    @contextmanager
    def __call__(self, stage: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[stage] += time.perf_counter() - t0


def layer_specs(adapter: ModelAdapter, config: QuantizeConfig) -> dict[str, QuantSpec]:
    """Every quantizable layer's spec, checked before any work starts."""
    names = adapter.linear_layer_names()
    plan = config.plan or {}
    check_plan_layers(plan, names)
    specs = {n: plan.get(n, config.default_spec) for n in names}
    for name, spec in specs.items():
        layer = adapter.model.get_submodule(name)
        out_f, in_f = layer.weight.shape
        spec.groups_for(in_f, name)
        for dim, what in ((in_f, "input"), (out_f, "output")):
            if dim % values_per_chunk(spec.bits):
                raise QrobustError(f"{name} has {dim} {what} features; {spec.bits}-bit GPTQ packing needs a "
                                   f"multiple of {values_per_chunk(spec.bits)}: leave it out of the plan")
    return specs


def _weight_error(weight: torch.Tensor, new: QuantLinear) -> float:
    return float(((weight.float() - new.dequantized_weight().to(weight.device)) ** 2).sum())


def quantize_rtn(adapter: ModelAdapter, config: QuantizeConfig, progress: bool = True) -> list[LayerRecord]:
    specs = layer_specs(adapter, config)
    records = []
    for block in tqdm(adapter.quantizable_layers(), desc="rtn blocks", disable=not progress):
        for name in block.names:
            t0 = time.perf_counter()
            weight = adapter.model.get_submodule(name).weight.detach()
            new = replace_linear(adapter.model, name, rtn(weight, specs[name], name))
            records.append(LayerRecord(name, block.index, specs[name].bits, specs[name].group_size, "rtn",
                                       _weight_error(weight, new), None, None, time.perf_counter() - t0))
    return records


class _StopForward(Exception):
    pass


def _capture_block_inputs(adapter: ModelAdapter, calib: torch.Tensor, batch_size: int, masking: str = "stratified",
                          seed: int = 0):
    """(args, kwargs) of the first block for each calibration batch. The inputs are made from the
    whole calibration set at once, so masked ratios are stratified over all sequences, not per batch
    (a batch of one would otherwise be masked at the middle ratio every time)."""
    inputs = adapter.calibration_inputs(calib, seed=seed, masking=masking)
    first = adapter.blocks()[0]
    captured = []

    def hook(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib.shape[0], batch_size):
            ids = inputs[start:start + batch_size]
            try:
                adapter.logits(ids.to(adapter.device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _with_hidden(args, kwargs, hidden):
    if args:
        return [hidden, *args[1:]], kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_output(block: nn.Module, args, kwargs) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _accumulate(gptq: GPTQ, inp: torch.Tensor, stop: bool) -> None:
    gptq.add_batch(inp.detach())
    if stop:  # the rest of the block cannot change this group's Hessians
        raise _StopForward


def _feed_block(block: nn.Module, inputs) -> None:
    """Run the block on every input up to the point where a hook stops it."""
    for args, kwargs in inputs:
        try:
            block(*args, **kwargs)
        except _StopForward:
            pass


def _solve_group(group: list[str], gptq: dict[str, GPTQ], specs: dict[str, QuantSpec], config: QuantizeConfig,
                 timer: StageTimer) -> dict[str, tuple]:
    """name -> (result, loss, seconds). Layers with the same spec that share one Hessian (they read
    the same input) are solved in one pass over their stacked rows: the same result up to
    floating-point rounding."""
    args = (config.blocksize, config.percdamp, config.act_order, config.static_groups)
    first = gptq[group[0]]
    shared = (len(group) > 1 and len({specs[n] for n in group}) == 1
              and all(gptq[n].H is first.H for n in group[1:]))
    t0 = time.perf_counter()
    with timer("solve"):
        if shared:
            parts = quantize_jointly([gptq[n] for n in group], specs[group[0]], *args, name=", ".join(group))
            out = {n: (result, loss) for n, (result, loss) in zip(group, parts)}
        else:
            out = {n: gptq[n].quantize(specs[n], *args, name=n) for n in group}
    seconds = (time.perf_counter() - t0) / len(group)
    return {n: (*out[n], seconds) for n in group}


@torch.no_grad()
def quantize_gptq(adapter: ModelAdapter, config: QuantizeConfig, calib: torch.Tensor, progress: bool = True,
                  batch_size: int = 1, timer: StageTimer | None = None) -> list[LayerRecord]:
    timer = timer or StageTimer()
    specs = layer_specs(adapter, config)
    with timer("capture"):
        inputs = _capture_block_inputs(adapter, calib, batch_size, config.calib_masking, config.seed)
    blocks = adapter.blocks()
    records = []
    bar = tqdm(adapter.quantizable_layers(), desc="gptq blocks", disable=not progress)
    for layers in bar:
        block = blocks[layers.index]
        groups = layers.groups if config.true_sequential else [layers.names]
        for group in groups:
            gptq = {name: GPTQ(adapter.model.get_submodule(name)) for name in group}
            # A group's layers read one input tensor, so one accumulation serves them all.
            same_width = len({gptq[n].columns for n in group}) == 1
            accumulate = group[:1] if config.fuse_shared and same_width else group
            hooks = [adapter.model.get_submodule(name).register_forward_pre_hook(
                lambda m, inp, name=name: _accumulate(gptq[name], inp[0], stop=name == accumulate[-1]))
                for name in accumulate]
            try:
                with timer("hessian"):
                    _feed_block(block, inputs)
            finally:
                for h in hooks:
                    h.remove()
            for name in group[len(accumulate):]:
                gptq[name].H, gptq[name].nsamples = gptq[group[0]].H, gptq[group[0]].nsamples
            solved = _solve_group(group, gptq, specs, config, timer)
            for name in group:
                t0 = time.perf_counter()
                spec = specs[name]
                weight = gptq[name].layer.weight.detach()
                result, loss, solve_seconds = solved[name]
                with timer("pack"):
                    new = replace_linear(adapter.model, name, result)
                with timer("error"):
                    out_err = output_error(weight, new.dequantized_weight().to(weight.device), gptq[name].H)
                records.append(LayerRecord(name, layers.index, spec.bits, spec.group_size, "gptq",
                                           _weight_error(weight, new), out_err, loss,
                                           solve_seconds + time.perf_counter() - t0))
                gptq[name].free()
            bar.set_postfix(layer=group[-1].rsplit(".", 1)[-1], loss=f"{records[-1].gptq_loss:.3g}")
        with timer("block_forward"):
            # Each output replaces its input at once: the block's inputs and outputs are never
            # held together, which would double the calibration activations in memory.
            for i, (args, kwargs) in enumerate(inputs):
                inputs[i] = _with_hidden(args, kwargs, _block_output(block, args, kwargs))
    return records


def quantize_model(adapter: ModelAdapter, config: QuantizeConfig, calib: torch.Tensor | None = None,
                   progress: bool = True, timer: StageTimer | None = None) -> list[LayerRecord]:
    """Quantize every linear layer of the blocks in place; returns the per-layer log."""
    adapter.model.eval()
    if config.method == "rtn":
        return quantize_rtn(adapter, config, progress)
    if calib is None:
        raise QrobustError("GPTQ needs calibration data: pass --calib (a file, 'stdlib' or 'random')")
    return quantize_gptq(adapter, config, calib, progress, config.batch_size, timer)
