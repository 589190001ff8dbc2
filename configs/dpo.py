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
the world's decoders have under a million parameters (the base 0.46M).
Measured on the world's default model (the shipped base SFT'd 150 steps on
2,048 demonstrations: greedy gold score 0.766), one epoch of 1,024 synthetic
world comparisons (correct answer / wrong answer / refusal, or refusal /
compliance, ranked by a simulated labeler), batch 32 (32 steps), k_max 3,
beta 0.1; on 128 held-out comparisons the implicit reward's accuracy
against the labeler and the gold labeler, the eval loss, and the greedy
policy's mean gold score on their prompts:

    lr            1e-5   3e-5   5e-5   1e-4   3e-4   1e-3   3e-3
    accuracy      0.804  0.821  0.821  0.816  0.827  0.813  0.741
    gold acc.     0.899  0.923  0.923  0.935  0.952  0.914  0.842
    eval loss     0.589  0.525  0.492  0.446  0.423  0.431  0.640
    greedy gold   0.758  0.758  0.758  0.758  0.344  0.260  -0.375

The chosen responses' likelihood falls at every lr (both implicit rewards
are negative at the end: DPO's known drift); from 3e-4 the greedy policy
collapses while its implicit reward still ranks well. 3e-5 learns most of
the ranking and stays 10x below the collapse, which more steps (a larger
comparisons file, more epochs) bring closer; use about 1e-6 for
billion-parameter `model.pretrained` models, as the paper did.
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
    c.train.update(dict(steps=0, batch_size=64, lr=3e-5, warmup_steps=5, end_lr_ratio=0.1,
                        weight_decay=0.0, eval_every=100, eval_batches=8, checkpoint_every=100))
    if arg == "tiny":
        c.data.k_max = 4
        c.train.update(dict(batch_size=8, warmup_steps=2, eval_every=10, eval_batches=2,
                            checkpoint_every=10, log_every=5))
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/dpo.py (expected '' or 'tiny')")
    return c
