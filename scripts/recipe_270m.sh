#!/usr/bin/env bash
# The write-up's recipe on the embedded Gemma 3 270M (configs/recipe_270m.py: 140/35, batch 8, 5 epochs):
# the recorded sweeps, the experiment (base, SFT, DPO, SFT->DPO, report), then every trained model on the
# 40 held-out-keyword prompts.
#   bash scripts/recipe_270m.sh WORKDIR [--config.KEY=VALUE ...]    # flags go on to scripts/experiment.py
# Keep WORKDIR outside the clone: every part resumes from it. SWEEP=1 first runs the SFT learning-rate sweep,
# the SFT stage, and the DPO learning-rate x beta sweep from that SFT model (one epoch per point; their picks
# are already in the config, docs/recipe-270m/README.md records them). ONPOLICY=1 then samples the trained SFT
# model for fresh on-policy pairs (scripts/build_pairs.py) and runs SFT->DPO on them in WORKDIR/onpolicy,
# its SFT and evaluations reused from the first run (hard links: nothing is trained twice).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:?usage: bash scripts/recipe_270m.sh WORKDIR [--config.KEY=VALUE ...]}"
shift
bash scripts/_venv.sh ""
py=.venv/bin/python
sft_model="$workdir/experiment/seed_0/train/sft/model"
if [ "${SWEEP:-0}" != 0 ]; then
  "$py" scripts/sweep.py --method=sft --config=configs/recipe_270m.py --workdir="$workdir/sweep_sft" \
      --grid=sft.learning_rate=1e-5,3e-5,1e-4 --config.epochs=1 --config.checkpoint_every=0
  "$py" scripts/experiment.py --config=configs/recipe_270m.py --workdir="$workdir/experiment" \
      "--config.experiment.methods=('sft',)" "$@"
  "$py" scripts/sweep.py --method=dpo --config=configs/recipe_270m.py --workdir="$workdir/sweep_dpo" \
      --config.model="$sft_model" --config.epochs=1 --config.checkpoint_every=0 \
      --grid=dpo.learning_rate=1e-6,5e-6 --grid=dpo.beta=0.1,0.5 --pick=eval_rewards/accuracies
fi
"$py" scripts/experiment.py --config=configs/recipe_270m.py --workdir="$workdir/experiment" "$@"
for m in sft dpo sft_dpo; do
  model="$workdir/experiment/seed_0/train/$m/model"
  if [ -d "$model" ] && [ ! -f "$workdir/heldout/$m/metrics.json" ]; then
    "$py" scripts/evaluate.py --model="$model" --heldout --num_samples=1 --output="$workdir/heldout/$m"
  fi
done
if [ "${ONPOLICY:-0}" = 1 ]; then
  "$py" scripts/build_pairs.py --model="$sft_model" --out_dir="$workdir/pairs"
  mkdir -p "$workdir/onpolicy/seed_0/train" "$workdir/onpolicy/seed_0/eval"
  for d in train/sft eval/base eval/sft; do
    [ -e "$workdir/onpolicy/seed_0/$d" ] || cp -al "$workdir/experiment/seed_0/$d" "$workdir/onpolicy/seed_0/$d"
  done
  "$py" scripts/experiment.py --config=configs/recipe_270m.py --workdir="$workdir/onpolicy" \
      "--config.experiment.methods=('sft','sft_dpo')" --config.data.preference_file="$workdir/pairs/pairs.jsonl" "$@"
fi
