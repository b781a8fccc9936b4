"""Gemma 3 (text): architecture config and presets, Flax module, tensor layout, chat format."""
