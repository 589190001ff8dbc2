"""The scan sampler against the full forward pass."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.sampling import categorical, filter_logits, sample

CFG = ModelConfig(vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96,
                  max_len=64)
EOS, PAD = 299, 298


def _setup():
    model = Transformer(CFG)
    params = init_params(CFG, 0)          # jitted, once for the module
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 6), 0, 256)
    mask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]])
    return model, params, tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, attn_mask):
    """The full forward pass, compiled once per shape (eagerly every call
    compiles the layer scan again)."""
    return model.apply({"params": params}, tokens, attn_mask=attn_mask)


def _full_forward_logits(model, params, tokens, mask, new_tokens):
    seq = jnp.concatenate([tokens, new_tokens], axis=1)
    am = jnp.concatenate([mask, jnp.ones_like(new_tokens)], axis=1)
    return _apply(model, params, seq, am)[:, tokens.shape[1] - 1:-1]


def test_greedy_equals_stepwise_argmax_of_full_forward():
    model, params, tokens, mask = _setup()
    out = sample(model, params, tokens, mask, jax.random.PRNGKey(2), max_new_tokens=8,
                 eos_id=EOS, pad_id=PAD, greedy=True)
    # One width for every step (one compile): the causal forward's logits at
    # the last real position do not see the unattended slots after it.
    seq = jnp.concatenate([tokens, jnp.full((3, 8), PAD, tokens.dtype)], 1)
    am = jnp.concatenate([mask, jnp.zeros((3, 8), mask.dtype)], 1)
    for t in range(6, 14):
        nxt = jnp.argmax(_apply(model, params, seq, am)[:, t - 1], -1)
        seq, am = seq.at[:, t].set(nxt), am.at[:, t].set(1)
    np.testing.assert_array_equal(out.tokens, seq[:, 6:])


def test_logprobs_are_temperature_scaled_full_forward_logprobs():
    model, params, tokens, mask = _setup()
    temp = 0.7
    out = sample(model, params, tokens, mask, jax.random.PRNGKey(3), max_new_tokens=6,
                 eos_id=EOS, pad_id=PAD, temperature=temp)
    logits = _full_forward_logits(model, params, tokens, mask, out.tokens)
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits / temp, -1), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs * out.mask, ref * out.mask, atol=1e-4)


def test_stops_at_eos_and_masks_after():
    model, params, tokens, mask = _setup()
    # Make EOS the most likely token after the first response token.
    params = jax.tree_util.tree_map(lambda x: x, params)
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = kernel.at[:, EOS].set(kernel[:, EOS] + 0.0)
    out = sample(model, params, tokens, mask, jax.random.PRNGKey(4), max_new_tokens=8,
                 eos_id=EOS, pad_id=PAD, greedy=True)
    forced = sample(model, params, tokens, mask, jax.random.PRNGKey(4), max_new_tokens=8,
                    eos_id=int(out.tokens[0, 2]), pad_id=PAD, greedy=True)
    # Row 0 now ends at its third token: EOS kept, the rest pad and masked.
    assert bool(forced.finished[0])
    row_mask = np.asarray(forced.mask[0])
    first_eos = int(np.argmax(np.asarray(forced.tokens[0]) == int(out.tokens[0, 2])))
    assert row_mask[:first_eos + 1].all() and not row_mask[first_eos + 1:].any()
    assert (np.asarray(forced.tokens[0, first_eos + 1:]) == PAD).all()
    assert (np.asarray(forced.logprobs[0, first_eos + 1:]) == 0).all()
    # Before EOS the two runs are identical.
    np.testing.assert_array_equal(forced.tokens[0, :first_eos + 1], out.tokens[0, :first_eos + 1])


def test_top_k_samples_only_top_k():
    model, params, tokens, mask = _setup()
    out = sample(model, params, tokens, mask, jax.random.PRNGKey(5), max_new_tokens=6,
                 eos_id=EOS, pad_id=PAD, top_k=3, temperature=2.0)
    logits = _full_forward_logits(model, params, tokens, mask, out.tokens)
    top3 = jax.lax.top_k(logits, 3)[1]
    assert bool(jnp.all(jnp.any(top3 == out.tokens[..., None], axis=-1) | (out.mask == 0)))


def test_filter_logits_top_p_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 12)).astype(np.float32)
    for top_p in (0.3, 0.75, 0.95):
        kept = np.asarray(filter_logits(jnp.asarray(logits), top_p=top_p)) > -1e30
        for row in range(4):
            p = np.exp(logits[row] - logits[row].max())
            p /= p.sum()
            order = np.argsort(-p)
            expect, mass = set(), 0.0
            for i in order:
                expect.add(i)
                mass += p[i]
                if mass >= top_p:
                    break
            assert set(np.flatnonzero(kept[row])) == expect


def test_categorical_frequencies_match_softmax_and_skip_filtered_tokens():
    """Inverse-CDF sampling draws each token with its softmax probability (within
    5 standard errors over 40,000 draws per row) and never a -inf token, including
    the first and the last entries of the vocabulary."""
    neg = jnp.finfo(jnp.float32).min
    logits = jnp.array([[neg, 0.0, 1.0, neg, 2.0, -1.0, neg],
                        [3.0, neg, neg, 0.5, neg, neg, 0.0]])
    n = 40_000
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: categorical(k, logits)))(keys))   # [n, 2]
    for row in range(2):
        p = np.exp(np.asarray(logits[row], np.float64) - np.max(np.asarray(logits[row])))
        p[np.asarray(logits[row]) == neg] = 0.0
        p /= p.sum()
        freq = np.bincount(draws[:, row], minlength=7) / n
        assert (freq[p == 0] == 0).all()
        np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-12)


def _scan_sample(model, params, prompt_BxP, prompt_mask_BxP, rng, *, max_new_tokens, eos_id,
                 pad_id, temperature=1.0, greedy=False, stop_at_eos=True):
    """The sampler before early stopping, as a plain reference: one
    `lax.scan` over every one of the max_new_tokens steps."""
    from rlhf_jax.models.decoding import decode, decoding_params, init_layer_caches
    from rlhf_jax.models.transformer import positions_from_mask
    from rlhf_jax.sampling import _choose
    b, p = prompt_BxP.shape
    n = max_new_tokens
    dparams = decoding_params(model, params)
    cache = init_layer_caches(model.cfg, b, p + n)
    pm = prompt_mask_BxP.astype(jnp.int32)
    kv = jnp.concatenate([pm, jnp.zeros((b, n), jnp.int32)], axis=1)
    pos = positions_from_mask(pm)
    logits, cache = decode(model, dparams, prompt_BxP, pos, kv, cache, jnp.int32(0), last_only=True)

    def step(carry, i):
        cache, kv, last, pos, done, rng = carry
        rng, sub = jax.random.split(rng)
        token, logp = _choose(sub, last, temperature, 0, 1.0, greedy)
        token = jnp.where(done, pad_id, token)
        live = ~done
        if stop_at_eos:
            done = done | (token == eos_id)
        kv = jax.lax.dynamic_update_slice_in_dim(kv, live.astype(jnp.int32)[:, None], p + i, axis=1)
        logits, cache = decode(model, dparams, token[:, None], pos[:, None], kv, cache, p + i)
        return (cache, kv, logits[:, 0], pos + 1, done, rng), (token, jnp.where(live, logp, 0.0),
                                                               live.astype(jnp.float32))

    init = (cache, kv, logits[:, -1], pos[:, -1] + 1, jnp.zeros((b,), jnp.bool_), rng)
    (_, _, _, _, done, _), (t, lp, m) = jax.lax.scan(step, init, jnp.arange(n, dtype=jnp.int32))
    return t.T, lp.T, m.T, done


SMALL = ModelConfig(vocab_size=8, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                    max_len=64)


@pytest.mark.parametrize("n,greedy,stop_at_eos", [(13, False, True), (40, False, True),
                                                   (16, True, True), (7, False, False)])
def test_early_stopping_decode_equals_decoding_every_step(n, greedy, stop_at_eos):
    """Chunked decoding that stops once every row has ended gives the tokens,
    log-probs, mask and EOS flags of a scan over all max_new_tokens steps,
    for the same RNG (n not a multiple of the chunk included). A vocabulary
    of 8 makes EOS likely, so rows end early and at different steps."""
    model, params = Transformer(SMALL), init_params(SMALL, 0)
    eos, pad = 7, 6
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 5), 0, 6)
    mask = jnp.array([[0, 0, 1, 1, 1], [1] * 5, [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]])
    kw = dict(max_new_tokens=n, eos_id=eos, pad_id=pad, temperature=1.5, greedy=greedy,
              stop_at_eos=stop_at_eos)
    stopped_early = 0
    for seed in range(4):
        rng = jax.random.PRNGKey(10 + seed)
        ref = _scan_sample(model, params, tokens, mask, rng, **kw)
        out = sample(model, params, tokens, mask, rng, chunk=4, **kw)
        np.testing.assert_array_equal(out.tokens, ref[0])
        np.testing.assert_allclose(out.logprobs, ref[1], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out.mask, ref[2])
        np.testing.assert_array_equal(out.finished, ref[3])
        longest = int(np.asarray(ref[2]).sum(1).max())
        if stop_at_eos and np.asarray(ref[3]).all():
            # It stopped in the chunk where the longest row ended.
            assert int(out.steps) == -(-longest // 4) * 4
            stopped_early += int(out.steps) < -(-n // 4) * 4
        else:
            assert int(out.steps) == -(-n // 4) * 4
    if n == 40 and not greedy:
        assert stopped_early > 0
