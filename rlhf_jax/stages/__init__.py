"""One module per stage; `run(config, workdir)` dispatches on config.stage.

Training stages (sft.py for pretrain and SFT, rm.py, ppo.py, grpo.py) run in the
host loop of rlhf_jax/loop.py; collect, evaluate and generate sample with
rlhf_jax/inference.py; instructgpt.py chains them all (configs/instructgpt.py).

The instruction world's gold labeler (rlhf_jax.world.gold_score) is a
judge the RM and PPO stages are handed here, for the gold metrics they log;
they do not import the world. collect and evaluate are the world's own
stages: their labelers and judgements are the world's.
"""
import importlib
import os
import shutil

from rlhf_jax import config_domains, workdir_lock, world
from rlhf_jax.errors import ConfigError

# config.stage -> the module under rlhf_jax/stages/ whose `run` it calls. A
# stage's module is imported when that stage runs (an SFT run does not load
# evaluate's plotting or the other stages).
STAGES = {"pretrain": "sft", "sft": "sft", "rm": "rm", "collect": "collect", "ppo": "ppo",
          "grpo": "grpo", "dpo": "dpo", "evaluate": "evaluate", "generate": "generate",
          "pipeline": "instructgpt", "demo_quality": "demo_quality"}
# Stages handed the world's gold labeler (for their gold metrics), and the
# stages that run other stages (through `run`, below).
_JUDGED = ("rm", "ppo", "grpo", "dpo")
_CHAINS = ("pipeline", "demo_quality")


def _stage_run(stage: str):
    module = importlib.import_module(f"rlhf_jax.stages.{STAGES[stage]}")
    if stage in _JUDGED:
        return lambda config, workdir: module.run(config, workdir, judge=world.gold_score)
    if stage in _CHAINS:
        return lambda config, workdir: module.run(config, workdir, run_one=run)
    return module.run


def run(config, workdir: str):
    """Runs `config`'s stage in `workdir`, holding the workdir's lock
    (rlhf_jax/workdir_lock.py): one run per workdir. Every key's value is
    checked against its domain first (rlhf_jax/config_domains.py). A workdir this call
    created is removed again if the stage refuses its config before writing
    anything (a bad setting leaves no directory behind)."""
    stage = config.stage
    if stage not in STAGES:
        raise ConfigError(f"config.stage={stage!r}: expected one of {sorted(STAGES)}")
    config_domains.check(config)
    created = not os.path.exists(workdir)
    try:
        with workdir_lock.held(workdir):
            return _stage_run(stage)(config, workdir)
    except ConfigError:
        if created and os.path.isdir(workdir) and not os.listdir(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        raise
