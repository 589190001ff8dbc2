"""The workdir lock (rlhf_jax/workdir_lock.py): a second run on a workdir a
live process holds is refused in one line naming its pid and host, a dead
holder's lock is taken over with a warning, the lock goes when the run ends,
a process re-enters the workdirs it holds, and in a multi-host run process
0 alone holds it. The other processes are real ones."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, cli_xla_flags
from rlhf_jax import errors, workdir_lock
from rlhf_jax.errors import ConfigError

HOST = socket.gethostname()

# Holds the lock on argv[1] until its stdin closes (or it is killed).
_HOLDER = """
import sys
from rlhf_jax import workdir_lock
with workdir_lock.held(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _env(**extra):
    """A subprocess's environment: CPU, one device, single-process unless
    `extra` says otherwise."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RLHF_JAX_COORDINATOR", "RLHF_JAX_AUTO_DISTRIBUTED")}
    return dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=cli_xla_flags(), **extra)


def _lock(workdir) -> dict:
    with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
        return json.load(f)


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of tmp_path/"w"."""
    workdir = str(tmp_path / "w")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], cwd=ROOT, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc, workdir
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_live_holder_refuses_and_a_killed_ones_lock_is_taken_over(holder, capsys):
    proc, workdir = holder
    assert _lock(workdir)["pid"] == proc.pid
    with pytest.raises(ConfigError) as refused:
        with workdir_lock.held(workdir):
            pytest.fail("ran in a workdir another process holds")
    line = str(refused.value)
    assert "\n" not in line
    assert f"process {proc.pid} on host {HOST}" in line and workdir in line, line
    assert _lock(workdir)["pid"] == proc.pid          # the refused run left it alone

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)                 # reaped: a zombie's pid still answers kill(0)
    capsys.readouterr()
    with workdir_lock.held(workdir):
        assert _lock(workdir)["pid"] == os.getpid()
        err = capsys.readouterr().err
    warnings = [l for l in err.splitlines() if l.strip()]
    assert len(warnings) == 1 and f"process {proc.pid} on host {HOST}" in warnings[0], err
    assert "no longer running" in warnings[0]
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))


def test_the_cli_refuses_a_held_workdir_in_one_line_exit_2(tmp_path):
    """main.py: the refusal is the run's one `error:` line, exit code 2,
    before anything compiles; the holder (this process) keeps its lock."""
    workdir = str(tmp_path / "w")
    # tensorboardX imports torch, seconds of the subprocess; it is not reached.
    stubs = tmp_path / "stubs" / "tensorboardX"
    stubs.mkdir(parents=True)
    (stubs / "__init__.py").write_text('raise ImportError("left out of this test")\n')
    with workdir_lock.held(workdir):
        r = subprocess.run([sys.executable, "-m", "rlhf_jax.main", "--config",
                            "configs/sft.py:tiny", "--workdir", workdir],
                           cwd=ROOT, env=_env(PYTHONPATH=str(tmp_path / "stubs"),
                                              JAX_LOG_COMPILES="1"),
                           capture_output=True, text=True, timeout=120)
        assert _lock(workdir)["pid"] == os.getpid()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Compiling" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and f"process {os.getpid()} on host {HOST}" in lines[0], r.stderr


def test_a_lock_from_another_host_is_refused_with_the_way_out(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    path = workdir / workdir_lock.LOCK_NAME
    theirs = {"pid": 4242, "host": "elsewhere.invalid", "started": "2026-01-01 00:00:00 UTC"}
    path.write_text(json.dumps(theirs))
    with pytest.raises(ConfigError) as refused:
        with workdir_lock.held(str(workdir)):
            pytest.fail("ran in a workdir another host holds")
    line = str(refused.value)
    assert "process 4242 on host elsewhere.invalid" in line and f"delete {path}" in line, line
    assert json.loads(path.read_text()) == theirs


def test_the_lock_goes_when_the_run_ends_or_raises(tmp_path):
    path = tmp_path / "w" / workdir_lock.LOCK_NAME
    with workdir_lock.held(str(tmp_path / "w")):
        holder = _lock(tmp_path / "w")
        assert holder["pid"] == os.getpid() and holder["host"] == HOST
    assert not path.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with workdir_lock.held(str(tmp_path / "w")):
            raise RuntimeError("boom")
    assert not path.exists()
    # main.py's report of it: one line, exit code 2 (errors.reported).
    with pytest.raises(SystemExit) as exited:
        with errors.reported(), workdir_lock.held(str(tmp_path / "w")):
            raise ConfigError("bad setting")
    assert exited.value.code == 2 and not path.exists()


def test_a_process_reenters_its_workdirs(tmp_path):
    """The pipeline holds its workdir while its stages hold theirs (one of
    them, evaluate, the pipeline's own): the lock stays until the outermost
    run ends."""
    outer, inner = str(tmp_path / "pipeline"), str(tmp_path / "pipeline" / "sft")
    with workdir_lock.held(outer):
        with workdir_lock.held(inner):
            assert _lock(inner)["pid"] == os.getpid()
        assert not os.path.exists(os.path.join(inner, workdir_lock.LOCK_NAME))
        with workdir_lock.held(outer):
            pass
        assert _lock(outer)["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(outer, workdir_lock.LOCK_NAME))


def test_a_stale_lock_with_this_processs_own_pid_is_taken_over(tmp_path, capsys):
    """A lock naming this pid that this process does not hold is an earlier
    life of the pid (a container restarted): stale."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / workdir_lock.LOCK_NAME).write_text(
        json.dumps({"pid": os.getpid(), "host": HOST, "started": "earlier"}))
    with workdir_lock.held(str(workdir)):
        assert _lock(workdir)["started"] != "earlier"
    assert "taking over the lock" in capsys.readouterr().err


# One process of a two-process run: the first workdir is held by the test,
# the second is free; it prints what it saw.
_MULTI = """
import json, os, sys
from jax.experimental import multihost_utils
from rlhf_jax import distributed, workdir_lock
from rlhf_jax.errors import ConfigError
distributed.initialize()
try:
    with workdir_lock.held(sys.argv[1]):
        print("ran in the held workdir", flush=True)
except ConfigError as e:
    print("refused: " + str(e), flush=True)
with workdir_lock.held(sys.argv[2]):
    with open(os.path.join(sys.argv[2], ".lock")) as f:
        print("lock pid %d, me %d" % (json.load(f)["pid"], os.getpid()), flush=True)
    multihost_utils.sync_global_devices("read")     # before process 0 removes it
"""


def test_multi_host_runs_lock_on_process_0_and_all_stop_if_it_cannot(tmp_path):
    held_dir, free_dir = str(tmp_path / "held"), str(tmp_path / "free")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    with workdir_lock.held(held_dir):
        procs = [subprocess.Popen(
            [sys.executable, "-c", _MULTI, held_dir, free_dir], cwd=ROOT,
            env=_env(RLHF_JAX_COORDINATOR=f"localhost:{port}", RLHF_JAX_NUM_PROCESSES="2",
                     RLHF_JAX_PROCESS_ID=str(i), RLHF_JAX_LOCAL_DEVICES="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            outs.append([l for l in out.splitlines() if not l.startswith("[Gloo]")])
    (refused0, locked0), (refused1, locked1) = outs
    assert refused0.startswith("refused: ") and f"process {os.getpid()} on host {HOST}" in refused0
    assert refused1 == f"refused: workdir {held_dir}: process 0 could not lock it (its error says why)"
    # Process 0's pid in the free workdir's lock, seen by both.
    assert locked0 == f"lock pid {procs[0].pid}, me {procs[0].pid}"
    assert locked1 == f"lock pid {procs[0].pid}, me {procs[1].pid}"
    assert not os.path.exists(os.path.join(free_dir, workdir_lock.LOCK_NAME))


def test_an_object_store_workdir_is_not_locked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with workdir_lock.held("gs://bucket/run"):
        pass
    assert os.listdir(tmp_path) == []      # no local "gs:" directory made
