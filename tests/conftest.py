"""Test setup: 8 fake CPU devices so sharded code really shards."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# ---------------------------------------------------------------------------
# One persistent XLA compilation cache for the whole test session
# ---------------------------------------------------------------------------
# Stage runs build their jitted steps afresh (a new closure per run), so every
# run of the same config recompiles the same programs: a resume test's three
# runs, PPO and PPO-ptx in the pipeline, a 2-process run resumed. The cache
# turns the repeats into reads. It is made by the first pytest process (the
# xdist controller, or the only process) before any worker starts, so the
# workers and every subprocess they start (through os.environ) share it, and
# it is removed when that process ends: each session starts cold. A loaded
# executable is the compiled one, so results (bit-identity included) are
# unchanged. The size limit turns on JAX's file lock around each read and
# write, which two workers and a multi-process run need. A cache the caller
# set (JAX_COMPILATION_CACHE_DIR) is used as it is and kept;
# RLHF_JAX_TEST_XLA_CACHE=0 runs without one (every compile paid).
_CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
_CACHE_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.3",
                   "JAX_COMPILATION_CACHE_MAX_SIZE": str(32 << 30)}


def _make_session_cache():
    import tempfile
    if os.environ.get(_CACHE_DIR_ENV) or os.environ.get("RLHF_JAX_TEST_XLA_CACHE") == "0":
        return None
    path = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_cache_")
    os.environ[_CACHE_DIR_ENV] = path
    for key, value in _CACHE_SETTINGS.items():
        os.environ.setdefault(key, value)
    return path


_SESSION_CACHE = _make_session_cache()   # None in xdist workers: the controller's is inherited


def pytest_configure(config):
    import sys
    if "jax" in sys.modules and os.environ.get(_CACHE_DIR_ENV):
        # Imported before this file (a plugin): JAX read its settings already.
        import jax
        jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR_ENV])
        for key, kind in (("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", float),
                          ("JAX_COMPILATION_CACHE_MAX_SIZE", int)):
            if key in os.environ:
                jax.config.update(key.lower(), kind(os.environ[key]))


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        import shutil
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
