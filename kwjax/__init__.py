"""kwjax: SFT and DPO instruction tuning of Gemma 3 in JAX/Flax."""

__version__ = "0.1.0"
