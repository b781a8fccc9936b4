"""kwjax: SFT and DPO instruction tuning of Gemma 3 in JAX/Flax."""

__version__ = "0.1.0"

from kwjax.weights import LoadedModel, export_hf, load  # noqa: E402

__all__ = ["LoadedModel", "export_hf", "load"]
