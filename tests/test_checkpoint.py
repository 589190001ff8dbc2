"""Damaged checkpoints (rlhf_jax/checkpoint.py): each kind of file of the latest
step truncated, deleted or garbled either restores exactly as saved or is moved
aside to `corrupt-<step>` and the step before is restored exactly; never a
wrong value, never a traceback. A training run resumed after that fallback
ends bit-identical to an uninterrupted one."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_equal, load_config, micro_model, run_interrupted, world_demos
from rlhf_jax import checkpoint, stages
from rlhf_jax.errors import ConfigError
from rlhf_jax.stages.instructgpt import override


def _tree(k):
    params = {"w": jnp.arange(12.0).reshape(3, 4) * k, "b": jnp.ones(5) * k}
    train = {"step": jnp.int32(k), "mu": {"w": jnp.full((3, 4), float(k))}}
    return params, train


def _like(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with steps 1 and 2, and the names of step 2's files."""
    workdir = str(tmp_path_factory.mktemp("ckpt") / "w")
    ckpt = checkpoint.Checkpointer(workdir, 1, keep=3)
    for step in (1, 2):
        ckpt.save(step, *_tree(step), {"step": step})
    ckpt.close()
    step2 = os.path.join(workdir, checkpoint.CHECKPOINTS, "2")
    files = sorted(os.path.relpath(os.path.join(root, f), step2)
                   for root, _, names in os.walk(step2) for f in names)
    assert any(f.startswith("params/") for f in files) and "meta/metadata" in files
    # One file of each kind: `train` holds the kinds `params` does, and the
    # chunk files of a `d/` directory are alike.
    kinds = {}
    for f in files:
        if f.startswith("train/"):
            continue
        kinds.setdefault(os.path.dirname(f) if os.path.basename(os.path.dirname(f)) == "d" else f, f)
    return workdir, sorted(kinds.values())


def _damage(path, how):
    if how == "delete":
        os.remove(path)
        return
    data = open(path, "rb").read()
    if how == "truncate":
        data = data[:len(data) // 2]
    else:   # garble: flip every bit of the middle third
        a, b = len(data) // 3, max(2 * len(data) // 3, len(data) // 3 + 1)
        data = data[:a] + bytes(x ^ 0xFF for x in data[a:b]) + data[b:]
    open(path, "wb").write(data)


@pytest.mark.parametrize("how", ["truncate", "delete", "garble"])
def test_a_damaged_latest_step_restores_exactly_or_falls_back(saved, tmp_path, how, capsys):
    template, files = saved
    outcomes = {}
    for name in files:
        workdir = str(tmp_path / f"{how}-{name.replace('/', '_')}")
        shutil.copytree(template, workdir)
        _damage(os.path.join(workdir, checkpoint.CHECKPOINTS, "2", name), how)
        ckpt = checkpoint.Checkpointer(workdir, 1, keep=3)
        found = ckpt.restore_latest(*map(_like, _tree(0)))
        ckpt.close()
        step, params, train, _ = found
        assert step in (1, 2), name
        # Exactly what was saved at that step: never a silently wrong value.
        assert_trees_equal((params, train), _tree(step))
        corrupt = os.path.join(workdir, checkpoint.CHECKPOINTS, "corrupt-2")
        assert os.path.isdir(corrupt) == (step == 1), name
        outcomes[name] = step
    err = capsys.readouterr().err
    assert "Traceback" not in err
    fell_back = [n for n, s in outcomes.items() if s == 1]
    # Every array's data and the meta (which holds the checksums) are needed.
    assert any(n.startswith("params/") and "/d/" in n for n in fell_back), outcomes
    assert "meta/metadata" in fell_back, outcomes
    assert err.count("warning: checkpoint") == len(fell_back)
    assert all("moved it to" in line for line in err.splitlines() if "warning" in line), err


def test_a_garbled_chunk_that_reads_back_is_caught_by_its_checksum(saved, tmp_path):
    """Values changed inside the stored arrays: Orbax reads them without
    complaint; the checksum in meta does not match."""
    template, _ = saved
    workdir = str(tmp_path / "w")
    shutil.copytree(template, workdir)
    step2 = os.path.join(workdir, checkpoint.CHECKPOINTS, "2")
    ckpt = checkpoint.Checkpointer(workdir, 1, keep=3)
    # Rewrite step 2's params with other values, keeping its meta (checksums).
    params, train = _tree(2)
    ckpt.restore(2, *map(_like, _tree(0)))
    shutil.rmtree(os.path.join(step2, "params"))
    other = checkpoint.Checkpointer(str(tmp_path / "other"), 1, keep=1)
    other.save(2, jax.tree_util.tree_map(lambda x: x + 1, params), train, {"step": 2})
    other.close()
    shutil.copytree(os.path.join(str(tmp_path / "other"), checkpoint.CHECKPOINTS, "2", "params"),
                    os.path.join(step2, "params"))
    ckpt.manager.reload()
    step, params_got, _, _ = ckpt.restore_latest(*map(_like, _tree(0)))
    ckpt.close()
    assert step == 1 and os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINTS, "corrupt-2"))
    assert_trees_equal(params_got, _tree(1)[0])


def test_every_step_damaged_stops_in_one_line_and_other_shapes_are_not_damage(saved, tmp_path):
    template, _ = saved
    workdir = str(tmp_path / "w")
    shutil.copytree(template, workdir)
    ckpt = checkpoint.Checkpointer(workdir, 1, keep=3)
    with pytest.raises(ConfigError, match="other settings"):
        ckpt.restore_latest(_like({"w": jnp.zeros((3, 5)), "b": jnp.zeros(5)}), _like(_tree(0)[1]))
    assert sorted(os.listdir(os.path.join(workdir, checkpoint.CHECKPOINTS))) == ["1", "2"]
    for step in ("1", "2"):
        os.remove(os.path.join(workdir, checkpoint.CHECKPOINTS, step, "meta", "metadata"))
    with pytest.raises(ConfigError, match="no checkpoint reads back") as e:
        ckpt.restore_latest(*map(_like, _tree(0)))
    ckpt.close()
    assert "\n" not in str(e.value) and "corrupt-1" in str(e.value)
    assert np.array_equal(sorted(os.listdir(os.path.join(workdir, checkpoint.CHECKPOINTS))),
                          ["corrupt-1", "corrupt-2"])


def test_a_run_resumed_past_a_damaged_checkpoint_ends_bit_identical(tmp_path, monkeypatch):
    demos = world_demos(tmp_path / "demos.jsonl", n=128)
    cfg = micro_model(load_config("sft", "tiny"))
    cfg = override(cfg, **{"data.path": demos, "data.data_dir": str(tmp_path / "tfds"),
                           "train.steps": 8, "train.batch_size": 8, "train.warmup_steps": 1,
                           "train.eval_every": 100, "train.eval_batches": 1,
                           "train.checkpoint_every": 2, "train.log_every": 2,
                           "train.keep_checkpoints": 3})
    stages.run(cfg, str(tmp_path / "full"))
    # Killed before step 7: checkpoints at 2, 4 and 6; step 6's arrays then garbled.
    resumed = str(tmp_path / "resumed")
    run_interrupted(monkeypatch, cfg, resumed, step=6)
    step6 = os.path.join(resumed, checkpoint.CHECKPOINTS, "6")
    for root, _, names in os.walk(os.path.join(step6, "params")):
        for name in names:
            if os.path.basename(root) == "d":
                _damage(os.path.join(root, name), "garble")
    stages.run(cfg, resumed)
    assert os.path.isdir(os.path.join(resumed, checkpoint.CHECKPOINTS, "corrupt-6"))
    assert_trees_equal(checkpoint.load_saved_params(str(tmp_path / "full")),
                       checkpoint.load_saved_params(resumed))


def test_a_damaged_init_from_is_moved_aside_and_its_pipeline_stage_runs_again(saved, tmp_path, capsys):
    """A later stage reading a damaged checkpoint stops in one line; the
    pipeline's marker for the stage that wrote it then no longer holds, so
    rerunning the pipeline resumes that stage from its previous checkpoint."""
    from rlhf_jax.stages import instructgpt
    template, _ = saved
    pipeline = tmp_path / "pipeline"
    stage_dir = str(pipeline / "sft")
    shutil.copytree(template, stage_dir)
    os.makedirs(pipeline / ".done")
    instructgpt.mark_done(str(pipeline), "sft", stage_dir)
    assert open(pipeline / ".done" / "sft").read() == "2"
    assert instructgpt.finished(str(pipeline), "sft", stage_dir)
    assert_trees_equal(checkpoint.load_params(stage_dir, _like(_tree(0)[0])), _tree(2)[0])

    for root, _, names in os.walk(os.path.join(stage_dir, checkpoint.CHECKPOINTS, "2", "params")):
        for name in names:
            if os.path.basename(root) == "d":
                _damage(os.path.join(root, name), "garble")
    with pytest.raises(ConfigError, match=r"checkpoint .*/2 is damaged .* moved it to .*corrupt-2") as e:
        checkpoint.load_params(stage_dir, _like(_tree(0)[0]))
    assert "\n" not in str(e.value)
    # The step before is now the stage's latest; the marker is stale and goes.
    assert checkpoint.resolve(stage_dir)[1] == 1
    assert not instructgpt.finished(str(pipeline), "sft", stage_dir)
    assert not os.path.exists(pipeline / ".done" / "sft")
    assert "final checkpoint 2 is gone" in capsys.readouterr().out


def test_restore_target_traces_init_once_per_model_config(monkeypatch):
    """The abstract params a checkpoint restores into (sharding.abstract_params)
    are those eval_shape gives, traced once per model config: a second model
    with the same config reuses them, another config traces its own; so is
    the jitted random init."""
    import flax.linen as nn
    from rlhf_jax import sharding
    from rlhf_jax.models.transformer import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=48, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32,
                      max_len=16)
    traced = []
    init = Transformer.init
    monkeypatch.setattr(Transformer, "init", lambda self, *a, **k: traced.append(self.cfg)
                        or init(self, *a, **k))
    runtime = sharding.Runtime(load_config("sft", "tiny"))
    sharding.abstract_params.cache_clear()
    like, shardings = checkpoint.restore_target(Transformer(cfg), runtime)
    checkpoint.restore_target(Transformer(cfg), runtime)
    assert traced == [cfg]
    other = cfg.replace(layers=3)
    checkpoint.restore_target(Transformer(other), runtime)
    assert traced == [cfg, other]
    # Random init (a new head, a model from scratch): traced once per model too.
    sharding._sharded_init_fn.cache_clear()
    first, _ = runtime.init_params(Transformer(cfg), jax.random.PRNGKey(3))
    again, _ = runtime.init_params(Transformer(cfg), jax.random.PRNGKey(3))
    assert traced == [cfg, other, cfg]
    assert_trees_equal(first, again)
    monkeypatch.undo()
    fresh = jax.eval_shape(lambda r: nn.unbox(Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32))
                                              ["params"]), jax.random.PRNGKey(1))
    assert jax.tree_util.tree_structure(like) == jax.tree_util.tree_structure(fresh)
    for a, b, s in zip(jax.tree_util.tree_leaves(like), jax.tree_util.tree_leaves(fresh),
                       jax.tree_util.tree_leaves(shardings)):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, s)
