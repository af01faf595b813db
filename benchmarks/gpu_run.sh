#!/usr/bin/env bash
# The prepared one-call check for a lent H100 / H200 (the device tool's `run`): the CIFAR-10 recipe
# for as many epochs as fit in $MINUTES of pretraining (bf16, ResNet-18, batch 512), then the frozen
# encoder's linear probe and kNN; the results JSON and the log land in $OUT.
#
# Prepared here first (the device reaches no network and takes 64 MiB with the working tree):
#   echo /.whl/ >> .git/info/exclude; echo /.devdata/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl ml-collections tensorboardX grain array-record \
#       portpicker   # not in its image
#   python benchmarks/recipe_run.py --data-dir ../shared/tensorflow_datasets \
#       --pack .devdata/cifar_pack.npz --pack-train 15000 --pack-test 5000  # 54.4 MiB
# then, as one call: run(command="bash benchmarks/gpu_run.sh", carry=[".whl", ".devdata"],
# timeout_s=600), and copy $OUT's JSON into benchmarks/results/ with the card's name in the commit.
set -euo pipefail
rm -rf /tmp/recipe
MINUTES=${MINUTES:-5}
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" ||
  echo "no nvidia-smi" | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
python3 benchmarks/recipe_run.py --npz .devdata/cifar_pack.npz --minutes "$MINUTES" \
  --workdir /tmp/recipe --out "$OUT" "$@" 2>&1 | tee "$OUT/recipe.log"  # "$@": more options
