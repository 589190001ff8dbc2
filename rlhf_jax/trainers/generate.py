"""Stage `generate`: answer `{"prompt"}` lines with a checkpoint's policy.

Also home of `respond`, the batched prompt -> response helper that the
collect step and evaluation use too.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from rlhf_jax import checkpoint, distributed, sampling
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.data import jsonl, preprocess
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.trainers import common


def load_policy(config, path: str, runtime: common.Runtime, head: str = "lm"):
    """(model, params, tokenizer) of a stage checkpoint, sharded on `runtime`."""
    if not checkpoint.has_checkpoint(path):
        raise common.ConfigError(f"no finished checkpoint at {path!r}")
    cfg, tok, _ = common.stage_model(config, head, from_checkpoint=path)
    model = Transformer(cfg)
    with runtime.activations():
        params, _ = common.restore_model_params(path, runtime, model)
    return model, params, tok


def sample_batch(model: Transformer, params, tok, tokens_BxP, mask_BxP, rng, sampling_cfg):
    """`sampling.sample` with the settings of a `sampling` config block."""
    return sampling.sample(
        model, params, tokens_BxP, mask_BxP, rng,
        max_new_tokens=int(sampling_cfg.max_new_tokens), eos_id=tok.eos_id,
        pad_id=tok.pad_id, temperature=float(sampling_cfg.temperature),
        top_k=int(sampling_cfg.top_k), top_p=float(sampling_cfg.top_p),
        greedy=bool(sampling_cfg.greedy))


def respond(runtime: common.Runtime, model: Transformer, params, tok, prompts: Sequence[str],
            sampling_cfg, max_prompt_len: int, batch_size: int, rng) -> list[tuple[str, bool]]:
    """Responses (text cut at EOS, finished) for `prompts`, in order.

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
                               jax.random.fold_in(rng, start), sampling_cfg)
            tokens = distributed.gather(res.tokens)
            for row in tokens[:n_real]:
                out.append(tokenizers.decode_response(tok, row))
    return out


def run(config, workdir: str):
    for key in ("checkpoint", "prompts", "output"):
        if not config.get(key):
            raise common.ConfigError(f"generate needs --config.{key}=...")
    runtime = common.Runtime(config)
    model, params, tok = load_policy(config, config.checkpoint, runtime)
    max_prompt_len = int(config.data.max_prompt_len)
    if max_prompt_len + int(config.sampling.max_new_tokens) > model.cfg.max_len:
        raise common.ConfigError(
            f"data.max_prompt_len + sampling.max_new_tokens = "
            f"{max_prompt_len + int(config.sampling.max_new_tokens)} exceeds the model's context "
            f"{model.cfg.max_len}")
    check = lambda r: (None if len(tokenizers.encode_prompt(tok, r["prompt"])) <= max_prompt_len
                       else f"prompt longer than data.max_prompt_len={max_prompt_len} tokens")
    records, _ = jsonl.read_jsonl(config.prompts, "prompts", drop_invalid=config.data.drop_invalid,
                                  check=check)
    prompts = [r["prompt"] for r in records]
    answers = respond(runtime, model, params, tok, prompts, config.sampling, max_prompt_len,
                      int(config.batch_size), jax.random.PRNGKey(config.seed))
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
        with open(config.output, "w") as f:
            for p, (r, _) in zip(prompts, answers):
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
        print(f"[generate] wrote {len(prompts)} responses to {config.output}", flush=True)
