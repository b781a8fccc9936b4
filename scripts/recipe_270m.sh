#!/usr/bin/env bash
# The write-up's recipe on the embedded Gemma 3 270M: the recorded SFT learning-rate sweep (one epoch per
# point), then the experiment of configs/recipe_270m.py (140/35, batch 8, 5 epochs, per-epoch checks).
#   bash scripts/recipe_270m.sh WORKDIR [--config.KEY=VALUE ...]    # flags go on to scripts/experiment.py
# Keep WORKDIR outside the clone: every part resumes from it. SWEEP=0 skips the sweep (its result is
# already in the config; docs/recipe-270m/README.md records it). ONPOLICY=1 then samples the trained SFT
# model for on-policy pairs (scripts/build_pairs.py) and runs SFT->DPO on them in WORKDIR/onpolicy, its
# SFT and evaluations reused from the first run (hard links: nothing is trained twice).
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
"$py" scripts/experiment.py --config=configs/recipe_270m.py --workdir="$workdir/experiment" "$@"
if [ "${ONPOLICY:-0}" = 1 ]; then
  "$py" scripts/build_pairs.py --model="$workdir/experiment/seed_0/train/sft/model" --out_dir="$workdir/pairs"
  mkdir -p "$workdir/onpolicy/seed_0/train" "$workdir/onpolicy/seed_0/eval"
  for d in train/sft eval/base eval/sft; do
    [ -e "$workdir/onpolicy/seed_0/$d" ] || cp -al "$workdir/experiment/seed_0/$d" "$workdir/onpolicy/seed_0/$d"
  done
  "$py" scripts/experiment.py --config=configs/recipe_270m.py --workdir="$workdir/onpolicy" \
      "--config.experiment.methods=('sft','sft_dpo')" --config.data.preference_file="$workdir/pairs/pairs.jsonl" "$@"
fi
