"""What PPO and GRPO share: a rollout's log-probs and their KL and entropy
statistics, the reward model's score of a rollout, the epoch x minibatch
index plan of an update, the hyperparameters the jitted functions close
over, the config checks of an RL stage, and the host metrics of an
iteration (the models an RL stage loads are stages/roles.py's).
stages/ppo.py and stages/grpo.py hold only what differs (values and GAE;
group advantages).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import console, packed_rollouts, rl
from rlhf_jax.errors import ConfigError
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.packed_rollouts import Packed


def rollout_logps(model: Transformer, policy_params, ref_params, flat, packed: Packed,
                  response_BxN, temperature: float):
    """(policy log-probs, reference log-probs, policy logits) of the response
    tokens [B, N], by teacher forcing on the packed rows (`packed` places
    the batch's tokens `flat`: packed_rollouts): the training forward pass,
    not the sampler's numbers."""

    def logp_of(params):
        logits = packed_rollouts.outputs(model, params, flat, packed)
        return rl.logprobs_from_logits(logits, response_BxN, temperature), logits

    old_logp, logits = logp_of(policy_params)
    ref_logp, _ = logp_of(ref_params)
    return old_logp, ref_logp, logits


def rollout_stats(old_logp, ref_logp, logits, mask, temperature: float) -> dict:
    """KL to the reference per response (k1, the reward's, and k3), the
    policy's entropy per token and the response length."""
    k1 = rl.kl_per_token(old_logp, ref_logp, "k1")
    k3 = rl.kl_per_token(old_logp, ref_logp, "k3")
    return {
        "kl": rl.masked_sum(k1, mask, axis=-1).mean(),
        "kl_k3": rl.masked_sum(k3, mask, axis=-1).mean(),
        "entropy": rl.masked_mean(rl.entropy_from_logits(logits, temperature), mask),
        "response_length": mask.sum(-1).mean(),
    }


def rm_scores(reward_model: Transformer, reward_params, flat, packed: Packed, finished_B, hp):
    """(the RM's score, the score less `hp.missing_eos_penalty` for a response
    without EOS) [B], read at each rollout's last packed token: its EOS, or
    for an unfinished response the EOS packed after it (as the RM was
    trained: the text, then EOS)."""
    score = packed_rollouts.outputs(reward_model, reward_params, flat, packed, at="last")
    return score, jnp.where(finished_B, score, score - hp.missing_eos_penalty)


def pack(prompt_mask_BxP, out, idx=None, multiple: int = 1):
    """The iteration's packed rows (packed_rollouts), planned on the host from
    the lengths of the prompts and of the sampled responses `out` (so this
    waits for the sampler): the whole batch, for scoring, and with `idx`
    ([E*M, B/M], `minibatch_indices`) each minibatch of the update; row
    counts a multiple of `multiple` (the batch devices). Returns (the
    batch's Packed, the minibatches' or None)."""
    p, n = prompt_mask_BxP.shape[1], out.tokens.shape[1]
    lengths = packed_rollouts.host_lengths(prompt_mask_BxP, out.mask, out.finished)
    whole = packed_rollouts.pack_batch(lengths, p=p, n=n, multiple=multiple)
    if idx is None:
        return whole, None
    # The update reads no RM score, so an unfinished response needs no EOS
    # packed after it: the minibatches are planned as if every response ended.
    ended = lengths.copy()
    ended[2] = 1
    return whole, packed_rollouts.pack(idx, ended, p=p, n=n, multiple=multiple)


def packed_shapes(shapes: set, packed: Packed, packed_mbs: Packed) -> int:
    """Adds an iteration's packed shapes to `shapes` (scoring's rows, the
    update's); returns how many there were so far: each a compile of the
    scoring or of the update function (at most four each, packed_rollouts)."""
    shapes.update({("score", packed.source.shape), ("update", packed_mbs.source.shape)})
    return len(shapes)


def say_packed_shapes(label: str, shapes: set):
    """One console line: the packed shapes (so the compiles) of the run."""
    if not shapes:
        return
    rows = {kind: [str(r) for r in sorted(s[-2] for k, s in shapes if k == kind)]
            for kind in ("score", "update")}
    console.say(f"[{label}] packed rows compiled: scoring {len(rows['score'])} "
                f"({', '.join(rows['score'])} rows), update {len(rows['update'])} "
                f"({', '.join(rows['update'])} rows a minibatch)")


def minibatch_indices(rng, batch: int, epochs: int, minibatches: int):
    """[E*M, B/M] rollout rows of each minibatch update: a fresh permutation
    of the batch each epoch (fold_in(rng, epoch)), cut into M minibatches."""
    perms = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), batch)
                       for e in range(int(epochs))])
    return perms.reshape(int(epochs) * int(minibatches), batch // int(minibatches))


def hyperparams(config, eos_id: int) -> ml_collections.FrozenConfigDict:
    """What the jitted functions close over: the `algo` block, the sampling
    temperature (the log-probs are those of the distribution sampled) and EOS."""
    return ml_collections.FrozenConfigDict(dict(
        config.algo.to_dict(), temperature=float(config.sampling.temperature), eos_id=eos_id))


def check_sampling(s, method: str):
    """The rollouts' sampling block: full softmax at a positive temperature."""
    if int(s.top_k) != 0 or float(s.top_p) < 1.0 or s.greedy:
        raise ConfigError(
            f"sampling.top_k={s.top_k}, sampling.top_p={s.top_p}, sampling.greedy={s.greedy}: "
            f"{method}'s ratio and KL are computed on the full softmax, so filtered (or greedy) "
            f"sampling would optimise another policy than the one sampled; use "
            f"sampling.top_k=0, sampling.top_p=1.0, sampling.greedy=False (temperature is "
            f"supported)")
    if float(s.temperature) <= 0:
        raise ConfigError(f"sampling.temperature={s.temperature}: must be > 0")


def host_metrics_fn(batch_size: int, gold=None, score_is_gold: bool = False):
    """The loop's `host_metrics`: seconds per iteration, sampled tokens per
    second, and the gold score of the rollouts (`gold(it, tokens)`, or the
    score itself when the reward is the gold labeler: `score_is_gold`)."""
    def host_metrics(step: int, metrics: dict, seconds) -> dict:
        tokens = metrics.pop("response_tokens", None)
        row = {}
        if seconds is not None:
            row.update(iteration_s=seconds,
                       tokens_per_s=float(metrics["response_length"]) * batch_size / seconds)
        if gold is not None and tokens is not None:
            row["gold_score"] = gold(step - 1, tokens)
        if score_is_gold:
            row["gold_score"] = float(metrics["score"])
        return row
    return host_metrics
