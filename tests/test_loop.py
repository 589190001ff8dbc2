"""The host loop every training stage runs (rlhf_jax/loop.py), on a stand-in
step: metrics are read one step late, a resumed run continues from its
checkpoint, and a finished run restored again does not step."""
import jax
import jax.numpy as jnp
import ml_collections

from helpers import assert_trees_equal
from rlhf_jax import loop, train_state


def _train(**kw):
    t = ml_collections.ConfigDict(dict(steps=5, log_every=1, eval_every=100, checkpoint_every=2,
                                       keep_checkpoints=2, max_nonfinite_steps=3))
    t.update(kw)
    return t


def _state():
    return train_state.TrainState(step=jnp.int32(0), params={"w": jnp.zeros(3)},
                                  opt_state={"m": jnp.zeros(3)}, rng=jax.random.PRNGKey(0),
                                  nonfinite=jnp.int32(0))


def _loop(workdir, events, **train):
    def step_fn(state, step):
        events.append(("dispatch", step + 1))
        w = state.params["w"] * 0.5 + step
        return (state.replace(step=state.step + 1, params={"w": w}),
                {"loss": w.sum(), "nonfinite": jnp.int32(0)})

    def host_metrics(step, metrics, seconds):
        events.append(("read", step))
        return {"seen": float(step)}

    state = _state()
    return loop.Loop(stage="toy", train=_train(**train), workdir=workdir, state=state,
                     state_shardings=jax.tree_util.tree_map(lambda x: x.sharding, state),
                     step_fn=step_fn, meta={}, host_metrics=host_metrics)


def test_metrics_are_read_one_step_late(tmp_path):
    events = []
    loop.run(_loop(str(tmp_path), events))
    order = [e for e in events]
    # Step s's metrics are read after step s + 1 is dispatched (the last at the end).
    for s in range(1, 5):
        assert order.index(("dispatch", s + 1)) < order.index(("read", s)), order
    assert order[-1] == ("read", 5) and len([e for e in order if e[0] == "read"]) == 5


def test_resume_continues_from_the_checkpoint_and_a_finished_run_does_not_step(tmp_path):
    full = loop.run(_loop(str(tmp_path / "full"), []))
    # A run of 3 steps (checkpoints at 2 and 3), then the same workdir with 5.
    loop.run(_loop(str(tmp_path / "resumed"), [], steps=3))
    events = []
    resumed = loop.run(_loop(str(tmp_path / "resumed"), events))
    assert [e for e in events if e[0] == "dispatch"] == [("dispatch", 4), ("dispatch", 5)]
    assert_trees_equal(full, resumed)
    events = []
    again = loop.run(_loop(str(tmp_path / "resumed"), events))
    assert events == [] and int(again.step) == 5
