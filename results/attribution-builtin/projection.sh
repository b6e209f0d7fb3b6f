#!/usr/bin/env bash
# How much of the ranking does the random projection decide? Exact (unprojected) gradients of
# tiny-ar vs p = 16, 32, 64 (two projection seeds each), same documents and queries as run.sh.
set -euo pipefail
OUT=${1:-results/attribution-builtin}
COMMON="--model tiny-ar --limit 60 --queries humaneval,mbpp --query-limit 10 --top-k 10 --no-bm25"
qrobust attribute $COMMON --projection-dim 0 --out $OUT/exact
for p in 16 32 64; do
  for seed in 0 1; do
    qrobust attribute $COMMON --projection-dim $p --projection-seed $seed --out $OUT/p$p-seed$seed
    echo "exact vs p=$p seed $seed: $(qrobust attribute-compare $OUT/exact $OUT/p$p-seed$seed)"
  done
  echo "p=$p seed 0 vs seed 1: $(qrobust attribute-compare $OUT/p$p-seed0 $OUT/p$p-seed1)"
done
