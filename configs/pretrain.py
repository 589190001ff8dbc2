"""Pretraining a base model on the instruction world's corpus ("the internet").

    python -m rlhf_jax.main --config configs/pretrain.py --workdir workdirs/pretrain
    python -m rlhf_jax.main --config configs/pretrain.py:tiny --workdir /tmp/pt --config.data.path=text.jsonl

Text records `{"text"}`; the loss covers every token. The world's corpus is
the misaligned mixture of WORLD.md, so the model imitates the internet, not
the user.
"""
from configs import base


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "pretrain"
    c.data.path = "tfds:instruction_world/corpus"
    c.train.steps = 3000
    c.train.batch_size = 32
    c.train.lr = 2e-3
    if arg == "tiny":
        c.data.path = "tfds:instruction_world/corpus_tiny"
        c.model.update(dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, max_len=128))
        c.data.max_len = 128
        c.train.update(dict(steps=20, batch_size=8, warmup_steps=2, eval_every=10,
                            eval_batches=2, checkpoint_every=10, log_every=5))
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/pretrain.py (expected '' or 'tiny')")
    return c
