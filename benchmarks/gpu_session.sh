#!/usr/bin/env bash
# Issue 16's device session in one command: every GPU figure, written under $OUT. Run from the repo
# root on a lent GPU, with the transformers wheel the project needs carried along (the image has an
# older one). On this workplace's device tool:
#
#   mkdir -p build/whl && python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d build/whl transformers==5.24.0
#   run(command="bash benchmarks/gpu_session.sh", carry=["build/whl"], timeout_s=600)
#
# About 5-6 minutes on an H100, at most 9.5 (each step has its own timeout, 90 + 330 + 150 s, and a
# failing step does not stop the next): the GPU tests, the serving benchmark (item 1), the
# training-step baseline (item 2).
# TINY=1 rehearses the script itself on a CPU (tiny shapes, one short run each).
set -uo pipefail
TINY=${TINY:-0}
SERVING_ARGS=()
TRAIN_ARGS=(--preset reference --s1-batches 128 --s2-batches 4,8)
if [ "$TINY" = 1 ]; then
    SERVING_ARGS=(--tiny --new-tokens 8 --repeats 1)
    TRAIN_ARGS=(--preset tiny --device cpu --steps 1 --warmup 1 --s1-batches 2 --s2-batches 2)
fi
OUT=${OUT:-/tmp/seechat-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
PY=${PY:-python3}
if ls build/whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site build/whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || echo "wheel install failed" | tee -a "$OUT/env.txt"
else
    export PYTHONPATH=$PWD
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    uptime
} 2>&1 | tee -a "$OUT/env.txt"

echo "== GPU tests" | tee "$OUT/tests.log"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/infer/test_gpu.py tests/benchmarks/test_bench_gpu_serving.py \
    2>&1 | tee -a "$OUT/tests.log"

echo "== serving benchmark (item 1)" | tee "$OUT/serving.log"
timeout 330 $PY benchmarks/bench_gpu_serving.py "${SERVING_ARGS[@]}" --json "$OUT/serving.json" 2>&1 | tee -a "$OUT/serving.log"

echo "== training-step baseline (item 2)" | tee "$OUT/train_step.log"
timeout 150 $PY benchmarks/bench_train_step.py "${TRAIN_ARGS[@]}" --json "$OUT/train_step.json" 2>&1 | tee -a "$OUT/train_step.log"
date -u | tee -a "$OUT/env.txt"
