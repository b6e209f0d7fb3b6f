#!/usr/bin/env bash
# One device command for what only a GPU checks: the test files that take CUDA where it is there
# (CUDA graphs, the Triton and Gluon kernels, Hopper's fragments layout), the engine's
# reproducibility check (engine_determinism.py) and its agreement with transformers' generate at
# the Qwen3-1.7B shape over two calls of one engine (engine_gpu.py --parts agreement). From the
# repository root:
#   bash benchmarks/gpu_tests.sh
# Writes gpu_tests.log, determinism.log, agreement.log and engine_agreement.json into $OUT
# (default runs/gpu_tests); TESTS_S bounds the tests' time (default 450 s), so the checks after
# them still run after a hang, and a test stuck for 120 s prints its stack into the log. On an H200
# the two checks took 72 s together (78b9927); the three limits add up to 570 s, inside a device
# command's 600.
set -uo pipefail
OUT=${OUT:-runs/gpu_tests}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout "${TESTS_S:-450}" python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120 --durations=10 \
  tests/test_decode.py tests/test_engine.py tests/test_nucleus.py \
  tests/test_fragments.py tests/test_kernels.py tests/test_packed_matmul.py >"$OUT/gpu_tests.log" 2>&1
rc=$?
(cd benchmarks && timeout 60 python3 engine_determinism.py) >"$OUT/determinism.log" 2>&1 || rc=1
out=$(realpath "$OUT")
(cd benchmarks && timeout 60 python3 engine_gpu.py --parts agreement --out "$out") >"$OUT/agreement.log" 2>&1 || rc=1
tail -18 "$OUT/gpu_tests.log"
grep -v Warning "$OUT/determinism.log"
grep -A40 "^agreement" "$OUT/agreement.log"
exit $rc
