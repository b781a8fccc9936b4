#!/usr/bin/env bash
# The write-up's recipe on the embedded Gemma 3 270M: the recorded SFT learning-rate sweep (one epoch per
# point), then the experiment of configs/recipe_270m.py (140/35, batch 8, 5 epochs, per-epoch checks).
#   bash scripts/recipe_270m.sh WORKDIR [--config.KEY=VALUE ...]    # flags go on to scripts/experiment.py
# Keep WORKDIR outside the clone: every part resumes from it. SWEEP=0 skips the sweep (its result is
# already in the config; docs/recipe-270m/README.md records it).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:?usage: bash scripts/recipe_270m.sh WORKDIR [--config.KEY=VALUE ...]}"
shift
bash scripts/_venv.sh ""
py=.venv/bin/python
if [ "${SWEEP:-1}" != 0 ]; then
  "$py" scripts/sweep.py --method=sft --config=configs/recipe_270m.py --workdir="$workdir/sweep_sft" \
      --grid=sft.learning_rate=1e-5,3e-5,1e-4 --config.epochs=1 --config.checkpoint_every=0
fi
exec "$py" scripts/experiment.py --config=configs/recipe_270m.py --workdir="$workdir/experiment" "$@"
