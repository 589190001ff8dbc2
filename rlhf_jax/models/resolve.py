"""Which network a stage runs: the ModelConfig and tokenizer from a config's
`model` block, a named preset, a pretrained model, or a checkpoint's saved
architecture (its meta, read by the caller: models never read checkpoints).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from rlhf_jax.errors import ConfigError
from rlhf_jax.models import presets, pretrained
from rlhf_jax.models.transformer import ModelConfig

# Fields of config.model that choose how to run, not what the network is:
# these apply even when the architecture comes from a checkpoint.
RUNTIME_FIELDS = ("dropout", "matmul", "activations", "remat", "scan_unroll")


def model_config_from(config_model, base: Optional[dict] = None, head: str = "lm") -> ModelConfig:
    """ModelConfig from a config's `model` block, or from a checkpoint's saved
    architecture (`base`) or a named `model.preset` (models/presets.py), with
    the config's runtime fields applied."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if base is None and config_model.get("preset"):
        try:
            base = presets.preset(config_model["preset"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if base is not None:
        kw = {k: v for k, v in base.items() if k in fields}
        kw.update({k: config_model[k] for k in RUNTIME_FIELDS if k in config_model})
    else:
        kw = {k: config_model[k] for k in fields if k in config_model}
    kw["head"] = head
    return ModelConfig(**kw)


def saved_model_config(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with (its meta's `model`)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields})


def stage_model(config, head: str = "lm", meta: Optional[dict] = None):
    """(ModelConfig, tokenizer, pretrained params or None) for a stage.

    Architecture comes, in order of precedence, from the checkpoint a stage
    initialises from (`meta`, its checkpoint.read_meta), from
    `model.pretrained` (HF directory or GGUF), or from the config's
    architecture fields.
    """
    if meta is not None:
        cfg = model_config_from(config.model, meta["model"], head)
        return cfg, tokenizer_from_meta(meta), None
    if config.model.get("pretrained"):
        cfg, tok, params = pretrained.load_for_config(config.model.pretrained)
        cfg = cfg.replace(head=head, **{k: config.model[k] for k in RUNTIME_FIELDS})
        return cfg, tok, params
    tok = pretrained.build_tokenizer(config.model)
    cfg = model_config_from(config.model, head=head)
    if cfg.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} ids")
    return cfg, tok, None


def tokenizer_from_meta(meta: dict):
    return pretrained.build_tokenizer(meta.get("tokenizer", "byte"))


def tokenizer_spec(config, meta: Optional[dict] = None) -> str:
    """What a checkpoint records as its tokenizer, so later stages rebuild it:
    that of the checkpoint the stage starts from (`meta`), else the config's."""
    if meta is not None:
        return meta.get("tokenizer", "byte")
    if config.model.get("pretrained"):
        return config.model.pretrained
    return config.model.tokenizer or "byte"


def model_meta(cfg: ModelConfig, tokenizer_spec: str) -> dict:
    """What a checkpoint's meta records of its model."""
    return {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer_spec}


def check_context(cfg: ModelConfig, need: int, what: str, rope_ok: bool = False
                  ) -> Optional[str]:
    """`need` positions (`what` names the settings that make them) must fit
    the model's context. Learned positions (GPT-2) cannot go past it. RoPE
    models can, outside what they were trained on: with `rope_ok` that is
    returned as a warning to report, else it is an error too.

    Raises:
      ConfigError: naming `what`, the tokens needed and the context.
    """
    if need <= cfg.max_len:
        return None
    msg = f"{what} = {need} tokens exceeds the model's context {cfg.max_len}"
    if cfg.arch == "gpt2" or not rope_ok:
        raise ConfigError(msg + (" (learned positions)" if cfg.arch == "gpt2" else ""))
    return msg + " (RoPE positions beyond the trained context)"
