"""Batches from a random-access source: training (stateless, resumable) and eval.

Training batches come from one conceptual infinite stream: the source
shuffled with a fresh permutation per epoch and repeated (Grain
`MapDataset.range(len(src)).shuffle(seed).repeat()`, random access, gives the
record index at each stream position). Global batch
`step` is stream elements `[step * B, (step + 1) * B)`, so a batch is a pure
function of `(seed, step)`: the data iterator's whole state is the step, and a
run resumed at step s sees exactly the batches it would have seen. Batches
run across epoch boundaries when B does not divide the source size; each
epoch (every consecutive `len(source)` stream elements) is a permutation
covering every record once.

In a multi-process run every process builds the same stream and takes its own
contiguous slice of each global batch: process p of P gets elements
`[step * B + p * B/P, step * B + (p + 1) * B/P)`, so concatenating the slices in
process order gives the single-process batch.

The permutations are Grain's (`index_shuffle`); a run resumed under another
Grain version could see a different order.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterator, Optional, Sequence

import grain
import numpy as np

Transform = Callable[[dict], dict]


def stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Stacks per-example dicts of fixed-shape arrays into `[N, ...]` arrays."""
    first = examples[0]
    out = {}
    for key in first:
        try:
            out[key] = np.stack([np.asarray(e[key]) for e in examples])
        except (ValueError, KeyError) as e:
            shapes = [np.shape(x.get(key)) for x in examples]
            raise ValueError(f"transform outputs for {key!r} differ in shape or are "
                             f"missing ({shapes}); transforms must return fixed shapes") from e
    return out


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for "
                         f"process_count {process_count}")
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the "
                         f"process count {process_count}; each process takes an equal "
                         f"slice of every batch")
    return batch_size // process_count


class BatchLoader:
    """Deterministic, resumable training batches: `batch(step)` depends only on (seed, step).

    Args:
      source: random-access records (`len`, `__getitem__`), e.g. a `Source`.
      batch_size: the GLOBAL batch size B (all processes together).
      transform: `record -> dict[str, np.ndarray]` of fixed shapes (e.g. a
        `functools.partial` of a `preprocess` function).
      seed: shuffle seed, 0 <= seed < 2**32; every process must use the same.
      shuffle: a fresh permutation per epoch; else source order, repeated.
      process_index, process_count: this process's slice (`jax.process_index()`,
        `jax.process_count()`).
      prefetch: batches computed ahead by a background thread when iterating
        (0 = none). Prefetching never changes which batch a step gets.

    `batch(step)` returns `{key: array[B / process_count, ...]}`.
    """

    def __init__(self, source, batch_size: int, transform: Transform, seed: int,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 prefetch: int = 2):
        self.local_batch_size = _check_processes(batch_size, process_index, process_count)
        if len(source) == 0:
            raise ValueError(f"cannot batch an empty source {getattr(source, 'name', source)!r}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.prefetch = prefetch
        self.transform = transform
        # The stream of source indices; records are read by index, batched.
        indices = grain.MapDataset.range(len(source))
        if shuffle:
            indices = indices.shuffle(seed=seed)
        self._indices = indices.repeat()

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per pass over the source (at least 1)."""
        return max(1, len(self.source) // self.batch_size)

    def epoch(self, step: int) -> float:
        """Epochs completed before global batch `step`."""
        return step * self.batch_size / len(self.source)

    def stream_positions(self, step: int) -> range:
        """Positions in the repeated stream that this process's part of batch `step` reads."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        start = step * self.batch_size + self.process_index * self.local_batch_size
        return range(start, start + self.local_batch_size)

    def record_indices(self, step: int) -> list[int]:
        """Source indices of this process's records in global batch `step`."""
        return [int(self._indices[p]) for p in self.stream_positions(step)]

    def global_record_indices(self, step: int) -> list[int]:
        """Source indices of every process's records in global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        start = step * self.batch_size
        return [int(self._indices[p]) for p in range(start, start + self.batch_size)]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`: `{key: [B / process_count, ...]}`."""
        indices = self.record_indices(step)
        if hasattr(self.source, "records"):  # a `Source`: one batched read
            records = self.source.records(indices)
        else:
            records = [self.source[i] for i in indices]
        return stack([self.transform(r) for r in records])

    def iterate(self, start_step: int = 0, num_steps: Optional[int] = None
                ) -> Iterator[dict[str, np.ndarray]]:
        """Yields `batch(start_step)`, `batch(start_step + 1)`, ... (`num_steps` of them, or forever)."""
        end = None if num_steps is None else start_step + num_steps
        steps = iter(range(start_step, end) if end is not None else _count(start_step))
        if self.prefetch <= 0:
            for step in steps:
                yield self.batch(step)
            return
        # One worker computes batches in step order; results are consumed in
        # the same order, so prefetching cannot reorder anything.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") as pool:
            pending = collections.deque()
            try:
                for step in steps:
                    pending.append(pool.submit(self.batch, step))
                    if len(pending) > self.prefetch:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate(0)


def _count(start: int) -> Iterator[int]:
    step = start
    while True:
        yield step
        step += 1


def num_batches(num_records: int, batch_size: int) -> int:
    """Batches `batches_once` yields for a source of `num_records`."""
    return -(-num_records // batch_size)


def batches_once(source, batch_size: int, transform: Transform, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """One ordered pass for evaluation: yields `(batch, valid)` per global batch.

    The source is read in order; the last global batch is padded to
    `batch_size` with copies of the last record, marked invalid. `batch` is
    `{key: [B / process_count, ...]}` and `valid` is bool `[B / process_count]`
    (True = a real record). Every process yields the same number of batches,
    `num_batches(len(source), batch_size)`, so collective ops stay in step.
    """
    local = _check_processes(batch_size, process_index, process_count)
    n = len(source)
    cache: dict[int, dict] = {}

    def example(i: int) -> dict:
        if i not in cache:  # only the padding record is ever asked for twice
            cache.clear()
            cache[i] = transform(source[i])
        return cache[i]

    for b in range(num_batches(n, batch_size)):
        start = b * batch_size + process_index * local
        positions = range(start, start + local)
        valid = np.array([p < n for p in positions], dtype=bool)
        yield stack([example(min(p, n - 1)) for p in positions]), valid
