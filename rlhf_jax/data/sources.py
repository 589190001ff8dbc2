"""Random-access record sources: local JSONL files and TFDS datasets alike.

`open_source(spec, kind)` takes what a config's `data.path` holds:

    path/to/file.jsonl               a local JSONL file (any path not starting
                                     with "tfds:"), validated line by line and
                                     built to array_record by `builders`
    tfds:instruction_world/CONFIG    the built-in instruction world (prepared
                                     on first use by `world_tfds.prepare`)
    tfds:NAME[/CONFIG][:VERSION]     any other TFDS dataset, through
                                     `tfds.data_source` (TFDS name syntax, so
                                     ":" is the version, not the split)

The split is the separate `split` argument (TFDS split syntax, so slices such
as "train[:90%]" work); a JSONL file has the single split "train". To hold out
part of a single source for evaluation use `train_eval_split`.

A `Source` is a read-only sequence of plain records: `str` for text (bytes
decoded), lists of `int` for integer sequences, lists of `str` for text
sequences; every record has a "category" (str, "" when absent).
"""
from __future__ import annotations

import collections
import collections.abc
import hashlib
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np

from rlhf_jax.data import jsonl, preprocess
from rlhf_jax.data.builders import build_jsonl, default_data_dir
from rlhf_jax.data.features import KINDS, unstored

TFDS_PREFIX = "tfds:"
WORLD_NAME = "instruction_world"

log = logging.getLogger(__name__)

REQUIRED_FIELDS = {
    "demonstrations": ("prompt", "response"),
    "comparisons": ("prompt", "responses", "ranks"),
    "prompts": ("prompt",),
    "text": ("text",),
}


def to_python(value: Any) -> Any:
    """A decoded TFDS value as plain Python: bytes -> str, arrays -> lists, np scalars -> int/float."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return to_python(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, np.generic):
        return to_python(value.item())
    return value


def _read_many(data, indices: Sequence[int]) -> list:
    """Reads several records, batched where the data source supports it."""
    if hasattr(data, "__getitems__"):
        return list(data.__getitems__(list(indices)))
    return [data[i] for i in indices]


class Source(collections.abc.Sequence):
    """A random-access view of records (`len`, `source[i]`), possibly a subset.

    Attributes:
      kind: the record kind.
      name: where the records come from, for messages.
      n_dropped: records dropped as invalid when opened (drop_invalid=True).
      drop_reasons: Counter of those drops by reason.
    """

    def __init__(self, data, kind: str, name: str, indices: Optional[np.ndarray] = None,
                 n_dropped: int = 0, drop_reasons: Optional[collections.Counter] = None):
        self._data = data
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.kind = kind
        self.name = name
        self.n_dropped = n_dropped
        self.drop_reasons = drop_reasons if drop_reasons is not None else collections.Counter()

    def __len__(self) -> int:
        return len(self._data) if self._indices is None else len(self._indices)

    def _underlying(self, index) -> int:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {index} out of range for {self.name} ({n} records)")
        return i if self._indices is None else int(self._indices[i])

    def __getitem__(self, index) -> dict:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._decode(self._data[self._underlying(index)])

    def records(self, indices: Sequence[int]) -> list[dict]:
        """Several records at once (batched reads where the storage allows)."""
        return [self._decode(r) for r in _read_many(self._data, [self._underlying(i) for i in indices])]

    def _decode(self, raw) -> dict:
        record = unstored(to_python(raw))
        record.setdefault("category", "")
        return record

    def subset(self, indices: Sequence[int], name: Optional[str] = None) -> "Source":
        """A view of the records at `indices` (positions in this source)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"subset indices out of range for {self.name} ({len(self)} records)")
        base = indices if self._indices is None else self._indices[indices]
        return Source(self._data, self.kind, name or f"{self.name}[subset]", base,
                      self.n_dropped, self.drop_reasons)

    def __repr__(self) -> str:
        return f"Source({self.name!r}, kind={self.kind!r}, len={len(self)})"


class PackedTexts(collections.abc.Sequence):
    """Text records packed into rows of at most `max_len` tokens.

    Record j is `{"texts": [...], "category": ""}`, the texts of
    `preprocess.pack_texts` row j, for `preprocess.packed_text_example`.
    The texts are read once, here; the grouping depends only on them, so
    every process and every resumed run sees the same rows.

    Attributes:
      name, kind, n_dropped, drop_reasons: those of `source`.
      fill: real tokens / row slots (1.0 = no padding).
    """

    def __init__(self, source: Source, tok, max_len: int):
        self._texts = [r["text"] for r in source.records(range(len(source)))]
        lengths = [len(preprocess.text_ids(tok, t)) for t in self._texts]
        self._rows = preprocess.pack_texts(lengths, max_len)
        self.name = f"{source.name}[packed {max_len}]"
        self.kind = source.kind
        self.n_dropped, self.drop_reasons = source.n_dropped, source.drop_reasons
        real = sum(min(length, max_len) for length in lengths)
        self.fill = real / max(1, max_len * len(self._rows))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index) -> dict:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {"texts": [self._texts[i] for i in self._rows[index]], "category": ""}

    def records(self, indices: Sequence[int]) -> list[dict]:
        return [self[int(i)] for i in indices]

    def __repr__(self) -> str:
        return f"PackedTexts({self.name!r}, len={len(self)}, fill={self.fill:.2f})"


def _open_tfds(name: str, split: str, data_dir: Optional[str]):
    base, _, config = name.partition("/")
    if base.split(":")[0] == WORLD_NAME:
        if not config or ":" in config:
            raise ValueError(f"tfds:{name}: the instruction world is named "
                             f"tfds:{WORLD_NAME}/CONFIG (e.g. {WORLD_NAME}/demonstrations), "
                             f"without a version")
        from rlhf_jax.data import world_tfds  # imported lazily: it pulls in the world
        builder = world_tfds.prepare(config, data_dir or default_data_dir())
        return builder.as_data_source(split=split)
    import tensorflow_datasets as tfds
    return tfds.data_source(name, split=split, data_dir=data_dir)


def _validate_all(source: Source, kind: str, drop_invalid: bool,
                  check: Optional[jsonl.Check]) -> Source:
    """Runs the JSONL validation (plus `check`) over every record of a source."""
    keep, reasons = [], collections.Counter()
    chunk = 1024
    for start in range(0, len(source), chunk):
        idx = range(start, min(start + chunk, len(source)))
        for i, record in zip(idx, source.records(idx)):
            try:
                jsonl.validate_record(record, kind, f"{source.name} record {i}", None, check)
                keep.append(i)
            except jsonl.DataError as e:
                if not drop_invalid:
                    raise
                reasons[e.reason] += 1
    if not keep:
        raise jsonl.DataError(source.name, None, None, f"no valid {kind} records",
                              f" ({sum(reasons.values())} dropped)")
    if len(keep) == len(source):
        return source
    log.warning("%s: dropped %d invalid record(s): %s", source.name,
                      sum(reasons.values()), dict(reasons))
    dropped = source.subset(keep, source.name)
    dropped.n_dropped, dropped.drop_reasons = sum(reasons.values()), reasons
    return dropped


def open_source(spec: str | os.PathLike, kind: str, split: str = "train",
                data_dir: Optional[str] = None, drop_invalid: bool = False,
                check: Optional[jsonl.Check] = None) -> Source:
    """Opens a JSONL file or TFDS dataset as a random-access `Source` of `kind` records.

    Args:
      spec: a JSONL path, `tfds:instruction_world/CONFIG` or `tfds:NAME[/CONFIG][:VERSION]`
        (see the module docstring).
      kind: "demonstrations", "comparisons", "prompts" or "text".
      split: TFDS split (slices allowed); "train" for JSONL files.
      data_dir: where builds live; default `$RLHF_JAX_DATA_DIR` or
        `~/.cache/rlhf_jax/tfds` for JSONL and the world, TFDS's own default
        for other TFDS datasets.
      drop_invalid: drop (count, log) invalid records instead of raising.
      check: extra per-record validator `check(record) -> Optional[str]`,
        e.g. `preprocess.length_check(...)`.

    JSONL files are always validated in full. TFDS datasets are validated the
    same way (the JSONL rules plus `check`, scanning every record) only when
    `check` is given or `drop_invalid` is set; otherwise only their fields are
    checked against `kind`.

    Raises:
      jsonl.DataError: invalid records (located by file and line, or by
        source and record index), or none at all.
      FileNotFoundError: a JSONL path that does not exist.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    spec = os.fspath(spec)
    if spec.startswith(TFDS_PREFIX):
        name = spec[len(TFDS_PREFIX):]
        source = Source(_open_tfds(name, split, data_dir), kind, f"{spec}[{split}]")
        if len(source) == 0:
            raise jsonl.DataError(source.name, None, None, f"no {kind} records")
        first = source[0]
        missing = [f for f in REQUIRED_FIELDS[kind] if f not in first]
        if missing:
            raise jsonl.DataError(source.name, None, None, f"not {kind} records",
                                  f": fields {missing} missing (it has {sorted(first)})")
        if check is not None or drop_invalid:
            source = _validate_all(source, kind, drop_invalid, check)
        return source

    if not os.path.isfile(spec):
        raise FileNotFoundError(f"no such JSONL file: {spec!r} (TFDS datasets are "
                                f"named {TFDS_PREFIX}NAME/CONFIG)")
    builder, n_dropped, reasons = build_jsonl(spec, kind, data_dir, drop_invalid, check)
    return Source(builder.as_data_source(split=split), kind, spec,
                  n_dropped=n_dropped, drop_reasons=reasons)


def _group_key(record: dict) -> str:
    return record["prompt"] if "prompt" in record else record["text"]


def train_eval_split(source: Source, eval_fraction: float, seed: int = 0
                     ) -> tuple[Source, Source]:
    """Deterministically holds out about `eval_fraction` of a source for evaluation.

    Records are grouped by prompt (by text for "text" records), so every
    record of a prompt (e.g. several comparisons of it) lands on the same side
    and evaluation never sees a training prompt. Groups are ordered by a
    sha256 hash of (seed, prompt) and taken into the eval set until it holds at
    least `round(eval_fraction * len(source))` records (at least one). The
    result depends only on the records and the seed, not on the machine,
    process or Python hash seed; both views keep the source's order.

    Returns:
      (train, eval) views of `source`.

    Raises:
      ValueError: eval_fraction outside (0, 1), or a source with fewer than
        two distinct prompts.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(source)
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for start in range(0, n, 1024):
        idx = range(start, min(start + 1024, n))
        for i, record in zip(idx, source.records(idx)):
            groups[_group_key(record)].append(i)
    if len(groups) < 2:
        raise ValueError(f"{source.name}: cannot split {n} record(s) of "
                         f"{len(groups)} distinct prompt(s) into train and eval")

    def rank(key: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()

    target = max(1, round(eval_fraction * n))
    eval_idx: list[int] = []
    ordered = sorted(groups, key=rank)
    for key in ordered[:-1]:  # always leave at least one group for training
        if len(eval_idx) >= target:
            break
        eval_idx.extend(groups[key])
    eval_set = set(eval_idx)
    train_idx = [i for i in range(n) if i not in eval_set]
    eval_idx.sort()
    return (source.subset(train_idx, f"{source.name}[train {1 - eval_fraction:.0%}]"),
            source.subset(eval_idx, f"{source.name}[eval {eval_fraction:.0%}]"))
