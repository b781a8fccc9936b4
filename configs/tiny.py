"""Tests and CI: a random few-layer Gemma 3 with the real tokenizer, a handful of steps."""

import pathlib
import runpy

# Config files are loaded by path (ml_collections), so the base is read by path too.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("experiment.py")))


def get_config():
    c = _base["get_config"]()
    c.model = "tiny"  # kwjax.train builds a random tiny Gemma 3 around the embedded tokenizer
    c.data.max_length = 160
    c.data.train_limit = 16
    c.data.eval_limit = 8
    c.data.too_long = "truncate"
    c.data.length_bucket = 32
    c.batch_size = 4
    c.epochs = 1
    c.max_steps = 3
    c.checkpoint_every = 2
    c.export_hf = False
    c.optimizer.warmup_ratio = 0.0
    c.sft.learning_rate = 1e-3
    c.dpo.learning_rate = 1e-3
    c.eval.limit = 4
    c.eval.max_new_tokens = 8
    c.eval.num_samples = 1
    c.eval.batch_size = 4
    c.experiment.name = "tiny"
    c.experiment.seeds = (0,)
    c.experiment.side_by_side = 2
    c.experiment.note = "Tiny preset (tests, CI): a random 3-layer model; the numbers mean nothing."
    return c
