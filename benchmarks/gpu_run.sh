#!/usr/bin/env bash
# Everything the GPU run needs, in one command (device time is scarce):
#   bash benchmarks/gpu_run.sh "$OUT"
set -u
out=${1:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/device.txt"
for sc in ${SCENES:-small_256_b1 small_256_b32 face_512_b1 face_512_b8}; do
  timeout ${SCENE_TIMEOUT:-240} python benchmarks/raster.py --scenes $sc --workloads ${WORKLOADS:-soft_rgb_k10,soft_sil_k50,hard_k1} \
     --repeats 20 --out "$out/raster_$sc.json" 2>&1 | grep -v "^#\|^| scene\|^|---" | tee -a "$out/raster.md"
done
