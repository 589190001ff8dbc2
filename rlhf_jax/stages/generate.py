"""Stage `generate`: answer `{"prompt"}` lines with a checkpoint's policy.

Also home of `respond`, the batched prompt -> response helper that the
collect step and evaluation use too.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
import numpy as np

from rlhf_jax import checkpoint, distributed, sampling
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.data import jsonl, preprocess
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.stages import common


def load_policy(config, path: str, runtime: common.Runtime, head: str = "lm"):
    """(model, params, tokenizer) of a stage checkpoint, sharded on `runtime`."""
    if not checkpoint.has_checkpoint(path):
        raise common.ConfigError(f"no finished checkpoint at {path!r}")
    cfg, tok, _ = common.stage_model(config, head, from_checkpoint=path)
    model = Transformer(cfg)
    with runtime.activations():
        params, _ = common.restore_model_params(path, runtime, model)
    return model, params, tok


def sample_batch(model: Transformer, params, tok, tokens_BxP, mask_BxP, rng, sampling_cfg,
                 max_new_tokens: Optional[int] = None):
    """`sampling.sample` with the settings of a `sampling` config block
    (`max_new_tokens`, where given, replaces the block's: a derived budget)."""
    if max_new_tokens is None:
        max_new_tokens = int(sampling_cfg.max_new_tokens)
    return sampling.sample(
        model, params, tokens_BxP, mask_BxP, rng,
        max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
        pad_id=tok.pad_id, temperature=float(sampling_cfg.temperature),
        top_k=int(sampling_cfg.top_k), top_p=float(sampling_cfg.top_p),
        greedy=bool(sampling_cfg.greedy))


def respond(runtime: common.Runtime, model: Transformer, params, tok, prompts: Sequence[str],
            sampling_cfg, max_prompt_len: int, batch_size: int, rng,
            max_new_tokens: Optional[int] = None) -> list[tuple[str, bool]]:
    """Responses (text cut at EOS, finished) for `prompts`, in order.

    `max_new_tokens` replaces `sampling_cfg.max_new_tokens` where given (a
    budget from `sampling_budget`; the config keeps what the user set).

    Every batch has the same shape (the last is padded with copies), so the
    sampler compiles once.
    """
    n_dev = runtime.mesh.shape["data"] * runtime.mesh.shape["fsdp"]
    batch_size = max(n_dev, batch_size - batch_size % n_dev)
    out: list[tuple[str, bool]] = []
    with runtime.activations():
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            n_real = len(chunk)
            chunk += [chunk[-1]] * (batch_size - n_real)
            ex = [preprocess.prompt_example(tok, {"prompt": p}, max_prompt_len) for p in chunk]
            batch = runtime.global_batch({
                "tokens": np.stack([e["tokens"] for e in ex]),
                "mask": np.stack([e["mask"] for e in ex])})
            res = sample_batch(model, params, tok, batch["tokens"], batch["mask"],
                               jax.random.fold_in(rng, start), sampling_cfg, max_new_tokens)
            tokens = distributed.gather(res.tokens)
            for row in tokens[:n_real]:
                out.append(tokenizers.decode_response(tok, row))
    return out


PROMPT_KEY = "data.max_prompt_len"


def prompt_limit(context: int, max_prompt_len: int, max_new_tokens: int,
                 new_tokens_key: str = "sampling.max_new_tokens") -> tuple[int, str]:
    """(the most tokens a prompt may have, what sets that limit) under the settings.

    A setting <= 0 means "derive" (see `sampling_budget`): an unset prompt
    budget leaves room for the set new tokens, or for at least one.

    Raises:
      common.ConfigError: the settings given cannot fit in `context` tokens
        (checkable before any prompt is read), naming the keys to change.
    """
    if max_prompt_len > 0 and max_new_tokens > 0:
        if max_prompt_len + max_new_tokens > context:
            raise common.ConfigError(
                f"{PROMPT_KEY} + {new_tokens_key} = {max_prompt_len} + {max_new_tokens} exceeds "
                f"the model's context {context}: lower --config.{PROMPT_KEY} or "
                f"--config.{new_tokens_key} (0 derives {PROMPT_KEY} from the prompts and "
                f"{new_tokens_key} from the rest of the context)")
        return max_prompt_len, f"{PROMPT_KEY}={max_prompt_len}"
    if max_prompt_len > 0:
        if max_prompt_len >= context:
            raise common.ConfigError(
                f"{PROMPT_KEY}={max_prompt_len} leaves no new tokens in the model's context "
                f"{context}: lower --config.{PROMPT_KEY} (0 derives it from the prompts)")
        return max_prompt_len, f"{PROMPT_KEY}={max_prompt_len}"
    if max_new_tokens > 0:
        if max_new_tokens >= context:
            raise common.ConfigError(
                f"{new_tokens_key}={max_new_tokens} leaves no room for a prompt in the model's "
                f"context {context}: lower --config.{new_tokens_key} (0 takes the rest of the "
                f"context after the longest prompt)")
        return (context - max_new_tokens,
                f"the model's context {context} less {new_tokens_key}={max_new_tokens}")
    return context - 1, f"the model's context {context} less one new token"


def sampling_budget(prompt_lens: Sequence[int], context: int, max_prompt_len: int,
                    max_new_tokens: int, new_tokens_key: str = "sampling.max_new_tokens"
                    ) -> tuple[int, int]:
    """(max_prompt_len, max_new_tokens) to sample `prompt_lens`-token prompts with.

    Args:
      prompt_lens: the tokenized length of every prompt to be sampled.
      context: the model's context in tokens (`model.cfg.max_len`).
      max_prompt_len, max_new_tokens: the config's values; <= 0 derives one:
        the prompt budget as the longest prompt given, the new tokens as the
        rest of the context after the prompt budget. A value set is kept.
      new_tokens_key: the config key of max_new_tokens, for messages
        (`ppo.max_new_tokens` in PPO).

    Raises:
      common.ConfigError: the values set cannot fit the context, or a prompt
        is longer than they allow; the message names the keys to change.
    """
    limit, why = prompt_limit(context, max_prompt_len, max_new_tokens, new_tokens_key)
    longest = max(prompt_lens, default=0)
    if longest > limit:
        keys = [k for k, v in ((PROMPT_KEY, max_prompt_len), (new_tokens_key, max_new_tokens))
                if v > 0]
        change = (" or ".join(f"--config.{k}" for k in keys) + " (0 derives it)") if keys else ""
        raise common.ConfigError(
            f"the longest prompt is {longest} tokens, more than {limit} ({why}): "
            + (f"change {change}, or " if change else "")
            + "shorten or drop the longest prompts (--config.data.drop_invalid=True)")
    prompt_len = max_prompt_len if max_prompt_len > 0 else max(longest, 1)
    new_tokens = max_new_tokens if max_new_tokens > 0 else context - prompt_len
    return prompt_len, new_tokens


def run(config, workdir: str):
    for key in ("checkpoint", "prompts", "output"):
        if not config.get(key):
            raise common.ConfigError(f"generate needs --config.{key}=...")
    runtime = common.Runtime(config)
    model, params, tok = load_policy(config, config.checkpoint, runtime)
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
    answers = respond(runtime, model, params, tok, prompts, config.sampling, max_prompt_len,
                      int(config.batch_size), jax.random.PRNGKey(config.seed),
                      max_new_tokens=max_new_tokens)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
        with open(config.output, "w") as f:
            for p, (r, _) in zip(prompts, answers):
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
        print(f"[generate] wrote {len(prompts)} responses to {config.output}", flush=True)
