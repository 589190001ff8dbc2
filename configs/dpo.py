"""Direct Preference Optimization on the RM's comparisons (Rafailov et al. 2023).

    python -m rlhf_jax.main --config configs/dpo.py --workdir workdirs/dpo \
        --config.init_from=workdirs/sft --config.data.path=workdirs/collect/comparisons.jsonl \
        --config.data.eval_path=workdirs/collect/comparisons_eval.jsonl
    python -m rlhf_jax.main --config configs/dpo.py:tiny --workdir /tmp/dpo \
        --config.init_from=/tmp/sft --config.data.path=comparisons.jsonl

The comparisons the `rm` stage reads (configs/rm.py): `{"prompt",
"responses": [K], "ranks": [K]}` (0 = best, ties allowed, 2 <= K <=
data.k_max) or pairwise `{"prompt", "chosen", "rejected"}`, as `.jsonl` or
`tfds:NAME/CONFIG`; `data.path` has no default (the world's comparisons are
written by the `collect` stage). Without `data.eval_path` a
`data.eval_fraction` split of the prompts is held out. The policy and the
frozen reference both start from the SFT checkpoint (`init_from`); the
result is a policy checkpoint that evaluate, generate and PPO take as
`init_from`.

`algo.beta` is the paper's beta, the weight of the implicit KL constraint to
the reference (0.1, the paper's main setting). One epoch by default
(`train.steps` 0: `train.epochs` passes), as the RM. The learning rate does
not carry over from the paper (5e-7 to 1e-6 for billion-parameter models):
the world's decoders have under a million parameters. 1e-4 is the best of a
sweep over beta and lr on the main job's comparisons (BENCHMARKS.md,
"DPO's beta and learning rate"); use about 1e-6 for billion-parameter
`model.pretrained` models, as the paper did.
"""
import ml_collections

from configs import base


def algo_config(**overrides):
    h = ml_collections.ConfigDict(dict(
        beta=0.1,                # weight of the KL constraint in r = beta * log(pi / pi_ref)
    ))
    h.update(overrides)
    return h


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "dpo"
    c.data.path = ""                 # comparisons: .jsonl or tfds:NAME/CONFIG
    c.data.k_max = 9                 # responses per prompt at most (slots per batch element)
    c.algo = algo_config()
    c.train.epochs = 1.0             # passes over the comparisons when train.steps is 0
    c.train.update(dict(steps=0, batch_size=64, lr=1e-4, warmup_steps=5, end_lr_ratio=0.1,
                        weight_decay=0.0, eval_every=100, eval_batches=8, checkpoint_every=100))
    if arg == "tiny":
        c.data.k_max = 4
        c.train.update(dict(batch_size=8, warmup_steps=2, eval_every=10, eval_batches=2,
                            checkpoint_every=10, log_every=5))
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/dpo.py (expected '' or 'tiny')")
    return c
