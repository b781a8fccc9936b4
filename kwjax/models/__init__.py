"""Model families. A family's folder holds what is particular to it: the architecture config and presets
(`config`), the Flax module (`model`), the checkpoint tensor layout (`layout`) and the chat format
(`chat`). Gemma 3 is the only family today."""
