"""One lm-eval run on one qrobust model: lm-eval's own results files plus rows of qrobust's tidy table.

OUT/<model>/results_<time>.json (and samples_<task>_<time>.jsonl with log_samples) are written
by lm-eval's EvaluationTracker, exactly as `lm_eval --output_path OUT` writes them;
OUT/results.csv has one row per config × task × metric with the columns of a sweep's results.csv
(model, kind, method, bits, seed, benchmark, metric, value, ci_low, ci_high, problems); a later run
into the same OUT adds its rows and replaces only those of the same config, task and metric.
`qrobust report` shows them when the run lies under SWEEP/lm-eval/.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qrobust.errors import QrobustError

Z95 = 1.959963984540054  # lm-eval reports a standard error; the CI is the normal ±1.96 SE
PROPORTIONS = {"acc", "acc_norm", "pass@1", "exact_match"}  # their intervals are clipped to [0, 1]


@dataclass
class LmEvalConfig:
    tasks: tuple[str, ...]
    limit: int | float | None = None
    num_fewshot: int | None = None
    gen_kwargs: str | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    bootstrap_iters: int = 1000
    log_samples: bool = True
    include_path: list[str] = field(default_factory=list)
    seed: int = 0


def build_task_manager(config: LmEvalConfig):
    """qrobust's tasks and include_path, plus lm-eval's built-in ones only when a requested task is in neither."""
    from qrobust.lm_eval import qrobust_task_names, task_manager

    ours = set(qrobust_task_names())
    mistyped = [t for t in config.tasks if t.startswith("qrobust_") and t not in ours and not config.include_path]
    if mistyped:
        raise QrobustError(f"unknown lm-eval task(s) {', '.join(mistyped)}: qrobust ships {', '.join(sorted(ours))}")
    manager = task_manager(config.include_path, include_defaults=False)
    if any(t not in manager.all_tasks for t in config.tasks):
        manager = task_manager(config.include_path, include_defaults=True)
    unknown = [t for t in config.tasks if t not in manager.all_tasks]
    if unknown:
        raise QrobustError(f"unknown lm-eval task(s) {', '.join(unknown)}: qrobust ships {', '.join(sorted(ours))}; "
                           "see `python -m qrobust.lm_eval ls tasks` for lm-eval's")
    return manager


def tidy_rows(results: dict, lm) -> list[dict]:
    """One row per task × metric, in the columns of sweep.result_rows."""
    loaded = lm.loaded
    common = {"config_id": f"{loaded.model.replace('/', '--')}__{loaded.method}__{loaded.bits}__s{lm.seed}",
              "model": loaded.model, "kind": lm.kind, "method": loaded.method, "bits": loaded.bits,
              "avg_bits": float(loaded.bits), "seed": lm.seed, "status": "ok", "source": "lm-eval"}
    rows = []
    for task, metrics in results["results"].items():
        n = (results.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            se = metrics.get(f"{name}_stderr,{filt}")
            se = se if isinstance(se, (int, float)) else None
            low, high = (None, None) if se is None else (value - Z95 * se, value + Z95 * se)
            if low is not None and name in PROPORTIONS:
                low, high = max(0.0, low), min(1.0, high)
            rows.append({**common, "benchmark": task, "metric": name if filt == "none" else f"{name},{filt}",
                         "value": float(value), "ci_low": low, "ci_high": high, "stderr": se, "problems": n})
    return rows


ROW_KEY = ["config_id", "benchmark", "metric"]


def merge_rows(path: Path, rows):
    """Write rows into the tidy csv at path, keeping the rows of earlier runs into the same OUT (other
    tasks or models), as lm-eval keeps its timestamped files; a row with the same config, task and
    metric is replaced by the new one."""
    import pandas as pd

    if path.exists():
        old = pd.read_csv(path)
        if set(ROW_KEY) <= set(old.columns):
            replaced = set(rows[ROW_KEY].astype(str).itertuples(index=False))
            kept = [key not in replaced for key in old[ROW_KEY].astype(str).itertuples(index=False)]
            rows = pd.concat([old[kept], rows], ignore_index=True)
    rows.to_csv(path, index=False)


def run_lm_eval(lm, config: LmEvalConfig, out_dir: str | Path, manager=None) -> tuple[dict, Path]:
    """Evaluate, write lm-eval's files and results.csv; returns (lm-eval's results, the csv path).
    manager: a TaskManager from build_task_manager(config), built here if not given."""
    import lm_eval
    import pandas as pd
    from lm_eval.loggers import EvaluationTracker

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tracker = EvaluationTracker(output_path=str(out))
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(config.tasks), num_fewshot=config.num_fewshot, limit=config.limit,
        gen_kwargs=config.gen_kwargs, apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.fewshot_as_multiturn, system_instruction=config.system_instruction,
        bootstrap_iters=config.bootstrap_iters, log_samples=config.log_samples, evaluation_tracker=tracker,
        task_manager=manager or build_task_manager(config), confirm_run_unsafe_code=True, random_seed=config.seed,
        numpy_random_seed=config.seed, torch_random_seed=config.seed, fewshot_random_seed=config.seed)
    samples = results.pop("samples", None) if config.log_samples else None
    tracker.general_config_tracker.model_name = lm.loaded.model
    tracker.general_config_tracker.model_name_sanitized = lm.tokenizer_name
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"] if samples else ():
        tracker.save_results_samples(task_name=task, samples=samples[task])
    path = out / "results.csv"
    merge_rows(path, pd.DataFrame(tidy_rows(results, lm)))
    record_run(out / "qrobust_lm_eval.json", {"model": lm.loaded.model, "method": lm.loaded.method,
                                              "bits": lm.loaded.bits, "kind": lm.kind, "config": vars(config)})
    return results, path


def record_run(path: Path, run: dict) -> None:
    """Add one run's model and settings to the list at path ({"runs": [...]}), as results.csv keeps
    every run's rows: each run into an OUT stays described, not only the last. A file holding one
    run's record alone (as qrobust wrote it before keeping the list) becomes the list's first."""
    earlier = json.loads(path.read_text()) if path.exists() else {"runs": []}
    runs = earlier["runs"] if "runs" in earlier else [earlier]
    path.write_text(json.dumps({"runs": runs + [run]}, indent=2, default=str))
