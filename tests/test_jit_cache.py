"""rlhf_jax.jit_cache: one jitted function per function, static arguments and
jit options, so a second run of a stage in a process traces nothing again."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import load_config, micro_model, world_demos
from rlhf_jax import jit_cache, stages, train_state
from rlhf_jax.stages import sft


def _scaled(x, *, factor, hp):
    return x * factor + hp.shift


def test_equal_statics_and_options_give_the_same_function():
    hp = ml_collections.FrozenConfigDict(dict(shift=1.0))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    rows = NamedSharding(mesh, P("data"))
    f = jit_cache.jit_partial(_scaled, dict(factor=2.0, hp=hp), in_shardings=(rows,),
                              donate_argnums=())
    same = jit_cache.jit_partial(_scaled, dict(hp=ml_collections.FrozenConfigDict(dict(shift=1.0)),
                                               factor=2.0), in_shardings=(rows,), donate_argnums=())
    assert same is f
    x = jnp.arange(8.0)
    np.testing.assert_array_equal(f(x), x * 2.0 + 1.0)
    # Another static value, other options, other logical rules: other functions.
    assert jit_cache.jit_partial(_scaled, dict(factor=3.0, hp=hp), in_shardings=(rows,),
                                 donate_argnums=()) is not f
    assert jit_cache.jit_partial(_scaled, dict(factor=2.0, hp=hp), donate_argnums=()) is not f
    with nn.logical_axis_rules((("batch", "data"),)):
        assert jit_cache.jit_partial(_scaled, dict(factor=2.0, hp=hp), in_shardings=(rows,),
                                     donate_argnums=()) is not f
    # An unhashable static argument: a fresh function each time, still right.
    def add(x, *, table):
        return x + table["a"]
    h = jit_cache.jit_partial(add, dict(table={"a": 1.0}))
    assert h is not jit_cache.jit_partial(add, dict(table={"a": 1.0}))
    np.testing.assert_array_equal(h(x), x + 1.0)


def test_equal_schedules_make_one_optimizer():
    t = load_config("sft", "tiny").train
    assert train_state.make_optimizer(t) is train_state.make_optimizer(t.copy_and_resolve_references())
    assert train_state.make_optimizer(train_state.with_steps(t, int(t.steps) + 1)) is not \
        train_state.make_optimizer(t)


def test_a_second_run_of_a_stage_traces_its_steps_no_more(tmp_path, monkeypatch):
    """Two SFT runs of one config in one process: the train and eval steps are
    traced by the first only, and both end with the same parameters."""
    from rlhf_jax import checkpoint
    cfg = micro_model(load_config("sft", "tiny"))
    cfg.data.path = world_demos(tmp_path / "demos.jsonl", n=32)
    cfg.data.data_dir = str(tmp_path / "tfds")
    cfg.train.update(dict(steps=2, batch_size=8, checkpoint_every=2, eval_every=2, eval_batches=1,
                          lr=1.234e-3))      # a schedule no other test builds
    traced = {"train": 0, "eval": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            traced[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(sft, "train_step", counting("train", sft.train_step))
    monkeypatch.setattr(sft, "eval_step", counting("eval", sft.eval_step))
    stages.run(cfg, str(tmp_path / "a"))
    assert traced == {"train": 1, "eval": 1}
    stages.run(cfg, str(tmp_path / "b"))
    assert traced == {"train": 1, "eval": 1}
    a = checkpoint.load_saved_params(str(tmp_path / "a"))
    b = checkpoint.load_saved_params(str(tmp_path / "b"))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    # After clear() (code changed in a running process) the steps are traced again.
    jit_cache.clear()
    stages.run(cfg, str(tmp_path / "c"))
    assert traced == {"train": 2, "eval": 2}
