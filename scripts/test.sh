#!/usr/bin/env bash
# Run the tests (installs what they need on first use): ruff, the whole suite on ComfyUI 0.3.75 (.venv), then the
# ComfyUI-facing tests again on ComfyUI 0.33.0 (.venv-033, tree in .comfy-033/). Arguments go to both pytest runs; a
# marker expression (-m EXPR) is combined with the 0.33 run's "not core", and arguments that name tests (tests/...)
# replace that selection. EPD_TREES="0.3.75" (or "0.33.0") runs one tree.
set -uo pipefail
cd "$(dirname "$0")/.."
TREES=()
for tree in ${EPD_TREES:-0.3.75 0.33.0}; do
  tree="${tree//,/ }"
  for t in $tree; do
    case "$t" in
      0.3.75 | 0.33.0) TREES+=("$t") ;;
      *) echo "[test] EPD_TREES: unknown ComfyUI tree '$t' (known: 0.3.75, 0.33.0)" >&2; exit 2 ;;
    esac
  done
done
if [[ ${#TREES[@]} -eq 0 ]]; then
  echo "[test] EPD_TREES names no ComfyUI tree (known: 0.3.75, 0.33.0)" >&2
  exit 2
fi
has_tree() { [[ " ${TREES[*]} " == *" $1 "* ]]; }

parts=(browser)
has_tree 0.3.75 && parts+=(base)
has_tree 0.33.0 && parts+=(comfy033)
bash scripts/setup_env.sh "${parts[@]}" || exit 1
VENV="${EPD_VENV:-.venv}"

# The 0.33 run takes the tests that run ComfyUI (every layer but the core one), within the caller's -m selection.
marker="" named=0 rest=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -m) marker="$2"; shift 2; continue ;;
    -m*) marker="${1#-m}"; marker="${marker#=}" ;;
    tests/*) named=1; rest+=("$1") ;;
    *) rest+=("$1") ;;
  esac
  shift
done
if [[ $named -eq 1 ]]; then
  COMFY_TESTS=(${marker:+-m "$marker"})
else
  COMFY_TESTS=(-m "not core${marker:+ and ($marker)}")
fi

rc=0
if has_tree 0.3.75; then
  "$VENV/bin/ruff" check . || rc=1
  echo "[test] ComfyUI 0.3.75: the whole suite" >&2
  start=$SECONDS
  env -u COMFYUI_PATH "$VENV/bin/python" -m pytest ${marker:+-m "$marker"} "${rest[@]}" || rc=1
  echo "[test] ComfyUI 0.3.75 took $((SECONDS - start)) s" >&2
fi
if has_tree 0.33.0; then
  echo "[test] ComfyUI 0.33.0: the ComfyUI-facing tests" >&2
  start=$SECONDS
  COMFYUI_PATH="$PWD/.comfy-033/ComfyUI" .venv-033/bin/python -m pytest "${COMFY_TESTS[@]}" "${rest[@]}"
  status=$?
  # A selection of core tests only leaves nothing for this run (pytest's 5: no tests collected); the full run must
  # collect tests.
  if [[ $status -ne 0 && ! ($status -eq 5 && (-n "$marker" || ${#rest[@]} -gt 0)) ]]; then
    rc=1
  fi
  echo "[test] ComfyUI 0.33.0 took $((SECONDS - start)) s" >&2
fi
exit "$rc"
