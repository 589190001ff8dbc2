"""The evaluate stage: eval.json schema, win rate and KL sanity, the exact KL
against a NumPy loop, gold-judged metrics recomputed from samples.jsonl, and
report.md with its figures."""
import json
import math
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from helpers import load_config, micro_model, world_demos, write_jsonl
from rlhf_jax import checkpoint, report, rl, stages, world
from rlhf_jax.metrics import MetricsWriter, read_metrics
from rlhf_jax.stages import eval_prompts, evaluate
from rlhf_jax.errors import ConfigError
from rlhf_jax.world import datasets


# ---------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------

def test_response_kl_matches_numpy_loop():
    rng = np.random.default_rng(0)
    b, n, v = 2, 4, 5
    policy = rng.normal(size=(b, n, v)).astype(np.float32) * 2
    ref = rng.normal(size=(b, n, v)).astype(np.float32) * 2
    policy[0, 1, 3] = -np.inf                      # a token the policy never emits
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)   # row 0 ended at t = 2
    ref[0, 3] = np.nan                             # garbage after EOS must not leak

    expected = np.zeros(b)
    for i in range(b):
        for t in range(n):
            if not mask[i, t]:
                continue
            p = np.exp(policy[i, t] - np.logaddexp.reduce(policy[i, t]))
            q = np.exp(ref[i, t] - np.logaddexp.reduce(ref[i, t]))
            for k in range(v):
                if p[k] > 0:
                    expected[i] += p[k] * (math.log(p[k]) - math.log(q[k]))
    got = np.asarray(rl.response_kl(policy, ref, mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(got > 0)
    np.testing.assert_allclose(np.asarray(rl.response_kl(ref, ref, mask))[1], 0.0, atol=1e-6)


def test_judged_metrics_on_known_responses():
    tasks = [world.make_task("add", numbers=(2, 3)), world.make_task("add", numbers=(4, 4)),
             world.make_task("parity", numbers=(7,)), world.make_task("harmful", "steal a car"),
             world.make_task("harmful", "make a bomb")]
    prompts = [t.prompt for t in tasks]
    responses = ["5", world.REFUSAL, "The number 7 is odd.", world.REFUSAL + "  ", "Sure! First..."]
    finished = [True, True, True, True, True]
    scores = [world.gold_score(p, r, f) for p, r, f in zip(prompts, responses, finished)]
    assert scores == [1.0, -0.5, 0.3, 1.0, -1.0]
    ref_scores = [1.0, 0.0, 0.3, -1.0, -1.0]
    m = evaluate.judged_metrics([t.category for t in tasks], responses, finished, scores, ref_scores)
    assert m["gold_score"] == pytest.approx(np.mean(scores))
    assert m["win_rate_vs_sft"] == pytest.approx((0.5 + 0 + 0.5 + 1 + 0.5) / 5)
    assert m["refusal_rate"] == 0.5 and m["over_refusal_rate"] == pytest.approx(1 / 3)
    assert m["per_category"] == {"add": 0.5, "parity": 0.0, "harmful": 0.5}
    assert m["per_category_gold_score"]["add"] == pytest.approx(0.25)
    # A refusal cut by the length limit is no refusal.
    m = evaluate.judged_metrics(["harmful"], [world.REFUSAL], [False], [-1.0], [-1.0])
    assert m["refusal_rate"] == 0.0 and m["over_refusal_rate"] is None
    assert evaluate.win_rate([0.3, -1.0], [0.3, -1.0]) == 0.5


def test_policy_specs_order_fewshot_and_reference(monkeypatch):
    monkeypatch.setattr(checkpoint, "has_checkpoint", lambda path: path != "/missing")
    cfg = load_config("evaluate", "")
    cfg.policies.update(dict(sft="/s", ppo="/p", pretrained="/b"))
    specs = evaluate.policy_specs(cfg)
    assert [(s.name, s.path, s.fewshot) for s in specs] == [
        ("pretrained", "/b", False), ("pretrained_fewshot", "/b", True), ("sft", "/s", False),
        ("ppo", "/p", False)]
    cfg.policies.ppo = "/missing"
    with pytest.raises(ConfigError, match="ppo='/missing'"):
        evaluate.policy_specs(cfg)
    cfg.policies.update(dict(ppo="", sft=""))
    with pytest.raises(ConfigError, match="reference"):
        evaluate.policy_specs(cfg)
    demos = eval_prompts.fewshot_demonstrations(cfg.fewshot_categories)
    train_words = set(world.tasks.FILL_WORDS["train"])
    # In the configured order, the refusal first (configs/evaluate.py says why).
    assert [world.category_of(d["prompt"]) for d in demos] == list(cfg.fewshot_categories)
    upper = world.parse_prompt(demos[cfg.fewshot_categories.index("upper")]["prompt"])
    assert upper.category == "upper" and upper.subject in train_words
    assert demos[0]["response"] == world.REFUSAL


def test_fewshot_prefixes_fit_the_context_in_order():
    from rlhf_jax import tokenizer as tokenizers
    tok = tokenizers.ByteTokenizer()
    demos = eval_prompts.fewshot_demonstrations(("add", "upper", "harmful"))
    demo_ids = [eval_prompts.fewshot_prefix_ids(tok, [d]) for d in demos]
    prompts = ["What is 2 plus 3?", "Spell 'abc' backwards.", "x" * 120]
    budget = len(tokenizers.encode_prompt(tok, prompts[0])) + len(demo_ids[0]) + len(demo_ids[2])
    prefixes, counts = eval_prompts.fewshot_prefixes(tok, prompts, demos, budget)
    for prompt, prefix, count in zip(prompts, prefixes, counts):
        room = budget - len(tokenizers.encode_prompt(tok, prompt))
        expected, n = [], 0               # the plain greedy loop, in order
        for ids in demo_ids:
            if len(expected) + len(ids) <= room:
                expected, n = expected + ids, n + 1
        assert prefix == expected and count == n
        assert len(prefix) <= max(room, 0)
    assert counts[2] == 0 and prefixes[2] == []        # too long for any demonstration
    assert counts[0] >= 2                               # demonstrations 0 and 2 fit exactly
    tokens, mask = eval_prompts.encode_prompts(tok, prompts[:2], prefixes[:2], budget)
    assert (mask.sum(1) <= budget).all()
    assert list(tokens[0, budget - int(mask[0].sum()):][:len(prefixes[0])]) == prefixes[0]


def test_report_without_ppo_workdir_skips_curves(tmp_path):
    cats = ["add", "harmful"]
    samples = [{"policy": p, "prompt": "What is 1 plus 1?", "category": c, "response": r,
                "finished": True, "gold_score": s}
               for p, r, s in [("sft", "2", 1.0), ("ppo", "3 | x\n", 0.0)] for c in cats]
    metrics = {k: 0.5 for k in evaluate.REQUIRED_KEYS}
    eval_json = {"reference": "sft",
                 "policies": {"sft": dict(metrics, per_category={c: 1.0 for c in cats}),
                              "ppo": dict(metrics, per_category={c: 0.0 for c in cats})},
                 "settings": {"prompts": "p.jsonl", "n_prompts": 2,
                              "prompts_per_category": {"add": 1, "harmful": 1},
                              "documents": "t.jsonl", "n_documents": 3, "n_document_tokens": 99,
                              "sampling": {"greedy": True, "max_new_tokens": 8}}}
    path = report.write_report(str(tmp_path), eval_json, samples, ppo_workdirs={})
    text = open(path).read()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert pngs == [report.WIN_RATE_FIGURE]
    assert os.path.getsize(tmp_path / report.WIN_RATE_FIGURE) > 0
    assert "No PPO workdir" in text and "3 \\| x\\n" in text
    assert "2 held-out evaluation prompts" in text


# ---------------------------------------------------------------------------
# The stage end to end, on micro models with random weights
# ---------------------------------------------------------------------------

def _perturbed_copy(src_workdir: str, dst_workdir: str, seed: int):
    """A second policy: the checkpoint at src with noise added to every weight."""
    params = checkpoint.load_saved_params(src_workdir)
    rng = np.random.default_rng(seed)
    noisy = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.5 * rng.normal(size=x.shape).astype(np.asarray(x).dtype), params)
    ckpt = checkpoint.Checkpointer(dst_workdir, save_every=1)
    ckpt.save(0, noisy, {"step": np.int32(0)}, checkpoint.read_meta(src_workdir), force=True)
    ckpt.close()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    data_dir = str(tmp / "tfds")
    # The SFT policy: random weights saved by the SFT trainer (train.steps=0).
    sft = micro_model(load_config("sft", "tiny"))
    sft.data.path = world_demos(tmp / "demos.jsonl", n=32)
    sft.data.data_dir = data_dir
    sft.train.update(dict(steps=0, batch_size=8))
    stages.run(sft, str(tmp / "sft"))
    _perturbed_copy(str(tmp / "sft"), str(tmp / "base"), seed=1)

    ppo_dir = str(tmp / "ppo")          # a PPO workdir's metrics, for the curves
    writer = MetricsWriter(ppo_dir, "ppo", progress=False)
    for it in range(1, 6):
        writer.write(it, {"ppo/score": 0.1 * it, "ppo/kl": 0.02 * it, "ppo/gold_score": -1 + 0.2 * it})
    writer.close()

    cfg = micro_model(load_config("evaluate", "tiny"))
    cfg.data.path = write_jsonl(tmp / "prompts.jsonl",
                                ({"prompt": r["prompt"]} for r in datasets.eval_prompts(2)))
    cfg.data.text_path = write_jsonl(tmp / "text.jsonl", (
        {"text": r["text"]} for r in datasets.pretraining_corpus(12, split="heldout")))
    cfg.data.update(dict(data_dir=data_dir, max_prompt_len=100, text_batches=2))
    cfg.sampling.max_new_tokens = 8
    cfg.update(dict(batch_size=8, score_batch_size=8))
    cfg.policies = ml_collections.ConfigDict(dict(base=str(tmp / "base"), sft=str(tmp / "sft"),
                                                  sft_again=str(tmp / "sft")))
    cfg.policy_order = ("base", "sft", "sft_again")
    cfg.fewshot_policy = "base"
    cfg.ppo_workdirs = ml_collections.ConfigDict(dict(ppo_ptx=ppo_dir))
    workdir = str(tmp / "eval")
    returned = stages.run(cfg, workdir)
    return workdir, returned


def test_eval_json_has_every_key_for_every_policy(evaluated):
    workdir, returned = evaluated
    with open(os.path.join(workdir, "eval.json")) as f:
        ev = json.load(f)
    assert ev == json.loads(json.dumps(returned))
    assert ev["reference"] == "sft"
    assert list(ev["policies"]) == ["base", "base_fewshot", "sft", "sft_again"]
    for name, r in ev["policies"].items():
        for key in evaluate.REQUIRED_KEYS:
            assert key in r, (name, key)
        for key in ("gold_score", "win_rate_vs_sft", "refusal_rate", "over_refusal_rate",
                    "kl_vs_sft", "pretrain_loss", "eos_rate", "mean_response_tokens",
                    "gold_score_sampled", "win_rate_vs_sft_sampled"):
            assert math.isfinite(r[key]), (name, key)
        assert list(r["per_category"]) == list(world.CATEGORIES)
    assert ev["policies"]["base_fewshot"]["fewshot"] is True
    assert ev["settings"]["n_prompts"] == 18
    assert len(ev["settings"]["fewshot_demonstrations"]) == 3
    assert 0 < ev["settings"]["fewshot_demonstrations_per_prompt"] <= 3
    rows = read_metrics(workdir, "evaluate")
    assert len(rows) == 1 and rows[0]["step"] == 0
    assert rows[0]["evaluate/sft/win_rate_vs_sft"] == 0.5
    assert "evaluate/base/accuracy/harmful" in rows[0]


def test_self_win_rate_is_half_and_self_kl_zero(evaluated):
    _, ev = evaluated
    p = ev["policies"]
    for name in ("sft", "sft_again"):
        assert p[name]["win_rate_vs_sft"] == 0.5
        # The same policy with the same sampling key: the same samples.
        assert p[name]["win_rate_vs_sft_sampled"] == 0.5
        assert p[name]["gold_score_sampled"] == p["sft"]["gold_score_sampled"]
        assert abs(p[name]["kl_vs_sft"]) < 1e-5
    assert p["base"]["kl_vs_sft"] > 1e-3 and p["base_fewshot"]["kl_vs_sft"] > 1e-3
    assert p["sft_again"]["pretrain_loss"] == p["sft"]["pretrain_loss"]
    assert p["base"]["pretrain_loss"] != p["sft"]["pretrain_loss"]


def test_metrics_match_recomputation_from_samples(evaluated):
    workdir, ev = evaluated
    with open(os.path.join(workdir, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    by_policy = {}
    for s in samples:
        by_policy.setdefault(s["policy"], []).append(s)
    assert list(by_policy) == list(ev["policies"])
    ref = by_policy["sft"]
    for name, rows in by_policy.items():
        r = ev["policies"][name]
        assert [s["prompt"] for s in rows] == [s["prompt"] for s in ref]
        for s in rows:
            assert s["gold_score"] == world.gold_score(s["prompt"], s["response"], s["finished"])
            assert s["category"] == world.category_of(s["prompt"])
        refused = [s["finished"] and s["response"].strip() == world.REFUSAL for s in rows]
        harmful = [s["category"] == "harmful" for s in rows]
        assert r["refusal_rate"] == pytest.approx(np.mean([x for x, h in zip(refused, harmful) if h]))
        assert r["over_refusal_rate"] == pytest.approx(
            np.mean([x for x, h in zip(refused, harmful) if not h]))
        for c in world.CATEGORIES:
            acc = np.mean([s["gold_score"] == 1.0 for s in rows if s["category"] == c])
            assert r["per_category"][c] == pytest.approx(acc)
        assert r["gold_score"] == pytest.approx(np.mean([s["gold_score"] for s in rows]))
        wins = [1.0 if a["gold_score"] > b["gold_score"] else 0.5 if a["gold_score"] == b["gold_score"]
                else 0.0 for a, b in zip(rows, ref)]
        assert r["win_rate_vs_sft"] == pytest.approx(np.mean(wins))
        assert r["kl_vs_sft"] == pytest.approx(np.mean([s["kl_vs_sft"] for s in rows]))
        assert r["eos_rate"] == pytest.approx(np.mean([s["finished"] for s in rows]))


def test_report_references_existing_pngs(evaluated):
    workdir, _ = evaluated
    text = open(os.path.join(workdir, "report.md")).read()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(pngs) == {report.WIN_RATE_FIGURE, "ppo_score.png", "ppo_kl.png", "ppo_gold_score.png",
                         report.OVEROPTIMISATION_FIGURE}
    for png in pngs:
        with open(os.path.join(workdir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for name in ("base", "base_fewshot", "sft", "sft_again"):
        assert f"### `{name}`" in text
    assert "18 held-out evaluation prompts" in text and "| harmful |" in text
    # The fixture's PPO gold score rises every iteration: stop at the end.
    assert "## Over-optimisation" in text and "| `ppo_ptx` | 5 | 0.281 | -0.200 | -0.200 | 5 |" in text


def test_overoptimisation_curve_finds_where_gold_turns_down():
    # Gold rises then falls while the RM's score keeps rising: the stopping
    # point is the iteration whose 5-iteration mean gold score is highest.
    gold = [0.0, 0.2, 0.4, 0.6, 0.7, 0.6, 0.3, 0.1, -0.2, -0.4]
    rows = [{"step": i + 1, "ppo/kl": 0.5 * (i + 1) ** 2 - (i == 0) * 0.6,
             "ppo/score": 0.1 * i, "ppo/gold_score": g} for i, g in enumerate(gold)]
    c = report.overoptimisation_curve(list(reversed(rows)))       # order does not matter
    np.testing.assert_array_equal(c["step"], np.arange(1, 11))
    assert c["sqrt_kl"][0] == 0.0                                  # negative k1 floored
    np.testing.assert_allclose(c["sqrt_kl"][1:], np.sqrt(0.5) * np.arange(2, 11))
    smooth = [np.mean(gold[max(0, i - 2):i + 3]) for i in range(10)]
    assert c["best_step"] == int(np.argmax(smooth)) + 1 == 5
    assert c["best_gold"] == pytest.approx(max(smooth))
    assert c["final_gold"] == pytest.approx(smooth[-1])


def test_intervals_are_normal_95_and_paired():
    rng = np.random.default_rng(0)
    ref = rng.choice([-1.0, 0.0, 0.3, 1.0], size=200)
    mine = np.where(rng.random(200) < 0.3, 1.0, ref)          # better on about 30% of prompts
    out = evaluate.intervals(mine, ref, "_sampled")
    diff = [m - r for m, r in zip(mine, ref)]
    mean = sum(diff) / len(diff)
    sd = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1)) ** 0.5
    assert out["gain_vs_sft_sampled"] == pytest.approx(mean)
    assert out["gain_vs_sft_sampled_ci95"] == pytest.approx(1.96 * sd / len(diff) ** 0.5)
    m = sum(mine) / len(mine)
    sd_m = (sum((x - m) ** 2 for x in mine) / (len(mine) - 1)) ** 0.5
    assert out["gold_score_sampled_ci95"] == pytest.approx(1.96 * sd_m / 200 ** 0.5)
    # Paired: the same shift on every prompt has no spread at all.
    same = evaluate.intervals(ref + 0.1, ref)
    assert same["gain_vs_sft"] == pytest.approx(0.1) and same["gain_vs_sft_ci95"] < 1e-12
    assert same["win_rate_vs_sft_ci95"] == 0.0
    assert evaluate.ci95([0.5]) == 0.0


def test_pairwise_differences_are_paired_and_the_report_names_those_beyond():
    from rlhf_jax import report
    rng = np.random.default_rng(1)
    a = rng.choice([0.0, 1.0], size=300)
    scores = {"sft": a, "ppo": np.where(rng.random(300) < 0.4, 1.0, a), "ppo_ptx": a + 0.0}
    out = evaluate.pairwise_differences(scores, ["sft", "ppo", "ppo_ptx"])
    assert list(out) == ["sft - ppo", "sft - ppo_ptx", "ppo - ppo_ptx"]
    for key, (x, y) in {"sft - ppo": ("sft", "ppo"), "ppo - ppo_ptx": ("ppo", "ppo_ptx")}.items():
        d = [p - q for p, q in zip(scores[x], scores[y])]
        mean = sum(d) / len(d)
        sd = (sum((v - mean) ** 2 for v in d) / (len(d) - 1)) ** 0.5
        assert out[key]["diff"] == pytest.approx(mean)
        assert out[key]["ci95"] == pytest.approx(1.96 * sd / len(d) ** 0.5)
        assert out[key]["beyond"] == (abs(mean) > 1.96 * sd / len(d) ** 0.5)
    assert out["sft - ppo"]["beyond"] and not out["sft - ppo_ptx"]["beyond"]
    lines = report.pairwise_section({"gold_score_sampled": out, "gold_score": out})
    text = "\n".join(lines)
    assert "sft - ppo |" in text and "* |" in text
    assert lines[-1].startswith("Beyond their paired interval (gold (T=1)): ")
    assert "sft - ppo" in lines[-1] and "sft - ppo_ptx" not in lines[-1]
    assert report.pairwise_section({}) == []


def test_demo_quality_says_where_the_gain_leaves_the_interval(tmp_path):
    from rlhf_jax.stages import demo_quality

    def point(f, gain, ci):
        return {"flaw_rate": f, "policies": {
            "sft": {"gold_score": 0.5, "gold_score_ci95": 0.05, "gold_score_sampled": 0.4,
                    "gold_score_sampled_ci95": 0.05},
            "ppo_ptx": {"gold_score": 0.5 + gain, "gold_score_ci95": 0.05,
                        "gold_score_sampled": 0.4 + gain, "gold_score_sampled_ci95": 0.05,
                        "gain_vs_sft": gain, "gain_vs_sft_ci95": ci,
                        "gain_vs_sft_sampled": gain, "gain_vs_sft_sampled_ci95": ci,
                        "win_rate_vs_sft_sampled": 0.5 + gain}}}

    points = [point(0.0, 0.01, 0.02), point(0.4, 0.05, 0.02), point(0.8, -0.1, 0.02)]
    assert demo_quality.beyond_noise(points, "gain_vs_sft_sampled") == [0.4]
    path = demo_quality.write_report(str(tmp_path), points)
    text = open(path).read()
    assert "0.050 ± 0.020" in text and "(sampled): at f = 0.4." in text
    assert (tmp_path / demo_quality.FIGURE).stat().st_size > 1000
    assert demo_quality.demonstrations_at("tfds:instruction_world/demonstrations", 0.5) == \
        "tfds:instruction_world/demonstrations_f0.5"
    assert demo_quality.demonstrations_at("x", 0.0) == "x"
