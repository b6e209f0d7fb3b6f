"""Where a packed product's time goes inside the kernel, from Nsight Compute's counters (on a
GPU where ncu can read them; some virtualized machines refuse): this runs the default-tiling
packed matmul and the bf16 nn.Linear of each Qwen3-1.7B layer shape at the given rows, a few
calls each, for ncu to profile, and with --summarize turns ncu's CSV into one row per launch of
the metrics that say why a program waits (warp stall reasons per issued instruction, issue
rate, warps per SM, DRAM busy).

    ncu --clock-control none --csv --page raw --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats -k regex:'_split_matmul|gemm|gemv|nvjet|cutlass' \
        python benchmarks/product_profile.py --rows 32,64 --bits 4 > raw.csv
    python benchmarks/product_profile.py --summarize raw.csv --out "$OUT"/product_profile.json
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re

import torch
from torch import nn

from engine_gpu import Plan, config, layer_shapes, packed_like

# Nsight Compute metric names (sm_90) and their short names; besides these, every warp stall reason
# (cycles a warp waits per issued instruction, the ..._issue_stalled_<reason>_per_issue_active columns)
METRICS = (("gpu__time_duration.sum", "us"),
           ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy_pct"),
           ("sm__inst_issued.avg.pct_of_peak_sustained_active", "issue_active_pct"),
           ("dram__cycles_active.avg.pct_of_peak_sustained_elapsed", "dram_pct"),
           ("launch__registers_per_thread", "registers"),
           ("launch__grid_size", "programs"),
           ("smsp__inst_executed.sum", "instructions"),
           ("smsp__issue_active.avg.per_cycle_active", "issued_per_cycle"),
           ("smsp__average_warp_latency_per_inst_issued.ratio", "cycles_per_instruction"),
           ("sm__warps_active.avg.per_cycle_active", "warps_per_sm"))
STALL = re.compile(r"smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio")


def number(text: str) -> float | None:
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def run(rows: tuple[int, ...], bits_list: tuple[int, ...], calls: int) -> None:
    """The products ncu profiles: for each shape, bf16 then each width, `calls` calls at each row count."""
    for name, (K, N) in layer_shapes(config(Plan(), "ar")).items():
        dense = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        layers = [dense] + [packed_like(dense, bits, 128) for bits in bits_list]
        with torch.no_grad():
            for m in rows:
                x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
                for layer in layers:
                    for _ in range(calls):
                        layer(x)
        torch.cuda.synchronize()
        print(f"{name}: {K} -> {N}", flush=True)


def summarize(path: str) -> list[dict]:
    """ncu --csv --page raw output (a header row, a row of units, one row per kernel launch) → a row
    per launch with METRICS' short names (time in µs) and its stall reasons."""
    text = open(path).read()
    text = text[text.index('"ID"'):]  # ncu's own lines come first
    table = list(csv.DictReader(io.StringIO(text)))
    units, table = table[0], table[1:]  # the second row holds the units
    out = []
    for r in table:
        row = {"kernel": r["Kernel Name"][:60], "grid": r.get("Grid Size", ""), "block": r.get("Block Size", "")}
        for metric, short in METRICS:
            row[short] = number(r.get(metric, ""))
        if row["us"] is not None:
            row["us"] /= {"ns": 1e3, "nsecond": 1e3, "us": 1.0, "usecond": 1.0, "ms": 1e-3, "msecond": 1e-3}[
                units.get("gpu__time_duration.sum", "ns")]
        for column, value in r.items():
            reason = STALL.fullmatch(column or "")
            if reason and number(value):
                row["stall_" + reason.group(1)] = number(value)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,64")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--summarize", help="an ncu --csv --page raw file to summarize")
    parser.add_argument("--out", default="product_profile.json")
    args = parser.parse_args()
    if args.summarize:
        rows = summarize(args.summarize)
        with open(args.out, "w") as f:
            json.dump({"part": "product_profile", "rows": rows}, f, indent=1)
        keys = ["us", "programs", "warps_per_sm", "issued_per_cycle", "cycles_per_instruction", "dram_pct"]
        for r in rows:
            stalls = sorted(((v, k[6:]) for k, v in r.items() if k.startswith("stall_") and v), reverse=True)[:4]
            print(r["kernel"][:36], r["grid"], " ".join(f"{k}={r[k]:.3g}" for k in keys if r[k] is not None),
                  "stalls:", ", ".join(f"{k} {v:.2f}" for v, k in stalls))
    else:
        run(tuple(int(v) for v in args.rows.split(",")), tuple(int(v) for v in args.bits.split(",")), args.calls)


if __name__ == "__main__":
    main()
