"""Gemma 3 1B (instruction-tuned) on one Cloud TPU v4-8 VM (4 chips, 32 GiB HBM each, one host).

A v4 chip has two TensorCores that JAX drives as one device, so a v4-8 is 4 devices. Float32 master
weights and Adam state, bfloat16 compute (as configs/tpu_v5e8.py); parameters and optimizer state sharded
over the 4 chips, each batch of 8 split 2 per chip. One process: no --distributed needed.

  python scripts/train.py --method=sft_dpo --config=configs/tpu_v4_8.py --model=~/gemma-3-1b-it --workdir=runs/v4
"""

import pathlib
import runpy

# Config files are loaded by path (ml_collections), so the base is read by path too: the v5e-8 config,
# which differs only in the number of chips.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("tpu_v5e8.py")))


def get_config():
    c = _base["get_config"]()
    c.mesh.fsdp = 4  # 4 devices; batch 8 stays (2 rows per chip)
    return c
