"""Test setup: 8 fake CPU devices so sharded code really shards; XLA set for
many small compiles on a shared CPU; one compilation cache for the session;
artefacts several files use, made once."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# LLVM -O0 and one Eigen thread in the test processes, and in the CLI runs
# they start (helpers.FAST_XLA_FLAGS, which says why);
# RLHF_JAX_TEST_XLA_DEFAULTS=1 keeps XLA's defaults.
from helpers import FAST_XLA_FLAGS  # noqa: E402

if os.environ.get("RLHF_JAX_TEST_XLA_DEFAULTS") != "1":
    for _flag in FAST_XLA_FLAGS:
        if _flag.split("=")[0] not in _flags:
            _flags += " " + _flag
os.environ["XLA_FLAGS"] = _flags.strip()

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


def _use_session_cache_if_jax_was_imported():
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


# ---------------------------------------------------------------------------
# Artefacts several test files use, made once a session
# ---------------------------------------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_jit_cache():
    """Each test starts with no kept jitted steps (rlhf_jax/jit_cache.py): a
    test that patches a function a step calls must trace it anew, and leave
    nothing patched behind. Within a test (a run and its resume) they are kept."""
    from rlhf_jax import jit_cache
    jit_cache.clear()
    yield


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A directory this session's xdist workers share (each worker's basetemp
    is a folder of one session root); the session's basetemp without xdist."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "shared"
    path.mkdir(exist_ok=True)
    return path


def build_once(directory, build):
    """Runs `build(directory)` unless a worker did already: under an exclusive
    lock, so the other worker waits for it and then reads what it made. A
    failed build leaves nothing behind for the next one to trust."""
    import fcntl
    import shutil
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / ".done"
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if not done.exists():
                try:
                    build(directory)
                except BaseException:
                    for child in directory.iterdir():
                        if child.name != ".lock":
                            shutil.rmtree(child) if child.is_dir() else child.unlink()
                    raise
                done.write_text("")
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return directory


def _build_micro_sft(root):
    from helpers import load_config, micro_model, reward_model_from, world_demos
    from rlhf_jax import stages
    cfg = micro_model(load_config("sft", "tiny"))
    cfg.data.path = world_demos(root / "demos.jsonl", n=128)
    cfg.data.data_dir = str(root / "tfds")
    cfg.train.update(dict(steps=8, batch_size=8, checkpoint_every=8, eval_every=8, eval_batches=1))
    stages.run(cfg, str(root / "sft"))
    # A zero-initialised scalar head on the SFT backbone.
    reward_model_from(str(root / "sft"), str(root / "rm"))


@pytest.fixture(scope="session")
def micro_sft(shared_dir):
    """A micro SFT checkpoint (8 steps on 128 world demonstrations) and an RM
    made from it (helpers.reward_model_from), built once for the session and
    read by the PPO tests (test_ppo.py, the 2-process PPO run of
    test_launch.py): {"sft": workdir, "rm": workdir}. Read-only: write
    elsewhere."""
    root = build_once(shared_dir / "micro_sft", _build_micro_sft)
    return {"sft": str(root / "sft"), "rm": str(root / "rm")}


# ---------------------------------------------------------------------------
# The longest files first
# ---------------------------------------------------------------------------
# README's command runs the files in two workers, each file whole on one
# (--dist loadfile), handed out in collection order: a long file collected
# late runs on alone at the end. pytest-xdist (3.x) reorders the files by
# their number of tests unless told not to (--loadscope-reorder is on by
# default), which put the one-test pipeline file last: on 2026-12-07 one
# worker ran 622 s and the other 515. So the files go longest first, in this
# order, and xdist keeps it (pytest_configure). Seconds in that run:
# 141, 117, 115, 115, 87, 86, 54, 53, 49, 45, 43, 43; the others keep theirs.
LONGEST_FILES = ("test_ppo.py", "test_launch.py", "test_pipeline.py", "test_reliability.py",
                 "test_rm.py", "test_model.py", "test_sampling.py", "test_sft.py", "test_grpo.py",
                 "test_pretrained.py", "test_checkpoint.py", "test_readme.py")


def pytest_configure(config):
    _use_session_cache_if_jax_was_imported()
    if hasattr(config.option, "loadscopereorder"):      # pytest-xdist
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))    # stable
