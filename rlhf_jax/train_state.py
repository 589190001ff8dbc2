"""The sharded train state of one network: params, optimizer state, step,
RNG and the non-finite guard; the optimizer; one guarded update.

Every trained network (the policy, the value model, the RM, an SFT model)
is a TrainState; PPO holds two of them.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import checkpoint, jit_cache, sharding
from rlhf_jax.models.transformer import ModelConfig, Transformer


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: updates applied (skipped ones count too)
    params: Any
    opt_state: Any
    rng: jax.Array           # base key; step keys are fold_in(rng, step)
    nonfinite: jax.Array     # int32: consecutive skipped (non-finite) updates

    def split(self):
        """(params, the rest): the two checkpoint items."""
        return self.params, self.replace(params=None)


def join(params, train: TrainState) -> TrainState:
    """The inverse of TrainState.split."""
    return train.replace(params=params)


def make_optimizer(t) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay over `t.steps` updates; no
    weight decay on vectors (norm scales, biases). One object per schedule
    in a process, so steps jitted with it are found again (jit_cache)."""
    return _optimizer(int(t.steps), int(t.warmup_steps), t.lr, t.end_lr_ratio, t.grad_clip,
                      t.b1, t.b2, t.weight_decay)


@functools.lru_cache(maxsize=32)
def _optimizer(steps, warmup_steps, lr, end_lr_ratio, grad_clip, b1, b2, weight_decay):
    steps = max(steps, 1)
    warmup = min(warmup_steps, steps - 1) if steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=steps, end_value=lr * end_lr_ratio)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))


def with_steps(t, steps: int, **fields) -> ml_collections.ConfigDict:
    """A copy of a `train` block with another step count (and `fields`): the
    schedule of an optimizer that updates more than once a loop step."""
    d = dict(t.to_dict() if hasattr(t, "to_dict") else t)
    d.update(steps=steps, **fields)
    return ml_collections.ConfigDict(d)


def optimizer_shardings(optimizer, params, param_shardings, replicated):
    """Shardings of `optimizer.init(params)`: every parameter-shaped leaf (Adam's
    moments) in its parameter's sharding, the rest (step counts) replicated.

    Without them XLA may place the moments anywhere, since zeros depend on no
    parameter's data: `jax.jit(optimizer.init)` replicated them on every
    device, three times a model's f32 size per chip under FSDP (found by
    rlhf_jax.aot: Llama-3-8B's SFT step on 64 v5p chips needed 92.8 GiB per chip,
    9.1 with this; BENCHMARKS.md)."""
    shapes = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(optimizer, lambda _, s: s, shapes, param_shardings,
                                 transform_non_params=lambda _: replicated)


def create_train_state(runtime: sharding.Runtime, model: Transformer, optimizer, seed: int,
                       init_from: str = "", params=None, restored=None):
    """A sharded TrainState: params from `params`, else `init_from`, else random;
    or `restored` (params, shardings), already in this run's shardings
    (stages.roles), used as they are."""
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    if restored is not None:
        fresh, shardings = restored
    elif init_from and params is None:
        fresh, shardings = checkpoint.restore_model_params(init_from, runtime, model, init_rng)
    else:
        fresh, shardings = runtime.init_params(model, init_rng)
    if params is not None:
        fresh = checkpoint.put(checkpoint.graft_params(fresh, params), shardings)
    opt_state = jax.jit(optimizer.init,
                        out_shardings=optimizer_shardings(optimizer, fresh, shardings,
                                                          runtime.replicated()))(fresh)
    state = TrainState(step=jnp.int32(0), params=fresh, opt_state=opt_state, rng=state_rng,
                       nonfinite=jnp.int32(0))
    return state, jax.tree_util.tree_map(lambda x: x.sharding, state)


def compile_supervised(runtime: sharding.Runtime, cfg: ModelConfig, optimizer, train_step,
                       seed: int, init_from: str = "", params=None):
    """The sharded state and the jitted, donated `train_step(state, batch,
    model=, optimizer=)` of a supervised stage (dropout on as configured).
    Call under `runtime.activations()`."""
    model = Transformer(cfg, deterministic=False)
    state, shardings = create_train_state(runtime, model, optimizer, seed, init_from, params)
    step = jit_cache.jit_partial(train_step, dict(model=model, optimizer=optimizer),
                                 in_shardings=(shardings, None), out_shardings=(shardings, None),
                                 donate_argnums=0)
    return state, shardings, step


def apply_update(state: TrainState, grads, loss, optimizer) -> tuple[TrainState, dict]:
    """One optimizer update, skipped when the loss or any gradient is not finite."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
    return state, {"grad_norm": grad_norm, "skipped": 1.0 - finite.astype(jnp.float32),
                   "nonfinite": state.nonfinite}


def step_rng(state: TrainState, salt: int = 0):
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), salt)
