#!/usr/bin/env bash
# Cloud TPU launch helper: create a TPU VM (one host or a multi-host slice), put kwjax, weights and data
# on every worker, train on all workers at once, fetch the results, delete the VM. A thin wrapper over
# `gcloud compute tpus tpu-vm ...` and `gcloud compute tpus queued-resources ...`; docs/TPU.md has the
# plain gcloud commands it runs and the Cloud TPU documentation they follow.
#
#   export PROJECT_ID=my-project ZONE=us-west4-a TPU_NAME=kwjax-v5e ACCELERATOR_TYPE=v5litepod-8
#   bash scripts/tpu.sh create                  # or: queue (queued resource), then status until ACTIVE
#   bash scripts/tpu.sh setup                   # copy this checkout to every worker, install kwjax + jax[tpu]
#   bash scripts/tpu.sh copy ~/models/gemma-3-1b-it '~/'      # weights (or data) to every worker
#   bash scripts/tpu.sh train --method=sft_dpo --config=configs/tpu_v5e8.py --workdir=runs/v5e
#   bash scripts/tpu.sh fetch '~/kwjax/runs/v5e' ./runs/     # from worker 0
#   bash scripts/tpu.sh delete
#
# Variables: PROJECT_ID, ZONE, TPU_NAME, ACCELERATOR_TYPE (required); RUNTIME_VERSION (default from the
# accelerator type: v5litepod -> v2-alpha-tpuv5-lite, v4 -> tpu-ubuntu2204-base, per the Cloud TPU
# software-versions page); QR_NAME (queued resource id, default ${TPU_NAME}-qr); EXTRA_PIP (more packages
# for `setup`, e.g. "gcsfs" when checkpoints go to gs://).
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
need() { for v in "$@"; do [ -n "${!v:-}" ] || { echo "error: set \$$v (see: bash $0 help)" >&2; exit 2; }; done; }

runtime_for() {
  case "$1" in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "error: no default RUNTIME_VERSION for $1; set \$RUNTIME_VERSION" >&2; exit 2 ;;
  esac
}

# More than 8 chips (v5e, v6e) or TensorCores (v4, v5p) means several hosts, hence several processes.
multi_host() { local n="${ACCELERATOR_TYPE##*-}"; [ "$n" -gt 8 ]; }

gtpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT_ID"; }
on_all() { gtpu ssh "$TPU_NAME" --worker=all --command="$1"; }

cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
  help|-h|--help) usage ;;
esac
need PROJECT_ID ZONE TPU_NAME
cd "$(dirname "$0")/.."

case "$cmd" in
  create)  # Create Node API: fails at once if there is no capacity
    need ACCELERATOR_TYPE
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT_ID" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="${RUNTIME_VERSION:-$(runtime_for "$ACCELERATOR_TYPE")}" "$@"
    ;;
  queue)  # queued resources API (recommended): waits in a queue for capacity; add --spot, --reserved, ...
    need ACCELERATOR_TYPE
    gcloud compute tpus queued-resources create "${QR_NAME:-${TPU_NAME}-qr}" --node-id="$TPU_NAME" \
      --zone="$ZONE" --project="$PROJECT_ID" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="${RUNTIME_VERSION:-$(runtime_for "$ACCELERATOR_TYPE")}" "$@"
    ;;
  status)  # the queued resource's state (WAITING_FOR_RESOURCES, ..., ACTIVE), else the VM's
    gcloud compute tpus queued-resources describe "${QR_NAME:-${TPU_NAME}-qr}" --zone="$ZONE" \
      --project="$PROJECT_ID" --format='value(state.state)' 2>/dev/null \
      || gtpu describe "$TPU_NAME" --format='value(state)'
    ;;
  setup)  # this checkout (without .venv, .git, runs) to ~/kwjax on every worker; kwjax and jax[tpu] installed
    archive="$(mktemp -d)/kwjax.tar.gz"
    tar czf "$archive" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude='__pycache__' \
      --exclude=./.pytest_cache .
    gtpu scp "$archive" "$TPU_NAME:~/kwjax.tar.gz" --worker=all
    rm -f "$archive"
    on_all "mkdir -p ~/kwjax && tar xzf ~/kwjax.tar.gz -C ~/kwjax && rm ~/kwjax.tar.gz && \
      pip install -e ~/kwjax ${EXTRA_PIP:-} && pip install -U 'jax[tpu]' && \
      python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  copy)  # copy SRC... DEST: files or folders to every worker (DEST relative to the home directory)
    [ $# -ge 2 ] || { echo "usage: bash $0 copy SRC... DEST" >&2; exit 2; }
    dest="${*: -1}"
    gtpu scp --recurse "${@:1:$#-1}" "$TPU_NAME:$dest" --worker=all
    ;;
  train)  # scripts/train.py ARGS on every worker at once, in the foreground (all workers' output here)
    flag=""
    if multi_host; then flag="--distributed"; fi
    on_all "cd ~/kwjax && python3 scripts/train.py $flag $(printf '%q ' "$@")"
    ;;
  start)  # the same, detached (nohup: survives a dropped SSH connection); each worker logs to ~/kwjax/train.log
    flag=""
    if multi_host; then flag="--distributed"; fi
    on_all "cd ~/kwjax && nohup python3 scripts/train.py $flag $(printf '%q ' "$@") > train.log 2>&1 < /dev/null &"
    ;;
  logs)  # follow worker 0's log (process 0 reports; the others only warn)
    gtpu ssh "$TPU_NAME" --worker=0 --command="tail -n 50 -f ~/kwjax/train.log"
    ;;
  ssh)  # a shell on worker ${1:-0}
    gtpu ssh "$TPU_NAME" --worker="${1:-0}"
    ;;
  fetch)  # fetch REMOTE LOCAL: results from worker 0 (metrics, reports, final model: process 0 writes them)
    [ $# -eq 2 ] || { echo "usage: bash $0 fetch REMOTE_PATH LOCAL_DIR" >&2; exit 2; }
    mkdir -p "$2"
    gtpu scp --recurse "$TPU_NAME:$1" "$2" --worker=0
    ;;
  delete)  # the VM (and the queued resource, if one made it); billing stops
    if gcloud compute tpus queued-resources describe "${QR_NAME:-${TPU_NAME}-qr}" --zone="$ZONE" \
        --project="$PROJECT_ID" >/dev/null 2>&1; then
      gcloud compute tpus queued-resources delete "${QR_NAME:-${TPU_NAME}-qr}" --zone="$ZONE" \
        --project="$PROJECT_ID" --force --quiet
    else
      gtpu delete "$TPU_NAME" --quiet
    fi
    ;;
  *) echo "unknown command: $cmd" >&2; usage ;;
esac
