#!/usr/bin/env bash
# One device call: fast-path benchmarks on the BENCHMARKS scenes, a kernel profile, then the GPU tests.
#   bash benchmarks/gpu_check.sh "$OUT"
# Env: ROWS="scene:workload[:field=value,...] ..." (default: the issue's five targets; the optional third part sets
#      RasterSettings fields for that row, e.g. face_512_b8:soft_sil_k50:pallas_unroll=8,pallas_merge=true),
#      PROFILE ("scene workload [--fwd]" entries, ";"-separated),
#      TESTS (pytest args), TESTK (its -k expression), TEST_TIMEOUT (s), EXTRA (raster.py args).
set -u
out=${1:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/device.txt"
for row in ${ROWS:-face_512_b8:soft_rgb_k10 face_512_b8:hard_k1 small_256_b32:soft_rgb_k10 face_512_b8:soft_sil_k50 small_256_b32:soft_sil_k50}; do
  IFS=: read -r sc wl fields <<< "$row"
  sets=(); tag=""
  for kv in ${fields//,/ }; do sets+=(--set "$kv"); tag="${tag}_${kv//=/-}"; done
  timeout ${RUN_TIMEOUT:-150} python benchmarks/raster.py --scenes $sc --workloads $wl --repeats 20 "${sets[@]}" \
     --out "$out/raster_${sc}_${wl}${tag}.json" ${EXTRA:-} 2>&1 | grep "^| [a-z]" | grep -v "^| scene" \
     | sed "s/\$/ ${fields}/" | tee -a "$out/raster.md"
done
# PROFILE: ';'-separated "scene workload [--fwd]" entries
IFS=';' read -ra profs <<< "${PROFILE:-}"
for p in "${profs[@]}"; do
  timeout 120 python benchmarks/profile_kernels.py raster $p --top ${TOP:-20} 2>&1 | grep -v "^E1\|^ \|^This\|^If\|^Constant\|^$" | tee -a "$out/profile.md"
done
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-200} python -m pytest -q -x $TESTS ${TESTK:+-k "$TESTK"} 2>&1 | tee "$out/tests.log" | tail -30
fi
