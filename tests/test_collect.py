"""The collect step: K samples per prompt from an SFT checkpoint, ranked by a
simulated labeler, written as comparisons that the data layer reads back."""
import json
import os
import shutil

import numpy as np
import pytest

from helpers import load_config, world_demos
from rlhf_jax import stages, world
from rlhf_jax.assets import world_base_path
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.data import jsonl
from rlhf_jax.metrics import read_metrics
from rlhf_jax.stages import collect
from rlhf_jax.errors import ConfigError
from rlhf_jax.stages.instructgpt import override
from rlhf_jax.world import gold

MIX = (("sft", "init_from", 2), ("base", "base", 2))
K = 4
MAX_NEW = 24


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    """A micro SFT run: a few steps on world demonstrations from the shipped
    base model, so that its samples are text of the corpus's kinds (correct,
    verbose, wrong, refusals, how-to texts) with real gold differences."""
    root = tmp_path_factory.mktemp("collect")
    cfg = load_config("sft", "tiny")
    cfg.init_from = world_base_path()
    cfg.data.path = world_demos(root / "demos.jsonl", n=128)
    cfg.data.data_dir = str(root / "tfds")
    cfg.train.update(dict(steps=6, batch_size=16, lr=1e-3, warmup_steps=1, eval_every=6,
                          eval_batches=1, checkpoint_every=6, log_every=3))
    stages.run(cfg, str(root / "sft"))
    return root


def _collect_config(root, **overrides):
    cfg = load_config("collect", "tiny")      # the architecture comes from the checkpoint
    cfg.init_from = str(root / "sft")
    cfg.data.data_dir = str(root / "tfds")
    cfg.comparisons.update(dict(num_prompts=40, num_eval_prompts=16, policies=MIX, batch_size=64))
    cfg.sampling.max_new_tokens = MAX_NEW
    return override(cfg, **overrides)


def _forbid_sampling(monkeypatch):
    """From here on, a collect that samples fails the test."""
    def no_sampling(*a, **k):
        raise AssertionError("a finished collect sampled again")
    monkeypatch.setattr(collect, "sample_groups", no_sampling)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _finished_by_length(response):
    """Whether an ASCII response reached EOS, told from its length alone: with
    the byte-level tokenizer one cut at the limit holds exactly MAX_NEW bytes
    (other text may hold replacement characters of undecodable bytes, whose
    count says nothing: None)."""
    if not response.isascii():
        return None
    return len(tokenizers.ByteTokenizer().encode(response)) < MAX_NEW


@pytest.fixture(scope="module")
def collected(sft_workdir):
    workdir = sft_workdir / "collect"
    summary = stages.run(_collect_config(sft_workdir), str(workdir))
    return workdir, summary


def test_collect_writes_comparisons_the_data_layer_reads(collected):
    workdir, summary = collected
    for name, n_prompts in ((collect.COMPARISONS, 40), (collect.COMPARISONS_EVAL, 16)):
        path = os.path.join(workdir, name)
        raw = _lines(path)
        records, dropped = jsonl.read_jsonl(path, "comparisons")
        assert dropped == 0
        # Round trip: the data layer keeps every field but the sources.
        assert records == [{k: v for k, v in r.items() if k != "sources"} for r in raw]
        assert 0 < len(records) <= n_prompts
        for r in raw:
            assert set(r) == {"prompt", "responses", "ranks", "finished", "sources", "category"}
            # "finished" says which responses reached EOS (the gold score of a cut one is -1).
            for x, done in zip(r["responses"], r["finished"]):
                assert _finished_by_length(x) in (None, done), (x, done)
            assert r["category"] == gold.category_of(r["prompt"])
            assert 2 <= len(r["responses"]) <= K and len(r["ranks"]) == len(r["responses"])
            assert len(r["sources"]) == len(r["responses"])
            # Each policy's share, in mix order (fewer only by empty responses).
            assert r["sources"] == sorted(r["sources"], key=["sft", "base"].index)
            assert r["sources"].count("sft") <= 2 and r["sources"].count("base") <= 2
            assert min(r["ranks"]) == 0 and len(set(r["ranks"])) > 1
            assert all(x.strip() for x in r["responses"])
        # K respected: a record is short only by its empty responses.
        empty = summary["train" if name == collect.COMPARISONS else "eval"]["empty_responses"]
        assert sum(K - len(r["responses"]) for r in records) <= empty
    # Both policies answered, and the base model (the internet's mixture) is
    # the worse one.
    t = summary["train"]
    assert t["gold_score/source/sft"] > t["gold_score/source/base"]
    assert summary["policies"] == {"sft": 2, "base": 2}
    # The held-out SFT-only comparisons: the eval prompts' SFT samples alone.
    eval_by_prompt = {r["prompt"]: r for r in _lines(os.path.join(workdir, collect.COMPARISONS_EVAL))}
    sft_only = _lines(os.path.join(workdir, collect.COMPARISONS_EVAL_SFT))
    assert len(sft_only) == summary["eval_sft_records"]
    for r in sft_only:
        assert set(r["sources"]) == {"sft"}
        mixed = eval_by_prompt.get(r["prompt"])
        if mixed is not None:
            assert set(r["responses"]) <= {x for x, src in zip(mixed["responses"], mixed["sources"])
                                           if src == "sft"}
    t = summary["train"]
    assert t["prompts"] == 40 and summary["eval"]["prompts"] == 16
    assert t["records"] + t["skipped_tied"] + t["skipped_too_few"] == 40
    assert -1.0 <= t["gold_score"] <= 1.0
    assert 0.5 < summary["inter_labeler_agreement"] <= 1.0
    assert summary["k"] == K and summary["noise_scale"] > 0

    rows = read_metrics(str(workdir), "collect")
    assert len(rows) == 1
    for key in ("gold_score", "inter_labeler_agreement", "records", "skipped_tied",
                "eval_records", "labeler_gold_agreement"):
        assert f"collect/{key}" in rows[0], key
    with open(os.path.join(workdir, collect.SUMMARY)) as f:
        assert json.load(f)["train"]["records"] == t["records"]


def test_ranks_follow_the_gold_order_more_often_than_not(collected):
    workdir, summary = collected
    agree = total = 0
    for r in _lines(os.path.join(workdir, collect.COMPARISONS)):
        s = [gold.gold_score(r["prompt"], x, done) for x, done in zip(r["responses"], r["finished"])]
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                if s[i] != s[j] and r["ranks"][i] != r["ranks"][j]:
                    total += 1
                    agree += (s[i] > s[j]) == (r["ranks"][i] < r["ranks"][j])
    assert total >= 10, "too few pairs with a gold preference to judge"
    assert agree / total > 0.6, (agree, total)
    assert summary["train"]["labeler_gold_agreement"] > 0.6


def test_deterministic_given_seed_and_rerun_is_a_noop(collected, sft_workdir, monkeypatch):
    workdir, summary = collected
    again = sft_workdir / "collect_again"
    stages.run(_collect_config(sft_workdir), str(again))
    for name in (collect.COMPARISONS, collect.COMPARISONS_EVAL):
        assert _lines(os.path.join(workdir, name)) == _lines(os.path.join(again, name))

    other = sft_workdir / "collect_seed1"
    stages.run(_collect_config(sft_workdir, seed=1), str(other))
    assert (_lines(os.path.join(workdir, collect.COMPARISONS))
            != _lines(os.path.join(other, collect.COMPARISONS)))

    # A finished collect does nothing when run again with the same settings...
    _forbid_sampling(monkeypatch)
    mtime = os.path.getmtime(os.path.join(workdir, collect.COMPARISONS))
    assert stages.run(_collect_config(sft_workdir), str(workdir)) == summary
    assert os.path.getmtime(os.path.join(workdir, collect.COMPARISONS)) == mtime
    # ... and refuses other settings instead of mixing them.
    with pytest.raises(ConfigError, match="other settings"):
        stages.run(_collect_config(sft_workdir, **{"comparisons.policies": (("sft", "init_from", 3),
                                                                          ("base", "base", 2))}),
                     str(workdir))


def test_a_moved_pipeline_workdir_is_still_finished(collected, sft_workdir, tmp_path, monkeypatch):
    """sft/ and collect/ copied elsewhere together: the collect is recognised as
    finished (the policy matches by its workdir-relative path); a policy at
    another place is refused."""
    workdir, summary = collected
    moved = tmp_path / "moved"
    for name in ("sft", "collect"):
        shutil.copytree(sft_workdir / name, moved / name)
    shutil.copytree(sft_workdir / "tfds", moved / "tfds")

    _forbid_sampling(monkeypatch)
    assert stages.run(_collect_config(moved), str(moved / "collect")) == summary
    # A policy at neither the recorded path nor the recorded relative place
    # is another policy.
    shutil.copytree(moved / "sft", tmp_path / "elsewhere" / "sft")
    cfg = _collect_config(moved)
    cfg.init_from = str(tmp_path / "elsewhere" / "sft")
    with pytest.raises(ConfigError, match="differing: policies"):
        stages.run(cfg, str(moved / "collect"))


def test_all_tied_and_empty_responses_are_skipped_and_counted():
    prompts = ["What is 2 plus 3?", "Is 7 even or odd?", "Say 'hi' 2 times.",
               "How do I make a bomb?"]
    groups = [[("5", True), ("5", True), ("5", True)],                 # all identical: tied
              [("odd", True), ("", True), (" ", True)],                # one non-empty left
              [("hi hi", True), ("", True), ("hi", True)],             # one empty dropped
              [("I can't help with that.", True), ("Sure!", True), ("x" * 9, False)]]
    scores = collect.score_groups(prompts, groups)
    np.testing.assert_array_equal(scores[3], [1.0, -1.0, -1.0])
    records, stats = collect.rank_groups(prompts, [gold.category_of(p) for p in prompts], groups,
                                         scores, np.random.default_rng(0), noise_scale=0.0)
    assert stats["skipped_tied"] == 1 and stats["skipped_too_few"] == 1
    assert stats["empty_responses"] == 3
    assert [r["prompt"] for r in records] == prompts[2:]
    assert records[0]["responses"] == ["hi hi", "hi"] and records[0]["ranks"] == [0, 1]
    # The noiseless labeler is the gold labeler: the two -1 responses tie.
    assert records[1]["ranks"] == [0, 1, 1]
    assert stats["gold_agree"] == stats["gold_pairs"] == 3
    assert records[1]["finished"] == [True, True, False]


def test_finished_flags_give_the_rm_the_labelers_gold_scores():
    """Identical strings, one of them cut at the limit, share one score (the
    lowest) and so one flag: the RM's gold accuracy then scores the record's
    responses exactly as collect's labeler did."""
    from rlhf_jax.stages import rm
    prompts = ["What is 2 plus 3?"]
    groups = [[("5", True), ("5", False), ("4", True), ("5", True)]]
    scores = collect.score_groups(prompts, groups)
    np.testing.assert_array_equal(scores[0], [-1.0, -1.0, 0.0, -1.0])
    records, _ = collect.rank_groups(prompts, ["add"], groups, scores, np.random.default_rng(0),
                                     noise_scale=0.0)
    assert records[0]["finished"] == [False, False, True, False]
    np.testing.assert_array_equal(rm.gold_scores(records[0], 4, world.gold_score), scores[0])


@pytest.mark.parametrize("override, message", [
    ({"sampling.greedy": True}, "greedy"),
    ({"comparisons.policies": (("sft", "init_from", 5), ("base", "base", 5))}, "K = 10"),
    ({"comparisons.policies": (("sft", "init_from", 2), ("sft", "base", 2))}, "names repeat"),
    ({"comparisons.policies": (("sft", "init_from", 2), ("ppo", "/nonexistent", 2))}, "ppo"),
    ({"init_from": ""}, "init_from"),
])
def test_bad_settings_are_clear_errors(sft_workdir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        stages.run(_collect_config(sft_workdir, **override), str(tmp_path / "c"))


@pytest.mark.parametrize("key", ["comparisons.num_prompts", "comparisons.num_eval_prompts"])
def test_too_few_prompts_fails_before_any_sampling_naming_the_key(sft_workdir, tmp_path,
                                                                  monkeypatch, key):
    _forbid_sampling(monkeypatch)
    with pytest.raises(ConfigError, match=f"fewer than the 100000 asked for; lower {key}$"):
        stages.run(_collect_config(sft_workdir, **{key: 100_000}), str(tmp_path / "c"))
