#!/usr/bin/env bash
# The prepared one-call run for a lent GPU (issue #24; the device tool's `run`), one NVIDIA H200:
# in order, each part in its own process under one deadline (benchmarks/gpu_run.py says how):
#   1. the CIFAR-10 recipe (configs/cifar_simclr.py: ResNet-18, batch 512, LARS, bf16) on all of
#      CIFAR-10 packed in .devdata/cifar10_pack, streamed to the device by host threads, for
#      $MINUTES of pretraining, the kNN monitor every $KNN_EVERY epochs (the accuracy-vs-epoch
#      curve); then the frozen linear probe and kNN on all 50,000 train labels and the 10,000
#      test images; then fine-tune vs scratch, 10 epochs each, every train label;
#   2. benchmarks/throughput.py, bf16 then float32: the pretrain step's images/s and MFU against
#      the card's measured bf16 / float32 matmul peak (a 16384^2 matmul, in the same run);
#   3. benchmarks/vs_torch.py: the project's bf16 step interleaved with torch_reference's step
#      tuned for the GPU (channels_last, bf16 autocast, torch.compile): both images/s, MFU, the
#      ratio; once more without torch.compile if that fails.
# Everything lands in $OUT, 6 files: gpu.txt (card, driver, library versions), gpu_run.log,
# gpu_run.json (every part's JSON, status, exit code and wall time, and a headline),
# knn_curve.png, pretrain.png and the recipe's metrics.jsonl.
#
# Planned on the H200 from its measured 43,000 images/s and 26-28 s compiles (benchmarks/results/
# nvidia-h200-*): set-up ~15 s; the recipe ~5.5 min (data ~10 s, compile ~30 s, 3 min of
# pretraining = ~155 epochs, 6 kNN checks ~20 s, features + probe + kNN on all labels ~40 s,
# fine-tune vs scratch ~60 s); throughput ~80 s; PyTorch ~100 s (torch.compile's first compile is
# the least known); ~8.3 min in all. No part runs past DEADLINE_S (570 s) after the start: the
# recipe keeps 180 s for the parts after it (gpu_run.py --reserve-s), and a part out of time is
# stopped, recorded, and the next one runs.
#
# Prepared on this machine first (the device reaches no network; 64 MiB travel with the tree):
#   EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"   # (holds both already)
#   grep -qx /.whl/ "$EXCLUDE" || echo /.whl/ >> "$EXCLUDE"
#   grep -qx /.devdata/ "$EXCLUDE" || echo /.devdata/ >> "$EXCLUDE"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl ml-collections tensorboardX grain array-record \
#       portpicker   # not in its image (4.5 MiB); flax, optax, orbax, tqdm were (earlier runs);
#   # PIL (decoding the pack) comes with torchvision; without matplotlib the PNGs are skipped
#   # (recorded) and drawn here later: python benchmarks/gpu_run.py --draw OUT_DIR
#   python -m simclr_jax.pack --tfds cifar10 --data-dir ../shared/tensorflow_datasets \
#       .devdata/cifar10_pack --encoding jpeg --quality 98   # all 60,000 images: 55.0 MiB
#   # (JPEG 4:4:4, optimised tables; mean abs error 0.45 grey levels: benchmarks/README.md,
#   # "Carrying all of CIFAR-10 to the device"); 60.9 MiB with the wheels and the tree
#   du -shc .whl .devdata $(git ls-files)   # all of it under 64 MiB (the tree is ~1.4 MB)
# then, as one call:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl", ".devdata"], timeout_s=600)
# and copy $OUT's files into benchmarks/results/ (the card's name in the commit).
#
# Settings (environment): MINUTES (3), EPOCHS (0: as many as fit MINUTES), KNN_EVERY (25),
# DEADLINE_S (570), PARTS (recipe,throughput,torch), DATA_DIR (.devdata/cifar10_pack), OUT,
# WHEELS (.whl; empty: install nothing), PYTHON (python3); further options of gpu_run.py in "$@".
set -uo pipefail  # not -e: a failing part is recorded and the next one runs
T0=$(date +%s)
OUT=${OUT:-benchmarks/results/gpu_run}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
ARGS=(--out "$OUT" --started-at "$T0")
[ -n "${MINUTES:-}" ] && ARGS+=(--minutes "$MINUTES")
[ -n "${EPOCHS:-}" ] && ARGS+=(--epochs "$EPOCHS")
[ -n "${KNN_EVERY:-}" ] && ARGS+=(--knn-every "$KNN_EVERY")
[ -n "${DEADLINE_S:-}" ] && ARGS+=(--deadline-s "$DEADLINE_S")
[ -n "${PARTS:-}" ] && ARGS+=(--parts "$PARTS")
[ -n "${DATA_DIR:-}" ] && ARGS+=(--data-dir "$DATA_DIR")
{
  echo "[gpu_run.sh] $(date -u +%FT%TZ) start"
  if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl || echo "[gpu_run.sh] pip install failed"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
      --format=csv || echo "no nvidia-smi"; } > "$OUT/gpu.txt" 2>&1
  "$PYTHON" - >> "$OUT/gpu.txt" 2>&1 <<'EOF'
import importlib
import sys

print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain",
             "array_record", "etils", "tensorboardX", "PIL", "sklearn", "matplotlib", "torch"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # the part that needs it will fail and say so
        print(name, "MISSING:", type(err).__name__, err)
import jax

print(jax.devices())
EOF
  cat "$OUT/gpu.txt"
  echo "[gpu_run.sh] +$(( $(date +%s) - T0 ))s set-up done"
  "$PYTHON" benchmarks/gpu_run.py "${ARGS[@]}" "$@"
} 2>&1 | tee "$OUT/gpu_run.log"
