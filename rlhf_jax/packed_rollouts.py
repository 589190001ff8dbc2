"""Rollouts packed for the training forward passes of PPO and GRPO.

A rollout is a row of P + N tokens: its prompt left-padded to P, its
response right-padded to N. On the instruction world a row of 136 holds
about 57 real tokens. Scoring (policy, reference, value and reward model)
and the update (policy and value, forward and backward) run instead on
packed rows: several rollouts a row, each its own segment (its id in the
attention mask: a token attends only within its segment, and positions
restart at 0, models.transformer.attention_inputs), so each rollout is
computed as it is alone, on about half the tokens. The outputs are then
read back at each response token's position, into the [rollouts, N] layout
everything after the forward pass keeps (log-probs, values, advantages,
losses).

The plan is made on the host from the rollouts' lengths (`plan`): best fit,
longest first (data.preprocess.pack_texts), into rows of a fixed width (the
prompt budget + N + 1, rounded up to 8), and a number of rows rounded up to
a few sizes (`rows_bucket`), so that the jitted functions compile for at
most four row counts. A response cut at the length limit gets an EOS after
its last token in its segment: the reward model reads its score there, as
it was trained (the text, then EOS); the other models read earlier
positions, which a causal model computes without it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import preprocess
from rlhf_jax.models.transformer import Transformer


class Packed(NamedTuple):
    """Where a group of G rollouts sits in R packed rows of width W."""
    source: jax.Array       # [..., R, W] int32: index into `flat_tokens` (EOS and pad at the end)
    segments: jax.Array     # [..., R, W] int32: segment ids 1, 2, ... along a row; 0 padding
    outputs: jax.Array      # [..., G, N] int32: flat index into the R*W positions of the one
                            # whose output predicts response token j (past the response's
                            # end: its last one, which the response mask drops)
    last: jax.Array         # [..., G] int32: flat index of the rollout's last token (its EOS)


def width(p: int, n: int) -> int:
    """Packed row width: a whole rollout and an appended EOS, rounded up to 8."""
    return -(-(p + n + 1) // 8) * 8


def rows_bucket(rows: int, group: int, multiple: int = 1) -> int:
    """`rows` rounded up to a quarter of the group (at least `multiple`, and
    a multiple of it: the batch devices), so a function compiles for at most
    four row counts."""
    step = max(-(-group // 4), 1)
    step = -(-step // multiple) * multiple
    return -(-rows // step) * step


def flat_tokens(tokens_BxS, eos_id: int, pad_id: int = 0):
    """The rollouts' tokens as one row, then EOS, then pad (any id: its
    segment is 0, nothing attends to it): what `source` indexes."""
    return jnp.concatenate([tokens_BxS.reshape(-1),
                            jnp.array([eos_id, pad_id], tokens_BxS.dtype)])


def group_lengths(prompt_len, response_len, finished) -> np.ndarray:
    """Tokens each rollout takes in a packed row: prompt, response, and the
    appended EOS of an unfinished response."""
    return (np.asarray(prompt_len) + np.asarray(response_len)
            + (1 - np.asarray(finished, np.int64))).astype(np.int64)


def plan(group: Sequence[int], prompt_len, response_len, finished, *, p: int, n: int, w: int,
         rows: int, packed_rows=None) -> dict[str, np.ndarray]:
    """The packing of rollouts `group` (indices into the batch) in `rows`
    rows of width `w`: numpy arrays of `Packed`'s fields, `outputs` and
    `last` in the order of `group`. `packed_rows`: the group's
    `preprocess.pack_texts` of its lengths, where the caller has it.

    prompt_len, response_len, finished: [B] of the whole batch; the batch's
    rollout i has its prompt at columns P - prompt_len[i] .. P - 1 of its
    row of P + N = p + n tokens, its response (EOS included) at P onwards.
    """
    group = np.asarray(group)
    plen = np.asarray(prompt_len, np.int64)[group]
    rlen = np.asarray(response_len, np.int64)[group]
    fin = np.asarray(finished, bool)[group]
    b = len(np.asarray(prompt_len))
    s = p + n
    eos_at, pad_at = b * s, b * s + 1
    lengths = group_lengths(plen, rlen, fin)
    if packed_rows is None:
        packed_rows = preprocess.pack_texts(lengths, w)
    if len(packed_rows) > rows:
        raise ValueError(f"{len(group)} rollouts need {len(packed_rows)} packed rows, got {rows}")
    source = np.full((rows, w), pad_at, np.int32)
    segments = np.zeros((rows, w), np.int32)
    outputs = np.zeros((len(group), n), np.int32)
    last = np.zeros((len(group),), np.int32)
    j = np.arange(n)
    for r, members in enumerate(packed_rows):
        offset = 0
        for seg, g in enumerate(members, start=1):
            i, real = group[g], plen[g] + rlen[g]
            start = r * w + offset
            source[r, offset:offset + real] = i * s + (p - plen[g]) + np.arange(real)
            if not fin[g]:
                source[r, offset + real] = eos_at
            segments[r, offset:offset + lengths[g]] = seg
            outputs[g] = start + plen[g] - 1 + np.minimum(j, max(rlen[g] - 1, 0))
            last[g] = start + lengths[g] - 1
            offset += lengths[g]
    return dict(source=source, segments=segments, outputs=outputs, last=last)


def pack(groups, lengths, *, p: int, n: int, multiple: int = 1) -> Packed:
    """`plan` of each group of rollouts (groups [K, G]: PPO's minibatches),
    stacked [K, ...] over one row count: the largest any group needs,
    `rows_bucket`ed, at most G rounded up to `multiple` (the batch devices).
    lengths: [3, B] (`host_lengths`)."""
    groups = np.asarray(groups)
    prompt_len, response_len, finished = lengths
    w = width(p, n)
    tokens = group_lengths(prompt_len, response_len, finished)
    layouts = [preprocess.pack_texts(tokens[g], w) for g in groups]
    g_size = groups.shape[1]
    rows = min(rows_bucket(max(map(len, layouts)), g_size, multiple),
               -(-g_size // multiple) * multiple)
    plans = [plan(g, prompt_len, response_len, finished, p=p, n=n, w=w, rows=rows,
                  packed_rows=layout) for g, layout in zip(groups, layouts)]
    return Packed(**{k: np.stack([pl[k] for pl in plans]) for k in Packed._fields})


def pack_batch(lengths, *, p: int, n: int, multiple: int = 1) -> Packed:
    """The whole batch as one group (scoring)."""
    b = np.asarray(lengths).shape[1]
    return Packed(*(x[0] for x in pack(np.arange(b)[None], lengths, p=p, n=n,
                                       multiple=multiple)))


def outputs(model: Transformer, params, flat, packed: Packed, at: str = "outputs"):
    """The model's outputs (logits [G, N, V], or scores [G, N]) at the packed
    positions `packed.outputs` (or [G] at `packed.last`: at="last")."""
    return model.apply({"params": params}, flat[packed.source], getattr(packed, at),
                       attn_mask=packed.segments, method=Transformer.outputs_at_flat)


def lengths_of(prompt_mask_BxP, response_mask_BxN, finished_B):
    """[3, B] int32 on the device: prompt lengths, response lengths, finished."""
    return jnp.stack([jnp.sum(prompt_mask_BxP > 0, axis=1), jnp.sum(response_mask_BxN > 0, axis=1),
                      finished_B.astype(jnp.int32)]).astype(jnp.int32)


def host_lengths(prompt_mask_BxP, response_mask_BxN, finished_B) -> np.ndarray:
    """`lengths_of` read on every host ([3, B] of the global batch); waits
    for the sampler."""
    x = _lengths(prompt_mask_BxP, response_mask_BxN, finished_B)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


_lengths = jax.jit(lengths_of)
