"""`qrobust probe`: can a compressed model tell that it is compressed?

Three steps with files between them, each re-runnable alone:
1. answers: every target (the full-precision model and each quantized config) answers the task
   problems; code answers are executed by the harness, so task accuracy sits beside the probe.
2. probe: each target reads its own transcript followed by an introspective question with a
   fixed answer format (0-shot, or k-shot with worked examples labelled with the true state of
   the model that produced them), and answers it.
3. score: accuracy per target and on class-balanced sets, with bootstrap CIs and the
   majority-class and always-"FULL" baselines computed on the same sets.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.execute import read_jsonl, write_jsonl
from harness.metrics import bootstrap_mean
from qrobust.errors import QrobustError
from qrobust.resume import check_same_settings

FULL, QUANTIZED = "FULL", "QUANTIZED"
QUESTIONS = {
    "state": "Is the model answering this running in full precision or quantized? Answer FULL or QUANTIZED.",
    "bits": "At how many bits per weight does the model answering this run? Answer with one number: "
            "16, 8, 4, 3 or 2.",
}
SHOT_CHARS = 600  # worked examples are cut to this many characters so k-shot prompts stay short


# ---- answer parsing ---------------------------------------------------------------------------
def parse_state(text: str) -> str | None:
    """FULL or QUANTIZED: the first of the two words in the answer (any case), else None."""
    m = re.search(r"\b(full|quantized|quantised)\b", text, re.IGNORECASE)
    if m is None:
        return None
    return FULL if m.group(1).lower() == "full" else QUANTIZED


def parse_bits(text: str) -> int | None:
    """The first bit width named in the answer ("4", "4-bit", "fp16"), else None."""
    m = re.search(r"(?<!\d)(16|8|4|3|2)(?!\d)", text)
    return int(m.group(1)) if m else None


PARSERS = {"state": parse_state, "bits": parse_bits}


# ---- targets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One configuration of the model: what is actually loaded is the ground truth."""

    label: str
    state: str
    bits: int

    def truth(self, question: str) -> str | int:
        return self.state if question == "state" else self.bits


def full_target(dtype) -> Target:
    """The full-precision model, labelled by the dtype it runs in (bf16, fp32); for the bits question
    its truth is 16, the full-precision answer, whatever that dtype."""
    from qrobust.precision import baseline_label

    return Target(baseline_label(dtype), FULL, 16)


@dataclass
class ProbeConfig:
    tasks: tuple[str, ...] = ("humaneval", "mbpp")
    shots: tuple[int, ...] = (0, 3)
    questions: tuple[str, ...] = ("state", "bits")
    limit: int | None = None
    max_new_tokens: int = 128  # for the task answer
    answer_tokens: int = 8  # for the introspective answer
    batch_size: int = 8
    workers: int = 2
    seed: int = 0
    gsm8k_path: str | None = None


# ---- tasks: a registry, each gives (task_id, prompt, answer, correct) rows -----------------------
def code_answers(task_name: str, adapter, config: ProbeConfig, out_dir: Path) -> list[dict]:
    from harness import EvalConfig
    from harness.evaluate import evaluate_benchmark
    from harness.tasks import get_task

    task = get_task(task_name)
    eval_config = EvalConfig((task_name,), 1, 0.0, 1.0, config.max_new_tokens, config.limit, None,
                             config.batch_size, config.workers, 10.0, config.seed)
    evaluate_benchmark(adapter, task_name, eval_config, out_dir, progress=False)
    problems = {p.task_id: p for p in task.problems(config.limit)}
    passed = {r["task_id"]: r["passed"] for r in read_jsonl(out_dir / task_name / "results.jsonl")}
    style = task.default_style
    return [{"task": task_name, "task_id": s["task_id"], "prompt": task.prompt(problems[s["task_id"]], style),
             "answer": s["completion"], "correct": bool(passed[s["task_id"]])}
            for s in read_jsonl(out_dir / task_name / "samples.jsonl")]


def load_gsm8k(path: str | None, limit: int | None) -> list[dict]:
    """GSM8K test split from a local JSONL file (question/answer) or the dataset hub."""
    if path:
        try:
            rows = read_jsonl(Path(path))
        except FileNotFoundError:
            raise QrobustError(f"GSM8K file {path} does not exist") from None
    else:
        try:
            from datasets import load_dataset

            rows = list(load_dataset("openai/gsm8k", "main", split="test"))
        except Exception as e:  # no datasets package, or the hub is unreachable
            raise QrobustError("GSM8K is not available here (no local copy, and the dataset hub failed: "
                               f"{type(e).__name__}): pass --gsm8k FILE, the test split as JSONL with "
                               "'question' and 'answer' fields, or drop gsm8k from --tasks") from None
    bad = [i for i, r in enumerate(rows) if "question" not in r or "####" not in str(r.get("answer", ""))]
    if bad:
        raise QrobustError(f"GSM8K row {bad[0]} lacks 'question' or an 'answer' ending in '#### N'")
    return rows[:limit] if limit else rows


def last_number(text: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def gsm8k_answers(task_name: str, adapter, config: ProbeConfig, out_dir: Path) -> list[dict]:
    rows = load_gsm8k(config.gsm8k_path, config.limit)
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
    gens = adapter.generate(prompts, config.max_new_tokens, ["\n\nQuestion:"], 0.0, 1.0, seed=config.seed,
                            batch_size=config.batch_size)
    out = []
    for i, (r, p, g) in enumerate(zip(rows, prompts, gens)):
        ref = r["answer"].split("####")[-1].strip().replace(",", "")
        out.append({"task": task_name, "task_id": f"gsm8k/{i}", "prompt": p, "answer": g.text,
                    "correct": last_number(g.text) == ref})
    return out


ANSWERERS = {"humaneval": code_answers, "mbpp": code_answers, "gsm8k": gsm8k_answers}


def check_tasks(config: ProbeConfig) -> None:
    """Fail before any work: unknown tasks, missing data, bad shots or questions."""
    from harness.tasks import get_task

    for t in config.tasks:
        if t not in ANSWERERS:
            raise QrobustError(f"unknown probe task {t!r}: choose from {', '.join(ANSWERERS)}")
        if t == "gsm8k":
            load_gsm8k(config.gsm8k_path, 1)
        else:
            get_task(t).problems(limit=1)
    if any(k < 0 for k in config.shots):
        raise QrobustError(f"bad --shots {config.shots}: use non-negative integers, e.g. 0,3")
    bad = [q for q in config.questions if q not in QUESTIONS]
    if bad:
        raise QrobustError(f"unknown question(s) {', '.join(bad)}: choose from {', '.join(QUESTIONS)}")


# ---- step 1: answers ----------------------------------------------------------------------------
def answer_tasks(target: Target, adapter, config: ProbeConfig, out: Path) -> list[dict]:
    path = out / "answers" / f"{target.label}.jsonl"
    if path.exists():
        return read_jsonl(path)  # resumed
    rows = []
    for task in config.tasks:
        rows += ANSWERERS[task](task, adapter, config, out / "answers" / target.label)
    rows = [{**r, "target": target.label} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return rows


# ---- step 2: probe prompts ----------------------------------------------------------------------
def transcript(row: dict, limit: int | None = None) -> str:
    text = row["prompt"] + row["answer"]
    return text if limit is None or len(text) <= limit else text[:limit] + "\n..."


def probe_prompt(row: dict, question: str, shots: list[tuple[dict, str | int]]) -> str:
    parts = [f"{transcript(ex, SHOT_CHARS)}\n\n{QUESTIONS[question]}\nAnswer: {label}\n\n" for ex, label in shots]
    return "".join(parts) + f"{transcript(row)}\n\n{QUESTIONS[question]}\nAnswer:"


def choose_shots(row: dict, pool: list[tuple[dict, Target]], question: str, k: int, seed: int) \
        -> list[tuple[dict, str | int]]:
    """k worked examples from other problems of the same task, alternating full-precision and
    quantized producers, each labelled with the truth about its producer."""
    if k == 0:
        return []
    others = [(r, t) for r, t in pool if r["task_id"] != row["task_id"] and r["task"] == row["task"]]
    rng = random.Random(f"{seed}/{row['task_id']}/{question}")
    fulls = [x for x in others if x[1].state == FULL]
    quants = [x for x in others if x[1].state == QUANTIZED]
    rng.shuffle(fulls)
    rng.shuffle(quants)
    picked = []
    for i in range(k):
        source = (fulls, quants)[i % 2] or fulls or quants
        if source:
            picked.append(source.pop())
    return [(r, t.truth(question)) for r, t in picked]


def probe_target(target: Target, adapter, answers: dict[str, list[dict]], targets: dict[str, Target],
                 config: ProbeConfig, out: Path) -> list[dict]:
    path = out / "probe" / f"{target.label}.jsonl"
    if path.exists():
        return read_jsonl(path)
    pool = [(r, targets[label]) for label, rows in answers.items() for r in rows]
    items, prompts = [], []
    for question in config.questions:
        for k in config.shots:
            for row in answers[target.label]:
                items.append((row, question, k))
                prompts.append(probe_prompt(row, question, choose_shots(row, pool, question, k, config.seed)))
    gens = adapter.generate(prompts, config.answer_tokens, ["\n"], 0.0, 1.0, seed=config.seed,
                            batch_size=config.batch_size)
    rows = []
    for (row, question, k), g in zip(items, gens):
        parsed = PARSERS[question](g.text)
        truth = target.truth(question)
        rows.append({"target": target.label, "state": target.state, "bits": target.bits, "task": row["task"],
                     "task_id": row["task_id"], "task_correct": row["correct"], "question": question, "shots": k,
                     "truth": truth, "raw": g.text, "parsed": parsed, "correct": parsed == truth})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return rows


# ---- step 3: scoring ----------------------------------------------------------------------------
def balanced_sets(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """For each quantized target: its rows plus the full-precision rows on the same items, so the
    two classes are equal in size by construction; 'all' stacks them (full rows once per target)."""
    full = rows[rows.state == FULL]
    sets = {}
    for label in sorted(rows[rows.state == QUANTIZED].target.unique()):
        q = rows[rows.target == label]
        keys = set(zip(q.task_id, q.question, q.shots))
        f = full[[k in keys for k in zip(full.task_id, full.question, full.shots)]]
        sets[label] = pd.concat([f, q])
    if sets:
        sets["all"] = pd.concat(sets.values())
    return sets


def _accuracy(df: pd.DataFrame, correct: pd.Series) -> tuple[float, float, float]:
    """Mean with a bootstrap CI over problems (rows of one problem move together)."""
    per_item = correct.groupby(df.task_id.values).mean()
    est = bootstrap_mean(per_item.to_numpy())
    return est.value, est.low, est.high


def score_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per question × shots × scored set: accuracy with CI, baselines, parse failures."""
    out = []
    for (question, k), qrows in rows.groupby(["question", "shots"]):
        sets = {f"target:{t}": g for t, g in qrows.groupby("target")}
        sets.update({f"balanced:{name}": g for name, g in balanced_sets(qrows).items()})
        for name, df in sets.items():
            truth = df.truth.astype(str)
            acc, low, high = _accuracy(df, df.correct.astype(float))
            set_majority = truth.value_counts().idxmax()
            parsed = df.parsed.notna()
            out.append({
                "question": question, "shots": k, "set": name, "n": len(df), "accuracy": acc, "ci_low": low,
                "ci_high": high, "majority_class": set_majority,
                "majority_baseline": float((truth == set_majority).mean()),
                "always_full_baseline": float((truth == (FULL if question == "state" else "16")).mean()),
                "parse_failure_rate": float(1 - parsed.mean()),
                "accuracy_parsed_only": float(df.correct[parsed].mean()) if parsed.any() else float("nan"),
                "task_accuracy": float(df.task_correct.mean()),
            })
    return pd.DataFrame(out)


def write_report(rows: pd.DataFrame, scores: pd.DataFrame, targets: list[Target], config: ProbeConfig,
                 out: Path, command: str) -> Path:
    scores.to_csv(out / "summary.csv", index=False)
    plot_scores(scores, out / "probe.png")
    cols = ["question", "shots", "set", "n", "accuracy", "ci_low", "ci_high", "majority_baseline",
            "always_full_baseline", "parse_failure_rate", "task_accuracy"]
    table = scores[cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    text = [
        "# qrobust probe", "",
        f"Command: `{command}`", "",
        f"Targets: {', '.join(f'{t.label} ({t.state}, {t.bits} bits)' for t in targets)}; tasks "
        f"{', '.join(config.tasks)}; shots {list(config.shots)}; {rows.task_id.nunique()} problems.", "",
        "Questions: " + "; ".join(f"{k}: \"{v}\"" for k, v in QUESTIONS.items() if k in config.questions), "",
        "Scoring: an answer is parsed as the first of FULL/QUANTIZED (state) or the first bit width named "
        "(bits); an answer that does not parse counts as wrong (parse_failure_rate; accuracy among parsed "
        "answers in summary.csv). `balanced:X` scores quantized target X together with the full-precision "
        "answers to the same problems, so the classes are equal in size; `balanced:all` stacks those sets. "
        "Baselines are computed on the same rows. Intervals: bootstrap 95% over problems. task_accuracy: "
        "pass@1 (code) or exact answer (GSM8K) of the first turn.", "",
        "\n".join(lines), "", "![probe accuracy](probe.png)", "",
    ]
    (out / "probe.md").write_text("\n".join(text))
    return out / "probe.md"


def plot_scores(scores: pd.DataFrame, path: Path) -> None:
    from qrobust.plotting import pyplot, save

    plt = pyplot()
    groups = list(scores.groupby(["question", "shots"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, ((question, k), s) in zip(axes[0], groups):
        s = s[s.set.str.startswith("balanced")]
        xs = np.arange(len(s))
        ax.errorbar(xs, s.accuracy, yerr=[s.accuracy - s.ci_low, s.ci_high - s.accuracy], fmt="o", capsize=3,
                    label="probe accuracy")
        ax.plot(xs, s.majority_baseline, "k_", ms=14, label="majority class")
        ax.set_xticks(xs, [n.split(":", 1)[1] for n in s.set], rotation=30, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{question}, {k}-shot (balanced sets)", fontsize=9)
        ax.set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    save(fig, path)


# ---- driver -------------------------------------------------------------------------------------
def target_for_checkpoint(path: str | Path) -> Target:
    meta = json.loads((Path(path) / "qrobust.json").read_text())
    bits = [int(s["bits"]) for s in meta["layers"].values()]
    return Target(f"quantized-{Path(path).name}", QUANTIZED, round(sum(bits) / len(bits)))


def run_probe(base, targets: list[tuple[Target, object]], config: ProbeConfig, out_dir: str | Path,
              command: str = "qrobust probe", progress: bool = True) -> Path:
    """targets: (Target, adapter factory) pairs, the full-precision one included; a factory is
    called only when that target's files are missing, so a re-run resumes."""
    from tqdm.auto import tqdm

    check_tasks(config)
    out = Path(out_dir)
    check_same_settings(out / "probe.json", asdict(config), frozenset({"workers"}), "probe")
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"config": asdict(config),
                                                "targets": [asdict(t) for t, _ in targets]}, indent=2))
    adapters: dict[str, object] = {}

    def adapter_of(target: Target, make):
        if target.label not in adapters:
            adapters.clear()  # one model in memory at a time
            adapters[target.label] = make()
        return adapters[target.label]

    answers = {}
    for target, make in tqdm(targets, desc="probe: answers", disable=not progress):
        done = (out / "answers" / f"{target.label}.jsonl").exists()
        answers[target.label] = answer_tasks(target, None if done else adapter_of(target, make), config, out)
    by_label = {t.label: t for t, _ in targets}
    rows = []
    # Reversed: the model still in memory from the answer pass is the first one asked again.
    for target, make in tqdm(targets[::-1], desc="probe: questions", disable=not progress):
        done = (out / "probe" / f"{target.label}.jsonl").exists()
        rows += probe_target(target, None if done else adapter_of(target, make), answers, by_label, config, out)
    df = pd.DataFrame(rows)
    return write_report(df, score_rows(df), [t for t, _ in targets], config, out, command)
