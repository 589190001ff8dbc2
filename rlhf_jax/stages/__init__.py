"""One module per stage; `run(config, workdir)` dispatches on config.stage."""
import importlib

STAGES = {
    "pretrain": "rlhf_jax.stages.sft",
    "sft": "rlhf_jax.stages.sft",
    "rm": "rlhf_jax.stages.rm",
    "collect": "rlhf_jax.stages.collect",
    "ppo": "rlhf_jax.stages.ppo",
    "evaluate": "rlhf_jax.stages.evaluate",
    "generate": "rlhf_jax.stages.generate",
    "pipeline": "rlhf_jax.stages.instructgpt",
}


def run(config, workdir: str):
    stage = config.stage
    if stage not in STAGES:
        raise ValueError(f"config.stage={stage!r}: expected one of {sorted(STAGES)}")
    return importlib.import_module(STAGES[stage]).run(config, workdir)
