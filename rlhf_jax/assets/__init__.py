"""Files shipped with the package.

`world_base/`: the instruction world's base model (WORLD.md, "The base
model"), the stand-in for InstructGPT's pretrained GPT-3: a small decoder
pretrained on the world's corpus by `configs/pretrain.py`, so that the
pipeline spends its time on SFT, comparisons, the RM and PPO. It is an Orbax
checkpoint in the layout of a stage workdir (`checkpoints/<step>/{params,
meta}`, final step only, no optimizer state), so `init_from` takes it as is:

    python -m rlhf_jax.main --config configs/sft.py --workdir workdirs/sft \\
        --config.init_from="$(python -c 'import rlhf_jax.assets as a; print(a.world_base_path())')"

world_base/README.md gives the command that rebuilds it and its training
numbers.
"""
import os

WORLD_BASE = "world_base"


def world_base_path() -> str:
    """Directory of the shipped base model, usable as any stage's `init_from`."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), WORLD_BASE)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise FileNotFoundError(
            f"the shipped base model is missing from {path} (an installed package without its "
            f"package data?); rebuild it with the command in rlhf_jax/assets/world_base/README.md "
            f"or pass a pretrain workdir as init_from")
    return path


__all__ = ["world_base_path", "WORLD_BASE"]
