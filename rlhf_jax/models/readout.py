"""A model's outputs read at a few positions of each row, the last layer
computed at those positions only.

A reward model reads one score a response, at its EOS. Every layer but the
last must run at every position (later positions attend to them), but the
last layer's output is read only where the head is: its keys and values
still need every position, its queries, attention output and MLP only the
read ones. At the bench's TINY RM step (4 layers, 64 tokens a row, one read
a row) that is about a fifth of the step's FLOPs (BENCHMARKS.md). The same
Block and Transformer methods as the full forward pass, so the two agree to
float tolerance (tests/test_model.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import Block, Transformer, attention_inputs, layer_stack


def outputs_at_cols(model: Transformer, params, tokens_BxT, cols_BxN, attn_mask=None,
                    dropout_rng=None):
    """`model.apply({"params": params}, tokens, attn_mask=attn_mask)` at
    positions `cols_BxN` of each row: [B, N] scores (scalar head) or
    [B, N, V] logits.

    With dropout on (a non-deterministic model with cfg.dropout > 0) the full
    forward pass runs, with `dropout_rng`, and is read at `cols`."""
    cfg = model.cfg
    cols_BxN = cols_BxN.astype(jnp.int32)
    if not model.deterministic and cfg.dropout > 0.0:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        out = model.apply({"params": params}, tokens_BxT, attn_mask=attn_mask, rngs=rngs)
        index = cols_BxN if out.ndim == 2 else cols_BxN[..., None]
        return jnp.take_along_axis(out, index, axis=1)
    b, t = tokens_BxT.shape
    positions, mask, _ = attention_inputs(b, t, t, None, attn_mask, None, cached=False)
    top = {"params": params}
    x = model.apply(top, tokens_BxT, positions, method=Transformer.embed)
    layers = params["layers"]
    if cfg.layers > 1:
        first = jax.tree_util.tree_map(lambda a: a[:-1], layers)
        stack = layer_stack(cfg, True, cfg.layers - 1, parent=None)
        x, _ = stack.apply({"params": first}, x, None, positions, mask, 0)
    last = jax.tree_util.tree_map(lambda a: a[-1], layers)
    x, _ = Block(cfg, True, parent=None).apply({"params": last}, x, None, positions, mask, 0,
                                               cols_BxN)
    return model.apply(top, x, method=Transformer.output)
