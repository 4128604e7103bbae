#!/usr/bin/env bash
# Everything the GPU run needs, in one command (device time is scarce):
#   bash benchmarks/gpu_run.sh "$OUT"
# One process per scene x workload, so each peak-memory figure is its own.
set -u
out=${1:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/device.txt"
for sc in ${SCENES:-small_256_b1 small_256_b32 face_512_b1 face_512_b8}; do
  for wl in ${WORKLOADS:-soft_rgb_k10 soft_sil_k50 hard_k1}; do
    timeout ${RUN_TIMEOUT:-120} python benchmarks/raster.py --scenes $sc --workloads $wl --repeats 20 \
       --out "$out/raster_${sc}_${wl}.json" ${EXTRA:-} 2>&1 | grep -v "^#\|^| scene\|^|---" | tee -a "$out/raster.md"
  done
done
