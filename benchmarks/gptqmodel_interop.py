"""Do GPTQ loaders read our checkpoints as we do? GPTQModel and transformers against qrobust.

Builds a random Qwen3 (no hub; `--size qwen3-0.6b`: hidden 1024, MLP 3072, 16/8 heads of 128,
2 blocks; `small`: hidden 256, for CPU), quantizes it with qrobust's GPTQ in every checkpoint kind
(symmetric `gptq` and asymmetric `gptq_v2` at 2/3/4/8 bits, act-order with and without static
groups, a hawq mixed-precision plan written as GPTQModel `dynamic` overrides), and reads each
checkpoint back three ways besides qrobust's own reload:
- `reference`: a reader written from GPTQModel's source (zero point offset by format, g_idx,
  first-match `dynamic` keys), on the raw tensors: what a loader should see;
- `gptqmodel`: `GPTQModel.load(..., backend=BACKEND.TORCH)` (and `triton` on CUDA);
- `transformers`: `AutoModelForCausalLM.from_pretrained` (its GPTQ integration, via optimum).
Each row compares weights (max |Δ| relative to max |W|), logits (same) and top-1 agreement with
qrobust's reload, and is appended to OUT as JSON as soon as it finishes; a failing loader is a row
with its error, and the run goes on.

    python benchmarks/gptqmodel_interop.py --device cuda --out interop.jsonl
    python benchmarks/gptqmodel_interop.py --qrobust-only --size small --cases sym4,asym3,hawq   # CPU
"""
from __future__ import annotations

import argparse
import json
from importlib import metadata
import re
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from qrobust.calib import calibration_tokens, stdlib_files
from qrobust.models import load_model
from qrobust.models.tiny import build_tiny, train_tokenizer
from qrobust.quant import QuantizeConfig, QuantSpec, load_plan, load_quantized, quantize_model, save_quantized
from qrobust.quant.pack import unpack_qweight, unpack_qzeros

SIZES = {
    "small": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128),
}
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # v1 stores zero − 1 (GPTQModel's convert_gptq_v1_to_v2_format adds it back)


@dataclass(frozen=True)
class Case:
    name: str
    bits: int
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    hawq: bool = False


# New kinds first, the symmetric widths measured before last: rows are written as cases finish.
CASES = {c.name: c for c in (
    Case("sym4", 4), Case("asym4", 4, sym=False), Case("hawq", 4, hawq=True),
    Case("act4", 4, act_order=True), Case("act4-static", 4, act_order=True, static_groups=True),
    Case("act3-asym", 3, sym=False, act_order=True),
    Case("act8-asym-static", 8, sym=False, act_order=True, static_groups=True),
    *(Case(f"asym{b}", b, sym=False) for b in (2, 3, 8)),
    *(Case(f"sym{b}", b) for b in (2, 3, 8)),
)}
TRANSFORMERS_CASES = ("sym4", "asym4", "act4", "hawq")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def dynamic_bits(qc: dict, name: str) -> dict | None:
    """GPTQModel's reading of `dynamic` (quantization/config.py dynamic_get): patterns in order,
    matched from the start of the module name; `-:` skips the module, `+:` or none overrides."""
    for pattern, overrides in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return {"bits": qc["bits"], "group_size": qc["group_size"], **overrides}
    return {"bits": qc["bits"], "group_size": qc["group_size"]}


def reference_weights(checkpoint: Path) -> dict[str, tuple[int, torch.Tensor]]:
    """(bits, [out, in] weight) of each quantized layer, read from the raw tensors as GPTQModel does:
    per-layer bits from `dynamic`, zero = stored + offset of the format, W = scale[g] · (q − zero[g])."""
    from safetensors.torch import load_file

    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    offset = ZERO_OFFSET[qc.get("checkpoint_format", qc.get("format", "gptq"))]
    tensors = load_file(str(checkpoint / "model.safetensors"))
    out = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        spec = dynamic_bits(qc, name)
        if spec is None:
            continue
        bits, scales, g_idx = spec["bits"], tensors[f"{name}.scales"].float(), tensors[f"{name}.g_idx"].long()
        in_features, out_features = g_idx.numel(), scales.shape[1]
        q = unpack_qweight(tensors[key], bits, in_features).float()
        zeros = ((unpack_qzeros(tensors[f"{name}.qzeros"], bits, out_features).long() + offset) & (2**bits - 1)).float()
        out[name] = (bits, scales[g_idx].t() * (q - zeros[g_idx].t()))
    return out


def hawq_plan(adapter, calib: torch.Tensor, path: Path) -> Path:
    """A hawq plan (GPTQ-objective sensitivities, 3.5 bits on average) written where `--plan` reads it."""
    from hawq.allocate import Budget
    from hawq.plan import PlanConfig, analyse, plan_document, solve

    config = PlanConfig(sensitivity="proxy")
    sens = analyse(adapter, calib, config, progress=False)
    budget = Budget(avg_bits=3.5)
    doc = plan_document(adapter, "random-qwen3", sens, config, budget, solve(sens, config, budget),
                        {"nsamples": calib.shape[0], "seqlen": calib.shape[1]})
    path.write_text(json.dumps(doc, indent=2))
    return path


def quantize_case(case: Case, base: Path, calib: torch.Tensor, root: Path, device: str) -> tuple[Path, dict]:
    adapter = load_model(str(base), device=device)
    plan, extra = None, {}
    if case.hawq:
        from hawq.plan import read_plan, to_gptqmodel_dynamic

        plan_path = hawq_plan(load_model(str(base), device=device), calib, root / "plan.json")
        plan = load_plan(plan_path, QuantSpec(case.bits, 128, case.sym))
        extra["plan_bits"] = sorted({s.bits for s in plan.values()})
        extra["hawq_dynamic"] = len(to_gptqmodel_dynamic(read_plan(plan_path)))
    config = QuantizeConfig(bits=case.bits, group_size=128, sym=case.sym, act_order=case.act_order,
                            static_groups=case.static_groups, nsamples=calib.shape[0], seqlen=calib.shape[1],
                            plan=plan)
    records = quantize_model(adapter, config, calib, progress=False)
    out = save_quantized(adapter, config, records, root / case.name, base_model=str(base))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    extra.update(format=qc["checkpoint_format"], dynamic_keys=len(qc.get("dynamic", {})))
    return out, extra


def their_weight(layer) -> torch.Tensor | None:
    """A GPTQModel quantized layer's dequantized weight as [out, in]; None for a plain Linear."""
    if hasattr(layer, "dequantize_weight"):
        return layer.dequantize_weight().t().float().cpu()
    return None


def compare_model(ours, theirs_model, ids: torch.Tensor, device: str, weights_of) -> dict:
    """Weights layer by layer (weights_of(name) -> (bits or None, [out, in] or None)), then logits."""
    row = {"layers": 0, "layers_not_quantized": [], "bits_mismatch": [], "max_rel_weight_diff": 0.0}
    for name in ours.linear_layer_names():
        mine = ours.model.get_submodule(name)
        bits, w = weights_of(name)
        if w is None:
            row["layers_not_quantized"].append(name)
            continue
        if bits is not None and bits != mine.spec.bits:
            row["bits_mismatch"].append([name, mine.spec.bits, bits])
        row["layers"] += 1
        row["max_rel_weight_diff"] = max(row["max_rel_weight_diff"], rel(mine.dequantized_weight(), w))
    if theirs_model is not None:
        with torch.no_grad():
            l_ours = ours.logits(ids.to(device)).float()  # the adapter's own forward (native or transformers)
            l_theirs = theirs_model(input_ids=ids.to(device), use_cache=False).logits.float()
        row["logits_max_rel_diff"] = rel(l_ours, l_theirs)
        row["top1_agreement"] = float((l_ours.argmax(-1) == l_theirs.argmax(-1)).float().mean())
    return row


def read_reference(checkpoint: Path, ours, ids, device) -> dict:
    ref = reference_weights(checkpoint)
    return compare_model(ours, None, ids, device, lambda n: ref.get(n, (None, None)))


def compare_loaded(ours, model, ids, device) -> dict:
    """compare_model against a model another loader built, and the kernel classes it picked."""
    def weights(name):
        layer = model.get_submodule(name)
        return getattr(layer, "bits", None), their_weight(layer)

    row = compare_model(ours, model, ids, device, weights)
    row["kernel"] = sorted({type(model.get_submodule(n)).__name__ for n in ours.linear_layer_names()})
    return row


def read_gptqmodel(checkpoint: Path, ours, ids, device, backend: str) -> dict:
    from gptqmodel import BACKEND, GPTQModel

    theirs = GPTQModel.load(str(checkpoint), backend=getattr(BACKEND, backend.upper()), device=device,
                            dtype=torch.float16)
    return compare_loaded(ours, theirs.model, ids, device)


def read_transformers(checkpoint: Path, ours, ids, device, backend: str) -> dict:
    """`from_pretrained` through transformers' GPTQ integration; `backend` is GPTQModel's kernel
    ("auto" picks Machete/Marlin on Hopper, which an offline machine can't build: CUTLASS download)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((checkpoint / "config.json").read_text())["quantization_config"]["bits"]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float16, device_map=device,
                                                 quantization_config=GPTQConfig(bits=bits, backend=backend)).eval()
    return {**compare_loaded(ours, model, ids, device), "backend": backend}


def readers(args) -> list[tuple[str, object]]:
    out = [("reference", read_reference)]
    if args.qrobust_only:
        return out
    for backend in args.backends.split(","):
        out.append((f"gptqmodel-{backend}", lambda c, o, i, d, b=backend: read_gptqmodel(c, o, i, d, b)))
    out.append(("transformers", lambda c, o, i, d: read_transformers(c, o, i, d, args.transformers_backend)))
    wanted = set(args.readers.split(",")) if args.readers else None
    return [r for r in out if wanted is None or r[0] in wanted]


def environment() -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for package in ("gptqmodel", "optimum", "torchao"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # recorded, not fatal: the loaders' rows say what failed
            env[package] = None
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--size", default="qwen3-0.6b", choices=list(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None, help="GPTQModel backends (default: torch, and triton on CUDA)")
    ap.add_argument("--qrobust-only", action="store_true",
                    help="no GPTQModel or transformers: our side and the reference reader")
    ap.add_argument("--readers", default=None,
                    help="comma-separated subset of reference, gptqmodel-<backend>, transformers (default: all)")
    ap.add_argument("--transformers-backend", default="auto",
                    help="GPTQModel kernel that transformers' from_pretrained asks for (auto, torch, triton, ...)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--out", default="interop.jsonl", help="JSON lines, one per case and reader")
    ap.add_argument("--work", default=None, help="where checkpoints go (default: a temporary directory)")
    args = ap.parse_args()
    args.backends = args.backends or ("torch,triton" if args.device.startswith("cuda") else "torch")
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}: choose from {', '.join(CASES)}")

    root = Path(args.work or tempfile.mkdtemp())
    texts = [f.read_text(errors="replace") for f in stdlib_files()[:60]]
    tok = train_tokenizer(texts, vocab_size=512)
    base = build_tiny("ar", tok, root / "fp", seed=0, **SIZES[args.size])
    calib = calibration_tokens(tok, "stdlib", args.nsamples, 128, seed=0)
    ids = calib[:4]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps({"environment": environment(), "size": args.size, "device": args.device}) + "\n")
    for case in (CASES[c] for c in args.cases.split(",")):
        t0 = time.perf_counter()
        try:
            checkpoint, extra = quantize_case(case, base, calib, root, args.device)
            ours = load_quantized(checkpoint, device=args.device)
            ours.model.half()
        except Exception as e:
            rows = [{"reader": "qrobust", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}]
        else:
            rows = []
            for reader_name, read in readers(args):
                if (reader_name == "transformers" and case.name not in TRANSFORMERS_CASES
                        or reader_name == "gptqmodel-triton" and case.bits == 3):  # its Triton kernel: 2/4/8 bits
                    continue
                t1 = time.perf_counter()
                try:
                    row = read(checkpoint, ours, ids, args.device)
                except Exception as e:
                    row = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
                rows.append({"reader": reader_name, **extra, **row, "seconds": time.perf_counter() - t1})
        with open(out, "a") as f:
            for row in rows:
                full = {"case": case.name, "bits": case.bits, "sym": case.sym, "act_order": case.act_order,
                        "static_groups": case.static_groups, "hawq": case.hawq, **row,
                        "case_seconds": time.perf_counter() - t0}
                f.write(json.dumps(full) + "\n")
                print(json.dumps({k: v for k, v in full.items() if k != "trace"}), flush=True)


if __name__ == "__main__":
    main()
