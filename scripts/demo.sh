#!/usr/bin/env bash
# The main job: install what is needed (once), start ComfyUI headless with this pack,
# run the demo workflow (EPD and built-in samplers on the bundled MNIST model), write output/epd_demo.png and
# print the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${EPD_VENV:-.venv}/bin/python" -m scripts.run_demo
