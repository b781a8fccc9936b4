#!/usr/bin/env bash
# The main job on the embedded Gemma 3 270M. Creates .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/_venv.sh ""
exec .venv/bin/python scripts/demo.py "$@"
