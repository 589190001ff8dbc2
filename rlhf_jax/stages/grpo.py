"""Stage `grpo`: group-relative policy optimisation (GRPO; RLOO as an option),
against the reward model or against a Python reward function, no value model.

One iteration:
  1. rollout   G responses to each of `train.batch_size` prompts, from ONE
               sampler call over the prompts repeated G times;
  2. reward    each response's score: the RM's at its last token (as PPO reads
               it, `missing_eos_penalty` off an unfinished one), or
               `reward_fn(prompt, response, finished)` on the host (`world`:
               the instruction world's gold labeler, a verifiable reward:
               RLVR);
  3. score     one teacher-forced pass of the policy and the frozen reference
               gives the old and reference log-probs; the advantage of a
               response is its reward against its group's (rl.group_advantages:
               GRPO's (r - mean) / std, or RLOO's leave-one-out baseline), the
               same for all its tokens;
  4. update    E epochs x M minibatches of the clipped surrogate, as one
               jitted `lax.scan`; scoring and the update run on packed rows,
               several rollouts a row, as PPO's (packed_rollouts); the KL
               to the reference either in the loss
               (`algo.kl_in="loss"`: kl_coef x the k3 estimate per token,
               DeepSeekMath) or in the reward before the group normalisation
               (`"reward"`: score - kl_coef x the k1 sum, as PPO's reward).

Without a value model nothing is learned from a group whose G rewards are
equal; `grpo/zero_std_groups` logs the fraction of such groups (with a
binary verifiable reward, the prompts the policy always or never solves).

The iterations run in the host loop every stage shares (rlhf_jax/loop.py);
with the RM, nothing waits for the device; a Python reward reads the
responses on the host, so that iteration waits for its own sampling.

Config: `algo` (group_size, advantage, clip, kl_coef, kl_in, epochs,
minibatches), `sampling` (full softmax, as PPO), `train` (`train.steps`
iterations of `train.batch_size` prompts, so batch_size x group_size
rollouts), `reward_from` or `reward_fn`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import (jit_cache, loop, packed_rollouts, rewards, rl, sampling, sharding,
                      train_state)
from rlhf_jax.data import preprocess
from rlhf_jax.data import setup as data_setup
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import resolve
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.packed_rollouts import Packed
from rlhf_jax.stages import policy_gradient as pg
from rlhf_jax.stages import roles


@flax.struct.dataclass
class GRPOState:
    step: jax.Array                 # iterations done
    policy: train_state.TrainState

    def split(self):
        """Checkpoint items: the policy's params (what later stages read), the rest."""
        return self.policy.params, self.replace(policy=self.policy.replace(params=None))


def _join(params, train: GRPOState) -> GRPOState:
    return train.replace(policy=train.policy.replace(params=params))


class Rollout(NamedTuple):
    """A scored batch of B = prompts x G responses. P = prompt length, N = response length."""
    tokens: jax.Array               # [B, P+N] prompt (left-padded) + response (pad after EOS)
    mask: jax.Array                 # [B, N] f32, 1 on response tokens up to and including EOS
    old_logp: jax.Array             # [B, N] policy log-probs, recomputed by the training forward
    ref_logp: jax.Array             # [B, N] the frozen reference's
    advantages: jax.Array           # [B] one per response


def score_rollout(policy_params, ref_params, prompt_BxP, response_BxN, mask_BxN, scores_B,
                  packed: Packed, *, model: Transformer, hp) -> tuple[Rollout, dict]:
    """Steps 3 of the iteration: log-probs and group advantages (module doc).
    `scores_B`: each response's reward, groups of `hp.group_size` consecutive
    rows; `packed`: the rollouts in packed rows (as PPO's, pg.pack)."""
    tokens = jnp.concatenate([prompt_BxP, response_BxN], axis=1)
    mask = mask_BxN.astype(jnp.float32)
    old_logp, ref_logp, logits = pg.rollout_logps(
        model, policy_params, ref_params, packed_rollouts.flat_tokens(tokens, hp.eos_id), packed,
        response_BxN, hp.temperature)
    rewards_B = scores_B
    if hp.kl_in == "reward":
        rewards_B = rl.kl_penalised_scores(scores_B, old_logp, ref_logp, mask, hp.kl_coef)
    g = int(hp.group_size)
    rewards_BxG = rewards_B.reshape(-1, g)
    advantages = rl.group_advantages(rewards_BxG, hp.advantage, hp.scale_by_std).reshape(-1)
    group_std = jnp.std(scores_B.reshape(-1, g), axis=-1)
    stats = {
        "score": scores_B.mean(),
        "reward_total": rewards_B.mean(),
        **pg.rollout_stats(old_logp, ref_logp, logits, mask, hp.temperature),
        "group_score_std": group_std.mean(),
        "zero_std_groups": (group_std == 0).astype(jnp.float32).mean(),
    }
    return Rollout(tokens, mask, old_logp, ref_logp, advantages), stats


def grpo_loss(policy_params, mb: Rollout, flat, packed: Packed, *, model: Transformer, hp):
    logits = packed_rollouts.outputs(model, policy_params, flat, packed)
    response = mb.tokens[:, mb.tokens.shape[1] - mb.mask.shape[1]:]
    logp = rl.logprobs_from_logits(logits, response, hp.temperature)
    kl_coef = hp.kl_coef if hp.kl_in == "loss" else 0.0
    return rl.grpo_policy_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages, mb.mask, hp.clip,
                               kl_coef)


def grpo_update(state: GRPOState, rollout: Rollout, idx, packed: Packed, *, model: Transformer,
                optimizer, hp) -> tuple[GRPOState, dict]:
    """E epochs x M minibatches as one lax.scan, a fresh permutation of the
    rollouts each epoch (their advantages are fixed: groups may be split).
    idx: [E*M, B/M] each minibatch's rollouts (pg.minibatch_indices);
    packed: their packed rows (pg.pack)."""
    flat = packed_rollouts.flat_tokens(rollout.tokens, hp.eos_id)

    def minibatch_step(policy, xs):
        idx, packed_mb = xs
        mb = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), rollout)
        (loss, stats), grads = jax.value_and_grad(
            functools.partial(grpo_loss, model=model, hp=hp), has_aux=True)(
                policy.params, mb, flat, packed_mb)
        policy, upd = train_state.apply_update(policy, grads, loss, optimizer)
        return policy, dict(stats, loss=loss, **upd)

    policy, stats = jax.lax.scan(minibatch_step, state.policy, (idx, packed))
    stats = jax.tree_util.tree_map(jnp.mean, stats)
    stats["nonfinite"] = policy.nonfinite
    return state.replace(step=state.step + 1, policy=policy), stats


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

def check_config(config):
    if not config.init_from:
        raise ConfigError("grpo needs --config.init_from=<SFT workdir> (the policy and the "
                          "frozen reference)")
    rewards.check_one_reward("grpo", config.reward_from, config.reward_fn)
    hp = config.algo
    # group_size, advantage, kl_in: their domains (rlhf_jax/config_domains.py).
    rollouts = int(config.train.batch_size) * int(hp.group_size)
    if rollouts % int(hp.minibatches):
        raise ConfigError(f"train.batch_size x algo.group_size = {rollouts} rollouts must be "
                          f"divisible by algo.minibatches={hp.minibatches}")
    pg.check_sampling(config.sampling, "GRPO")


def group_rollouts(params, prompt_BxP, mask_BxP, rng, *, model, group_size, max_new_tokens,
                   eos_id, pad_id, temperature):
    """`group_size` sampled responses to each prompt, the groups' rows adjacent."""
    return sampling.sample(model, params, jnp.repeat(prompt_BxP, group_size, axis=0),
                           jnp.repeat(mask_BxP, group_size, axis=0), rng,
                           max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                           temperature=temperature)


def rm_group_scores(reward_params, prompt_BxP, out, packed, *, reward_model, hp):
    """The RM's penalised score of each rollout, read on the packed rows."""
    flat = packed_rollouts.flat_tokens(jnp.concatenate([prompt_BxP, out.tokens], axis=1),
                                       hp.eos_id)
    return pg.rm_scores(reward_model, reward_params, flat, packed, out.finished, hp)[1]


def run(config, workdir: str, judge=None):
    """`judge`: the gold labeler (rlhf_jax.world.gold_score): the reward of
    `reward_fn=world`, and the rollouts' gold score (`grpo/gold_score`) when
    the prompts are its world's."""
    check_config(config)
    runtime = sharding.Runtime(config)
    t = config.train
    b = int(t.batch_size)
    g = int(config.algo.group_size)
    p, n = int(config.data.max_prompt_len), int(config.sampling.max_new_tokens)

    with runtime.activations():
        # Each checkpoint read once: the policy and its reference from SFT, the RM.
        roles_ = roles.load(config, runtime, context=p + n, value=False)
    tok, policy_cfg = roles_.tok, roles_.policy_cfg
    hp = pg.hyperparams(config, tok.eos_id)
    model = Transformer(policy_cfg)
    reward = None
    if config.reward_from:
        reward_model = Transformer(roles_.reward_cfg)
    else:
        reward = rewards.python_reward(config.reward_fn, judge)

    prompt_check = preprocess.length_check(tok, "prompts", max_prompt_len=p)
    prompts = data_setup.open_source(config, config.data.path, "prompts", prompt_check)
    prompt_loader = data_setup.loader(
        config, runtime, prompts, b,
        functools.partial(preprocess.prompt_example, tok, max_prompt_len=p))
    if reward is not None:
        reward = rewards.host_reward_fn(reward, runtime, prompt_loader, tok, repeats=g)
    n_updates = int(hp.epochs) * int(hp.minibatches)
    optimizer = train_state.make_optimizer(train_state.with_steps(t, int(t.steps) * n_updates))

    with runtime.activations():
        policy, _ = train_state.create_train_state(
            runtime, model, optimizer, config.seed,
            restored=(roles_.policy_params, roles_.policy_shardings))
        ref_params = roles_.ref_params
        state = GRPOState(step=jnp.int32(0), policy=policy)
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)

        rollout_fn = jit_cache.jit_partial(group_rollouts, dict(
            model=model, group_size=g, max_new_tokens=n, eos_id=tok.eos_id, pad_id=tok.pad_id,
            temperature=hp.temperature))
        if reward is None:
            rm_score_fn = jit_cache.jit_partial(rm_group_scores,
                                                dict(reward_model=reward_model, hp=hp))

        score_fn = jit_cache.jit_partial(score_rollout, dict(model=model, hp=hp))
        update_fn = jit_cache.jit_partial(
            grpo_update, dict(model=model, optimizer=optimizer, hp=hp),
            in_shardings=(state_sh, None, None, None), out_shardings=(state_sh, None),
            donate_argnums=0)
        base_rng = jax.random.PRNGKey(config.seed + 23)
        gold = rewards.gold_scorer(config, prompt_loader, tok, judge, repeats=g)
        # With reward_fn=world the reward is the gold score itself.
        score_is_gold = gold is not None and config.reward_fn == "world"
        keep_tokens = gold is not None and not score_is_gold

        shapes = set()

        def step_fn(state: GRPOState, it: int):
            rng = jax.random.fold_in(base_rng, it)
            batch = runtime.global_batch(prompt_loader.batch(it))
            out = rollout_fn(state.policy.params, batch["tokens"], batch["mask"],
                             jax.random.fold_in(rng, 0))
            prompts = {k: jnp.repeat(batch[k], g, axis=0) for k in ("tokens", "mask")}
            # The minibatches' rollouts, then every pass packed (waits for the sampler).
            idx = np.asarray(pg.minibatch_indices(jax.random.fold_in(rng, 1), b * g,
                                                  hp.epochs, hp.minibatches))
            packed, packed_mbs = pg.pack(prompts["mask"], out, idx,
                                         sharding.batch_devices(runtime.mesh))
            if reward is None:
                scores = rm_score_fn(roles_.reward_params, prompts["tokens"], out, packed)
            else:
                scores = reward(it, out.tokens)
            rollout, stats = score_fn(state.policy.params, ref_params, prompts["tokens"],
                                      out.tokens, out.mask, scores, packed)
            stats["eos_rate"] = out.finished.astype(jnp.float32).mean()
            state, upd = update_fn(state, rollout, idx, packed_mbs)
            metrics = {**stats, **upd,
                       "packed_shapes": pg.packed_shapes(shapes, packed, packed_mbs)}
            if keep_tokens:
                metrics["response_tokens"] = out.tokens
            return state, metrics

        meta = dict(resolve.model_meta(policy_cfg,
                                       resolve.tokenizer_spec(config, roles_.policy_meta)),
                    reward_from=config.reward_from, reward_fn=config.reward_fn)
        state = loop.run(loop.Loop(
            stage="grpo", train=t, workdir=workdir, state=state, state_shardings=state_sh,
            step_fn=step_fn, meta=meta,
            host_metrics=pg.host_metrics_fn(b * g, gold, score_is_gold),
            progress_keys=("score", "kl", "gold_score"), step_name="iteration",
            split=GRPOState.split, join=_join))
        pg.say_packed_shapes("grpo", shapes)
        return state
