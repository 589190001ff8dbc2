"""Multi-process runs through launch/local.sh equal single-process runs;
the TPU pod and SLURM launchers print correct commands."""
import os
import shlex
import subprocess
import sys

import numpy as np

from helpers import ROOT, cli_xla_flags, without_tensorboard, world_demos
from rlhf_jax.metrics import read_metrics

MICRO = ["--config.model.hidden=32", "--config.model.layers=1", "--config.model.heads=2",
         "--config.model.kv_heads=1", "--config.model.intermediate=64"]


def _env():
    env = dict(os.environ, RLHF_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu", PYTHON=sys.executable,
               XLA_FLAGS=cli_xla_flags(), LOCAL_XLA_FLAGS=cli_xla_flags())
    return without_tensorboard(env)         # nothing here reads TensorBoard events


def _single(config, workdir, overrides, devices=8):
    env = _env()
    env["XLA_FLAGS"] = cli_xla_flags(devices)
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.main", "--config", config, "--workdir",
                        workdir, *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


# README's multi-process command less its workdir: the SFT runs below are it,
# with a workdir and overrides added (tests/test_readme.py checks the match).
README_LOCAL_SFT = "LOCAL_DEVICES=4 launch/local.sh 2 configs/sft.py:tiny"


def _local(nproc, config, workdir, overrides, local_devices=4):
    env = _env()
    env["LOCAL_DEVICES"] = str(local_devices)
    r = subprocess.run(["bash", os.path.join(ROOT, "launch/local.sh"), str(nproc), config, workdir,
                        *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _readme_local(workdir, overrides):
    """README's command as a user types it, plus `workdir` and `overrides`."""
    command = " ".join([README_LOCAL_SFT, shlex.quote(workdir), *map(shlex.quote, overrides)])
    r = subprocess.run(["bash", "-c", command], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(workdir, stage, key):
    return [r[key] for r in read_metrics(workdir, stage) if key in r]


def test_two_processes_equal_one_process_sft(tmp_path):
    demos = world_demos(tmp_path / "demos.jsonl", n=128)
    overrides = MICRO + [f"--config.data.path={demos}", f"--config.data.data_dir={tmp_path / 'tfds'}",
                         "--config.train.steps=6", "--config.train.log_every=1",
                         "--config.train.batch_size=8", "--config.train.checkpoint_every=3",
                         "--config.train.eval_every=6", "--config.train.eval_batches=1",
                         "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    _single("configs/sft.py:tiny", str(tmp_path / "one"), overrides)
    _readme_local(str(tmp_path / "two"), overrides)
    one = _losses(str(tmp_path / "one"), "sft", "sft/loss")
    two = _losses(str(tmp_path / "two"), "sft", "sft/loss")
    assert len(one) == 6 and len(two) == 6          # process 0 alone writes metrics
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)

    # A resumed multi-process run continues from its checkpoint.
    more = [o if not o.startswith("--config.train.steps") else "--config.train.steps=9"
            for o in overrides]
    _readme_local(str(tmp_path / "two"), more)
    rows = read_metrics(str(tmp_path / "two"), "sft")
    steps = [r["step"] for r in rows if "sft/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_two_processes_equal_one_process_ppo(tmp_path, micro_sft):
    # From the session's micro SFT checkpoint and its zero-head RM (conftest.py;
    # test_ppo.py's runs start from them too): a single-process SFT run through
    # the CLI is the SFT test's above.
    sft, rm = micro_sft["sft"], micro_sft["rm"]
    overrides = [f"--config.init_from={sft}", f"--config.reward_from={rm}",
                 f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.steps=2",
                 "--config.train.batch_size=8", "--config.sampling.max_new_tokens=8",
                 "--config.data.ptx_batch_size=4", "--config.algo.ptx_coef=0.5",
                 "--config.train.lr=1e-3", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                 "--config.mesh.tensor=2"]
    _single("configs/ppo.py:tiny", str(tmp_path / "one"), overrides)
    _local(2, "configs/ppo.py:tiny", str(tmp_path / "two"), overrides)
    for key in ("ppo/score_penalised", "ppo/pg_loss", "ppo/vf_loss", "ppo/ptx_loss", "ppo/kl"):
        one = _losses(str(tmp_path / "one"), "ppo", key)
        two = _losses(str(tmp_path / "two"), "ppo", key)
        assert len(one) == 2
        np.testing.assert_allclose(two, one, atol=1e-4, rtol=1e-4, err_msg=key)


def test_tpu_pod_dry_run_prints_commands():
    r = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry-run", "--name", "pod1", "--zone",
                        "us-central2-b", "--type", "v4-32", "--repo", "https://example.com/r.git",
                        "configs/ppo.py", "gs://bucket/w", "--config.train.steps=5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l and not l.startswith("#")]
    create, ssh = lines
    assert "gcloud compute tpus tpu-vm describe pod1 --zone=us-central2-b" in create
    assert "create pod1 --zone=us-central2-b --accelerator-type=v4-32" in create
    argv = shlex.split(ssh)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
    assert "--worker=all" in argv
    remote = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
    assert "git clone https://example.com/r.git" in remote and "pip install" in remote
    inner = shlex.split(remote.split("&& cd ~/rlhf_jax && ")[-1])
    assert inner[0] == "RLHF_JAX_AUTO_DISTRIBUTED=1"
    assert inner[1:] == ["python3", "-m", "rlhf_jax.main", "--config", "configs/ppo.py",
                         "--workdir", "gs://bucket/w", "--config.train.steps=5"]


def test_slurm_dry_run_prints_srun():
    r = subprocess.run(["bash", "launch/slurm_gpu.sh", "--dry-run", "--partition", "gpu", "4", "8",
                        "configs/sft.py", "/shared/w", "--config.mesh.fsdp=32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[0] == "srun" and "--nodes=4" in argv and "--gpus-per-node=8" in argv
    assert "--ntasks-per-node=1" in argv and "--partition=gpu" in argv
    assert "--export=ALL,RLHF_JAX_AUTO_DISTRIBUTED=1" in argv
    assert argv[-7:] == ["-m", "rlhf_jax.main", "--config", "configs/sft.py", "--workdir",
                         "/shared/w", "--config.mesh.fsdp=32"]


def test_launchers_reject_missing_arguments():
    for script in ("launch/local.sh", "launch/slurm_gpu.sh", "launch/tpu_pod.sh"):
        r = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "usage" in r.stderr
