"""Train Gemma 3 with SFT, DPO, or SFT then DPO.

  python scripts/train.py --method=dpo
  python scripts/train.py --method=sft_dpo --config=configs/quick.py --workdir=runs/quick --config.batch_size=4
  python scripts/train.py --method=sft --config.model=/models/gemma-3-1b-it --resume --workdir=runs/sft

Several processes (a multi-host Cloud TPU slice: run the same command on every worker, see docs/TPU.md):

  python scripts/train.py --distributed --config=configs/tpu_multihost.py --checkpoint_dir=gs://BUCKET/run
  KWJAX_COORDINATOR=10.0.0.2:8476 KWJAX_NUM_PROCESSES=2 KWJAX_PROCESS_ID=0 python scripts/train.py ...
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/experiment.py", "Training config file.")
_METHOD = flags.DEFINE_string("method", "dpo", "sft, dpo or sft_dpo.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics and exports go here.")
_MODEL = flags.DEFINE_string("model", None, "Model source; overrides config.model.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the workdir's latest checkpoint.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Multi-process run: jax.distributed.initialize(), auto-detected on Cloud TPU (or from $KWJAX_COORDINATOR, "
    "$KWJAX_NUM_PROCESSES, $KWJAX_PROCESS_ID). Unset: multi-process iff those variables or $KWJAX_DISTRIBUTED=1 "
    "are set; --nodistributed: never.")
_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "Checkpoints here instead of WORKDIR/checkpoints: a path every process sees, or a "
    "gs://BUCKET/... URL (needed on a multi-host slice).")


def main(argv) -> int:
    del argv
    from kwjax import distributed

    try:  # before anything touches a JAX backend
        distributed.initialize(_DISTRIBUTED.value)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from kwjax.compiles import use_disk_cache
    from kwjax.prepare import TrainingError
    from kwjax.stages import run

    use_disk_cache()

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file operation at INFO
    # Process 0 reports; the others only warn (the same messages would come from every worker).
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(levelname)s %(message)s")
    config = _CONFIG.value
    if _MODEL.value:
        config.model = _MODEL.value
    try:
        summary = run(config, _METHOD.value, _WORKDIR.value, resume=_RESUME.value,
                      checkpoint_dir=_CHECKPOINT_DIR.value)
    except (TrainingError, ValueError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed.is_main():
        print(json.dumps(summary, indent=2, default=str))
    if any(stage.get("interrupted") for stage in summary.values()):
        if distributed.is_main():
            print(f"interrupted: checkpoint saved in {_CHECKPOINT_DIR.value or _WORKDIR.value}; rerun with --resume",
                  file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from kwjax.cli import check_overrides

    check_overrides(sys.argv, default="configs/experiment.py")
    app.run(lambda argv: sys.exit(main(argv)))
