"""GRPO (or RLOO) from the SFT policy, against the RM or a verifiable reward.

    # against the reward model (as PPO):
    python -m rlhf_jax.main --config configs/grpo.py --workdir workdirs/grpo \
        --config.init_from=workdirs/sft --config.reward_from=workdirs/rm
    # against the world's gold labeler, a verifiable reward (RLVR):
    python -m rlhf_jax.main --config configs/grpo.py --workdir workdirs/grpo_gold \
        --config.init_from=workdirs/sft --config.reward_fn=world
    # RLOO's leave-one-out baseline, the KL in the reward:
    ... --config.algo.advantage=rloo --config.algo.kl_in=reward

`train.steps` counts iterations, `train.batch_size` prompts per iteration,
each answered `algo.group_size` times (64 rollouts by default, as many as
PPO's). No value model. `reward_fn` is "world" or "package.module:function"
taking (prompt, response cut at EOS, finished) -> float; exactly one of
`reward_from` and `reward_fn` is set. Defaults are DeepSeekMath's where they
carry over (clip 0.2, beta 0.04 on k3 in the loss); the learning rate is the
main job's PPO's (these models have a few million parameters).
"""
import ml_collections

from configs import base


def algo_config(**overrides):
    h = ml_collections.ConfigDict(dict(
        group_size=4,            # G responses per prompt, one sampler call
        advantage="grpo",        # grpo: (r - mean) / std of the group; rloo: leave-one-out
        scale_by_std=True,       # grpo only; False is Dr. GRPO's r - mean
        clip=0.2,
        kl_coef=0.04,            # beta
        kl_in="loss",            # "loss": beta x k3 per token; "reward": score - beta x sum k1
        epochs=1,
        minibatches=4,           # optimizer updates per epoch
        missing_eos_penalty=1.0, # off the RM score of a response without EOS (not reward_fn's)
    ))
    h.update(overrides)
    return h


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "grpo"
    c.reward_from = ""
    c.reward_fn = ""
    c.data.path = "tfds:instruction_world/ppo_prompts"
    c.train.gold_eval = True     # log the rollouts' gold score (world prompts)
    c.algo = algo_config()
    c.sampling = base.sampling_config(greedy=False, temperature=1.0, max_new_tokens=48)
    c.train.update(dict(steps=40, batch_size=16, lr=3e-5, warmup_steps=0, end_lr_ratio=1.0,
                        weight_decay=0.0, checkpoint_every=20, log_every=1))
    if arg == "tiny":
        c.data.path = "tfds:instruction_world/ppo_prompts_tiny"
        c.algo.update(dict(minibatches=2))
        c.sampling.max_new_tokens = 12
        c.train.update(dict(steps=4, batch_size=8, checkpoint_every=2))
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/grpo.py (expected '' or 'tiny')")
    return c
