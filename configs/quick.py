"""A short run for a 2-core CPU: the experiment's data and shapes, fewer steps, shorter sequences."""

import pathlib
import runpy

# Config files are loaded by path (ml_collections), so the base is read by path too.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("experiment.py")))


def get_config():
    c = _base["get_config"]()
    c.data.max_length = 256
    c.data.too_long = "truncate"
    c.epochs = 1
    c.checkpoint_every = 10
    return c
