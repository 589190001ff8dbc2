"""The DPO stage: the loss equals a NumPy loop over ranked pairs, a slot's
sequence log-prob equals the full forward's log-softmax over its response
tokens, the once-computed reference log-probs make the first loss ln 2, the
stage end to end from an SFT checkpoint (loss falls, the result loads as a
policy), exact resume, and an RM checkpoint refused as init_from."""
import math
import os

import jax
import numpy as np
import pytest

from helpers import (assert_trees_equal, checkpoints_dir, count_checkpoint_reads, init_params,
                     load_config, micro_model, run_interrupted, world_comparisons, write_jsonl)
from rlhf_jax import checkpoint, config_domains, inference, losses, sharding, stages
from rlhf_jax.data import pipeline
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import dpo, rm
from rlhf_jax.stages.instructgpt import override
from rlhf_jax.tokenizer import ByteTokenizer, encode_prompt, encode_response

MICRO = ModelConfig(vocab_size=264, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                    max_len=128)
MAX_LEN = 96          # micro_model's data.max_len
K_MAX = 4             # configs/dpo.py:tiny
BETA = 0.1

RECORDS = [  # ragged K = 2, 3, 4 with ties, for k_max = 4
    {"prompt": "What is 2 plus 3?", "responses": ["5", "I can't help with that."], "ranks": [0, 1]},
    {"prompt": "Is 7 even or odd?", "responses": ["odd", "even", "It is odd."], "ranks": [0, 1, 1]},
    {"prompt": "Spell 'cat' backwards.", "responses": ["tac", "cat", "tca", "The answer is tac."],
     "ranks": [2, 0, 1, 0]},
]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------
# The loss and the sequence log-probs
# ---------------------------------------------------------------------------

def test_loss_equals_numpy_loop_over_pairs():
    rng = np.random.default_rng(0)
    b = 4
    logp = rng.normal(-20.0, 5.0, (b, K_MAX)).astype(np.float32)
    ref = (logp + rng.normal(0.0, 3.0, (b, K_MAX))).astype(np.float32)
    ranks = np.array([[0, 1, 1, 0], [2, 0, 1, 9], [0, 0, 5, 5], [1, 1, 1, 1]], np.int32)
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    logp[~valid] = np.nan         # garbage in padding slots must not leak
    # Prompt 2 only ties on its valid slots, prompt 3 ties everywhere: no pairs.
    per_prompt, chosen, rejected, correct = [], [], [], 0
    for i in range(b):
        terms = []
        for x in range(K_MAX):
            for y in range(K_MAX):
                if valid[i, x] and valid[i, y] and ranks[i, x] < ranks[i, y]:
                    r_x = BETA * (float(logp[i, x]) - float(ref[i, x]))
                    r_y = BETA * (float(logp[i, y]) - float(ref[i, y]))
                    terms.append(-_log_sigmoid(r_x - r_y))
                    chosen.append(r_x)
                    rejected.append(r_y)
                    correct += r_x > r_y
        if terms:
            per_prompt.append(np.mean(terms))
    assert len(per_prompt) == 2 and len(chosen) == 2 + 3

    loss, stats = jax.jit(losses.dpo_loss, static_argnums=4)(logp, ref, ranks, valid, BETA)
    np.testing.assert_allclose(float(loss), np.mean(per_prompt), rtol=1e-5)
    assert float(stats["n_pairs"]) == len(chosen) and float(stats["n_prompts"]) == 2
    np.testing.assert_allclose(float(stats["accuracy"]), correct / len(chosen), rtol=1e-6)
    np.testing.assert_allclose(float(stats["chosen_reward"]), np.mean(chosen), rtol=1e-5)
    np.testing.assert_allclose(float(stats["rejected_reward"]), np.mean(rejected), rtol=1e-5)
    np.testing.assert_allclose(float(stats["margin"]), np.mean(chosen) - np.mean(rejected),
                               rtol=1e-5, atol=1e-6)

    grad = jax.grad(lambda lp: losses.dpo_loss(lp, ref, ranks, valid, BETA)[0])(logp)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~valid] == 0)


def test_sequence_logps_equal_numpy_log_softmax_over_response_tokens():
    tok, model, params = ByteTokenizer(), Transformer(MICRO), init_params(MICRO, 1)
    batch = pipeline.stack([dpo.dpo_example(tok, r, K_MAX, MAX_LEN) for r in RECORDS])
    logp_BxK = np.asarray(jax.jit(lambda p, b: dpo.sequence_logps(p, model, b))(params, batch))

    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for b, record in enumerate(RECORDS):
        p = len(encode_prompt(tok, record["prompt"]))
        for k, response in enumerate(record["responses"]):
            response_ids = encode_response(tok, response)          # the response and EOS
            ids = encode_prompt(tok, record["prompt"]) + response_ids
            # Right-padded without a mask: causal attention keeps the pad off
            # the real positions, and every sequence has one shape (one compile).
            tokens = np.full((1, MAX_LEN), tok.pad_id, np.int32)
            tokens[0, :len(ids)] = ids
            logits = np.asarray(forward(params, tokens)[0, :len(ids)], np.float64)
            logits -= logits.max(-1, keepdims=True)
            log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            want = sum(log_softmax[t, ids[t + 1]] for t in range(p - 1, len(ids) - 1))
            assert batch["loss_mask"][b, k].sum() == len(response_ids)   # no prompt token
            np.testing.assert_allclose(logp_BxK[b, k], want, rtol=1e-5)
        assert np.all(logp_BxK[b, len(record["responses"]):] == 0.0)       # padding slots
    assert len(set(np.round(logp_BxK[batch["valid"]], 3))) == 9, "log-probs should differ"


class ListSource:
    """Records in a list, read by index as the loader reads a Source."""

    def __init__(self, records):
        self.items, self.name = records, "records"

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])

    def records(self, indices):
        return [self[int(i)] for i in indices]


def test_reference_pass_equals_the_policy_at_step_zero():
    """With pi = pi_ref the precomputed table equals the step's own log-probs:
    every implicit reward is 0 and the loss is ln 2, whatever batch a record
    lands in (11 records: a padded last reference batch)."""
    tok, model, params = ByteTokenizer(), Transformer(MICRO), init_params(MICRO, 2)
    source = ListSource([RECORDS[i % 3] for i in range(11)])
    runtime = sharding.Runtime(micro_model(load_config("dpo", "tiny")))
    table = dpo.reference_logps(runtime, model, params, source, tok, K_MAX, MAX_LEN, batch_size=8)
    assert table.shape == (11, K_MAX)
    direct = np.asarray(jax.jit(lambda p, b: dpo.sequence_logps(p, model, b))(
        params, pipeline.stack([dpo.dpo_example(tok, r, K_MAX, MAX_LEN) for r in RECORDS])))
    np.testing.assert_allclose(table, direct[np.arange(11) % 3], rtol=1e-6)

    loader = pipeline.BatchLoader(dpo.WithRefLogps(source, table), 8,
                                  lambda r: dpo.train_example(tok, r, K_MAX, MAX_LEN), seed=3)
    for step in (0, 1):
        batch = loader.batch(step)
        np.testing.assert_array_equal(batch["ref_logp"], table[loader.record_indices(step)])
        loss, stats = jax.jit(lambda p, b: dpo.dpo_loss_on_batch(p, model, b, BETA))(params, batch)
        np.testing.assert_allclose(float(loss), math.log(2), atol=1e-6)
        assert abs(float(stats["chosen_reward"])) < 1e-6
        assert abs(float(stats["rejected_reward"])) < 1e-6
        assert abs(float(stats["margin"])) < 1e-6


# ---------------------------------------------------------------------------
# The stage end to end
# ---------------------------------------------------------------------------

N_TRAIN, BATCH = 64, 8


def _dpo_config(sft_workdir, data_path, root, **kw):
    cfg = micro_model(load_config("dpo", "tiny"))
    # The training pairs are the eval set too: eval_loss is the fit to them.
    return override(cfg, **{"init_from": sft_workdir, "data.path": data_path,
                            "data.eval_path": data_path, "data.data_dir": str(root / "tfds"),
                            "train.steps": 0, "train.epochs": 2.0, "train.batch_size": BATCH,
                            "train.lr": 2e-3, "train.warmup_steps": 1, "train.log_every": 1,
                            "train.eval_every": 8, "train.eval_batches": N_TRAIN // BATCH,
                            "train.checkpoint_every": 16, **kw})


@pytest.fixture(scope="module")
def dpo_run(micro_sft, tmp_path_factory):
    """Two epochs of DPO on 64 world comparisons from the micro SFT checkpoint."""
    root = tmp_path_factory.mktemp("dpo")
    data = write_jsonl(root / "comparisons.jsonl", world_comparisons(N_TRAIN, 0, "train"))
    cfg = _dpo_config(micro_sft["sft"], data, root)
    stages.run(cfg, str(root / "dpo"))
    return {"config": cfg, "workdir": str(root / "dpo"), "sft": micro_sft["sft"]}


def test_end_to_end_fits_the_training_pairs(dpo_run):
    rows = read_metrics(dpo_run["workdir"], "dpo")
    train = [r for r in rows if "dpo/loss" in r]
    evals = [r for r in rows if "dpo/eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))   # 2 epochs of 64, batch 8
    assert [r["step"] for r in evals] == [8, 16]
    # Step 0 runs the policy as it starts, the reference itself: every implicit
    # reward is 0, the loss ln 2 (the table came from another program).
    first = train[0]
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["dpo/chosen_reward"]) < 1e-5 and abs(first["dpo/rejected_reward"]) < 1e-5
    late = train[-4:]
    assert np.mean([r["dpo/loss"] for r in late]) < math.log(2) - 0.1, late
    assert np.mean([r["dpo/accuracy"] for r in late]) > 0.7, late
    assert all(r["dpo/margin"] > 0 for r in late)
    assert all(r["dpo/skipped"] == 0 and r["dpo/pairs_per_s"] > 0 and r["dpo/grad_norm"] > 0
               for r in train)
    # Against the labeler's noisy ranks (some pairs are inverted: the fit has a floor).
    assert evals[-1]["dpo/eval_loss"] < math.log(2) - 0.1, evals
    assert evals[-1]["dpo/eval_accuracy"] > 0.7, evals
    assert 0.0 <= evals[-1]["dpo/gold_accuracy"] <= 1.0          # the world's judge was handed

    # The result is a policy checkpoint later stages take as init_from.
    meta = checkpoint.read_meta(dpo_run["workdir"])
    assert meta["stage"] == "dpo" and meta["model"]["head"] == "lm" and meta["train_steps"] == 16
    assert meta["init_from"] == dpo_run["sft"] and meta["beta"] == BETA
    assert dpo_run["config"].train.steps == 0, "the derived step count stays out of the config"
    cfg = dpo_run["config"]
    model, params, tok = inference.load_policy(cfg, dpo_run["workdir"], sharding.Runtime(cfg))
    assert_trees_equal(params, checkpoint.load_saved_params(dpo_run["workdir"]))
    ids = np.asarray([encode_prompt(tok, "What is 2 plus 3?")], np.int32)
    assert model.apply({"params": params}, ids).shape == (1, ids.shape[1], MICRO.vocab_size)
    sft = checkpoint.load_saved_params(dpo_run["sft"])
    assert not np.allclose(sft["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_resume_is_bit_identical(dpo_run, tmp_path, monkeypatch, capsys):
    cfg = override(dpo_run["config"].copy_and_resolve_references(),
                   **{"train.checkpoint_every": 8})
    run_interrupted(monkeypatch, cfg, str(tmp_path / "resumed"), step=12)
    assert checkpoint.resolve(str(tmp_path / "resumed"))[1] == 8
    reads = count_checkpoint_reads(monkeypatch)
    stages.run(cfg, str(tmp_path / "resumed"))
    monkeypatch.undo()
    # init_from's meta and params read once (the reference is the policy's start).
    assert reads["meta", checkpoints_dir(cfg.init_from)] == 1, reads
    assert reads["params", checkpoints_dir(cfg.init_from)] == 1, reads
    assert_trees_equal(checkpoint.load_saved_params(dpo_run["workdir"]),
                       checkpoint.load_saved_params(str(tmp_path / "resumed")))
    # Re-running the finished stage restores it: no reference pass, no step.
    rows = len(read_metrics(str(tmp_path / "resumed")))
    capsys.readouterr()
    stages.run(cfg, str(tmp_path / "resumed"))
    assert len(read_metrics(str(tmp_path / "resumed"))) == rows
    assert "reference log-probs" not in capsys.readouterr().out


def test_init_from_a_reward_model_is_refused(micro_sft, tmp_path):
    data = write_jsonl(tmp_path / "comparisons.jsonl", RECORDS)
    cfg = _dpo_config(micro_sft["rm"], data, tmp_path)
    with pytest.raises(ConfigError, match=r"init_from=.*rm.*not a language model"):
        stages.run(cfg, str(tmp_path / "dpo"))
    assert not os.path.exists(tmp_path / "dpo")
    with pytest.raises(ConfigError, match="init_from"):
        dpo.check_config(override(cfg, **{"init_from": ""}))
    with pytest.raises(ConfigError, match="algo.beta"):
        config_domains.check(override(cfg, **{"init_from": micro_sft["sft"], "algo.beta": 0.0}))


def test_config_defaults():
    cfg = load_config("dpo", "")
    assert cfg.stage == "dpo" and cfg.algo.beta == 0.1 and cfg.train.steps == 0
    assert cfg.train.epochs == 1.0 and cfg.data.path == ""
    assert rm.train_steps(cfg, 6400) == 6400 // cfg.train.batch_size
    assert load_config("dpo", "tiny").data.k_max == 4
    with pytest.raises(ValueError):
        load_config("dpo", "huge")


def test_the_reference_pass_covers_the_records_every_process_reads():
    """The reference log-probs are computed for the records of the run's
    global batches (every process's share), and a record left out is refused,
    never read as a number."""
    records = [{"i": i} for i in range(10)]
    loaders = [pipeline.BatchLoader(records, 4, lambda r: {"i": np.array(r["i"])}, seed=3,
                                    process_index=k, process_count=2, prefetch=0)
               for k in range(2)]
    for step in range(6):                    # past an epoch: the stream reshuffles
        assert loaders[0].global_record_indices(step) == (loaders[0].record_indices(step)
                                                          + loaders[1].record_indices(step))
    table = np.full((10, 2), np.nan, np.float32)
    table[3] = [-1.5, 0.0]
    source = dpo.WithRefLogps(records, table)
    np.testing.assert_array_equal(source[3]["ref_logp"], [-1.5, 0.0])
    with pytest.raises(RuntimeError, match="record 4"):
        source.records([3, 4])
