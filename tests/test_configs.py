"""Every config file in configs/ loads, with every variant it documents."""
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
