"""rlhf_jax/hostenv.py: when the entry points restart with huge-page malloc,
with what environment, and that the restart happens once and keeps the
command line."""
import os
import subprocess
import sys

import pytest

from rlhf_jax import hostenv

GLIBC = ("glibc", "2.36")


def test_adds_the_tunable_and_keeps_the_others():
    env = hostenv.hugepage_malloc_env({"A": "1"}, GLIBC, thp=True)
    assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hostenv.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, thp=True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, libc, thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, True),     # set by the user: kept
    ({hostenv.OPT_OUT: "0"}, GLIBC, True),                             # turned off
    ({}, ("glibc", "2.31"), True),                                     # no such tunable yet
    ({}, ("", ""), True),                                              # not glibc (musl, macOS)
    ({}, GLIBC, False),                                                # THP set to never
])
def test_nothing_to_do(environ, libc, thp):
    assert hostenv.hugepage_malloc_env(environ, libc, thp) is None


def test_thp_setting_is_read_from_sysfs(tmp_path):
    p = tmp_path / "enabled"
    p.write_text("always [madvise] never\n")
    assert hostenv._thp_available(str(p))
    p.write_text("always madvise [never]\n")
    assert not hostenv._thp_available(str(p))
    assert not hostenv._thp_available(str(tmp_path / "missing"))


@pytest.mark.skipif(hostenv.hugepage_malloc_env({}) is None,
                    reason="this host has no glibc 2.35+ with transparent huge pages")
def test_a_script_restarts_once_with_its_arguments(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import os, sys\n"
        "print('start', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)\n"
        "from rlhf_jax import hostenv\n"
        "hostenv.reexec_with_hugepage_malloc()\n"
        "print('run', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(hostenv.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, str(script), "--x", "a b"], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out == ["start None ['--x', 'a b']",
                   "start glibc.malloc.hugetlb=1 ['--x', 'a b']",
                   "run glibc.malloc.hugetlb=1 ['--x', 'a b']"]


def test_tpu_is_left_out_of_jax_platforms_only_where_no_chip_is_attached(tmp_path, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real_find_spec(name, *a))
    f = hostenv.platforms_without_tpu
    assert f({}, ["main"], attached=False, cuda=False) == "cpu"
    assert f({}, ["main"], attached=False, cuda=True) == "cuda,cpu"
    assert f({}, ["main"], attached=True, cuda=False) is None
    assert f({"JAX_PLATFORMS": "tpu"}, ["main"], attached=False, cuda=False) is None
    assert f({}, ["main", "--verbose"], attached=False, cuda=False) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert f({}, ["main"], attached=False, cuda=False) is None      # no libtpu installed
    # The device files libtpu opens: /dev/accel<n> (v2-v4), /dev/vfio/<n> (v5e on).
    assert not hostenv.tpu_attached(str(tmp_path))
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").touch()            # the container device, on any VFIO host
    assert not hostenv.tpu_attached(str(tmp_path))
    (tmp_path / "vfio" / "0").touch()
    assert hostenv.tpu_attached(str(tmp_path))
    (tmp_path / "vfio" / "0").unlink()
    (tmp_path / "accel0").touch()
    assert hostenv.tpu_attached(str(tmp_path))
