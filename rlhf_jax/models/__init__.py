"""Models: the decoder (transformer.py) and pretrained import/export (pretrained.py,
with the formats in hf_format.py, gguf_format.py and hf_export.py)."""
from rlhf_jax.models.hf_export import save_pretrained
from rlhf_jax.models.pretrained import (PretrainedError, load_for_config, load_pretrained,
                                        load_tokenizer, read_config)
from rlhf_jax.models.transformer import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer", "PretrainedError", "load_pretrained", "load_for_config",
           "load_tokenizer", "read_config", "save_pretrained"]
