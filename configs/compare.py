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

The budgets, chosen so that a difference is the method's, not its budget's
(BENCHMARKS.md, "The compare table"):

  method     data it learns from                   budget
  ppo_ptx    2,560 sampled episodes                40 iterations x 64 prompts;
                                                   2 epochs x 4 minibatches (320 updates)
  grpo       2,560 sampled episodes                40 iterations x 8 prompts x G=8;
                                                   2 epochs x 4 minibatches (320 updates)
  grpo_gold  2,560 sampled episodes                as grpo
  dpo        the RM's 3,040 training comparisons   one epoch: 48 steps x 64 records
             (K=9, every ranked pair)              (beta and lr from a sweep)

The SFT policy, the comparisons and the RM are the main job's, so its
PPO-ptx is this one's; every RL method samples at temperature 1 with the
main job's PPO learning rate. `evaluate` judges SFT and the four policies
on the held-out prompts (temperature-1 samples and greedy, win rate against
SFT, KL to SFT, each with its 95% interval over prompts, and the paired
differences between methods): `eval.json`, `report.md`. The pretrained
base and its few-shot variant are left out (the main job reports them).
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
        # DPO: configs/dpo.py's one epoch (48 steps of 64 records), beta 0.1
        # and lr 1e-4 (its sweep: BENCHMARKS.md), evaluated once at its end.
        c.dpo.train.update(dict(warmup_steps=2, eval_every=1000, checkpoint_every=16))
    return c
