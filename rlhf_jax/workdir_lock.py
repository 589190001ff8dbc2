"""One run per workdir: an exclusive lock file, `<workdir>/.lock`.

Two runs on one workdir would both append to its metrics.jsonl and save
into the same checkpoint directory (one of them crashing in Orbax's
rename, or both going on with every metrics row twice). So whoever runs a
stage or the pipeline holds `<workdir>/.lock` for the run: JSON
{pid, host, started}, created with O_CREAT | O_EXCL (atomic, also on NFS
v3+, so a second run never believes it got the lock too) and removed when
the run ends, by an exception too. A second run is refused in one line
naming the holder. A lock whose process is gone (killed with -9, the
machine rebooted: nothing removed the file) is taken over with a warning,
which is what resuming after a kill needs; a holder on another host cannot
be checked from here, so that is refused with the way out. Workdirs on an
object store (gs://...) are not locked.

The pipeline's stages run in directories of its workdir, evaluate in the
workdir itself, so a process re-entering a workdir it holds goes on
(`held` counts). In a multi-host run process 0 alone holds the lock, as it
alone writes metrics; the others learn whether it got it, so that none of
them goes on to wait forever in a collective for a process 0 that stopped.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

import jax
import numpy as np

from rlhf_jax.errors import ConfigError

LOCK_NAME = ".lock"

# How long an empty lock file is given to get its JSON: its creator writes it
# right after creating it.
_UNREADABLE_GRACE_S = 2.0

# Workdirs this process holds (real path -> times entered).
_held: dict[str, int] = {}


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _read(path: str) -> dict | None:
    """The lock's holder, or None if the file is gone or not (yet) a record."""
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    if (isinstance(holder, dict) and isinstance(holder.get("pid"), int)
            and isinstance(holder.get("host"), str)):
        return holder
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process
        return True
    return True


def _create(path: str, record: dict) -> bool:
    """Creates the lock holding `record`; False if one exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def _take_over(path: str, stale: dict) -> None:
    """Removes the stale lock `stale`, unless another process took it over
    first: the file is moved aside (atomic, so one of two racing processes
    gets it), and put back if it is no longer the stale one."""
    aside = f"{path}.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != stale:
        os.rename(aside, path)
        return
    os.unlink(aside)
    print(f"warning: {os.path.dirname(path)}: taking over the lock of process {stale['pid']} "
          f"on host {stale['host']} (started {stale.get('started', '?')}), which is no longer "
          "running", file=sys.stderr, flush=True)


def _acquire(workdir: str) -> dict:
    """Creates `<workdir>/.lock` for this process and returns its record.

    Raises:
      ConfigError: a live process, or one on another host, holds it.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    me = _record()
    unreadable_since = None
    while not _create(path, me):
        holder = _read(path)
        if holder is None:
            if not os.path.exists(path):
                continue
            unreadable_since = unreadable_since or time.monotonic()
            if time.monotonic() - unreadable_since > _UNREADABLE_GRACE_S:
                raise ConfigError(f"workdir {workdir} has a lock file {path} that names no "
                                  "process: if no run uses this workdir, delete it and run again")
            time.sleep(0.05)
            continue
        pid, host = holder["pid"], holder["host"]
        since = holder.get("started", "?")
        if host != me["host"]:
            raise ConfigError(
                f"workdir {workdir} is locked by process {pid} on host {host} (started {since}), "
                f"which this host ({me['host']}) cannot check: if that run is gone, delete "
                f"{path} and run again")
        # Our own pid in a lock we do not hold is an earlier life of this pid
        # (a container restarted with the same one): stale too.
        if pid != me["pid"] and _alive(pid):
            raise ConfigError(
                f"workdir {workdir} is in use by process {pid} on host {host} (started {since}): "
                "wait for it to end, stop it, or give this run another --workdir")
        _take_over(path, holder)
    return me


def _release(workdir: str, record: dict) -> None:
    """Removes the lock if it is still `record` (a user may have deleted it
    and another run taken it since)."""
    path = os.path.join(workdir, LOCK_NAME)
    if _read(path) == record:
        os.unlink(path)


def _agree(workdir: str, refused: bool) -> None:
    """Tells every process whether process 0 got the lock; the others raise
    if it did not (process 0 raises its own, more telling, error)."""
    from jax.experimental import multihost_utils
    if int(multihost_utils.broadcast_one_to_all(np.int32(refused))) and jax.process_index() != 0:
        raise ConfigError(f"workdir {workdir}: process 0 could not lock it (its error says why)")


@contextlib.contextmanager
def held(workdir: str):
    """Holds `<workdir>/.lock` while the block runs (process 0 of a
    multi-host run; re-entrant within one process).

    Raises:
      ConfigError: another live process holds the workdir, or a process on
        another host does; before the block runs, on every process.
    """
    if "://" in str(workdir):
        # An object store (gs://, s3://) has no O_EXCL create through `os`;
        # such workdirs (pods) are unlocked: one launch per workdir is the
        # launcher's job there (launch/tpu_pod.sh runs one command per pod).
        yield
        return
    key = os.path.realpath(workdir)
    record, refusal = None, None
    if jax.process_index() == 0 and key not in _held:
        try:
            record = _acquire(workdir)
        except ConfigError as e:
            refusal = e
    if jax.process_count() > 1:
        _agree(workdir, refusal is not None)
    if refusal is not None:
        raise refusal
    if jax.process_index() == 0:
        _held[key] = _held.get(key, 0) + 1
    try:
        yield
    finally:
        if jax.process_index() == 0:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
                _release(workdir, record)
