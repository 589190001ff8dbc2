"""The whole InstructGPT pipeline (configs/instructgpt.py:tiny) end to end,
its closing table, and its resume: a rerun skips every finished stage; then
configs/compare.py:tiny (PPO-ptx, GRPO on the RM and on the gold reward,
DPO) from the same SFT, comparisons and RM."""
import json
import os
import re
import shutil

from configs import instructgpt as instructgpt_config
from helpers import load_config
from rlhf_jax import stages

DESIGN_KEYS = {"gold_score", "win_rate_vs_sft", "refusal_rate", "over_refusal_rate", "kl_vs_sft",
               "pretrain_loss", "per_category"}


def _tiny(name, data_dir):
    """configs/<name>.py:tiny with the micro base model; instructgpt and
    compare share every stage up to the RM (and PPO-ptx)."""
    cfg = load_config(name, "tiny")
    for stage in ("pretrain", "sft", "collect", "rm", "ppo", "grpo", "dpo", "evaluate"):
        if stage in cfg:
            cfg[stage].data.data_dir = data_dir
    cfg.pretrain.model.update(dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64))
    cfg.pretrain.train.steps = 10
    cfg.sft.train.steps = 10
    cfg.ppo.train.steps = 2
    if "grpo" in cfg:
        cfg.grpo.train.steps = 2
    return cfg


def test_tiny_pipeline_end_to_end_and_skip_on_rerun(tmp_path, capsys):
    cfg = _tiny("instructgpt", str(tmp_path / "tfds"))
    workdir = str(tmp_path / "igpt")
    stages.run(cfg, workdir)
    first_out = capsys.readouterr().out

    with open(os.path.join(workdir, "eval.json")) as f:
        ev = json.load(f)
    policies = ev["policies"]
    assert {"pretrained", "pretrained_fewshot", "sft", "ppo", "ppo_ptx"} <= set(policies)
    for name, metrics in policies.items():
        assert DESIGN_KEYS <= set(metrics), name
        assert len(metrics["per_category"]) == 9
    assert policies["sft"]["win_rate_vs_sft"] == 0.5
    report = open(os.path.join(workdir, "report.md")).read()
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert os.path.exists(os.path.join(workdir, png)), png
    timings = json.load(open(os.path.join(workdir, "pipeline.json")))["seconds"]
    assert set(timings) == {"pretrain", "sft", "collect", "rm", "ppo", "ppo_ptx", "evaluate"}
    # PPO read the bias-normalised RM and the collect step's comparisons,
    # drawn from the SFT policy and the pipeline's own (pretrained) base.
    assert os.path.exists(os.path.join(workdir, "collect", "comparisons.jsonl"))
    collected = json.load(open(os.path.join(workdir, "collect", "collect.json")))
    paths = {p["name"]: p["path"] for p in collected["settings"]["policies"]}
    assert paths == {"sft": os.path.join(workdir, "sft", "checkpoints"),
                     "base": os.path.join(workdir, "pretrain", "checkpoints")}, paths
    rm_rows = [json.loads(line) for line in open(os.path.join(workdir, "rm", "metrics.jsonl"))]
    if collected["eval_sft_records"]:     # the SFT samples of 16 prompts may all tie
        assert any("rm/gold_accuracy_sft" in r for r in rm_rows)
    assert any("rm/gold_accuracy" in r for r in rm_rows)
    for name in ("sft", "ppo", "ppo_ptx"):
        assert "gold_score_sampled" in policies[name]

    # The run ends with the evaluation table, a row per policy, and report.md's path.
    tail = first_out.splitlines()[-(len(policies) + 2):]
    assert tail[0].split()[:3] == ["policy", "gold", "(T=1)"], first_out
    assert [row.split()[0] for row in tail[1:-1]] == list(policies)
    assert tail[-1] == f"report: {os.path.join(workdir, 'report.md')}"

    stages.run(cfg, workdir)
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 7, out

    # configs/compare.py:tiny from the same SFT, comparisons and RM (and
    # PPO-ptx): a copy of this workdir whose evaluation is to be redone.
    compare = str(tmp_path / "compare")
    shutil.copytree(workdir, compare)
    os.remove(os.path.join(compare, ".done", "evaluate"))
    stages.run(_tiny("compare", str(tmp_path / "tfds")), compare)
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 5, out   # pretrain, sft, collect, rm, ppo_ptx
    ev = json.load(open(os.path.join(compare, "eval.json")))
    assert list(ev["policies"]) == ["sft", "ppo_ptx", "grpo", "grpo_gold", "dpo"]
    for name, metrics in ev["policies"].items():
        assert DESIGN_KEYS | {"gold_score_sampled"} <= set(metrics), name
    # Each method trained from the SFT policy it was given.
    for name, stage in (("grpo", "grpo"), ("grpo_gold", "grpo"), ("dpo", "dpo")):
        rows = [json.loads(line) for line in open(os.path.join(compare, name, "metrics.jsonl"))]
        assert any(f"{stage}/loss" in r for r in rows), name
    gold_rows = [json.loads(line) for line in open(os.path.join(compare, "grpo_gold",
                                                                  "metrics.jsonl"))]
    assert all(r["grpo/gold_score"] == r["grpo/score"] for r in gold_rows if "grpo/score" in r)
    notes = open(os.path.join(compare, "report.md")).read()
    assert "GRPO 2 iterations" in notes and "DPO" in notes

    # configs/demo_quality.py:tiny: the sweep over flaw rates. Each f's run
    # is the pipeline run above (its config, checked here, differs only in
    # the demonstrations and the base), so the main job's workdir stands for
    # both: every stage of each f is then skipped, and the sweep gathers,
    # reports and draws both points.
    from rlhf_jax.stages import demo_quality
    dq = str(tmp_path / "demo_quality")
    shutil.copytree(os.path.join(workdir, "pretrain"), os.path.join(dq, "pretrain"))
    os.makedirs(os.path.join(dq, ".done"))
    open(os.path.join(dq, ".done", "pretrain"), "w").close()
    f = instructgpt_config.FLAW_RATE
    for rate in (0.0, f):
        shutil.copytree(workdir, demo_quality.flaw_dir(dq, rate))
    dq_cfg = _tiny("demo_quality", str(tmp_path / "tfds"))
    assert tuple(dq_cfg.flaw_rates) == (0.0, f)
    base = os.path.join(dq, "pretrain")
    for rate, path in ((0.0, dq_cfg.demonstrations), (f, f"{dq_cfg.demonstrations}_f{f:g}")):
        sub = demo_quality._pipeline_config(dq_cfg, rate, base)
        assert sub.sft.data.path == path and sub.base_from == base
        assert sub.stage == "pipeline" and "flaw_rates" not in sub
    assert demo_quality._pipeline_config(dq_cfg, f, base).sft.data.path == cfg.sft.data.path
    stages.run(dq_cfg, dq)
    out = capsys.readouterr().out
    # Per f: sft, collect, rm, ppo_ptx, evaluate (the sweep's base is a path,
    # and its methods are ppo_ptx alone).
    assert out.count("finished earlier, skipped") == 10, out
    points = json.load(open(os.path.join(dq, "demo_quality.json")))
    assert [p["flaw_rate"] for p in points] == [0.0, f]
    for p in points:
        assert set(p["policies"]) >= {"pretrained", "sft", "ppo_ptx"}
        assert p["policies"]["ppo_ptx"]["gain_vs_sft_sampled_ci95"] >= 0
    report = open(os.path.join(dq, "report.md")).read()
    assert "demo_quality.png" in report and os.path.exists(os.path.join(dq, "demo_quality.png"))
    assert "PPO-ptx above SFT beyond the 95% interval (sampled)" in out
