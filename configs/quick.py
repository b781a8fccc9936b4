"""The experiment scaled to a 2-core CPU and the embedded Gemma 3 270M: 18-45 minutes end to end, by machine (README).

  python scripts/experiment.py --config=configs/quick.py --workdir=runs/quick
"""

import pathlib
import runpy

# Config files are loaded by path (ml_collections), so the base is read by path too.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("experiment.py")))


def get_config():
    c = _base["get_config"]()
    c.data.max_length = 256  # covers every shipped pair (longest: 258 tokens, cut by 2)
    c.data.too_long = "truncate"
    c.data.train_limit = 64  # the first 64 training rows: exactly the rows 8 SFT steps of batch 8 see
    c.data.eval_limit = 16  # training's own eval loss; the experiment's evaluation uses all 35 prompts
    c.epochs = 1
    c.sft.max_steps = 8
    c.dpo.max_steps = 4
    c.checkpoint_every = 100  # only the final checkpoint
    c.keep_checkpoints = 1
    c.export_hf = False
    c.grad_accum = 2  # same gradients as one batch of 8 (exact accumulation), half the activation memory
    c.eval.max_new_tokens = 192  # 90% of the chosen passages are at most 175 tokens
    c.eval.num_samples = 1
    c.experiment.name = "quick"
    c.experiment.seeds = (0,)
    c.experiment.note = ("Quick preset: Gemma 3 270M on a CPU, 8 SFT steps and 4 DPO steps of batch 8 (the "
                         "experiment: 5 epochs, 90 steps), sequences cut at 256 tokens, 192 new tokens, one "
                         "seed, one sample per prompt. It shows the pipeline and the direction of early "
                         "training, not the experiment's converged models.")
    return c
