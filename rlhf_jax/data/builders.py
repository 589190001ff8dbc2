"""A TFDS builder that turns a validated JSONL file into array_record files.

Local JSONL files go through TFDS like every other dataset (DESIGN.md, "Data
through TFDS and Grain"): `build_jsonl` validates the file, then writes its
records, in file order, to

    <data_dir>/jsonl_records/<kind>-<digest>/1.0.0/

where the digest hashes the record kind, the file's bytes and, when invalid
lines were dropped, the line numbers kept. An unchanged file is therefore
reused and an edited one rebuilt (old builds stay in the cache until deleted).
`data_dir` defaults to `$RLHF_JAX_DATA_DIR`, else `~/.cache/rlhf_jax/tfds`.

Concurrent builders of the same file (several processes of one run on a host)
are serialised by an exclusive `flock` on a lock file beside the build: the
first writes (TFDS writes into a temporary directory and renames it when
complete), the others then find the finished build and reuse it. The lock
needs a local (POSIX) file system for data_dir; on a shared or remote one,
build once before starting the processes.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
from typing import Iterator, Optional

import tensorflow_datasets as tfds

from rlhf_jax import console
from rlhf_jax.data import jsonl
from rlhf_jax.data.features import KINDS, features, stored

DATA_DIR_ENV = "RLHF_JAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/rlhf_jax/tfds"
# Part of every digest: bump it when the stored form of records changes.
_FORMAT = "jsonl_records/2"  # 2: comparisons store "finished"


def default_data_dir() -> str:
    """`$RLHF_JAX_DATA_DIR`, else `~/.cache/rlhf_jax/tfds` (expanded)."""
    return os.path.expanduser(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_name(kind: str, digest: str, kept_lines: Optional[list[int]] = None) -> str:
    """`<kind>-<20 hex digits>` naming the build of one file's records.

    `kept_lines` (the line numbers of the records kept when some were dropped)
    enters the hash, so different drop decisions on one file never share a
    build.
    """
    h = hashlib.sha256(f"{_FORMAT}\0{kind}\0{digest}".encode())
    if kept_lines is not None:
        h.update(("\0" + ",".join(map(str, kept_lines))).encode())
    return f"{kind}-{h.hexdigest()[:20]}"


class QuietBuild:
    """A TFDS builder mixin: TFDS announces a build in two stdout lines
    ("Downloading and preparing dataset Unknown size ..." and "... downloaded
    and prepared"), kept for `--verbose`; `prepare_locally` says it in one."""

    def _log_download_bytes(self):
        if console.verbose():
            super()._log_download_bytes()

    def _log_download_done(self):
        if console.verbose():
            super()._log_download_done()


class JsonlRecords(QuietBuild, tfds.core.GeneratorBasedBuilder):
    """Records of one JSONL file; the config name `<kind>-<digest>` identifies it.

    Construct with `records` (normalised, from `jsonl.read_jsonl`) to prepare
    a build; without to read an existing one.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Validated JSONL records, in file order."}

    def __init__(self, *, config: str | tfds.core.BuilderConfig,
                 records: Optional[list[dict]] = None, source_path: str = "", **kwargs):
        if isinstance(config, str):
            config = tfds.core.BuilderConfig(name=config)
        self.kind = config.name.rsplit("-", 1)[0]
        if self.kind not in KINDS:
            raise ValueError(f"config {config.name!r} does not start with a record kind {KINDS}")
        self._records = records
        self._source_path = source_path
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"{self.kind} records of {self._source_path or 'a JSONL file'}",
            features=features(self.kind),
            # Keep file order: the examples are keyed by line number.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        if self._records is None:
            raise ValueError("JsonlRecords needs `records` to prepare a build; use build_jsonl")
        return {"train": self._generate_examples(self._records)}

    def _generate_examples(self, records):
        for i, record in enumerate(records):
            yield i, stored(record, self.kind)


def prepare_locally(builder: tfds.core.DatasetBuilder, source: str = "", **kwargs):
    """`builder.download_and_prepare(**kwargs)` (a `QuietBuild`) saying so in
    one line, `[data] built NAME locally ...`, without TFDS's progress bars
    unless `--verbose`. Nothing is said when it is already built."""
    if builder.is_prepared():
        return
    tfds.display_progress_bar(console.verbose())
    builder.download_and_prepare(**kwargs)
    splits = ", ".join(f"{name} {split.num_examples}" for name, split in builder.info.splits.items())
    console.say(f"[data] built {builder.name}/{builder.builder_config.name} locally"
                f"{' from ' + source if source else ''}: {splits} records in {builder.data_dir}")


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on `path` (created) for the block: one process builds at a time."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_jsonl(path: str | os.PathLike, kind: str, data_dir: Optional[str] = None,
                drop_invalid: bool = False, check: Optional[jsonl.Check] = None,
                ) -> tuple[JsonlRecords, int, collections.Counter]:
    """Validates a JSONL file and builds (or reuses) its array_record build.

    The file is always read and validated (so `check` and `drop_invalid`
    apply even when a build is reused); only the writing is cached.

    Returns:
      (builder, n_dropped, reasons): a prepared builder (use
      `builder.as_data_source(split)`; its only split is "train"), the number
      of dropped lines and their counts by reason.

    Raises:
      jsonl.DataError: a bad line (unless drop_invalid) or no valid records.
    """
    path = os.fspath(path)
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    reasons = collections.Counter()
    records, lines, n_dropped = jsonl.read_jsonl_with_lines(
        path, kind, drop_invalid, check, reasons)
    name = config_name(kind, file_digest(path), lines if n_dropped else None)
    with file_lock(os.path.join(data_dir, JsonlRecords.name, name + ".lock")):
        # Constructed under the lock: a builder looks for existing data when
        # it is created.
        builder = JsonlRecords(config=name, records=records, source_path=path,
                               data_dir=data_dir, file_format="array_record")
        prepare_locally(builder, path, download_dir=os.path.join(data_dir, "downloads"))
    builder._records = None  # written; do not hold them in memory
    return builder, n_dropped, reasons
