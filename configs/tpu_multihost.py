"""Gemma 3 1B (instruction-tuned) on a multi-host Cloud TPU slice, e.g. v5litepod-32 or v4-32.

Every worker (host) runs the same command with --distributed (docs/TPU.md); JAX finds the other
workers by itself on Cloud TPU. Parameters and optimizer state are sharded over groups of 8 devices
(fsdp=8), replicated across the groups (data = all remaining devices: 4 on a v5litepod-32's 32 chips,
2 on a v4-32's 16), and each batch is split over all devices. Float32 master weights, bfloat16 compute.

The batch is 32 pairs (one or two per device), 4x the experiment's 8: the learning rates are the
experiment's, so compare with the 8-chip runs knowing the batch differs. Checkpoints are written by all
hosts together and must go to storage they all see: pass --checkpoint_dir=gs://BUCKET/... .

  python3 scripts/train.py --distributed --method=sft_dpo --config=configs/tpu_multihost.py \\
      --model=~/gemma-3-1b-it --workdir=runs/pod --checkpoint_dir=gs://BUCKET/kwjax/pod
"""

import pathlib
import runpy

# Config files are loaded by path (ml_collections), so the base is read by path too.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("experiment.py")))


def get_config():
    c = _base["get_config"]()
    c.model = "~/gemma-3-1b-it"  # a Hugging Face directory copied to every worker (docs/TPU.md)
    c.dtype = "float32"  # parameters and optimizer state
    c.compute_dtype = "bfloat16"  # activations, matmuls and gradients (logits and losses stay float32)
    c.mesh.data = -1  # all remaining devices
    c.mesh.fsdp = 8
    c.mesh.tensor = 1
    c.batch_size = 32  # divides 32 (v5litepod-32) and 16 (v4-32) devices
    return c
