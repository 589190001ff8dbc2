"""Bad input and bad configs end in one clear line and a non-zero exit, never
a bare traceback; a preemption ends in a checkpoint and exit 0."""
import contextlib
import sys

from rlhf_jax.data.jsonl import DataError
from rlhf_jax.trainers.common import ConfigError, Preempted


@contextlib.contextmanager
def reported():
    try:
        yield
    except Preempted:
        sys.exit(0)
    except (DataError, ConfigError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
