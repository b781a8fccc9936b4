"""Train Gemma 3 with SFT, DPO, or SFT then DPO.

  python scripts/train.py --method=dpo
  python scripts/train.py --method=sft_dpo --config=configs/quick.py --workdir=runs/quick --config.batch_size=4
  python scripts/train.py --method=sft --config.model=/models/gemma-3-1b-it --resume --workdir=runs/sft
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


def main(argv) -> int:
    del argv
    from kwjax.train import TrainingError, run

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file operation at INFO
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = _CONFIG.value
    if _MODEL.value:
        config.model = _MODEL.value
    try:
        summary = run(config, _METHOD.value, _WORKDIR.value, resume=_RESUME.value)
    except (TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    if any(stage.get("interrupted") for stage in summary.values()):
        print(f"interrupted: checkpoint saved in {_WORKDIR.value}; rerun with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
