"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

    python -m rlhf_jax.main --config configs/sft.py --workdir workdirs/sft --config.init_from=workdirs/pretrain
    python -m rlhf_jax.main --config configs/sft.py:tiny --workdir workdirs/sft --config.data.path=demos.jsonl

Records `{"prompt", "response"}`; the loss covers the response tokens and EOS
only. Without `init_from` the model starts from random weights.

The world's demonstrations are written by demonstrators with a flaw rate f
(WORLD.md, "The demonstrators"): `world_demonstrations(f)` names them,
e.g. `--config.data.path=tfds:instruction_world/demonstrations_f0.5`; the
default is the perfect demonstrator (f = 0).
"""
from configs import base

WORLD_DEMONSTRATIONS = "tfds:instruction_world/demonstrations"


def world_demonstrations(flaw_rate: float, tiny: bool = False) -> str:
    """The world's demonstrations by demonstrators of flaw rate `flaw_rate`."""
    name = WORLD_DEMONSTRATIONS + ("_tiny" if tiny else "")
    return name + (f"_f{float(flaw_rate):g}" if flaw_rate else "")


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "sft"
    c.data.path = world_demonstrations(0.0)
    c.train.steps = 800
    c.train.batch_size = 32
    c.train.lr = 1e-3
    if arg == "tiny":
        c.data.path = world_demonstrations(0.0, tiny=True)
        c.model.update(dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, max_len=128))
        c.data.max_len = 128
        c.train.update(dict(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=10,
                            eval_batches=2, checkpoint_every=10, log_every=5))
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/sft.py (expected '' or 'tiny')")
    return c
