#!/usr/bin/env bash
# A/B of the library on one machine: a base copy of its packages (an earlier commit) against this
# working tree, alternating run by run, with engine_gpu.py's parts; one merged file per part
# (benchmarks/ab_merge.py). The benchmark code is the tree's for both.
#   on CPU, before the lease (ab_base/ is ignored; carry it):
#     mkdir -p ab_base && git archive BASE qrobust harness hawq ':(exclude)qrobust/zoo/models' | tar -x -C ab_base
#   on the GPU machine:
#     PARTS=products,variants BITS=16,4,2 REPEATS=2 NOTE="BASE against ..." bash benchmarks/ab_gpu.sh
# Writes $OUT/ab_<part>.json and prints their summary. ARGS go to engine_gpu.py (--tiny --device cpu
# runs the mechanics on a CPU).
set -euo pipefail
BASE_DIR=${BASE_DIR:-ab_base}
PARTS=${PARTS:-products,variants}
BITS=${BITS:-16,4,2}
REPEATS=${REPEATS:-2}
ARGS=${ARGS:-}
NOTE=${NOTE:-}
OUT=${OUT:-runs/ab}
[ -d "$BASE_DIR/qrobust" ] || { echo "ab_gpu.sh: no $BASE_DIR/qrobust; make it with git archive (see the top of this file)" >&2; exit 2; }
tree=$PWD
runs=$(mktemp -d)
base="$runs/base_library"  # a copy, with the tree's built-in models linked in (the archive leaves them out)
cp -r "$BASE_DIR" "$base"
[ -e "$base/qrobust/zoo/models" ] || ln -s "$tree/qrobust/zoo/models" "$base/qrobust/zoo/models"
for r in $(seq "$REPEATS"); do
  for library in base tree; do
    root=$tree
    [ "$library" = base ] && root=$base
    log="$runs/$library$r.log"
    echo "$library $r ..."
    # shellcheck disable=SC2086
    if ! (cd benchmarks && PYTHONPATH="$root:." python3 engine_gpu.py --parts "$PARTS" --bits "$BITS" $ARGS \
          --out "$runs/$library$r" >"$log" 2>&1); then
      tail -20 "$log" >&2
      exit 1
    fi
  done
done
python3 benchmarks/ab_merge.py "$runs" --out "$OUT" --note "$NOTE"
