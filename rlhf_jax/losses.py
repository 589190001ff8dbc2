"""Supervised losses: the masked LM loss (pretrain/SFT/PPO-ptx), InstructGPT's K-wise ranking loss, and DPO's loss on the same rankings.

Pure, jittable functions on logits/rewards and masks (no model inside), computed
in float32. Masked or invalid positions are replaced with `jnp.where` before any
arithmetic, so garbage there (out-of-range token ids, inf rewards) never leaks
into a result or a gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def lm_loss(logits_BxTxV, targets_BxT, mask_BxT):
    """Token cross-entropy (nats), mean over tokens where `mask_BxT` is set.

    Args:
      logits_BxTxV: next-token logits, any float dtype (upcast to float32).
      targets_BxT: the token ids to predict at each position (already shifted
        by the caller: logits[:, t] predicts targets[:, t]).
      mask_BxT: 1 on tokens that count (e.g. response tokens for SFT, 0 on the
        prompt and on padding).

    Returns:
      (loss scalar, stats) with `n_tokens` (float32 count of masked-in tokens)
      and `accuracy` (argmax == target over those tokens). An all-zero mask
      gives loss 0.
    """
    logits = logits_BxTxV.astype(jnp.float32)
    m = jnp.broadcast_to(jnp.asarray(mask_BxT) != 0, logits.shape[:-1])
    # Padding may carry ids like -1; gather a safe index there (result is masked).
    targets = jnp.where(m, jnp.asarray(targets_BxT).astype(jnp.int32), 0)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # logsumexp - logit[target] == -log_softmax[target], without a second [B,T,V] array.
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    n = jnp.sum(m.astype(jnp.float32))
    denom = jnp.maximum(n, 1.0)
    loss = jnp.sum(jnp.where(m, nll, 0.0)) / denom
    correct = (jnp.argmax(logits, axis=-1) == targets) & m
    stats = {
        "n_tokens": n,
        "accuracy": jnp.sum(correct.astype(jnp.float32)) / denom,
    }
    return loss, stats


def ranking_loss(rewards_BxK, ranks_BxK, valid_BxK):
    """InstructGPT's K-wise reward-model loss from the K scores of each prompt.

      loss = mean_b [ 1/|P_b| * sum_{(i,j) in P_b} -log sigmoid(r_bi - r_bj) ]

    where P_b holds every pair of valid responses of prompt b with
    ranks[b, i] < ranks[b, j] (0 = best; equal ranks are a tie and give no
    pair). Each prompt's C(K, 2) comparisons are one batch element, as in the
    paper (which avoids overfitting from seeing each completion in many
    separate pairs); here normalised by the number of ranked pairs, so ties and
    ragged K are handled. The outer mean is over prompts with at least one
    pair; with none at all the loss is 0.

    Args:
      rewards_BxK: RM scores of the K_max response slots of each prompt (one
        forward pass per response; the pairs reuse them).
      ranks_BxK: integer (or float) ranks, lower is better.
      valid_BxK: 1 on real slots (ragged K: a prompt may have fewer than K_max).

    Returns:
      (loss scalar, stats): `accuracy` (fraction of all pairs with
      r_better > r_worse, ties in reward count as wrong), `n_pairs` (float32
      total), `margin` (mean r_better - r_worse over pairs), `n_prompts`
      (prompts with at least one pair).
    """
    valid = jnp.asarray(valid_BxK) != 0
    r = jnp.where(valid, jnp.asarray(rewards_BxK).astype(jnp.float32), 0.0)
    ranks = jnp.asarray(ranks_BxK)
    # pair_BxKxK[b, i, j]: response i is ranked strictly better than j.
    pair = (valid[:, :, None] & valid[:, None, :]
            & (ranks[:, :, None] < ranks[:, None, :]))
    diff = r[:, :, None] - r[:, None, :]  # r_i - r_j
    # where-before-use so a non-pair's diff cannot produce inf/nan gradients.
    diff = jnp.where(pair, diff, 0.0)
    pairf = pair.astype(jnp.float32)
    nll = jnp.where(pair, -jax.nn.log_sigmoid(diff), 0.0)

    n_pairs_B = jnp.sum(pairf, axis=(1, 2))
    has_pairs = n_pairs_B > 0
    per_prompt = jnp.sum(nll, axis=(1, 2)) / jnp.maximum(n_pairs_B, 1.0)
    n_prompts = jnp.sum(has_pairs.astype(jnp.float32))
    loss = jnp.sum(jnp.where(has_pairs, per_prompt, 0.0)) / jnp.maximum(n_prompts, 1.0)

    n_pairs = jnp.sum(n_pairs_B)
    denom = jnp.maximum(n_pairs, 1.0)
    stats = {
        "accuracy": jnp.sum(jnp.where(pair & (diff > 0), 1.0, 0.0)) / denom,
        "n_pairs": n_pairs,
        "margin": jnp.sum(diff) / denom,
        "n_prompts": n_prompts,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)


def implicit_rewards(logp_BxK, ref_logp_BxK, valid_BxK, beta):
    """r = beta * (log pi - log pi_ref) per slot, [B, K]; 0 in padding slots
    (selected away by jnp.where, so garbage there reaches neither the result
    nor a gradient: a difference's derivative is finite)."""
    valid = jnp.asarray(valid_BxK) != 0
    log_ratio = jnp.where(valid, jnp.asarray(logp_BxK, jnp.float32)
                          - jnp.asarray(ref_logp_BxK, jnp.float32), 0.0)
    return beta * log_ratio


def dpo_loss(logp_BxK, ref_logp_BxK, ranks_BxK, valid_BxK, beta):
    """DPO's sigmoid loss over every ranked pair of each prompt's K responses.

    `ranking_loss` on the implicit rewards beta * (logp - ref_logp):
    the mean over a prompt's ranked pairs (i better than j, ties give none)
    of -log sigmoid(r_i - r_j), then over prompts. Pairwise DPO is the K = 2
    case.

    Returns:
      (loss, stats): ranking_loss's accuracy, n_pairs, margin, n_prompts, and
      chosen_reward / rejected_reward, the mean implicit reward of the better
      and of the worse response over the ranked pairs (margin is their
      difference).
    """
    rewards_BxK = implicit_rewards(logp_BxK, ref_logp_BxK, valid_BxK, beta)
    loss, stats = ranking_loss(rewards_BxK, ranks_BxK, valid_BxK)
    valid = jnp.asarray(valid_BxK) != 0
    ranks = jnp.asarray(ranks_BxK)
    pair_BxKxK = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
    r = jax.lax.stop_gradient(rewards_BxK)
    denom = jnp.maximum(stats["n_pairs"], 1.0)
    stats["chosen_reward"] = jnp.sum(jnp.where(pair_BxKxK, r[:, :, None], 0.0)) / denom
    stats["rejected_reward"] = jnp.sum(jnp.where(pair_BxKxK, r[:, None, :], 0.0)) / denom
    return loss, stats
