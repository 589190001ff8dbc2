"""RL math for language models: masked reductions, KL estimators, GAE, PPO and GRPO losses.

Every function here is pure, jittable and computes in float32 whatever the input
dtype. Conventions shared by all of them:

* Shapes are in the names: `B` batch (rollouts), `T` response length (the fixed
    rollout buffer), `V` vocabulary.
* A mask (`mask_BxT`) is a float or bool array of the same shape as the data;
    1 (True) marks a real response token. Tokens after EOS, and padding, are 0.
* Masked positions never leak into a result. Inputs are first replaced by 0 at
    masked positions with `jnp.where` (not by multiplying with the mask), so even
    `inf`/`nan` garbage there cannot turn into `0 * inf = nan`, in the forward pass
    or in gradients (the "double where" trick), and every per-token output is 0 at
    masked positions.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

KL_KINDS = ("k1", "k2", "k3")


def _f32(x) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _bool_mask(mask, shape) -> Array:
    """A mask as bool, broadcast to `shape` (a float mask counts as real where != 0)."""
    return jnp.broadcast_to(jnp.asarray(mask) != 0, shape)


def _clean(x, mask) -> tuple[Array, Array]:
    """`x` in float32 with masked positions set to 0, and the mask as bool."""
    x = _f32(x)
    m = _bool_mask(mask, x.shape)
    return jnp.where(m, x, 0.0), m


# ---------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------


def masked_sum(x, mask, axis=None) -> Array:
    """Sum of `x` over positions where `mask` is set (float32)."""
    x, _ = _clean(x, mask)
    return jnp.sum(x, axis=axis)


def masked_mean(x, mask, axis=None) -> Array:
    """Mean of `x` over positions where `mask` is set; 0 where nothing is set.

    Returning 0 (rather than nan) for an empty mask lets a step with, say, no
    valid rollout row still produce finite metrics and zero gradients.
    """
    x, m = _clean(x, mask)
    total = jnp.sum(x, axis=axis)
    count = jnp.sum(m.astype(jnp.float32), axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def masked_var(x, mask, unbiased=True) -> Array:
    """Variance of `x` over all positions where `mask` is set (a scalar).

    With `unbiased`, divides by n - 1 (Bessel), as the whitening in TRL / the
    OpenAI summarize-from-feedback code does. With fewer than two real entries
    (n - 1 <= 0) the result is 0 rather than nan/inf.
    """
    x, m = _clean(x, mask)
    mean = masked_mean(x, m)
    n = jnp.sum(m.astype(jnp.float32))
    sq = jnp.sum(jnp.where(m, jnp.square(x - mean), 0.0))
    denom = n - 1.0 if unbiased else n
    return jnp.where(denom > 0, sq / jnp.maximum(denom, 1.0), 0.0)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8) -> Array:
    """(x - mean) / sqrt(var + eps), mean/var over masked entries only (a scalar each).

    Used for advantages: statistics come from real response tokens of the whole
    batch, so post-EOS padding cannot skew them. With `shift_mean=False` the mean
    is added back (only the scale is normalised), as for rewards in some recipes.
    Masked positions of the output are 0. Shape and dtype float32 as `x`.
    """
    x, m = _clean(x, mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)


# ---------------------------------------------------------------------------
# Log-probs, entropy, KL estimators
# ---------------------------------------------------------------------------


def logprobs_from_logits(logits_BxTxV, tokens_BxT, temperature=1.0) -> Array:
    """log pi(token | context) under softmax(logits / temperature); [B, T] float32 (nats).

    The logits must be divided by the sampling temperature: the rollout tokens were
    drawn from softmax(logits / temperature), so that is the policy whose
    log-probs PPO's importance ratio and the KL penalty need. Computed as
    logit[token] - logsumexp(logits), which avoids materialising a second
    [B, T, V] array for the full log-softmax.
    """
    logits = _f32(logits_BxTxV) / temperature
    tokens = jnp.asarray(tokens_BxT).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits_BxTxV, temperature=1.0) -> Array:
    """Entropy (nats) of softmax(logits / temperature) at each position; [B, T] float32."""
    logits = _f32(logits_BxTxV) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    # exp(logp) * logp is 0 * -inf = nan for a -inf logit; such a token
    # contributes exactly 0 to the entropy.
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def kl_per_token(logp, logp_ref, kind="k1") -> Array:
    """Per-sample estimator of KL(pi || ref) for samples x ~ pi (Schulman, "Approximating KL").

    `logp` = log pi(x), `logp_ref` = log ref(x), any shape, float32 out (nats).
        k1 = logp - logp_ref                       unbiased, can be negative per sample
        k2 = 0.5 * (logp - logp_ref)^2             biased, low variance, >= 0
        k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp)   unbiased, >= 0
    `kind` is a Python string (static under jit). No masking here: callers mask.
    """
    log_ratio = _f32(logp) - _f32(logp_ref)  # log pi/ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        # r = ref/pi; (r - 1) - log r >= 0 since log r <= r - 1.
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")


def token_kl_from_logits(policy_logits_BxTxV, ref_logits_BxTxV) -> Array:
    """Exact KL(pi || ref) between the next-token distributions softmax(logits)
    at every position, summed over the full vocabulary; [B, T] float32 (nats)."""
    logp_BxTxV = jax.nn.log_softmax(_f32(policy_logits_BxTxV), axis=-1)
    logq_BxTxV = jax.nn.log_softmax(_f32(ref_logits_BxTxV), axis=-1)
    p_BxTxV = jnp.exp(logp_BxTxV)
    # A token pi gives probability 0 contributes 0 (not 0 * -inf).
    return jnp.sum(jnp.where(p_BxTxV > 0, p_BxTxV * (logp_BxTxV - logq_BxTxV), 0.0), axis=-1)


def response_kl(policy_logits_BxTxV, ref_logits_BxTxV, mask_BxT) -> Array:
    """Exact KL per response: token KLs summed over the response tokens (mask 1
    up to and including EOS, 0 after it); [B] float32."""
    return masked_sum(token_kl_from_logits(policy_logits_BxTxV, ref_logits_BxTxV), mask_BxT,
                      axis=-1)


# ---------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------


def last_token_index(mask_BxT) -> tuple[Array, Array]:
    """(index of the last real token of each row [B] int32, row has a real token [B] bool).

    Rows with no real token get index 0 and False.
    """
    m = jnp.asarray(mask_BxT) != 0
    T = m.shape[-1]
    idx = jnp.max(jnp.where(m, jnp.arange(T, dtype=jnp.int32), -1), axis=-1)
    has_any = idx >= 0
    return jnp.maximum(idx, 0), has_any


def per_token_rewards(score_B, logp_BxT, ref_logp_BxT, mask_BxT, kl_coef):
    """InstructGPT per-token rewards: -kl_coef * KL at every response token, RM score at the last.

    Args:
        score_B: reward-model score of each full response, [B].
        logp_BxT, ref_logp_BxT: log-probs of the sampled tokens under the policy
            (as recomputed by the training forward pass) and the frozen SFT reference.
        mask_BxT: 1 on real response tokens (up to and including EOS).
        kl_coef: KL penalty coefficient beta (float or scalar array).

    Returns:
        rewards_BxT: -kl_coef * k1 on real tokens, plus score_B at the last real token
            of each row (a row without real tokens gets nothing); 0 at masked positions.
        kl_BxT: the k1 estimate logp - ref_logp on real tokens, 0 elsewhere.
    """
    logp, m = _clean(logp_BxT, mask_BxT)
    ref, _ = _clean(ref_logp_BxT, m)
    kl = jnp.where(m, kl_per_token(logp, ref, "k1"), 0.0)
    rewards = -_f32(kl_coef) * kl
    idx, has_any = last_token_index(m)
    T = m.shape[-1]
    at_last = (jnp.arange(T)[None, :] == idx[:, None]) & has_any[:, None]
    rewards = rewards + jnp.where(at_last, _f32(score_B)[:, None], 0.0)
    return jnp.where(m, rewards, 0.0), kl


def gae(rewards_BxT, values_BxT, mask_BxT, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) by a reverse `lax.scan` over T.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    The episode ends at each row's last real token, so the value after it is 0 (no
    bootstrap). The recursion runs over real tokens only: a masked position leaves
    the carried (next value, next advantage) untouched and outputs 0, so garbage
    rewards/values there cannot change anything. For the normal mask (a prefix of
    ones, then zeros after EOS) this is exactly GAE on the response; a mask with
    holes is treated as if its real tokens were consecutive steps.

    Args:
        rewards_BxT: per-token rewards (e.g. from `per_token_rewards`).
        values_BxT: value predictions V(s_t) from the rollout.
        mask_BxT: 1 on real response tokens.
        gamma, lam: discount and GAE lambda (InstructGPT: 1.0 and 0.95).

    Returns:
        (advantages_BxT, returns_BxT), float32; returns = advantages + values (the
        value-function targets). Both 0 at masked positions. Not whitened.
    """
    r, m = _clean(rewards_BxT, mask_BxT)
    v, _ = _clean(values_BxT, m)
    gamma = _f32(gamma)
    gl = gamma * _f32(lam)

    def step(carry, xs):
        next_v, next_a = carry  # [B] each: V and A of the next real token (0 past the end)
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_v - v_t
        a_t = delta + gl * next_a
        carry = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a))
        return carry, jnp.where(m_t, a_t, 0.0)

    B = r.shape[0]
    init = (jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.float32))
    # Scan over time: move T to the leading axis.
    _, adv_TxB = jax.lax.scan(step, init, (r.T, v.T, m.T), reverse=True)
    adv = adv_TxB.T
    returns = jnp.where(m, adv + v, 0.0)
    return adv, returns


# ---------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps):
    """PPO clipped surrogate (Schulman et al. 2017), masked mean over real tokens.

        ratio = exp(logp - old_logp)
        loss  = mean_t max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))

    Args:
        logp: log-probs of the sampled tokens under the current policy, [B, T].
        old_logp: the same under the policy that generated the batch (recomputed by
            the training forward pass, not taken from the sampler), [B, T].
        advantages: [B, T], typically whitened GAE advantages (treated as constants).
        mask: 1 on real response tokens.
        clip_eps: clipping range epsilon (e.g. 0.2).

    Returns:
        (loss scalar, stats) with stats:
            clipfrac: fraction of real tokens where the clipped term is the larger
                (so the token gets no gradient).
            approx_kl: masked mean of 0.5 * (logp - old_logp)^2 (k2, >= 0).
            approx_kl_k3: masked mean of (r - 1) - log r with r = exp(logp - old_logp),
                the unbiased k3 estimate of KL(old || new) for tokens sampled from old.
            ratio_mean: masked mean of the importance ratio.
    """
    logp, m = _clean(logp, mask)
    old, _ = _clean(old_logp, m)
    adv, _ = _clean(advantages, m)
    log_ratio = logp - old
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(pg1, pg2), m)
    stats = {
            "clipfrac": masked_mean((pg2 > pg1).astype(jnp.float32), m),
            "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), m),
            "approx_kl_k3": masked_mean(jnp.expm1(log_ratio) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)


def value_loss(values, old_values, returns, mask, clip_eps):
    """Clipped value loss: 0.5 * mean_t max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2).

    Args:
        values: current value predictions [B, T]; old_values: those from the rollout;
        returns: GAE value targets; mask: 1 on real tokens; clip_eps: value clip range
        (in reward units).

    Returns:
        (loss scalar, stats) with `vf_clipfrac`, the fraction of real tokens where
        the clipped error is the larger.
    """
    v, m = _clean(values, mask)
    old, _ = _clean(old_values, m)
    ret, _ = _clean(returns, m)
    v_clipped = old + jnp.clip(v - old, -clip_eps, clip_eps)
    err1 = jnp.square(v - ret)
    err2 = jnp.square(v_clipped - ret)
    loss = 0.5 * masked_mean(jnp.maximum(err1, err2), m)
    vf_clipfrac = masked_mean((err2 > err1).astype(jnp.float32), m)
    stats = {"vf_clipfrac": jax.lax.stop_gradient(vf_clipfrac)}
    return loss, stats


def ptx_mix(rl_loss, rl_grads: Any, lm_loss, lm_grads: Any, ptx_coef) -> tuple[Array, Any]:
    """PPO-ptx's objective (InstructGPT eq. 2) as a loss to minimise and its
    gradient: the RL loss plus ptx_coef x the pretraining LM loss, each
    gradient computed apart (so their sizes can be logged) and summed leaf by
    leaf. Both losses are per-token means here (see stages/ppo.py on what
    ptx_coef means then)."""
    grads = jax.tree_util.tree_map(lambda a, b: a + ptx_coef * b, rl_grads, lm_grads)
    return rl_loss + ptx_coef * lm_loss, grads


# ---------------------------------------------------------------------------
# Group-relative policy gradients (GRPO, RLOO): no value model
# ---------------------------------------------------------------------------

ADVANTAGE_KINDS = ("grpo", "rloo")


def kl_penalised_scores(score_B, logp_BxT, ref_logp_BxT, mask_BxT, kl_coef) -> Array:
    """A sequence reward with the KL penalty inside it ("k1 in reward"):
    score - kl_coef * sum_t (log pi - log ref) over the response tokens; [B].
    The per-token rewards of `per_token_rewards`, summed (gamma 1, no value
    model to credit them token by token)."""
    logp, m = _clean(logp_BxT, mask_BxT)
    ref, _ = _clean(ref_logp_BxT, m)
    return _f32(score_B) - _f32(kl_coef) * jnp.sum(jnp.where(m, logp - ref, 0.0), axis=-1)


def group_advantages(rewards_BxG, kind="grpo", scale_by_std=True, eps=1e-4) -> Array:
    """One advantage per response from the G rewards of its prompt's group; [B, G].

        grpo   A_i = (r_i - mean_j r_j) / (std_j r_j + eps)   Shao et al. 2024
               (std with Bessel's correction, as TRL computes it); without
               `scale_by_std`, A_i = r_i - mean_j r_j (Liu et al. 2025, "Dr. GRPO");
        rloo   A_i = r_i - 1/(G-1) sum_{j != i} r_j          Ahmadian et al. 2024
               (the leave-one-out baseline: unbiased, never scaled).

    A group whose G rewards are equal gives all zeros (nothing to learn from
    it). `kind` and `scale_by_std` are Python values (static under jit); G >= 2.
    """
    r = _f32(rewards_BxG)
    g = r.shape[-1]
    if g < 2:
        raise ValueError(f"a group needs at least 2 responses, got G={g}")
    mean = jnp.mean(r, axis=-1, keepdims=True)
    if kind == "rloo":
        return (r - mean) * (g / (g - 1.0))      # r_i - (G mean - r_i) / (G - 1)
    if kind != "grpo":
        raise ValueError(f"advantage kind must be one of {ADVANTAGE_KINDS}, got {kind!r}")
    if not scale_by_std:
        return r - mean
    std = jnp.sqrt(jnp.sum(jnp.square(r - mean), axis=-1, keepdims=True) / (g - 1.0))
    return (r - mean) / (std + eps)


def grpo_policy_loss(logp, old_logp, ref_logp, advantages_B, mask, clip_eps, kl_coef=0.0):
    """GRPO's loss: the clipped surrogate with one advantage per response
    (broadcast over its tokens), plus kl_coef x the k3 estimate of KL(pi ||
    ref) per token ("k3 in loss", DeepSeekMath eq. 3; its gradient flows
    through log pi). Token-level masked means over the batch (as DAPO and
    Dr. GRPO aggregate: every token weighs the same, however long its
    response). kl_coef 0 leaves the KL out (it is then in the reward, or off).

    Returns (loss, stats): ppo_policy_loss's stats and `kl_k3_loss` (the
    masked mean of k3, before kl_coef)."""
    adv_BxT = jnp.broadcast_to(_f32(advantages_B)[:, None], jnp.shape(logp))
    loss, stats = ppo_policy_loss(logp, old_logp, adv_BxT, mask, clip_eps)
    logp_c, m = _clean(logp, mask)
    ref_c, _ = _clean(ref_logp, m)
    k3 = masked_mean(kl_per_token(logp_c, ref_c, "k3"), m)
    stats = dict(stats, kl_k3_loss=jax.lax.stop_gradient(k3))
    return loss + _f32(kl_coef) * k3, stats


# ---------------------------------------------------------------------------
# Controllers and parameter averaging
# ---------------------------------------------------------------------------


def adaptive_kl_coef(coef, observed_kl, target, horizon, n_steps):
    """Ziegler et al. (2019) proportional KL controller; returns the new coefficient.

        error = clip(observed_kl / target - 1, -0.2, 0.2)
        coef  <- coef * (1 + error * n_steps / horizon)

    `observed_kl` is the mean per-sequence KL (nats) of the last batch, `n_steps` the
    number of samples (or steps) since the last update, `horizon` the controller's
    time constant in the same unit. Works on floats or arrays (float32 out).
    """
    error = jnp.clip(_f32(observed_kl) / _f32(target) - 1.0, -0.2, 0.2)
    return _f32(coef) * (1.0 + error * _f32(n_steps) / _f32(horizon))


def ema_update(ema_params: Any, params: Any, decay) -> Any:
    """Exponential moving average of a pytree: decay * ema + (1 - decay) * params.

    Computed in float32, stored back in each EMA leaf's dtype. Started from
    zeros, it is biased towards 0 by decay^t after t updates: read it through
    `ema_debiased`.
    """
    decay = _f32(decay)

    def upd(e, p):
        new = decay * _f32(e) + (1.0 - decay) * _f32(p)
        return new.astype(jnp.asarray(e).dtype)

    return jax.tree.map(upd, ema_params, params)


def ema_debiased(ema_params: Any, decay, count) -> Any:
    """The bias-corrected average ema / (1 - decay^count) of an EMA started
    from zeros after `count` updates (Adam's correction, Kingma & Ba 2015):
    a weighted mean of the averaged params whose weights sum to 1, so early
    in training it is not pulled towards zero (nor, started from the initial
    params instead, towards them). count = 0 gives the zeros back."""
    decay, count = _f32(decay), _f32(count)
    scale = jnp.where(count > 0, 1.0 / (1.0 - decay ** jnp.maximum(count, 1.0)), 0.0)
    return jax.tree.map(lambda e: (_f32(e) * scale).astype(jnp.asarray(e).dtype), ema_params)
