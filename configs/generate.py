"""Answers prompts with a trained policy.

    python -m rlhf_jax.main --config configs/generate.py --workdir /tmp/gen \
        --config.checkpoint=workdirs/sft --config.prompts=in.jsonl --config.output=out.jsonl

Input lines `{"prompt"}`; output lines `{"prompt", "response"}`.
"""
from configs import base


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "generate"
    c.checkpoint = ""            # a stage workdir or checkpoint directory
    c.prompts = ""
    c.output = ""
    c.sampling = sampling_config()
    c.batch_size = 32
    if arg not in ("", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/generate.py")
    return c


def sampling_config(**overrides):
    import ml_collections
    s = ml_collections.ConfigDict(dict(max_new_tokens=48, temperature=1.0, top_k=0, top_p=1.0,
                                       greedy=True))
    s.update(overrides)
    return s
