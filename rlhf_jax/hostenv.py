"""Host settings that must be in place when the process starts.

glibc's malloc serves every allocation above 32 MB with freshly mmap'd pages,
and gives them back on free. XLA:CPU allocates an executable's temporaries on
every call, so each call of a large step faults its buffers in again, 4 KB at
a time, each page zeroed by the kernel: at SmolLM2's size, gigabytes per PPO
update. glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) makes
malloc advise those mappings for transparent huge pages, 2 MB a fault.

Tunables are read only when a process starts, so `python -m rlhf_jax.main`
re-executes itself once with the tunable added, before anything heavy is
imported (bench/run.py does so with `--hugepage-malloc`). BENCHMARKS.md has the
measurement. `RLHF_JAX_HUGEPAGE_MALLOC=0` turns it off.

libtpu, installed (the `tpu` extra, for ahead-of-time TPU compiles) on a host
without a TPU, still starts when JAX looks for its platforms and prints its
probe of the machine (5 lines: "could not determine TPU accelerator type",
an E-line from common_lib.cc, ...) before anything else. `skip_absent_tpu`
leaves TPU out of JAX's platforms where no TPU chip is attached (no
/dev/accel*, no /dev/vfio/<n>: the device files libtpu itself opens), unless
JAX_PLATFORMS is set or `--verbose` is given.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "RLHF_JAX_HUGEPAGE_MALLOC"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available(path: str = THP_SETTING) -> bool:
    """Transparent huge pages can be used when asked for (`always` or `madvise`)."""
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepage_malloc_env(environ, libc: tuple[str, str] | None = None,
                        thp: bool | None = None) -> dict | None:
    """The environment to re-execute with, or None when there is nothing to do:
    turned off, not glibc 2.35+, no transparent huge pages, or already set."""
    if environ.get(OPT_OUT, "1") == "0":
        return None
    name, version = libc if libc is not None else platform.libc_ver()
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or major_minor < (2, 35):
        return None
    if not (_thp_available() if thp is None else thp):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    return env


def reexec_with_hugepage_malloc() -> None:
    """Replace this process with the same command line, the tunable set
    (returns only when there is nothing to do). The new process finds the
    tunable set and goes on, so this runs at most once."""
    if not sys.platform.startswith("linux"):
        return
    env = hugepage_malloc_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def tpu_attached(root: str = "/dev") -> bool:
    """Whether a TPU chip's device file exists: /dev/accel<n> (v2-v4) or
    /dev/vfio/<n> (v5e and later)."""
    return bool(glob.glob(os.path.join(root, "accel*"))
                or [p for p in glob.glob(os.path.join(root, "vfio", "*"))
                    if os.path.basename(p).isdigit()])


def platforms_without_tpu(environ, argv, attached: bool | None = None,
                          cuda: bool | None = None) -> str | None:
    """JAX_PLATFORMS for a host with libtpu but no TPU, or None to leave JAX's
    own choice: set already, `--verbose` asked for, or a TPU attached."""
    if environ.get("JAX_PLATFORMS") or "--verbose" in argv or "--verbose=true" in argv:
        return None
    if importlib.util.find_spec("libtpu") is None:
        return None
    if tpu_attached() if attached is None else attached:
        return None
    if cuda is None:
        cuda = any(importlib.util.find_spec(name) is not None
                   for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    return "cuda,cpu" if cuda else "cpu"


def skip_absent_tpu() -> None:
    """Sets JAX_PLATFORMS (`platforms_without_tpu`) before JAX is imported."""
    value = platforms_without_tpu(os.environ, sys.argv)
    if value:
        os.environ["JAX_PLATFORMS"] = value
