"""Mesh, logical axis rules, and sharded initialisation.

Parameters and activations carry logical axis names (models/transformer.py);
a config's `mesh` (sizes of the `data`, `fsdp` and `tensor` axes) and its
logical rules map those names onto devices. Parameters are never
materialised on one device: `jax.eval_shape(init)` gives their shapes and
logical names, from which we derive shardings, and `jax.jit(init,
out_shardings=...)` creates each shard where it lives.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameters: FSDP shards the embed dimension, tensor parallelism the heads,
# the MLP and the vocabulary. Activations: the batch over data x fsdp, the
# head / mlp / vocab dimensions over tensor. Names prefixed act_ and cache_
# are activations, so that a parameter rule never applies to them by accident.
DEFAULT_RULES: tuple = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one size may be -1 (the rest of the devices)."""
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh: {n_devices} devices do not divide by {known} "
                             f"({dict(zip(MESH_AXES, sizes))})")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {n_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_cfg=None, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. With no -1 axis, a mesh smaller than the
    available devices uses the first ones (e.g. 1 device of 8 in tests)."""
    devices = list(devices if devices is not None else jax.devices())
    mesh_cfg = mesh_cfg or {"data": -1}
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    if -1 not in sizes and math.prod(sizes) < len(devices):
        devices = devices[:math.prod(sizes)]
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from_config(config) -> tuple:
    rules = config.get("logical_axis_rules") if hasattr(config, "get") else None
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (e.g. 3 kv heads on
    tensor=2): that dimension is replicated instead of failing."""
    out = []
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (ax,) if isinstance(ax, str) else tuple(ax or ())
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def strip_boxes(tree):
    """The values of a tree of nn.Partitioned boxes, without the sharding
    constraint that `nn.unbox` applies under an active mesh."""
    return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_shardings(abstract_boxed, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (boxed, abstract) params from eval_shape."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = strip_boxes(abstract_boxed)
    return jax.tree_util.tree_map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, shapes,
        is_leaf=lambda x: isinstance(x, P))


@functools.lru_cache(maxsize=16)
def abstract_params(model) -> Any:
    """`model`'s params as `init` would make them (boxed with their logical
    axes; shapes and dtypes only), from `jax.eval_shape`, kept per model (a
    flax Module compares by its config): tracing a scanned model's init takes
    about as long as compiling a small step, and a stage asks for it once per
    checkpoint it reads or model it initialises. The tree is shared: read it,
    do not change it."""
    return jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                          jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=16)
def _sharded_init_fn(model, mesh: Mesh, rules, seq_len: int):
    """(jitted rng -> `model`'s unboxed params, created in their shardings;
    the shardings), kept per model and mesh so that a second run in this
    process calls the traced function again instead of tracing init anew."""
    shardings = logical_shardings(abstract_params(model), mesh, rules)
    example = jnp.zeros((1, seq_len), jnp.int32)
    init = jax.jit(lambda r: nn.unbox(model.init(r, example)["params"]), out_shardings=shardings)
    return init, shardings


def sharded_init(model, mesh: Mesh, rules, rng, seq_len: int = 8):
    """`model.init`'s params with every leaf created directly in its sharding.
    Returns (unboxed params, their shardings)."""
    init, shardings = _sharded_init_fn(model, mesh, rules, seq_len)
    with activation_sharding(mesh, rules):
        return init(rng), shardings


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """Context under which the models' logical activation constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def to_global_batch(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch -> global jax arrays sharded over the batch axes.

    In a multi-process run each process holds its own rows (its data shard).
    """
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


def batch_devices(mesh: Mesh) -> int:
    """How many ways a batch is split: data x fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size"):
    """A batch must split evenly over the batch devices (data x fsdp)."""
    n = batch_devices(mesh)
    if batch_size % n:
        raise ConfigError(f"{what}={batch_size} must be divisible by the mesh's "
                          f"data x fsdp = {n}")


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded down to a multiple of the batch devices (at least one row each)."""
    n = batch_devices(mesh)
    return max(n, batch_size - batch_size % n)


def abstract_like(tree, shardings):
    """`tree`'s shapes and dtypes as ShapeDtypeStructs placed by `shardings` (a
    matching tree): what a checkpoint restores into, or a compile lowers for."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  tree, shardings)


class Runtime:
    """Mesh, logical rules and the step functions' shardings for one stage."""

    def __init__(self, config, devices=None):
        """`devices`: default jax.devices(); rlhf_jax.aot passes a TPU
        topology's compile-only devices."""
        try:
            self.mesh = make_mesh(config.mesh, devices)
        except ValueError as e:  # e.g. more mesh devices than there are: a config error
            raise ConfigError(f"{e} (set mesh.data/fsdp/tensor)") from None
        self.rules = rules_from_config(config)

    def activations(self):
        return activation_sharding(self.mesh, self.rules)

    def init_params(self, model, rng, seq_len: int = 8):
        return sharded_init(model, self.mesh, self.rules, rng, seq_len)

    def global_batch(self, batch: dict) -> dict:
        return to_global_batch(batch, self.mesh)

    def replicated(self):
        return replicated(self.mesh)

    def round_batch(self, batch_size: int) -> int:
        return round_batch(batch_size, self.mesh)
