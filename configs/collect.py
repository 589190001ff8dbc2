"""Collecting comparisons: K samples per prompt from a mix of policies (the SFT
policy and the base model by default), ranked by a simulated labeler
(InstructGPT step 2's data).

    python -m rlhf_jax.main --config configs/collect.py --workdir workdirs/collect \
        --config.init_from=workdirs/sft
    python -m rlhf_jax.main --config configs/collect.py:tiny --workdir /tmp/collect \
        --config.init_from=/tmp/sft --config.comparisons.num_prompts=64

Writes `<workdir>/comparisons.jsonl` (ranked by one labeler) and
`<workdir>/comparisons_eval.jsonl` (held-out prompts, ranked by an
independent labeler), lines `{"prompt", "responses": [K], "ranks": [K],
"finished": [K], "sources": [K], "category"}`, plus
`comparisons_eval_sft.jsonl` (the held-out prompts' SFT samples alone),
`collect.json` and metrics.jsonl (stage "collect").
A finished collect, re-run with the same settings, does nothing.
"""
import ml_collections

from configs import base


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "collect"
    c.comparisons = ml_collections.ConfigDict(dict(
        # A prompts source (JSONL file or tfds:NAME/CONFIG) of world prompts:
        # the simulated labelers judge with the world's gold labeler.
        prompts="tfds:instruction_world/comparison_prompts",
        split="train",
        num_prompts=33_000,        # InstructGPT: ~33k RM training prompts
        # Held-out comparisons (the RM's validation set), ranked by an
        # independent labeler; 0 skips them.
        eval_prompts="tfds:instruction_world/comparison_prompts",
        eval_split="heldout",
        num_eval_prompts=1_000,
        # (name, checkpoint, responses per prompt): K is their sum (InstructGPT:
        # 4 to 9, from several models). "init_from" is this stage's policy (SFT),
        # "base" is `base_from`; any other path is a checkpoint or stage workdir.
        # SFT alone gives nine identical samples on two thirds of the prompts;
        # 5 SFT + 4 base samples give a comparison for nearly every prompt.
        policies=(("sft", "init_from", 5), ("base", "base", 4)),
        # The base model; empty: the world base shipped in rlhf_jax/assets.
        base_from="",
        # Gumbel scale of the simulated labelers; < 0: the calibrated
        # rlhf_jax.world.labelers.NOISE_SCALE (73% inter-labeler agreement on
        # the pairs they order; equal gold scores tie).
        noise_scale=-1.0,
        # Rows (prompts x K) per sampler call; every call has this shape.
        batch_size=576,
    ))
    # Temperature-1 samples: the comparisons need the policy's diversity.
    c.sampling = base.sampling_config(greedy=False, temperature=1.0, max_new_tokens=48)
    if arg == "tiny":
        c.comparisons.update(dict(prompts="tfds:instruction_world/comparison_prompts_tiny",
                              eval_prompts="tfds:instruction_world/comparison_prompts_tiny",
                              num_prompts=64, num_eval_prompts=16, batch_size=64,
                              policies=(("sft", "init_from", 2), ("base", "base", 2))))
        c.sampling.max_new_tokens = 24
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/collect.py (expected '' or 'tiny')")
    return c
