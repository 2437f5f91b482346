#!/usr/bin/env bash
# The next device session's commands (issues 13 and 16), every figure written under $OUT. Run from
# the repo root on a lent GPU, with the wheels the device image lacks carried along. Here, once:
#
#   mkdir -p build/whl && python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d build/whl transformers==5.24.0 braceexpand==0.1.7
#
# Then, 15 minutes of device time (a start costs ~35 s; a warm machine goes back after 30 s idle):
#
#   run(command="bash benchmarks/gpu_session.sh lm", carry=["build/whl"], timeout_s=590)       # ~9.5 min
#   run(command="bash benchmarks/gpu_session.sh serving", carry=["build/whl"], timeout_s=540)  # ~5-7 min, at once
#   run(command="bash benchmarks/gpu_session.sh train", carry=["build/whl"], timeout_s=390)    # ~3-5 min
#   run(command="bash benchmarks/gpu_session.sh peer", carry=["build/whl"], timeout_s=170)     # ~1-2 min
#   run(command="bash benchmarks/gpu_session.sh compile", carry=["build/whl"], timeout_s=300)  # ~3-5 min
#
# (Not all fit one 15-minute session: for issue 16 run `serving` then `train` (about 10 minutes),
# then `peer` if `status` leaves 4 minutes, `compile` in a later session; for issue 13, `lm` alone.)
#
# lm:      the mini LM (issue 13) on fresh rows for LM_BUDGET seconds of training (default 400) with
#          the reading exam every EXAM_EVERY steps (default 1000) -> OUT/lm.tar.gz (weights, metrics,
#          exam.png, eval.json on the default world's val split) and OUT/summary.json. The probe
#          runs alone: nothing else may share the GPU while it measures the step rate.
# serving: the GPU tests, then the serving benchmark with a profile of one batch-1 request (issue
#          16 item 1: which kernels take a decode step, and how busy the GPU is), the compiled
#          static step (`EngineConfig.compile_decode`) timed and profiled beside the default,
#          and the static step attending over its whole KV slot (before column buckets) timed,
#          all with the engine's default KV slot (4096 tokens); the generic path is left out
#          (measured before). Each row starts its engine (the warm-up: KV pool, CUDA graphs,
#          compiling; its time is reported), runs, and is written before the next; a failing
#          row does not stop the others -> OUT/serving.json.
# train:   the training-step benchmark at the reference shapes (issue 16 item 2's baseline), stage 2
#          with activation checkpointing on every layer, every 2nd, every 4th and none
#          (`train.checkpoint_every`: recompute is not counted as model FLOPs, so it costs MFU);
#          then the padding-free test on CUDA (torch's varlen_attn) and stage 2 at the reference
#          recipe's step (batch 4 x 4 accumulated micro-batches) on conversations of 96-960 text
#          tokens, right-padded vs padding-free (`train.padding_free`)
#          -> OUT/train_step.json, OUT/train_step_padding_free.json; last, the LM head fused with the
#          loss (`train.fused_loss`, on in every row above) against the plain loss, alone, at the 7B's
#          head shape, with chunks of 2^25 (the default), 2^26 and 2^27 logits: time and peak memory
#          -> OUT/fused_loss.json.
# peer:    issue 16 item 2's side by side: the LLaVA-shaped reference (mlp2x_gelu, 576 image tokens)
#          trained by seechat and by transformers' LlavaForConditionalGeneration in a plain loop,
#          around the same modules (same weights, batch, bf16, checkpointing) -> OUT/train_peer.json.
# compile: `train.compile` (each LM layer's norms, attention and MLP through torch.compile): stage 1
#          at batch 128 and stage 2 at batch 8 with every layer checkpointed, the `train` rows'
#          shapes, compiled -> OUT/train_step_compiled.json.
# TINY=1 rehearses a part on a CPU (tiny shapes, one short run each).
# Full-width CPU rehearsals (real widths, heads, vocabulary, image size and bf16, `--layers` layers
# per tower; times on 2 cores):
#   serving (3.3 min): python benchmarks/bench_gpu_serving.py --layers 1 --new-tokens 4 --concurrency 1 2
#       --repeats 1 --profile --compile --whole-slot
#   peer (2.7 min):    python benchmarks/bench_train_step.py --preset reference-mlp --peer --layers 1
#       --device cpu --steps 1 --warmup 1 --s1-batches 2 --s2-batches 1
#   train's padding-free rows (5.5 min): python benchmarks/bench_train_step.py --preset reference --layers 2
#       --device cpu --steps 1 --warmup 1 --stages 2 --s2-batches 2 --grad-accum 2 --s2-checkpoint-every 2
#       --s2-text-range 96,960 --s2-padding-free 0,1
set -uo pipefail
PART=${1:-serving}
TINY=${TINY:-0}
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
} 2>&1 | tee -a "$OUT/env.txt"

case "$PART" in
lm)
    if [ "$TINY" = 1 ]; then
        DRY_RUN=1 ONLY=lm EXAM_EVERY=100 $PY docs/experiments/mini_experts/train_on_gpu.py "$OUT" 20 \
            lm=lm.batch_size=4,lm.hidden=32,lm.intermediate=64,lm.heads=2,lm.kv_heads=1 2>&1 | tee "$OUT/lm.log"
    else
        ONLY=lm EXAM_EVERY=${EXAM_EVERY:-1000} timeout 560 $PY docs/experiments/mini_experts/train_on_gpu.py \
            "$OUT" "${LM_BUDGET:-400}" > "$OUT/lm.log" 2>&1
        echo "lm rc $?"
        tail -c 3000 "$OUT/lm.log"
    fi
    ;;
serving)
    SERVING_ARGS=(--profile --compile --whole-slot)  # --generic: the generic path, measured before
    [ "$TINY" = 1 ] && SERVING_ARGS+=(--tiny --new-tokens 8 --repeats 1)
    echo "== GPU tests" | tee "$OUT/tests.log"
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/infer/test_gpu.py tests/benchmarks/test_bench_gpu_serving.py \
        2>&1 | tee -a "$OUT/tests.log"
    echo "== serving benchmark (item 1)" | tee "$OUT/serving.log"
    timeout 360 $PY benchmarks/bench_gpu_serving.py "${SERVING_ARGS[@]}" --json "$OUT/serving.json" 2>&1 \
        | tee -a "$OUT/serving.log"
    ;;
train)
    TRAIN_ARGS=(--preset reference --s1-batches 128 --s2-batches 4,8 --s2-checkpoint-every 1,2,4,0)
    [ "$TINY" = 1 ] && TRAIN_ARGS=(--preset tiny --device cpu --steps 1 --warmup 1 --s1-batches 2 --s2-batches 2 \
        --s2-checkpoint-every 1,2,0)
    PF_ARGS=(--preset reference --stages 2 --s2-batches 4 --grad-accum 4 --s2-checkpoint-every 1 \
        --s2-text-range 96,960 --s2-padding-free 0,1)
    [ "$TINY" = 1 ] && PF_ARGS=(--preset tiny --device cpu --steps 1 --warmup 1 --stages 2 --s2-batches 4 \
        --grad-accum 2 --s2-text-range 8,40 --s2-padding-free 0,1)
    timeout 220 $PY benchmarks/bench_train_step.py "${TRAIN_ARGS[@]}" --json "$OUT/train_step.json" 2>&1 \
        | tee "$OUT/train_step.log"
    echo "== the CUDA tests of padding-free attention and the fused loss, then varied lengths padded vs padding-free" | tee -a "$OUT/train_step.log"
    timeout 50 $PY -m pytest -q -p no:cacheprovider tests/model/test_varlen.py tests/model/test_fused_loss.py -k cuda \
        2>&1 | tee -a "$OUT/train_step.log"
    timeout 80 $PY benchmarks/bench_train_step.py "${PF_ARGS[@]}" --json "$OUT/train_step_padding_free.json" 2>&1 \
        | tee -a "$OUT/train_step.log"
    echo "== the LM head fused with the loss vs the plain loss, alone" | tee -a "$OUT/train_step.log"
    FUSED_ARGS=(--repeats 5 --warmup 1 --tokens 1024 4096 8192 --chunks 25 26 27)
    [ "$TINY" = 1 ] && FUSED_ARGS=(--device cpu --tokens 64 --hidden 64 --vocab 5000)
    timeout 40 $PY -m benchmarks.bench_fused_loss "${FUSED_ARGS[@]}" --json "$OUT/fused_loss.json" 2>&1 \
        | tee -a "$OUT/train_step.log"
    ;;
peer)
    PEER_ARGS=(--preset reference-mlp --peer --steps 3 --warmup 1 --s1-batches 16,32 --s2-batches 4)
    [ "$TINY" = 1 ] && PEER_ARGS=(--preset tiny-mlp --peer --device cpu --steps 1 --warmup 1 --s1-batches 2 \
        --s2-batches 2)
    timeout 150 $PY benchmarks/bench_train_step.py "${PEER_ARGS[@]}" --json "$OUT/train_peer.json" 2>&1 \
        | tee "$OUT/train_peer.log"
    ;;
compile)
    # train.compile's A/B partner is `train`'s stage-1 batch-128 and stage-2 batch-8, every-layer rows
    COMPILE_ARGS=(--preset reference --compile --warmup 3 --s1-batches 128 --s2-batches 8 --s2-checkpoint-every 1)
    [ "$TINY" = 1 ] && COMPILE_ARGS=(--preset tiny --compile --device cpu --steps 1 --warmup 1 --s1-batches 2 \
        --s2-batches 2)
    timeout 280 $PY benchmarks/bench_train_step.py "${COMPILE_ARGS[@]}" --json "$OUT/train_step_compiled.json" 2>&1 \
        | tee "$OUT/train_step_compiled.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh lm|serving|train|peer|compile" >&2
    exit 2
    ;;
esac
date -u | tee -a "$OUT/env.txt"
