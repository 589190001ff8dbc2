"""rlhf_jax.rl against plain NumPy loop references (loops over batch and time).

Every batch has padding after EOS (masks [1, .., 1, 0, .., 0] with random
lengths, always including an empty row and a full row) and garbage at the
masked positions, which must not change any result.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax import rl

B, T, V = 6, 9, 7
GARBAGE = 1e6

# Jitted once each; static arguments where the function branches in Python.
masked_sum_j = jax.jit(rl.masked_sum, static_argnames="axis")
masked_mean_j = jax.jit(rl.masked_mean, static_argnames="axis")
masked_var_j = jax.jit(rl.masked_var, static_argnames="unbiased")
masked_whiten_j = jax.jit(rl.masked_whiten, static_argnames="shift_mean")
logprobs_j = jax.jit(rl.logprobs_from_logits)
entropy_j = jax.jit(rl.entropy_from_logits)
kl_j = jax.jit(rl.kl_per_token, static_argnames="kind")
rewards_j = jax.jit(rl.per_token_rewards)
gae_j = jax.jit(rl.gae)
ppo_j = jax.jit(rl.ppo_policy_loss)
value_loss_j = jax.jit(rl.value_loss)
kl_coef_j = jax.jit(rl.adaptive_kl_coef)
ema_j = jax.jit(rl.ema_update)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def prefix_mask(rng, b=B, t=T):
    """[b, t] float mask of real tokens then post-EOS padding; row 0 empty, row 1 full."""
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0], lengths[1] = 0, t
    mask = np.zeros((b, t), np.float32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    return mask


def with_garbage(x, mask, value=GARBAGE):
    """x with `value` written at masked positions."""
    return np.where(mask != 0, x, value).astype(np.float32)


def randn(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------
# Loop references
# ---------------------------------------------------------------------------


def ref_masked_mean_all(x, mask):
    total, n = 0.0, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                total += float(x[b, t])
                n += 1
    return total / n if n else 0.0


def ref_masked_var_all(x, mask, unbiased):
    mean = ref_masked_mean_all(x, mask)
    sq, n = 0.0, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                sq += (float(x[b, t]) - mean) ** 2
                n += 1
    d = n - 1 if unbiased else n
    return sq / d if d > 0 else 0.0


def ref_logsumexp(z):
    mx = max(z)
    return mx + math.log(sum(math.exp(v - mx) for v in z))


def ref_logprobs(logits, tokens, temperature):
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            z = [float(v) / temperature for v in logits[b, t]]
            out[b, t] = z[tokens[b, t]] - ref_logsumexp(z)
    return out


def ref_entropy(logits, temperature):
    out = np.zeros(logits.shape[:2])
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            z = [float(v) / temperature for v in logits[b, t]]
            lse = ref_logsumexp(z)
            out[b, t] = -sum(math.exp(v - lse) * (v - lse) for v in z)
    return out


def ref_kl(lp, lr, kind):
    d = lp - lr
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    return math.exp(lr - lp) - 1.0 - (lr - lp)


def ref_per_token_rewards(score, logp, ref_logp, mask, kl_coef):
    rewards = np.zeros(mask.shape)
    kl = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        last = None
        for t in range(mask.shape[1]):
            if mask[b, t]:
                kl[b, t] = float(logp[b, t]) - float(ref_logp[b, t])
                rewards[b, t] = -kl_coef * kl[b, t]
                last = t
        if last is not None:
            rewards[b, last] += float(score[b])
    return rewards, kl


def ref_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE per row over its real tokens (consecutive steps); V after the last is 0."""
    adv = np.zeros(mask.shape)
    ret = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        steps = [t for t in range(mask.shape[1]) if mask[b, t]]
        last_adv = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_v = float(values[b, steps[k + 1]]) if k + 1 < len(steps) else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last_adv = delta + gamma * lam * last_adv
            adv[b, t] = last_adv
            ret[b, t] = last_adv + float(values[b, t])
    return adv, ret


def ref_ppo(logp, old, adv, mask, eps):
    loss = clipped = kl2 = kl3 = ratio_sum = 0.0
    n = 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            lr = float(logp[b, t]) - float(old[b, t])
            ratio = math.exp(lr)
            a = float(adv[b, t])
            unclipped = -a * ratio
            clipped_term = -a * min(max(ratio, 1 - eps), 1 + eps)
            loss += max(unclipped, clipped_term)
            clipped += clipped_term > unclipped
            kl2 += 0.5 * lr * lr
            kl3 += (ratio - 1.0) - lr
            ratio_sum += ratio
            n += 1
    if n == 0:
        return 0.0, dict(clipfrac=0.0, approx_kl=0.0, approx_kl_k3=0.0, ratio_mean=0.0)
    return loss / n, dict(clipfrac=clipped / n, approx_kl=kl2 / n,
                          approx_kl_k3=kl3 / n, ratio_mean=ratio_sum / n)


def ref_value_loss(v, old, ret, mask, eps):
    total = clipped = 0.0
    n = 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            vc = min(max(float(v[b, t]), float(old[b, t]) - eps), float(old[b, t]) + eps)
            e1 = (float(v[b, t]) - float(ret[b, t])) ** 2
            e2 = (vc - float(ret[b, t])) ** 2
            total += 0.5 * max(e1, e2)
            clipped += e2 > e1
            n += 1
    return (total / n, clipped / n) if n else (0.0, 0.0)


# ---------------------------------------------------------------------------
# Masked reductions and whitening
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_sum_mean_var_match_loops(seed):
    rng = np.random.default_rng(seed)
    mask = prefix_mask(rng)
    x = with_garbage(randn(rng, B, T), mask)

    n = mask.sum()
    np.testing.assert_allclose(masked_sum_j(x, mask), ref_masked_mean_all(x, mask) * n, rtol=1e-5)
    np.testing.assert_allclose(masked_mean_j(x, mask), ref_masked_mean_all(x, mask), rtol=1e-5)
    for unbiased in (True, False):
        np.testing.assert_allclose(masked_var_j(x, mask, unbiased=unbiased),
                                   ref_masked_var_all(x, mask, unbiased), rtol=1e-5)

    # Per-row reductions; the empty row 0 gives 0, not nan.
    row_mean = np.asarray(masked_mean_j(x, mask, axis=1))
    row_sum = np.asarray(masked_sum_j(x, mask, axis=1))
    for b in range(B):
        np.testing.assert_allclose(row_mean[b], ref_masked_mean_all(x[b:b + 1], mask[b:b + 1]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row_sum[b], sum(x[b, t] for t in range(T) if mask[b, t]),
                                   rtol=1e-5, atol=1e-6)
    assert row_mean[0] == 0.0


def test_masked_mean_and_var_safe_on_empty_mask():
    x = np.full((B, T), np.nan, np.float32)  # every position masked, even nan is ignored
    zero = np.zeros((B, T), np.float32)
    assert float(masked_mean_j(x, zero)) == 0.0
    assert float(masked_sum_j(x, zero)) == 0.0
    assert float(masked_var_j(x, zero, unbiased=True)) == 0.0
    np.testing.assert_array_equal(masked_whiten_j(x, zero), zero)
    one = zero.copy()
    one[2, 0] = 1.0
    assert float(masked_var_j(x * 0 + 3.0, one, unbiased=True)) == 0.0  # n - 1 = 0


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_whiten(seed):
    rng = np.random.default_rng(seed)
    mask = prefix_mask(rng)
    x = with_garbage(3.0 + 2.0 * randn(rng, B, T), mask)
    w = np.asarray(masked_whiten_j(x, mask))

    assert abs(ref_masked_mean_all(w, mask)) < 1e-5
    np.testing.assert_allclose(ref_masked_var_all(w, mask, unbiased=True), 1.0, rtol=1e-4)
    assert np.all(w[mask == 0] == 0.0)
    mean, var = ref_masked_mean_all(x, mask), ref_masked_var_all(x, mask, True)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                np.testing.assert_allclose(w[b, t], (x[b, t] - mean) / math.sqrt(var + 1e-8),
                                           rtol=1e-4, atol=1e-5)

    # shift_mean=False keeps the mean, rescales the spread only.
    w2 = np.asarray(masked_whiten_j(x, mask, shift_mean=False))
    np.testing.assert_allclose(ref_masked_mean_all(w2, mask), mean, rtol=1e-4)
    np.testing.assert_allclose(ref_masked_var_all(w2, mask, True), 1.0, rtol=1e-4)
    assert np.all(w2[mask == 0] == 0.0)


# ---------------------------------------------------------------------------
# Log-probs, entropy, KL
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_loops(temperature):
    rng = np.random.default_rng(3)
    logits = 3.0 * randn(rng, B, T, V)
    tokens = rng.integers(0, V, size=(B, T))
    lp = logprobs_j(logits, tokens, temperature)
    ent = entropy_j(logits, temperature)
    assert lp.shape == (B, T) and lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, ref_logprobs(logits, tokens, temperature), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ref_entropy(logits, temperature), rtol=1e-5, atol=1e-5)
    if temperature != 1.0:
        # The temperature really is applied before the log-softmax.
        assert not np.allclose(lp, ref_logprobs(logits, tokens, 1.0), atol=1e-3)


def test_logprobs_bf16_inputs_computed_in_float32():
    rng = np.random.default_rng(4)
    logits = jnp.asarray(4.0 * randn(rng, B, T, V), jnp.bfloat16)
    tokens = rng.integers(0, V, size=(B, T))
    lp = logprobs_j(logits, tokens, 1.0)
    assert lp.dtype == jnp.float32 and entropy_j(logits, 1.0).dtype == jnp.float32
    ref = ref_logprobs(np.asarray(logits.astype(jnp.float32)), tokens, 1.0)
    np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)


def test_entropy_with_neg_inf_logits_is_finite():
    logits = np.array([[[0.0, 0.0, -np.inf, -np.inf]]], np.float32)
    np.testing.assert_allclose(entropy_j(logits, 1.0), [[math.log(2.0)]], rtol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_loops(kind):
    rng = np.random.default_rng(5)
    lp, lr = randn(rng, B, T), randn(rng, B, T)
    got = np.asarray(kl_j(lp, lr, kind=kind))
    for b in range(B):
        for t in range(T):
            np.testing.assert_allclose(got[b, t], ref_kl(float(lp[b, t]), float(lr[b, t]), kind),
                                       rtol=1e-5, atol=1e-6)
    if kind in ("k2", "k3"):
        assert np.all(got >= 0.0)


def test_kl_estimators_approximate_true_kl():
    """Samples from pi: mean k1 and mean k3 estimate KL(pi || ref); k3 >= 0 per sample."""
    rng = np.random.default_rng(6)
    p = np.array([0.5, 0.2, 0.2, 0.1])
    q = np.array([0.25, 0.25, 0.3, 0.2])
    true_kl = sum(p[i] * math.log(p[i] / q[i]) for i in range(4))
    x = rng.choice(4, size=200_000, p=p)
    lp = np.log(p)[x].astype(np.float32)
    lr = np.log(q)[x].astype(np.float32)
    for kind in ("k1", "k3"):
        est = np.asarray(kl_j(lp, lr, kind=kind))
        stderr = est.std() / math.sqrt(est.size)
        assert abs(est.mean() - true_kl) < 5 * stderr + 1e-4, (kind, est.mean(), true_kl)
        if kind == "k3":
            assert np.all(est >= 0.0)
    # k2 is biased but close for nearby distributions, and never negative.
    k2 = np.asarray(kl_j(lp, lr, kind="k2"))
    assert np.all(k2 >= 0.0) and abs(k2.mean() - true_kl) < 0.5 * true_kl
    with pytest.raises(ValueError):
        rl.kl_per_token(lp, lr, "k4")


# ---------------------------------------------------------------------------
# Rewards and GAE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_token_rewards_match_loop(seed):
    rng = np.random.default_rng(seed)
    mask = prefix_mask(rng)
    score = randn(rng, B)
    logp = with_garbage(randn(rng, B, T), mask)
    ref_logp = with_garbage(randn(rng, B, T), mask, -GARBAGE)
    rewards, kl = rewards_j(score, logp, ref_logp, mask, 0.1)
    ref_r, ref_kl = ref_per_token_rewards(score, logp, ref_logp, mask, 0.1)
    np.testing.assert_allclose(rewards, ref_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl, ref_kl, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(rewards)[0] == 0.0)  # empty row: no score anywhere


def test_per_token_rewards_score_at_last_real_token_bool_mask():
    mask = np.array([[True, True, True, False, False],
                     [True, True, True, True, True],
                     [False] * 5])
    zeros = np.zeros((3, 5), np.float32)
    rewards, _ = rl.per_token_rewards(np.array([1.0, 2.0, 3.0]), zeros, zeros, mask, 0.5)
    np.testing.assert_array_equal(rewards, [[0, 0, 1, 0, 0], [0, 0, 0, 0, 2], [0, 0, 0, 0, 0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_loop(gamma, lam):
    rng = np.random.default_rng(7)
    mask = prefix_mask(rng)
    rewards = with_garbage(randn(rng, B, T), mask)
    values = with_garbage(randn(rng, B, T), mask, -GARBAGE)
    adv, ret = gae_j(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    rng = np.random.default_rng(8)
    mask = prefix_mask(rng)
    rewards, values = randn(rng, B, T), randn(rng, B, T)
    adv, ret = gae_j(rewards, values, mask, 1.0, 1.0)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                mc = sum(rewards[b, s] for s in range(t, T) if mask[b, s])
                np.testing.assert_allclose(ret[b, t], mc, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(adv[b, t], mc - values[b, t], rtol=1e-5, atol=1e-5)


def test_gae_mask_with_holes_skips_masked_steps():
    rng = np.random.default_rng(9)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    rewards = with_garbage(randn(rng, B, T), mask)
    values = with_garbage(randn(rng, B, T), mask)
    adv, ret = gae_j(rewards, values, mask, 0.9, 0.8)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(0, T), min_size=B, max_size=B),
       garbage=st.sampled_from([1e6, -1e6, np.inf, np.nan]),
       seed=st.integers(0, 2**16))
def test_gae_and_rewards_ignore_garbage_at_masked_positions(lengths, garbage, seed):
    rng = np.random.default_rng(seed)
    mask = np.array([[1.0] * n + [0.0] * (T - n) for n in lengths], np.float32)
    score = randn(rng, B)
    logp, ref_logp, values = randn(rng, B, T), randn(rng, B, T), randn(rng, B, T)
    clean = lambda x: np.where(mask != 0, x, 0.0).astype(np.float32)
    dirty = lambda x: with_garbage(x, mask, garbage)

    r_clean, kl_clean = rewards_j(score, clean(logp), clean(ref_logp), mask, 0.05)
    r_dirty, kl_dirty = rewards_j(score, dirty(logp), dirty(ref_logp), mask, 0.05)
    np.testing.assert_array_equal(r_clean, r_dirty)
    np.testing.assert_array_equal(kl_clean, kl_dirty)

    a_clean, ret_clean = gae_j(r_clean, clean(values), mask, 1.0, 0.95)
    a_dirty, ret_dirty = gae_j(with_garbage(np.asarray(r_dirty), mask, garbage), dirty(values),
                               mask, 1.0, 0.95)
    np.testing.assert_array_equal(a_clean, a_dirty)
    np.testing.assert_array_equal(ret_clean, ret_dirty)
    ref_adv, _ = ref_gae(np.asarray(r_clean), values, mask, 1.0, 0.95)
    np.testing.assert_allclose(a_clean, ref_adv, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_policy_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    mask = prefix_mask(rng)
    old = randn(rng, B, T)
    logp = with_garbage(old + 0.3 * randn(rng, B, T), mask)  # ratios well outside 1 +- eps
    adv = with_garbage(randn(rng, B, T), mask)
    loss, stats = ppo_j(logp, with_garbage(old, mask, -GARBAGE), adv, mask, 0.2)
    ref_loss, ref_stats = ref_ppo(logp, old, adv, mask, 0.2)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert set(stats) == set(ref_stats)
    for k in ref_stats:
        np.testing.assert_allclose(stats[k], ref_stats[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert 0.0 < float(stats["clipfrac"]) < 1.0
    assert float(stats["approx_kl_k3"]) >= 0.0


def test_ppo_policy_loss_gradient_finite_and_zero_on_masked_and_clipped_tokens():
    rng = np.random.default_rng(10)
    mask = prefix_mask(rng)
    old = randn(rng, B, T)
    logp = with_garbage(old + 0.3 * randn(rng, B, T), mask, np.inf)
    adv = with_garbage(randn(rng, B, T), mask, np.nan)
    grad = np.asarray(jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, mask, 0.2)[0])(logp))
    assert np.all(np.isfinite(grad))
    assert np.all(grad[mask == 0] == 0.0)
    n = mask.sum()
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t] - old[b, t])
            a = float(adv[b, t])
            clipped_active = -a * min(max(ratio, 0.8), 1.2) > -a * ratio
            want = 0.0 if clipped_active else -a * ratio / n
            np.testing.assert_allclose(grad[b, t], want, rtol=1e-4, atol=1e-7)


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    rng = np.random.default_rng(11)
    mask = prefix_mask(rng)
    logp, adv = randn(rng, B, T), randn(rng, B, T)
    loss, stats = ppo_j(logp, logp, adv, mask, 0.2)
    np.testing.assert_allclose(loss, -ref_masked_mean_all(adv, mask), rtol=1e-5, atol=1e-6)
    assert float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    np.testing.assert_allclose(stats["ratio_mean"], 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_value_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    mask = prefix_mask(rng)
    old = randn(rng, B, T)
    v = with_garbage(old + 0.5 * randn(rng, B, T), mask)
    ret = with_garbage(randn(rng, B, T), mask, -GARBAGE)
    loss, stats = value_loss_j(v, with_garbage(old, mask), ret, mask, 0.2)
    ref_loss, ref_clip = ref_value_loss(v, old, ret, mask, 0.2)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["vf_clipfrac"], ref_clip, rtol=1e-5, atol=1e-6)
    assert 0.0 < float(stats["vf_clipfrac"]) < 1.0
    g = np.asarray(jax.grad(lambda x: rl.value_loss(x, old, ret, mask, 0.2)[0])(v))
    assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0.0)


def test_losses_empty_mask_are_zero():
    x = np.ones((B, T), np.float32)
    zero = np.zeros((B, T), np.float32)
    loss, stats = ppo_j(x, x, x, zero, 0.2)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in stats.values())
    loss, stats = value_loss_j(x, x, x, zero, 0.2)
    assert float(loss) == 0.0 and float(stats["vf_clipfrac"]) == 0.0


# ---------------------------------------------------------------------------
# KL controller and EMA
# ---------------------------------------------------------------------------


def ref_adaptive_kl(coef, observed, target, horizon, n_steps):
    error = min(max(observed / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


@pytest.mark.parametrize("observed", [0.0, 5.0, 5.5, 6.5, 100.0])
def test_adaptive_kl_coef(observed):
    got = kl_coef_j(0.1, observed, 6.0, 10_000, 256)
    np.testing.assert_allclose(got, ref_adaptive_kl(0.1, observed, 6.0, 10_000, 256), rtol=1e-6)
    # Too much KL raises the coefficient, too little lowers it.
    assert (float(got) > 0.1) == (observed > 6.0)
    # Works on plain floats (no jit) and on arrays.
    obs = np.array([observed, 6.0], np.float32)
    np.testing.assert_allclose(rl.adaptive_kl_coef(0.1, obs, 6.0, 10_000, 256),
                               [ref_adaptive_kl(0.1, o, 6.0, 10_000, 256) for o in obs], rtol=1e-6)


def test_ema_update():
    rng = np.random.default_rng(12)
    ema = {"w": randn(rng, 3, 4), "b": {"c": randn(rng, 5)},
           "h": jnp.asarray(randn(rng, 2), jnp.bfloat16)}
    params = {"w": randn(rng, 3, 4), "b": {"c": randn(rng, 5)}, "h": randn(rng, 2)}
    new = ema_j(ema, params, 0.9)
    for path in (("w",), ("b", "c")):
        e, p, n = ema, params, new
        for k in path:
            e, p, n = e[k], p[k], n[k]
        want = np.zeros(e.shape)
        for i in np.ndindex(e.shape):
            want[i] = 0.9 * float(e[i]) + 0.1 * float(p[i])
        np.testing.assert_allclose(n, want, rtol=1e-6)
    assert new["h"].dtype == jnp.bfloat16
    assert jax.tree.structure(new) == jax.tree.structure(ema)


def test_ptx_mix_matches_loop():
    """PPO-ptx's objective: loss rl + c x lm, gradient leaf by leaf g_rl + c x g_lm."""
    rng = np.random.default_rng(3)
    g_rl = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": {"c": rng.normal(size=4).astype(np.float32)}}
    g_lm = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": {"c": rng.normal(size=4).astype(np.float32)}}
    coef = 0.7
    loss, grads = rl.ptx_mix(jnp.float32(1.5), g_rl, jnp.float32(2.0), g_lm, coef)
    assert abs(float(loss) - (1.5 + coef * 2.0)) < 1e-6
    for path in (("a",), ("b", "c")):
        got, x, y = grads, g_rl, g_lm
        for k in path:
            got, x, y = got[k], x[k], y[k]
        want = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            want[idx] = x[idx] + coef * y[idx]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # Coefficient 0 is plain PPO: the LM term leaves no trace.
    _, g0 = rl.ptx_mix(jnp.float32(1.5), g_rl, jnp.float32(np.inf), g_lm, 0.0)
    np.testing.assert_array_equal(np.asarray(g0["a"]), g_rl["a"])
