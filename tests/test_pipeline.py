"""The whole InstructGPT pipeline (configs/instructgpt.py:tiny) end to end,
its closing table, and its resume: a rerun skips every finished stage."""
import json
import os
import re

from helpers import load_config
from rlhf_jax import stages

DESIGN_KEYS = {"gold_score", "win_rate_vs_sft", "refusal_rate", "over_refusal_rate", "kl_vs_sft",
               "pretrain_loss", "per_category"}


def test_tiny_pipeline_end_to_end_and_skip_on_rerun(tmp_path, capsys):
    cfg = load_config("instructgpt", "tiny")
    data_dir = str(tmp_path / "tfds")
    for stage in ("pretrain", "sft", "collect", "rm", "ppo", "evaluate"):
        cfg[stage].data.data_dir = data_dir
    cfg.pretrain.model.update(dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64))
    cfg.pretrain.train.steps = 10
    cfg.sft.train.steps = 10
    cfg.ppo.train.steps = 2
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
    assert tail[0].split()[:3] == ["policy", "gold", "win"], first_out
    assert [row.split()[0] for row in tail[1:-1]] == list(policies)
    assert tail[-1] == f"report: {os.path.join(workdir, 'report.md')}"

    stages.run(cfg, workdir)
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 7, out
