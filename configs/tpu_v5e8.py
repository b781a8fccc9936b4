"""Gemma 3 1B (instruction-tuned) on one Cloud TPU v5e-8 VM (v5litepod-8: 8 chips, 16 GB HBM each, one host).

The experiment's data, batch and schedule (configs/experiment.py) with mixed precision: float32 master
weights and Adam state (updates of ~1e-5 survive), bfloat16 forward and backward passes. The mesh shards
parameters, gradients and optimizer state over all 8 chips (fsdp=8: ~2 GB of the ~16 GB float32 state
per chip) and splits each batch of 8 pairs over them. One process: no --distributed needed.

  python scripts/train.py --method=sft_dpo --config=configs/tpu_v5e8.py --model=~/gemma-3-1b-it --workdir=runs/v5e
"""

import pathlib
import runpy

# Config files are loaded by path (ml_collections), so the base is read by path too.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("experiment.py")))


def get_config():
    c = _base["get_config"]()
    c.model = "~/gemma-3-1b-it"  # a Hugging Face directory copied to the VM (docs/TPU.md); or --model=...
    c.dtype = "float32"  # parameters and optimizer state
    c.compute_dtype = "bfloat16"  # activations, matmuls and gradients (logits and losses stay float32)
    c.mesh.data = 1
    c.mesh.fsdp = 8
    c.mesh.tensor = 1
    c.batch_size = 8  # one pair (DPO: a chosen and a rejected row) or one example (SFT) per chip
    return c
