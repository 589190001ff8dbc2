"""PPO against the reward model, with KL penalty and pretraining mix (InstructGPT step 3).

    python -m rlhf_jax.main --config configs/ppo.py --workdir workdirs/ppo_ptx \
        --config.init_from=workdirs/sft --config.reward_from=workdirs/rm
    # plain PPO (no pretraining mix):
    python -m rlhf_jax.main --config configs/ppo.py --workdir workdirs/ppo ... --config.algo.ptx_coef=0
    # against the world's gold labeler instead of an RM (a verifiable reward):
    python -m rlhf_jax.main --config configs/ppo.py --workdir workdirs/ppo_gold \
        --config.init_from=workdirs/sft --config.reward_fn=world

The policy and the frozen reference start from the SFT checkpoint
(`init_from`); the frozen reward model and the value model (initialised from
it) from the RM checkpoint (`reward_from`). `train.steps` counts PPO
iterations, `train.batch_size` rollouts per iteration. Defaults are the
paper's where they fit (beta 0.02, clip 0.2, EMA 0.992 off by default,
gamma 1, lambda 0.95; ptx_coef is not the paper's gamma_ptx, see below).
PPO's hyperparameters are in the `algo` block; rollouts are sampled with the
`sampling` block every sampling stage has (temperature 1 by default; top-k
and top-p are refused, as PPO's ratio is computed on the full softmax).
"""
import ml_collections

from configs import base


def algo_config(**overrides):
    h = ml_collections.ConfigDict(dict(
        kl_coef=0.02,            # beta: per-token KL penalty to the SFT policy
        adaptive_kl=False,       # Ziegler et al. proportional controller
        kl_target=6.0,           # nats per response
        # Episodes over which the controller can move beta by about e^0.2 at
        # full error. Ziegler et al.'s 10,000 suits millions of episodes; at
        # 10,000 a 40 x 64-episode run moves beta by 5% at most, at 500 by 2.7x.
        kl_horizon=500.0,
        clip=0.2,
        vf_clip=0.2,
        vf_coef=1.0,             # the value model is a separate network: this scales its loss
        value_lr=1e-4,
        gamma=1.0,
        lam=0.95,
        whiten_advantages=True,
        epochs=1,
        minibatches=4,
        # Weight of the pretraining LM loss (a per-token mean) against the
        # clipped policy loss (a per-token mean of whitened advantages); 0
        # gives plain PPO. Not the paper's gamma_ptx = 27.8, which weighs a
        # sequence log-likelihood against an episode's return: at 27.8 here
        # the LM gradient was ~25x the policy's and the reward barely moved
        # the policy (BENCHMARKS.md).
        ptx_coef=1.0,
        missing_eos_penalty=1.0, # subtracted from the RM score of a response without EOS
        # EMA of the policy weights, one update per optimizer step, read
        # bias-corrected; 0.992 in the paper, 0 disables it.
        ema_decay=0.0,
    ))
    h.update(overrides)
    return h


def get_config(arg: str = ""):
    c = base.get_base_config()
    c.stage = "ppo"
    c.reward_from = ""
    # Instead of an RM: a Python reward, "world" (the gold labeler: a
    # verifiable reward) or "package.module:function" of (prompt, response,
    # finished) -> float; the value model then starts from init_from.
    c.reward_fn = ""
    c.data.path = "tfds:instruction_world/ppo_prompts"
    c.data.ptx_path = "tfds:instruction_world/corpus"
    c.data.ptx_batch_size = 8    # pretraining rows per minibatch update (ptx_coef > 0)
    c.train.gold_eval = True     # log the gold labeler's score of each rollout (world prompts)
    c.algo = algo_config()
    # world responses are at most 42 tokens with EOS (a flawed `repeat`
    # demonstration, `Sure! ` and 4 x 8 letters). top_k / top_p must stay
    # 0 / 1.0: the ratio and the KL are computed on the full softmax, so
    # filtered sampling is refused (the stage says so).
    c.sampling = base.sampling_config(greedy=False, temperature=1.0, max_new_tokens=48)
    c.train.update(dict(steps=200, batch_size=64, lr=1e-5, warmup_steps=0, end_lr_ratio=1.0,
                        weight_decay=0.0, checkpoint_every=50, log_every=1))
    if arg == "tiny":
        c.data.path = "tfds:instruction_world/ppo_prompts_tiny"
        c.data.ptx_path = "tfds:instruction_world/corpus_tiny"
        c.algo.minibatches = 2
        c.data.ptx_batch_size = 4
        c.sampling.max_new_tokens = 12
        c.train.update(dict(steps=4, batch_size=8, checkpoint_every=2))
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/ppo.py (expected '' or 'tiny')")
    return c
