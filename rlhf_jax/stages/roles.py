"""The models an RL stage needs, loaded once: the policy and its frozen
reference, the value model, the reward model (or none, with a Python
reward), the tokenizer.

Each checkpoint is opened once (checkpoint.open_source: resolved, its meta
read once) and its params restored once, straight into this run's
shardings. The reference is a device copy of the policy's starting params,
and the reward model a device copy of the value model's when both start
from the RM (PPO's choice), so that the training state can be donated to
the update without touching them. Every check of how the roles fit
together is here: the policy's checkpoint is a language model, the reward
model a finished, bias-normalised RM, both speak one tokenizer (the same
vocabulary, not only the same size), and prompt + response fit the
model's context. PPO and GRPO load through `load` (GRPO without a value
model); DPO, which needs only its policy's start, opens init_from once in
stages/dpo.py (`open_init`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from rlhf_jax import checkpoint
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import resolve
from rlhf_jax.models.transformer import ModelConfig, Transformer


@dataclasses.dataclass
class Roles:
    tok: Any
    policy_meta: dict                   # init_from's checkpoint meta
    policy_cfg: ModelConfig             # dropout off (RL is deterministic)
    policy_params: Any                  # the policy's start, in the run's shardings
    policy_shardings: Any
    ref_params: Any                     # the frozen reference: a copy of policy_params
    value_cfg: Optional[ModelConfig] = None
    value_params: Any = None            # the value model's start (the RM's, or SFT's + a head)
    value_shardings: Any = None
    reward_cfg: Optional[ModelConfig] = None
    reward_params: Any = None           # the frozen RM: a copy of value_params, or restored


def open_checkpoint(path: str, what: str) -> checkpoint.Source:
    """The checkpoint `what`=`path` names, opened once (resolved once, meta
    read once); a ConfigError naming the key where there is none."""
    try:
        return checkpoint.open_source(path)
    except FileNotFoundError:
        raise ConfigError(f"{what}={path!r}: no finished checkpoint there") from None


def open_policy(path: str, what: str = "init_from") -> checkpoint.Source:
    """init_from's checkpoint, opened once; a language model's."""
    source = open_checkpoint(path, what)
    if source.meta.get("model", {}).get("head") == "scalar":
        raise ConfigError(f"{what}={path!r} is a reward model checkpoint; give the policy's "
                          f"(SFT) workdir")
    return source


def open_reward(path: str) -> checkpoint.Source:
    """reward_from's checkpoint, opened once: a finished, bias-normalised RM
    (an SFT checkpoint's scalar head would be fresh and score everything 0)."""
    source = open_checkpoint(path, "reward_from")
    meta = source.meta
    if meta.get("model", {}).get("head") != "scalar" or meta.get("stage") not in ("rm", None):
        raise ConfigError(
            f"reward_from={path!r} is a {meta.get('stage') or 'language model'} "
            f"checkpoint, not a reward model: its scalar head would be freshly initialised and "
            f"score every response 0; give the workdir of an rm stage")
    if not meta.get("bias_normalized"):
        raise ConfigError(
            f"reward_from={path!r}: the RM's latest checkpoint is not bias-normalised "
            "(its run did not finish); rerun the rm stage to completion")
    return source


def check_tokenizers(config, tok, rm_tok):
    if tokenizers.signature(rm_tok) != tokenizers.signature(tok):
        raise ConfigError(
            f"reward_from={config.reward_from!r} has another tokenizer than init_from="
            f"{config.init_from!r}: the RM would read the policy's token ids as other text")


def _copy(tree):
    """A device copy in the same shardings (the original may be donated)."""
    return jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x.copy(), t))(tree)


def load(config, runtime, *, context: int, value: bool = True, value_seed: int = 0) -> Roles:
    """The roles of an RL stage: from `init_from` the policy and its
    reference; with `value`, the value model from `reward_from` (or, with a
    Python reward, from the SFT checkpoint with a fresh scalar head drawn
    from `value_seed`, as train_state.create_train_state draws one); with
    `reward_from`, the reward model. `context`: prompt + response tokens,
    which must fit the model. Call under `runtime.activations()`."""
    sft = open_policy(config.init_from)
    rm = open_reward(config.reward_from) if config.get("reward_from") else None
    policy_cfg, tok, _ = resolve.stage_model(config, "lm", sft.meta)
    resolve.check_context(policy_cfg, context, "data.max_prompt_len + sampling.max_new_tokens")
    policy_cfg = policy_cfg.replace(dropout=0.0)
    scalar_cfg = None
    if rm is not None:
        scalar_cfg, rm_tok, _ = resolve.stage_model(config, "scalar", rm.meta)
        check_tokenizers(config, tok, rm_tok)
        scalar_cfg = scalar_cfg.replace(dropout=0.0)
    elif value:
        scalar_cfg = policy_cfg.replace(head="scalar")

    policy, policy_sh = checkpoint.restore_model_params(sft, runtime, Transformer(policy_cfg))
    roles = Roles(tok=tok, policy_meta=sft.meta, policy_cfg=policy_cfg, policy_params=policy,
                  policy_shardings=policy_sh, ref_params=_copy(policy))
    if value:
        init_rng = jax.random.split(jax.random.PRNGKey(value_seed))[0]
        roles.value_cfg = scalar_cfg
        roles.value_params, roles.value_shardings = checkpoint.restore_model_params(
            rm or sft, runtime, Transformer(scalar_cfg), init_rng)
    if rm is not None:
        roles.reward_cfg = scalar_cfg
        roles.reward_params = (_copy(roles.value_params) if value else
                               checkpoint.restore_model_params(rm, runtime,
                                                               Transformer(scalar_cfg))[0])
    return roles
