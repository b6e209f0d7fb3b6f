#!/usr/bin/env bash
# One device command for what only a GPU checks: the test files that take CUDA where it is there
# (CUDA graphs, the Triton and Gluon kernels, Hopper's fragments layout) and the engine's
# reproducibility check (engine_determinism.py). From the repository root:
#   bash benchmarks/gpu_tests.sh
# Writes $OUT/gpu_tests.log and $OUT/determinism.log (OUT defaults to runs/gpu_tests); TESTS_S
# bounds the tests' time (default 360 s), so the check still runs after a hang.
set -uo pipefail
OUT=${OUT:-runs/gpu_tests}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout "${TESTS_S:-360}" python3 -m pytest -q -p no:cacheprovider tests/test_decode.py tests/test_engine.py \
  tests/test_fragments.py tests/test_kernels.py tests/test_packed_matmul.py >"$OUT/gpu_tests.log" 2>&1
rc=$?
(cd benchmarks && timeout 180 python3 engine_determinism.py) >"$OUT/determinism.log" 2>&1 || rc=1
tail -6 "$OUT/gpu_tests.log"
grep -v Warning "$OUT/determinism.log"
exit $rc
