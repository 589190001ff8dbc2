"""The decode path the sampler runs: the layer stack split into per-layer
weights once per call, a KV cache per layer, and the layers applied one by
one (no scan over layers, so no step copies weights or cache; on a 2-core
CPU the decode step got 2x faster at the bench's TINY config,
BENCHMARKS.md). The same Block and Transformer methods as the training
forward pass (models/transformer.py), so the two agree to float tolerance.
"""
from __future__ import annotations

import jax

from rlhf_jax.models.transformer import (Block, ModelConfig, Transformer, _dtype,
                                         attention_inputs, init_cache)


def decoding_params(model: Transformer, params) -> dict:
    """params -> {"top": params without "layers", "layers": [one tree per layer]}.

    Kernels are cast once to the matmul dtype (a no-op in f32), so a bf16 loop
    does not convert them on every step; `_mm` casts them to the same values."""
    cast = _dtype(model.cfg.matmul) if model.cfg.matmul != "float32" else None

    def layer(i):
        def take(path, a):
            a = a[i]
            is_kernel = getattr(path[-1], "key", None) == "kernel"
            return a.astype(cast) if cast is not None and is_kernel else a
        return jax.tree_util.tree_map_with_path(take, params["layers"])

    return {"top": {k: v for k, v in params.items() if k != "layers"},
            "layers": [layer(i) for i in range(model.cfg.layers)]}


def init_layer_caches(cfg: ModelConfig, batch: int, length: int, dtype=None) -> list:
    """`init_cache` as one {"k", "v"} of [B, kv_heads, S, head_dim] per layer."""
    stacked = init_cache(cfg, batch, length, dtype)
    return [{"k": stacked["k"][i], "v": stacked["v"][i]} for i in range(cfg.layers)]


def decode(model: Transformer, dparams: dict, tokens, positions, attn_mask, caches: list,
           cache_index, *, last_only: bool = False):
    """`model.apply(params, tokens, ..., cache=..., cache_index=...)` with the
    layers unrolled: (logits [B, T or 1, V], new per-layer caches).

    dparams from `decoding_params`, caches from `init_layer_caches` (or a
    previous call). `last_only` applies the head at the last position only
    (a prefill needs nothing else)."""
    cfg = model.cfg
    b, t = tokens.shape
    top = {"params": dparams["top"]}
    positions, mask, cache_index = attention_inputs(
        b, t, caches[0]["k"].shape[2], positions, attn_mask, cache_index, cached=True)
    x = model.apply(top, tokens, positions, method=Transformer.embed)
    block = Block(cfg, model.deterministic)
    new_caches = []
    for layer_params, layer_cache in zip(dparams["layers"], caches):
        x, c = block.apply({"params": layer_params}, x, layer_cache, positions, mask, cache_index)
        new_caches.append(c)
    if last_only:
        x = x[:, -1:]
    return model.apply(top, x, method=Transformer.output), new_caches
