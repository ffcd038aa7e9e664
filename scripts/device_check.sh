#!/usr/bin/env bash
# The accelerator check (issue 17) as ONE command, for the few minutes a GPU is lent:
#
#   OUT=/some/folder bash scripts/device_check.sh        # on the GPU machine (at most 9.7 minutes)
#   DRY_RUN=1 OUT=/tmp/dc bash scripts/device_check.sh   # rehearsal on a CPU, tiny sizes (about 3 minutes)
#
# Each stage has its own time limit, writes its log under $OUT and prints its tail, so one
# failing stage costs only its own minutes.  Needs nothing from the network: the packages the
# GPU image lacks (datasets, tensorboardX, zstandard) are imported lazily by mlmtool, and the
# text for the real training loop is Jane Austen's novels, carried along as
# .devdata/en_austen.txt.xz (copy ../shared/corpora/en_austen.txt.xz there first).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MLMTOOL_COMPILATION_CACHE=/tmp/mlmtool-jax-cache XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
START=$(date +%s)
CORPUS=${CORPUS:-.devdata/en_austen.txt.xz}

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, print the tail
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "== $name: exit $rc after $(( $(date +%s) - START ))s"
}

if [ -n "${DRY_RUN:-}" ]; then  # the same stages with sizes a CPU runs in seconds
  BENCH=(--smoke --compile-ab tiny --budget 100)
  TRAIN_PRESET=tiny; TRAIN_BATCH=16; TRAIN_STEPS=20; LOG_EVERY=5; VOCAB=2000; KTESTS="cudnn or selects"
else
  BENCH=(--find-max --compile-ab roberta-large --profile /tmp/mlmtool-profile --budget 270)
  TRAIN_PRESET=roberta-base; TRAIN_BATCH=256; TRAIN_STEPS=200; LOG_EVERY=50; VOCAB=50265; KTESTS="cudnn or every_kernel or dropout_kernels or scanned_layers or selects"
fi

stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null; \
  $PY -c 'import jax, flax, optax, transformers, torch; print(jax.__version__, jax.devices(), flax.__version__, optax.__version__, transformers.__version__, torch.__version__)'"

# Does every kernel compute the same logits on this backend (cuDNN against XLA included)?
stage kernels 100 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "$KTESTS"

# Throughput, MFU, memory, compile time, the torch.compile peer, kernel A/B.
stage bench 300 "$PY" scripts/bench_accel.py "${BENCH[@]}" --json-out "$OUT/accel.json"

# The real loop: init -> tokenizer -> prepare -> train (bf16) on real text; its tokens/s.
M=/tmp/device-check-model
rm -rf "$M"
stage train 150 bash -c "set -e; $PY -m mlmtool init $M --preset $TRAIN_PRESET && \
  $PY -m mlmtool tokenizer $M $CORPUS --vocab-size $VOCAB && \
  $PY -m mlmtool prepare $M $CORPUS --max-seq-length 128 && \
  $PY -m mlmtool train $M --dtype bfloat16 --per-device-train-batch-size $TRAIN_BATCH --max-steps $TRAIN_STEPS \
    --learning-rate 5e-4 --warmup-steps 20 --logging-steps $LOG_EVERY --save-steps 100000 && \
  cp $M/metrics.jsonl $OUT/train-metrics.jsonl"
echo "total: $(( $(date +%s) - START ))s"
