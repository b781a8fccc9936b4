"""The whole experiment in one command: base vs SFT vs DPO vs SFT→DPO, trained, evaluated, reported.

  python scripts/experiment.py --preset=quick                      # 18-45 min on a 2-core CPU (Gemma 3 270M)
  python scripts/experiment.py --preset=full --config.model=/models/gemma-3-1b-it --workdir=runs/full
  python scripts/experiment.py --config=configs/quick.py --config.experiment.seeds="(0,1)"

Rerunning with the same --workdir reuses every finished training run and evaluation (and resumes an
interrupted training run from its checkpoint); the report lands in WORKDIR/report unless --report_dir.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"full": "experiment.py", "quick": "quick.py", "tiny": "tiny.py"}

# No default here: a default file would define the --config.KEY flags once, and a --config given on the
# command line a second time. Without --config or --preset, preset_to_config supplies quick.
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file; --preset=NAME is short for its configs/ file.")
flags.DEFINE_enum("preset", None, list(PRESETS), "full (the write-up's settings), quick (default) or tiny; "
                  "--config.KEY=VALUE overrides apply on top.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Runs, evaluations and the report (default: runs/<preset>).")
_REPORT_DIR = flags.DEFINE_string("report_dir", None, "Where report.md and the plots go (default: WORKDIR/report).")


def main(argv) -> int:
    del argv
    from absl import logging as absl_logging
    from kwjax import cli, experiment
    from kwjax.compiles import use_disk_cache
    from kwjax.data import DataError
    from kwjax.sampling import SamplingError
    from kwjax.prepare import TrainingError
    from kwjax.weights import WeightsError

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file operation at INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    use_disk_cache()
    config = _CONFIG.value
    workdir = Path(_WORKDIR.value or f"runs/{config.experiment.name}")
    started = time.time()

    def announce(i, n, task):
        print(f"[{i}/{n}] {task.kind} {task.model} (seed {task.seed}) -> {task.path}   "
              f"[{(time.time() - started) / 60:.1f} min so far]", file=sys.stderr, flush=True)

    try:
        command = cli.command_line("scripts/experiment.py", sys.argv[1:])
        report = experiment.run(config, workdir, report_dir=_REPORT_DIR.value, on_task=announce, command=command)
    except (experiment.ExperimentError, TrainingError, DataError, SamplingError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e or 'stopped'}; rerun the same command to continue", file=sys.stderr)
        return 130
    print(f"report: {report}  ({(time.time() - started) / 60:.1f} min)")
    return 0


def preset_to_config(argv: list[str]) -> list[str]:
    """--preset=NAME becomes --config=configs/<file>, so --config.KEY overrides work with presets too."""
    out, preset = [], None
    it = iter(argv)
    for arg in it:
        if arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        elif arg == "--preset":
            preset = next(it, "")
        else:
            out.append(arg)
    has_config = any(a == "--config" or a.startswith("--config=") for a in out)
    if preset is None:
        return out if has_config or any(a in ("--help", "--helpfull", "--helpshort") for a in out) else \
            out[:1] + [f"--config={ROOT / 'configs' / PRESETS['quick']}"] + out[1:]
    if preset not in PRESETS:
        sys.exit(f"error: --preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if has_config:
        sys.exit("error: pass --preset or --config, not both")
    return out[:1] + [f"--config={ROOT / 'configs' / PRESETS[preset]}"] + out[1:]


if __name__ == "__main__":
    from kwjax.cli import check_overrides

    args = preset_to_config(sys.argv)
    check_overrides(args)
    app.run(lambda argv: sys.exit(main(argv)), argv=args)
