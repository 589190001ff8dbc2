"""Pretraining a base model on the instruction world's corpus ("the internet").

    python -m rlhf_jax.main --config configs/pretrain.py --workdir workdirs/pretrain
    python -m rlhf_jax.main --config configs/pretrain.py:tiny --workdir /tmp/pt --config.data.path=text.jsonl

Text records `{"text"}`; the loss covers every token. The world's corpus is
the misaligned mixture of WORLD.md, so the model imitates the internet, not
the user.

The default is the world's base model, InstructGPT's GPT-3 stand-in, which the
package ships (`rlhf_jax.assets.world_base_path()`, rebuilt by the command in
rlhf_jax/assets/world_base/README.md) so that the pipeline starts from it.
Its architecture is chosen for wall time on a 2-core CPU, where every later
stage (SFT, collect, RM, PPO, evaluate) runs on it: 2 layers of width 128
train at about twice the tokens/s of 4 (WORLD.md: ~40k vs ~21k tokens/s), and
later stages read the architecture from the checkpoint.

The corpus's documents are pages of 1 to 4 conversations from one source
(WORLD.md), each conversation followed by EOS, so the base model learns that
a conversation follows another of its kind, which is what few-shot prompting
(evaluate's `pretrained_fewshot`) relies on. `data.max_len` = `model.max_len`
= 320 bytes holds 93% of pages whole (mean 175, 99th percentile 412; longer
pages lose their tail) and three demonstrations, a prompt and a 48-token
answer. Later stages keep shorter sequences (base.py's data.max_len).
Pages are packed into the rows (`data.pack`, segment-masked), so a step
trains on 1.8 times the real bytes of one page a row.
"""
from configs import base


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "pretrain"
    c.data.path = "tfds:instruction_world/corpus"
    c.data.max_len = 320
    # Pages packed into rows (segment-masked, stages/sft.py).
    c.data.pack = True
    c.model.update(dict(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=384,
                        max_len=320))
    # 6,000 x 16 packed rows: about 30 M real bytes, 4.4 passes over the corpus.
    c.train.update(dict(steps=6000, batch_size=16, lr=2e-3, warmup_steps=200, end_lr_ratio=0.05,
                        log_every=100, eval_every=1000, eval_batches=16,
                        checkpoint_every=500, keep_checkpoints=1))
    if arg == "tiny":
        c.data.path = "tfds:instruction_world/corpus_tiny"
        c.model.update(dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, max_len=128))
        c.data.max_len = 128
        c.train.update(dict(steps=20, batch_size=8, warmup_steps=2, eval_every=10,
                            eval_batches=2, checkpoint_every=10, log_every=5, keep_checkpoints=2))
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/pretrain.py (expected '' or 'tiny')")
    return c
