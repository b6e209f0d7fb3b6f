#!/usr/bin/env bash
# The committed lm-eval table: the built-in pair at full precision and GPTQ 2/3/4 bits (CPU, one thread).
# Usage: bash results/lm-eval/run.sh [WORK_DIR]   (run from the repository root)
set -euo pipefail
work=${1:-/tmp/qrobust-lm-eval-table}
here=results/lm-eval
tasks=qrobust_humaneval,qrobust_mbpp,qrobust_mbpp_choice,qrobust_heldout
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
mkdir -p "$here/runs"
for model in tiny-ar tiny-dllm; do
  for target in fp16 2 3 4; do
    name=$model-$([ "$target" = fp16 ] && echo fp16 || echo gptq-$target)
    quant=$([ "$target" = fp16 ] && echo "" || echo "--method gptq --bits $target")
    # --limit 8: the first 8 docs of each task (the 4 held-out documents are all used).
    python -m qrobust.cli lm-eval --model "$model" $quant --tasks "$tasks" --limit 8 \
      --gen-kwargs max_gen_toks=64 --mc-samples 16 --mc-batch-size 16 --bootstrap-iters 1000 \
      --out "$work/$name" > "$work-$name.log" 2>&1
    cp "$work/$name/results.csv" "$here/runs/$name.csv"
    cp "$work"/$name/*/results_*.json "$here/runs/$name.json"
  done
done
python - <<'PY'
import glob, pandas as pd
rows = pd.concat([pd.read_csv(p) for p in sorted(glob.glob("results/lm-eval/runs/*.csv"))])
rows.to_csv("results/lm-eval/results.csv", index=False)
wide = rows.pivot_table(index=["model", "method", "bits"], columns=["benchmark", "metric"], values="value")
wide.columns = [f"{b}:{m}" for b, m in wide.columns]
wide.reset_index().to_csv("results/lm-eval/table.csv", index=False, float_format="%.4f")
print(wide.reset_index().to_string())
PY
