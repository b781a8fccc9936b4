"""The write-up's recipe on the embedded Gemma 3 270M, on a CPU: all 140/35 rows, batch 8, 5 epochs.

  python scripts/experiment.py --config=configs/recipe_270m.py --workdir=/work/runs/recipe-270m
  bash scripts/recipe_270m.sh /work/runs/recipe-270m   # the recorded sweep first, then this

The learning rates and β are the ones the recorded sweeps picked (docs/recipe-270m/README.md, sections
1 and 6); the trainable set is every weight but the tied embedding (168M of the model's 268M
parameters: freezing it cuts the step's largest gradient and optimizer state), except the rows of the
chat-control tokens, which pretraining never trained (section 3).
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("experiment.py")))


def get_config():
    c = _base["get_config"]()
    c.data.max_length = 320  # the longest shipped pair is 258 tokens: nothing is cut
    # Batches of rows of similar length (groups of 64, lengths padded to multiples of 32): 22 % fewer padded
    # tokens than random batches in both stages (docs/PERFORMANCE.md, "Padding"), for a few more compiles.
    c.data.group_by_length = 64
    c.data.length_bucket = 32
    c.freeze = "embedding"
    # ... but not the rows of the chat-control tokens: in the pretrained 270M they sit in a cluster of
    # ~4.7k untrained rows (cosine > 0.99), and frozen they keep <end_of_turn> from winning where a
    # passage ends (docs/recipe-270m/README.md, section 3).
    c.train_tokens = "<start_of_turn>,<end_of_turn>"
    c.remat = False  # memory is plentiful at 270M (batch 8 DPO: see docs/recipe-270m); ~9% faster steps
    # Kept logits save one vocabulary projection per step (SFT ~4 % faster) but the on-policy pairs pad both
    # halves near 320 tokens, and [16, 256, 262k] float32 logits ran the 24 GiB machine out of memory in DPO.
    c.logprob_keep_logits = False
    c.sft.learning_rate = 3e-5  # the sweep's pick by eval loss after one epoch (docs/recipe-270m/README.md)
    # DPO's pairs: the on-policy set (rejected = the SFT model's own failing samples). The authored pairs
    # are separable by length alone and DPO on them learned that (docs/recipe-270m/README.md, sections 4-5).
    c.data.preference_file = "kwjax/data_files/keyword_literature_onpolicy.jsonl"
    # The DPO sweep's pick (section 6): the one point that kept every greedy output stopping; 5e-6 made them loop.
    c.dpo.learning_rate = 1e-6
    c.dpo.beta = 0.1
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.schedule = "cosine"
    c.checkpoint_every = 9  # twice an epoch: an interrupted run loses at most half an epoch
    c.keep_checkpoints = 2
    c.export_hf = False
    c.eval.max_new_tokens = 256
    c.eval.num_samples = 1
    c.eval.every_epoch = 8  # greedy outputs of 8 validation prompts after every epoch: when looping starts
    # ... in the SFT stage only: in the two DPO stages those checks cost ~15 (Xeon) to ~33 (slower EPYC) min
    # of the 3 h budget (docs/PERFORMANCE.md); --config.dpo.every_epoch=8 brings them back.
    c.dpo.every_epoch = 0
    c.experiment.name = "recipe-270m"
    c.experiment.seeds = (0,)
    c.experiment.note = ("The write-up's recipe on the embedded, pretrained Gemma 3 270M (not an -it model: "
                         "the chat format is learned from the data): 140 train / 35 validation rows, batch "
                         "8, 5 epochs per stage, embedding frozen, one seed, greedy and one top-p sample.")
    return c
