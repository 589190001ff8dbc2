"""Stage `ppo`: PPO against the reward model, with a per-token KL penalty to
the SFT policy and the pretraining-loss mix (PPO-ptx), InstructGPT step 3.

One iteration:
  1. rollout   sample responses to a batch of prompts with the scan sampler;
  2. score     one teacher-forced pass of policy, reference, value and reward
               models over prompt + response: old log-probs are recomputed by
               the training forward pass (the sampler's are not trusted), the
               RM score is read at the last real token, a response without
               EOS is penalised, the per-token reward is -beta * (log pi -
               log pi_ref) plus the score at the last token, then GAE
               (gamma 1, lambda 0.95) and advantage whitening, all masked
               after EOS;
  3. update    E epochs x M minibatches of the clipped policy loss, the
               clipped value loss and ptx_coef x the LM loss on pretraining
               batches, as one jitted nested `lax.scan`; the EMA of policy
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
as text, and the RM reads its score at an EOS appended to the text. Here its
last token is replaced by EOS for the RM's pass (the policy's and value's
passes see the tokens sampled), and `missing_eos_penalty` is subtracted.

Dropout is off everywhere (the models are deterministic).
"""
from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import checkpoint, distributed, losses, rl, sampling, sharding
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.data import preprocess
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.stages import common, data_setup


@flax.struct.dataclass
class PPOState:
    step: jax.Array                 # PPO iterations done
    policy: common.TrainState
    value: common.TrainState
    kl_coef: jax.Array              # f32 scalar; changes only with the adaptive controller
    ema_params: Any                 # EMA of policy params (not debiased), or None when disabled
    ema_updates: jax.Array          # optimizer updates averaged into ema_params


class Rollout(NamedTuple):
    """A scored batch. P = prompt length, N = response length."""
    tokens: jax.Array               # [B, P+N] prompt (left-padded) + response (pad after EOS)
    attn_mask: jax.Array            # [B, P+N]
    mask: jax.Array                 # [B, N] f32, 1 on response tokens up to and including EOS
    old_logp: jax.Array             # [B, N] policy log-probs, recomputed by the training forward
    old_values: jax.Array           # [B, N] value of the state before each response token
    advantages: jax.Array           # [B, N] whitened
    returns: jax.Array              # [B, N]


@flax.struct.dataclass
class Models:
    """The four networks (static: hashed into the jitted functions)."""
    policy: Transformer = flax.struct.field(pytree_node=False)
    value: Transformer = flax.struct.field(pytree_node=False)
    reward: Transformer = flax.struct.field(pytree_node=False)


def _response_outputs(model: Transformer, params, tokens, attn, p: int, n: int):
    """The model's outputs (logits, or scalar scores) at the positions that
    predict (or precede) each response token: [B, n(, V)]."""
    return model.apply({"params": params}, tokens, p - 1, n, attn_mask=attn,
                       method=Transformer.outputs_at)


def reward_scores(model: Transformer, params, tokens_BxS, attn_BxS, last_B, finished_B,
                  eos_id: int):
    """The RM's score of each response at its last token [B]; an unfinished
    response gets EOS in place of its last token, as the RM was trained on
    text followed by EOS (see the module doc)."""
    rows = jnp.arange(tokens_BxS.shape[0])
    at_last = tokens_BxS[rows, last_B]
    tokens_BxS = tokens_BxS.at[rows, last_B].set(jnp.where(finished_B, at_last, eos_id))
    scores_BxS = model.apply({"params": params}, tokens_BxS, attn_mask=attn_BxS)
    return scores_BxS[rows, last_B]


def score_rollout(policy_params, ref_params, value_params, reward_params, prompt_BxP,
                  prompt_mask_BxP, response_BxN, mask_BxN, finished_B, kl_coef, *,
                  models: Models, hp) -> tuple[Rollout, dict]:
    """Step 2 of the iteration: log-probs, values, rewards, GAE (see module doc)."""
    p, n = prompt_BxP.shape[1], response_BxN.shape[1]
    tokens, attn = sampling.concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxN,
                                                   mask_BxN)
    mask = mask_BxN.astype(jnp.float32)

    def logp_of(params):
        logits = _response_outputs(models.policy, params, tokens, attn, p, n)
        return rl.logprobs_from_logits(logits, response_BxN, hp.temperature), logits

    old_logp, logits = logp_of(policy_params)
    ref_logp, _ = logp_of(ref_params)
    values = _response_outputs(models.value, value_params, tokens, attn, p, n)
    last, _ = rl.last_token_index(mask)
    rm_score = reward_scores(models.reward, reward_params, tokens, attn, p + last, finished_B,
                             hp.eos_id)
    score = jnp.where(finished_B, rm_score, rm_score - hp.missing_eos_penalty)

    rewards, kl = rl.per_token_rewards(score, old_logp, ref_logp, mask, kl_coef)
    values = values * mask
    advantages, returns = rl.gae(rewards, values, mask, hp.gamma, hp.lam)
    if hp.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    k3 = rl.kl_per_token(old_logp, ref_logp, "k3")
    length = mask.sum(-1)
    stats = {
        "score": rm_score.mean(),
        "score_penalised": score.mean(),
        "kl": (kl * mask).sum(-1).mean(),                      # k1 per response, as in the reward
        "kl_k3": (k3 * mask).sum(-1).mean(),
        "entropy": rl.masked_mean(rl.entropy_from_logits(logits, hp.temperature), mask),
        "reward_total": (rewards * mask).sum(-1).mean(),
        "response_length": length.mean(),
        "eos_rate": finished_B.astype(jnp.float32).mean(),
        "value_mean": rl.masked_mean(values, mask),
        "return_mean": rl.masked_mean(returns, mask),
    }
    rollout = Rollout(tokens, attn, mask, old_logp, values, advantages, returns)
    return rollout, stats


def ppo_losses(policy_params, value_params, mb: Rollout, *, models: Models, hp, p: int):
    """Clipped policy loss + vf_coef x clipped value loss (per-token means)."""
    n = mb.mask.shape[1]
    response = mb.tokens[:, p:]
    logits = _response_outputs(models.policy, policy_params, mb.tokens, mb.attn_mask, p, n)
    logp = rl.logprobs_from_logits(logits, response, hp.temperature)
    pg_loss, pg_stats = rl.ppo_policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, hp.clip)
    values = _response_outputs(models.value, value_params, mb.tokens, mb.attn_mask, p, n)
    vf_loss, vf_stats = rl.value_loss(values, mb.old_values, mb.returns, mb.mask, hp.vf_clip)
    total = pg_loss + hp.vf_coef * vf_loss
    return total, {"pg_loss": pg_loss, "vf_loss": vf_loss, **pg_stats, **vf_stats}


def ptx_loss(policy_params, ptx, *, models: Models):
    """The pretraining LM loss (per-token mean) of one batch of documents."""
    logits = models.policy.apply({"params": policy_params}, ptx["tokens"],
                                 attn_mask=ptx["attn_mask"])
    loss, _ = losses.lm_loss(logits[:, :-1], ptx["tokens"][:, 1:], ptx["loss_mask"][:, :-1])
    return loss


def ppo_update(state: PPOState, rollout: Rollout, ptx_batches, observed_kl, rng, *,
               models: Models, policy_opt, value_opt, hp, p: int) -> tuple[PPOState, dict]:
    """E epochs x M minibatches as a nested lax.scan (the EMA follows every
    optimizer update); then the KL controller.

    ptx_batches: None, or a dict of arrays [E*M, b_ptx, L] (one pretraining
    batch a minibatch). observed_kl: the rollout's KL(pi || ref) per response,
    which drives the adaptive KL coefficient.
    """
    b = rollout.mask.shape[0]
    m = hp.minibatches
    mb_size = b // m

    def minibatch_step(carry, xs):
        policy, value, ema = carry
        idx, ptx = xs
        mb = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), rollout)

        def loss_fn(pp, vp):
            return ppo_losses(pp, vp, mb, models=models, hp=hp, p=p)

        (loss, stats), (g_pol, g_val) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            policy.params, value.params)
        stats["pg_grad_norm"] = optax.tree.norm(g_pol)
        if ptx is not None:
            # The two terms' gradients apart, so that their sizes can be
            # compared; the same work as the gradient of their sum.
            lm, g_ptx = jax.value_and_grad(functools.partial(ptx_loss, models=models))(
                policy.params, ptx)
            g_pol = jax.tree_util.tree_map(lambda a, b: a + hp.ptx_coef * b, g_pol, g_ptx)
            loss = loss + hp.ptx_coef * lm
            stats.update(ptx_loss=lm, ptx_grad_norm=hp.ptx_coef * optax.tree.norm(g_ptx))
        policy, pu = common.apply_update(policy, g_pol, loss, policy_opt)
        value, vu = common.apply_update(value, g_val, loss, value_opt)
        if ema is not None:
            ema = rl.ema_update(ema, policy.params, hp.ema_decay)
        stats.update(loss=loss, grad_norm=pu["grad_norm"], value_grad_norm=vu["grad_norm"],
                     skipped=pu["skipped"])
        return (policy, value, ema), stats

    # A fresh permutation of the rollout batch each epoch.
    perms = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), b)
                       for e in range(hp.epochs)])                     # [E, B]
    idx = perms.reshape(hp.epochs * m, mb_size)                          # [E*M, B/M]
    (policy, value, ema), stats = jax.lax.scan(
        minibatch_step, (state.policy, state.value, state.ema_params), (idx, ptx_batches))
    stats = jax.tree_util.tree_map(jnp.mean, stats)

    kl_coef = state.kl_coef
    if hp.adaptive_kl:
        kl_coef = rl.adaptive_kl_coef(kl_coef, observed_kl, hp.kl_target, hp.kl_horizon,
                                      b).astype(jnp.float32)
    ema_updates = state.ema_updates + (idx.shape[0] if ema is not None else 0)
    state = state.replace(step=state.step + 1, policy=policy, value=value, kl_coef=kl_coef,
                          ema_params=ema, ema_updates=ema_updates)
    stats["kl_coef"] = kl_coef
    stats["nonfinite"] = jnp.maximum(policy.nonfinite, value.nonfinite)
    return state, stats


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

def check_config(config):
    missing = [k for k in ("init_from", "reward_from") if not config.get(k)]
    if missing:
        raise common.ConfigError(
            "ppo needs " + " and ".join(
                {"init_from": "--config.init_from=<SFT workdir> (the policy and the frozen reference)",
                 "reward_from": "--config.reward_from=<RM workdir> (the reward model; the value "
                                "model starts from it)"}[k] for k in missing)
            + "; configs/instructgpt.py builds both (SFT, collect, RM) before PPO")
    for key in ("init_from", "reward_from"):
        if not checkpoint.has_checkpoint(config[key]):
            raise common.ConfigError(f"{key}={config[key]!r}: no finished checkpoint there")
    rm_meta = checkpoint.read_meta(config.reward_from)
    if rm_meta.get("model", {}).get("head") != "scalar" or rm_meta.get("stage") not in ("rm", None):
        raise common.ConfigError(
            f"reward_from={config.reward_from!r} is a {rm_meta.get('stage') or 'language model'} "
            f"checkpoint, not a reward model: its scalar head would be freshly initialised and "
            f"score every response 0; give the workdir of an rm stage")
    if not rm_meta.get("bias_normalized"):
        raise common.ConfigError(
            f"reward_from={config.reward_from!r}: the RM's latest checkpoint is not bias-normalised "
            "(its run did not finish); rerun the rm stage to completion")
    hp = config.ppo
    b = int(config.train.batch_size)
    if b % int(hp.minibatches):
        raise common.ConfigError(f"train.batch_size={b} must be divisible by ppo.minibatches={hp.minibatches}")
    if int(hp.top_k) != 0 or float(hp.top_p) < 1.0:
        raise common.ConfigError(
            f"ppo.top_k={hp.top_k}, ppo.top_p={hp.top_p}: PPO's ratio and KL are computed on the "
            f"full softmax, so filtered sampling would optimise another policy than the one "
            f"sampled; use ppo.top_k=0 and ppo.top_p=1.0 (temperature is supported)")
    if hp.ptx_coef > 0 and not config.data.ptx_path:
        raise common.ConfigError("ppo.ptx_coef > 0 needs data.ptx_path (pretraining text)")


def _hp(config, eos_id: int):
    """The static hyper-parameters the jitted functions close over (hashable)."""
    h = config.ppo
    return HParams(temperature=float(h.temperature), missing_eos_penalty=float(h.missing_eos_penalty),
                   gamma=float(h.gamma), lam=float(h.lam), whiten_advantages=bool(h.whiten_advantages),
                   clip=float(h.clip), vf_clip=float(h.vf_clip), vf_coef=float(h.vf_coef),
                   ptx_coef=float(h.ptx_coef), epochs=int(h.epochs), minibatches=int(h.minibatches),
                   adaptive_kl=bool(h.adaptive_kl), kl_target=float(h.kl_target),
                   kl_horizon=float(h.kl_horizon), ema_decay=float(h.ema_decay), eos_id=eos_id)


class HParams(NamedTuple):
    temperature: float
    missing_eos_penalty: float
    gamma: float
    lam: float
    whiten_advantages: bool
    clip: float
    vf_clip: float
    vf_coef: float
    ptx_coef: float
    epochs: int
    minibatches: int
    adaptive_kl: bool
    kl_target: float
    kl_horizon: float
    ema_decay: float
    eos_id: int


def _split_state(state: PPOState, ema_decay: Optional[float] = None):
    """Checkpoint items: `params` is the policy a later stage uses (the
    bias-corrected EMA of the policy weights when enabled, InstructGPT's
    decay 0.992); `train` is everything else, the raw policy and the raw EMA
    included, so that a resumed run continues exactly. `ema_decay` None: a
    tree of shardings, whose EMA part is that of the params item."""
    if state.ema_params is not None:
        if ema_decay is None:
            return state.ema_params, state
        return rl.ema_debiased(state.ema_params, ema_decay, state.ema_updates), state
    return state.policy.params, state.replace(policy=state.policy.replace(params=None))


def _join_state(params, train: PPOState) -> PPOState:
    if train.policy.params is None:
        return train.replace(policy=train.policy.replace(params=params))
    return train          # the EMA's params item is derived from `train`


def run(config, workdir: str):
    check_config(config)
    runtime = common.Runtime(config)
    t = config.train
    iterations = int(t.steps)
    b = int(t.batch_size)
    p, n = int(config.data.max_prompt_len), int(config.ppo.max_new_tokens)

    policy_cfg, tok, _ = common.stage_model(config, "lm", config.init_from)
    value_cfg, rm_tok, _ = common.stage_model(config, "scalar", config.reward_from)
    if tokenizers.signature(rm_tok) != tokenizers.signature(tok):
        raise common.ConfigError(
            f"reward_from={config.reward_from!r} has another tokenizer than init_from="
            f"{config.init_from!r}: the RM would read the policy's token ids as other text")
    hp = _hp(config, tok.eos_id)
    if p + n > policy_cfg.max_len:
        raise common.ConfigError(f"data.max_prompt_len + ppo.max_new_tokens = {p + n} exceeds the "
                                 f"model's context {policy_cfg.max_len}")
    policy_cfg = policy_cfg.replace(dropout=0.0)
    value_cfg = value_cfg.replace(dropout=0.0)
    models = Models(policy=Transformer(policy_cfg), value=Transformer(value_cfg),
                    reward=Transformer(value_cfg))

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
            config, runtime, ptx, int(config.ppo.ptx_batch_size) * n_updates,
            functools.partial(preprocess.text_example, tok, max_len=int(config.data.max_len)),
            what="ppo.ptx_batch_size x ppo.epochs x ppo.minibatches")

    total_updates = iterations * n_updates
    # The schedules count optimizer updates: E x M per iteration.
    policy_opt = common.make_optimizer(_with_steps(t, total_updates))
    value_opt = common.make_optimizer(_with_steps(t, total_updates, lr=float(config.ppo.value_lr)))

    with runtime.activations():
        policy, pol_sh = common.create_train_state(runtime, models.policy, policy_opt, config.seed,
                                                   init_from=config.init_from)
        value, val_sh = common.create_train_state(runtime, models.value, value_opt, config.seed + 1,
                                                  init_from=config.reward_from)
        ref_params, _ = common.restore_model_params(config.init_from, runtime, models.policy)
        reward_params, _ = common.restore_model_params(config.reward_from, runtime, models.reward)
        # The EMA starts from zeros and is read bias-corrected (rl.ema_debiased).
        ema = (jax.tree_util.tree_map(lambda x: x * 0, policy.params) if hp.ema_decay > 0
               else None)
        state = PPOState(step=jnp.int32(0), policy=policy, value=value,
                         kl_coef=jnp.float32(config.ppo.kl_coef), ema_params=ema,
                         ema_updates=jnp.int32(0))
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)

        score_fn = jax.jit(functools.partial(score_rollout, models=models, hp=hp))
        update_fn = jax.jit(functools.partial(ppo_update, models=models, policy_opt=policy_opt,
                                              value_opt=value_opt, hp=hp, p=p),
                            in_shardings=(state_sh, None, None, None, None),
                            out_shardings=(state_sh, None), donate_argnums=0)
        meta = dict(common.model_meta(policy_cfg, data_setup.tokenizer_spec(config)),
                    reward_from=config.reward_from)
        return _loop(config, workdir, runtime, models, hp, tok, state, state_sh, ref_params,
                     reward_params, score_fn, update_fn, prompt_loader, ptx_loader, meta, p, n)


def _with_steps(t, steps, **kw):
    d = dict(t.to_dict() if hasattr(t, "to_dict") else t)
    d.update(steps=steps, **kw)
    import ml_collections
    return ml_collections.ConfigDict(d)


def _loop(config, workdir, runtime, models, hp, tok, state, state_sh, ref_params, reward_params,
          score_fn, update_fn, prompt_loader, ptx_loader, meta, p, n):
    t = config.train
    iterations = int(t.steps)
    ckpt = checkpoint.Checkpointer(workdir, t.checkpoint_every, t.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        params_like, train_like = _split_state(state)
        sh_params, sh_train = _split_state(state_sh)
        params, train, _ = ckpt.restore(start, sharding.abstract_like(params_like, sh_params),
                                        sharding.abstract_like(train_like, sh_train))
        state = _join_state(params, train)
    # The bar says which of the main job's two PPO runs this is.
    writer = MetricsWriter(workdir, "ppo", total_steps=iterations,
                           label="ppo_ptx" if hp.ptx_coef > 0 else "ppo")
    if start:
        writer.log(f"[ppo] resuming from iteration {start} ({ckpt.directory})")
        writer.start_at(start)
    preempt = common.Preemption()
    base_rng = jax.random.PRNGKey(config.seed + 17)
    gold = _gold_scorer(config, prompt_loader, prompt_loader.source)
    try:
        for it in range(start, iterations):
            rng = jax.random.fold_in(base_rng, it)
            batch = runtime.global_batch(prompt_loader.batch(it))
            t0 = time.time()
            out = sampling.sample(models.policy, state.policy.params, batch["tokens"], batch["mask"],
                                  jax.random.fold_in(rng, 0), max_new_tokens=n, eos_id=tok.eos_id,
                                  pad_id=tok.pad_id, temperature=hp.temperature)
            rollout, stats = score_fn(state.policy.params, ref_params, state.value.params,
                                      reward_params, batch["tokens"], batch["mask"], out.tokens,
                                      out.mask, out.finished, state.kl_coef)
            jax.block_until_ready(rollout)
            t1 = time.time()
            ptx = None
            if ptx_loader is not None:
                ptx = ptx_loader.batch(it)
                ptx = runtime.global_batch(ptx)
                ptx = jax.tree_util.tree_map(
                    lambda x: x.reshape((hp.epochs * hp.minibatches, -1) + x.shape[1:]), ptx)
            state, upd = update_fn(state, rollout, ptx, stats["kl"], jax.random.fold_in(rng, 1))
            jax.block_until_ready(state.step)
            t2 = time.time()
            stats, upd = jax.device_get(stats), jax.device_get(upd)   # replicated scalars
            row = {f"ppo/{k}": v for k, v in {**stats, **upd}.items()}
            n_tokens = float(stats["response_length"]) * int(t.batch_size)
            row.update({"ppo/time_rollout": t1 - t0, "ppo/time_update": t2 - t1,
                        "ppo/tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
                        "ppo/iteration_s": t2 - t0})
            if gold is not None:
                row["ppo/gold_score"] = gold(it, out)
            writer.write(it + 1, row, progress_keys=("ppo/score", "ppo/kl", "ppo/gold_score"))
            if int(upd["nonfinite"]) >= t.max_nonfinite_steps:
                raise FloatingPointError(f"[ppo] non-finite updates in a row at iteration {it + 1}: "
                                         "stopping (train.max_nonfinite_steps)")
            done = it + 1
            # Asked once per iteration: SIGTERM or Orbax's preemption notice
            # (multi-host), which is not `preempt.requested`, both stop here.
            stop = preempt.check(done) and done < iterations
            if ckpt.should_save(done, final=done == iterations) or stop:
                params, train = _split_state(state, hp.ema_decay)
                ckpt.save(done, params, train, dict(meta, stage="ppo", step=done, data_step=done),
                          force=True)
                if stop:
                    ckpt.close()
                    writer.log(f"[ppo] preempted: checkpoint saved at iteration {done}")
                    raise common.Preempted(done)
    finally:
        preempt.restore()
        ckpt.close()
        writer.close()
    return state


def _gold_scorer(config, prompt_loader, prompts):
    """Mean gold score of a rollout batch, when the prompts are the world's
    (single process: the whole batch must be on this host)."""
    if not config.ppo.gold_eval or jax.process_count() > 1:
        return None
    from rlhf_jax.world import gold_score
    from rlhf_jax.world.gold import parse_prompt
    try:
        parse_prompt(prompts[0]["prompt"])
    except ValueError:
        return None
    tok = common.tokenizer_from_meta(checkpoint.read_meta(config.init_from))

    def score(it: int, out) -> float:
        texts = [prompts[i]["prompt"] for i in prompt_loader.record_indices(it)]
        responses = distributed.gather(out.tokens)
        return float(np.mean([gold_score(pr, *tokenizers.decode_response(tok, r))
                              for pr, r in zip(texts, responses)]))
    return score
