"""Stage `generate`: answer `{"prompt"}` lines with a checkpoint's policy.

Also home of the sampling budget (`sampling_budget`): how many prompt and
new tokens fit the model's context when a config leaves them to derive.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax

from rlhf_jax import inference, sharding
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.data import jsonl
from rlhf_jax.errors import ConfigError


PROMPT_KEY = "data.max_prompt_len"
NEW_TOKENS_KEY = "sampling.max_new_tokens"


def prompt_limit(context: int, max_prompt_len: int, max_new_tokens: int) -> tuple[int, str]:
    """(the most tokens a prompt may have, what sets that limit) under the settings.

    A setting <= 0 means "derive" (see `sampling_budget`): an unset prompt
    budget leaves room for the set new tokens, or for at least one.

    Raises:
      ConfigError: the settings given cannot fit in `context` tokens
        (checkable before any prompt is read), naming the keys to change.
    """
    if max_prompt_len > 0 and max_new_tokens > 0:
        if max_prompt_len + max_new_tokens > context:
            raise ConfigError(
                f"{PROMPT_KEY} + {NEW_TOKENS_KEY} = {max_prompt_len} + {max_new_tokens} exceeds "
                f"the model's context {context}: lower --config.{PROMPT_KEY} or "
                f"--config.{NEW_TOKENS_KEY} (0 derives {PROMPT_KEY} from the prompts and "
                f"{NEW_TOKENS_KEY} from the rest of the context)")
        return max_prompt_len, f"{PROMPT_KEY}={max_prompt_len}"
    if max_prompt_len > 0:
        if max_prompt_len >= context:
            raise ConfigError(
                f"{PROMPT_KEY}={max_prompt_len} leaves no new tokens in the model's context "
                f"{context}: lower --config.{PROMPT_KEY} (0 derives it from the prompts)")
        return max_prompt_len, f"{PROMPT_KEY}={max_prompt_len}"
    if max_new_tokens > 0:
        if max_new_tokens >= context:
            raise ConfigError(
                f"{NEW_TOKENS_KEY}={max_new_tokens} leaves no room for a prompt in the model's "
                f"context {context}: lower --config.{NEW_TOKENS_KEY} (0 takes the rest of the "
                f"context after the longest prompt)")
        return (context - max_new_tokens,
                f"the model's context {context} less {NEW_TOKENS_KEY}={max_new_tokens}")
    return context - 1, f"the model's context {context} less one new token"


def sampling_budget(prompt_lens: Sequence[int], context: int, max_prompt_len: int,
                    max_new_tokens: int) -> tuple[int, int]:
    """(max_prompt_len, max_new_tokens) to sample `prompt_lens`-token prompts with.

    Args:
      prompt_lens: the tokenized length of every prompt to be sampled.
      context: the model's context in tokens (`model.cfg.max_len`).
      max_prompt_len, max_new_tokens: the config's values; <= 0 derives one:
        the prompt budget as the longest prompt given, the new tokens as the
        rest of the context after the prompt budget. A value set is kept.

    Raises:
      ConfigError: the values set cannot fit the context, or a prompt
        is longer than they allow; the message names the keys to change.
    """
    limit, why = prompt_limit(context, max_prompt_len, max_new_tokens)
    longest = max(prompt_lens, default=0)
    if longest > limit:
        keys = [k for k, v in ((PROMPT_KEY, max_prompt_len), (NEW_TOKENS_KEY, max_new_tokens))
                if v > 0]
        change = (" or ".join(f"--config.{k}" for k in keys) + " (0 derives it)") if keys else ""
        raise ConfigError(
            f"the longest prompt is {longest} tokens, more than {limit} ({why}): "
            + (f"change {change}, or " if change else "")
            + "shorten or drop the longest prompts (--config.data.drop_invalid=True)")
    prompt_len = max_prompt_len if max_prompt_len > 0 else max(longest, 1)
    new_tokens = max_new_tokens if max_new_tokens > 0 else context - prompt_len
    return prompt_len, new_tokens


def run(config, workdir: str):
    for key in ("checkpoint", "prompts", "output"):
        if not config.get(key):
            raise ConfigError(f"generate needs --config.{key}=...")
    runtime = sharding.Runtime(config)
    model, params, tok = inference.load_policy(config, config.checkpoint, runtime)
    context = model.cfg.max_len
    set_prompt_len = int(config.data.max_prompt_len)
    set_new_tokens = int(config.sampling.max_new_tokens)
    # Settings that cannot fit fail before the prompts are read; a prompt
    # over the limit is a bad line, reported with file and line number.
    limit, why = prompt_limit(context, set_prompt_len, set_new_tokens)
    check = lambda r: (None if len(tokenizers.encode_prompt(tok, r["prompt"])) <= limit
                       else f"prompt longer than {limit} tokens ({why})")
    records, _ = jsonl.read_jsonl(config.prompts, "prompts", drop_invalid=config.data.drop_invalid,
                                  check=check)
    prompts = [r["prompt"] for r in records]
    max_prompt_len, max_new_tokens = sampling_budget(
        [len(tokenizers.encode_prompt(tok, p)) for p in prompts], context, set_prompt_len,
        set_new_tokens)
    answers = inference.respond(runtime, model, params, tok, prompts, config.sampling, max_prompt_len,
                      int(config.batch_size), jax.random.PRNGKey(config.seed),
                      max_new_tokens=max_new_tokens)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
        with open(config.output, "w") as f:
            for p, (r, _) in zip(prompts, answers):
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
        print(f"[generate] wrote {len(prompts)} responses to {config.output}", flush=True)
