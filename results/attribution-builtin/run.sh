#!/usr/bin/env bash
# Attribution of the shipped tiny-ar on CPU: full precision, full precision with another
# projection seed (the noise floor), RTN 8-bit, GPTQ 4-bit and GPTQ 2-bit; each compared with fp.
set -euo pipefail
OUT=${1:-results/attribution-builtin}
COMMON="--model tiny-ar --limit 60 --queries humaneval,mbpp --query-limit 10 --top-k 10"
qrobust attribute $COMMON --out $OUT/fp
qrobust attribute $COMMON --projection-seed 1 --out $OUT/fp-seed1
qrobust attribute $COMMON --method rtn --bits 8 --out $OUT/rtn-8
qrobust attribute $COMMON --method gptq --bits 4 --out $OUT/gptq-4
qrobust attribute $COMMON --method gptq --bits 2 --out $OUT/gptq-2
for run in fp-seed1 rtn-8 gptq-4 gptq-2; do
  echo "fp vs $run: $(qrobust attribute-compare $OUT/fp $OUT/$run)"
done
