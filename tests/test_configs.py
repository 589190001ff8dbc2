"""Every config file in configs/ loads, with every variant it documents; every
key has a domain (rlhf_jax/config_domains.py) that its values keep and that
refuses a bad value in one line naming the key."""
import glob
import importlib.util
import os
import re

import ml_collections
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("__"))


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _variants(path):
    """Variants a config file names in its source: get_config(arg) compares arg to them."""
    src = open(path).read()
    return sorted({""} | set(re.findall(r'arg == "(\w+)"', src)))


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"base.py", "pretrain.py", "sft.py", "generate.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_loads(path, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    mod = _load(path)
    if os.path.basename(path) == "base.py":
        cfg = mod.get_base_config()
        assert isinstance(cfg, ml_collections.ConfigDict)
        return
    for arg in _variants(path):
        cfg = mod.get_config(arg)
        assert cfg.stage, f"{path}:{arg} has no stage"
        from rlhf_jax.stages import STAGES
        assert cfg.stage in STAGES
        # Locked configs reject misspelled keys.
        cfg.lock()
        with pytest.raises((AttributeError, KeyError)):
            cfg.train_steps_misspelled = 3
    with pytest.raises(ValueError):
        mod.get_config("no_such_variant")


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_key_has_a_domain_its_values_keep(path, monkeypatch):
    from rlhf_jax import config_domains
    monkeypatch.syspath_prepend(ROOT)
    mod = _load(path)
    variants = [mod.get_base_config()] if os.path.basename(path) == "base.py" else [
        mod.get_config(arg) for arg in _variants(path)]
    for cfg in variants:
        keys = [".".join(p) for p, _ in config_domains.leaves(cfg)]
        assert keys
        undeclared = [k for k in keys if config_domains.domain_of(tuple(k.split("."))) is None]
        assert not undeclared, f"{path}: no domain in rlhf_jax/config_domains.py for {undeclared}"
        config_domains.check(cfg)


# (config, key, bad value, words of what is allowed): each stage's blocks.
BAD_VALUES = [
    ("sft", "train.lr", -1.0, "> 0"),
    ("sft", "train.batch_size", 0, ">= 1"),
    ("sft", "train.steps", -5, ">= 0"),
    ("sft", "model.hidden", 0, ">= 1"),
    ("sft", "model.arch", "gpt3", "'llama', 'gpt2'"),
    ("sft", "model.matmul", "fp8", "'float32', 'bf16'"),
    ("sft", "data.eval_fraction", 1.0, "< 1"),
    ("sft", "data.max_len", 0, ">= 1"),
    ("sft", "mesh.data", 0, "not 0"),
    ("sft", "seed", -1, ">= 0"),
    ("sft", "train.keep_checkpoints", 0, ">= 1"),
    ("pretrain", "data.max_prompt_len", -1, ">= 0"),
    ("rm", "data.k_max", 10, "<= 9"),
    ("rm", "expand_layers", -1, ">= 0"),
    ("ppo", "algo.kl_coef", -0.1, ">= 0"),
    ("ppo", "algo.gamma", 1.5, "<= 1"),
    ("ppo", "algo.ptx_coef", -1.0, ">= 0"),
    ("ppo", "algo.minibatches", 0, ">= 1"),
    ("ppo", "algo.ema_decay", 1.0, "< 1"),
    ("ppo", "sampling.temperature", 0.0, "> 0"),
    ("ppo", "sampling.top_p", 0.0, "> 0"),
    ("grpo", "algo.group_size", 1, ">= 2"),
    ("grpo", "algo.advantage", "ppo", "'grpo', 'rloo'"),
    ("grpo", "algo.kl_in", "both", "'loss', 'reward'"),
    ("dpo", "algo.beta", 0.0, "> 0"),
    ("collect", "comparisons.num_prompts", 0, ">= 1"),
    ("collect", "comparisons.noise_scale", -0.5, ">= 0"),
    ("collect", "comparisons.policies", (("sft", "init_from", 0),), "count >= 1"),
    ("evaluate", "sample_temperature", -1.0, "> 0"),
    ("evaluate", "report.samples_per_policy", -2, ">= 0"),
    ("generate", "batch_size", 0, ">= 1"),
    ("instructgpt", "ppo.train.lr", 0.0, "> 0"),
    ("instructgpt", "rm.data.k_max", 1, ">= 2"),
    ("demo_quality", "flaw_rates", (0.0, 1.2), "a number >= 0 and <= 1"),
]


@pytest.mark.parametrize("name,key,value,allowed", BAD_VALUES,
                         ids=[f"{n}:{k}" for n, k, _, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_the_key(name, key, value, allowed, monkeypatch):
    from rlhf_jax import config_domains
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.stages.instructgpt import override
    monkeypatch.syspath_prepend(ROOT)
    cfg = _load(os.path.join(ROOT, "configs", f"{name}.py")).get_config("")
    config_domains.check(cfg)
    with pytest.raises(ConfigError) as e:
        config_domains.check(override(cfg, **{key: value}))
    msg = str(e.value)
    assert msg.startswith(f"{key}={value!r}: must be") and allowed in msg and "\n" not in msg, msg


def test_bad_values_through_the_cli_exit_2_in_one_line_and_leave_no_workdir(tmp_path):
    # The values themselves are checked in-process above; here the CLI's
    # path, a float and an int override, each its own process, started at once.
    import subprocess
    import sys
    from helpers import cli_xla_flags
    procs = {}
    for key, value in (("train.lr", "-1"), ("train.batch_size", "0")):
        workdir = tmp_path / key.replace(".", "_")
        procs[key] = workdir, subprocess.Popen(
            [sys.executable, "-m", "rlhf_jax.main", "--config", os.path.join(ROOT, "configs/sft.py:tiny"),
             "--workdir", str(workdir), f"--config.{key}={value}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, XLA_FLAGS=cli_xla_flags(), JAX_LOG_COMPILES="1"))
    for key, (workdir, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr[-2000:]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"{key}=" in lines[0] and "must be" in lines[0], stderr
        assert "Traceback" not in stderr and "Compiling" not in stderr
        assert not workdir.exists()
