"""A small recorded sweep: one training run per grid point, one table (WORKDIR/sweep.md, sweep.jsonl).

  python scripts/sweep.py --method=sft --config=configs/recipe_270m.py --workdir=/tmp/sweep_sft \\
      --grid=sft.learning_rate=3e-5,1e-4 --config.epochs=2

A rerun with the same --workdir reuses finished points and resumes an interrupted one.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/experiment.py", "Training config file.")
_METHOD = flags.DEFINE_string("method", "sft", "sft, dpo or sft_dpo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "One directory per grid point goes here.")
_PICK = flags.DEFINE_string("pick", "eval_loss", "Metric that names the best point (printed last).")
_GRID = flags.DEFINE_multi_string("grid", [], "KEY=VALUE,VALUE,...; several --grid flags make a product.")


def main(argv) -> int:
    del argv
    from absl import logging as absl_logging

    from kwjax import sweep
    from kwjax.data import DataError
    from kwjax.prepare import TrainingError

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not _WORKDIR.value:
        print("error: --workdir is required", file=sys.stderr)
        return 2
    try:
        grid = sweep.parse_grid(_GRID.value)
        results = sweep.run(_CONFIG.value, _METHOD.value, grid, _WORKDIR.value,
                            on_point=lambda i, name: print(f"[point {i}] {name}", file=sys.stderr, flush=True))
    except (sweep.SweepError, TrainingError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e or 'stopped'}; rerun the same command to continue", file=sys.stderr)
        return 130
    print(sweep.table(results))
    try:
        chosen = sweep.best(results, _PICK.value)
    except sweep.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"best by {_PICK.value}: {chosen['point']} " + " ".join(f"{k}={v}" for k, v in chosen["values"].items()))
    return 0


if __name__ == "__main__":
    from kwjax.cli import check_overrides

    check_overrides(sys.argv, default="configs/experiment.py")
    app.run(lambda argv: sys.exit(main(argv)))
