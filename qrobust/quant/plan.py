"""Per-layer bit-width plans: which layer gets which bits and group size.

Accepted forms: {"layer": bits}, {"layer": {"bits": b, "group_size": g}}, or the versioned
object hawq writes, {"version": 1, "layers": {...}, ...}.
"""
from __future__ import annotations

import json
from pathlib import Path

from qrobust.errors import QrobustError
from qrobust.quant.grid import SUPPORTED_BITS, QuantSpec


def parse_plan(data: object, default: QuantSpec, source: str = "plan") -> dict[str, QuantSpec]:
    if isinstance(data, dict) and "layers" in data:
        if data.get("format") == "qrobust-plan" and data.get("version") != 1:
            raise QrobustError(f"{source} has plan version {data.get('version')}; this qrobust reads version 1")
        data = data["layers"]
    if not isinstance(data, dict) or not data:
        raise QrobustError(f"{source} must map layer names to bits, e.g. {{\"model.layers.0.mlp.down_proj\": 4}}")
    specs = {}
    for name, entry in data.items():
        if isinstance(entry, dict):
            bits, group_size = entry.get("bits"), entry.get("group_size", default.group_size)
        else:
            bits, group_size = entry, default.group_size
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            supported = ", ".join(map(str, SUPPORTED_BITS))
            raise QrobustError(f"{source}: layer {name} has bits {bits!r}; supported: {supported}")
        if not isinstance(group_size, int) or isinstance(group_size, bool):
            raise QrobustError(f"{source}: layer {name} has group_size {group_size!r}; use an integer or -1")
        specs[name] = QuantSpec(bits=bits, group_size=group_size, sym=default.sym)
    return specs


def load_plan(path: str | Path, default: QuantSpec) -> dict[str, QuantSpec]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise QrobustError(f"plan file {path} does not exist: make one with `qrobust plan` or fix the path") from None
    except json.JSONDecodeError as e:
        raise QrobustError(f"plan file {path} is not valid JSON ({e.msg} at line {e.lineno}): regenerate it") from None
    return parse_plan(data, default, source=f"plan file {path}")


def check_plan_layers(plan: dict[str, QuantSpec], layer_names: list[str], source: str = "plan") -> None:
    unknown = sorted(set(plan) - set(layer_names))
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise QrobustError(
            f"{source} names layers the model does not have: {shown} (the model's layers look like {layer_names[0]})"
        )
