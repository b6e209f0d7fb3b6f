"""Make a mixed-precision plan: traces → sensitivities → allocation → a versioned plan file."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hawq.allocate import Allocation, Budget, allocate, layer_bytes
from hawq.sensitivity import LayerSensitivity, measure_sensitivities
from hawq.trace import hutchinson_traces
from qrobust.errors import QrobustError

PLAN_FORMAT, PLAN_VERSION = "qrobust-plan", 1


@dataclass
class PlanConfig:
    bits: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 128
    sym: bool = True
    sensitivity: str = "hawq"  # "hawq" (trace-weighted) or "proxy" (GPTQ layer objective)
    quantizer: str = "gptq"  # Q_b inside the sensitivity: "gptq" or "rtn"
    probes: int = 64
    rel_tol: float = 0.05
    trace_batches: int = 4
    probes_per_backward: int = 1  # Hutchinson probes sharing one forward and first backward (hawq.trace)
    same_bits_per_block: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sensitivity not in ("hawq", "proxy"):
            raise QrobustError(f"unknown sensitivity {self.sensitivity!r}: use hawq or proxy")
        if self.quantizer not in ("gptq", "rtn"):
            raise QrobustError(f"unknown quantizer {self.quantizer!r}: use gptq or rtn")


def analyse(adapter, calib: torch.Tensor, config: PlanConfig, progress: bool = True) -> list[LayerSensitivity]:
    """Traces (unless the proxy is asked for) and per-bit sensitivities of every layer."""
    traces = None
    if config.sensitivity == "hawq":
        batches = list(calib[:config.trace_batches * 2].split(2))
        traces = hutchinson_traces(adapter, batches, max_probes=config.probes, rel_tol=config.rel_tol,
                                   seed=config.seed, progress=progress, probes_per_backward=config.probes_per_backward)
    return measure_sensitivities(adapter, calib, list(config.bits), config.group_size, traces, config.quantizer,
                                 config.sym)


def costs_of(sens: list[LayerSensitivity], config: PlanConfig) -> dict[str, dict[int, float]]:
    if config.sensitivity == "hawq":
        return {s.name: {b: s.omega(b) for b in config.bits} for s in sens}
    return {s.name: dict(s.proxy) for s in sens}


def sizes_of(sens: list[LayerSensitivity], config: PlanConfig) -> dict[str, dict[int, float]]:
    return {s.name: {b: layer_bytes(s.n_params, s.out_features, s.in_features, b, config.group_size)
                     for b in config.bits} for s in sens}


def solve(sens, config: PlanConfig, budget: Budget, latency=None, fixed=None) -> Allocation:
    return allocate(costs_of(sens, config), {s.name: s.n_params for s in sens}, budget, sizes_of(sens, config),
                    latency, {s.name: s.block for s in sens}, config.same_bits_per_block, fixed)


def plan_document(adapter, model_name: str, sens, config: PlanConfig, budget: Budget, alloc: Allocation,
                  calibration: dict) -> dict:
    return {
        "format": PLAN_FORMAT, "version": PLAN_VERSION,
        "model": {"name": model_name, "kind": adapter.kind, "num_layers": adapter.num_layers,
                  "quantizable_layers": len(sens)},
        "config": asdict(config), "budget": budget.describe(), "calibration": calibration,
        "result": {"avg_bits": alloc.avg_bits, "total_bytes": alloc.total_bytes, "objective": alloc.objective},
        "layers": {n: {"bits": b, "group_size": config.group_size} for n, b in alloc.bits.items()},
        "sensitivities": {s.name: {"block": s.block, "n_params": s.n_params, "shape": [s.out_features, s.in_features],
                                   "trace": s.trace,
                                   "trace_stderr": s.trace_stderr,
                                   "omega": {str(b): s.omega(b) for b in config.bits} if s.trace is not None else None,
                                   "proxy": {str(b): v for b, v in s.proxy.items()}} for s in sens},
    }


def read_plan(path: str | Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QrobustError(f"plan file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise QrobustError(f"plan file {path} is not valid JSON ({e.msg}): regenerate it with `qrobust plan`") from None
    if doc.get("format") == PLAN_FORMAT and doc.get("version") != PLAN_VERSION:
        raise QrobustError(f"plan file {path} has version {doc.get('version')}; "
                           f"this qrobust reads version {PLAN_VERSION}")
    return doc


def to_gptqmodel_dynamic(plan: dict) -> dict:
    """Per-module overrides in GPTQModel's `dynamic` form (exact names, one key per layer)."""
    return {f"+:^{re.escape(n)}$": {"bits": v["bits"], "group_size": v["group_size"]}
            for n, v in plan["layers"].items()}


def write_frontier(rows: list[dict], agreement: dict[int, float] | None, out_dir: str | Path, title: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if agreement is not None:
        (out / "agreement.csv").write_text("bits,spearman_hawq_vs_proxy\n" +
                                           "".join(f"{b},{r:.4f}\n" for b, r in agreement.items()))
    from qrobust.plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    opt = [r for r in rows if r["kind"] == "hawq"]
    uni = [r for r in rows if r["kind"] == "uniform"]
    ax.plot([r["total_bytes"] / 2**20 for r in opt], [r["sensitivity"] for r in opt], "o-", ms=3, label="hawq optimum")
    ax.plot([r["total_bytes"] / 2**20 for r in uni], [r["sensitivity"] for r in uni], "s", color="C3", label="uniform")
    for r in uni:
        ax.annotate(f"{int(r['avg_bits'])}-bit", (r["total_bytes"] / 2**20, r["sensitivity"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("quantized weights (MiB, with scales and zeros)")
    ax.set_ylabel("total sensitivity Σ Ω")
    ax.set_title(title)
    ax.legend()
    save(fig, out / "frontier.png")
    return out
