"""Data layer: JSONL validation, TFDS builds, sources, batching, tokenization."""
import collections
import functools
import json
import os
import re
import sys
import threading
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax.data import builders, pipeline, preprocess, sources
from rlhf_jax.data.jsonl import DataError, read_jsonl
from rlhf_jax.data.pipeline import BatchLoader, batches_once
from rlhf_jax.data.sources import open_source, train_eval_split
from rlhf_jax.tokenizer import ByteTokenizer, encode_prompt

TOK = ByteTokenizer()


def write_lines(path, lines):
    """Writes str lines (JSON-encoded if not already str) or raw bytes lines."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            else:
                f.write((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n")
    return str(path)


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "tfds")


# --------------------------------------------------------------------------- JSONL

DEMO = {"prompt": "Say hi", "response": "hi"}
PAIR = {"prompt": "Pick", "chosen": "good", "rejected": "bad"}
KWISE = {"prompt": "Rank", "responses": ["a", "b", "c"], "ranks": [2, 0, 1]}

# (kind, bad line, field named in the message or None, text in the message)
MALFORMED = [
    ("demonstrations", '{"prompt": "x", "response": ', None, "invalid JSON"),
    ("demonstrations", b'{"prompt": "caf\xe9", "response": "x"}', None, "not valid UTF-8"),
    ("demonstrations", "[1, 2]", None, "expected a JSON object"),
    ("demonstrations", '"just a string"', None, "expected a JSON object"),
    ("demonstrations", {"prompt": "x"}, "response", "missing"),
    ("demonstrations", {"response": "x"}, "prompt", "missing"),
    ("demonstrations", {"prompt": "x", "response": 3}, "response", "must be a string"),
    ("demonstrations", {"prompt": "x", "response": "  \n"}, "response", "must be a non-empty string"),
    ("demonstrations", {"prompt": "", "response": "y"}, "prompt", "must be a non-empty string"),
    ("demonstrations", {"prompt": "x", "response": "y", "category": 1}, "category", "must be a string"),
    ("comparisons", {"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ("comparisons", {"prompt": "p", "chosen": "a", "rejected": ""}, "rejected", "non-empty"),
    ("comparisons", {"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ("comparisons", {"prompt": "p", "responses": ["a"], "ranks": [0]}, "responses", "2 to 9"),
    ("comparisons", {"prompt": "p", "responses": [str(i) for i in range(10)],
                     "ranks": list(range(10))}, "responses", "2 to 9"),
    ("comparisons", {"prompt": "p", "responses": "ab", "ranks": [0, 1]}, "responses", "list"),
    ("comparisons", {"prompt": "p", "responses": ["a", 2], "ranks": [0, 1]}, "responses", "strings"),
    ("comparisons", {"prompt": "p", "responses": ["a", " "], "ranks": [0, 1]}, "responses", "non-empty"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b"]}, "ranks", "missing"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1]}, "ranks",
     "one entry per response"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]}, "ranks", "non-negative"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.5]}, "ranks", "non-negative"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [False, True]}, "ranks",
     "non-negative"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 1]}, "ranks", "tied"),
    ("comparisons", {"prompt": "p", "responses": ["a", "a"], "ranks": [0, 1]}, "responses",
     "identical responses ranked differently"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "chosen": "a",
                     "rejected": "b"}, "chosen", "not both"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1],
                     "finished": [True]}, "finished", "one per response"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1],
                     "finished": [1, 0]}, "finished", "booleans"),
    ("prompts", {"prompt": 5}, "prompt", "must be a string"),
    ("text", {"txt": "hello"}, "text", "missing"),
]

GOOD = {"demonstrations": DEMO, "comparisons": KWISE, "prompts": {"prompt": "p"}, "text": {"text": "t"}}


@pytest.mark.parametrize("kind,bad,field,text", MALFORMED)
def test_malformed_line_names_file_line_and_field(tmp_path, kind, bad, field, text):
    # Two good lines and a blank one before: the bad one is physical line 4.
    path = write_lines(tmp_path / "data.jsonl", [GOOD[kind], "", GOOD[kind], bad, GOOD[kind]])
    with pytest.raises(DataError) as info:
        read_jsonl(path, kind)
    message = str(info.value)
    assert message.startswith(f"{path}:4: "), message
    assert text in message
    if field is not None:
        assert f"field {field!r}" in message
    assert info.value.line == 4 and info.value.field == field


@pytest.mark.parametrize("kind,bad,field,text", MALFORMED[:8])
def test_drop_invalid_counts_drops(tmp_path, kind, bad, field, text):
    path = write_lines(tmp_path / "data.jsonl", [GOOD[kind], bad, GOOD[kind], bad])
    reasons = collections.Counter()
    records, n_dropped = read_jsonl(path, kind, drop_invalid=True, reasons=reasons)
    assert len(records) == 2 and n_dropped == 2
    assert sum(reasons.values()) == 2 and len(reasons) == 1
    assert text in next(iter(reasons))


def test_normalisation_pairwise_category_and_extra_fields(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [
        dict(PAIR, category="math", id=7), KWISE,
        {"prompt": "q", "responses": ["x", "y"], "ranks": [1, 3]}])
    records, n_dropped = read_jsonl(path, "comparisons")
    assert n_dropped == 0
    assert records[0] == {"prompt": "Pick", "responses": ["good", "bad"], "ranks": [0, 1],
                          "category": "math"}
    assert records[1] == {"prompt": "Rank", "responses": ["a", "b", "c"], "ranks": [2, 0, 1],
                          "category": ""}
    assert records[2]["ranks"] == [1, 3]  # ranks need not be contiguous


def test_finished_flags_are_kept_and_reach_the_gold_accuracy(tmp_path):
    """A response cut at the length limit ("finished": false) keeps its flag
    through the data layer, and the RM's gold accuracy scores it as collect's
    labeler did (-1), not as the finished text it reads like."""
    from rlhf_jax import world
    from rlhf_jax.stages import rm
    record = {"prompt": "What is 2 plus 3?", "responses": ["5", "4"], "ranks": [1, 0],
              "finished": [False, True]}
    path = write_lines(tmp_path / "c.jsonl", [record, KWISE])
    records, _ = read_jsonl(path, "comparisons")
    assert records[0]["finished"] == [False, True] and "finished" not in records[1]
    source = open_source(str(path), "comparisons", data_dir=str(tmp_path / "tfds"))
    stored = [source[0], source[1]]
    assert stored == records    # a record without flags reads back without them
    np.testing.assert_array_equal(rm.gold_scores(stored[0], 3, world.gold_score), [-1.0, 0.0, np.nan])
    record["finished"] = [True, True]
    np.testing.assert_array_equal(rm.gold_scores(record, 3, world.gold_score), [1.0, 0.0, np.nan])


def test_strings_are_kept_verbatim_and_bom_is_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    line = json.dumps({"prompt": " caf\u00e9 \u2603", "response": "ok\n"}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\r\n")
    records, _ = read_jsonl(path, "demonstrations")
    assert records == [{"prompt": " caf\u00e9 \u2603", "response": "ok\n", "category": ""}]


@pytest.mark.parametrize("kind", ["comparisons", "demonstrations"])
def test_empty_file_is_an_error(tmp_path, kind):
    path = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match=f"^{re.escape(path)}: no {kind} records"):
        read_jsonl(path, kind)


def test_all_lines_dropped_is_an_error(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match="1 invalid line"):
        read_jsonl(path, "comparisons", drop_invalid=True)


def test_check_message_becomes_located_error(tmp_path):
    long_demo = {"prompt": "x" * 100, "response": "y"}
    path = write_lines(tmp_path / "d.jsonl", [DEMO, DEMO, long_demo])
    check = preprocess.length_check(TOK, "demonstrations", max_len=64)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: prompt \+ response \+ EOS is 120 tokens"):
        read_jsonl(path, "demonstrations", check=check)
    records, n_dropped = read_jsonl(path, "demonstrations", check=check, drop_invalid=True)
    assert len(records) == 2 and n_dropped == 1


def test_unknown_kind_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown record kind"):
        read_jsonl(write_lines(tmp_path / "d.jsonl", [DEMO]), "demos")
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "nope.jsonl"), "demonstrations")


# --------------------------------------------------------------------------- builds and sources

MIXED = [
    {"prompt": "Caf\u00e9?", "response": "\u2603 snow", "category": "unicode"},
    {"prompt": "2+2", "response": "4", "category": "math"},
    {"prompt": "Hi", "response": "Hello there."},
]


def test_jsonl_round_trip_through_array_record(tmp_path, data_dir):
    path = write_lines(tmp_path / "d.jsonl", MIXED)
    expected, _ = read_jsonl(path, "demonstrations")
    source = open_source(path, "demonstrations", data_dir=data_dir)
    assert len(source) == 3
    got = [source[i] for i in range(len(source))]
    assert got == expected  # file order, str values, category filled in
    assert all(type(v) is str for r in got for v in r.values())
    assert source[-1] == expected[-1] and source.records([2, 0]) == [expected[2], expected[0]]
    with pytest.raises(IndexError):
        source[3]

    comps = write_lines(tmp_path / "c.jsonl", [PAIR, KWISE])
    expected, _ = read_jsonl(comps, "comparisons")
    source = open_source(comps, "comparisons", data_dir=data_dir)
    assert [source[0], source[1]] == expected
    assert all(type(r) is int for r in source[1]["ranks"])


def _builds(data_dir, kind):
    root = os.path.join(data_dir, "jsonl_records")
    return sorted(d for d in os.listdir(root) if d.startswith(kind) and not d.endswith(".lock"))


def test_unchanged_file_is_reused_edited_file_rebuilt(tmp_path, data_dir):
    path = write_lines(tmp_path / "d.jsonl", MIXED)
    open_source(path, "demonstrations", data_dir=data_dir)
    build = _builds(data_dir, "demonstrations")
    assert len(build) == 1
    files = os.path.join(data_dir, "jsonl_records", build[0], "1.0.0")
    stamp = {f: os.stat(os.path.join(files, f)).st_mtime_ns for f in os.listdir(files)}

    again = open_source(path, "demonstrations", data_dir=data_dir)
    assert again[1] == read_jsonl(path, "demonstrations")[0][1]
    assert _builds(data_dir, "demonstrations") == build
    assert {f: os.stat(os.path.join(files, f)).st_mtime_ns for f in os.listdir(files)} == stamp

    write_lines(path, MIXED[:2] + [{"prompt": "Hi", "response": "Edited."}])
    source = open_source(path, "demonstrations", data_dir=data_dir)
    assert len(_builds(data_dir, "demonstrations")) == 2
    assert source[2]["response"] == "Edited."

    # A different drop decision on the same file is a different build.
    # Lengths (bytes + 18 format bytes + EOS): 33, 23, 28.
    check = preprocess.length_check(TOK, "demonstrations", max_len=30)
    dropped = open_source(path, "demonstrations", data_dir=data_dir, check=check, drop_invalid=True)
    assert len(dropped) == 2 and dropped.n_dropped == 1 and sum(dropped.drop_reasons.values()) == 1
    assert len(_builds(data_dir, "demonstrations")) == 3


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(builders.DATA_DIR_ENV, str(tmp_path / "env_dir"))
    assert builders.default_data_dir() == str(tmp_path / "env_dir")
    open_source(write_lines(tmp_path / "d.jsonl", MIXED), "demonstrations")
    assert len(_builds(str(tmp_path / "env_dir"), "demonstrations")) == 1


def test_concurrent_builds_of_one_file(tmp_path, data_dir):
    path = write_lines(tmp_path / "d.jsonl", MIXED * 20)
    results, errors = [None] * 4, []

    def build(i):
        try:
            results[i] = open_source(path, "demonstrations", data_dir=data_dir)[59]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [MIXED[2] | {"category": ""}] * 4
    assert len(_builds(data_dir, "demonstrations")) == 1


def test_generic_tfds_spec_and_validation(tmp_path, data_dir):
    path = write_lines(tmp_path / "d.jsonl", MIXED)
    builder, _, _ = builders.build_jsonl(path, "demonstrations", data_dir)
    spec = f"tfds:jsonl_records/{builder.builder_config.name}"
    source = open_source(spec, "demonstrations", data_dir=data_dir)
    assert [source[i] for i in range(3)] == read_jsonl(path, "demonstrations")[0]
    assert len(open_source(spec, "demonstrations", split="train[:2]", data_dir=data_dir)) == 2

    # Lengths (bytes + 18 format bytes + EOS): 33, 23, 33.
    check = preprocess.length_check(TOK, "demonstrations", max_len=30)
    with pytest.raises(DataError, match=r"\[train\] record 0: prompt \+ response"):
        open_source(spec, "demonstrations", data_dir=data_dir, check=check)
    kept = open_source(spec, "demonstrations", data_dir=data_dir, check=check, drop_invalid=True)
    assert [kept[0]] == [MIXED[1]] and len(kept) == 1 and kept.n_dropped == 2
    with pytest.raises(DataError, match="not comparisons records"):
        open_source(spec, "comparisons", data_dir=data_dir)


def test_world_spec_calls_world_prepare(tmp_path, data_dir, monkeypatch):
    calls = []
    path = write_lines(tmp_path / "w.jsonl", MIXED)

    def prepare(config_name, data_dir):
        calls.append((config_name, data_dir))
        return builders.build_jsonl(path, "demonstrations", data_dir)[0]

    fake = types.ModuleType("rlhf_jax.data.world_tfds")
    fake.prepare = prepare
    monkeypatch.setitem(sys.modules, "rlhf_jax.data.world_tfds", fake)
    import rlhf_jax.data
    monkeypatch.setattr(rlhf_jax.data, "world_tfds", fake, raising=False)
    source = open_source("tfds:instruction_world/demonstrations_tiny", "demonstrations",
                         data_dir=data_dir)
    assert calls == [("demonstrations_tiny", data_dir)]
    assert source[0] == MIXED[0] and source.name == "tfds:instruction_world/demonstrations_tiny[train]"
    with pytest.raises(ValueError, match="CONFIG"):
        open_source("tfds:instruction_world", "demonstrations", data_dir=data_dir)


def test_real_world_tiny_dataset(tmp_path):
    pytest.importorskip("rlhf_jax.data.world_tfds")
    source = open_source("tfds:instruction_world/demonstrations_tiny", "demonstrations",
                         data_dir=str(tmp_path))
    assert len(source) > 0
    record = source[0]
    assert isinstance(record["prompt"], str) and isinstance(record["response"], str)
    assert isinstance(record["category"], str)


def test_train_eval_split(tmp_path, data_dir):
    rows = [{"prompt": f"p{i % 25}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(100)]
    source = open_source(write_lines(tmp_path / "c.jsonl", rows), "comparisons", data_dir=data_dir)
    train, evals = train_eval_split(source, 0.2, seed=3)
    train_p = {r["prompt"] for r in train}
    eval_p = {r["prompt"] for r in evals}
    assert not train_p & eval_p  # whole prompts are held out
    assert len(train) + len(evals) == 100 and 20 <= len(evals) <= 24
    got = sorted([r["responses"][0] for r in train] + [r["responses"][0] for r in evals])
    assert got == sorted(f"a{i}" for i in range(100))
    again_train, again_eval = train_eval_split(source, 0.2, seed=3)
    assert list(again_eval) == list(evals) and list(again_train) == list(train)
    assert {r["prompt"] for r in train_eval_split(source, 0.2, seed=4)[1]} != eval_p
    # Nested views index the right records.
    assert train.subset([0])[0] == train[0]
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(source, 1.0)
    single = open_source(write_lines(tmp_path / "one.jsonl", [DEMO, DEMO]), "demonstrations",
                         data_dir=data_dir)
    with pytest.raises(ValueError, match="distinct prompt"):
        train_eval_split(single, 0.5)


# --------------------------------------------------------------------------- batching

def index_source(n):
    return [{"i": i} for i in range(n)]


def index_transform(record):
    return {"i": np.asarray(record["i"], np.int32), "pair": np.full((2,), record["i"], np.int32)}


@pytest.mark.parametrize("n,batch_size", [(12, 4), (10, 3)])
def test_each_epoch_is_a_fresh_permutation(n, batch_size):
    loader = BatchLoader(index_source(n), batch_size, index_transform, seed=7)
    steps = 4 * n // batch_size + 1
    stream = np.concatenate([loader.batch(s)["i"] for s in range(steps)])
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))
    assert loader.batch(1)["pair"].shape == (batch_size, 2)
    assert loader.steps_per_epoch == n // batch_size
    assert loader.record_indices(2) == loader.batch(2)["i"].tolist()


def test_batches_are_a_function_of_seed_and_step():
    a = BatchLoader(index_source(50), 8, index_transform, seed=1)
    b = BatchLoader(index_source(50), 8, index_transform, seed=1, prefetch=0)
    c = BatchLoader(index_source(50), 8, index_transform, seed=2)
    for step in [0, 5, 6, 123]:
        np.testing.assert_array_equal(a.batch(step)["i"], b.batch(step)["i"])
    assert any(not np.array_equal(a.batch(s)["i"], c.batch(s)["i"]) for s in range(3))
    unshuffled = BatchLoader(index_source(10), 4, index_transform, seed=0, shuffle=False)
    assert [unshuffled.batch(s)["i"].tolist() for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                     [8, 9, 0, 1]]


def test_resuming_gives_identical_batches():
    loader = BatchLoader(index_source(37), 5, index_transform, seed=11, prefetch=3)
    run = loader.iterate(0)
    first = [next(run)["i"] for _ in range(20)]
    run.close()
    resumed = BatchLoader(index_source(37), 5, index_transform, seed=11, prefetch=3)
    later = list(resumed.iterate(12, num_steps=8))
    for x, y in zip(first[12:], later):
        np.testing.assert_array_equal(x, y["i"])
    assert len(later) == 8
    np.testing.assert_array_equal(next(iter(resumed))["i"], first[0])


def test_process_slices_concatenate_to_the_global_batch():
    single = BatchLoader(index_source(30), 8, index_transform, seed=5)
    parts = [BatchLoader(index_source(30), 8, index_transform, seed=5, process_index=p,
                         process_count=4) for p in range(4)]
    for step in [0, 3, 4, 50]:
        local = [p.batch(step) for p in parts]
        assert all(x["i"].shape == (2,) for x in local)
        np.testing.assert_array_equal(np.concatenate([x["i"] for x in local]),
                                      single.batch(step)["i"])
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        BatchLoader(index_source(30), 8, index_transform, seed=5, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="empty"):
        BatchLoader([], 8, index_transform, seed=5)


def test_batch_loader_over_a_source(tmp_path, data_dir):
    source = open_source(write_lines(tmp_path / "d.jsonl", MIXED), "demonstrations", data_dir=data_dir)
    transform = functools.partial(preprocess.sft_example, TOK, max_len=48)
    loader = BatchLoader(source, 3, transform, seed=0)
    for step in range(3):
        batch = loader.batch(step)
        assert batch["tokens"].shape == (3, 48) and batch["tokens"].dtype == np.int32
        expected = [transform(MIXED[i])["tokens"] for i in loader.record_indices(step)]
        np.testing.assert_array_equal(batch["tokens"], np.stack(expected))


def test_stack_rejects_ragged_transforms():
    loader = BatchLoader(index_source(4), 2, lambda r: {"x": np.zeros(r["i"] + 1)}, seed=0,
                         shuffle=False)
    with pytest.raises(ValueError, match="fixed shapes"):
        loader.batch(0)


@pytest.mark.parametrize("n", [10, 12])
def test_batches_once_pads_last_batch(n):
    out = list(batches_once(index_source(n), 4, index_transform))
    assert len(out) == pipeline.num_batches(n, 4) == 3
    valid = np.concatenate([v for _, v in out])
    seen = np.concatenate([b["i"] for b, _ in out])
    assert valid.sum() == n and valid[:n].all()
    assert seen[valid].tolist() == list(range(n))
    assert all(b["i"].shape == (4,) for b, _ in out)
    # Two processes: same number of batches, slices concatenate.
    halves = [list(batches_once(index_source(n), 4, index_transform, p, 2)) for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == 3
    for b, (p0, p1) in enumerate(zip(*halves)):
        np.testing.assert_array_equal(np.concatenate([p0[0]["i"], p1[0]["i"]]), out[b][0]["i"])
        np.testing.assert_array_equal(np.concatenate([p0[1], p1[1]]), out[b][1])


# --------------------------------------------------------------------------- tokenization

def test_sft_loss_mask_selects_exactly_response_and_eos():
    record = {"prompt": "What is 2+2?", "response": "Four."}
    ex = preprocess.sft_example(TOK, record, max_len=64)
    tokens, loss_mask, attn = ex["tokens"], ex["loss_mask"], ex["attn_mask"]
    assert tokens.shape == loss_mask.shape == attn.shape == (64,)
    assert tokens.dtype == np.int32 and loss_mask.dtype == np.float32
    targets = tokens[1:][loss_mask[:-1] == 1]
    assert targets[-1] == TOK.eos_id
    assert TOK.decode(targets[:-1]) == "Four."
    n = preprocess.sft_length(TOK, record)
    assert attn.sum() == n and (tokens[n:] == TOK.pad_id).all() and loss_mask[-1] == 0
    assert TOK.decode(tokens[:n]) == "User: What is 2+2?\nAssistant: Four."
    # The first scored position is the last prompt token.
    assert loss_mask[len(encode_prompt(TOK, record["prompt"])) - 1] == 1


@settings(max_examples=40, deadline=None)
@given(prompt=st.text(min_size=1, max_size=20), response=st.text(min_size=1, max_size=20),
       slack=st.integers(0, 5))
def test_sft_alignment_property(prompt, response, slack):
    record = {"prompt": prompt, "response": response}
    n = preprocess.sft_length(TOK, record)
    ex = preprocess.sft_example(TOK, record, max_len=n + slack)
    selected = ex["tokens"][1:][ex["loss_mask"][:-1] == 1].tolist()
    assert selected == TOK.encode(response) + [TOK.eos_id]
    assert ex["attn_mask"].sum() == n


def test_sft_too_long_raises():
    record = {"prompt": "p", "response": "r" * 40}
    n = preprocess.sft_length(TOK, record)
    preprocess.sft_example(TOK, record, max_len=n)  # fits exactly
    with pytest.raises(ValueError, match="max_len"):
        preprocess.sft_example(TOK, record, max_len=n - 1)


def test_text_example_scores_every_real_next_token_and_truncates():
    ex = preprocess.text_example(TOK, {"text": "abc"}, max_len=8)
    assert ex["tokens"].tolist() == [97, 98, 99, TOK.eos_id] + [TOK.pad_id] * 4
    assert ex["loss_mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ex["attn_mask"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    long = preprocess.text_example(TOK, {"text": "abcdefghij"}, max_len=4)
    assert long["tokens"].tolist() == [97, 98, 99, 100]
    assert long["loss_mask"].tolist() == [1, 1, 1, 0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(8, 32))
def test_pack_texts_uses_each_text_once_and_fits_rows(lengths, max_len):
    rows = preprocess.pack_texts(lengths, max_len)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert len(row) == 1 or sum(lengths[i] for i in row) <= max_len
    # A row closes only when no text left (those of later rows) fits its space.
    for r, row in enumerate(rows):
        space = max_len - sum(min(lengths[i], max_len) for i in row)
        assert all(lengths[i] > space for later in rows[r + 1:] for i in later)
    assert preprocess.pack_texts([9, 9, 9, 1], 10) == [[0, 3], [1], [2]]


def test_packed_text_example_lays_texts_as_segments():
    ex = preprocess.packed_text_example(TOK, {"texts": ["ab", "c\x1ed", "efgh"]}, max_len=10)
    eos, pad = TOK.eos_id, TOK.pad_id
    assert ex["tokens"].tolist() == [97, 98, eos, 99, eos, 100, eos, 101, 102, 103]
    assert ex["attn_mask"].tolist() == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    # Within a text every next token is a target, none across texts.
    assert ex["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 1, 0]
    one = preprocess.packed_text_example(TOK, {"texts": ["abc"]}, max_len=8)
    alone = preprocess.text_example(TOK, {"text": "abc"}, max_len=8)
    for key in ("tokens", "loss_mask", "attn_mask"):
        assert one[key].tolist() == alone[key].tolist()
    assert pad not in ex["tokens"].tolist()


def test_packed_texts_source_keeps_every_text(tmp_path):
    texts = [f"{'x' * (i % 7 + 1)}{i}" for i in range(30)]
    path = tmp_path / "t.jsonl"
    write_lines(path, [{"text": t} for t in texts])
    packed = sources.PackedTexts(open_source(str(path), "text"), TOK, max_len=16)
    got = [t for r in packed.records(range(len(packed))) for t in r["texts"]]
    assert sorted(got) == sorted(texts)
    assert len(packed) < len(texts) and 0.5 < packed.fill <= 1.0


def test_prompt_example_is_left_padded():
    record = {"prompt": "Hi"}
    ids = encode_prompt(TOK, "Hi")
    ex = preprocess.prompt_example(TOK, record, max_prompt_len=len(ids) + 3)
    assert ex["tokens"].tolist() == [TOK.pad_id] * 3 + ids
    assert ex["mask"].tolist() == [0] * 3 + [1] * len(ids)
    assert ex["tokens"].dtype == np.int32
    with pytest.raises(ValueError, match="max_prompt_len"):
        preprocess.prompt_example(TOK, record, max_prompt_len=len(ids) - 1)


def test_comparison_example_ragged_k():
    record = {"prompt": "Rank", "responses": ["aa", "b", "cccc"], "ranks": [1, 0, 1], "category": ""}
    ex = preprocess.comparison_example(TOK, record, k_max=5, max_len=40)
    assert ex["tokens"].shape == ex["attn_mask"].shape == (5, 40)
    assert ex["valid"].tolist() == [True, True, True, False, False]
    assert ex["ranks"].tolist()[:3] == [1, 0, 1] and (ex["ranks"][3:] == preprocess.INVALID_RANK).all()
    p = len(encode_prompt(TOK, "Rank"))
    assert ex["last_index"].tolist() == [p + 2, p + 1, p + 4, 0, 0]
    for k, response in enumerate(record["responses"]):
        last = ex["last_index"][k]
        assert ex["tokens"][k, last] == TOK.eos_id and ex["attn_mask"][k].sum() == last + 1
        assert TOK.decode(ex["tokens"][k, p:last]) == response
    assert (ex["tokens"][3:] == TOK.pad_id).all() and ex["attn_mask"][3:].sum() == 0
    with pytest.raises(ValueError, match="k_max"):
        preprocess.comparison_example(TOK, record, k_max=2, max_len=40)
    with pytest.raises(ValueError, match="max_len"):
        preprocess.comparison_example(TOK, record, k_max=3, max_len=p + 4)
    batch = pipeline.stack([ex, preprocess.comparison_example(TOK, KWISE | {"category": ""}, 5, 40)])
    assert batch["tokens"].shape == (2, 5, 40) and batch["valid"].sum() == 6


def test_length_check_limits(tmp_path):
    check = preprocess.length_check(TOK, "comparisons", max_len=30, max_prompt_len=20, k_max=2)
    assert check({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}) is None
    assert "k_max=2" in check({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 2]})
    assert "max_len=30" in check({"prompt": "p", "responses": ["a", "b" * 30], "ranks": [0, 1]})
    assert "max_prompt_len=20" in check({"prompt": "p" * 20, "responses": ["a", "b"], "ranks": [0, 1]})
    assert preprocess.length_check(TOK, "text", max_len=2)({"text": "long text"}) is None


def test_no_tensorflow_needed(tmp_path, data_dir):
    source = open_source(write_lines(tmp_path / "d.jsonl", MIXED), "demonstrations", data_dir=data_dir)
    list(BatchLoader(source, 2, functools.partial(preprocess.sft_example, TOK, max_len=48),
                     seed=0).iterate(0, 2))
    assert "tensorflow" not in sys.modules
