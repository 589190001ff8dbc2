"""What every stage shares: models from configs or checkpoints, the sharded
train state, the optimizer, the non-finite guard, preemption, and the
supervised training loop (pretrain, SFT and RM use it; PPO has its own).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import checkpoint, sharding
from rlhf_jax.errors import ConfigError, Preempted  # noqa: F401  (stages raise them as common.*)
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models import presets, pretrained
from rlhf_jax.models.transformer import ModelConfig, Transformer

# Fields of config.model that choose how to run, not what the network is:
# these apply even when the architecture comes from a checkpoint.
RUNTIME_FIELDS = ("dropout", "matmul", "activations", "remat", "scan_unroll")


# ---------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------

def model_config_from(config_model, base: Optional[dict] = None, head: str = "lm") -> ModelConfig:
    """ModelConfig from a config's `model` block, or from a checkpoint's saved
    architecture (`base`) or a named `model.preset` (models/presets.py), with
    the config's runtime fields applied."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if base is None and config_model.get("preset"):
        try:
            base = presets.preset(config_model["preset"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if base is not None:
        kw = {k: v for k, v in base.items() if k in fields}
        kw.update({k: config_model[k] for k in RUNTIME_FIELDS if k in config_model})
    else:
        kw = {k: config_model[k] for k in fields if k in config_model}
    kw["head"] = head
    return ModelConfig(**kw)


def stage_model(config, head: str = "lm", from_checkpoint: str = ""):
    """(ModelConfig, tokenizer, pretrained params or None) for a stage.

    Architecture comes, in order of precedence, from the checkpoint a stage
    initialises from, from `model.pretrained` (HF directory or GGUF), or from
    the config's architecture fields.
    """
    if from_checkpoint:
        meta = checkpoint.read_meta(from_checkpoint)
        cfg = model_config_from(config.model, meta["model"], head)
        tok = tokenizer_from_meta(meta)
        return cfg, tok, None
    if config.model.get("pretrained"):
        cfg, tok, params = pretrained.load_for_config(config.model.pretrained)
        cfg = cfg.replace(head=head, **{k: config.model[k] for k in RUNTIME_FIELDS})
        return cfg, tok, params
    tok = pretrained.build_tokenizer(config.model)
    cfg = model_config_from(config.model, head=head)
    if cfg.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} ids")
    return cfg, tok, None


def tokenizer_from_meta(meta: dict):
    return pretrained.build_tokenizer(meta.get("tokenizer", "byte"))


def model_meta(cfg: ModelConfig, tokenizer_spec: str) -> dict:
    return {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer_spec}


def override(config, **dotted):
    """Sets `{"train.steps": 3, ...}` on a config (a stage's copy; never the user's)."""
    for key, value in dotted.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# ---------------------------------------------------------------------------
# Train state
# ---------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: updates applied (skipped ones count too)
    params: Any
    opt_state: Any
    rng: jax.Array           # base key; step keys are fold_in(rng, step)
    nonfinite: jax.Array     # int32: consecutive skipped (non-finite) updates

    def split(self):
        """(params, the rest) — the two checkpoint items."""
        return self.params, self.replace(params=None)


def make_optimizer(t) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay; no weight decay on vectors
    (norm scales, biases)."""
    steps = max(int(t.steps), 1)
    warmup = min(int(t.warmup_steps), steps - 1) if steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else t.lr, peak_value=t.lr, warmup_steps=warmup,
        decay_steps=steps, end_value=t.lr * t.end_lr_ratio)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))


class Runtime:
    """Mesh, logical rules and the step functions' shardings for one stage."""

    def __init__(self, config, devices=None):
        """`devices`: default jax.devices(); rlhf_jax.aot passes a TPU
        topology's compile-only devices."""
        try:
            self.mesh = sharding.make_mesh(config.mesh, devices)
        except ValueError as e:  # e.g. more mesh devices than there are: a config error
            raise ConfigError(f"{e} (set mesh.data/fsdp/tensor)") from None
        self.rules = sharding.rules_from_config(config)

    def activations(self):
        return sharding.activation_sharding(self.mesh, self.rules)

    def init_params(self, model: Transformer, rng, seq_len: int = 8):
        example = jnp.zeros((1, seq_len), jnp.int32)
        return sharding.sharded_init(lambda r: model.init(r, example)["params"], self.mesh,
                                     self.rules, rng)

    def global_batch(self, batch: dict) -> dict:
        return sharding.to_global_batch(batch, self.mesh)

    def replicated(self):
        return sharding.replicated(self.mesh)


def graft_params(target, source):
    """`target` with every leaf that `source` has at the same path and shape
    replaced: a reward model from an SFT checkpoint keeps the backbone and
    gets a fresh scalar head."""
    flat_src = flax.traverse_util.flatten_dict(source)
    flat_tgt = flax.traverse_util.flatten_dict(target)
    n = 0
    for k, v in flat_tgt.items():
        s = flat_src.get(k)
        if s is not None and s.shape == v.shape:
            flat_tgt[k] = s
            n += 1
    if n == 0:
        raise ConfigError("init_from: the checkpoint shares no parameters with this model")
    return flax.traverse_util.unflatten_dict(flat_tgt)


def _restore_target(model: Transformer, runtime: Runtime):
    """(abstract params with their shardings, the shardings) of `model` on
    `runtime`: what a checkpoint restores into, without running init."""
    abstract = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                              jax.random.PRNGKey(0))
    shardings = sharding.logical_shardings(abstract, runtime.mesh, runtime.rules)
    return sharding.abstract_like(sharding.strip_boxes(abstract), shardings), shardings


def load_params_from(path: str, runtime: Runtime, target_params, target_shardings):
    """Params of the checkpoint at `path`, restored directly into this stage's
    shardings and grafted onto `target_params` (heads may differ)."""
    meta = checkpoint.read_meta(path)
    src_cfg = ModelConfig(**{k: v for k, v in meta["model"].items()
                             if k in {f.name for f in dataclasses.fields(ModelConfig)}})
    source = checkpoint.load_params(path, _restore_target(Transformer(src_cfg), runtime)[0])
    grafted = graft_params(target_params, source)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), grafted, target_shardings)


def restore_model_params(path: str, runtime: Runtime, model: Transformer, rng=None):
    """`model`'s params from the checkpoint at `path`, restored straight into
    their shardings (no random init, no compile) when the checkpoint has the
    same head; otherwise initialised from `rng` (default key 0) and grafted
    (e.g. a value model from an SFT checkpoint). Returns (params, shardings)."""
    if checkpoint.read_meta(path).get("model", {}).get("head", "lm") == model.cfg.head:
        like, shardings = _restore_target(model, runtime)
        return checkpoint.load_params(path, like), shardings
    params, shardings = runtime.init_params(model, jax.random.PRNGKey(0) if rng is None else rng)
    return load_params_from(path, runtime, params, shardings), shardings


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


def create_train_state(runtime: Runtime, model: Transformer, optimizer, seed: int,
                       init_from: str = "", params=None):
    """A sharded TrainState: params from `params`, else `init_from`, else random."""
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    if init_from and params is None:
        fresh, shardings = restore_model_params(init_from, runtime, model, init_rng)
    else:
        fresh, shardings = runtime.init_params(model, init_rng)
    if params is not None:
        fresh = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s),
                                       graft_params(fresh, params), shardings)
    opt_state = jax.jit(optimizer.init,
                        out_shardings=optimizer_shardings(optimizer, fresh, shardings,
                                                          runtime.replicated()))(fresh)
    state = TrainState(step=jnp.int32(0), params=fresh, opt_state=opt_state, rng=state_rng,
                       nonfinite=jnp.int32(0))
    return state, jax.tree_util.tree_map(lambda x: x.sharding, state)


def compile_supervised(runtime: Runtime, cfg: ModelConfig, optimizer, train_step, seed: int,
                       init_from: str = "", params=None):
    """The sharded state and the jitted, donated `train_step(state, batch,
    model=, optimizer=)` of a supervised stage (dropout on as configured).
    Call under `runtime.activations()`."""
    model = Transformer(cfg, deterministic=False)
    state, shardings = create_train_state(runtime, model, optimizer, seed, init_from, params)
    step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer),
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


# ---------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------

class Preemption:
    """SIGTERM (or Orbax's preemption notice on TPU) asks for a checkpoint at
    the next step boundary and a clean exit."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. under some test runners)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        if self.requested:
            return True
        try:  # reached at the same step on every host of a multi-host run
            from orbax.checkpoint import multihost
            return bool(multihost.reached_preemption(step))
        except Exception:
            return False

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------
# The supervised loop (pretrain, SFT, RM)
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Loop:
    """A supervised stage: a jitted `train_step(state, batch) -> (state,
    metrics)`, a loader with `batch(step)`, and an optional `evaluate(params)
    -> metrics`."""
    stage: str
    config: Any
    workdir: str
    runtime: Runtime
    state: TrainState
    state_shardings: Any
    train_step: Callable
    loader: Any
    meta: dict
    evaluate: Optional[Callable] = None
    units_per_batch: float = 0.0     # tokens (or pairs) per batch, for the rate metric
    units_name: str = "tokens_per_s"
    progress_keys: tuple = ()
    # `finalize(state) -> (state, metrics, meta)`, applied once to the trained
    # state just before the final checkpoint, which then holds its result and
    # `meta` (the RM's bias normalisation). A finished stage, re-run, is restored
    # as saved and never finalized again.
    finalize: Optional[Callable] = None


def restore_or_start(ckpt: checkpoint.Checkpointer, state: TrainState, shardings) -> tuple[TrainState, int, dict]:
    step = ckpt.latest_step()
    if step is None:
        return state, 0, {}
    params_like, train_like = state.split()
    sh_params, sh_train = shardings.split() if isinstance(shardings, TrainState) else (None, None)
    params, train, meta = ckpt.restore(step, sharding.abstract_like(params_like, sh_params),
                                       sharding.abstract_like(train_like, sh_train))
    return train.replace(params=params), step, meta


def run_loop(loop: Loop) -> TrainState:
    t = loop.config.train
    total = int(t.steps)
    ckpt = checkpoint.Checkpointer(loop.workdir, t.checkpoint_every, t.keep_checkpoints)
    state, start, _ = restore_or_start(ckpt, loop.state, loop.state_shardings)
    if start > total:
        # A run of more steps stopped here: resuming would skip its end
        # (the RM's bias normalisation included) and call it finished.
        raise ConfigError(f"{ckpt.directory} holds step {start}, past train.steps={total}: it "
                          f"was made with other settings; use a new workdir or delete it")
    writer = MetricsWriter(loop.workdir, loop.stage, total_steps=total)
    if start:
        writer.log(f"[{loop.stage}] resuming from step {start} ({ckpt.directory})")
        writer.start_at(start)
    preempt = Preemption()

    final_meta = {}         # what `loop.finalize` adds to the final checkpoint's meta

    def save(step, final=False):
        params, train = state.split()
        meta = dict(loop.meta, **final_meta, stage=loop.stage, step=step, data_step=step)
        ckpt.save(step, params, train, meta, force=final)

    def finalize(step):
        nonlocal state
        state, metrics, meta = loop.finalize(state)
        final_meta.update(meta)
        writer.write(step, {f"{loop.stage}/{k}": v for k, v in metrics.items()})
        writer.log(f"[{loop.stage}] finalized at step {step}: " +
                   ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()))

    # The previous step's (step, device metrics, is a log step), read one step
    # late so the host never waits for the step it just dispatched. Every step
    # is checked: a skipped (non-finite) update is always logged, and
    # train.max_nonfinite_steps in a row stop the run wherever they fall
    # between log steps.
    previous = None
    t0, last_logged = time.time(), start

    def settle(prev, check: bool = True):
        nonlocal t0, last_logged
        prev_step, prev_metrics, is_log_step = prev
        nonfinite = int(prev_metrics["nonfinite"])
        if is_log_step:
            _log(writer, loop, (prev_step, prev_metrics), t0, last_logged)
            t0, last_logged = time.time(), prev_step
        elif nonfinite:
            writer.write(prev_step, {f"{loop.stage}/{k}" if "/" not in k else k: v
                                     for k, v in jax.device_get(prev_metrics).items()})
        if check and nonfinite >= t.max_nonfinite_steps:
            raise FloatingPointError(
                f"[{loop.stage}] {nonfinite} non-finite updates in a row at step {prev_step} "
                f"(steps {prev_step - nonfinite + 1}-{prev_step} skipped): stopping "
                f"(train.max_nonfinite_steps={t.max_nonfinite_steps})")

    try:
        for step in range(start, total):
            batch = loop.runtime.global_batch(loop.loader.batch(step))
            state, metrics = loop.train_step(state, batch)
            if previous is not None:
                settle(previous)
                previous = None
            done = step + 1
            current = (done, metrics, done % t.log_every == 0 or done == total)
            if loop.evaluate is not None and (done % t.eval_every == 0 or done == total):
                ev = {f"{loop.stage}/{k}": v for k, v in loop.evaluate(state.params).items()}
                writer.write(done, ev)
                writer.log(f"[{loop.stage}] step {done}: " +
                           ", ".join(f"{k}={float(v):.4g}" for k, v in ev.items()))
            if done == total and loop.finalize is not None:
                finalize(done)
            if ckpt.should_save(done, final=done == total):
                save(done, final=done == total)
            if preempt.check(done) and done < total:
                settle(current, check=False)    # this step's row, before the exit
                save(done, final=True)
                ckpt.close()
                writer.log(f"[{loop.stage}] preempted: checkpoint saved at step {done}")
                raise Preempted(done)
            previous = current
        if previous is not None:
            settle(previous, check=False)       # the run is complete and saved
        if start >= total and ckpt.latest_step() is None:
            if loop.finalize is not None:
                finalize(total)
            save(total, final=True)
    finally:
        preempt.restore()
        ckpt.close()
        writer.close()
    return state


def _log(writer, loop: Loop, pending, t0, last_logged):
    step, metrics = pending
    elapsed = max(time.time() - t0, 1e-9)
    row = {f"{loop.stage}/{k}" if "/" not in k else k: v for k, v in jax.device_get(metrics).items()}
    if loop.units_per_batch:
        row[f"{loop.stage}/{loop.units_name}"] = loop.units_per_batch * (step - last_logged) / elapsed
    writer.write(step, row, progress_keys=tuple(f"{loop.stage}/{k}" for k in loop.progress_keys)
                 + (f"{loop.stage}/{loop.units_name}",))


def workdir_of(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
