"""Rollouts: one jitted function, prefill then chunked `lax.scan` decode over a
static KV cache, stopping once every row has ended.

Both run the model's decode path (`models.decoding.decode`): the layer stack is
split into per-layer weights once per call, so no step copies weights or
cache (on a 2-core CPU the decode step got 2x faster at the bench's TINY
config; BENCHMARKS.md).

Prompts arrive left-padded ([B, P] tokens and mask), so every row's next
token goes to the same cache slot and positions come from the mask. The
output has fixed shapes: tokens, log-probs and a response mask of [B, N]
(N = max_new_tokens), which is what PPO wants. A row stops at EOS: the EOS
token itself is kept (mask 1) and everything after it is pad with mask 0.

The log-probs returned are those of the sampling distribution (logits scaled
by temperature, after top-k/top-p). PPO does not trust them as the old
policy: it recomputes them with the training forward pass.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models.decoding import decode, decoding_params, init_layer_caches
from rlhf_jax.models.transformer import Transformer, positions_from_mask


class SampleOutput(NamedTuple):
    tokens: jax.Array      # [B, N] int32; pad after EOS
    logprobs: jax.Array    # [B, N] f32 log-prob of each token under the sampling distribution
    mask: jax.Array        # [B, N] f32; 1 on response tokens up to and including EOS
    finished: jax.Array    # [B] bool; EOS was produced
    steps: jax.Array       # [] int32; decode steps run (whole chunks, <= N rounded up)


def filter_logits(logits_BxV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf."""
    neg = jnp.finfo(logits_BxV.dtype).min
    if top_k and top_k < logits_BxV.shape[-1]:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][..., -1:]
        logits_BxV = jnp.where(logits_BxV < kth, neg, logits_BxV)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if
        # the mass strictly before it is below top_p (the first always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold, neg, logits_BxV)
    return logits_BxV


def categorical(rng, logits_BxV: jax.Array) -> jax.Array:
    """One token per row from softmax(logits), by inverse-CDF sampling.

    One uniform per row, against `jax.random.categorical`'s Gumbel-max trick,
    which draws one per vocabulary entry: 49k threefry draws and logarithms
    per row at SmolLM2's vocabulary, 10% of a decode step on a 2-core CPU.
    Tokens of probability zero (filtered to -inf) are never drawn: the CDF is
    flat across them and a token is the first whose CDF exceeds u < total."""
    b, v = logits_BxV.shape
    cdf = jnp.cumsum(jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1), axis=-1)
    u = jax.random.uniform(rng, (b, 1)) * cdf[:, -1:]
    token = jnp.sum(cdf <= u, axis=-1)
    # u rounded up onto the total (odds ~1e-7): the mode, never a zero-probability token.
    return jnp.where(token >= v, jnp.argmax(logits_BxV, axis=-1), token)


def _choose(rng, logits_BxV, temperature, top_k, top_p, greedy):
    """Next token and its log-prob under the (scaled, filtered) sampling distribution."""
    if greedy:
        token = jnp.argmax(logits_BxV, axis=-1)
        logp = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        scaled = filter_logits(logits_BxV / temperature, top_k, top_p)
        token = categorical(rng, scaled)
        logp = jax.nn.log_softmax(scaled, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


# Decode steps per chunk: the loop checks after each chunk whether every row
# has ended, and stops there (a scan of all max_new_tokens steps would decode
# padding once the batch is done). Small enough that little is wasted past the
# longest response, large enough that the loop's check costs nothing.
DECODE_CHUNK = 8


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "greedy", "eos_id", "pad_id",
    "stop_at_eos", "chunk"))
def sample(model: Transformer, params, prompt_BxP, prompt_mask_BxP, rng, *, max_new_tokens: int,
           eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, stop_at_eos: bool = True,
           chunk: int = DECODE_CHUNK) -> SampleOutput:
    """Samples `max_new_tokens` after left-padded prompts.

    Decoding runs in chunks of `chunk` steps (a `lax.scan` each) inside a
    `lax.while_loop` that ends once every row has produced EOS: the steps
    it skips would only have produced pad (mask 0, log-prob 0), so the
    outputs are those of decoding every step, for the same `rng` (each step
    draws from the same split chain). `stop_at_eos=False` keeps sampling
    through EOS (benchmarks that must make exactly B x N tokens); the mask
    then covers every token.
    """
    b, p = prompt_BxP.shape
    n = max_new_tokens
    chunk = max(1, min(int(chunk), n))
    n_chunks = -(-n // chunk)
    steps = n_chunks * chunk                  # n rounded up to whole chunks
    cfg = model.cfg
    dparams = decoding_params(model, params)
    # The cache holds p + n (shapes, and so the numerics, of every step as
    # without chunks); the steps of the last chunk past n write nothing that
    # a kept output reads (their rows count as ended).
    cache = init_layer_caches(cfg, b, p + n)
    prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
    kv_mask_BxS = jnp.concatenate([prompt_mask_BxP, jnp.zeros((b, n), jnp.int32)], axis=1)
    positions = positions_from_mask(prompt_mask_BxP)
    # Prefill: the head at the last prompt position only (the others are unused).
    logits, cache = decode(model, dparams, prompt_BxP, positions, kv_mask_BxS, cache,
                           jnp.int32(0), last_only=True)
    next_pos_B = positions[:, -1] + 1

    def step(carry, i):
        cache, kv_mask, last_logits, pos, done, rng = carry
        rng, sub = jax.random.split(rng)
        token, logp = _choose(sub, last_logits, temperature, top_k, top_p, greedy)
        done = done | (i >= n)                # past max_new_tokens: nothing is kept
        token = jnp.where(done, pad_id, token)
        live = ~done
        if stop_at_eos:
            done = done | (token == eos_id)
        kv_mask = jax.lax.dynamic_update_slice_in_dim(kv_mask, live.astype(jnp.int32)[:, None],
                                                      p + i, axis=1)
        logits, cache = decode(model, dparams, token[:, None], pos[:, None], kv_mask, cache, p + i)
        out = (token, jnp.where(live, logp, 0.0), live.astype(jnp.float32))
        return (cache, kv_mask, logits[:, 0], pos + 1, done, rng), out

    def run_chunk(loop):
        c, state, outs = loop
        state, chunk_outs = jax.lax.scan(step, state, c * chunk + jnp.arange(chunk, dtype=jnp.int32))
        outs = tuple(jax.lax.dynamic_update_slice_in_dim(o, co, c * chunk, axis=0)
                     for o, co in zip(outs, chunk_outs))
        return c + 1, state, outs

    def more(loop):
        c, state, _ = loop
        return (c < n_chunks) & ~jnp.all(state[4])

    # [steps, B] buffers at what a finished row produces (pad, log-prob 0, mask 0).
    outs = (jnp.full((steps, b), pad_id, jnp.int32), jnp.zeros((steps, b), jnp.float32),
            jnp.zeros((steps, b), jnp.float32))
    state = (cache, kv_mask_BxS, logits[:, -1], next_pos_B, jnp.zeros((b,), jnp.bool_), rng)
    n_run, state, (tokens, logprobs, mask) = jax.lax.while_loop(more, run_chunk,
                                                                (jnp.int32(0), state, outs))
    tokens, logprobs, mask = tokens[:n].T, logprobs[:n].T, mask[:n].T
    finished = (jnp.any((tokens == eos_id) & (mask > 0), axis=1) if stop_at_eos
                else jnp.zeros((b,), jnp.bool_))
    return SampleOutput(tokens, logprobs, mask, finished, n_run * chunk)


def concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN):
    """The [B, P+N] sequence a training forward pass scores, with its attention mask.

    Positions follow from the mask (left pads in front of the prompt, pads after
    EOS at the end), so this is the same sequence the sampler saw.
    """
    tokens = jnp.concatenate([prompt_BxP, response_BxN], axis=1)
    mask = jnp.concatenate([prompt_mask_BxP.astype(jnp.int32),
                            (response_mask_BxN > 0).astype(jnp.int32)], axis=1)
    return tokens, mask
