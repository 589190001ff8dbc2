"""The project's exceptions, at the bottom floor (they import nothing of the
project, so any module may raise them), and how the CLIs report them: bad
input and bad configs end in one clear line and a non-zero exit, never a bare
traceback; a preemption ends in a checkpoint and exit 0."""
import contextlib
import os
import sys
from typing import Optional


class ConfigError(ValueError):
    """An invalid configuration, reported as one line before anything compiles."""


class Preempted(Exception):
    """Raised after a preemption checkpoint; main() exits 0."""


class DataError(ValueError):
    """A bad input record, located by file (or source) and line (or index).

    Attributes:
      path: the file or source name.
      line: 1-based line number (or record index for non-file sources); None
        for whole-file problems such as an empty file.
      field: the offending field, or None (invalid JSON, a caller's check).
      reason: the problem without per-record details; the key drop counts are
        grouped by.
    """

    def __init__(self, path: str, line: Optional[int], field: Optional[str],
                 reason: str, detail: str = ""):
        self.path = os.fspath(path)
        self.line = line
        self.field = field
        self.reason = f"field {field!r}: {reason}" if field else reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {self.reason}{detail}")


@contextlib.contextmanager
def reported():
    try:
        yield
    except Preempted:
        sys.exit(0)
    except (DataError, ConfigError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
