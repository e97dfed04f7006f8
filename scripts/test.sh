#!/usr/bin/env bash
# Run the tests (installs what they need on first use): ruff (lint and format), the whole suite on ComfyUI 0.3.75
# (.venv) and the ComfyUI-facing tests again on ComfyUI 0.33.0 (.venv-033, tree in .comfy-033/). Arguments go to both pytest runs; a
# marker expression (-m EXPR) is combined with the 0.33 run's "not core", and arguments that name tests (tests/...)
# replace that selection. EPD_TREES="0.3.75" (or "0.33.0") runs one tree. Both trees run side by side (one torch thread
# each), unless EPD_TEST_SERIAL=1.
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

run_075() {
  echo "[test] ComfyUI 0.3.75: the whole suite" >&2
  local start=$SECONDS status
  env -u COMFYUI_PATH "$VENV/bin/python" -m pytest --durations=15 ${marker:+-m "$marker"} "${rest[@]}"
  status=$?
  echo "[test] ComfyUI 0.3.75 took $((SECONDS - start)) s" >&2
  return $status
}
run_033() {
  echo "[test] ComfyUI 0.33.0: the ComfyUI-facing tests" >&2
  local start=$SECONDS status
  COMFYUI_PATH="$PWD/.comfy-033/ComfyUI" .venv-033/bin/python -m pytest --durations=15 "${COMFY_TESTS[@]}" "${rest[@]}"
  status=$?
  echo "[test] ComfyUI 0.33.0 took $((SECONDS - start)) s" >&2
  # A selection of core tests only leaves nothing for this run (pytest's 5: no tests collected); the full run must
  # collect tests.
  [[ $status -eq 0 || ($status -eq 5 && (-n "$marker" || ${#rest[@]} -gt 0)) ]]
}

rc=0
if has_tree 0.3.75; then
  "$VENV/bin/ruff" check . || rc=1
  "$VENV/bin/ruff" format --check . || rc=1
fi
if has_tree 0.3.75 && has_tree 0.33.0 && [[ "${EPD_TEST_SERIAL:-0}" != 1 ]]; then
  # Each pytest runs on one torch thread (tests/conftest.py), so the two trees run side by side, one per core; the
  # 0.33 run's output follows the 0.3.75 run's. EPD_TEST_SERIAL=1 runs them one after the other.
  log033=$(mktemp "${TMPDIR:-/tmp}/epd-test-033.XXXXXX.log")
  echo "[test] ComfyUI 0.33.0 runs alongside; its output is in $log033 and follows" >&2
  run_033 > "$log033" 2>&1 &
  pid033=$!
  run_075 || rc=1
  wait "$pid033" || rc=1
  cat "$log033"
  rm -f "$log033"
else
  if has_tree 0.3.75; then run_075 || rc=1; fi
  if has_tree 0.33.0; then run_033 || rc=1; fi
fi
exit "$rc"
