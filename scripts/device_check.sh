#!/usr/bin/env bash
# The accelerator check (issues 17, 27) as ONE command that fits one device call (~9 minutes):
#
#   OUT=/some/folder bash scripts/device_check.sh        # on the GPU machine (stages' limits sum to 540 s)
#   DRY_RUN=1 OUT=/tmp/dc bash scripts/device_check.sh   # rehearsal on a CPU: the same stages, phases and
#                                                         # A/B list, only the sizes shrunk
#
# docs/benchmarks.md ("Running the device check") gives the exact device call.  Each stage has
# its own time limit, writes its log under $OUT and prints its tail, so one failing stage costs
# only its own minutes.  Needs nothing from the network.  The GPU image lacks datasets,
# tensorboardX and zstandard: mlmtool imports them lazily (TensorBoard files are then skipped),
# and the rehearsal hides them too.  The text for the real training loop is Jane Austen's
# novels, carried along as .devdata/en_austen.txt.xz (copy ../shared/corpora/en_austen.txt.xz).
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

if [ -n "${DRY_RUN:-}" ]; then  # the same stages, phases and A/B list with sizes a CPU runs
  SMOKE=(--smoke)
  TRAIN_PRESET=tiny; TRAIN_BATCH=4; TRAIN_STEPS=20; LOG_EVERY=5; VOCAB=2000; SEQ=32  # = the smoke tiny
  HIDE=/tmp/device-check-absent  # the packages the GPU image lacks, absent here too
  for m in datasets tensorboardX zstandard; do
    mkdir -p "$HIDE/$m"; echo 'raise ImportError("not on the device machine (device_check.sh DRY_RUN)")' >"$HIDE/$m/__init__.py"
  done
  export PYTHONPATH="$HIDE:$PYTHONPATH"
else
  SMOKE=()
  TRAIN_PRESET=roberta-base; TRAIN_BATCH=256; TRAIN_STEPS=200; LOG_EVERY=50; VOCAB=50265; SEQ=128
fi
KTESTS="cudnn or selects"

stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null; \
  $PY -c 'import jax, flax, optax, transformers, torch; print(jax.__version__, jax.devices(), flax.__version__, optax.__version__, transformers.__version__, torch.__version__)'; \
  for m in datasets tensorboardX zstandard; do $PY -c \"import \$m\" 2>/dev/null && echo \"\$m: present\" || echo \"\$m: absent\"; done"

# Does every kernel compute the same logits on this backend (cuDNN against XLA included)?
stage kernels 60 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "$KTESTS"

# Throughput, MFU, memory of roberta-base@128 and modernbert-base@1024 bf16, the
# transformers+torch.compile peer on the same batches, profiles, kernel A/B (--device-check).
stage bench 285 "$PY" scripts/bench_accel.py --device-check "${SMOKE[@]}" --json-out "$OUT/accel.json"

# The real loop on real text: init -> tokenizer -> prepare -> train --dry-run (its projection)
# -> train (bf16, the first program loads from the compilation cache the dry run filled; 5
# steps profiled into DIR/profile/).
M=/tmp/device-check-model
rm -rf "$M"
TRAIN_ARGS="--dtype bfloat16 --per-device-train-batch-size $TRAIN_BATCH --max-steps $TRAIN_STEPS \
  --learning-rate 5e-4 --warmup-steps 20 --logging-steps $LOG_EVERY --save-steps 100000"
stage train 160 bash -c "set -e; $PY -m mlmtool init $M --preset $TRAIN_PRESET && \
  $PY -m mlmtool tokenizer $M $CORPUS --vocab-size $VOCAB && \
  $PY -m mlmtool prepare $M $CORPUS --max-seq-length $SEQ && \
  $PY -m mlmtool train $M $TRAIN_ARGS --dry-run && \
  t0=\$(date +%s) && $PY -m mlmtool train $M $TRAIN_ARGS --profile-steps 5 && echo \"train wall \$(( \$(date +%s) - t0 )) s\" && \
  cp $M/metrics.jsonl $OUT/train-metrics.jsonl"

# The table, the real loop beside the bare step, the goals; accel.json gains "train_loop".
stage summary 20 "$PY" scripts/bench_accel.py --summarize "$OUT/accel.json" \
  --train-metrics "$OUT/train-metrics.jsonl" --train-batch "$TRAIN_BATCH"
echo "total: $(( $(date +%s) - START ))s"
