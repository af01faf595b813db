#!/usr/bin/env bash
# The prepared GPU calls (issue #34; the device tool's `run`), one NVIDIA H200, accuracy first:
#   bash benchmarks/gpu_run.sh recipe   # call 1: the CIFAR-10 recipe on all 50,000 / 10,000
#                                       # images of the pack, ends by 540 s (9 minutes)
#   DEADLINE_S=N bash benchmarks/gpu_run.sh speed   # call 2, at once on the warm machine:
#                                       # throughput bf16 / float32 with MFU, PyTorch beside it
# docs/gpu.md says what each runs, how to prepare them (the pack, the pinned wheels, the size
# check: python benchmarks/gpu_plan.py check recipe|speed), the exact device calls and what
# comes back; benchmarks/gpu_plan.py holds the budget; gpu_run.py runs the parts.
#
# Here: refuses a wheel folder other than benchmarks/device_wheels.txt's pins (exit 2), installs
# the wheels into $SITE, writes the card and the library versions to $OUT/<call>-gpu.txt, then
# runs gpu_run.py, its output teed to $OUT/<call>.log. Its record is $OUT/<card>-<call>.json.
#
# Settings (environment): DEADLINE_S (the call's deadline, default the plan's), EPOCHS (exact
# epochs instead of the plan's), KNN_EVERY, PARTS (a subset of the call's parts), DATA_DIR (the
# pack), OUT, WHEELS (.whl; empty: install nothing), SITE, PYTHON (python3); further options of
# gpu_run.py after the call's name.
set -uo pipefail  # not -e: a failing part is recorded and the next one runs
T0=$(date +%s)
CALL=${1:-}
case "$CALL" in
  recipe) LIBS="jax jaxlib flax optax orbax.checkpoint ml_collections grain array_record etils \
tensorboardX PIL sklearn matplotlib" ;;
  speed) LIBS="jax jaxlib flax optax ml_collections grain etils torch" ;;
  *) echo "usage: bash benchmarks/gpu_run.sh recipe|speed [gpu_run.py options]" >&2; exit 2 ;;
esac
shift
OUT=${OUT:-benchmarks/results/gpu_run}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
ARGS=("$CALL" --out "$OUT" --started-at "$T0")
[ -n "${EPOCHS:-}" ] && ARGS+=(--epochs "$EPOCHS")
[ -n "${KNN_EVERY:-}" ] && ARGS+=(--knn-every "$KNN_EVERY")
[ -n "${DEADLINE_S:-}" ] && ARGS+=(--deadline-s "$DEADLINE_S")
[ -n "${PARTS:-}" ] && ARGS+=(--parts "$PARTS")
[ -n "${DATA_DIR:-}" ] && ARGS+=(--data-dir "$DATA_DIR")
{
  echo "[gpu_run.sh] $(date -u +%FT%TZ) $CALL: start"
  if [ -n "$WHEELS" ]; then
    # A second version of one package, or one other than its pin, breaks every part's imports.
    "$PYTHON" benchmarks/gpu_plan.py wheels "$WHEELS" || exit 2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl || echo "[gpu_run.sh] pip install failed"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
      --format=csv || echo "no nvidia-smi"; } > "$OUT/$CALL-gpu.txt" 2>&1
  "$PYTHON" - $LIBS >> "$OUT/$CALL-gpu.txt" 2>&1 <<'EOF'
import importlib
import sys

print("python", sys.version.split()[0])
for name in sys.argv[1:]:
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # the part that needs it will fail and say so
        print(name, "MISSING:", type(err).__name__, err)
import jax

print(jax.devices())
EOF
  cat "$OUT/$CALL-gpu.txt"
  echo "[gpu_run.sh] +$(( $(date +%s) - T0 ))s set-up done"
  "$PYTHON" benchmarks/gpu_run.py "${ARGS[@]}" "$@"
} 2>&1 | tee "$OUT/$CALL.log"
