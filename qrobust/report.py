"""`qrobust report`: a Markdown report with plots from a sweep's results table and config files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import ttest_rel

from harness.metrics import bootstrap_mean, mcnemar_exact
from qrobust.errors import QrobustError
from qrobust.plotting import pyplot, save
from qrobust.precision import BASELINE_LABELS, is_baseline
from qrobust.report_degradation import degradation_section


def load_records(run_dir: Path) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in sorted((run_dir / "configs").glob("*.json"))]
    return [r for r in recs if r["status"] == "ok"]


def _group(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records by (model, method, bits), seeds together."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        j = r["job"]
        out.setdefault((j["model"], j["method"], j["bits"]), []).append(r)
    return out


def per_problem(recs: list[dict], bench: str) -> dict[str, float]:
    """Pass rate of each problem averaged over seeds."""
    tasks = recs[0]["benchmarks"][bench]["passed"].keys()
    return {t: float(np.mean([r["benchmarks"][bench]["passed"][t] for r in recs])) for t in tasks}


def per_window(recs: list[dict]) -> np.ndarray:
    return np.mean([r["likelihood"]["per_window"] for r in recs], axis=0)


def summary_table(records: list[dict], benchmarks: list[str]) -> pd.DataFrame:
    rows = []
    for (model, method, bits), recs in _group(records).items():
        row = {"model": model, "kind": recs[0]["kind"], "method": method, "bits": bits,
               "avg_bits": float(np.mean([r.get("avg_bits", bits) for r in recs])), "seeds": len(recs)}
        lik = bootstrap_mean(per_window(recs))
        row.update(likelihood=lik.value, likelihood_low=lik.low, likelihood_high=lik.high,
                   likelihood_kind=recs[0]["likelihood"]["kind"])
        for b in benchmarks:
            est = bootstrap_mean(np.array(list(per_problem(recs, b).values())))
            gens = [r["benchmarks"][b]["summary"].get("generation") or {} for r in recs]
            row.update({f"{b}_pass1": est.value, f"{b}_low": est.low, f"{b}_high": est.high,
                        f"{b}_tok_s": np.mean([g.get("tokens_per_second") or np.nan for g in gens]),
                        f"{b}_peak_mib": np.mean([(g.get("peak_memory_bytes") or np.nan) / 2**20 for g in gens])})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["model", "method", "bits"]).reset_index(drop=True)


def paired_deltas(records: list[dict], benchmarks: list[str]) -> pd.DataFrame:
    """Every config against its own model's full-precision baseline, on the same problems/windows."""
    groups = _group(records)
    baselines = {model: recs for (model, method, _), recs in groups.items() if is_baseline(method)}
    rows = []
    for (model, method, bits), recs in groups.items():
        base = baselines.get(model)
        if is_baseline(method) or base is None:
            continue
        a, b = per_window(base), per_window(recs)
        d = bootstrap_mean(b - a)
        p = float(ttest_rel(b, a).pvalue) if len(a) > 1 and np.any(b != a) else 1.0
        rows.append({"model": model, "method": method, "bits": bits, "metric": recs[0]["likelihood"]["kind"],
                     "baseline": float(a.mean()), "value": float(b.mean()), "delta": d.value, "ci_low": d.low,
                     "ci_high": d.high, "relative": d.value / float(a.mean()), "p_value": p,
                     "test": "paired t over windows"})
        for bench in benchmarks:
            pa, pb = per_problem(base, bench), per_problem(recs, bench)
            tasks = sorted(set(pa) & set(pb))
            va, vb = np.array([pa[t] for t in tasks]), np.array([pb[t] for t in tasks])
            d = bootstrap_mean(vb - va)
            sa = base[0]["benchmarks"][bench]["passed"]
            same_seed = [r for r in recs if r["job"]["seed"] == base[0]["job"]["seed"]]
            sb = (same_seed or recs)[0]["benchmarks"][bench]["passed"]
            only_a = sum(sa[t] and not sb[t] for t in tasks)
            only_b = sum(sb[t] and not sa[t] for t in tasks)
            rows.append({"model": model, "method": method, "bits": bits, "metric": f"{bench} pass@1",
                         "baseline": float(va.mean()), "value": float(vb.mean()), "delta": d.value, "ci_low": d.low,
                         "ci_high": d.high, "relative": d.value / va.mean() if va.mean() else np.nan,
                         "p_value": mcnemar_exact(only_a, only_b), "test": "exact McNemar (first seed)"})
    return pd.DataFrame(rows)


def recommend(table: pd.DataFrame, benchmarks: list[str], tolerance: float) -> pd.DataFrame:
    """Per model: the config with the fewest average bits whose held-out loss is within
    `tolerance` (relative) of full precision and whose pass@1 drops by at most `tolerance`."""
    rows = []
    for model, t in table.groupby("model"):
        base = t[t.method.isin(BASELINE_LABELS)]
        if base.empty:
            continue
        base = base.iloc[0]
        ok = t[~t.method.isin(BASELINE_LABELS) & (t.likelihood <= base.likelihood * (1 + tolerance))]
        for b in benchmarks:
            ok = ok[ok[f"{b}_pass1"] >= base[f"{b}_pass1"] - tolerance]
        if ok.empty:
            rows.append({"model": model, "recommendation": f"none: keep full precision ({base.method})",
                         "avg_bits": float(base.bits)})
            continue
        best = ok.sort_values(["avg_bits", "likelihood"]).iloc[0]
        rows.append({"model": model, "recommendation": f"{best.method} {best.bits}-bit", "avg_bits": best.avg_bits,
                     "likelihood": best.likelihood, "baseline_likelihood": base.likelihood})
    return pd.DataFrame(rows)


def _x(bits: float) -> float:
    return 5.0 if bits >= 16 else bits  # full precision (16 or 32 bits) drawn at the right edge, labelled "fp"


def plot_metric(table: pd.DataFrame, col: str, low: str, high: str, ylabel: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (kind, method), t in table[~table.method.isin(BASELINE_LABELS)].groupby(["kind", "method"]):
        t = t.sort_values("bits")
        base = table[(table.kind == kind) & table.method.isin(BASELINE_LABELS)]
        t = pd.concat([t, base])
        xs = [_x(b) for b in t.bits]
        ax.errorbar(xs, t[col], yerr=[t[col] - t[low], t[high] - t[col]], marker="o", capsize=3,
                    ls="-" if kind == "ar" else "--", label=f"{kind} · {method}")
    ax.set_xticks([2, 3, 4, 5], ["2", "3", "4", "fp"])
    ax.set_xlabel("bits")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    save(fig, path)


def plot_degradation(table: pd.DataFrame, deltas: pd.DataFrame, path: Path) -> None:
    """Relative held-out loss increase with paired 95% CIs (same windows, same masks)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    kinds = dict(zip(table.model, table.kind))
    lik = deltas[deltas.metric.isin(["nll", "neg_elbo"])]
    for (model, method), t in lik.groupby(["model", "method"]):
        t = t.sort_values("bits")
        kind = kinds[model]
        ax.errorbar(t.bits, t.delta / t.baseline * 100,
                    yerr=[(t.delta - t.ci_low) / t.baseline * 100, (t.ci_high - t.delta) / t.baseline * 100],
                    marker="o", capsize=3, ls="-" if kind == "ar" else "--", label=f"{kind} · {method}")
    ax.set_xlabel("bits")
    ax.set_ylabel("held-out loss increase vs own baseline (%)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("relative degradation: diffusion (dashed) vs AR (solid), paired 95% CI")
    ax.legend(fontsize=7)
    save(fig, path)


def plot_cost(table: pd.DataFrame, benchmarks: list[str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    b = benchmarks[0]
    for (kind, method), t in table.groupby(["kind", "method"]):
        t = t.sort_values("bits")
        style, label = "o-" if kind == "ar" else "s--", f"{kind} · {method}"
        axes[0].plot([_x(x) for x in t.bits], t[f"{b}_tok_s"], style, label=label)
        axes[1].plot([_x(x) for x in t.bits], t[f"{b}_peak_mib"], style, label=label)
    for ax, label in zip(axes, ("tokens / s", "peak memory (MiB)")):
        ax.set_xticks([2, 3, 4, 5], ["2", "3", "4", "fp"])
        ax.set_xlabel("bits")
        ax.set_ylabel(f"{label} ({b} generation)")
    axes[0].legend(fontsize=7)
    save(fig, path)


def plot_frontiers(run_dir: Path, path: Path) -> bool:
    from hawq.allocate import layer_bytes, pareto_frontier

    plans = {}
    for p in sorted((run_dir / "plans").glob("*.json")) if (run_dir / "plans").exists() else []:
        doc = json.loads(p.read_text())
        plans.setdefault(doc["model"]["name"], doc)
    if not plans:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (model, doc) in enumerate(plans.items()):
        sens, gs = doc["sensitivities"], doc["config"]["group_size"]
        bits = [int(b) for b in doc["config"]["bits"]]
        costs = {n: {int(b): v for b, v in s["omega"].items()} for n, s in sens.items()}
        n = {k: s["n_params"] for k, s in sens.items()}
        sizes = {k: {b: layer_bytes(s["n_params"], *s["shape"], b, gs) for b in bits} for k, s in sens.items()}
        rows = pareto_frontier(costs, n, sizes, bits)
        opt = [r for r in rows if r["kind"] == "hawq"]
        uni = [r for r in rows if r["kind"] == "uniform"]
        for points, style, name in ((opt, "-", "hawq"), (uni, "s", "uniform")):
            ax.plot([r["total_bytes"] / 2**20 for r in points], [r["sensitivity"] for r in points], style,
                    color=f"C{i}", label=f"{model} {name}")
    ax.set_yscale("log")
    ax.set_xlabel("quantized weights (MiB)")
    ax.set_ylabel("total sensitivity Σ Ω")
    ax.legend(fontsize=7)
    save(fig, path)
    return True


def _md(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:{floatfmt}}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def probe_section(run: Path) -> list[str]:
    """The probe results of a sweep run with --probe: overall balanced accuracy per model."""
    summaries = sorted((run / "probe").glob("*/summary.csv")) if (run / "probe").exists() else []
    if not summaries:
        return []
    text = ["## Probe: can the model tell that it is quantized?", "",
            "Accuracy on class-balanced sets (each quantized config with the full-precision answers to the same "
            "problems); the majority-class baseline is 0.5 by construction. Details: `probe/MODEL/probe.md`.", ""]
    for path in summaries:
        s = pd.read_csv(path)
        s = s[s.set == "balanced:all"][["question", "shots", "n", "accuracy", "ci_low", "ci_high",
                                        "majority_baseline", "parse_failure_rate", "task_accuracy"]]
        rel = path.parent.relative_to(run)
        text += [f"### {path.parent.name}", "", _md(s.reset_index(drop=True)), "", f"![probe]({rel}/probe.png)", ""]
    return text


def attribution_section(run: Path) -> list[str]:
    """Agreement of each quantized config's attribution with full precision (sweep --attribution)."""
    path = run / "attribution" / "attribution.csv"
    if not path.exists():
        return []
    df = pd.read_csv(path)
    df = df[df.metric.isin(["spearman", "jaccard@20", "top1_same", "gradient_cosine"])]
    table = df.pivot_table(index=["model", "method", "bits"], columns="metric", values="value").reset_index()
    return ["## Attribution: does the quantized model rely on the same training data?", "",
            "Per-query agreement with the full-precision model's influence ranking over the same documents "
            "(mean over queries) and the cosine between the two models' gradient features per document "
            "(mean over documents); CIs in `attribution/attribution.csv`. `<baseline>-reseeded` (e.g. bf16-reseeded) "
            "is full precision with another projection seed: the noise floor of the method itself.", "",
            _md(table), ""]


def lm_eval_section(run: Path) -> list[str]:
    """lm-eval runs written under the sweep (`qrobust lm-eval --out RUN/lm-eval/NAME`): one row per config."""
    paths = sorted((run / "lm-eval").glob("*/results.csv")) if (run / "lm-eval").exists() else []
    if not paths:
        return []
    df = pd.concat([pd.read_csv(p) for p in paths])
    table = df.pivot_table(index=["model", "method", "bits"], columns=["benchmark", "metric"], values="value")
    table.columns = [f"{b} {m}" for b, m in table.columns]
    return ["## lm-eval tasks", "", "From `qrobust lm-eval` (lm-eval's own files and per-metric CIs in "
            "`lm-eval/NAME/`); diffusion likelihoods are Monte-Carlo ELBO bounds.", "",
            _md(table.reset_index()), ""]


def report(run_dir: str | Path, tolerance: float = 0.02) -> Path:
    run = Path(run_dir)
    if not (run / "configs").exists():
        raise QrobustError(f"{run} holds no sweep results: run `qrobust sweep --out {run}` first")
    records = load_records(run)
    if not records:
        raise QrobustError(f"{run} has no finished configs yet")
    sweep_info = json.loads((run / "sweep.json").read_text())
    benchmarks = list(sweep_info["config"]["benchmarks"])
    table = summary_table(records, benchmarks)
    deltas = paired_deltas(records, benchmarks)
    rec = recommend(table, benchmarks, tolerance)
    table.to_csv(run / "summary.csv", index=False)
    deltas.to_csv(run / "deltas.csv", index=False)
    figs = []
    for b in benchmarks:
        plot_metric(table, f"{b}_pass1", f"{b}_low", f"{b}_high", f"{b} pass@1 (95% CI)", run / f"pass1_{b}.png")
        figs.append((f"{b} pass@1 vs bits", f"pass1_{b}.png"))
    plot_metric(table, "likelihood", "likelihood_low", "likelihood_high", "held-out loss, nats/token (95% CI)",
                run / "likelihood.png")
    figs.append(("Held-out loss (AR: NLL; diffusion: negative ELBO) vs bits", "likelihood.png"))
    plot_degradation(table, deltas, run / "degradation.png")
    figs.append(("Relative degradation vs each model's own full-precision baseline", "degradation.png"))
    if benchmarks:
        plot_cost(table, benchmarks, run / "latency_memory.png")
        figs.append(("Generation speed and peak memory vs bits", "latency_memory.png"))
    if plot_frontiers(run, run / "frontier.png"):
        figs.append(("hawq Pareto frontier (uniform configs as squares)", "frontier.png"))
    env = sweep_info["environment"]
    failed = [json.loads(p.read_text()) for p in sorted((run / "configs").glob("*.json"))]
    failed = [f for f in failed if f["status"] != "ok"]
    cfg = sweep_info["config"]
    text = [
        "# qrobust sweep report", "",
        f"Models {', '.join(cfg['models'])}; methods {', '.join(cfg['methods'])}; bits {cfg['bits']}; seeds "
        f"{cfg['seeds']}; benchmarks {', '.join(benchmarks) or 'none (held-out loss only)'} (limit {cfg['limit']}); "
        f"group size {cfg['group_size']}.",
        f"Environment: qrobust {env.get('qrobust')} (commit {env.get('commit')}), torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, Python {env.get('python')}, "
        f"device {env.get('gpu', env.get('device'))}, "
        f"{env.get('cpus')} CPUs.", "",
        "Seeds change the calibration windows (and the diffusion masks of the held-out loss); intervals are "
        "bootstrap 95% CIs over problems (pass@1) or held-out windows (loss), seeds pooled.", "",
        "## Recommendation", "",
        f"Smallest config within {tolerance:g} of full precision (relative held-out loss, absolute pass@1):", "",
        _md(rec), "",
        "## Results", "",
        _md(table.drop(columns=[c for c in table.columns if c.endswith(("_tok_s", "_peak_mib"))])), "",
        "## Paired deltas vs each model's own baseline", "", _md(deltas), "",
    ]
    for title, f in figs:
        text += [f"### {title}", "", f"![{title}]({f})", ""]
    text += degradation_section(run, records, table, cfg, _md)
    text += probe_section(run)
    text += attribution_section(run)
    text += lm_eval_section(run)
    if failed:
        text += ["## Failed configs", ""] + [f"- `{f['id']}`: {f['error']}" for f in failed] + [""]
    (run / "report.md").write_text("\n".join(text))
    return run / "report.md"
