"""Answers prompts with a trained policy.

    python -m rlhf_jax.main --config configs/generate.py --workdir /tmp/gen \
        --config.checkpoint=workdirs/sft --config.prompts=in.jsonl --config.output=out.jsonl

Input lines `{"prompt"}`; output lines `{"prompt", "response"}`.

The lengths fit any checkpoint by default: the prompt budget is the longest
prompt given and the response may fill the rest of the model's context
(rlhf_jax.stages.generate.sampling_budget). A value set for
`data.max_prompt_len` or `sampling.max_new_tokens` is kept,
and an error names the keys when the values set cannot fit.
"""
from configs import base


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "generate"
    c.checkpoint = ""            # a stage workdir or checkpoint directory
    c.prompts = ""
    c.output = ""
    # 0 = derive from the checkpoint and the prompts (see the docstring): the
    # model trained by another stage's config may have any context.
    c.data.max_prompt_len = 0    # 0: the longest tokenized prompt given
    c.sampling = base.sampling_config(max_new_tokens=0)   # 0: the rest of the model's context
    c.batch_size = 32
    if arg not in ("", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/generate.py")
    return c

