"""The reward-model stage: the batched K-wise loss equals a NumPy loop over
pairs, one forward pass of B*K rows, the world's gold ordering learned end to
end from an SFT checkpoint, bias normalisation on demonstrations, bad input
named by file and line (or dropped and counted), exact resume."""
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (assert_trees_equal, load_config, micro_model, run_interrupted,
                     world_comparisons, world_demos, write_jsonl)
from rlhf_jax import checkpoint, config_domains, console, sharding, stages
from rlhf_jax.data import pipeline, preprocess
from rlhf_jax.data.jsonl import DataError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.tokenizer import ByteTokenizer, encode_prompt, encode_response
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import resolve
from rlhf_jax.stages import rm
from rlhf_jax.stages.instructgpt import override

MICRO = ModelConfig(vocab_size=264, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                    max_len=128, head="scalar")
MAX_LEN = 96          # micro_model's data.max_len
N_TRAIN, N_EVAL, BATCH = 1024, 64, 16
BAD_LINES = [  # appended to the end-to-end training data, which drops them (drop_invalid)
    {"prompt": "What is 1 plus 2?", "chosen": "3", "rejected": "3"},
    {"prompt": "What is 1 plus 2?", "responses": ["3", ""], "ranks": [0, 1]},
    {"prompt": "What is 1 plus 2?", "responses": ["3", "4", "5", "6"], "ranks": [0, 1, 2, 3]},
]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Runs of the same config compile identical programs; compile them once
    (the resume test's two runs reuse the end-to-end run's executables)."""
    from jax.experimental.compilation_cache import compilation_cache
    previous = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs)
    compilation_cache.reset_cache()  # JAX sets its cache up once per process: redo it here
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    compilation_cache.reset_cache()


# ---------------------------------------------------------------------------
# Micro models and data
# ---------------------------------------------------------------------------

def random_params(cfg: ModelConfig, seed: int = 0):
    """Params of `cfg` drawn with NumPy (no init compile), scaled so the
    scores of different sequences differ clearly."""
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 8), jnp.int32)))["params"]
    shapes = sharding.strip_boxes(boxed)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype),
                                  shapes)


class CountingModel:
    """A model whose `apply` records the shape of every token batch a forward
    pass starts from (the full call, or the embedding a readout starts with)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def apply(self, variables, tokens, *args, **kw):
        if kw.get("method") in (None, Transformer.embed):
            self.calls.append(tuple(tokens.shape))
        return self.model.apply(variables, tokens, *args, **kw)


def _set(cfg, **kw):
    return override(cfg, **kw)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A micro SFT checkpoint: a few steps of the SFT stage on world demonstrations."""
    root = tmp_path_factory.mktemp("sft")
    cfg = micro_model(load_config("sft", "tiny"))
    _set(cfg, **{"data.path": world_demos(root / "demos.jsonl", n=128),
                 "data.data_dir": str(root / "tfds"), "train.steps": 4, "train.batch_size": 8,
                 "train.warmup_steps": 1, "train.eval_every": 4, "train.eval_batches": 1,
                 "train.checkpoint_every": 4, "train.log_every": 2})
    stages.run(cfg, str(root / "sft"))
    return {"workdir": str(root / "sft"), "demos": cfg.data.path, "data_dir": cfg.data.data_dir}


def _rm_config(sft, data_path, eval_path="", **kw):
    cfg = micro_model(load_config("rm", "tiny"))
    _set(cfg, **{"init_from": sft["workdir"], "data.path": data_path, "data.eval_path": eval_path,
                 "data.demos_path": sft["demos"], "data.demos_records": 128,
                 "data.data_dir": sft["data_dir"], "data.k_max": 3,
                 "train.steps": 0, "train.batch_size": BATCH, "train.lr": 3e-3,
                 "train.warmup_steps": 2, "train.log_every": 4, "train.eval_every": 32,
                 "train.eval_batches": 4, "train.checkpoint_every": 64})
    return _set(cfg, **kw)


@pytest.fixture(scope="module")
def rm_run(sft_dir, tmp_path_factory):
    """One epoch of the RM on world comparisons (plus bad lines, dropped)."""
    root = tmp_path_factory.mktemp("rm")
    train = write_jsonl(root / "comparisons.jsonl", world_comparisons(N_TRAIN, 0, "train") + BAD_LINES)
    heldout = write_jsonl(root / "heldout.jsonl", world_comparisons(N_EVAL, 1, "heldout"))
    cfg = _rm_config(sft_dir, train, heldout, **{"data.drop_invalid": True})
    stages.run(cfg, str(root / "rm"))
    return {"config": cfg, "workdir": str(root / "rm")}


def _final(workdir):
    """(params, meta, step) of a workdir's latest checkpoint."""
    step = checkpoint.resolve(workdir)[1]
    return checkpoint.load_saved_params(workdir), checkpoint.read_meta(workdir), step


# ---------------------------------------------------------------------------
# The loss and the forward pass
# ---------------------------------------------------------------------------

RECORDS = [  # ragged K = 2, 3, 4 with ties, for k_max = 4
    {"prompt": "What is 2 plus 3?", "responses": ["5", "I can't help with that."], "ranks": [0, 1]},
    {"prompt": "Is 7 even or odd?", "responses": ["odd", "even", "It is odd."], "ranks": [0, 1, 1]},
    {"prompt": "Spell 'cat' backwards.", "responses": ["tac", "cat", "tca", "The answer is tac."],
     "ranks": [2, 0, 1, 0]},
]


def _numpy_loss(rewards: list[list[float]], ranks: list[list[int]]) -> float:
    """InstructGPT's loss by a plain loop: mean over prompts of the mean over
    ranked pairs of -log sigmoid(r_better - r_worse)."""
    per_prompt = []
    for r, rk in zip(rewards, ranks):
        terms = []
        for i in range(len(r)):
            for j in range(len(r)):
                if rk[i] < rk[j]:
                    terms.append(math.log1p(math.exp(-(r[i] - r[j]))))
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


def test_batch_loss_equals_numpy_loop_over_pairs():
    tok, model, params = ByteTokenizer(), Transformer(MICRO), random_params(MICRO)
    batch = pipeline.stack([preprocess.comparison_example(tok, r, 4, MAX_LEN) for r in RECORDS])
    assert batch["tokens"].shape == (3, 4, MAX_LEN)
    batch = rm.pack(batch)   # one bucket: B x K rows at the full length

    @jax.jit
    def loss_and_rewards(params, batch):
        loss, stats = rm.rm_loss_on_batch(params, model, batch)
        return loss, stats, rm.rewards_on_batch(params, model, batch)

    loss, stats, rewards_BxK = loss_and_rewards(params, batch)
    assert np.all(np.isfinite(rewards_BxK)), "padding slots (fully masked rows) must stay finite"

    # Reference: each response alone, scored at its EOS.
    forward = jax.jit(lambda p, t, m: model.apply({"params": p}, t, attn_mask=m))
    expected = []
    for record in RECORDS:
        scores = []
        for response in record["responses"]:
            ids = encode_prompt(tok, record["prompt"]) + encode_response(tok, response)
            tokens = np.full((1, MAX_LEN), tok.pad_id, np.int32)
            tokens[0, :len(ids)] = ids
            mask = (np.arange(MAX_LEN) < len(ids)).astype(np.int32)[None]
            scores.append(float(forward(params, tokens, mask)[0, len(ids) - 1]))
        expected.append(scores)
    for b, scores in enumerate(expected):
        np.testing.assert_allclose(np.asarray(rewards_BxK)[b, :len(scores)], scores, atol=1e-5)
    assert len(set(np.round(sum(expected, []), 4))) == 9, "scores should differ for the test to bite"
    want = _numpy_loss(expected, [r["ranks"] for r in RECORDS])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # Ranked pairs: 1 + 2 (one tie) + 5 (one tie of six pairs).
    assert float(stats["n_pairs"]) == 8


def test_one_forward_pass_per_length_bucket_of_the_distinct_responses():
    """K forward passes per prompt (not two per pair), one call per length
    bucket, and only for distinct responses: a response repeated in a record
    (a peaked policy's repeated sample) and padding slots take no row."""
    tok, params = ByteTokenizer(), random_params(MICRO)
    records = RECORDS + [{"prompt": "Say 'ab' 2 times.", "responses": ["ab ab", "ab", "ab ab"],
                          "ranks": [0, 1, 0]}]
    batch = pipeline.stack([preprocess.comparison_example(tok, r, 4, MAX_LEN) for r in records])
    b, k_max, distinct = 4, 4, 2 + 3 + 4 + 2
    # The 11 distinct sequences: 4 of at most 40 tokens, 5 of 41 to 48, 2 of 59.
    packed = rm.pack(batch, [(40, 4), (48, 5), (MAX_LEN, 2)])
    counting = CountingModel(Transformer(MICRO))
    # Tracing the loss and its gradient calls the model exactly as training does.
    jax.eval_shape(jax.value_and_grad(lambda p: rm.rm_loss_on_batch(p, counting, packed)[0]),
                   params)
    assert counting.calls == [(4, 40), (5, 48), (2, MAX_LEN)]
    n_pairs = sum(math.comb(len(r["responses"]), 2) for r in records)
    assert n_pairs == 13 and distinct != 2 * n_pairs
    # Buckets the batch does not fit: one of B x K rows at the full length.
    assert rm.pack(batch, [(40, 4), (MAX_LEN, 4)])["row_tokens_0"].shape == (b * k_max, MAX_LEN)
    # The loss is the unpacked one: every slot reads its own row's reward.
    model = Transformer(MICRO)
    loss = jax.jit(lambda p, bt: rm.rm_loss_on_batch(p, model, bt)[0])
    np.testing.assert_allclose(float(loss(params, packed)), float(loss(params, rm.pack(batch))),
                               rtol=1e-6)


def test_distinct_rows_layout():
    tokens = np.array([[[1, 2, 0, 0], [1, 3, 5, 0], [1, 2, 0, 0]],
                       [[4, 5, 6, 7], [4, 5, 6, 7], [7, 7, 0, 0]]])
    batch = {"tokens": tokens, "attn_mask": (tokens > 0).astype(np.int32),
             "last_index": np.array([[1, 2, 1], [3, 3, 1]]), "valid": np.array(
                 [[True, True, True], [True, True, False]]), "ranks": np.zeros((2, 3), np.int32)}
    out = preprocess.distinct_rows(batch, [(2, 2), (4, 2)], row_offset=8)
    # [1, 2] fits in 2 tokens; [1, 3, 5] and [4, 5, 6, 7] need 4; [7, 7] is padding.
    np.testing.assert_array_equal(out["row_tokens_0"][:1], [[1, 2]])
    np.testing.assert_array_equal(out["row_attn_mask_0"][1], [0, 0])     # a padding row
    np.testing.assert_array_equal(out["row_tokens_1"], [[1, 3, 5, 0], [4, 5, 6, 7]])
    np.testing.assert_array_equal(out["row_last_index_1"], [2, 3])
    np.testing.assert_array_equal(out["slot_row"], np.array([[0, 2, 0], [3, 3, 0]]) + 8)
    assert "tokens" not in out and out["ranks"] is batch["ranks"]
    # A full short bucket spills into the longer one.
    spill = preprocess.distinct_rows(batch, [(2, 0), (4, 3)])
    np.testing.assert_array_equal(spill["slot_row"], [[0, 1, 0], [2, 2, 0]])


def test_row_buckets_cover_the_batches_of_the_data():
    tok = ByteTokenizer()
    records = [r if "responses" in r else {"prompt": r["prompt"], "ranks": [0, 1],
                                           "responses": [r["chosen"], r["rejected"]]}
               for r in world_comparisons(256, 0, "train")]      # as the reader normalises them
    buckets = rm.row_buckets(tok, records, 16, MAX_LEN, row_multiple=8)
    assert [length for length, _ in buckets] == [48, 72, MAX_LEN]
    assert all(rows % 8 == 0 for _, rows in buckets)
    examples = [preprocess.comparison_example(tok, r, 4, MAX_LEN) for r in records]
    fits = [rm.pack(pipeline.stack(examples[i:i + 16]), buckets)["row_tokens_0"].shape[1] == 48
            for i in range(0, 256, 16)]
    assert all(fits)     # no batch fell back to the full size


def test_end_to_end_learns_the_gold_ordering(rm_run):
    rows = read_metrics(rm_run["workdir"], "rm")
    train = [r for r in rows if "rm/loss" in r]
    evals = [r for r in rows if "rm/gold_accuracy" in r]
    assert [r["step"] for r in evals] == [32, 64]  # one epoch of 1024 prompts, batch 16
    assert evals[-1]["rm/gold_accuracy"] > 0.7, evals
    assert evals[-1]["rm/eval_accuracy"] > 0.6, evals
    # The zero-initialised head starts every prompt at loss ln 2.
    first, last = np.mean([r["rm/loss"] for r in train[:3]]), np.mean([r["rm/loss"] for r in train[-3:]])
    assert last < first - 0.05, (first, last)
    # Against the held-out labeler's noisy ranks (it agrees with gold on 86%
    # of these pairs), whose loss floor is far above 0.
    assert evals[-1]["rm/eval_loss"] < math.log(2) - 0.1, evals
    assert all(r["rm/skipped"] == 0 and np.isfinite(r["rm/loss"]) for r in train)
    assert all(r["rm/pairs_per_s"] > 0 for r in train)
    assert all({"rm/accuracy", "rm/margin", "rm/grad_norm"} <= set(r) for r in train)
    dropped = [r for r in rows if "rm/dropped" in r]
    assert dropped and dropped[0]["rm/dropped"] == len(BAD_LINES)
    _, meta, _ = _final(rm_run["workdir"])
    assert meta["dropped"] == len(BAD_LINES) and meta["train_steps"] == 64
    assert rm_run["config"].train.steps == 0, "the derived step count is not written into the config"


def test_bias_normalised_on_demonstrations_once(rm_run):
    workdir, cfg = rm_run["workdir"], rm_run["config"]
    params, meta, step = _final(workdir)
    assert meta["bias_normalized"] is True and step == 64
    bias_rows = [r for r in read_metrics(workdir, "rm") if "rm/bias" in r]
    assert len(bias_rows) == 1 and bias_rows[0]["rm/bias"] == pytest.approx(meta["rm_bias"])
    assert abs(meta["rm_bias"]) > 1e-3, "training should have moved the demonstrations' mean"

    # The demonstrations' mean score under the saved RM is 0.
    tok = ByteTokenizer()
    demos = [json.loads(line) for line in open(cfg.data.demos_path)]
    assert len(demos) == cfg.data.demos_records == meta["demos_records"]  # all of them scored
    batch = pipeline.stack([preprocess.sft_example(tok, d, MAX_LEN) for d in demos])
    model_cfg = resolve.model_config_from(cfg.model, meta["model"], "scalar")
    scores_NxL = jax.jit(lambda p, t, m: Transformer(model_cfg).apply({"params": p}, t, attn_mask=m))(
        params, batch["tokens"], batch["attn_mask"])
    last = batch["attn_mask"].sum(axis=1) - 1
    assert abs(float(np.mean(np.asarray(scores_NxL)[np.arange(len(demos)), last]))) < 1e-3

    # Re-running the finished stage restores it and changes nothing.
    stages.run(cfg, workdir)
    again, meta_again, step_again = _final(workdir)
    assert step_again == step and meta_again == meta
    assert_trees_equal(params, again)
    assert len([r for r in read_metrics(workdir, "rm") if "rm/bias" in r]) == 1


def test_resume_is_bit_identical(rm_run, tmp_path, monkeypatch):
    # The end-to-end run's config, with a checkpoint at step 32 to resume from.
    cfg = _set(rm_run["config"].copy_and_resolve_references(), **{"train.checkpoint_every": 32})
    run_interrupted(monkeypatch, cfg, str(tmp_path / "resumed"), step=40)
    _, meta, step = _final(str(tmp_path / "resumed"))
    assert step == 32 and "bias_normalized" not in meta  # mid-run checkpoints are not normalised
    stages.run(cfg, str(tmp_path / "resumed"))

    full, meta_full, _ = _final(rm_run["workdir"])
    resumed, meta_resumed, _ = _final(str(tmp_path / "resumed"))
    assert meta_resumed["rm_bias"] == meta_full["rm_bias"]
    assert_trees_equal(full, resumed)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

GOOD = {"prompt": "What is 2 plus 3?", "responses": ["5", "6"], "ranks": [0, 1]}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "What is 2 plus 3?", "responses": ["5", "  "], "ranks": [0, 1]}, "non-empty"),
    ({"prompt": "What is 2 plus 3?", "chosen": "5", "rejected": "5"}, "identical to 'chosen'"),
    ({"prompt": "What is 2 plus 3?", "responses": ["5"], "ranks": [0]}, "2 to 9 responses"),
    ({"prompt": "What is 2 plus 3?", "responses": [str(i) for i in range(10)],
      "ranks": list(range(10))}, "2 to 9 responses"),
    ({"prompt": "What is 2 plus 3?", "responses": ["5", "6", "7", "8"], "ranks": [0, 1, 2, 3]},
     "more than k_max=3"),
    ({"prompt": "What is 2 plus 3?", "responses": ["5", "6", "7"], "ranks": [0, 1]},
     "one entry per response"),
    ({"prompt": "What is 2 plus 3?", "responses": ["5", "6 " * 60], "ranks": [0, 1]},
     "more than max_len=96"),
], ids=["empty", "chosen==rejected", "K=1", "K=10", "K>k_max", "ranks", "too_long"])
def test_bad_input_names_file_and_line(sft_dir, tmp_path, bad, message):
    path = write_jsonl(tmp_path / "comparisons.jsonl", [GOOD, GOOD, bad, GOOD])
    cfg = _rm_config(sft_dir, path, eval_path=path)
    with pytest.raises(DataError) as e:
        stages.run(cfg, str(tmp_path / "rm"))
    assert "comparisons.jsonl:3" in str(e.value) and message in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "rm" / "checkpoints")


def test_config_derives_one_epoch_and_rejects_unknown_variant():
    cfg = load_config("rm", "")
    assert cfg.stage == "rm" and cfg.data.k_max == 9 and cfg.train.steps == 0
    assert rm.train_steps(cfg, 33_000) == math.ceil(33_000 / cfg.train.batch_size)
    cfg.train.steps = 7
    assert rm.train_steps(cfg, 33_000) == 7
    with pytest.raises(ValueError):
        load_config("rm", "huge")
    with pytest.raises(ConfigError):
        rm.check_config(_set(load_config("rm", "tiny"), **{"init_from": ""}))


def test_expand_layers_grows_the_sft_network(sft_dir, tmp_path, caplog):
    """expand_layers=2: the RM is the SFT network plus two layers that start
    as identities (models.transformer.expand_layers): its checkpoint and
    meta have two more layers, the first ones trained from the SFT's."""
    path = write_jsonl(tmp_path / "comparisons.jsonl", world_comparisons(64, 0, "train"))
    cfg = _rm_config(sft_dir, path, path, **{"expand_layers": 2, "train.steps": 2,
                                             "train.eval_every": 2, "train.checkpoint_every": 2})
    stages.run(cfg, str(tmp_path / "rm"))
    sft_layers = checkpoint.read_meta(sft_dir["workdir"])["model"]["layers"]
    assert checkpoint.read_meta(str(tmp_path / "rm"))["model"]["layers"] == sft_layers + 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stack = checkpoint.load_saved_params(str(tmp_path / "rm"))["layers"]["mlp"]["down"]["kernel"]
    assert stack.shape[0] == sft_layers + 2
    # Reading a checkpoint's params puts no Orbax warning on the console
    # (console.py drops only the expected ones).
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and not console.expected(r.getMessage())]
    with pytest.raises(ConfigError, match=">= 0"):
        config_domains.check(_set(load_config("rm", "tiny"), **{"init_from": "x", "expand_layers": -1}))
