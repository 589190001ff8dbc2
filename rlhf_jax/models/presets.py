"""Named architectures: the shapes of published models, for random init and
ahead-of-time compiles (`python -m rlhf_jax.aot`) without their weights.

`--config.model.preset=llama3_8b` replaces the architecture fields of a
config's `model` block (as `model.pretrained` does); the runtime fields
(dropout, matmul, activations, remat, scan_unroll) still apply. Parameters
come from `init` like any other model, or from `jax.eval_shape(init)` when
only their shapes and shardings are wanted.

Shapes are those of the models' HF `config.json` (Llama 3, not 3.1: no rope
scaling, 8192-token context).
"""
from __future__ import annotations

from rlhf_jax.models.transformer import ModelConfig

_LLAMA3 = dict(arch="llama", vocab_size=128256, head_dim=128, max_len=8192, norm_eps=1e-5,
               rope_theta=500000.0, tie_embeddings=False, qkv_bias=False)

PRESETS: dict[str, dict] = {
    "llama3_8b": dict(_LLAMA3, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336),
    "llama3_70b": dict(_LLAMA3, hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672),
}


def preset(name: str) -> dict:
    """The ModelConfig fields of preset `name` (a ValueError names the known ones)."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"model.preset={name!r}: unknown preset (known: "
                         f"{', '.join(sorted(PRESETS))})") from None


def preset_config(name: str, **runtime) -> ModelConfig:
    return ModelConfig(**preset(name), **runtime)
