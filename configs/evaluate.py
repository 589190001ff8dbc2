"""Evaluation of several policies on held-out prompts (InstructGPT section 4).

    python -m rlhf_jax.main --config configs/evaluate.py --workdir workdirs/evaluate \
        --config.policies.pretrained=workdirs/pretrain --config.policies.sft=workdirs/sft \
        --config.policies.ppo=workdirs/ppo --config.policies.ppo_ptx=workdirs/ppo_ptx \
        --config.ppo_workdirs.ppo=workdirs/ppo --config.ppo_workdirs.ppo_ptx=workdirs/ppo_ptx
    python -m rlhf_jax.main --config configs/evaluate.py:tiny --workdir /tmp/eval \
        --config.policies.pretrained=/tmp/pt --config.policies.sft=/tmp/sft

Every policy answers the held-out eval prompts (held-out words, 128 per
category by default) greedily; the gold labeler judges the answers. Writes
`eval.json`, `samples.jsonl`, `report.md` and its PNG plots to the workdir.

`policies` maps a name to a stage workdir or checkpoint directory; an empty
path leaves that policy out. Configs are locked, so a new name means a forked
config (add it to `policies` and to `policy_order`). `fewshot_policy` is also
evaluated with a few-shot prompt of train-word demonstrations in front
(InstructGPT's "GPT prompted"), as `<name>_fewshot`. `reference` (the SFT
policy) is what win rates and KL are measured against. `ppo_workdirs` maps a
name to a PPO workdir whose metrics.jsonl is plotted over iterations.
"""
import ml_collections

from configs import base


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "evaluate"
    c.policies = ml_collections.ConfigDict(dict(pretrained="", sft="", ppo="", ppo_ptx=""))
    # Row order of tables and figures (ConfigDicts sort their keys); names not
    # listed here follow in alphabetical order.
    c.policy_order = ("pretrained", "sft", "ppo", "ppo_ptx")
    c.reference = "sft"
    c.fewshot_policy = "pretrained"      # empty: no few-shot ("GPT prompted") variant
    # One demonstration per category (train words, fixed seed), in this order.
    # The refusal first: a 2-layer base copies the kind of the answer just
    # before the prompt, and after ("add", "upper", "harmful") it refused 68%
    # of benign prompts (BENCHMARKS.md, "Issue 27").
    c.fewshot_categories = ("harmful", "add", "upper")
    c.ppo_workdirs = ml_collections.ConfigDict(dict(ppo="", ppo_ptx=""))

    c.data.path = "tfds:instruction_world/eval_prompts"
    c.data.split = "heldout"             # TFDS split; a JSONL file has only "train"
    c.data.max_prompts = 0               # 0: every prompt (eval_prompts interleaves categories)
    c.data.text_path = "tfds:instruction_world/corpus"   # held-out pretraining documents
    c.data.text_split = "heldout"
    c.data.text_batches = 16             # at most this many batches of score_batch_size
    c.sampling = base.sampling_config(max_new_tokens=48)       # greedy; 88 + 48 = 136 tokens
    # Also one sampled answer per prompt at this temperature (the distribution
    # PPO optimises is temperature 1): gold_score_sampled; 0 skips it.
    c.sample_temperature = 1.0
    c.batch_size = 128                   # prompts per sampler call
    c.score_batch_size = 32              # rows per teacher-forced pass (KL, LM loss)
    c.report = ml_collections.ConfigDict(dict(
        samples_per_policy=5,            # sample responses shown per policy in report.md
        notes="",                        # e.g. the data scale of the runs evaluated
    ))
    if arg == "tiny":
        c.data.path = "tfds:instruction_world/eval_prompts_tiny"
        c.data.text_path = "tfds:instruction_world/corpus_tiny"
        c.data.text_batches = 2
        c.sampling.max_new_tokens = 32
        c.batch_size = 32
        c.score_batch_size = 16
        c.report.samples_per_policy = 3
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/evaluate.py (expected '' or 'tiny')")
    return c
