"""Packed rollouts (rlhf_jax.packed_rollouts): the plan against plain loops,
the packed forward pass against each rollout's own padded pass, and the
bound on row counts (so on compiles)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params
from rlhf_jax import packed_rollouts as pr
from rlhf_jax.models.transformer import ModelConfig, Transformer

EOS = 39


def _batch(seed, b=12, p=7, n=6):
    """Random left-padded prompts and right-padded responses, some unfinished."""
    rng = np.random.default_rng(seed)
    plen = rng.integers(1, p + 1, b)
    rlen = rng.integers(1, n + 1, b)
    finished = rng.random(b) < 0.6
    tokens = rng.integers(0, 30, (b, p + n)).astype(np.int32)
    for i in range(b):
        tokens[i, :p - plen[i]] = 0
        if finished[i]:
            tokens[i, p + rlen[i] - 1] = EOS
        tokens[i, p + rlen[i]:] = 0
    return tokens, np.stack([plen, rlen, finished.astype(np.int64)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_places_every_rollout_whole_in_one_segment(seed):
    p, n = 7, 6
    tokens, lengths = _batch(seed, p=p, n=n)
    b = tokens.shape[0]
    groups = np.random.default_rng(seed).permutation(b).reshape(3, 4)
    packed = pr.pack(groups, lengths, p=p, n=n)
    flat = np.concatenate([tokens.reshape(-1), [EOS, 0]])
    w = pr.width(p, n)
    assert packed.source.shape[2] == w and packed.source.shape[1] < 4    # packed: fewer rows
    for k, group in enumerate(groups):
        rows = flat[packed.source[k]]                      # [R, W] tokens
        seg = packed.segments[k]
        for g, i in enumerate(group):
            plen, rlen, fin = lengths[:, i]
            real = tokens[i, p - plen:p + rlen]
            want = np.concatenate([real, [] if fin else [EOS]]).astype(np.int32)
            # Its last token (the RM's reading point) closes the segment holding it.
            r, c = divmod(int(packed.last[k, g]), w)
            start = c - len(want) + 1
            np.testing.assert_array_equal(rows[r, start:c + 1], want)
            assert len(set(seg[r, start:c + 1])) == 1 and seg[r, start] > 0
            assert (start == 0 or seg[r, start - 1] != seg[r, start])
            assert c + 1 == w or seg[r, c + 1] != seg[r, c]
            # Output j is read where token j - 1 of the response (or the
            # prompt's last token) sits: the position that predicts token j.
            for j in range(rlen):
                rr, cc = divmod(int(packed.outputs[k, g, j]), w)
                assert (rr, cc) == (r, start + plen - 1 + j)
        # Every segment is one rollout's: as many segments as rollouts.
        assert sum(len(set(s[s > 0])) for s in seg) == len(group)


def test_row_counts_take_at_most_four_sizes_per_group_size():
    for g in (4, 16, 64, 256):
        for multiple in (1, 8):
            sizes = {min(pr.rows_bucket(r, g, multiple), -(-g // multiple) * multiple)
                     for r in range(1, g + 1)}
            assert len(sizes) <= 4, (g, multiple, sizes)
            assert all(s % multiple == 0 for s in sizes)
            for r in range(1, g + 1):
                assert pr.rows_bucket(r, g, multiple) >= r


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_outputs_equal_each_rollouts_padded_pass(arch):
    """Logits at every response position, and a scalar head at the last
    token, from the packed rows equal those of the rollout alone."""
    p, n = 7, 6
    cfg = ModelConfig(arch=arch, vocab_size=40, hidden=32, layers=1, heads=2, kv_heads=1,
                      intermediate=48, max_len=32)
    model, scalar = Transformer(cfg), Transformer(cfg.replace(head="scalar"))
    params, sparams = init_params(cfg, 0), init_params(cfg.replace(head="scalar"), 1)
    sparams["score_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2),
                                                        sparams["score_head"]["kernel"].shape)
    tokens, lengths = _batch(3, p=p, n=n)
    b = tokens.shape[0]
    packed = pr.pack_batch(lengths, p=p, n=n)
    assert packed.source.shape[0] < b
    flat = pr.flat_tokens(jnp.asarray(tokens), EOS)
    logits = jax.jit(functools.partial(pr.outputs, model))(params, flat, packed)
    scores = jax.jit(functools.partial(pr.outputs, scalar, at="last"))(sparams, flat, packed)

    @functools.partial(jax.jit, static_argnums=0)
    def alone(m, params, row, attn):
        """A rollout in a row of its own (right-padded: one compile)."""
        return m.apply({"params": params}, row[None], attn_mask=attn[None])[0]
    for i in range(b):
        plen, rlen, fin = lengths[:, i]
        real = np.concatenate([tokens[i, p - plen:p + rlen], [] if fin else [EOS]])
        row = np.zeros(p + n + 1, np.int32)
        row[:len(real)] = real
        attn = (np.arange(p + n + 1) < len(real)).astype(np.int32)
        want = np.asarray(alone(model, params, row, attn))[plen - 1:plen - 1 + rlen]
        np.testing.assert_allclose(np.asarray(logits[i, :rlen]), want, rtol=1e-4, atol=1e-5)
        want_score = np.asarray(alone(scalar, sparams, row, attn))[len(real) - 1]
        np.testing.assert_allclose(float(scores[i]), want_score, rtol=1e-4, atol=1e-5)
