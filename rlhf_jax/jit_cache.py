"""Jitted step functions kept for the process, per function and static arguments.

A stage builds its steps as `jax.jit(functools.partial(step, model=...,
optimizer=..., hp=...), in_shardings=...)`. A new partial is a new function to
`jax.jit`, so a second run of the same config in one process (a sweep's
pipelines in `demo_quality`, a run resumed in a notebook or a test) traced,
lowered and compiled every step again; the persistent compilation cache
only saves the last of the three. `jit_partial` returns the same jitted
function for the same function, static arguments and jit options, so the
second run calls what the first traced.

Static arguments must compare by value: models (flax Modules compare by their
config), FrozenConfigDicts, numbers, and optimizers from
`train_state.make_optimizer` (made once per schedule). An unhashable one
makes a fresh jitted function, as before.

Like any jitted function, a kept one runs the code it traced: after changing
a step's code (or a function it calls) in a running process, a notebook say,
call `clear()`, which also forgets the models' traced `init`
(`sharding.abstract_params`, the sharded init).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax


def _key(value):
    """A hashable stand-in for a jit option (a pytree of shardings, None where
    unset; donated argument numbers)."""
    leaves, treedef = jax.tree_util.tree_flatten(value)
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=64)
def _cached(fn, static: tuple, options: tuple, rules: tuple):
    kwargs = {name: jax.tree_util.tree_unflatten(treedef, leaves)
              for name, (treedef, leaves) in options}
    return jax.jit(functools.partial(fn, **dict(static)), **kwargs)


def jit_partial(fn, static: dict, **jit_options):
    """`jax.jit(functools.partial(fn, **static), **jit_options)`, the same
    object whenever `fn`, `static` and the options are equal."""
    options = tuple((name, _key(value)) for name, value in sorted(jit_options.items()))
    # flax's logical axis rules shape the trace but are not part of jit's own
    # cache key: a function traced under other rules is another function.
    rules = tuple(nn.get_logical_axis_rules())
    try:
        return _cached(fn, tuple(sorted(static.items())), options, rules)
    except TypeError:              # an unhashable static argument
        return jax.jit(functools.partial(fn, **static), **jit_options)


def clear():
    """Forgets every kept function (and the traced model inits)."""
    from rlhf_jax import sharding
    _cached.cache_clear()
    sharding.abstract_params.cache_clear()
    sharding._sharded_init_fn.cache_clear()
