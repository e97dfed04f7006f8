#!/usr/bin/env bash
# Run the tests (installs what they need on first use): ruff, the whole suite on ComfyUI 0.3.75 (.venv), then the
# ComfyUI-facing tests again on ComfyUI 0.33.0 (.venv-033, tree in .comfy-033/). Arguments go to both pytest runs;
# arguments that name tests (tests/...) replace the 0.33 selection. EPD_TREES="0.3.75" (or "0.33.0") runs one tree.
set -uo pipefail
cd "$(dirname "$0")/.."
TREES="${EPD_TREES:-0.3.75 0.33.0}"
parts=(browser)
[[ " $TREES " == *" 0.3.75 "* ]] && parts+=(base)
[[ " $TREES " == *" 0.33.0 "* ]] && parts+=(comfy033)
bash scripts/setup_env.sh "${parts[@]}" || exit 1
VENV="${EPD_VENV:-.venv}"

# The tests that run ComfyUI: every layer but the core one.
COMFY_TESTS=(-m "not core")
for arg in "$@"; do
  [[ "$arg" == tests/* ]] && COMFY_TESTS=() && break
done

rc=0
if [[ " $TREES " == *" 0.3.75 "* ]]; then
  "$VENV/bin/ruff" check . || rc=1
  echo "[test] ComfyUI 0.3.75: the whole suite" >&2
  start=$SECONDS
  "$VENV/bin/python" -m pytest "$@" || rc=1
  echo "[test] ComfyUI 0.3.75 took $((SECONDS - start)) s" >&2
fi
if [[ " $TREES " == *" 0.33.0 "* ]]; then
  echo "[test] ComfyUI 0.33.0: the ComfyUI-facing tests" >&2
  start=$SECONDS
  COMFYUI_PATH="$PWD/.comfy-033/ComfyUI" .venv-033/bin/python -m pytest "${COMFY_TESTS[@]}" "$@" || rc=1
  echo "[test] ComfyUI 0.33.0 took $((SECONDS - start)) s" >&2
fi
exit "$rc"
