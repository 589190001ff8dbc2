"""PPO-ptx, GRPO on the RM, GRPO on the gold reward (RLVR) and DPO, from one
SFT policy and one set of comparisons, judged side by side.

    python -m rlhf_jax.main --config configs/compare.py --workdir workdirs/compare
    python -m rlhf_jax.main --config configs/compare.py:tiny --workdir /tmp/compare   # minutes

The main job's pipeline (configs/instructgpt.py: base -> SFT -> collect ->
RM) with other methods after the RM (`methods`, stages/instructgpt.py
METHODS):

  ppo_ptx    PPO with the KL penalty and the pretraining mix, on the RM;
  grpo       GRPO on the RM: G samples a prompt, group-normalised rewards,
             no value model;
  grpo_gold  GRPO on the world's gold labeler as the reward (a verifiable
             reward, RLVR): what a method reaches without a learned RM;
  dpo        DPO on the comparisons the RM was trained on, no RM at all.

Every RL method samples 64 rollouts an iteration for 40 iterations at the
main job's PPO learning rate; DPO takes a sixth of the comparisons (8
steps of 64 records); `evaluate` judges SFT and the four policies on
the held-out prompts (greedy and temperature-1 samples, win rate against
SFT, KL to SFT): `eval.json`, `report.md`. The pretrained base and its
few-shot variant are left out (the main job reports them).
"""
import ml_collections

from configs import dpo, grpo, instructgpt

POLICIES = ("sft", "ppo_ptx", "grpo", "grpo_gold", "dpo")


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/compare.py (expected '' or 'tiny')")
    c = instructgpt.get_config(arg)
    c.methods = POLICIES[1:]
    c.grpo = grpo.get_config(arg)
    c.dpo = dpo.get_config(arg)
    c.evaluate.policies = ml_collections.ConfigDict({name: "" for name in POLICIES})
    c.evaluate.policy_order = POLICIES
    c.evaluate.fewshot_policy = ""
    c.evaluate.ppo_workdirs = ml_collections.ConfigDict(dict(ppo_ptx=""))
    if arg == "tiny":
        c.grpo.train.steps = c.ppo.train.steps
    else:
        # GRPO: 8 prompts x G=8 = 64 rollouts an iteration, 2 epochs of 4
        # minibatches, as the main job's PPO (64 prompts, 2 x 4). At G=4 three
        # groups in four were 4 equal answers of the peaked SFT policy (no
        # signal: grpo/zero_std_groups 0.75, seed 0).
        c.grpo.train.update(dict(steps=c.ppo.train.steps, batch_size=8, lr=c.ppo.train.lr))
        c.grpo.algo.update(dict(group_size=8, epochs=c.ppo.algo.epochs,
                                minibatches=c.ppo.algo.minibatches))
        # DPO: 8 steps x 64 records at lr 1e-4, within the job's 20 minutes
        # (3e-4 collapsed the policy; the lr and length runs: BENCHMARKS.md).
        c.dpo.train.update(dict(steps=8, batch_size=64, lr=1e-4, warmup_steps=2, eval_every=8,
                                checkpoint_every=8))
        # The RM: the SFT network for 1 epoch, evaluated once at its end, so
        # that the four methods fit 20 minutes (BENCHMARKS.md).
        c.rm.expand_layers = 0
        c.rm.train.update(dict(epochs=1.0, eval_every=1000))
    return c
