"""One module per stage; `run(config, workdir)` dispatches on config.stage."""
import importlib

STAGES = {
    "pretrain": "rlhf_jax.trainers.lm",
    "sft": "rlhf_jax.trainers.lm",
    "rm": "rlhf_jax.trainers.reward",
    "collect": "rlhf_jax.trainers.collect",
    "ppo": "rlhf_jax.trainers.ppo",
    "evaluate": "rlhf_jax.trainers.evaluate",
    "generate": "rlhf_jax.trainers.generate",
    "pipeline": "rlhf_jax.trainers.pipeline",
}


def run(config, workdir: str):
    stage = config.stage
    if stage not in STAGES:
        raise ValueError(f"config.stage={stage!r}: expected one of {sorted(STAGES)}")
    return importlib.import_module(STAGES[stage]).run(config, workdir)
