"""What `evaluate` reads: the held-out world prompts, the few-shot prefix of
the prompted baseline (InstructGPT's "GPT prompted"), and the held-out
documents of the pretraining-loss metric.
"""
from __future__ import annotations

import functools
import zlib
from typing import Sequence

import jax
import numpy as np

from rlhf_jax import tokenizer as tokenizers
from rlhf_jax import world
from rlhf_jax.data import pipeline, preprocess, sources
from rlhf_jax.data import setup as data_setup
from rlhf_jax.errors import ConfigError


def fewshot_demonstrations(categories: Sequence[str], seed: int = 0) -> list[dict]:
    """One fixed demonstration per category, from TRAIN words (the eval
    prompts use held-out ones), with the correct, concise response."""
    unknown = [c for c in categories if c not in world.CATEGORIES]
    if unknown:
        raise ConfigError(f"fewshot_categories: unknown categories {unknown}; expected "
                                 f"some of {world.CATEGORIES}")
    rng = np.random.default_rng([int(seed), zlib.crc32(b"fewshot")])
    demos = []
    for category in categories:
        task = world.sample_task(rng, category, "train")
        demos.append({"prompt": task.prompt, "response": world.correct_response(task, rng)})
    return demos


def fewshot_prefix_ids(tok, demos: Sequence[dict]) -> list[int]:
    """The demonstrations as whole conversations, each ended by EOS, as the
    pretraining corpus lays out a document."""
    ids: list[int] = []
    for d in demos:
        ids += tokenizers.encode_prompt(tok, d["prompt"]) + tokenizers.encode_response(tok, d["response"])
    return ids


def fewshot_prefixes(tok, prompts: Sequence[str], demos: Sequence[dict], budget: int
                     ) -> tuple[list[list[int]], list[int]]:
    """Each prompt's few-shot prefix: the demonstrations, in order, that fit
    with the prompt in `budget` tokens (the context less the new tokens); a
    demonstration that does not fit is left out, so a long prompt may get
    fewer (or none) and a prompt never overflows the context. Returns the
    prefixes and how many demonstrations each holds."""
    demo_ids = [fewshot_prefix_ids(tok, [d]) for d in demos]
    prefixes, counts = [], []
    for prompt in prompts:
        room = budget - len(tokenizers.encode_prompt(tok, prompt))
        prefix: list[int] = []
        count = 0
        for ids in demo_ids:
            if len(prefix) + len(ids) <= room:
                prefix += ids
                count += 1
        prefixes.append(prefix)
        counts.append(count)
    return prefixes, counts


def encode_prompts(tok, prompts: Sequence[str], prefixes: Sequence[Sequence[int]],
                   prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prefix + conversation-format prompts: tokens, mask [N, P].
    `prefixes`: one token prefix per prompt (empty for plain prompts)."""
    tokens_NxP = np.full((len(prompts), prompt_len), tok.pad_id, np.int32)
    mask_NxP = np.zeros((len(prompts), prompt_len), np.int32)
    for i, prompt in enumerate(prompts):
        ids = list(prefixes[i]) + tokenizers.encode_prompt(tok, prompt)
        if len(ids) > prompt_len:
            raise ConfigError(f"prompt {prompt!r} is {len(ids)} tokens with its prefix, "
                                     f"more than {prompt_len}")
        tokens_NxP[i, prompt_len - len(ids):] = ids
        mask_NxP[i, prompt_len - len(ids):] = 1
    return tokens_NxP, mask_NxP


def _split_for(spec: str, split: str) -> str:
    """TFDS sources take the configured split; a JSONL file has only "train"."""
    return split if str(spec).startswith(sources.TFDS_PREFIX) else "train"


def load_eval_prompts(config, tok) -> tuple[list[str], list[str], str]:
    """(prompts, their categories, source name): world prompts no longer than
    data.max_prompt_len, the first data.max_prompts of them if set."""
    max_prompt_len = int(config.data.max_prompt_len)
    check = data_setup.length_check(lambda r: len(tokenizers.encode_prompt(tok, r["prompt"])),
                                    max_prompt_len, "the prompt (data.max_prompt_len)")
    src = data_setup.open_source(config, config.data.path, "prompts", check,
                                 split=_split_for(config.data.path, config.data.split))
    n = len(src) if not int(config.data.max_prompts) else min(len(src), int(config.data.max_prompts))
    prompts = [r["prompt"] for r in src.records(range(n))]
    categories = []
    for i, prompt in enumerate(prompts):
        try:
            categories.append(world.category_of(prompt))
        except ValueError:
            raise ConfigError(
                f"{src.name} record {i}: {prompt!r} is not a prompt of the instruction world, "
                f"which the gold labeler cannot judge") from None
    return prompts, categories, src.name


def load_text_batches(config, tok) -> tuple[list[dict], str, int]:
    """At most data.text_batches batches of held-out documents (this process's
    rows; padding rows carry no loss), the source name and the number of
    documents in all processes' batches together."""
    src = data_setup.open_source(config, config.data.text_path, "text",
                                 split=_split_for(config.data.text_path, config.data.text_split))
    transform = functools.partial(preprocess.text_example, tok, max_len=int(config.data.max_len))
    batches = []
    batches_B = pipeline.batches_once(src, int(config.score_batch_size), transform,
                                      jax.process_index(), jax.process_count())
    for i, (batch, valid_B) in enumerate(batches_B):
        if i >= int(config.data.text_batches):
            break
        batch = dict(batch)
        batch["loss_mask"] = batch["loss_mask"] * valid_B.astype(np.float32)[:, None]
        batches.append(batch)
    n_documents = min(len(src), len(batches) * int(config.score_batch_size))
    return batches, src.name, n_documents
