"""Degradation of a quantized model against its own full-precision baseline, per benchmark problem.

On each HumanEval/MBPP problem, the benchmark's reference solution is the continuation of the prompt
exactly as the harness builds it (`task.prompt(problem, style, chat)`), and both models predict it:

- AR: teacher-forced; every solution token is a predicted position. `solution_nll` is the mean NLL
  per solution token.
- Diffusion: the prompt stays visible and the solution is masked at a fixed set of masks (`masks`
  per problem, ratios stratified over (0, 1), each drawn from a seed derived from the task id, the
  mask's index and `seed`), so every config of a model sees identical inputs; the predicted
  positions are the masked ones. `solution_nelbo` is the masked-diffusion negative ELBO per solution
  token (Σ masked CE / t, averaged over the masks, divided by the solution's length): an upper
  bound on the solution's NLL under the model's own objective.
- `kl`: KL(full precision ‖ quantized) of the two predictive distributions at the same predicted
  positions, mean per position, and `kl_p99`, its 99th percentile over all positions pooled;
  `top1_agreement`: the share of positions where both models' most likely token is the same.
- `flips`: problems that pass at full precision and fail quantized (and the reverse) in the two
  generation runs, with the exact McNemar p-value.

Every figure has a bootstrap 95% CI over problems (paired by problem where it compares two models).
Only forward passes run, in batches; a batch keeps the log-probabilities of its predicted positions
only, and the baseline's are kept across configs while they fit in `cache_bytes`.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from harness.metrics import Estimate, bootstrap_mean, bootstrap_pooled_quantile, paired_comparison
from harness.tasks import get_task
from qrobust.errors import QrobustError
from qrobust.models.diffusion import mask_tokens

LOSS_METRIC = {"ar": "solution_nll", "diffusion": "solution_nelbo"}
METRICS = ("kl", "kl_p99", "top1_agreement")


@dataclass(frozen=True)
class DegradationConfig:
    benchmarks: tuple[str, ...] = ("humaneval", "mbpp")
    limit: int | None = None  # first K problems of each benchmark
    style: str | None = None  # prompt style; None: each task's default, as the harness
    context_tokens: int | None = None  # keep only the last N prompt tokens (None: all that fit the model)
    solution_tokens: int | None = None  # score only the first N solution tokens (None: all that fit)
    masks: int = 2  # diffusion: masks per problem
    seed: int = 0  # diffusion: the mask seed, the same for every config of a model
    batch_size: int = 8  # sequences per forward pass
    cache_bytes: int = 1 << 30  # the baseline's log-probabilities kept across configs up to this size

    def __post_init__(self) -> None:
        if self.masks < 1 or self.batch_size < 1:
            raise QrobustError(f"masks and batch size must be at least 1, got {self.masks} and {self.batch_size}")
        for name in ("context_tokens", "solution_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise QrobustError(f"{name} must be at least 1 (or None for no cap)")


@dataclass(frozen=True)
class Row:
    """One sequence of a forward pass: its token ids, which logits to read, the tokens they
    predict, and each predicted token's weight in the problem's loss."""

    problem: int
    ids: torch.Tensor
    reads: torch.Tensor  # logit positions, one per predicted token
    targets: torch.Tensor
    weight: float  # AR 1; diffusion 1 / (t · masks)


@dataclass
class BenchmarkRows:
    name: str
    task_ids: list[str]
    solution_lengths: np.ndarray  # tokens scored per problem (the loss's denominator)
    rows: list[Row]


def problem_seed(*parts) -> int:
    """A seed from task id, mask index and base seed that every process derives alike."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def problem_tokens(adapter, name: str, config: DegradationConfig) -> list[tuple[str, list[int], list[int]]]:
    """(task id, prompt ids, solution ids) per problem: the harness's prompt, the reference solution
    as its continuation, cut to the caps and to what the model's positions hold (prompt from the left)."""
    task = get_task(name)
    style = task.check_style(config.style or task.default_style)
    chat = adapter.apply_chat_template if style == "instruct" else None
    tok = adapter.tokenizer
    limit = adapter.max_positions
    out = []
    for p in task.problems(config.limit):
        prompt = task.prompt(p, style, chat)
        # HumanEval's reference is the whole module (prompt + body): its continuation of the prompt is
        # what follows it; MBPP's reference code follows the prompt as a whole.
        solution = p.reference[len(prompt):] if p.reference.startswith(prompt) else p.reference
        prompt_ids = tok(prompt).input_ids  # as generation tokenizes prompts; the solution continues them
        solution_ids = tok(solution, add_special_tokens=False).input_ids[:config.solution_tokens]
        if not solution_ids:
            continue
        if limit is not None:
            solution_ids = solution_ids[:limit - 1]  # one prompt token at least: the first has no logits
        keep = config.context_tokens or len(prompt_ids)
        if limit is not None:
            keep = min(keep, limit - len(solution_ids))
        prompt_ids = prompt_ids[-max(keep, 1):] or [tok.eos_token_id]
        out.append((p.task_id, prompt_ids, solution_ids))
    return out


def _ar_rows(adapter, problems, config: DegradationConfig) -> list[Row]:
    rows = []
    for i, (_, prompt, solution) in enumerate(problems):
        ids = torch.tensor(prompt + solution)
        positions = torch.arange(len(prompt), len(ids))
        rows.append(Row(i, ids, positions - 1, ids[positions], 1.0))
    return rows


def _diffusion_rows(adapter, problems, config: DegradationConfig) -> list[Row]:
    """`masks` rows per problem, mask ratio k-th of `masks` strata, masks from the task's own seeds."""
    rows = []
    eps = adapter.eps
    for i, (task_id, prompt, solution) in enumerate(problems):
        ids = torch.tensor(prompt + solution)
        maskable = torch.zeros(len(ids), dtype=torch.bool)
        maskable[len(prompt):] = True
        for k in range(config.masks):
            g = torch.Generator().manual_seed(problem_seed(task_id, k, config.seed))
            u = float(torch.rand(1, generator=g))
            t = eps + (1 - eps) * (k + u) / config.masks
            noisy, masked = mask_tokens(ids[None], torch.tensor([t]), adapter.mask_token_id, g, maskable[None])
            positions = masked[0].nonzero().squeeze(-1)
            if positions.numel() == 0:
                continue  # contributes 0 to the ELBO sum, and no position to KL
            reads = positions - 1 if adapter.shift_logits else positions
            rows.append(Row(i, noisy[0], reads, ids[positions], 1.0 / (t * config.masks)))
    return rows


ROWS = {"ar": _ar_rows, "diffusion": _diffusion_rows}


def prepare(adapter, config: DegradationConfig) -> dict[str, BenchmarkRows]:
    """The forward-pass rows of every benchmark: a function of the tokenizer, kind and config only."""
    if adapter.kind not in ROWS:
        raise QrobustError(f"no degradation metrics for model kind {adapter.kind!r}")
    out = {}
    for name in config.benchmarks:
        problems = problem_tokens(adapter, name, config)
        rows = sorted(ROWS[adapter.kind](adapter, problems, config), key=lambda r: -len(r.ids))
        out[name] = BenchmarkRows(name, [p[0] for p in problems], np.array([len(p[2]) for p in problems]), rows)
    return out


@torch.no_grad()
def _log_probs(adapter, rows: list[Row]) -> torch.Tensor:
    """[predicted positions of the batch, vocab] float32 log-probabilities; the batch's full
    logits live only inside this call."""
    length = max(len(r.ids) for r in rows)
    pad = adapter.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)], attn[i, :len(r.ids)] = r.ids, 1
    logits = adapter.logits(ids.to(adapter.device), attn.to(adapter.device))
    batch = torch.cat([torch.full((len(r.reads),), i) for i, r in enumerate(rows)]).to(logits.device)
    reads = torch.cat([r.reads for r in rows]).to(logits.device)
    return torch.log_softmax(logits[batch, reads].float(), dim=-1)


def _batches(rows: list[Row], size: int) -> list[list[Row]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def per_problem_sum(values: np.ndarray, owners: np.ndarray, n: int) -> np.ndarray:
    """values [positions] summed per problem: owners [positions] name each one's problem, 0 … n − 1."""
    total = np.zeros(n)
    np.add.at(total, owners, values)
    return total


def score(adapter, bench: BenchmarkRows, config: DegradationConfig, base=None,
          cache: dict | None = None) -> dict:
    """Per-problem loss of `adapter` and, with `base`, KL(base ‖ adapter) and top-1 agreement at the
    same positions. `cache` (a dict the caller keeps per base model) holds the base's log-probs: filled
    by the base's own pass (base None) or by the first comparison, read by later ones."""
    n = len(bench.task_ids)
    loss, kl_sum, agree_sum, count = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    kl_positions: list[list[np.ndarray]] = [[] for _ in range(n)]
    cached_bytes = sum(t.numel() * t.element_size() for t in cache.values()) if cache else 0
    for b, rows in enumerate(_batches(bench.rows, config.batch_size)):
        lq = _log_probs(adapter, rows)
        owners = np.concatenate([np.full(len(r.reads), r.problem) for r in rows])
        weights = np.concatenate([np.full(len(r.reads), r.weight) for r in rows])
        targets = torch.cat([r.targets for r in rows]).to(lq.device)
        nll = -lq.gather(-1, targets[:, None]).squeeze(-1)
        loss += per_problem_sum(nll.double().cpu().numpy() * weights, owners, n)
        key = (bench.name, b)
        if base is None:  # the baseline's own pass: its log-probs serve every later config
            size = lq.numel() * lq.element_size()
            if cache is not None and key not in cache and cached_bytes + size <= config.cache_bytes:
                cache[key] = lq
                cached_bytes += size
            continue
        lp = cache.get(key) if cache is not None else None
        if lp is None:
            lp = _log_probs(base, rows)
            if cache is not None and cached_bytes + lp.numel() * lp.element_size() <= config.cache_bytes:
                cache[key] = lp
                cached_bytes += lp.numel() * lp.element_size()
        lp = lp.to(lq.device)
        kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).double().cpu().numpy()
        agree = (lp.argmax(-1) == lq.argmax(-1)).double().cpu().numpy()
        kl_sum += per_problem_sum(kl, owners, n)
        agree_sum += per_problem_sum(agree, owners, n)
        count += per_problem_sum(np.ones_like(kl), owners, n)
        for o, start, stop in _runs(owners):
            kl_positions[o].append(kl[start:stop])
    out = {"loss": loss / bench.solution_lengths}
    if base is not None:
        seen = np.maximum(count, 1)
        out.update(kl=np.where(count > 0, kl_sum / seen, 0.0),
                   top1_agreement=np.where(count > 0, agree_sum / seen, 1.0),
                   kl_positions=[np.concatenate(v) if v else np.zeros(0) for v in kl_positions])
    return out


def _runs(owners: np.ndarray):
    """(value, start, stop) of each run of equal values."""
    edges = np.flatnonzero(np.diff(owners)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(owners)]])
    return [(int(owners[s]), int(s), int(e)) for s, e in zip(starts, stops)]


def _est(e: Estimate) -> dict:
    return e.as_dict()


def summarize(kind: str, bench: BenchmarkRows, scores: dict, baseline_loss: np.ndarray | None = None) -> dict:
    """The record of one benchmark: per-problem values and every metric with its bootstrap CI."""
    loss_name = LOSS_METRIC[kind]
    per_problem = {"task_id": bench.task_ids, "tokens": bench.solution_lengths.tolist(),
                   "loss": scores["loss"].tolist()}
    metrics = {loss_name: _est(bootstrap_mean(scores["loss"]))}
    if "kl" in scores:
        per_problem.update(kl=scores["kl"].tolist(), top1_agreement=scores["top1_agreement"].tolist())
        metrics.update(kl=_est(bootstrap_mean(scores["kl"])),
                       kl_p99=_est(bootstrap_pooled_quantile(scores["kl_positions"], 0.99)),
                       top1_agreement=_est(bootstrap_mean(scores["top1_agreement"])))
    else:  # the baseline against itself, by definition rather than by a second pass
        metrics.update(kl=_est(Estimate(0.0, 0.0, 0.0)), kl_p99=_est(Estimate(0.0, 0.0, 0.0)),
                       top1_agreement=_est(Estimate(1.0, 1.0, 1.0)))
    if baseline_loss is not None:
        per_problem["baseline_loss"] = baseline_loss.tolist()
        delta = bootstrap_mean(scores["loss"] - baseline_loss)
        scale = float(np.mean(baseline_loss))
        metrics[f"{loss_name}_delta"] = _est(delta)
        metrics[f"{loss_name}_relative"] = _est(Estimate(delta.value / scale, delta.low / scale, delta.high / scale))
    return {"kind": kind, "loss_metric": loss_name, "problems": len(bench.task_ids),
            "tokens": int(bench.solution_lengths.sum()), "per_problem": per_problem, "metrics": metrics}


def degradation(adapter, config: DegradationConfig, base=None, prepared: dict[str, BenchmarkRows] | None = None,
                cache: dict | None = None, baseline: dict | None = None) -> dict[str, dict]:
    """Per benchmark: `adapter`'s solution likelihood and, with `base` (the same model at full
    precision), KL, top-1 agreement and the paired change of the likelihood. `baseline`: the base's
    own records (from an earlier call without `base`), so its losses are not recomputed."""
    if base is not None and base.kind != adapter.kind:
        raise QrobustError(f"baseline is a {base.kind} model and the evaluated one {adapter.kind}: compare a model "
                           "with its own full-precision version")
    prepared = prepared or prepare(adapter, config)
    cache = {} if cache is None and base is not None else cache  # the base's pass serves loss and KL alike
    out = {}
    for name, bench in prepared.items():
        base_loss = None
        if base is not None:
            if baseline and name in baseline:
                base_loss = np.array(baseline[name]["per_problem"]["loss"])
            else:
                base_loss = score(base, bench, config, cache=cache)["loss"]
        scores = score(adapter, bench, config, base, cache)
        out[name] = summarize(adapter.kind, bench, scores, base_loss)
        out[name]["config"] = asdict(config)
    return out


def flips(passed_base: dict[str, bool], passed_quantized: dict[str, bool]) -> dict:
    """Pass→fail and fail→pass counts on the problems both runs scored, exact McNemar p-value,
    and bootstrap CIs of the counts (problems resampled)."""
    tasks = sorted(set(passed_base) & set(passed_quantized))
    a = np.array([float(passed_base[t]) for t in tasks])
    b = np.array([float(passed_quantized[t]) for t in tasks])
    cmp = paired_comparison(a, b)
    n = len(tasks)
    out = {"problems": n, "p_value": cmp.p_value}
    for name, count, indicator in (("pass_to_fail", cmp.only_a, (a >= 0.5) & (b < 0.5)),
                                   ("fail_to_pass", cmp.only_b, (a < 0.5) & (b >= 0.5))):
        est = bootstrap_mean(indicator.astype(float))
        out[name] = {"value": count, "ci_low": est.low * n if n else 0.0, "ci_high": est.high * n if n else 0.0}
    return out


def baseline_model(base_dir: Path) -> str:
    """The model of an earlier eval run, which `--baseline` names; a one-line error if it names none
    (checked before the eval, so a wrong path costs no generation)."""
    summary = base_dir / "summary.json"
    if not summary.exists():
        raise QrobustError(f"{base_dir} holds no summary.json: point --baseline at a `qrobust eval --out` directory")
    name = json.loads(summary.read_text()).get("model")
    if not name or name == "reference":
        raise QrobustError(f"{summary} names no model ({name!r}): the baseline must be a model's eval run")
    return name


def against_run(adapter, baseline_dir, out_dir, config: DegradationConfig, device: str = "cpu",
                dtype: torch.dtype | None = None) -> dict[str, dict]:
    """`qrobust eval --baseline`: load the model of an earlier eval run (its summary.json), compute
    the metrics of `adapter` against it, and the flips between the two runs' results.jsonl; writes
    OUT/degradation.json."""
    from harness.execute import per_problem_pass_at_1, read_jsonl
    from qrobust.models import load_model

    base_dir, out = Path(baseline_dir), Path(out_dir)
    name = baseline_model(base_dir)
    base = load_model(name, device=device, dtype=dtype)
    result = degradation(adapter, config, base=base)
    for bench, d in result.items():
        paths = [d_ / bench / "results.jsonl" for d_ in (base_dir, out)]
        if all(p.exists() for p in paths):
            a, b = (per_problem_pass_at_1(read_jsonl(p)) for p in paths)
            d["flips"] = flips(a, b)
        d["baseline_model"] = name
    (out / "degradation.json").write_text(json.dumps(result, indent=1))
    return result


def summary_lines(result: dict[str, dict]) -> list[str]:
    """One line per benchmark: every metric with its 95% CI, and the flips."""
    lines = []
    for bench, d in result.items():
        parts = [f"{k} {v['value']:.4g} [{v['ci_low']:.4g}, {v['ci_high']:.4g}]" for k, v in d["metrics"].items()]
        f = d.get("flips")
        if f:
            parts.append(f"flips pass→fail {f['pass_to_fail']['value']} fail→pass {f['fail_to_pass']['value']} "
                         f"(McNemar p {f['p_value']:.3g}, {f['problems']} problems)")
        lines.append(f"{bench} ({d['problems']} problems): " + "; ".join(parts))
    return lines
