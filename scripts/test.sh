#!/usr/bin/env bash
# The whole test suite, real-weights parity included. Creates .venv (with the test extra) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/_venv.sh "[test]"
exec .venv/bin/python -m pytest -q "$@"
