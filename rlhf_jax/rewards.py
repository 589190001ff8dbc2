"""Where an RL stage's reward comes from, when it is not a reward model.

PPO and GRPO score a rollout with the RM (`reward_from`: the score head at
the last token, stages.policy_gradient.rm_scores) or with a Python function
(`reward_fn`): "world" is the instruction world's gold labeler, a verifiable
reward (RLVR), handed to the stage as its `judge`; "package.module:function"
is any function `(prompt, response cut at EOS, finished) -> float`. A Python
reward reads the sampled tokens on the host, so an iteration that uses one
waits for its own sampling.

`gold_scorer` is the same judge used as a metric: the mean gold score of an
iteration's rollouts (`<stage>/gold_score`), whatever the reward.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import jax
import numpy as np

from rlhf_jax import distributed
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.errors import ConfigError

Reward = Callable[[str, str, bool], float]


def python_reward(spec: str, judge: Optional[Reward] = None) -> Reward:
    """`reward_fn`: "world" is `judge` (the gold labeler the dispatcher hands
    in, rlhf_jax.world.gold_score); "package.module:function" imports a
    function `(prompt, response, finished) -> float` (response cut at EOS)."""
    if spec == "world":
        if judge is None:
            raise ConfigError("reward_fn='world': this run was given no world judge")
        return judge
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"reward_fn={spec!r}: expected 'world' or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward_fn={spec!r}: cannot load it ({e})") from e
    if not callable(fn):
        raise ConfigError(f"reward_fn={spec!r} is not callable")
    return fn


def check_one_reward(stage: str, reward_from: str, reward_fn: str):
    """Exactly one of the two reward sources is set."""
    if bool(reward_from) == bool(reward_fn):
        raise ConfigError(
            f"{stage} needs exactly one reward: --config.reward_from=<RM workdir> or "
            f"--config.reward_fn=world (or package.module:function); got reward_from="
            f"{reward_from!r}, reward_fn={reward_fn!r}")


def _judged(reward: Reward, prompts, indices, tok, response_tokens, repeats: int
            ) -> list[float]:
    texts = [prompts[i]["prompt"] for i in indices for _ in range(repeats)]
    return [float(reward(prompt, *tokenizers.decode_response(tok, row)))
            for prompt, row in zip(texts, np.asarray(response_tokens))]


def host_scores(reward: Reward, prompts, indices, tok, response_tokens, repeats: int = 1
                ) -> np.ndarray:
    """float32 [rows]: `reward(prompt, response, finished)` of this process's
    rollouts, `repeats` consecutive rows per prompt of `indices` (GRPO's
    groups; 1 for PPO)."""
    return np.asarray(_judged(reward, prompts, indices, tok, response_tokens, repeats),
                      np.float32)


def host_reward_fn(reward: Reward, runtime, prompt_loader, tok, repeats: int = 1):
    """`host_reward(it, response_tokens)`: iteration `it`'s rollouts judged by
    `reward` on the host, each process its own rows of the global batch
    (process-major, `repeats` consecutive rows a prompt), returned as a global
    array [rows] on the batch devices."""
    def host_reward(it: int, response_tokens):
        local = np.split(distributed.gather(response_tokens), jax.process_count())[
            jax.process_index()]
        return runtime.global_batch({"scores": host_scores(
            reward, prompt_loader.source, prompt_loader.record_indices(it), tok, local,
            repeats)})["scores"]
    return host_reward


def gold_scorer(config, prompt_loader, tok, judge: Optional[Reward], repeats: int = 1):
    """`gold(it, tokens)`: the mean gold score of iteration `it`'s rollouts,
    when a judge is given and the prompts are its world's (single process:
    the whole batch must be on this host). `repeats`: consecutive rollouts
    per prompt (GRPO's groups)."""
    if judge is None or not config.train.gold_eval or jax.process_count() > 1:
        return None
    prompts = prompt_loader.source
    try:
        judge(prompts[0]["prompt"], "", True)
    except ValueError:
        return None

    def gold(it: int, tokens) -> float:
        return float(np.mean(_judged(judge, prompts, prompt_loader.record_indices(it), tok,
                                     tokens, repeats)))
    return gold
