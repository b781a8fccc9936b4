#!/usr/bin/env bash
# The main job: the quick experiment (base vs SFT vs DPO vs SFT→DPO) on the embedded Gemma 3 270M,
# 38 min on a fresh clone on a 2-core Intel Xeon (2026-12-06; see README). Creates .venv on first use; flags go on to scripts/experiment.py
# (e.g. --preset=full, --workdir=..., --config.eval.limit=8).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/_venv.sh ""
exec .venv/bin/python scripts/experiment.py --preset=quick "$@"
