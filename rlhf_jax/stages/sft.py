"""Stages `pretrain` and `sft`: next-token loss with a mask.

Pretraining trains on every token of `{"text"}` records; SFT (InstructGPT
step 1) on `{"prompt", "response"}` demonstrations, with the loss on the
response tokens and EOS only. Pretraining with `data.pack` packs several
texts into each row (segment-masked, so a text sees only itself): the world's
pages average 175 of the 320-byte context, so packing about doubles the real
tokens a step trains on.
"""
from __future__ import annotations

import functools
import logging

import jax
import numpy as np

from rlhf_jax import checkpoint, jit_cache, loop, losses, sharding, train_state
from rlhf_jax.data import pipeline, preprocess, sources
from rlhf_jax.data import setup as data_setup
from rlhf_jax.models import resolve
from rlhf_jax.errors import ConfigError
from rlhf_jax.models.transformer import Transformer

log = logging.getLogger(__name__)


def lm_loss_on_batch(params, model: Transformer, batch, dropout_rng=None):
    """Masked next-token loss. batch: tokens/attn_mask/loss_mask [B, T];
    loss_mask[t] = 1 where tokens[t + 1] is a target (see data.preprocess)."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    logits_BxTxV = model.apply({"params": params}, batch["tokens"], attn_mask=batch["attn_mask"],
                               rngs=rngs)
    return losses.lm_loss(logits_BxTxV[:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, :-1])


def train_step(state: train_state.TrainState, batch, *, model: Transformer, optimizer):
    def loss_fn(params):
        return lm_loss_on_batch(params, model, batch, train_state.step_rng(state))

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, upd = train_state.apply_update(state, grads, loss, optimizer)
    return state, {"loss": loss, "accuracy": stats["accuracy"], **upd}


def eval_step(params, batch, *, model: Transformer):
    """Sum of token losses and token count, so batches combine exactly."""
    loss, stats = lm_loss_on_batch(params, model, batch)
    return loss * stats["n_tokens"], stats["n_tokens"]


def make_evaluator(runtime, model, eval_source, transform, batch_size, max_batches):
    step = jit_cache.jit_partial(eval_step, dict(model=model))

    def evaluate(params) -> dict:
        total, count = 0.0, 0.0
        for i, (batch, valid) in enumerate(pipeline.batches_once(eval_source, batch_size, transform)):
            if i >= max_batches:
                break
            batch = dict(batch)
            batch["loss_mask"] = batch["loss_mask"] * np.asarray(valid, np.float32)[:, None]
            s, n = step(params, runtime.global_batch(batch))
            total, count = total + float(s), count + float(n)
        return {"eval_loss": total / max(count, 1.0)}
    return evaluate


def run(config, workdir: str):
    stage = config.stage
    kind = "text" if stage == "pretrain" else "demonstrations"
    runtime = sharding.Runtime(config)
    meta_from = checkpoint.read_meta(config.init_from) if config.init_from else None
    cfg, tok, pretrained_params = resolve.stage_model(config, "lm", meta_from)
    max_len = int(config.data.max_len)
    resolve.check_context(cfg, max_len, "data.max_len", rope_ok=True)
    pack = bool(config.data.get("pack", False))
    if pack and kind != "text":
        raise ConfigError(f"data.pack packs pretraining text; stage {stage!r} reads "
                          f"demonstrations (set data.pack=False)")
    if kind == "text":
        example = preprocess.packed_text_example if pack else preprocess.text_example
        transform = functools.partial(example, tok, max_len=max_len)
        check = None
    else:
        transform = functools.partial(preprocess.sft_example, tok, max_len=max_len)
        check = data_setup.length_check(lambda r: preprocess.sft_length(tok, r), max_len,
                                        "prompt + response")
    train_src, eval_src = data_setup.open_train_eval(config, kind, check)
    if pack:
        train_src, eval_src = (sources.PackedTexts(s, tok, max_len) for s in (train_src, eval_src))
        log.info("packed %s (fill %.2f) and %s", train_src.name, train_src.fill, eval_src.name)
    batch_size = int(config.train.batch_size)
    loader = data_setup.loader(config, runtime, train_src, batch_size, transform)

    optimizer = train_state.make_optimizer(config.train)
    with runtime.activations():
        state, shardings, step = train_state.compile_supervised(
            runtime, cfg, optimizer, train_step, config.seed, config.init_from, pretrained_params)
        evaluate = make_evaluator(runtime, Transformer(cfg), eval_src, transform,
                                  batch_size, int(config.train.eval_batches))
        meta = resolve.model_meta(cfg, resolve.tokenizer_spec(config, meta_from))
        return loop.run(loop.Loop(
            stage=stage, train=config.train, workdir=workdir, state=state,
            state_shardings=shardings, step_fn=loop.supervised_step(runtime, loader, step),
            meta=meta, evaluate=evaluate, units_per_step=batch_size * max_len,
            progress_keys=("loss",)))
