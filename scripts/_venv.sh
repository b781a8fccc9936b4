#!/usr/bin/env bash
# Creates the project's virtual environment (.venv) on first use and installs kwjax into it.
# Usage: source-free; `bash scripts/_venv.sh EXTRAS` where EXTRAS is "" or "[test]".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=".venv/.kwjax-installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".${extras}"
  touch "$stamp"
fi
