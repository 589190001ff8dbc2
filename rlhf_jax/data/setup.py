"""How a stage's config turns into data sources and loaders."""
from __future__ import annotations

from typing import Callable, Optional

import jax

from rlhf_jax.data import pipeline, sources
from rlhf_jax.errors import ConfigError
from rlhf_jax.sharding import check_batch_divisible


def length_check(length_fn: Callable[[dict], int], max_len: int, what: str):
    """A record validator for read_jsonl: over-long records name the limit."""
    def check(record: dict) -> Optional[str]:
        n = length_fn(record)
        if n > max_len:
            return f"{what} is {n} tokens, more than data.max_len={max_len}"
        return None
    return check


def open_source(config, spec: str, kind: str, check=None, split: str = "train"):
    if not spec:
        raise ConfigError(f"stage {config.stage!r} needs data.path (a .jsonl file or tfds:NAME/CONFIG)")
    return sources.open_source(spec, kind, split=split, data_dir=config.data.data_dir or None,
                               drop_invalid=config.data.drop_invalid, check=check)


def open_train_eval(config, kind: str, check=None):
    """(train, eval) sources: `data.eval_path` if given, else a held-out split."""
    train = open_source(config, config.data.path, kind, check)
    if config.data.eval_path:
        return train, open_source(config, config.data.eval_path, kind, check)
    return sources.train_eval_split(train, float(config.data.eval_fraction), seed=int(config.seed))


def loader(config, runtime, source, batch_size: int, transform, what: str = "train.batch_size"):
    check_batch_divisible(batch_size, runtime.mesh, what)
    if len(source) == 0:
        raise ConfigError(f"data.path={config.data.path!r} has no records")
    return pipeline.BatchLoader(source, batch_size, transform, seed=int(config.seed),
                                process_index=jax.process_index(),
                                process_count=jax.process_count())

