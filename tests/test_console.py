"""The console a newcomer sees: no absl INFO lines unless --verbose, one line
per dataset built locally, a progress bar with its rate and ETA, and the
evaluation table."""
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, cli_xla_flags, world_demos
from rlhf_jax import console
from rlhf_jax.stages import instructgpt

MICRO = ["--config.model.hidden=32", "--config.model.layers=1", "--config.model.heads=2",
         "--config.model.kv_heads=1", "--config.model.intermediate=64",
         "--config.train.steps=4", "--config.train.eval_every=4", "--config.train.eval_batches=1",
         "--config.train.checkpoint_every=2", "--config.train.log_every=2"]
ABSL_INFO = re.compile(r"^I\d{4} ", re.M)
LIBRARY_PHRASES = ("CheckpointManager created", "Closing _NonBlockingMetadataStore",
                   "Downloading and preparing dataset", "Reusing dataset")


def _sft(tmp_path, name, *extra, env=None):
    demos = world_demos(tmp_path / "demos.jsonl", n=64)
    # tensorboardX imports torch, seconds of every subprocess; events are optional.
    stubs = tmp_path / "stubs" / "tensorboardX"
    stubs.mkdir(parents=True, exist_ok=True)
    (stubs / "__init__.py").write_text('raise ImportError("left out of this test")\n')
    run_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path / "stubs"), **(env or {}))
    run_env["XLA_FLAGS"] = cli_xla_flags()
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.main", "--config", "configs/sft.py:tiny",
                        "--workdir", str(tmp_path / name), f"--config.data.path={demos}",
                        f"--config.data.data_dir={tmp_path / name / 'tfds'}", *MICRO, *extra],
                       cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_stage_console_is_quiet_and_verbose_brings_the_logging_back(tmp_path):
    out = _sft(tmp_path, "quiet", env={"RLHF_JAX_NO_PROGRESS": "0"})
    assert not ABSL_INFO.search(out), out
    for phrase in LIBRARY_PHRASES:
        assert phrase not in out, (phrase, out)
    assert len(re.findall(r"^\[data\] built jsonl_records/demonstrations-\w+ locally from .*"
                          r"demos\.jsonl: train 64 records in ", out, re.M)) == 1, out
    # The bar's last state: steps, elapsed < ETA, steps/s, the stage's tokens/s.
    assert re.search(r"sft: 100%\|.*\| 4/4 \[[\d:]+<00:00, +[\d.]+(step/s|s/step), .*tokens/s=",
                     out), out
    assert len(out.splitlines()) < 15, out

    out = _sft(tmp_path, "verbose", "--verbose", env={"RLHF_JAX_NO_PROGRESS": "1"})
    assert len(ABSL_INFO.findall(out)) > 20, out
    for phrase in ("CheckpointManager created", "Downloading and preparing dataset"):
        assert phrase in out, phrase
    assert "sft: 100%" not in out           # RLHF_JAX_NO_PROGRESS=1: no bar


def test_warnings_shown_once_and_expected_ones_dropped():
    import logging
    filt = console._OnceFilter()

    def passes(msg, *args, level=logging.WARNING):
        return filt.filter(logging.LogRecord("orbax", level, __file__, 1, msg, args, None))

    assert passes("disk %s nearly full", "/a")
    assert not passes("disk %s nearly full", "/b")          # the same warning again
    assert passes("another warning")
    assert not passes("Given directory is read only=%s", "/ckpt")
    assert not passes("Variant folder %s has no %s", "/v", "dataset_info.json")
    assert passes("disk %s nearly full", "/a", level=logging.ERROR)  # errors always


EVAL_JSON = {"reference": "sft", "policies": {
    "sft": {"gold_score": -0.3191, "win_rate_vs_sft": 0.5, "gold_score_sampled": 0.125,
            "refusal_rate": 0.0625,
            "over_refusal_rate": 0.0, "kl_vs_sft": 0.0, "pretrain_loss": 3.5941},
    "ppo_ptx": {"gold_score": 0.25, "win_rate_vs_sft": 0.61, "refusal_rate": 0.125,
                "over_refusal_rate": None, "kl_vs_sft": 1.2345, "pretrain_loss": float("nan")},
}}


def test_eval_table_has_every_policy_and_column():
    header, *rows = console.eval_table(EVAL_JSON)
    assert header.split() == ["policy", "gold", "(T=1)", "win", "(T=1)", "gold", "win", "vs",
                              "sft", "refusal", "over-refusal", "KL", "LM", "loss"]
    assert [r.split() for r in rows] == [
        ["sft", "0.125", "-", "-0.319", "0.500", "0.062", "0.000", "0.000", "3.594"],
        ["ppo_ptx", "-", "-", "0.250", "0.610", "0.125", "-", "1.234", "-"]]
    assert len({len(line) for line in [header, *rows]}) == 1    # fixed width


def test_pipeline_prints_the_table_and_the_report_path(tmp_path, capsys):
    import json
    (tmp_path / "eval.json").write_text(json.dumps(EVAL_JSON))
    instructgpt.print_results(str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == console.eval_table(EVAL_JSON)
    assert lines[-1] == f"report: {tmp_path / 'report.md'}"


def test_a_file_gets_the_last_steps_bar_once(tmp_path, monkeypatch, capsys):
    """Written to a file, the bar is a line every interval and one at the
    end; rows at the last step (an evaluation, the RM's finalize) add no
    second 100% line, and the last line shows the last training row's rate."""
    from rlhf_jax import metrics
    monkeypatch.delenv("RLHF_JAX_NO_PROGRESS", raising=False)
    monkeypatch.setattr(metrics, "_FILE_INTERVAL_S", 0.0)       # a line at every row
    monkeypatch.setattr(metrics.sys.stderr, "isatty", lambda: False, raising=False)
    writer = metrics.MetricsWriter(str(tmp_path), "rm", total_steps=3)
    for step, rate in ((1, 10.0), (2, 20.0), (3, 30.0)):
        writer.write(step, {"rm/pairs_per_s": rate}, progress_keys=("rm/pairs_per_s",))
    writer.write(3, {"rm/eval_loss": 0.5})                      # evaluation, then finalize
    writer.write(3, {"rm/bias": 1.0})
    writer.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rm:")]
    assert len(lines) == 3 and sum("100%" in line for line in lines) == 1, err
    assert "pairs/s=30" in lines[-1], lines[-1]


def test_stderr_is_held_unless_verbose_and_replayed_on_an_error(capfd):
    # libtpu writes its start-up lines from C++ to fd 2: held at that level.
    with console.stderr_held():
        os.write(2, b"E0000 common_lib.cc:860] from C++\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError, match="boom"):
        with console.stderr_held():
            os.write(2, b"what led to it\n")
            raise RuntimeError("boom")
    assert capfd.readouterr().err == "what led to it\n"
    with console.stderr_held(verbose=True):
        os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"
