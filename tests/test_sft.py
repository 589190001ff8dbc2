"""The SFT stage end to end: loss falls, generate answers, exact resume,
sharded == unsharded, bad input reported with file and line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import (ROOT, assert_trees_equal, load_config, micro_model, run_interrupted,
                     world_demos, write_jsonl)
from rlhf_jax import checkpoint, stages
from rlhf_jax.stages.instructgpt import override
from rlhf_jax.metrics import read_metrics


def _sft_config(data_path, **kw):
    cfg = micro_model(load_config("sft", "tiny"))
    cfg.data.path = data_path
    cfg.data.data_dir = os.path.join(os.path.dirname(data_path), "tfds")
    cfg.train.update(dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=6,
                          eval_batches=2, checkpoint_every=4, log_every=2))
    return override(cfg, **kw)


def test_sft_loss_falls_and_generate_answers(tmp_path):
    demos = world_demos(tmp_path / "demos.jsonl", n=256)
    cfg = _sft_config(demos, **{"train.steps": 24, "train.eval_every": 8})
    stages.run(cfg, str(tmp_path / "sft"))
    rows = read_metrics(str(tmp_path / "sft"), "sft")
    evals = [r["sft/eval_loss"] for r in rows if "sft/eval_loss" in r]
    train = [r["sft/loss"] for r in rows if "sft/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.3, evals
    assert train[-1] < train[0]
    assert all({"stage", "step", "time"} <= set(r) for r in rows)
    assert os.listdir(tmp_path / "sft" / "tensorboard" / "sft")

    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": "What is 2 plus 3?"}, {"prompt": "Spell 'cat' backwards."},
                           {"prompt": "Is 7 even or odd?"}])
    gen = load_config("generate", "")
    micro_model(gen)
    gen.checkpoint = str(tmp_path / "sft")
    gen.prompts = prompts
    gen.output = str(tmp_path / "out.jsonl")
    gen.sampling.max_new_tokens = 8
    gen.batch_size = 8
    stages.run(gen, str(tmp_path / "gen"))
    out = [json.loads(l) for l in open(gen.output)]
    assert [o["prompt"] for o in out] == ["What is 2 plus 3?", "Spell 'cat' backwards.",
                                          "Is 7 even or odd?"]
    assert all(isinstance(o["response"], str) for o in out)


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    demos = world_demos(tmp_path / "demos.jsonl", n=128)
    cfg = _sft_config(demos)
    stages.run(cfg, str(tmp_path / "full"))

    # Kill the second run after step 6 (checkpoints at 4, 8, ...), then rerun.
    run_interrupted(monkeypatch, cfg, str(tmp_path / "resumed"), step=6)
    assert checkpoint.resolve(str(tmp_path / "resumed"))[1] == 4
    stages.run(cfg, str(tmp_path / "resumed"))

    assert_trees_equal(checkpoint.load_saved_params(str(tmp_path / "full")),
                       checkpoint.load_saved_params(str(tmp_path / "resumed")))
    # A workdir whose checkpoint is past train.steps (made by a longer run)
    # is refused instead of being called finished without its end.
    from rlhf_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="past train.steps=4"):
        stages.run(override(cfg, **{"train.steps": 4}), str(tmp_path / "full"))


def test_sharded_run_equals_single_device(tmp_path):
    demos = world_demos(tmp_path / "demos.jsonl", n=128)
    losses = {}
    for name, mesh in [("one", dict(data=1, fsdp=1, tensor=1)),
                       ("eight", dict(data=1, fsdp=4, tensor=2))]:
        cfg = _sft_config(demos, **{"train.steps": 6, "train.log_every": 1})
        cfg.mesh.update(mesh)
        stages.run(cfg, str(tmp_path / name))
        losses[name] = [r["sft/loss"] for r in read_metrics(str(tmp_path / name), "sft")
                        if "sft/loss" in r]
    assert len(losses["one"]) == 6
    np.testing.assert_allclose(losses["eight"], losses["one"], atol=1e-5, rtol=0)


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, RLHF_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_reports_malformed_line_with_file_and_line(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                    '{"prompt": "e", "respons": "f"}\n')
    r = _cli("--config", os.path.join(ROOT, "configs/sft.py:tiny"), "--workdir", str(tmp_path / "w"),
             f"--config.data.path={path}", f"--config.data.data_dir={tmp_path / 'tfds'}")
    assert r.returncode != 0
    assert "demos.jsonl:3" in r.stderr and "response" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_rejects_misspelled_override(tmp_path):
    r = _cli("--config", os.path.join(ROOT, "configs/sft.py:tiny"), "--workdir", str(tmp_path / "w"),
             "--config.train.stpes=3")
    assert r.returncode != 0 and "stpes" in r.stderr
