"""Shared test fixtures: tiny stage configs and world data files."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load_config(name: str, arg: str = "tiny", **overrides):
    """configs/<name>.py:<arg> with dotted overrides, e.g. {"train.steps": 4}."""
    import importlib
    mod = importlib.import_module(f"configs.{name}")
    from rlhf_jax.trainers.common import override
    return override(mod.get_config(arg), **overrides)


def micro_model(cfg):
    """Shrinks a config's model to seconds-per-test size."""
    cfg.model.update(dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, max_len=128))
    cfg.data.max_len = 96
    cfg.data.max_prompt_len = 40
    return cfg


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def world_demos(path, n=256, seed=0):
    from rlhf_jax.world import datasets
    return write_jsonl(path, ({"prompt": r["prompt"], "response": r["response"]}
                              for r in datasets.demonstrations(n, seed=seed)))
