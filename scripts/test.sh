#!/usr/bin/env bash
# Run the whole test suite (installs what it needs on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${EPD_VENV:-.venv}"
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "$@"
