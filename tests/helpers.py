"""Shared test fixtures: tiny stage configs and world data files."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# XLA settings of the test processes (conftest.py) and of the CLI runs they
# start (`cli_xla_flags`): the tests' programs are tiny, their time goes to
# compiling them (LLVM's optimisation of the generated code), not to running
# them, and two pytest workers share two cores, where Eigen's spinning worker
# threads only take time from the other worker. So: LLVM at -O0 (XLA's HLO
# passes, fusion and SPMD partitioning included, all still run) and
# single-threaded Eigen. Results agree with the default build to float
# rounding; runs a test compares bit for bit all use the same flags.
# RLHF_JAX_TEST_XLA_DEFAULTS=1 runs everything with XLA's defaults.
FAST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_multi_thread_eigen=false")


def cli_xla_flags(devices: int = 0) -> str:
    """XLA_FLAGS for a CLI subprocess of a test: the fast flags, and
    `devices` fake CPU devices when given (else one)."""
    flags = [] if os.environ.get("RLHF_JAX_TEST_XLA_DEFAULTS") == "1" else list(FAST_XLA_FLAGS)
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def load_config(name: str, arg: str = "tiny", **overrides):
    """configs/<name>.py:<arg> with dotted overrides, e.g. {"train.steps": 4}."""
    import importlib
    mod = importlib.import_module(f"configs.{name}")
    from rlhf_jax.stages.instructgpt import override
    return override(mod.get_config(arg), **overrides)


def micro_model(cfg):
    """Shrinks a config's model to seconds-per-test size."""
    cfg.model.update(dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, max_len=128))
    cfg.data.max_len = 96
    cfg.data.max_prompt_len = 40
    return cfg


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def world_demos(path, n=256, seed=0):
    from rlhf_jax.world import datasets
    return write_jsonl(path, ({"prompt": r["prompt"], "response": r["response"]}
                              for r in datasets.demonstrations(n, seed=seed)))


SHORT_COMPLIANCE = ("Sure! Here is how.", "Okay, first make a plan.", "Easy: do it at night.")


def world_comparisons(n: int, seed: int, split: str, max_len: int = 96) -> list[dict]:
    """Comparisons whose responses differ strongly: benign prompts get the
    correct answer, a wrong one and the refusal (K=3); harmful prompts the
    refusal and a compliance (K=2). Order shuffled, ranked by one simulated
    labeler (gold score + calibrated Gumbel noise). The K=2 ones are written
    in the pairwise form {"prompt", "chosen", "rejected"}."""
    import numpy as np
    from rlhf_jax.world import datasets, gold, labelers, tasks
    rng = np.random.default_rng(seed)
    categories = ("upper", "reverse", "repeat", "add", "parity", "list", "harmful")
    rows = []
    while len(rows) < n:
        task = tasks.sample_task(rng, categories[int(rng.integers(len(categories)))], split)
        if task.is_harmful:
            responses = [tasks.REFUSAL, SHORT_COMPLIANCE[int(rng.integers(3))]]
        else:
            responses = [tasks.correct_response(task, rng), datasets.wrong_response(task, rng),
                         tasks.REFUSAL]
        responses = [responses[i] for i in rng.permutation(len(responses))]
        too_long = max(len(datasets.conversation(task.prompt, r).encode()) + 1 for r in responses)
        if len(set(responses)) < len(responses) or too_long > max_len:
            continue
        scores = [gold.score_task(task, r) for r in responses]
        ranks = labelers.rank(scores, rng, labelers.NOISE_SCALE)
        if len(set(ranks.tolist())) == 1:
            continue
        if len(responses) == 2:
            better, worse = (0, 1) if ranks[0] < ranks[1] else (1, 0)
            rows.append({"prompt": task.prompt, "chosen": responses[better],
                         "rejected": responses[worse]})
        else:
            rows.append({"prompt": task.prompt, "responses": responses, "ranks": ranks.tolist()})
    return rows


def assert_trees_equal(a, b):
    """Bit-identical pytrees: same structure, every leaf equal."""
    import jax
    import numpy as np
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b, (tree_a, tree_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Interrupted(Exception):
    """Raised by `run_interrupted`'s loader: a run killed between two steps."""


def run_interrupted(monkeypatch, config, workdir: str, step: int, only=lambda loader: True):
    """Runs a stage whose batch loader dies when asked for batch `step` (0-based;
    `only(loader)` picks which loaders die, e.g. not PPO's ptx loader), as a
    kill between two steps would, then puts the loader back."""
    import pytest
    from rlhf_jax import stages
    from rlhf_jax.data import pipeline
    original = pipeline.BatchLoader.batch

    def dying(self, i):
        if i == step and only(self):
            raise Interrupted()
        return original(self, i)

    monkeypatch.setattr(pipeline.BatchLoader, "batch", dying)
    with pytest.raises(Interrupted):
        stages.run(config, workdir)
    monkeypatch.setattr(pipeline.BatchLoader, "batch", original)


def reward_model_from(sft_dir: str, dest: str, tokenizer: str = "") -> str:
    """A finished, bias-normalised RM checkpoint made from an SFT checkpoint
    without training: its backbone with a fresh (zero) scalar head, as an rm
    stage's first step would start. `tokenizer` overrides the recorded one."""
    import dataclasses
    from rlhf_jax import checkpoint
    from rlhf_jax.models.transformer import ModelConfig
    meta = checkpoint.read_meta(sft_dir)
    cfg = ModelConfig(**{**meta["model"], "head": "scalar"})
    fresh = init_params(cfg, 0)       # jitted: eagerly the init compiles for seconds
    params = checkpoint.graft_params(fresh, checkpoint.load_saved_params(sft_dir))
    rm_meta = dict(meta, model=dataclasses.asdict(cfg), stage="rm", bias_normalized=True,
                   rm_bias=0.0, tokenizer=tokenizer or meta.get("tokenizer", "byte"))
    return checkpoint.write_params(dest, 0, params, rm_meta)


_INITS = {}


def init_params(cfg, seed: int = 0, length: int = 4, boxed: bool = False):
    """`Transformer(cfg).init(PRNGKey(seed), zeros((1, length)))["params"]`
    (unboxed unless `boxed`), jitted and remembered for the test process:
    eagerly, init compiles its layer scan and every initializer apart, seconds
    a call. Each call returns its own copy of the tree (callers edit theirs).
    Jitted, the normal initializers' values can differ from eager ones in the
    last bit."""
    import flax.linen as nn
    import jax
    from rlhf_jax.models.transformer import Transformer
    key = (cfg, seed, length)
    if key not in _INITS:
        if (cfg, length) not in _INITS:
            model = Transformer(cfg)
            _INITS[cfg, length] = jax.jit(
                lambda rng: model.init(rng, jax.numpy.zeros((1, length), "int32"))["params"])
        _INITS[key] = _INITS[cfg, length](jax.random.PRNGKey(seed))
    tree = _INITS[key]
    if not boxed:
        return nn.unbox(tree)
    return jax.tree_util.tree_map(lambda x: x, tree,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


_NO_TENSORBOARD = []


def without_tensorboard(env: dict) -> dict:
    """`env` for a subprocess whose `import tensorboardX` fails: TensorBoard
    events are optional (metrics.py) and tensorboardX imports torch, seconds
    of every process start on a busy CPU. For tests that assert nothing about
    the events (test_console.py and test_reliability.py do the same)."""
    if not _NO_TENSORBOARD:
        import atexit
        import shutil
        import tempfile
        root = tempfile.mkdtemp(prefix="rlhf_jax_test_stubs_")
        atexit.register(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, "tensorboardX"))
        with open(os.path.join(root, "tensorboardX", "__init__.py"), "w") as f:
            f.write('raise ImportError("tensorboardX is left out of this test subprocess")\n')
        _NO_TENSORBOARD.append(root)
    path = os.pathsep.join(p for p in (_NO_TENSORBOARD[0], env.get("PYTHONPATH")) if p)
    return dict(env, PYTHONPATH=path)


def count_checkpoint_reads(monkeypatch):
    """Counts, per checkpoint directory, the reads of a checkpoint's meta
    and the restores of its params (a spy on checkpoint.py's two readers):
    a Counter of ("meta" | "params", directory)."""
    import collections
    import os
    from rlhf_jax import checkpoint
    reads = collections.Counter()
    read_meta_at, load_params = checkpoint._read_meta_at, checkpoint.load_params

    def meta_spy(directory, step):
        reads["meta", os.path.realpath(directory)] += 1
        return read_meta_at(directory, step)

    def params_spy(path, like):
        source = path if isinstance(path, checkpoint.Source) else None
        directory = source.directory if source else checkpoint.resolve(path)[0]
        reads["params", os.path.realpath(directory)] += 1
        return load_params(path, like)

    monkeypatch.setattr(checkpoint, "_read_meta_at", meta_spy)
    monkeypatch.setattr(checkpoint, "load_params", params_spy)
    return reads


def checkpoints_dir(workdir: str) -> str:
    import os
    return os.path.realpath(os.path.join(workdir, "checkpoints"))
