"""Mistyped `--config.KEY` overrides: one line naming the field and the closest valid names, no traceback."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from kwjax.cli import field_names, unknown_override

ROOT = Path(__file__).resolve().parents[1]


def tiny():
    return runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()


def test_field_names_cover_sections_and_leaves():
    names = field_names(tiny())
    assert {"dpo", "dpo.beta", "optimizer.learning_rate", "batch_size", "freeze"} <= set(names)
    assert "beta" not in names  # leaves are named by their full path


@pytest.mark.parametrize("arg, expected", [
    ("--config.dpo.bta=0.2", "error: --config.dpo.bta: the config has no field 'dpo.bta'; closest: dpo.beta"),
    ("--config.batchsize=3", "error: --config.batchsize: the config has no field 'batchsize'; closest: batch_size"),
    ("--config.optimiser.learning_rate=1", "error: --config.optimiser.learning_rate: the config has no field "
                                           "'optimiser.learning_rate'; closest: optimizer.learning_rate"),
])
def test_unknown_fields_are_named_with_the_closest_valid_ones(arg, expected):
    message = unknown_override(["prog", "--method=sft", arg], tiny())
    assert message.startswith(expected) and "\n" not in message, message  # the closest name comes first


def test_known_fields_pass_and_unrelated_flags_are_ignored():
    argv = ["prog", "--config.dpo.beta=0.2", "--config.batch_size=4", "--workdir=x", "--config=configs/tiny.py"]
    assert unknown_override(argv, tiny()) is None
    message = unknown_override(["prog", "--config.nosuchkey=1"], tiny())
    assert message.startswith("error: --config.nosuchkey: the config has no field 'nosuchkey'")


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--method=sft", "--config=configs/tiny.py", "--config.dpo.bta=0.2"]),
    ("experiment.py", ["--preset=tiny", "--config.nosuchkey=1"]),
])
def test_scripts_stop_with_one_line(script, args, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, f"--workdir={tmp_path / 'w'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config.") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "w").exists()  # nothing ran
