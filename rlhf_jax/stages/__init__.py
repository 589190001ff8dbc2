"""One module per stage; `run(config, workdir)` dispatches on config.stage.

Training stages (sft.py for pretrain and SFT, rm.py, ppo.py, grpo.py) run in the
host loop of rlhf_jax/loop.py; collect, evaluate and generate sample with
rlhf_jax/inference.py; instructgpt.py chains them all (configs/instructgpt.py).

The instruction world's gold labeler (rlhf_jax.world.gold_score) is a
judge the RM and PPO stages are handed here, for the gold metrics they log;
they do not import the world. collect and evaluate are the world's own
stages: their labelers and judgements are the world's.
"""
import os
import shutil

from rlhf_jax import config_domains, workdir_lock, world
from rlhf_jax.errors import ConfigError
from rlhf_jax.stages import (collect, demo_quality, dpo, evaluate, generate, grpo, instructgpt,
                             ppo, rm, sft)

STAGES = {
    "pretrain": sft.run,
    "sft": sft.run,
    "rm": lambda config, workdir: rm.run(config, workdir, judge=world.gold_score),
    "collect": collect.run,
    "ppo": lambda config, workdir: ppo.run(config, workdir, judge=world.gold_score),
    "grpo": lambda config, workdir: grpo.run(config, workdir, judge=world.gold_score),
    "dpo": lambda config, workdir: dpo.run(config, workdir, judge=world.gold_score),
    "evaluate": evaluate.run,
    "generate": generate.run,
    "pipeline": lambda config, workdir: instructgpt.run(config, workdir, run_one=run),
    "demo_quality": lambda config, workdir: demo_quality.run(config, workdir, run_one=run),
}


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
            return STAGES[stage](config, workdir)
    except ConfigError:
        if created and os.path.isdir(workdir) and not os.listdir(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        raise
