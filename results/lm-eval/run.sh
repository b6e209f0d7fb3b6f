#!/usr/bin/env bash
# The committed lm-eval table: the built-in pair at full precision and GPTQ 2/3/4 bits (CPU, one thread per
# config, JOBS configs at a time). Usage, from the repository root: bash results/lm-eval/run.sh [WORK_DIR]
set -euo pipefail
work=${1:-/tmp/qrobust-lm-eval-table}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
export LIMIT=${LIMIT:-4} MAX_GEN=${MAX_GEN:-32} MC=${MC:-8} TASKS=qrobust_humaneval,qrobust_mbpp,qrobust_mbpp_choice,qrobust_heldout
mkdir -p "$work" results/lm-eval/runs
one() {  # one config: MODEL TARGET (fp16 or a GPTQ width) WORK_DIR
  local name=$1-$([ "$2" = fp16 ] && echo fp16 || echo gptq-$2) quant=""
  [ "$2" = fp16 ] || quant="--method gptq --bits $2"
  # --limit: the first LIMIT docs of each task (qrobust_heldout has 4 documents, all used).
  python -m qrobust.cli lm-eval --model "$1" $quant --tasks "$TASKS" --limit "$LIMIT" \
    --gen-kwargs "max_gen_toks=$MAX_GEN" --mc-samples "$MC" --mc-batch-size "$MC" --out "$3/$name" > "$3/$name.log" 2>&1
  cp "$3/$name/results.csv" "results/lm-eval/runs/$name.csv"
  cp "$3"/$name/*/results_*.json "results/lm-eval/runs/$name.json"
}
export -f one
for m in tiny-dllm tiny-ar; do for t in fp16 2 3 4; do echo "$m $t"; done; done |
  xargs -P "${JOBS:-2}" -L 1 bash -c 'one $0 $1 '"$work"
python - <<'PY'
import glob, pandas as pd
rows = pd.concat([pd.read_csv(p) for p in sorted(glob.glob("results/lm-eval/runs/*.csv"))])
rows.to_csv("results/lm-eval/results.csv", index=False)
wide = rows.pivot_table(index=["model", "method", "bits"], columns=["benchmark", "metric"], values="value")
wide.columns = [f"{b}:{m}" for b, m in wide.columns]
wide.reset_index().to_csv("results/lm-eval/table.csv", index=False, float_format="%.4f")
print(wide.reset_index().to_string())
PY
