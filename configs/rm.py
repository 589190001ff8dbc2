"""Reward model on K-wise rankings (InstructGPT step 2; section 3.5, appendix C.2).

    python -m rlhf_jax.main --config configs/rm.py --workdir workdirs/rm \
        --config.init_from=workdirs/sft --config.data.path=workdirs/collect/comparisons.jsonl \
        --config.data.eval_path=workdirs/collect/comparisons_eval.jsonl
    python -m rlhf_jax.main --config configs/rm.py:tiny --workdir /tmp/rm \
        --config.init_from=/tmp/sft --config.data.path=comparisons.jsonl

Comparisons are `{"prompt", "responses": [K], "ranks": [K]}` (0 = best, ties
allowed, 2 <= K <= data.k_max) or pairwise `{"prompt", "chosen", "rejected"}`,
as a `.jsonl` file or `tfds:NAME/CONFIG`; the world has no static comparisons
(they are samples of the SFT policy ranked by a simulated labeler, written by
the `collect` stage, configs/collect.py), so `data.path` has no default.
Without `data.eval_path` a `data.eval_fraction` split of the prompts is held
out. The RM starts from the SFT checkpoint (`init_from`) with a fresh scalar
head.

Training defaults follow the paper where they carry over: one epoch
(`train.steps=0` derives the step count from the data size, `train.epochs`
passes; the paper found more epochs overfit), cosine decay, all C(K, 2) pairs
of a prompt in one batch element. The learning rate does not carry over: the
paper's 9e-6 is for a 6B RM, while the world's decoders have a few million
parameters and a fresh zero-initialised head to move in one epoch. Measured
on the `:tiny` model (SFT'd 30 steps; K=4 corpus responses ranked by the
simulated labeler; batch 16; gold accuracy on held-out prompts):

    lr              1e-5   1e-4   3e-4   1e-3   3e-3
    64 steps        0.712  0.727  0.749  0.748  0.742   (eval loss 0.693 at 1e-5: barely trained)
    256 steps              0.751  0.767  0.756

hence 3e-4; use about 9e-6 for billion-parameter `model.pretrained` models, as
the paper did. After training the head's bias is set so that the
demonstrations (`data.demos_path`, a seeded sample of `data.demos_records`
of them) score mean 0 (section 3.5).
"""
from configs import base


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "rm"
    c.data.path = ""                 # comparisons: .jsonl or tfds:NAME/CONFIG
    # Layers added on top of the init_from network (block expansion, LLaMA Pro:
    # copies of its layers with their output projections zeroed, so the RM
    # starts as the SFT network). They read the SFT's last-layer features at
    # every position, its predictions of each next token included, which a
    # verifier of the response can compare with the tokens written.
    c.expand_layers = 0
    c.data.k_max = 9                 # responses per prompt at most (slots per batch element)
    # Optional held-out comparisons of one policy's samples alone (collect's
    # comparisons_eval_sft.jsonl): logged with the suffix _sft
    # (rm/gold_accuracy_sft beside rm/gold_accuracy on data.eval_path).
    c.data.eval_sft_path = ""
    c.data.demos_path = "tfds:instruction_world/demonstrations"
    c.data.demos_records = 1024      # demonstrations scored for the bias normalisation
    c.train.epochs = 1.0             # passes over the comparisons when train.steps is 0 or -1
    c.train.update(dict(steps=0, batch_size=64, lr=3e-4, warmup_steps=20, end_lr_ratio=0.1,
                        weight_decay=0.01, eval_every=100, eval_batches=8, checkpoint_every=100))
    if arg == "tiny":
        c.data.k_max = 4
        c.data.demos_path = "tfds:instruction_world/demonstrations_tiny"
        c.data.demos_records = 256
        c.train.update(dict(batch_size=8, warmup_steps=2, eval_every=10, eval_batches=2,
                            checkpoint_every=10, log_every=5))
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/rm.py (expected '' or 'tiny')")
    return c
