#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (a few minutes on one H100/H200):
#   1. the GPU-marked tests (bf16 coalescing within tolerance, exact pinned offload round trip);
#   2. `turboserve profile` of the 1.3B causal DiT (random weights, bf16) at the demo91 geometry
#      (208x112 video, one latent frame per chunk) and at 480p, batches up to the memory's reach;
#   3. offload and migration benchmarks through the real executor on the device;
#   4. `turboserve generate` of the 1.3B model at 480p, end to end to an MP4.
# Each step has its own time limit and writes into OUT, so a slow step loses only itself.
#
#   bash scripts/gpu_check.sh OUT_DIR          (DEVICE=cpu MODEL=tiny for a dry run without a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}" MODEL="${MODEL:-wan1.3b}"  # DEVICE=cpu MODEL=tiny: a dry run of the script itself
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/steps.log"  # every step's full output, one file (the caller may fetch few files)
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, append its output to LOG, print its tail
  local name=$1 limit=$2; shift 2
  local start=$SECONDS part
  part=$(mktemp)
  timeout "$limit" "$@" >"$part" 2>&1
  local rc=$?
  { echo "== $name: rc=$rc in $((SECONDS - start)) s: $*"; tr '\r' '\n' <"$part"; } >>"$LOG"
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  tr '\r' '\n' <"$part" | grep -v 'point/s\|point\]' | tail -n 18
  rm -f "$part"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"

step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider tests/models/test_models_gpu.py
step profile_demo91 240 python3 -m turboserve.cli profile --model "$MODEL" --device "$DEVICE" --size 208x112 \
  --frames-per-chunk 4 --batches 1,2,4,8,16,32 --contexts 0,10,20 --name demo91 --out "$OUT/h200-demo91.json"
step profile_480p 300 python3 -m turboserve.cli profile --model "$MODEL" --device "$DEVICE" --batches 1,2,4 \
  --contexts 0,-1 --name wan1.3b-480p --out "$OUT/h200-wan1.3b-480p.json"
step offload 120 python3 bench/offload.py --device "$DEVICE" --sizes-mib 16,256,1024,4096 --json "$OUT/offload.json"
step migration 150 python3 bench/migration.py --device "$DEVICE" --sizes-mib 16,256,1024 --json "$OUT/migration.json"
step generate 150 python3 -m turboserve.cli generate --model "$MODEL" --device "$DEVICE" --chunks 4 \
  --prompt "a lighthouse in a storm" --out "$OUT"
ls -la "$OUT"
