"""The report's degradation section: KL, top-1 agreement, solution likelihood and flips per config,
seeds averaged per problem, AR and diffusion side by side with pass@1."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.metrics import bootstrap_mean
from qrobust.degradation import LOSS_METRIC, flips
from qrobust.plotting import pyplot, save
from qrobust.precision import BASELINE_LABELS, is_baseline

COMPARABLE = (
    "**What is comparable between the two kinds.** Both likelihood figures are nats per predicted token "
    "of the same reference solutions, conditioned on the same prompts, under each model's own objective: "
    "AR `solution_nll` is the exact teacher-forced NLL per solution token; diffusion `solution_nelbo` is the "
    "masked-diffusion negative ELBO per solution token (an upper bound on its NLL) over a fixed set of masks "
    "that every config of the model shares. KL(full precision ‖ quantized) and top-1 agreement are measured "
    "at the positions each model predicts: every solution token for AR, the masked solution positions for "
    "diffusion, whose context is partly masked. So the *relative* likelihood increase "
    "(q − fp)/fp and the KL per predicted token are the like-for-like degradation measures; absolute "
    "levels are not (a bound against an exact value, and a diffusion position is predicted from less "
    "context, so its distribution is broader and its KL per position has another scale). Flips and "
    "pass@1 compare generated programs, which the two kinds produce by different samplers."
)


def _seed_mean(recs: list[dict], bench: str, field: str) -> tuple[list[str], np.ndarray]:
    """Per-problem values of `field`, averaged over the configs' seeds (problems all seeds share)."""
    per = [dict(zip(r["degradation"][bench]["per_problem"]["task_id"], r["degradation"][bench]["per_problem"][field]))
           for r in recs]
    tasks = sorted(set.intersection(*(set(p) for p in per)))
    return tasks, np.array([np.mean([p[t] for p in per]) for t in tasks])


def degradation_table(records: list[dict]) -> pd.DataFrame:
    """One row per model × method × bits × benchmark: every metric with its 95% CI over problems."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("degradation"):
            j = r["job"]
            groups.setdefault((j["model"], j["method"], j["bits"]), []).append(r)
    passed_base = {(r["job"]["model"], r["job"]["seed"]): r["benchmarks"] for r in records
                   if is_baseline(r["job"]["method"])}
    rows = []
    for (model, method, bits), recs in groups.items():
        kind = recs[0]["kind"]
        for bench in recs[0]["degradation"]:
            row = {"model": model, "kind": kind, "method": method, "bits": bits, "benchmark": bench,
                   "seeds": len(recs), "problems": recs[0]["degradation"][bench]["problems"]}
            _, loss = _seed_mean(recs, bench, "loss")
            fields = {LOSS_METRIC[kind]: loss}
            if not is_baseline(method):
                _, base_loss = _seed_mean(recs, bench, "baseline_loss")
                fields.update(kl=_seed_mean(recs, bench, "kl")[1],
                              top1_agreement=_seed_mean(recs, bench, "top1_agreement")[1], delta=loss - base_loss)
            for name, values in fields.items():
                e = bootstrap_mean(values)
                row.update({name: e.value, f"{name}_low": e.low, f"{name}_high": e.high})
            if is_baseline(method):
                row.update(kl=0.0, kl_low=0.0, kl_high=0.0, top1_agreement=1.0, top1_agreement_low=1.0,
                           top1_agreement_high=1.0, relative=0.0, relative_low=0.0, relative_high=0.0)
            else:
                scale = float(np.mean(base_loss))
                row.update(relative=row["delta"] / scale, relative_low=row["delta_low"] / scale,
                           relative_high=row["delta_high"] / scale)
            p99 = [r["degradation"][bench]["metrics"]["kl_p99"] for r in recs]
            row.update({f"kl_p99{s}": float(np.mean([p[k] for p in p99])) for s, k in
                        (("", "value"), ("_low", "ci_low"), ("_high", "ci_high"))})
            fl = [flips(passed_base[(model, r["job"]["seed"])][bench]["passed"], r["benchmarks"][bench]["passed"])
                  for r in recs if (model, r["job"]["seed"]) in passed_base and bench in r.get("benchmarks", {})
                  and bench in passed_base[(model, r["job"]["seed"])]]
            if fl and not is_baseline(method):
                row.update(pass_to_fail=float(np.mean([f["pass_to_fail"]["value"] for f in fl])),
                           fail_to_pass=float(np.mean([f["fail_to_pass"]["value"] for f in fl])),
                           flip_problems=fl[0]["problems"], mcnemar_p=fl[0]["p_value"])
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values(["benchmark", "model", "method", "bits"]).reset_index(drop=True)


def _x(bits: float) -> float:
    return 5.0 if bits == 16 else bits


def plot_degradation_metrics(table: pd.DataFrame, summary: pd.DataFrame, bench: str, path: Path) -> None:
    """KL, relative solution-likelihood increase and pass@1 vs bits, AR solid and diffusion dashed, 95% CI bands."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    t = table[table.benchmark == bench]
    for (kind, method), g in t[~t.method.isin(BASELINE_LABELS)].groupby(["kind", "method"]):
        g = g.sort_values("bits")
        style = "-" if kind == "ar" else "--"
        for ax, col, scale in ((axes[0], "kl", 1), (axes[1], "relative", 100)):
            line, = ax.plot(g.bits, g[col] * scale, style, marker="o", label=f"{kind} · {method}")
            ax.fill_between(g.bits, g[f"{col}_low"] * scale, g[f"{col}_high"] * scale, color=line.get_color(),
                            alpha=0.2)
        s = summary[(summary.kind == kind) & (summary.method.isin([method, *BASELINE_LABELS]))].sort_values("bits")
        if f"{bench}_pass1" in s:
            xs = [_x(b) for b in s.bits]
            line, = axes[2].plot(xs, s[f"{bench}_pass1"], style, marker="o", label=f"{kind} · {method}")
            axes[2].fill_between(xs, s[f"{bench}_low"], s[f"{bench}_high"], color=line.get_color(), alpha=0.2)
    quantized = sorted(b for b in t.bits.unique() if b != 16)
    for ax in axes[:2]:
        ax.set_xticks(quantized)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(fp ‖ quantized), nats per predicted token")
    axes[1].set_ylabel("solution likelihood increase (q − fp)/fp, %")
    axes[2].set_ylabel(f"{bench} pass@1")
    axes[2].set_xticks([2, 3, 4, 5], ["2", "3", "4", "fp"])
    for ax in axes:
        ax.set_xlabel("bits")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{bench}: degradation vs own full-precision baseline (AR solid, diffusion dashed; 95% CI)")
    save(fig, path)


def degradation_section(run: Path, records: list[dict], summary: pd.DataFrame, config: dict,
                        md) -> list[str]:
    """Markdown lines (and the plots they show) for the metrics of qrobust.degradation."""
    table = degradation_table(records)
    if table.empty:
        return []
    table.to_csv(run / "degradation.csv", index=False)
    gen = min([x for x in (config.get("limit"), config.get("gen_limit")) if x is not None], default=None)
    scope = (f"pass@1 and flips over the first {gen} problems of each benchmark" if gen else
             "pass@1 and flips over every problem")
    shown = ["model", "kind", "method", "bits", "seeds", "problems", "kl", "kl_low", "kl_high", "kl_p99",
             "top1_agreement", "relative", "relative_low", "relative_high", "pass_to_fail", "fail_to_pass", "mcnemar_p"]
    text = ["## Degradation on the benchmark problems", "",
            f"Forward-pass metrics over every problem within the limit ({config.get('limit') or 'none'}); {scope} "
            "(`--gen-limit all` or a larger `--gen-limit` widens them). Context: the last "
            f"{config.get('metrics_context') or 'all that fit'} prompt tokens, the first "
            f"{config.get('metrics_solution') or 'all that fit'} solution tokens; diffusion: "
            f"{config.get('metrics_masks', 2)} fixed masks per problem. Per-problem values are averaged over "
            "seeds, then bootstrapped over problems (95% CI); `relative` is (q − fp)/fp of the solution "
            "likelihood, paired by problem; flips are mean counts over seeds, McNemar p of the first seed. "
            "All figures: `degradation.csv`.", "", COMPARABLE, ""]
    for bench in table.benchmark.unique():
        t = table[table.benchmark == bench]
        cols = [c for c in shown if c in t.columns]
        plot_degradation_metrics(table, summary, bench, run / f"degradation_{bench}.png")
        text += [f"### {bench}", "", md(t[cols].reset_index(drop=True)), "",
                 f"![{bench} degradation](degradation_{bench}.png)", ""]
    return text
