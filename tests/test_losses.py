"""rlhf_jax.losses against plain NumPy loop references."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax import losses

B, T, V, K = 5, 8, 11, 5

lm_loss_j = jax.jit(losses.lm_loss)
ranking_loss_j = jax.jit(losses.ranking_loss)


def prefix_mask(rng, b=B, t=T):
    """[b, t] mask with random lengths; row 0 empty, row 1 full."""
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0], lengths[1] = 0, t
    mask = np.zeros((b, t), np.float32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    return mask


def log_sigmoid(x):
    # Stable scalar log(sigmoid(x)).
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------
# LM loss
# ---------------------------------------------------------------------------


def ref_lm_loss(logits, targets, mask):
    total, correct, n = 0.0, 0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            z = [float(v) for v in logits[b, t]]
            mx = max(z)
            lse = mx + math.log(sum(math.exp(v - mx) for v in z))
            total += lse - z[targets[b, t]]
            correct += int(max(range(len(z)), key=lambda i: z[i]) == targets[b, t])
            n += 1
    return (total / n if n else 0.0), n, (correct / n if n else 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lm_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    mask = prefix_mask(rng)
    logits = (3.0 * rng.normal(size=(B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    # Make some tokens correct so accuracy is not trivially ~1/V.
    hit = rng.random((B, T)) < 0.4
    targets = np.where(hit, logits.argmax(-1), targets)
    # Garbage ids at masked positions must not matter (nor crash the gather).
    targets = np.where(mask != 0, targets, -1)
    loss, stats = lm_loss_j(logits, targets, mask)
    ref_loss, ref_n, ref_acc = ref_lm_loss(logits, targets, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert float(stats["n_tokens"]) == ref_n
    np.testing.assert_allclose(stats["accuracy"], ref_acc, rtol=1e-6)


def test_lm_loss_bf16_logits_upcast_and_stable():
    rng = np.random.default_rng(3)
    mask = prefix_mask(rng)
    logits = jnp.asarray(rng.normal(size=(B, T, V)) * 4.0, jnp.bfloat16)
    targets = rng.integers(0, V, size=(B, T))
    loss, _ = lm_loss_j(logits, targets, mask)
    assert loss.dtype == jnp.float32
    ref, _, _ = ref_lm_loss(np.asarray(logits.astype(jnp.float32)), targets, mask)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # Huge logits: log_softmax form stays finite, as does its gradient.
    big = np.zeros((1, 2, 3), np.float32)
    big[0, :, 0] = 1e4
    loss, _ = lm_loss_j(big, np.array([[0, 1]]), np.ones((1, 2)))
    np.testing.assert_allclose(loss, 0.5 * 1e4, rtol=1e-6)
    g = jax.grad(lambda x: losses.lm_loss(x, np.array([[0, 1]]), np.ones((1, 2)))[0])(big)
    assert np.all(np.isfinite(g))


def test_lm_loss_empty_mask_is_zero():
    logits = np.zeros((B, T, V), np.float32)
    loss, stats = lm_loss_j(logits, np.zeros((B, T), np.int32), np.zeros((B, T)))
    assert float(loss) == 0.0 and float(stats["n_tokens"]) == 0.0
    assert float(stats["accuracy"]) == 0.0


# ---------------------------------------------------------------------------
# K-wise ranking loss
# ---------------------------------------------------------------------------


def ref_ranking_loss(rewards, ranks, valid):
    per_prompt, n_pairs, n_right, margin = [], 0, 0, 0.0
    for b in range(rewards.shape[0]):
        terms = []
        for i in range(rewards.shape[1]):
            for j in range(rewards.shape[1]):
                if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]:
                    d = float(rewards[b, i]) - float(rewards[b, j])
                    terms.append(-log_sigmoid(d))
                    n_right += d > 0
                    margin += d
        if terms:
            per_prompt.append(sum(terms) / len(terms))
            n_pairs += len(terms)
    loss = sum(per_prompt) / len(per_prompt) if per_prompt else 0.0
    if n_pairs == 0:
        return loss, dict(accuracy=0.0, n_pairs=0, margin=0.0, n_prompts=0)
    return loss, dict(accuracy=n_right / n_pairs, n_pairs=n_pairs, margin=margin / n_pairs,
                      n_prompts=len(per_prompt))


def random_comparisons(rng):
    """Ragged K (0..K valid slots, row 1 full), ranks with ties, garbage in invalid slots."""
    n_valid = rng.integers(0, K + 1, size=B)
    n_valid[1] = K
    valid = np.zeros((B, K), bool)
    for b, n in enumerate(n_valid):
        valid[b, :n] = True
    ranks = rng.integers(0, 3, size=(B, K))  # few distinct ranks -> ties
    rewards = rng.normal(size=(B, K)).astype(np.float32) * 2.0
    rewards = np.where(valid, rewards, 1e6).astype(np.float32)
    ranks = np.where(valid, ranks, -5)  # invalid slots would outrank everything
    return rewards, ranks, valid


@pytest.mark.parametrize("seed", range(4))
def test_ranking_loss_matches_loop(seed):
    rewards, ranks, valid = random_comparisons(np.random.default_rng(seed))
    loss, stats = ranking_loss_j(rewards, ranks, valid)
    ref_loss, ref_stats = ref_ranking_loss(rewards, ranks, valid)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k, v in ref_stats.items():
        np.testing.assert_allclose(stats[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), garbage=st.sampled_from([1e6, -np.inf, np.nan]))
def test_ranking_loss_property(seed, garbage):
    rewards, ranks, valid = random_comparisons(np.random.default_rng(seed))
    rewards = np.where(valid, rewards, garbage).astype(np.float32)
    loss, stats = ranking_loss_j(rewards, ranks, valid)
    ref_loss, ref_stats = ref_ranking_loss(rewards, ranks, valid)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert float(stats["n_pairs"]) == ref_stats["n_pairs"]
    g = np.asarray(jax.grad(lambda r: losses.ranking_loss(r, ranks, valid)[0])(rewards))
    assert np.all(np.isfinite(g)) and np.all(g[~valid] == 0.0)
    # Gradient pushes better-ranked responses up: sum of grads per prompt is 0.
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-6)


def test_ranking_loss_k2_is_pairwise_chosen_rejected():
    chosen = np.array([1.0, -0.5, 3.0], np.float32)
    rejected = np.array([0.0, 0.5, -20.0], np.float32)
    rewards = np.stack([rejected, chosen], axis=1)  # chosen in slot 1
    ranks = np.array([[1, 0]] * 3)
    loss, stats = ranking_loss_j(rewards, ranks, np.ones((3, 2), bool))
    want = np.mean([-log_sigmoid(float(c - r)) for c, r in zip(chosen, rejected)])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(stats["accuracy"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(stats["margin"], np.mean(chosen - rejected), rtol=1e-6)


def test_ranking_loss_per_prompt_normalisation_and_ties():
    # Prompt 0: K=4 strict ranking, 6 pairs. Prompt 1: K=2, 1 pair.
    # Prompt 2: all tied -> no pairs, excluded from the mean.
    rewards = np.array([[0.3, -1.0, 2.0, 0.5], [0.7, 0.1, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]],
                       np.float32)
    ranks = np.array([[0, 1, 2, 3], [1, 0, 0, 0], [2, 2, 2, 2]])
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    loss, stats = ranking_loss_j(rewards, ranks, valid)
    p0 = np.mean([-log_sigmoid(float(rewards[0, i] - rewards[0, j]))
                  for i, j in itertools.combinations(range(4), 2)])
    p1 = -log_sigmoid(float(rewards[1, 1] - rewards[1, 0]))
    np.testing.assert_allclose(loss, (p0 + p1) / 2, rtol=1e-6)  # each prompt weighs the same
    assert float(stats["n_pairs"]) == 7 and float(stats["n_prompts"]) == 2

    # A batch with only ties has no pairs: loss 0, finite stats.
    loss, stats = ranking_loss_j(rewards, np.zeros_like(ranks), valid)
    assert float(loss) == 0.0 and float(stats["n_pairs"]) == 0.0
    assert all(np.isfinite(float(v)) for v in stats.values())
