"""Merge the runs of benchmarks/ab_gpu.sh: one file per engine_gpu.py part, rows tagged by library.

ab_gpu.sh runs engine_gpu.py alternately with a base copy of the library and with the working
tree, into directories named <library><repeat> (base1, tree1, base2, tree2, ...). This writes
ab_<part>.json per part (every row with its `library` and `repeat`) and prints what decides an
A/B: for the variants part each row's throughput against bf16 "today" of its own run, for the
products part the tree's speed over the base's per product (median over repeats).

    python benchmarks/ab_merge.py RUNS_DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

RUN = re.compile(r"^(base|tree)(\d+)$")


def merge(runs: Path) -> dict[str, dict]:
    """{part: {**first run's fields, "runs": [...], "rows": [tagged rows of every run]}}."""
    merged: dict[str, dict] = {}
    for run in sorted(p for p in runs.iterdir() if p.is_dir() and RUN.match(p.name)):
        library, repeat = RUN.match(run.name).groups()
        for path in sorted(run.glob("engine_*.json")):
            data = json.loads(path.read_text())
            part = data.get("part", path.stem.removeprefix("engine_"))
            entry = merged.setdefault(part, {**{k: v for k, v in data.items() if k != "rows"}, "runs": [], "rows": []})
            entry["runs"].append({"library": library, "repeat": int(repeat), "seconds": data.get("seconds")})
            entry["rows"] += [{**row, "library": library, "repeat": int(repeat)} for row in data["rows"]]
    return merged


def variant_ratios(rows: list[dict]) -> dict[tuple, dict[tuple, float]]:
    """(bits, batch, variant) → {(library, repeat): tokens/s over that run's bf16 "today" at that batch}."""
    today = {(r["library"], r["repeat"], r["batch"]): r["tokens_per_s"] for r in rows
             if r["bits"] == 16 and r["variant"] == "today"}
    out: dict[tuple, dict[tuple, float]] = {}
    for r in rows:
        base = today.get((r["library"], r["repeat"], r["batch"]))
        if base:
            cell = out.setdefault((r["bits"], r["batch"], r["variant"]), {})
            cell[r["library"], r["repeat"]] = r["tokens_per_s"] / base
    return out


def product_speedups(rows: list[dict]) -> dict[tuple, float]:
    """(layer, bits, rows, kernel) → the base's median µs over the tree's: > 1 where the tree is faster."""
    times: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        key = (r["layer"], r["bits"], r["rows"], r["kernel"])
        times.setdefault(key, {}).setdefault(r["library"], []).append(r["us_packed"])
    return {key: statistics.median(t["base"]) / statistics.median(t["tree"])
            for key, t in times.items() if t.get("base") and t.get("tree")}


def summary(merged: dict[str, dict]) -> list[str]:
    lines = []
    if "variants" in merged:
        ratios = variant_ratios(merged["variants"]["rows"])
        lines.append("variants: tokens/s against bf16 today of the same run (base runs | tree runs)")
        for (bits, batch, variant), by_run in sorted(ratios.items(), key=lambda kv: (-kv[0][0], -kv[0][1], kv[0][2])):
            cells = {lib: " ".join(f"{v:.3f}" for (lb, _), v in sorted(by_run.items()) if lb == lib)
                     for lib in ("base", "tree")}
            lines.append(f"  {bits:>2} bits batch {batch:>3} {variant:<32} {cells['base']:<14} | {cells['tree']}")
    if "products" in merged:
        lines.append("products: the tree's speed over the base's (median over repeats)")
        for (layer, bits, rows, kernel), s in sorted(product_speedups(merged["products"]["rows"]).items()):
            lines.append(f"  {layer:>12} {bits} bits {rows:>5} rows {kernel:<32} {s:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", default="", help="what base and tree are, kept in every file")
    args = parser.parse_args()
    merged = merge(args.runs)
    if not merged:
        raise SystemExit(f"ab_merge.py: no base<N>/ or tree<N>/ runs with engine_*.json in {args.runs}")
    args.out.mkdir(parents=True, exist_ok=True)
    for part, data in merged.items():
        (args.out / f"ab_{part}.json").write_text(json.dumps({**data, "note": args.note}, indent=1))
    print("\n".join(summary(merged)))


if __name__ == "__main__":
    main()
