"""The sensitivity analysis once per model, calibration set and plan settings, for every budget.

`analyse` (traces and per-width quantization errors) is the expensive part of a plan; the
allocation for a budget takes milliseconds. AnalysisCache keeps each analysis in memory and as a
JSON file named by a key over everything it depends on (model name, its dtype and kind, the
calibration tokens themselves, the plan settings), so a sweep's budgets, and re-runs of it,
share one analysis.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hawq.plan import PlanConfig, analyse
from hawq.sensitivity import LayerSensitivity

CACHE_FORMAT = 1


def analysis_key(adapter, model_name: str, calib: torch.Tensor, config: PlanConfig) -> str:
    tokens = hashlib.sha256(calib.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    dtype = str(next(adapter.model.parameters()).dtype).removeprefix("torch.")
    described = {"format": CACHE_FORMAT, "model": model_name, "kind": adapter.kind, "dtype": dtype,
                 "calibration": {"sha256": tokens, "shape": list(calib.shape)}, "plan": asdict(config)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def sensitivities_to_json(sens: list[LayerSensitivity]) -> list[dict]:
    return [asdict(s) for s in sens]


def sensitivities_from_json(rows: list[dict]) -> list[LayerSensitivity]:
    out = []
    for r in rows:
        r = dict(r)
        r["weight_error"] = {int(b): v for b, v in r["weight_error"].items()}
        r["proxy"] = {int(b): v for b, v in r["proxy"].items()}
        out.append(LayerSensitivity(**r))
    return out


@dataclass
class AnalysisCache:
    """directory None keeps analyses in memory only. `computed` counts analyses actually run."""

    directory: Path | None = None
    memory: dict[str, list[LayerSensitivity]] = field(default_factory=dict)
    computed: int = 0

    def path(self, key: str) -> Path | None:
        return Path(self.directory) / f"{key}.json" if self.directory is not None else None

    def analyse(self, adapter, model_name: str, calib: torch.Tensor, config: PlanConfig,
                calibration: dict | None = None, progress: bool = False) -> list[LayerSensitivity]:
        """hawq.analyse, or its cached result for the same inputs."""
        key = analysis_key(adapter, model_name, calib, config)
        if key in self.memory:
            return self.memory[key]
        path = self.path(key)
        if path is not None and path.exists():
            try:
                doc = json.loads(path.read_text())
                self.memory[key] = sensitivities_from_json(doc["sensitivities"])
                return self.memory[key]
            except (ValueError, KeyError, TypeError):
                pass  # a damaged file is recomputed and replaced
        sens = analyse(adapter, calib, config, progress=progress)
        self.computed += 1
        self.memory[key] = sens
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = {"format": CACHE_FORMAT, "model": model_name, "plan": asdict(config),
                   "calibration": calibration or {}, "sensitivities": sensitivities_to_json(sens)}
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(doc))
            tmp.replace(path)  # atomic: a killed run leaves no half-written analysis
        return sens
