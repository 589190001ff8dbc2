"""Stage `rm`: the reward model on K-wise rankings (InstructGPT step 2, section 3.5).

The RM is the SFT decoder with its unembedding replaced by a scalar head
(`head="scalar"`, fresh zero-initialised head, backbone grafted from the SFT
checkpoint). Its reward for a response is the head's output at the last real
token of prompt + response + EOS (`last_index`, the EOS).

A batch holds whole prompts: element b carries its K responses, K <= k_max,
padded to k_max slots and masked by `valid`. The K sequences of all B prompts
go through ONE forward pass of B * k_max rows, and every ranked pair (i, j)
of a prompt (C(K, 2) of them, fewer with ties) reuses those K rewards in
`losses.ranking_loss`: the paper's trick against overfitting and for speed
(appendix C.2). Pairwise `{"prompt", "chosen", "rejected"}` records are the
K = 2 case of the same code. Padding slots are rows with an all-zero
attention mask; the decoder's finite mask value keeps them finite, and the
loss never reads them.

Training is one epoch by default (the paper found more overfits): with
`train.steps` 0 or -1 the step count is derived from the data size.

After the last step the score head's bias is shifted so that the
demonstrations' responses score mean 0 (section 3.5), and the final
checkpoint, the one PPO reads, holds the normalised RM; its meta records the
shift (`rm_bias`) and `bias_normalized: true`. The shift is applied by
`loop.Loop.finalize`, once, just before the final save: a resumed run
resumes un-normalised params and normalises at its end, and a finished run,
re-run, is restored and does nothing.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, jit_cache, loop, losses, sharding, train_state
from rlhf_jax.data import pipeline, preprocess
from rlhf_jax.data import setup as data_setup
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models import readout, resolve
from rlhf_jax.models.transformer import Transformer, expand_layers
from rlhf_jax.tokenizer import encode_prompt, encode_response

# Records read to estimate the ranked pairs per prompt (for rm/pairs_per_s)
# and the rows per length bucket (`row_buckets`).
PAIR_COUNT_SAMPLE = 4096


# ---------------------------------------------------------------------------
# Rewards and the loss
# ---------------------------------------------------------------------------

def rewards_on_batch(params, model: Transformer, batch, dropout_rng=None):
    """RM rewards of every response slot, [B, K], from one forward pass per
    length bucket over the batch's distinct responses.

    batch: `pack(...)` of comparison examples (preprocess.distinct_rows):
    per bucket g row_tokens_g/row_attn_mask_g [R_g, L_g], row_last_index_g
    [R_g]; slot_row [B, K] into the buckets' rows in order. Padding rows and
    slots get a finite, meaningless reward that callers mask with `valid`.
    """
    rewards = []
    for g in range(n_buckets(batch)):
        rewards.append(readout.outputs_at_cols(
            model, params, batch[f"row_tokens_{g}"], batch[f"row_last_index_{g}"][:, None],
            batch[f"row_attn_mask_{g}"], dropout_rng)[:, 0])
    return jnp.concatenate(rewards)[batch["slot_row"]]


def n_buckets(batch: dict) -> int:
    return sum(key.startswith("row_tokens_") for key in batch)


def pack(batch: dict, buckets=None) -> dict:
    """A process's batch of comparison examples with its distinct responses
    as rows in length buckets (preprocess.distinct_rows; `row_buckets` sizes
    them). Without buckets, or with several processes, one bucket of B x K
    rows at the full length: every process's batch then has one shape
    whatever its data (the row indices offset by process)."""
    b, k, l = batch["tokens"].shape
    if buckets is None or jax.process_count() > 1:
        buckets = [(l, b * k)]
    return preprocess.distinct_rows(batch, buckets, row_offset=jax.process_index() * b * k)


def row_buckets(tok, records, batch_size: int, max_len: int, row_multiple: int = 1,
                sigmas: float = 3.0) -> list[tuple[int, int]]:
    """Length buckets (half, three quarters and all of max_len) and their row
    budgets for batches of `batch_size` of these comparison records.

    A batch's longer responses may spill into longer buckets, so what must
    fit is, for every bucket, the batch's distinct responses too long for
    the buckets before it: the rows of buckets g and after are that count's
    mean + `sigmas` standard deviations over batches of records drawn at
    random (at 3, a batch falls back to the full size about once in a
    thousand). Budgets are rounded up to `row_multiple` (the batch devices)."""
    lengths = sorted({-(-max_len * f // 32) * 8 for f in (2, 3)} & set(range(1, max_len))) + [max_len]
    counts = np.zeros((len(records), len(lengths)))
    for r, record in enumerate(records):
        p = len(encode_prompt(tok, record["prompt"]))
        for response in set(record["responses"]):
            n = p + len(encode_response(tok, response))
            counts[r, next(g for g, x in enumerate(lengths) if n <= x or x == max_len)] += 1
    from_g = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]           # rows in buckets g..G
    need = np.ceil(batch_size * from_g.mean(0) + sigmas * np.sqrt(batch_size) * from_g.std(0))
    need = np.maximum.accumulate(need[::-1])[::-1]                 # never less than a later one
    rows = need - np.append(need[1:], 0)
    rows = np.maximum(row_multiple, np.ceil(rows / row_multiple) * row_multiple).astype(int)
    return [(int(x), int(n)) for x, n in zip(lengths, rows)]


def rm_loss_on_batch(params, model: Transformer, batch, dropout_rng=None):
    """InstructGPT's K-wise loss: mean over prompts of the mean over ranked
    pairs of -log sigmoid(r_better - r_worse); ties give no pair.

    Returns (loss, stats) as `losses.ranking_loss` (accuracy, n_pairs, margin,
    n_prompts)."""
    rewards_BxK = rewards_on_batch(params, model, batch, dropout_rng)
    return losses.ranking_loss(rewards_BxK, batch["ranks"], batch["valid"])


def train_step(state: train_state.TrainState, batch, *, model: Transformer, optimizer):
    def loss_fn(params):
        return rm_loss_on_batch(params, model, batch, train_state.step_rng(state))

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, upd = train_state.apply_update(state, grads, loss, optimizer)
    return state, {"loss": loss, "accuracy": stats["accuracy"], "margin": stats["margin"],
                   "n_pairs": stats["n_pairs"], **upd}


# ---------------------------------------------------------------------------
# Evaluation: the held-out labeler's ranks and, in the world, the gold labeler
# ---------------------------------------------------------------------------

def gold_scores(record: dict, k_max: int, judge) -> np.ndarray:
    """float32 [k_max]: the gold labeler's score of each response, NaN in
    padding slots and for prompts outside the instruction world. A response
    the record marks unfinished (cut at the length limit) scores as the
    labeler scored it when it ranked the record.

    `judge(prompt, response, finished) -> float` is the gold labeler
    (rlhf_jax.world.gold_score), raising ValueError for a prompt it cannot
    judge."""
    out = np.full((k_max,), np.nan, dtype=np.float32)
    finished = record.get("finished") or [True] * len(record["responses"])
    try:
        for i, (response, done) in enumerate(zip(record["responses"], finished)):
            out[i] = judge(record["prompt"], response, bool(done))
    except ValueError:  # not a world prompt: no gold ordering
        out[:] = np.nan
    return out


def eval_example(tok, record: dict, k_max: int, max_len: int, judge=None) -> dict:
    example = preprocess.comparison_example(tok, record, k_max, max_len)
    example["gold"] = (gold_scores(record, k_max, judge) if judge is not None
                       else np.full((k_max,), np.nan, np.float32))
    return example


def eval_step(params, batch, *, model: Transformer):
    """Sums over one batch, so that batches combine exactly.

    Gold accuracy reuses the ranking statistics with ranks = -gold: a pair
    counts when the gold scores differ, and is right when the RM orders it
    the same way."""
    rewards_BxK = rewards_on_batch(params, model, batch)
    loss, stats = losses.ranking_loss(rewards_BxK, batch["ranks"], batch["valid"])
    has_gold_BxK = batch["valid"] & jnp.isfinite(batch["gold"])
    _, gold = losses.ranking_loss(rewards_BxK, jnp.where(has_gold_BxK, -batch["gold"], 0.0),
                                  has_gold_BxK)
    return {"loss_sum": loss * stats["n_prompts"], "n_prompts": stats["n_prompts"],
            "correct": stats["accuracy"] * stats["n_pairs"], "n_pairs": stats["n_pairs"],
            "gold_correct": gold["accuracy"] * gold["n_pairs"], "gold_pairs": gold["n_pairs"]}


def ranking_evaluator(runtime, step, eval_source, transform, batch_size, max_batches=None,
                      packer=lambda batch: batch):
    """`evaluate(params)` of a ranking model (the RM, DPO's policy) over at
    most `max_batches` batches (None: all) of `eval_source`: the per-batch
    sums of the jitted `step(params, batch)` (loss_sum, n_prompts, correct,
    n_pairs, gold_correct, gold_pairs, optionally margin_sum), combined
    exactly. `packer(batch)` lays out a batch (the RM's `pack`)."""
    def evaluate(params) -> dict:
        sums: dict[str, float] = {}
        batches = pipeline.batches_once(eval_source, batch_size, transform,
                                        jax.process_index(), jax.process_count())
        for i, (batch, valid_B) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = packer(dict(batch, valid=batch["valid"] & valid_B[:, None]))
            for k, v in step(params, runtime.global_batch(batch)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        pairs = max(sums["n_pairs"], 1.0)
        out = {"eval_loss": sums["loss_sum"] / max(sums["n_prompts"], 1.0),
               "eval_accuracy": sums["correct"] / pairs}
        if "margin_sum" in sums:
            out["eval_margin"] = sums["margin_sum"] / pairs
        if sums["gold_pairs"] > 0:  # world prompts with responses of different gold scores
            out["gold_accuracy"] = sums["gold_correct"] / sums["gold_pairs"]
        return out
    return evaluate


def make_evaluator(runtime, model, eval_source, transform, batch_size, max_batches,
                   packer=pack):
    """The RM's `evaluate(params)` over at most `max_batches` batches of
    `eval_source`; `packer(batch)` lays out a batch's distinct responses (`pack`)."""
    step = jit_cache.jit_partial(eval_step, dict(model=model))
    return ranking_evaluator(runtime, step, eval_source, transform, batch_size, max_batches, packer)


# ---------------------------------------------------------------------------
# Bias normalisation on demonstrations
# ---------------------------------------------------------------------------

def demo_score_sums(params, batch, *, model: Transformer):
    """(sum of rewards, count) over the valid rows of a demonstrations batch.
    batch: tokens/attn_mask [N, L], valid [N]."""
    last_index_N = jnp.sum(batch["attn_mask"], axis=1) - 1
    rewards_N = readout.outputs_at_cols(model, params, batch["tokens"], last_index_N[:, None],
                                        batch["attn_mask"])[:, 0]
    return jnp.sum(jnp.where(batch["valid"], rewards_N, 0.0)), jnp.sum(batch["valid"])


def demo_sample(demos, n: int, seed: int):
    """`n` demonstrations drawn without replacement by a seeded rule (all of
    them when there are fewer), kept in source order."""
    if n >= len(demos):
        return demos
    keep = np.sort(np.random.default_rng([seed, 35]).choice(len(demos), size=n, replace=False))
    return demos.subset(keep, f"{demos.name}[{n} for the bias]")


def _has_records(path: str) -> bool:
    """A second eval set is optional: none given, or an empty file (a policy
    whose held-out samples all tied), is no evaluation."""
    if not path:
        return False
    return str(path).startswith("tfds:") or os.path.getsize(path) > 0


def _with_second_eval(evaluate, other, suffix: str):
    def both(params) -> dict:
        return {**evaluate(params), **{k + suffix: v for k, v in other(params).items()}}
    return both


def make_bias_normalizer(runtime, model, demos_source, transform, batch_size: int):
    """`finalize(state)` for the Loop: shift the score head's bias so that the
    demonstrations (prompt + response + EOS) score mean 0."""
    step = jit_cache.jit_partial(demo_score_sums, dict(model=model))

    def mean_demo_score(params) -> float:
        total, count = 0.0, 0
        for batch, valid_N in pipeline.batches_once(demos_source, batch_size, transform,
                                                    jax.process_index(), jax.process_count()):
            batch = {"tokens": batch["tokens"], "attn_mask": batch["attn_mask"], "valid": valid_N}
            s, n = step(params, runtime.global_batch(batch))
            total, count = total + float(s), count + int(n)
        return total / count

    def finalize(state: train_state.TrainState):
        shift = mean_demo_score(state.params)
        params = dict(state.params)
        head = dict(params["score_head"])
        head["bias"] = head["bias"] - jnp.asarray(shift, head["bias"].dtype)
        params["score_head"] = head
        meta = {"rm_bias": shift, "bias_normalized": True, "demos_path": demos_source.name,
                "demos_records": len(demos_source)}
        return state.replace(params=params), {"bias": shift}, meta
    return finalize


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

def check_config(config):
    if not config.init_from and not config.model.get("pretrained"):
        raise ConfigError(
            "rm needs --config.init_from=<SFT workdir> (InstructGPT initialises the reward model "
            "from the SFT model; or model.pretrained=<HF dir or .gguf>)")
    if int(config.expand_layers) and not config.init_from:
        raise ConfigError("expand_layers grows the init_from checkpoint's network: give "
                          "--config.init_from=<SFT workdir>")


def train_steps(config, n_train: int) -> int:
    """`train.steps`, or with 0 `train.epochs` passes over the n_train
    comparisons (a last partial batch runs into the next epoch's shuffle)."""
    steps = int(config.train.steps)
    if steps > 0:
        return steps
    if steps < 0:
        raise ConfigError(f"train.steps={steps}: give a positive count, or 0 for "
                          f"train.epochs passes over the data")
    return max(1, math.ceil(float(config.train.epochs) * n_train / int(config.train.batch_size)))


def mean_ranked_pairs(source, limit: int = PAIR_COUNT_SAMPLE) -> float:
    """Ranked (untied) pairs per comparison, over the first `limit` records."""
    records = source.records(range(min(limit, len(source))))
    pairs = [sum(r_i != r_j for i, r_i in enumerate(r["ranks"]) for r_j in r["ranks"][i + 1:])
             for r in records]
    return float(np.mean(pairs))


def _with_train_steps(config, steps: int):
    """A copy of `config` with the derived step count (the caller's config is
    not modified)."""
    run_config = config.copy_and_resolve_references()
    run_config.train.steps = steps
    return run_config


def run(config, workdir: str, judge=None):
    """`judge`: the gold labeler (rlhf_jax.world.gold_score) for the RM's
    gold accuracy on the held-out comparisons; None: no gold accuracy."""
    check_config(config)
    runtime = sharding.Runtime(config)
    meta_from = checkpoint.read_meta(config.init_from) if config.init_from else None
    cfg, tok, pretrained_params = resolve.stage_model(config, "scalar", meta_from)
    if int(config.expand_layers):
        # Block expansion: the SFT layers, then new ones that start as identities.
        if pretrained_params is None:
            pretrained_params = checkpoint.load_saved_params(config.init_from)
        pretrained_params = expand_layers(pretrained_params, int(config.expand_layers))
        cfg = cfg.replace(layers=cfg.layers + int(config.expand_layers))
    max_len, k_max = int(config.data.max_len), int(config.data.k_max)
    resolve.check_context(cfg, max_len, "data.max_len", rope_ok=True)

    # Bad records name file and line (or are dropped and counted with data.drop_invalid).
    check = preprocess.length_check(tok, "comparisons", max_len=max_len, k_max=k_max)
    train_src, eval_src = data_setup.open_train_eval(config, "comparisons", check)
    demos = data_setup.open_source(config, config.data.demos_path, "demonstrations",
                                   preprocess.length_check(tok, "demonstrations", max_len=max_len))
    demos = demo_sample(demos, int(config.data.demos_records), int(config.seed))
    dropped = {"dropped": train_src.n_dropped + (eval_src.n_dropped if config.data.eval_path else 0),
               "dropped_demos": demos.n_dropped}
    if any(dropped.values()) and not checkpoint.has_checkpoint(workdir):  # once, not on resume
        writer = MetricsWriter(workdir, "rm", progress=False)
        writer.write(0, {f"rm/{k}": v for k, v in dropped.items()})
        writer.log(f"[rm] dropped invalid records: {dropped['dropped']} comparisons "
                   f"{dict(train_src.drop_reasons)}, {dropped['dropped_demos']} demonstrations")
        writer.close()

    batch_size = int(config.train.batch_size)
    steps = train_steps(config, len(train_src))
    run_config = _with_train_steps(config, steps)
    transform = functools.partial(preprocess.comparison_example, tok, k_max=k_max, max_len=max_len)
    loader = data_setup.loader(config, runtime, train_src, batch_size, transform)
    buckets = row_buckets(tok, train_src.records(range(min(PAIR_COUNT_SAMPLE, len(train_src)))),
                          batch_size, max_len, sharding.batch_devices(runtime.mesh))
    packer = functools.partial(pack, buckets=buckets)

    optimizer = train_state.make_optimizer(run_config.train)
    with runtime.activations():
        state, shardings, step = train_state.compile_supervised(
            runtime, cfg, optimizer, train_step, config.seed, config.init_from, pretrained_params)
        eval_model = Transformer(cfg)
        eval_transform = functools.partial(eval_example, tok, k_max=k_max, max_len=max_len,
                                           judge=judge)
        evaluate = make_evaluator(runtime, eval_model, eval_src, eval_transform, batch_size,
                                  int(config.train.eval_batches), packer)
        if _has_records(config.data.eval_sft_path):
            # Held-out samples of the SFT policy alone: the distribution PPO
            # starts from, where the RM's ranking matters first.
            evaluate = _with_second_eval(evaluate, make_evaluator(
                runtime, eval_model,
                data_setup.open_source(config, config.data.eval_sft_path, "comparisons", check),
                eval_transform, batch_size, int(config.train.eval_batches), packer), "_sft")
        # Demonstrations are scored in batches of as many rows as a training batch.
        normalize = make_bias_normalizer(
            runtime, eval_model, demos,
            functools.partial(preprocess.sft_example, tok, max_len=max_len), batch_size * k_max)
        meta = dict(resolve.model_meta(cfg, resolve.tokenizer_spec(config, meta_from)),
                    init_from=config.init_from, k_max=k_max, train_steps=steps, **dropped)
        return loop.run(loop.Loop(
            stage="rm", train=run_config.train, workdir=workdir, state=state,
            state_shardings=shardings, step_fn=loop.supervised_step(runtime, loader, step, packer),
            meta=meta, evaluate=evaluate,
            units_per_step=batch_size * mean_ranked_pairs(train_src), units_name="pairs_per_s",
            progress_keys=("loss", "accuracy"), finalize=normalize))
