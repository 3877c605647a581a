#!/usr/bin/env bash
# Everything measured on a GPU machine, in one run (about 10 minutes on one H200):
#   1. benchmarks/gpu_throughput.py: ResNet-50 training (fp32, bf16, compiled), the frozen pass
#      per engine, the compile break-even, the input pipeline and input_decode="auto";
#   2. benchmarks/compile_training.py on CUDA: Lite0 and ResNet-18, batch 32, bf16 (COMPILE_TRIAL=1:
#      also compile="auto"'s trial verdict, about a minute more per trunk; raise T_COMPILE);
#   3. the tests that train, cache, export and decode, with device="auto" resolving to CUDA.
# Logs and JSON go to $OUT (default ./gpu-results). Run from the repository root:
#   bash benchmarks/gpu_run.sh
#   PARTS="tests compile" COMPILE_ONLY=resnet18 bash benchmarks/gpu_run.sh   # some parts only
# The parts' time limits add up to 12 minutes (T_THROUGHPUT 300 + T_COMPILE 300 + T_TESTS 130 s):
# where one command may run 10 minutes at most, run two, PARTS="throughput tests", then PARTS=compile.
# The run exits non-zero when any part fails (its exit status, or the tests').
set -u -o pipefail
status=0
failed() {  # exit status, what failed, the variable of its time limit
    status=$1
    local why=""
    [[ $1 == 124 && -n ${3:-} ]] && why=": its time limit $3 ran out"
    echo "gpu_run.sh: $2 failed (exit $1$why)" >&2
}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
PARTS=${PARTS:-throughput compile tests}
want() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt" \
    || failed $? "nvidia-smi (no NVIDIA driver here?)"
$PY -c "import torch, timm, onnxruntime as o; print('torch', torch.__version__, 'timm', timm.__version__,
'onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a "$OUT/gpu.txt"
# the real JPEGs of hymenoptera when $TRANSFERKIT_DATA holds them (else 512 synthetic JPEGs)
if want throughput; then
    timeout "${T_THROUGHPUT:-300}" $PY benchmarks/gpu_throughput.py 2>&1 | tee "$OUT/gpu_throughput.log" \
        || failed $? gpu_throughput.py T_THROUGHPUT
fi
if want compile; then
    timeout "${T_COMPILE:-300}" $PY benchmarks/compile_training.py --device cuda --precision bf16 ${COMPILE_TRIAL:+--trial} \
        --steps 50 --threads 8 ${COMPILE_ONLY:+--only $COMPILE_ONLY} 2>&1 | tee "$OUT/compile_training.log" \
        || failed $? compile_training.py T_COMPILE
fi
# the tests that train on device="auto" (CUDA here), without the shared data (TEST_DATA names it);
# a test that assumes a CPU shows as a failure
want tests || exit $status
# in parallel where pytest-xdist is installed (the GPU machine's image has it; the dev extras do not)
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
TRANSFERKIT_DATA=${TEST_DATA:-/nonexistent} timeout "${T_TESTS:-130}" $PY -m pytest -q -p no:cacheprovider $XDIST \
    --timeout 120 -o addopts="" -m "not slow" \
    tests/test_end_to_end.py tests/test_policies_training.py tests/test_policies_frozen_bn.py \
    tests/test_train_cache.py tests/test_export.py tests/test_gpu_jpeg.py tests/test_speed.py \
    tests/test_train_engines.py tests/test_train_resume.py tests/test_feature_store.py tests/test_policies_lora.py \
    tests/test_cuda.py \
    --tb=short -rfE > "$OUT/pytest_cuda.log" 2>&1 || failed $? "the tests" T_TESTS
tail -40 "$OUT/pytest_cuda.log"
exit $status  # a failing part or test fails the run
