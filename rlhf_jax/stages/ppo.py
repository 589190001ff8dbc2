"""Stage `ppo`: PPO against the reward model, with a per-token KL penalty to
the SFT policy and the pretraining-loss mix (PPO-ptx), InstructGPT step 3.

One iteration:
  1. rollout   sample responses to a batch of prompts (the sampler stops once
               every response has ended);
  2. score     one teacher-forced pass of policy, reference, value and reward
               models over prompt + response, several rollouts to a row
               (packed_rollouts: each is computed as alone, on the tokens
               the batch really has, not on P + N per rollout; the plan is
               made on the host from the sampled lengths, so the iteration
               waits for its sampling): old log-probs are recomputed by
               the training forward pass (the sampler's are not trusted), the
               RM score is read at the last real token, a response without
               EOS is penalised, the per-token reward is -beta * (log pi -
               log pi_ref) plus the score at the last token, then GAE
               (gamma 1, lambda 0.95) and advantage whitening, all masked
               after EOS;
  3. update    E epochs x M minibatches of the clipped policy loss, the
               clipped value loss and ptx_coef x the LM loss on pretraining
               batches, as one jitted nested `lax.scan`, each minibatch's
               rollouts packed as in scoring; the EMA of policy
               weights (if enabled) after every optimizer update;
  4. the adaptive KL coefficient, if enabled.

The pretraining mix: both the policy loss and the LM loss are per-token
means, so `ptx_coef` weighs one token's LM loss against one token's clipped
policy loss. It is not the paper's gamma_ptx = 27.8, which weighs a sequence
log-likelihood against an episode's return: at 27.8 here the LM gradient was
about 25 times the policy's and the reward barely moved the policy
(BENCHMARKS.md). The two gradients' norms are logged apart
(`ppo/pg_grad_norm`, `ppo/ptx_grad_norm`, the latter times ptx_coef).

A response that ends without EOS (cut at max_new_tokens) is scored by the RM
the way the RM saw such responses in training: the collect stage writes them
as text, and the RM reads its score at an EOS appended to the text; the
packed rows here have that EOS after the response, where the RM reads it.
`missing_eos_penalty` (default 1, as TRL's; 0 turns it off) is then
subtracted: the RM has seen few cut responses, so the penalty says what it
may not have learnt.

Dropout is off everywhere (the models are deterministic). The iterations
run in the host loop every stage shares (rlhf_jax/loop.py): one iteration is
a step, its metrics are read one iteration late, so the host prepares the
next batch while the device still works on this one's scoring and update.

Config: PPO's hyperparameters in `algo`, the rollouts' sampling in
`sampling` (as in every sampling stage), `train` for the optimizer and the
loop (`train.steps` iterations of `train.batch_size` prompts).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import (jit_cache, loop, losses, packed_rollouts, rewards, rl, sampling, sharding,
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
class PPOState:
    step: jax.Array                 # PPO iterations done
    policy: train_state.TrainState
    value: train_state.TrainState
    kl_coef: jax.Array              # f32 scalar; changes only with the adaptive controller
    ema_params: Any                 # EMA of policy params (not debiased), or None when disabled
    ema_updates: jax.Array          # optimizer updates averaged into ema_params


class Rollout(NamedTuple):
    """A scored batch. P = prompt length, N = response length."""
    tokens: jax.Array               # [B, P+N] prompt (left-padded) + response (pad after EOS)
    mask: jax.Array                 # [B, N] f32, 1 on response tokens up to and including EOS
    old_logp: jax.Array             # [B, N] policy log-probs, recomputed by the training forward
    old_values: jax.Array           # [B, N] value of the state before each response token
    advantages: jax.Array           # [B, N] whitened
    returns: jax.Array              # [B, N]


@flax.struct.dataclass
class Models:
    """The networks (static: hashed into the jitted functions); the reference
    is the policy's network with the SFT params. `reward` is None with a
    Python reward (`reward_fn`)."""
    policy: Transformer = flax.struct.field(pytree_node=False)
    value: Transformer = flax.struct.field(pytree_node=False)
    reward: Optional[Transformer] = flax.struct.field(pytree_node=False, default=None)


def score_rollout(policy_params, ref_params, value_params, reward_params, prompt_BxP,
                  response_BxN, mask_BxN, finished_B, kl_coef, packed: Packed, scores_B=None,
                  *, models: Models, hp) -> tuple[Rollout, dict]:
    """Step 2 of the iteration: log-probs, values, rewards, GAE (see module doc).

    `packed`: the batch's rollouts in packed rows (packed_rollouts.pack_batch).
    `scores_B`: each response's score from a Python reward (`reward_fn`),
    which judges an unfinished response itself; None: the RM's score
    (`reward_params`), `missing_eos_penalty` off an unfinished one."""
    tokens = jnp.concatenate([prompt_BxP, response_BxN], axis=1)
    flat = packed_rollouts.flat_tokens(tokens, hp.eos_id)
    mask = mask_BxN.astype(jnp.float32)
    old_logp, ref_logp, logits = pg.rollout_logps(models.policy, policy_params, ref_params,
                                                  flat, packed, response_BxN, hp.temperature)
    values = packed_rollouts.outputs(models.value, value_params, flat, packed)
    if scores_B is None:
        rm_score, score = pg.rm_scores(models.reward, reward_params, flat, packed, finished_B,
                                       hp)
    else:
        rm_score = score = scores_B

    rewards, kl = rl.per_token_rewards(score, old_logp, ref_logp, mask, kl_coef)
    values = values * mask
    advantages, returns = rl.gae(rewards, values, mask, hp.gamma, hp.lam)
    if hp.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    stats = {
        "score": rm_score.mean(),
        "score_penalised": score.mean(),
        **pg.rollout_stats(old_logp, ref_logp, logits, mask, hp.temperature),
        "reward_total": (rewards * mask).sum(-1).mean(),
        "eos_rate": finished_B.astype(jnp.float32).mean(),
        "value_mean": rl.masked_mean(values, mask),
        "return_mean": rl.masked_mean(returns, mask),
    }
    rollout = Rollout(tokens, mask, old_logp, values, advantages, returns)
    return rollout, stats


def ppo_losses(policy_params, value_params, mb: Rollout, flat, packed: Packed, *,
               models: Models, hp):
    """Clipped policy loss + vf_coef x clipped value loss (per-token means)
    of minibatch `mb`, whose rollouts `packed` places in packed rows of the
    batch's tokens `flat`."""
    response = mb.tokens[:, mb.tokens.shape[1] - mb.mask.shape[1]:]
    logits = packed_rollouts.outputs(models.policy, policy_params, flat, packed)
    logp = rl.logprobs_from_logits(logits, response, hp.temperature)
    pg_loss, pg_stats = rl.ppo_policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, hp.clip)
    values = packed_rollouts.outputs(models.value, value_params, flat, packed)
    vf_loss, vf_stats = rl.value_loss(values, mb.old_values, mb.returns, mb.mask, hp.vf_clip)
    total = pg_loss + hp.vf_coef * vf_loss
    return total, {"pg_loss": pg_loss, "vf_loss": vf_loss, **pg_stats, **vf_stats}


def ptx_loss(policy_params, ptx, *, models: Models):
    """The pretraining LM loss (per-token mean) of one batch of documents."""
    logits = models.policy.apply({"params": policy_params}, ptx["tokens"],
                                 attn_mask=ptx["attn_mask"])
    loss, _ = losses.lm_loss(logits[:, :-1], ptx["tokens"][:, 1:], ptx["loss_mask"][:, :-1])
    return loss


def ppo_update(state: PPOState, rollout: Rollout, idx, packed: Packed, ptx_batches,
               observed_kl, *, models: Models, policy_opt, value_opt,
               hp) -> tuple[PPOState, dict]:
    """E epochs x M minibatches as a nested lax.scan (the EMA follows every
    optimizer update); then the KL controller.

    idx: [E*M, B/M] the rollouts of each minibatch (pg.minibatch_indices);
    packed: their packed rows ([E*M, ...], pg.pack).
    ptx_batches: None, or a dict of arrays [E*M, b_ptx, L] (one pretraining
    batch a minibatch). observed_kl: the rollout's KL(pi || ref) per response,
    which drives the adaptive KL coefficient.
    """
    b = rollout.mask.shape[0]
    flat = packed_rollouts.flat_tokens(rollout.tokens, hp.eos_id)

    def minibatch_step(carry, xs):
        policy, value, ema = carry
        idx, packed_mb, ptx = xs
        mb = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), rollout)

        def loss_fn(pp, vp):
            return ppo_losses(pp, vp, mb, flat, packed_mb, models=models, hp=hp)

        (loss, stats), (g_pol, g_val) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            policy.params, value.params)
        ppo_loss = loss         # the value model's update depends on this loss only
        stats["pg_grad_norm"] = optax.tree.norm(g_pol)
        if ptx is not None:
            # The two terms' gradients apart, so that their sizes can be
            # compared; the same work as the gradient of their sum.
            lm, g_ptx = jax.value_and_grad(functools.partial(ptx_loss, models=models))(
                policy.params, ptx)
            loss, g_pol = rl.ptx_mix(loss, g_pol, lm, g_ptx, hp.ptx_coef)
            stats.update(ptx_loss=lm, ptx_grad_norm=hp.ptx_coef * optax.tree.norm(g_ptx))
        policy, pu = train_state.apply_update(policy, g_pol, loss, policy_opt)
        value, vu = train_state.apply_update(value, g_val, ppo_loss, value_opt)
        if ema is not None:     # follows the policy's updates, not its skipped ones
            ema = jax.tree_util.tree_map(lambda old, new: jnp.where(pu["skipped"] > 0, old, new),
                                         ema, rl.ema_update(ema, policy.params, hp.ema_decay))
        stats.update(loss=loss, grad_norm=pu["grad_norm"], value_grad_norm=vu["grad_norm"],
                     skipped=pu["skipped"])
        return (policy, value, ema), stats

    (policy, value, ema), stats = jax.lax.scan(
        minibatch_step, (state.policy, state.value, state.ema_params), (idx, packed, ptx_batches))
    applied = jnp.sum(1 - stats["skipped"]).astype(jnp.int32)     # policy updates made
    stats = jax.tree_util.tree_map(jnp.mean, stats)

    # The coefficient that shaped this iteration's rewards (score_rollout ran
    # with it) is logged; the controller's next one goes into the state.
    stats["kl_coef"] = state.kl_coef
    kl_coef = state.kl_coef
    if hp.adaptive_kl:
        kl_coef = rl.adaptive_kl_coef(kl_coef, observed_kl, hp.kl_target, hp.kl_horizon,
                                      b).astype(jnp.float32)
    ema_updates = state.ema_updates + (applied if ema is not None else 0)
    state = state.replace(step=state.step + 1, policy=policy, value=value, kl_coef=kl_coef,
                          ema_params=ema, ema_updates=ema_updates)
    stats["nonfinite"] = jnp.maximum(policy.nonfinite, value.nonfinite)
    return state, stats


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

def check_config(config):
    missing = [k for k in ("init_from", "reward_from") if not config.get(k)
               and not (k == "reward_from" and config.reward_fn)]
    if missing:
        raise ConfigError(
            "ppo needs " + " and ".join(
                {"init_from": "--config.init_from=<SFT workdir> (the policy and the frozen reference)",
                 "reward_from": "--config.reward_from=<RM workdir> (the reward model; the value "
                                "model starts from it) or --config.reward_fn=world"}[k]
                for k in missing)
            + "; configs/instructgpt.py builds both (SFT, collect, RM) before PPO")
    rewards.check_one_reward("ppo", config.reward_from, config.reward_fn)
    hp = config.algo
    b = int(config.train.batch_size)
    if b % int(hp.minibatches):
        raise ConfigError(f"train.batch_size={b} must be divisible by algo.minibatches={hp.minibatches}")
    pg.check_sampling(config.sampling, "PPO")
    if hp.ptx_coef > 0 and not config.data.ptx_path:
        raise ConfigError("algo.ptx_coef > 0 needs data.ptx_path (pretraining text)")


def split_state(state: PPOState):
    """Checkpoint items: `params` the policy a later stage uses, `train`
    everything else a resumed run needs. With the EMA enabled, `train` is the
    whole state (the raw policy and the raw EMA, so a resumed run continues
    exactly) and `params` is the EMA's place (saved bias-corrected, see
    `saved_params`). Applies to a tree of shardings too."""
    if state.ema_params is not None:
        return state.ema_params, state
    return state.policy.params, state.replace(policy=state.policy.replace(params=None))


def join_state(params, train: PPOState) -> PPOState:
    if train.policy.params is None:
        return train.replace(policy=train.policy.replace(params=params))
    return train          # the EMA's params item is derived from `train`


def saved_params(state: PPOState, ema_decay: float):
    """The policy a checkpoint holds for later stages: the bias-corrected EMA
    of the policy weights when enabled (InstructGPT's decay 0.992), else the
    policy's own."""
    if state.ema_params is not None:
        return rl.ema_debiased(state.ema_params, ema_decay, state.ema_updates)
    return state.policy.params


def jit_steps(models: Models, hp, policy_opt, value_opt, state_sh):
    """(score_fn, update_fn): `score_rollout` and the donated `ppo_update`,
    jitted as the stage runs them (and as `python -m rlhf_jax.aot`
    compiles them)."""
    score_fn = jit_cache.jit_partial(score_rollout, dict(models=models, hp=hp))
    update_fn = jit_cache.jit_partial(
        ppo_update, dict(models=models, policy_opt=policy_opt, value_opt=value_opt, hp=hp),
        in_shardings=(state_sh, None, None, None, None, None), out_shardings=(state_sh, None),
        donate_argnums=0)
    return score_fn, update_fn


def iteration_fn(config, runtime, models: Models, hp, tok, ref_params, reward_params, score_fn,
                 update_fn, prompt_loader, ptx_loader, keep_tokens: bool = False,
                 host_reward=None, shapes: Optional[set] = None):
    """`step_fn(state, it)` of the loop: one PPO iteration (module doc),
    dispatched without waiting for the device. `keep_tokens` adds the
    sampled tokens to the metrics (for the gold score, read on the host).
    `host_reward(it, tokens)`: the rollouts' scores from a Python reward (a
    global array [B]); the iteration then waits for its own sampling.
    `shapes` collects the packed rows' shapes (pg.packed_shapes)."""
    base_rng = jax.random.PRNGKey(config.seed + 17)
    n = int(config.sampling.max_new_tokens)
    batch_size = int(config.train.batch_size)
    shapes = set() if shapes is None else shapes

    def step_fn(state: PPOState, it: int):
        rng = jax.random.fold_in(base_rng, it)
        batch = runtime.global_batch(prompt_loader.batch(it))
        out = sampling.sample(models.policy, state.policy.params, batch["tokens"], batch["mask"],
                              jax.random.fold_in(rng, 0), max_new_tokens=n, eos_id=tok.eos_id,
                              pad_id=tok.pad_id, temperature=hp.temperature)
        scores = None if host_reward is None else host_reward(it, out.tokens)
        # The minibatches' rollouts, then every pass packed (waits for the sampler).
        idx = np.asarray(pg.minibatch_indices(jax.random.fold_in(rng, 1), batch_size, hp.epochs,
                                              hp.minibatches))
        packed, packed_mbs = pg.pack(batch["mask"], out, idx,
                                     sharding.batch_devices(runtime.mesh))
        rollout, stats = score_fn(state.policy.params, ref_params, state.value.params,
                                  reward_params, batch["tokens"], out.tokens, out.mask,
                                  out.finished, state.kl_coef, packed, scores)
        ptx = None
        if ptx_loader is not None:
            ptx = runtime.global_batch(ptx_loader.batch(it))
            ptx = jax.tree_util.tree_map(
                lambda x: x.reshape((hp.epochs * hp.minibatches, -1) + x.shape[1:]), ptx)
        state, upd = update_fn(state, rollout, idx, packed_mbs, ptx, stats["kl"])
        metrics = {**stats, **upd,
                   "packed_shapes": pg.packed_shapes(shapes, packed, packed_mbs)}
        if keep_tokens:
            metrics["response_tokens"] = out.tokens
        return state, metrics
    return step_fn


def make_loop(config, workdir: str, state: PPOState, state_sh, step_fn, meta: dict, hp,
              host_metrics=None) -> loop.Loop:
    return loop.Loop(
        stage="ppo", train=config.train, workdir=workdir, state=state, state_shardings=state_sh,
        step_fn=step_fn, meta=meta, host_metrics=host_metrics,
        progress_keys=("score", "kl", "gold_score"),
        # The bar says which of the main job's two PPO runs this is.
        label="ppo_ptx" if hp.ptx_coef > 0 else "ppo", step_name="iteration",
        split=split_state, join=join_state,
        saved_params=functools.partial(saved_params, ema_decay=hp.ema_decay))


def run(config, workdir: str, judge=None):
    """`judge`: the gold labeler (rlhf_jax.world.gold_score), to log the
    rollouts' gold score (`ppo/gold_score`) when the prompts are its world's."""
    check_config(config)
    runtime = sharding.Runtime(config)
    t = config.train
    iterations = int(t.steps)
    b = int(t.batch_size)
    p, n = int(config.data.max_prompt_len), int(config.sampling.max_new_tokens)

    with runtime.activations():
        # Each checkpoint read once: the policy and its reference from SFT;
        # the value model from the RM (the paper's choice), or with a Python
        # reward from SFT's backbone with a fresh scalar head; the RM.
        roles_ = roles.load(config, runtime, context=p + n, value_seed=config.seed + 1)
    tok, policy_cfg, value_cfg = roles_.tok, roles_.policy_cfg, roles_.value_cfg
    hp = pg.hyperparams(config, tok.eos_id)
    models = Models(policy=Transformer(policy_cfg), value=Transformer(value_cfg),
                    reward=Transformer(roles_.reward_cfg) if config.reward_from else None)

    prompt_check = preprocess.length_check(tok, "prompts", max_prompt_len=p)
    prompts = data_setup.open_source(config, config.data.path, "prompts", prompt_check)
    prompt_loader = data_setup.loader(
        config, runtime, prompts, b,
        functools.partial(preprocess.prompt_example, tok, max_prompt_len=p))
    ptx_loader = None
    n_updates = hp.epochs * hp.minibatches
    if hp.ptx_coef > 0:
        ptx = data_setup.open_source(config, config.data.ptx_path, "text")
        ptx_loader = data_setup.loader(
            config, runtime, ptx, int(config.data.ptx_batch_size) * n_updates,
            functools.partial(preprocess.text_example, tok, max_len=int(config.data.max_len)),
            what="data.ptx_batch_size x algo.epochs x algo.minibatches")

    total_updates = iterations * n_updates
    # The schedules count optimizer updates: E x M per iteration.
    policy_opt = train_state.make_optimizer(train_state.with_steps(t, total_updates))
    value_opt = train_state.make_optimizer(
        train_state.with_steps(t, total_updates, lr=float(config.algo.value_lr)))

    with runtime.activations():
        policy, _ = train_state.create_train_state(
            runtime, models.policy, policy_opt, config.seed,
            restored=(roles_.policy_params, roles_.policy_shardings))
        value, _ = train_state.create_train_state(
            runtime, models.value, value_opt, config.seed + 1,
            restored=(roles_.value_params, roles_.value_shardings))
        ref_params, reward_params, host_reward = roles_.ref_params, roles_.reward_params, None
        if not config.reward_from:
            host_reward = rewards.host_reward_fn(rewards.python_reward(config.reward_fn, judge),
                                                  runtime, prompt_loader, tok)
        # The EMA starts from zeros and is read bias-corrected (rl.ema_debiased).
        ema = (jax.tree_util.tree_map(lambda x: x * 0, policy.params) if hp.ema_decay > 0
               else None)
        state = PPOState(step=jnp.int32(0), policy=policy, value=value,
                         kl_coef=jnp.float32(config.algo.kl_coef), ema_params=ema,
                         ema_updates=jnp.int32(0))
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)

        score_fn, update_fn = jit_steps(models, hp, policy_opt, value_opt, state_sh)
        meta = dict(resolve.model_meta(policy_cfg,
                                       resolve.tokenizer_spec(config, roles_.policy_meta)),
                    reward_from=config.reward_from, reward_fn=config.reward_fn)
        gold = rewards.gold_scorer(config, prompt_loader, tok, judge)
        score_is_gold = gold is not None and config.reward_fn == "world"
        shapes = set()
        step_fn = iteration_fn(config, runtime, models, hp, tok, ref_params, reward_params,
                               score_fn, update_fn, prompt_loader, ptx_loader,
                               keep_tokens=gold is not None and not score_is_gold,
                               host_reward=host_reward, shapes=shapes)
        state = loop.run(make_loop(config, workdir, state, state_sh, step_fn, meta, hp,
                                   pg.host_metrics_fn(b, gold, score_is_gold)))
        pg.say_packed_shapes("ppo_ptx" if hp.ptx_coef > 0 else "ppo", shapes)
        return state

