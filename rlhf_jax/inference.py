"""Running a trained policy or reward model: what generate, collect,
evaluate and PPO share.

- `load_policy`: a stage checkpoint's model, params (in this run's
  shardings) and tokenizer;
- `respond` / `respond_encoded`: batched sampling of many prompts, every
  batch one shape (the last padded with copies of its last row), so the
  sampler compiles once;
- `response_outputs`: a model's outputs at the positions that predict each
  response token, from one teacher-forced pass (the head applied there only).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from rlhf_jax import checkpoint, distributed, sampling, sharding
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.data import preprocess
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import resolve
from rlhf_jax.models.transformer import Transformer


def load_policy(config, path: str, runtime: sharding.Runtime, head: str = "lm"):
    """(model, params, tokenizer) of a stage checkpoint, sharded on `runtime`."""
    if not checkpoint.has_checkpoint(path):
        raise ConfigError(f"no finished checkpoint at {path!r}")
    cfg, tok, _ = resolve.stage_model(config, head, checkpoint.read_meta(path))
    model = Transformer(cfg)
    with runtime.activations():
        params, _ = checkpoint.restore_model_params(path, runtime, model)
    return model, params, tok


# ---------------------------------------------------------------------------
# Sampling many prompts
# ---------------------------------------------------------------------------

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


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """(start, row indices [batch_size], number of real rows) over `n` rows:
    the last batch is padded with copies of the last row, so every batch has
    one shape."""
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        yield start, rows, min(batch_size, n - start)


def to_device(runtime: sharding.Runtime, rows: dict) -> dict:
    """Rows every process holds in full -> global arrays sharded over the
    batch axes, each process contributing its own slice of rows."""
    n, k = jax.process_count(), jax.process_index()
    return runtime.global_batch({key: np.split(np.asarray(v), n)[k] for key, v in rows.items()})


@dataclasses.dataclass
class Responses:
    tokens_NxT: np.ndarray     # int32, pad after EOS
    mask_NxT: np.ndarray       # float32, 1 up to and including EOS
    finished_N: np.ndarray     # bool, EOS reached
    texts: list                # response text cut at EOS


def respond_encoded(runtime: sharding.Runtime, model: Transformer, params, tok,
                    prompt_NxP: np.ndarray, prompt_mask_NxP: np.ndarray, sampling_cfg,
                    batch_size: int, rng, max_new_tokens: Optional[int] = None) -> Responses:
    """Responses to left-padded, encoded prompts, in order, in batches of
    `batch_size` rounded to the batch devices; batch b samples with key
    fold_in(rng, its first row)."""
    batch_size = runtime.round_batch(batch_size)
    tokens, masks, finished = [], [], []
    with runtime.activations():
        for start, rows, n_real in padded_batches(len(prompt_NxP), batch_size):
            batch = to_device(runtime, {"tokens": prompt_NxP[rows], "mask": prompt_mask_NxP[rows]})
            out = sample_batch(model, params, tok, batch["tokens"], batch["mask"],
                               jax.random.fold_in(rng, start), sampling_cfg, max_new_tokens)
            tokens.append(distributed.gather(out.tokens)[:n_real])
            masks.append(distributed.gather(out.mask)[:n_real])
            finished.append(distributed.gather(out.finished)[:n_real])
    tokens_NxT = np.concatenate(tokens)
    texts = [tokenizers.decode_response(tok, row)[0] for row in tokens_NxT]
    return Responses(tokens_NxT, np.concatenate(masks), np.concatenate(finished), texts)


def encode_prompts(tok, prompts: Sequence[str], max_prompt_len: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Conversation-format prompts, left-padded: tokens, mask [N, max_prompt_len]."""
    ex = [preprocess.prompt_example(tok, {"prompt": p}, max_prompt_len) for p in prompts]
    return np.stack([e["tokens"] for e in ex]), np.stack([e["mask"] for e in ex])


def respond(runtime: sharding.Runtime, model: Transformer, params, tok, prompts: Sequence[str],
            sampling_cfg, max_prompt_len: int, batch_size: int, rng,
            max_new_tokens: Optional[int] = None) -> list[tuple[str, bool]]:
    """Responses (text cut at EOS, finished) for `prompts`, in order.

    `max_new_tokens` replaces `sampling_cfg.max_new_tokens` where given (a
    budget from `generate.sampling_budget`; the config keeps what the user set).
    """
    tokens_NxP, mask_NxP = encode_prompts(tok, prompts, max_prompt_len)
    out = respond_encoded(runtime, model, params, tok, tokens_NxP, mask_NxP, sampling_cfg,
                          batch_size, rng, max_new_tokens)
    return [(text, bool(done)) for text, done in zip(out.texts, out.finished_N)]


# ---------------------------------------------------------------------------
# Teacher-forced passes over prompt + response
# ---------------------------------------------------------------------------

def response_outputs(model: Transformer, params, tokens_BxS, attn_BxS, p: int, n: int):
    """The model's outputs (logits, or scalar scores) at the positions that
    predict each response token of prompt (p tokens, left-padded) + response
    (n tokens): [B, n(, V)]."""
    return model.apply({"params": params}, tokens_BxS, p - 1, n, attn_mask=attn_BxS,
                       method=Transformer.outputs_at)

