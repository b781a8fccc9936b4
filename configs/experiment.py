"""The course experiment's settings: the shipped data, 140/35 split, batch 8, 5 epochs.

  python scripts/train.py --method=dpo --config=configs/experiment.py --config.dpo.beta=0.2
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "gemma3-270m"  # or a gemma-3-1b-it directory, a .gguf, a kwjax model dir
    c.dtype = "float32"  # parameter dtype: float32 or bfloat16
    c.compute_dtype = ""  # "" = the parameters' dtype; "bfloat16" with float32 dtype: mixed precision
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.train_file = ""  # empty: the shipped keyword-literature set (its stored train split)
    c.data.eval_file = ""  # empty: the shipped validation split
    # DPO stages' pairs (scripts/build_pairs.py writes one): rows split "train" train, "validation" validate;
    # empty: the same rows as SFT (the shipped authored pairs)
    c.data.preference_file = ""
    c.data.train_limit = 0  # > 0 keeps only the first N training rows (smoke runs, CI)
    c.data.eval_limit = 0  # > 0 keeps only the first N evaluation rows
    c.data.max_length = 512  # prompt + response tokens per sequence
    c.data.too_long = "error"  # rows over max_length: "error", "truncate" (response cut) or "drop"
    c.data.length_bucket = 64  # sequence lengths are padded up to a multiple of this
    c.data.group_by_length = 0  # > 0: rows per group sorted by length before batching (less padding); 0: random

    c.batch_size = 8  # examples (SFT) or pairs (DPO) per optimizer step
    c.grad_accum = 1  # micro-batches per optimizer step; batch_size must divide by it
    c.epochs = 5
    c.max_steps = 0  # > 0 stops after this many optimizer steps (tests, smoke runs)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-5
    c.optimizer.schedule = "cosine"  # cosine, linear or constant, after warmup
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    c.optimizer.decay_embedding = False  # weight decay applies to matrices; the embedding only if True
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0  # global-norm clipping; 0 disables

    c.sft = ml_collections.ConfigDict()
    c.sft.learning_rate = 2e-5
    c.sft.max_steps = 0  # > 0 caps this stage alone (takes precedence over max_steps)
    c.sft.every_epoch = -1  # >= 0: this stage's own eval.every_epoch (0: no per-epoch check in this stage)

    c.dpo = ml_collections.ConfigDict()
    c.dpo.learning_rate = 5e-6
    c.dpo.beta = 0.1  # DPO β; simpo: set it to ≈ 2 or more (the paper's); orpo: λ (TRL default 0.1)
    c.dpo.loss_type = "sigmoid"  # sigmoid, ipo, hinge (with a reference); simpo, orpo (reference-free)
    c.dpo.label_smoothing = 0.0  # cDPO epsilon (sigmoid and simpo)
    c.dpo.rpo_alpha = 0.0  # > 0 adds alpha * NLL(chosen) (RPO; sigmoid, ipo, hinge)
    c.dpo.simpo_gamma = 0.5  # SimPO's target reward margin γ (TRL's default); SimPO wants beta ≈ 2, not 0.1
    c.dpo.reference = "precomputed"  # precomputed (cached on disk) or on_the_fly
    c.dpo.max_steps = 0  # > 0 caps this stage alone (in sft_dpo too)
    c.dpo.every_epoch = -1  # >= 0: this stage's own eval.every_epoch (in sft_dpo too)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # Parameters the run reads but never updates: comma-separated regexes over parameter paths, e.g.
    # "embedding" (Gemma's tied 262k-row embedding: most of the 270M model) or "layer_[0-5]/"; "" trains all.
    c.freeze = ""
    # LoRA adapters (kwjax.lora) instead of training the weights: rank 0 = full fine-tuning.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the update is (alpha / rank) · A B
    c.lora.dropout = 0.0  # only 0 is supported (the train step carries no dropout randomness)
    c.lora.targets = "q,k,v,o,gate,up,down"  # comma-separated, of q k v o gate up down
    # Embedding rows trained although the embedding is frozen (kwjax.token_rows): comma-separated token
    # pieces or ids, e.g. "<start_of_turn>,<end_of_turn>", whose rows a pretrained model never trained.
    c.train_tokens = ""

    c.remat = True  # recompute each layer in the backward pass (270M DPO step: 1.6 GiB lower peak, +1% time; SFT +6%)
    c.logprob_chunk = 128  # response positions per chunk of the vocabulary projection
    # Keep the vocabulary projection's logits for the backward pass instead of recomputing them: one
    # projection fewer per step for B × R × V float32 of memory (8 × 192 × 262k: 1.6 GB); CPUs with RAM to spare.
    c.logprob_keep_logits = False

    c.checkpoint_every = 50  # optimizer steps between checkpoints (and one at the end); 0: the end only
    c.keep_checkpoints = 3
    c.export_hf = True  # also write the final model as a Hugging Face directory
    c.log_every = 1

    # Evaluation (scripts/evaluate.py defaults, and scripts/experiment.py).
    c.eval = ml_collections.ConfigDict()
    c.eval.limit = 0  # > 0 evaluates only the first N validation prompts
    c.eval.max_new_tokens = 256
    c.eval.num_samples = 4  # seeded samples per prompt, besides the greedy output
    c.eval.temperature = 1.0
    c.eval.top_p = 0.95
    c.eval.batch_size = 36  # decoding is bound by reading the weights: one batch for all 35 prompts
    c.eval.every_epoch = 0  # > 0: greedy outputs for this many validation prompts after every training epoch

    # scripts/experiment.py: which models, over which training seeds.
    c.experiment = ml_collections.ConfigDict()
    c.experiment.name = "full"
    c.experiment.seeds = (0, 1, 2)  # training data order and sampling seed; each seed trains every method
    c.experiment.methods = ("sft", "dpo", "sft_dpo")
    c.experiment.note = "The course experiment's settings: 140/35 split, batch 8, 5 epochs."
    c.experiment.side_by_side = 4  # validation prompts shown with every model's output in the report
    return c
