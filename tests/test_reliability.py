"""Reliability: preemption, exact resume after SIGTERM and SIGKILL (also in
the middle of a checkpoint save), the non-finite guard, and config errors
reported in one line before anything compiles.

The CLI tests run `python -m rlhf_jax.main` (or a thin wrapper around it that
slows steps or holds one checkpoint's commit) on one CPU device. They share a
persistent XLA compilation cache, so only the first run pays for compiling;
a loaded executable is the compiled one, so bit-identity is unaffected.
The PPO loop's preemption and guard are tested in-process with stand-ins for
its models (its exact resume on real models is in test_ppo.py).
"""
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (ROOT, assert_trees_equal, cli_xla_flags, load_config, reward_model_from,
                     world_demos)
from rlhf_jax import checkpoint, errors
from rlhf_jax.metrics import read_metrics

STEPS, EVERY = 200, 25          # SFT steps of every CLI run here, checkpoint interval
MICRO = ["--config.model.hidden=32", "--config.model.layers=1", "--config.model.heads=2",
         "--config.model.kv_heads=1", "--config.model.intermediate=64", "--config.data.max_len=96"]

# Runs rlhf_jax.main with optional test hooks (environment variables):
# RELIABILITY_STEP_SLEEP seconds before each batch, so a kill lands near a
# chosen step; RELIABILITY_POISON_STEPS=3,5 puts a token id far beyond the
# vocabulary into those (1-based) steps' batches, which makes the embedding
# lookup, so the loss and the gradients, NaN (same shapes and dtypes as a
# clean batch: the cached executable is reused); RELIABILITY_HOLD_SAVE=<step>
# holds that checkpoint's final commit (the atomic rename of its tmp
# directory) until the process dies, after writing the tmp path to
# RELIABILITY_HOLD_MARKER.
WRAPPER = r'''
import asyncio, os, runpy, sys, time
sys.path.insert(0, os.getcwd())
sleep = float(os.environ.get("RELIABILITY_STEP_SLEEP", "0"))
poison = {int(s) for s in os.environ.get("RELIABILITY_POISON_STEPS", "").split(",") if s}
if sleep or poison:
    from rlhf_jax.data import pipeline
    _batch = pipeline.BatchLoader.batch
    def batch(self, step):
        time.sleep(sleep)
        b = _batch(self, step)
        if step + 1 in poison:
            b = dict(b, tokens=b["tokens"].copy())
            b["tokens"][:, 1] = 1 << 30
        return b
    pipeline.BatchLoader.batch = batch
hold = os.environ.get("RELIABILITY_HOLD_SAVE")
if hold:
    from orbax.checkpoint._src.path import atomicity
    _finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
        if self.get_final().name == hold:
            with open(os.environ["RELIABILITY_HOLD_MARKER"], "w") as f:
                f.write(str(self.get()))
            await asyncio.sleep(3600)
        return await _finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv[0] = "rlhf_jax.main"
runpy.run_module("rlhf_jax.main", run_name="__main__", alter_sys=True)
'''


# ---------------------------------------------------------------------------
# CLI plumbing
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Cli:
    tmp: str
    data: str
    tfds: str
    cache: str
    wrapper: str
    stubs: str
    reference: str = ""

    def env(self, **extra):
        env = dict(os.environ, RLHF_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu",
                   JAX_COMPILATION_CACHE_DIR=self.cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                   PYTHONPATH=os.pathsep.join(p for p in (self.stubs, os.environ.get("PYTHONPATH"))
                                              if p))
        env["XLA_FLAGS"] = cli_xla_flags()       # one CPU device
        env.update(extra)
        return env

    def sft_args(self, workdir):
        return ["--config", os.path.join(ROOT, "configs/sft.py:tiny"), "--workdir", workdir,
                f"--config.data.path={self.data}", f"--config.data.data_dir={self.tfds}", *MICRO,
                f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
                "--config.train.log_every=1", "--config.train.eval_every=100000",
                "--config.train.eval_batches=0"]

    def start(self, args, name, wrapped=False, **env):
        out = open(os.path.join(self.tmp, f"{name}.out"), "w")
        err = open(os.path.join(self.tmp, f"{name}.err"), "w")
        cmd = [sys.executable, self.wrapper] if wrapped else [sys.executable, "-m", "rlhf_jax.main"]
        proc = subprocess.Popen(cmd + list(args), cwd=ROOT, env=self.env(**env), stdout=out,
                                stderr=err)
        proc.logs = (out.name, err.name)
        out.close(), err.close()
        return proc

    def run(self, args, name, wrapped=False, **env):
        proc = self.start(args, name, wrapped, **env)
        proc.wait(timeout=300)
        return proc


def output(proc) -> str:
    return "".join(open(p).read() for p in proc.logs)


def stderr_of(proc) -> str:
    return open(proc.logs[1]).read()


def wait_for(predicate, proc, what, timeout=240.0):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"process exited (rc={proc.returncode}) before {what}:\n{output(proc)[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{output(proc)[-3000:]}")
        time.sleep(0.005)


def last_step(workdir, offset=0) -> int:
    """The last training step in metrics.jsonl after byte `offset` (0 if none)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:           # a line being written
            continue
        if "sft/loss" in row:
            return row["step"]
    return 0


def metrics_size(workdir) -> int:
    try:
        return os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
    except FileNotFoundError:
        return 0


def checkpoint_dirs(workdir):
    """(complete steps, temporary directories) under workdir/checkpoints."""
    d = os.path.join(workdir, checkpoint.CHECKPOINTS)
    names = os.listdir(d) if os.path.isdir(d) else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "tmp" in n)


def train_steps(workdir):
    return [r["step"] for r in read_metrics(workdir, "sft") if "sft/loss" in r]


def _restore(path):
    """Every array of one checkpoint item directory, as a flat {path: array} dict."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as c:
        meta = c.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        like = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
            tree)
        restored = c.restore(path, like)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def saved_state(workdir, step=None):
    """Params and train state (optimizer, step, rng, counters) of a checkpoint."""
    directory, latest = checkpoint.resolve(workdir)
    step = latest if step is None else step
    return {item + k: v for item in ("params", "train")
            for k, v in _restore(os.path.join(directory, str(step), item)).items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Demonstrations, a shared compilation cache, and the uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("reliability")
    wrapper = tmp / "wrapped_main.py"
    wrapper.write_text(WRAPPER)
    # TensorBoard events are optional (metrics.py) and not under test here;
    # tensorboardX imports torch, 2-3 s of every subprocess on a busy CPU.
    (tmp / "stubs" / "tensorboardX").mkdir(parents=True)
    (tmp / "stubs" / "tensorboardX" / "__init__.py").write_text(
        'raise ImportError("tensorboardX is left out of these test subprocesses")\n')
    c = Cli(tmp=str(tmp), data=world_demos(tmp / "demos.jsonl", n=128), tfds=str(tmp / "tfds"),
            cache=str(tmp / "xla_cache"), wrapper=str(wrapper), stubs=str(tmp / "stubs"))
    ref = str(tmp / "reference")
    proc = c.run(c.sft_args(ref), "reference")
    assert proc.returncode == 0, output(proc)[-3000:]
    assert checkpoint_dirs(ref)[0][-1] == STEPS
    c.reference = ref
    return c


# ---------------------------------------------------------------------------
# 1. SIGTERM: checkpoint at the next step boundary, exit 0, exact resume
# ---------------------------------------------------------------------------

def test_sigterm_checkpoints_exits_zero_and_resumes_bit_identically(cli):
    wd = os.path.join(cli.tmp, "sigterm")
    proc = cli.start(cli.sft_args(wd), "sigterm")
    wait_for(lambda: last_step(wd) >= 3, proc, "training progress")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, output(proc)[-3000:]
    out = output(proc)
    assert "Traceback" not in out
    m = re.search(r"\[sft\] preempted: checkpoint saved at step (\d+)", out)
    assert m, out[-3000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < STEPS
    complete, tmp = checkpoint_dirs(wd)
    assert complete[-1] == stopped and not tmp
    # Nothing logged is lost: every step up to the preempted one has its row.
    assert train_steps(wd) == list(range(1, stopped + 1))

    again = cli.run(cli.sft_args(wd), "sigterm_resume")
    assert again.returncode == 0, output(again)[-3000:]
    assert f"[sft] resuming from step {stopped} " in output(again)
    assert train_steps(wd) == list(range(1, STEPS + 1))
    assert_same_state(saved_state(cli.reference), saved_state(wd))


# ---------------------------------------------------------------------------
# 2. SIGKILL at seeded moments, one in the middle of a checkpoint save
# ---------------------------------------------------------------------------

def test_sigkill_at_seeded_moments_resumes_from_last_complete_checkpoint(cli):
    rng = random.Random(1729)
    wd = os.path.join(cli.tmp, "sigkill")
    args = cli.sft_args(wd)
    slow = dict(RELIABILITY_STEP_SLEEP="0.02")

    def kill_at_step(name, step, **env):
        """Runs until metrics show `step` (a few ms more, seeded), then SIGKILL."""
        offset = metrics_size(wd)
        proc = cli.start(args, name, wrapped=True, **slow, **env)
        wait_for(lambda: last_step(wd, offset) >= step, proc, f"step {step}")
        time.sleep(rng.uniform(0.0, 0.03))
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
        return proc

    def resumed_from(proc):
        m = re.search(r"\[sft\] resuming from step (\d+) ", output(proc))
        return int(m.group(1)) if m else 0

    # Moment 1: a seeded step, wherever in the step or save it lands.
    kill_at_step("kill1", rng.randint(30, 70))
    complete, _ = checkpoint_dirs(wd)
    last_complete = complete[-1] if complete else 0
    assert all(s % EVERY == 0 for s in complete)

    # Moment 2: inside the save of a seeded checkpoint, after its data is
    # written and before Orbax commits it.
    held = rng.choice([100, 125, 150])
    marker = os.path.join(cli.tmp, "held_save")
    proc = cli.start(args, "kill2", wrapped=True, **slow, RELIABILITY_HOLD_SAVE=str(held),
                     RELIABILITY_HOLD_MARKER=marker)
    wait_for(lambda: os.path.exists(marker), proc, f"the save of step {held}")
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert resumed_from(proc) == last_complete
    complete, tmp = checkpoint_dirs(wd)
    assert held not in complete and any(t.startswith(f"{held}.") for t in tmp), (complete, tmp)
    assert complete[-1] == held - EVERY     # Orbax finishes one save before starting the next
    last_complete = complete[-1]

    # Moment 3: a seeded step after the half-written checkpoint.
    proc = kill_at_step("kill3", last_complete + rng.randint(5, 40))
    assert resumed_from(proc) == last_complete       # the half-written one ignored
    complete, _ = checkpoint_dirs(wd)
    last_complete = complete[-1]

    final = cli.run(args, "kill_final", wrapped=True)
    assert final.returncode == 0, output(final)[-3000:]
    assert resumed_from(final) == last_complete
    complete, tmp = checkpoint_dirs(wd)
    assert complete[-1] == STEPS and not tmp
    assert set(train_steps(wd)) == set(range(1, STEPS + 1))
    assert_same_state(saved_state(cli.reference), saved_state(wd))


# ---------------------------------------------------------------------------
# 3. The non-finite guard
# ---------------------------------------------------------------------------

def test_nonfinite_updates_are_skipped_logged_and_a_run_of_them_stops(cli):
    """NaN loss and gradients at step 3 (a batch with an out-of-vocabulary
    token): the update is skipped (params and optimizer state unchanged),
    logged with sft/skipped=1 although 3 is not a log step, and training goes
    on; NaN at 5, 6, 7 (between log steps 4 and 8) stop the run with exit
    code 2 and one line naming step 7."""
    wd = os.path.join(cli.tmp, "nonfinite")
    args = [a for a in cli.sft_args(wd) if "checkpoint_every" not in a and "log_every" not in a]
    proc = cli.run(args + ["--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=100",
                           "--config.train.log_every=4", "--config.train.max_nonfinite_steps=3"],
                   "nonfinite", wrapped=True, RELIABILITY_POISON_STEPS="3,5,6,7")
    err = stderr_of(proc)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "3 non-finite updates in a row at step 7" in lines[0], err[-3000:]

    rows = {r["step"]: r for r in read_metrics(wd, "sft") if "sft/skipped" in r}
    assert sorted(rows) == [3, 4, 5, 6, 7], sorted(rows)
    assert rows[3]["sft/skipped"] == 1 and rows[3]["sft/nonfinite"] == 1
    assert np.isnan(rows[3]["sft/loss"])
    assert rows[4]["sft/skipped"] == 0 and rows[4]["sft/nonfinite"] == 0
    assert np.isfinite(rows[4]["sft/loss"])
    assert [rows[s]["sft/nonfinite"] for s in (5, 6, 7)] == [1, 2, 3]

    saved = {step: saved_state(wd, step) for step in (2, 3, 4, 7)}

    def params(step):
        return {k: v for k, v in saved[step].items() if k.startswith("params")}

    def opt(step):
        return {k: v for k, v in saved[step].items() if "opt_state" in k}

    assert_same_state(params(2), params(3))               # the skipped update
    assert_same_state(opt(2), opt(3))
    assert any(not np.array_equal(a, b) for a, b in zip(params(3).values(), params(4).values()))
    assert_same_state(params(4), params(7))
    assert int(saved[3]["train['step']"]) == 3           # the data position still advances
    assert int(saved[3]["train['nonfinite']"]) == 1


# ---------------------------------------------------------------------------
# The PPO loop's preemption and guard, with stand-ins for the models
# ---------------------------------------------------------------------------

def _ppo_pieces(monkeypatch, kill_at=None, nonfinite=None):
    """The real PPO iteration and host loop (`ppo.iteration_fn`, `ppo.make_loop`,
    `loop.run`) around tiny stand-ins for sampling, scoring and the update, so
    its preemption, resume and guard run in a second."""
    from rlhf_jax import loop, sampling, train_state
    from rlhf_jax.stages import policy_gradient as pg, ppo

    cfg = load_config("ppo", "tiny")
    cfg.train.gold_eval = False
    cfg.train.update(dict(steps=6, checkpoint_every=4, max_nonfinite_steps=3, batch_size=2))
    nonfinite = nonfinite or {}

    monkeypatch.setattr(sampling, "sample", lambda model, params, tokens, mask, rng, **kw:
                        types.SimpleNamespace(tokens=tokens, mask=mask,
                                              finished=np.ones(len(tokens), bool)))

    def score(pol, ref, val, rew, tokens, resp, rmask, finished, kl_coef, packed, scores):
        return ({"x": jnp.asarray(tokens, jnp.float32)},
                {"kl": jnp.float32(0.0), "response_length": jnp.float32(3.0)})

    def update(state, rollout, idx, packed, ptx, kl):
        it = int(state.step)
        if it + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        # idx, the minibatches' rows, come from the iteration's rng.
        w = (state.policy.params["w"] * 0.5 + jnp.asarray(idx, jnp.float32).ravel()[:1]
             + rollout["x"].mean())
        n = nonfinite.get(it + 1, 0)
        policy = state.policy.replace(step=state.policy.step + 1, params={"w": w},
                                      opt_state={"m": state.policy.opt_state["m"] + w},
                                      nonfinite=jnp.int32(n))
        return (state.replace(step=state.step + 1, policy=policy, kl_coef=state.kl_coef * 0.9),
                {"nonfinite": jnp.int32(n), "pg_loss": jnp.float32(np.nan if n else 0.0)})

    def fresh_state(seed):
        return train_state.TrainState(step=jnp.int32(0), params={"w": jnp.zeros(4)},
                                      opt_state={"m": jnp.zeros(4)}, rng=jax.random.PRNGKey(seed),
                                      nonfinite=jnp.int32(0))

    state = ppo.PPOState(step=jnp.int32(0), policy=fresh_state(0), value=fresh_state(1),
                         kl_coef=jnp.float32(0.02), ema_params=None, ema_updates=jnp.int32(0))
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    loader = types.SimpleNamespace(
        source=[{"prompt": "p"}],
        batch=lambda it: {"tokens": np.full((2, 3), it, np.int32), "mask": np.ones((2, 3), np.int32)})
    runtime = types.SimpleNamespace(global_batch=lambda b: b,
                                    mesh=types.SimpleNamespace(shape={"data": 1, "fsdp": 1}))
    tok = types.SimpleNamespace(eos_id=1, pad_id=0)

    def run(workdir):
        hp = pg.hyperparams(cfg, tok.eos_id)
        step_fn = ppo.iteration_fn(cfg, runtime, types.SimpleNamespace(policy=None), hp, tok, None,
                                   None, score, update, loader, None)
        return loop.run(ppo.make_loop(cfg, workdir, state, state_sh, step_fn,
                                      {"model": {}, "tokenizer": "byte"}, hp,
                                      pg.host_metrics_fn(2)))
    return run


def test_ppo_preemption_by_sigterm_or_orbax_notice_resumes_exactly(tmp_path, monkeypatch, capsys):
    from orbax.checkpoint import multihost
    from rlhf_jax.errors import Preempted

    reference = _ppo_pieces(monkeypatch)(str(tmp_path / "full"))

    # SIGTERM during iteration 2: checkpoint at 2, then Preempted.
    run = _ppo_pieces(monkeypatch, kill_at=2)
    with pytest.raises(Preempted):
        run(str(tmp_path / "term"))
    assert "[ppo] preempted: checkpoint saved at iteration 2" in capsys.readouterr().out
    assert checkpoint.resolve(str(tmp_path / "term"))[1] == 2
    resumed = _ppo_pieces(monkeypatch)(str(tmp_path / "term"))
    assert "[ppo] resuming from iteration 2" in capsys.readouterr().out
    assert_trees_equal(reference, resumed)

    # Orbax's preemption notice (multi-host TPU) at iteration 3, no SIGTERM:
    # the loop must stop too, not only save and carry on until killed.
    monkeypatch.setattr(multihost, "reached_preemption", lambda step: step == 3)
    run = _ppo_pieces(monkeypatch)
    with pytest.raises(Preempted):
        run(str(tmp_path / "notice"))
    assert checkpoint.resolve(str(tmp_path / "notice"))[1] == 3
    monkeypatch.setattr(multihost, "reached_preemption", lambda step: False)
    resumed = _ppo_pieces(monkeypatch)(str(tmp_path / "notice"))
    assert_trees_equal(reference, resumed)


def test_ppo_nonfinite_run_stops_with_one_line_naming_the_iteration(tmp_path, monkeypatch, capsys):
    run = _ppo_pieces(monkeypatch, nonfinite={2: 1, 3: 2, 4: 3})
    with pytest.raises(SystemExit) as exit_info:
        with errors.reported():
            run(str(tmp_path / "ppo"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "iteration 4" in lines[0] and "non-finite" in lines[0], err
    rows = read_metrics(str(tmp_path / "ppo"), "ppo")
    assert [r["ppo/nonfinite"] for r in rows] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------
# 5. Config errors: one line, non-zero exit, no traceback, nothing compiled
# ---------------------------------------------------------------------------

def test_invalid_configs_fail_in_one_line_before_compiling(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # Each case its own workdir: the cases run at once, and a workdir takes one run.
    def sft(name):
        return cli.sft_args(str(tmp_path / name))

    def ppo(name):
        return ["--config", os.path.join(ROOT, "configs/ppo.py:tiny"), "--workdir", str(tmp_path / name),
                f"--config.data.data_dir={cli.tfds}", f"--config.init_from={cli.reference}"]
    cases = {
        "batch_vs_mesh": (sft("w1") + ["--config.train.batch_size=6"],
                          {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                          ["train.batch_size=6", "divisible", "= 4"]),
        "mesh_vs_devices": (sft("w2") + ["--config.mesh.data=2"], {}, ["needs 2 devices", "1 are available"]),
        "init_from_missing": (sft("w3") + [f"--config.init_from={tmp_path / 'nowhere'}"], {},
                              ["init_from", "no such directory", "nowhere"]),
        "init_from_empty": (sft("w4") + [f"--config.init_from={empty}"], {},
                            ["init_from", "no finished checkpoint"]),
        "ppo_lengths": (ppo("p1") + [f"--config.reward_from={reward_model_from(cli.reference, str(tmp_path / 'rm'))}",
                                     "--config.data.max_prompt_len=100", "--config.sampling.max_new_tokens=40"],
                        {}, ["data.max_prompt_len + sampling.max_new_tokens = 140", "context 128"]),
        "reward_from_empty": (ppo("p2") + [f"--config.reward_from={empty}"], {},
                              ["reward_from", "no finished checkpoint"]),
    }
    procs = {name: cli.start(args, f"config_{name}", JAX_LOG_COMPILES="1", **env)
             for name, (args, env, _) in cases.items()}
    for name, proc in procs.items():
        proc.wait(timeout=300)
    for name, (_, _, expected) in cases.items():
        proc, err = procs[name], stderr_of(procs[name])
        assert proc.returncode == 2, (name, err[-3000:])
        assert "Traceback" not in err, (name, err[-3000:])
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1, (name, err[-3000:])
        for piece in expected:
            assert piece in lines[0], (name, piece, lines[0])
        assert "Compiling" not in err, (name, "compiled before failing")


def test_unknown_config_key_is_one_line(cli, tmp_path):
    proc = cli.run(cli.sft_args(str(tmp_path / "w")) + ["--config.train.stpes=3"], "unknown_key")
    err = stderr_of(proc)
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-2000:]
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "stpes" in lines[0] and "steps" in lines[0], err
