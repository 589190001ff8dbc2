"""Will it fit on the pod? Ahead-of-time compiles of a stage's jitted steps for
a TPU topology, from a CPU host (libtpu installed: `pip install -e '.[tpu]'`).

    python -m rlhf_jax.aot --config configs/sft.py --topology v5p-128 \
        --config.model.preset=llama3_8b --config.mesh.data=1 --config.mesh.fsdp=-1 \
        --config.model.matmul=bf16 --config.model.activations=bfloat16 --config.model.remat=True
    python -m rlhf_jax.aot --config configs/ppo.py --topology v5e-256 ... --json out.jsonl
    python -m rlhf_jax.aot --table_from out.jsonl     # README's markdown table

Each jitted step of the stage (SFT/pretrain/RM: `train_step`; PPO: `sample`,
`score`, `update`) is lowered with abstract, sharded arguments
(`jax.ShapeDtypeStruct`s on a mesh of the topology's compile-only devices;
nothing is materialised: parameters come from `jax.eval_shape(init)`) and
compiled by libtpu's compiler, the one a pod runs. Printed per chip, from the
compiled memory analysis: arguments, outputs, aliased (donated) bytes,
temporaries, generated code, and total = arguments + outputs - aliased +
temporaries + code. A PPO step also counts what stays resident while it runs
but is not its argument (`other`: e.g. the reference and reward models during
`update`), so `peak = total + other` is what must fit in the chip's HBM.

FLOPs per step are the model's matmul FLOPs counted from the shapes
(`step_flops`, MaxText's convention: 2 per multiply-add, backward = 2x
forward, rematerialisation not counted), because XLA's cost analysis counts
the body of a while loop once (a 10-step `lax.scan` reports the FLOPs of one
step; measured with libtpu 0.0.42.1), and every step here loops: over layers,
decoded tokens and PPO minibatches.

The mesh is built by `rlhf_jax.sharding.make_mesh` from the config's `mesh`
block, as a real run builds it, and the logical rules are the config's.
"""
from __future__ import annotations

import os

# Before jax loads libtpu: no TPU metadata server here; the default backend
# stays the CPU (the topology's devices are compile-only); and libtpu's
# one-process-per-host lock is for a host that drives TPU chips, which a
# compile-only process does not.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, NamedTuple, Optional  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from rlhf_jax.aot_report import GiB  # noqa: E402
from rlhf_jax.console import stderr_held  # noqa: E402
from rlhf_jax.tpu_topology import Topology, libtpu_version, topology, topology_devices  # noqa: E402


# ---------------------------------------------------------------------------
# Abstract, sharded arguments
# ---------------------------------------------------------------------------

def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the
    largest shard: that device is the one to run out of memory)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _batch(mesh, dtype, *shape) -> jax.ShapeDtypeStruct:
    from rlhf_jax import sharding
    return _sds(shape, dtype, sharding.batch_sharding(mesh, len(shape)))


def abstract_train_state(runtime, model, optimizer):
    """A TrainState of sharded ShapeDtypeStructs, as `create_train_state`
    makes it: params in their logical shardings, the optimizer state in
    `train_state.optimizer_shardings`."""
    from rlhf_jax import checkpoint, train_state
    params, shardings = checkpoint.restore_target(model, runtime)
    rep = runtime.replicated()
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree_util.tree_map(
        lambda x, s: _sds(x.shape, x.dtype, s), opt_shapes,
        train_state.optimizer_shardings(optimizer, params, shardings, rep))
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return train_state.TrainState(step=_sds((), jnp.int32, rep), params=params,
                                  opt_state=opt_state, rng=_sds(key.shape, key.dtype, rep),
                                  nonfinite=_sds((), jnp.int32, rep))


def _shardings(tree):
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


class Step(NamedTuple):
    """One jitted step to compile: `jitted.lower(*args)`, the step's model
    FLOPs, and the bytes resident on a device while it runs that are not its
    arguments."""
    name: str
    jitted: Any
    args: tuple
    flops: float
    other_bytes: int = 0
    resident: Optional[dict] = None     # bytes per device of each resident part


# ---------------------------------------------------------------------------
# Model FLOPs (matmuls only; see the module docstring)
# ---------------------------------------------------------------------------

def forward_flops(cfg, rows: int, length: int, keys: int, head_positions: int) -> float:
    """Matmul FLOPs of one forward pass over `rows` x `length` tokens attending
    to `keys` key slots each (all of them are computed, masked or not), with
    the head applied at `head_positions` positions per row."""
    e, h, k, d, i = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.dim_per_head, cfg.intermediate
    mlp = (3 if cfg.arch == "llama" else 2) * e * i
    per_token = cfg.layers * (e * (h + 2 * k) * d + h * d * e + mlp + 2 * h * d * keys)
    head = e * (cfg.vocab_size if cfg.head == "lm" else 1)
    return 2.0 * rows * (length * per_token + head_positions * head)


def train_flops(cfg, rows: int, length: int, head_positions: Optional[int] = None) -> float:
    """Forward + backward (2x forward) FLOPs of one training pass."""
    return 3.0 * forward_flops(cfg, rows, length, length,
                               length if head_positions is None else head_positions)


# ---------------------------------------------------------------------------
# The stages' steps
# ---------------------------------------------------------------------------

def supervised_steps(config, runtime, cfg) -> list[Step]:
    """SFT / pretrain (sft.train_step) or RM (rm.train_step), jitted as
    `train_state.compile_supervised` jits it."""
    from rlhf_jax import sharding, train_state
    from rlhf_jax.models.transformer import Transformer
    from rlhf_jax.stages import rm, sft
    b, l = int(config.train.batch_size), int(config.data.max_len)
    sharding.check_batch_divisible(b, runtime.mesh, "train.batch_size")
    model = Transformer(cfg, deterministic=False)
    optimizer = train_state.make_optimizer(config.train)
    state = abstract_train_state(runtime, model, optimizer)
    mesh = runtime.mesh
    if config.stage == "rm":
        # rm.pack's layout at its largest (every slot a distinct response).
        k = int(config.data.k_max)
        batch = {"row_tokens_0": _batch(mesh, jnp.int32, b * k, l),
                 "row_attn_mask_0": _batch(mesh, jnp.int32, b * k, l),
                 "row_last_index_0": _batch(mesh, jnp.int32, b * k),
                 "slot_row": _batch(mesh, jnp.int32, b, k),
                 "ranks": _batch(mesh, jnp.int32, b, k),
                 "valid": _batch(mesh, jnp.bool_, b, k)}
        fn, flops = rm.train_step, train_flops(cfg, b * k, l)
    else:
        batch = {k: _batch(mesh, dt, b, l) for k, dt in
                 (("tokens", jnp.int32), ("attn_mask", jnp.int32), ("loss_mask", jnp.float32))}
        fn, flops = sft.train_step, train_flops(cfg, b, l)
    sh = _shardings(state)
    step = jax.jit(functools.partial(fn, model=model, optimizer=optimizer),
                   in_shardings=(sh, None), out_shardings=(sh, None), donate_argnums=0)
    return [Step("train_step", step, (state, batch), flops)]


def ppo_steps(config, runtime, cfg_lm, cfg_scalar) -> list[Step]:
    """PPO's rollout (`sampling.sample`), `score_rollout` and `ppo_update`,
    jitted by the stage's own `ppo.jit_steps`, with the iteration's resident
    state: policy and value TrainStates, reference and reward params."""
    from rlhf_jax import checkpoint, packed_rollouts, sampling, sharding, train_state
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.models import pretrained
    from rlhf_jax.models.transformer import Transformer
    from rlhf_jax.stages import policy_gradient as pg, ppo
    tok = pretrained.build_tokenizer(config.model)
    hp = pg.hyperparams(config, tok.eos_id)
    t = config.train
    b, p, n = int(t.batch_size), int(config.data.max_prompt_len), int(config.sampling.max_new_tokens)
    sharding.check_batch_divisible(b, runtime.mesh, "train.batch_size")
    if b % hp.minibatches:
        raise ConfigError(f"train.batch_size={b} must be divisible by "
                          f"algo.minibatches={hp.minibatches}")
    cfg_lm, cfg_scalar = cfg_lm.replace(dropout=0.0), cfg_scalar.replace(dropout=0.0)
    models = ppo.Models(policy=Transformer(cfg_lm), value=Transformer(cfg_scalar),
                        reward=Transformer(cfg_scalar))
    n_updates = hp.epochs * hp.minibatches
    policy_opt = train_state.make_optimizer(train_state.with_steps(t, int(t.steps) * n_updates))
    value_opt = train_state.make_optimizer(train_state.with_steps(
        t, int(t.steps) * n_updates, lr=float(config.algo.value_lr)))
    policy = abstract_train_state(runtime, models.policy, policy_opt)
    value = abstract_train_state(runtime, models.value, value_opt)
    ref_params = checkpoint.restore_target(models.policy, runtime)[0]
    reward_params = checkpoint.restore_target(models.reward, runtime)[0]
    rep = runtime.replicated()
    state = ppo.PPOState(step=_sds((), jnp.int32, rep), policy=policy, value=value,
                         kl_coef=_sds((), jnp.float32, rep),
                         ema_params=policy.params if hp.ema_decay > 0 else None,
                         ema_updates=_sds((), jnp.int32, rep))
    resident = shard_bytes((state, ref_params, reward_params))
    # What an iteration keeps on each chip from start to end, part by part
    # (the KV cache is `sample`'s temporary; the rollout is `update`'s argument).
    parts = {"policy": shard_bytes(policy.params), "policy_opt": shard_bytes(policy.opt_state),
             "reference": shard_bytes(ref_params), "value": shard_bytes(value.params),
             "value_opt": shard_bytes(value.opt_state), "reward": shard_bytes(reward_params),
             "ema": shard_bytes(state.ema_params) if hp.ema_decay > 0 else 0}
    mesh = runtime.mesh
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    rng = _sds(key.shape, key.dtype, rep)

    prompt, prompt_mask = _batch(mesh, jnp.int32, b, p), _batch(mesh, jnp.int32, b, p)
    sample_args = (models.policy, policy.params, prompt, prompt_mask, rng)
    sample_kw = dict(max_new_tokens=n, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     temperature=hp.temperature, top_k=int(config.sampling.top_k),
                     top_p=float(config.sampling.top_p))
    sample = _Bound(sampling.sample, sample_kw)
    s = p + n
    sample_flops = (forward_flops(cfg_lm, b, p, s, 1) + n * forward_flops(cfg_lm, b, 1, s, 1))

    response, mask = _batch(mesh, jnp.int32, b, n), _batch(mesh, jnp.float32, b, n)
    finished = _batch(mesh, jnp.bool_, b)
    # The packed rows (packed_rollouts) at their most: a rollout a row, as
    # when every prompt and response is as long as the budget allows.
    w, multiple = packed_rollouts.width(p, n), sharding.batch_devices(mesh)

    def packed(groups, g):
        r = -(-g // multiple) * multiple
        lead = (groups,) if groups else ()
        return packed_rollouts.Packed(
            source=_sds(lead + (r, w), jnp.int32, rep), segments=_sds(lead + (r, w), jnp.int32, rep),
            outputs=_sds(lead + (g, n), jnp.int32, rep), last=_sds(lead + (g,), jnp.int32, rep))
    score_args = (policy.params, ref_params, value.params, reward_params, prompt, response, mask,
                  finished, state.kl_coef, packed(0, b))
    score_flops = (2 * forward_flops(cfg_lm, b, w, w, n) + forward_flops(cfg_scalar, b, w, w, n)
                   + forward_flops(cfg_scalar, b, w, w, 1))

    bn = lambda dt: _batch(mesh, dt, b, n)     # noqa: E731
    bs = lambda dt: _batch(mesh, dt, b, s)     # noqa: E731
    rollout = ppo.Rollout(tokens=bs(jnp.int32), mask=bn(jnp.float32),
                          old_logp=bn(jnp.float32), old_values=bn(jnp.float32),
                          advantages=bn(jnp.float32), returns=bn(jnp.float32))
    ptx, ptx_flops = None, 0.0
    if hp.ptx_coef > 0:
        b_ptx, l_ptx = int(config.data.ptx_batch_size), int(config.data.max_len)
        ptx_sh = NamedSharding(mesh, sharding._fit(P(None, sharding.BATCH_AXES, None),
                                                   (n_updates, b_ptx, l_ptx), mesh))
        ptx = {k: _sds((n_updates, b_ptx, l_ptx), dt, ptx_sh) for k, dt in
               (("tokens", jnp.int32), ("attn_mask", jnp.int32), ("loss_mask", jnp.float32))}
        ptx_flops = n_updates * train_flops(cfg_lm, b_ptx, l_ptx)
    mb = b // hp.minibatches
    update_flops = ptx_flops + n_updates * (train_flops(cfg_lm, mb, w, n)
                                            + train_flops(cfg_scalar, mb, w, n))
    score, update = ppo.jit_steps(models, hp, policy_opt, value_opt, _shardings(state))
    idx = _sds((n_updates, mb), jnp.int32, rep)
    update_args = (state, rollout, idx, packed(n_updates, mb), ptx, _sds((), jnp.float32, rep))
    return [
        Step("sample", sample, sample_args, sample_flops,
             resident - shard_bytes(policy.params), parts),
        Step("score", score, score_args, score_flops,
             resident - shard_bytes(score_args[:4]), parts),
        Step("update", update, update_args, update_flops,
             resident - shard_bytes(state), parts),
    ]


class _Bound:
    """`jitted.lower(*args, **static_kwargs)` with the kwargs bound."""

    def __init__(self, jitted, kwargs):
        self.jitted, self.kwargs = jitted, kwargs

    def lower(self, *args):
        return self.jitted.lower(*args, **self.kwargs)


# ---------------------------------------------------------------------------
# Compile and report
# ---------------------------------------------------------------------------

def compile_step(step: Step) -> dict:
    """Lowers and compiles one step; its per-device memory figures in bytes."""
    t0 = time.time()
    compiled = step.jitted.lower(*step.args).compile()
    seconds = time.time() - t0
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    r = {"step": step.name, "args": m.argument_size_in_bytes,
         "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
         "temp": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes,
         "total": total, "other": step.other_bytes, "peak": total + step.other_bytes,
         "flops": step.flops, "compile_s": round(seconds, 1)}
    if step.resident is not None:
        r["resident"] = dict(step.resident)
    return r


def stage_steps(config, runtime) -> list[Step]:
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.models import resolve
    stage = config.stage
    if stage in ("pretrain", "sft", "rm"):
        head = "scalar" if stage == "rm" else "lm"
        return supervised_steps(config, runtime, resolve.model_config_from(config.model, head=head))
    if stage == "ppo":
        return ppo_steps(config, runtime, resolve.model_config_from(config.model, head="lm"),
                         resolve.model_config_from(config.model, head="scalar"))
    raise ConfigError(f"aot: stage {stage!r} has no training step to compile "
                             f"(pretrain, sft, rm, ppo)")


def run(config, topo: Topology, devices=None, layers: int = 0, only=(),
        on_record=None) -> list[dict]:
    """Compiles each step of `config.stage` for `topo` (or on `devices`);
    one record per step: bytes per device, HBM, fits, FLOPs. `on_record(r)`
    is called as each step's compile ends."""
    from rlhf_jax.models.transformer import Transformer, count_params
    from rlhf_jax import sharding
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.models import resolve
    if config.model.get("pretrained"):
        raise ConfigError("aot compiles from shapes: use model.preset or the architecture "
                          "fields instead of model.pretrained")
    config = config.copy_and_resolve_references()
    model_name = config.model.get("preset") or "config"
    if layers:
        # Fewer layers than the preset, to measure within a host's limits.
        with config.unlocked():
            base = resolve.model_config_from(config.model)
            config.model.preset = ""
            for f in dataclasses.fields(base):
                if f.name in config.model:
                    config.model[f.name] = getattr(base, f.name)
            config.model.layers = int(layers)
    devices = topology_devices(topo) if devices is None else devices
    runtime = sharding.Runtime(config, devices)
    cfg = resolve.model_config_from(config.model)
    n_params = count_params(jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"],
        jax.random.PRNGKey(0)))
    header = {"topology": topo.name, "chips": len(devices), "device_kind": devices[0].device_kind,
              "hbm_gib": topo.hbm_gib, "stage": config.stage,
              "model": model_name, "layers": cfg.layers,
              "params": n_params, "mesh": dict(runtime.mesh.shape),
              "batch_size": int(config.train.batch_size),
              **lengths(config),
              "matmul": cfg.matmul, "activations": cfg.activations, "remat": cfg.remat,
              "jax": jax.__version__, "libtpu": libtpu_version(),
              "date": datetime.date.today().isoformat()}
    records = []
    # Abstract arguments outside the mesh context (under it, even an eager
    # PRNGKey would be placed on the compile-only devices); lowering inside
    # it, as the stages do, so the models' activation constraints apply.
    steps = [s for s in stage_steps(config, runtime) if not only or s.name in only]
    for step in steps:
        with runtime.activations():
            r = dict(header, **compile_step(step))
            r["fits"] = r["peak"] <= topo.hbm_gib * GiB
            records.append(r)
        if on_record is not None:
            on_record(r)
    return records


def lengths(config) -> dict:
    """The compiled sequence lengths (and PPO's minibatching) for the records."""
    if config.stage == "ppo":
        r = {"prompt_len": int(config.data.max_prompt_len),
             "response_len": int(config.sampling.max_new_tokens),
             "minibatches": int(config.algo.minibatches), "epochs": int(config.algo.epochs)}
        if float(config.algo.ptx_coef) > 0:
            r.update(ptx_batch_size=int(config.data.ptx_batch_size),
                     ptx_len=int(config.data.max_len))
        return r
    return {"max_len": int(config.data.max_len)}


def _main(argv):
    del argv
    from rlhf_jax import aot_report, console, errors
    console.configure(_VERBOSE.value)       # absl and Python logging: warnings and up
    if _TABLE_FROM.value:
        with open(_TABLE_FROM.value) as f:
            print(aot_report.markdown_table([json.loads(line) for line in f if line.strip()]))
        return
    if _CONFIG.value is None or not _TOPOLOGY.value:
        sys.stderr.write("rlhf_jax.aot: error: --config and --topology are required\n")
        sys.exit(2)
    with errors.reported():
        try:
            topo = topology(_TOPOLOGY.value)
            with stderr_held(_VERBOSE.value):       # libtpu's start-up lines
                devices = topology_devices(topo)
        except (ValueError, RuntimeError) as e:     # unknown slice; no libtpu
            sys.stderr.write(f"rlhf_jax.aot: error: {e}\n")
            sys.exit(2)
        with stderr_held(_VERBOSE.value):
            records = run(_CONFIG.value, topo, devices, layers=_LAYERS.value,
                          only=tuple(s for s in _STEPS.value.split(",") if s),
                          on_record=lambda r: print(aot_report.verdict(r), flush=True))
        print(aot_report.format_report(records), flush=True)
        if _JSON.value:
            with open(_JSON.value, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    for _arg in sys.argv:   # configs import `configs.base`, as in rlhf_jax.main
        if _arg.startswith("--config="):
            sys.path.insert(0, os.path.dirname(os.path.dirname(
                os.path.abspath(_arg.split("=", 1)[1].split(":")[0]))))
    from absl import app, flags
    from ml_collections import config_flags
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:variant].",
                                              lock_config=True)
    _TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice, e.g. v5e-16, v5p-128, v4-8.")
    _LAYERS = flags.DEFINE_integer("layers", 0, "Compile with this many layers instead of the "
                                   "model's (when a host cannot compile the full depth; the "
                                   "table's extrapolation from two depths is a lower bound).")
    _STEPS = flags.DEFINE_string("steps", "", "Comma-separated steps to compile (default all).")
    _JSON = flags.DEFINE_string("json", "", "Append one JSON record per step to this file.")
    _TABLE_FROM = flags.DEFINE_string("table_from", "", "Print README's markdown table from a "
                                      "--json file and exit.")
    _VERBOSE = flags.DEFINE_bool("verbose", False, "Show libtpu's start-up lines and the "
                                 "libraries' logging and warnings; by default the console is "
                                 "the verdicts and the table only.")
    app.run(_main)
