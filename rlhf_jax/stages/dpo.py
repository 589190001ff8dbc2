"""Stage `dpo`: Direct Preference Optimization (Rafailov et al. 2023) on the RM's comparisons.

DPO trains the policy on the comparisons directly, with no reward model and
no sampling: the policy pi starts from the SFT checkpoint (`init_from`, LM
head) and a frozen reference pi_ref is that same checkpoint. A response's
implicit reward is

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)),

a sequence log-prob summed over the response tokens and the EOS (the prompt's
tokens are context, never scored), and the loss over ranked pairs is the
sigmoid loss -log sigmoid(r_better - r_worse). That is InstructGPT's K-wise RM
loss with these rewards, so `losses.ranking_loss` computes it, unchanged: a
record's K responses give every ranked pair (i better than j; ties give no
pair; pairwise `{"prompt", "chosen", "rejected"}` records are K = 2), the
loss is the mean over a prompt's pairs, then over prompts, weighting K-wise
records as InstructGPT weights them. The data are the RM's
(`preprocess.comparison_example`, the same length checks), with a
response-token mask per slot added (`dpo_example`).

The reference is frozen and the data fixed, so its log-probs are computed
ONCE: before training, one pass of the reference over the training set (and
the part of the eval set the evaluator reads) gives `ref_logp` [N_records,
k_max], in padded batches on the devices (`reference_logps`). The train step
then runs the policy only: one forward and backward pass over B * k_max rows,
no second forward pass of the reference and no second copy of its weights
on the devices. The table reaches the batches through the source: a
`WithRefLogps` source's record i carries row i of it, so the loader's batch
of step s (`BatchLoader.batch(s)`, a pure function of the seed and s) holds
exactly its records' reference log-probs. A resumed run recomputes the table
from the same frozen checkpoint with the same program, bit for bit, and
resumes at the checkpoint's step: resume is exact. A finished run, re-run,
trains nothing and skips the pass.

The metrics (prefix dpo/): loss, accuracy (pairs the implicit reward orders
as the labeler did; ties in reward count as wrong, so it starts near 0,
where pi = pi_ref makes every reward 0 up to rounding), margin (mean
r_better - r_worse), chosen_reward / rejected_reward (mean r of the better
and of the worse response over ranked pairs), n_pairs and the update's
grad_norm, skipped; on held-out comparisons eval_loss,
eval_accuracy, eval_margin and, with a `judge` (the world's gold labeler),
gold_accuracy: the implicit reward's agreement with the gold scores.

Training is one epoch by default (`train.steps` 0: `train.epochs` passes, as
the RM). The final checkpoint is an LM-head policy, as an SFT checkpoint is:
evaluate, generate and PPO take it as `init_from`.
"""
from __future__ import annotations

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import (checkpoint, distributed, inference, jit_cache, loop, losses, rl, sharding,
                      train_state)
from rlhf_jax.data import pipeline, preprocess
from rlhf_jax.data import setup as data_setup
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models import resolve
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.stages import rm, roles
from rlhf_jax.tokenizer import encode_prompt


# ---------------------------------------------------------------------------
# Examples: the RM's comparison slots plus a response-token mask
# ---------------------------------------------------------------------------

def response_mask(tok, record: dict, k_max: int, max_len: int,
                  last_index_K: np.ndarray) -> np.ndarray:
    """float32 [k_max, max_len]: each slot's `loss_mask` as `sft_example`
    lays it out (position t weighs the prediction of tokens[t + 1]): 1 at t =
    P-1 .. n-2 for a prompt of P ids and a slot of n real tokens, i.e. the
    response tokens and the EOS; 0 on the prompt, on padding and in padding
    slots. `last_index_K` is comparison_example's (n - 1 per slot).

    Raises:
      ValueError: the prompt encodes to no tokens (the first response token
        would have no predictor).
    """
    p = len(encode_prompt(tok, record["prompt"]))
    if not p:
        raise ValueError("the prompt encodes to no tokens; the first response token "
                         "could not be predicted")
    mask = np.zeros((k_max, max_len), dtype=np.float32)
    for i in range(len(record["responses"])):
        mask[i, p - 1: int(last_index_K[i])] = 1.0
    return mask


def dpo_example(tok, record: dict, k_max: int, max_len: int) -> dict[str, np.ndarray]:
    """`preprocess.comparison_example` (tokens, attn_mask, last_index, ranks,
    valid) plus `loss_mask` [k_max, max_len] (`response_mask`): the RM's
    layout, unchanged, so both stages read the same files the same way."""
    example = preprocess.comparison_example(tok, record, k_max, max_len)
    example["loss_mask"] = response_mask(tok, record, k_max, max_len, example["last_index"])
    return example


def train_example(tok, record: dict, k_max: int, max_len: int) -> dict[str, np.ndarray]:
    """`dpo_example` plus `ref_logp` [k_max], which a `WithRefLogps` source's
    records carry (0 in padding slots)."""
    example = dpo_example(tok, record, k_max, max_len)
    example["ref_logp"] = np.asarray(record["ref_logp"], dtype=np.float32)
    return example


def eval_example(tok, record: dict, k_max: int, max_len: int, judge=None) -> dict:
    """`train_example` plus `gold` [k_max], the gold labeler's scores
    (`rm.gold_scores`; NaN without a judge, in padding slots and for prompts
    it cannot judge)."""
    example = train_example(tok, record, k_max, max_len)
    example["gold"] = (rm.gold_scores(record, k_max, judge) if judge is not None
                       else np.full((k_max,), np.nan, np.float32))
    return example


def _read(source, indices) -> list[dict]:
    """Records at `indices`: one batched read where the source has one."""
    if hasattr(source, "records"):
        return source.records(indices)
    return [source[int(i)] for i in indices]


class WithRefLogps:
    """A source whose record i also carries `ref_logp`: row i of `ref_logp_NxK`.

    How the precomputed reference log-probs reach a batch: the loader reads
    records by index (`records(indices)` for a training step, `source[i]`
    for an eval pass), and every record brings its own row, so whatever
    records a step's batch holds, its `ref_logp` are theirs. `ref_logp_NxK`
    None (not computed: a finished run, re-run, reads no batch) makes
    reading a record an error."""

    def __init__(self, source, ref_logp_NxK):
        self.source = source
        self.ref_logp_NxK = ref_logp_NxK
        self.name = getattr(source, "name", "comparisons")
        if ref_logp_NxK is not None and len(ref_logp_NxK) != len(source):
            raise ValueError(f"{len(ref_logp_NxK)} rows of reference log-probs for "
                             f"{len(source)} records of {self.name}")

    def __len__(self) -> int:
        return len(self.source)

    def _row(self, index) -> np.ndarray:
        if self.ref_logp_NxK is None or np.isnan(self.ref_logp_NxK[int(index), 0]):
            raise RuntimeError(f"{self.name}: the reference log-probs of record {int(index)} "
                               f"were not computed")
        return self.ref_logp_NxK[int(index)]

    def __getitem__(self, index) -> dict:
        return dict(self.source[index], ref_logp=self._row(index))

    def records(self, indices) -> list[dict]:
        return [dict(r, ref_logp=self._row(i))
                for i, r in zip(indices, _read(self.source, indices))]


# ---------------------------------------------------------------------------
# Sequence log-probs, implicit rewards and the loss
# ---------------------------------------------------------------------------

def sequence_logps(params, model: Transformer, batch, dropout_rng=None):
    """log pi(response + EOS | prompt) of every slot, [B, K] float32, from ONE
    forward pass of B*K rows: the sum of the token log-probs where
    `loss_mask` is set. Padding slots (all-zero attn_mask and loss_mask)
    give 0.

    batch: tokens/attn_mask/loss_mask [B, K, L] (see `dpo_example`).

    The full forward, LM head at every position, as the SFT loss: in the
    RM's right-padded layout each slot's response starts at its own offset,
    so `inference.response_outputs`' one static slice (PPO's left-padded
    prompts) does not apply."""
    tokens_BxKxL = batch["tokens"]
    b, k, l = tokens_BxKxL.shape
    tokens_NxL = tokens_BxKxL.reshape(b * k, l)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    logits_NxLxV = model.apply({"params": params}, tokens_NxL,
                               attn_mask=batch["attn_mask"].reshape(b * k, l), rngs=rngs)
    # loss_mask[t] weighs the prediction of tokens[t + 1], made at position t.
    mask_NxT = batch["loss_mask"].reshape(b * k, l)[:, :-1] != 0
    # Pad ids need not be in the vocabulary: gather a safe id where unscored.
    targets_NxT = jnp.where(mask_NxT, tokens_NxL[:, 1:], 0)
    logp_NxT = rl.logprobs_from_logits(logits_NxLxV[:, :-1], targets_NxT)
    return rl.masked_sum(logp_NxT, mask_NxT, axis=1).reshape(b, k)


def dpo_loss_on_batch(params, model: Transformer, batch, beta, dropout_rng=None):
    """The policy's DPO loss on a batch with precomputed `ref_logp` [B, K]."""
    logp_BxK = sequence_logps(params, model, batch, dropout_rng)
    return losses.dpo_loss(logp_BxK, batch["ref_logp"], batch["ranks"], batch["valid"], beta)


def train_step(state: train_state.TrainState, batch, *, model: Transformer, optimizer, beta):
    def loss_fn(params):
        return dpo_loss_on_batch(params, model, batch, beta, train_state.step_rng(state))

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, upd = train_state.apply_update(state, grads, loss, optimizer)
    return state, {"loss": loss, "accuracy": stats["accuracy"], "margin": stats["margin"],
                   "chosen_reward": stats["chosen_reward"],
                   "rejected_reward": stats["rejected_reward"], "n_pairs": stats["n_pairs"],
                   **upd}


# ---------------------------------------------------------------------------
# The reference, once
# ---------------------------------------------------------------------------

def reference_logps(runtime: sharding.Runtime, model: Transformer, params, source, tok,
                    k_max: int, max_len: int, batch_size: int, indices=None) -> np.ndarray:
    """float32 [len(source), k_max]: `sequence_logps` of the slots of the
    records at `indices` (default: all) under `params` (the frozen
    reference), in batches of `batch_size` records (rounded to the batch
    devices; the last padded with copies of its last record, so the pass
    compiles once). 0 in padding slots; NaN in the rows of records not
    computed (`WithRefLogps` refuses to read them). Every process reads the
    same records and ends with the whole table."""
    step = jax.jit(lambda params, batch: sequence_logps(params, model, batch))
    batch_size = runtime.round_batch(batch_size)
    indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    out = np.full((len(source), k_max), np.nan, dtype=np.float32)
    for start, rows, n_real in inference.padded_batches(len(indices), batch_size):
        examples = [dpo_example(tok, r, k_max, max_len) for r in _read(source, indices[rows])]
        batch = {key: v for key, v in pipeline.stack(examples).items()
                 if key in ("tokens", "attn_mask", "loss_mask")}
        logp_BxK = step(params, inference.to_device(runtime, batch))
        out[indices[start:start + n_real]] = distributed.gather(logp_BxK)[:n_real]
    return out


# ---------------------------------------------------------------------------
# Evaluation: the held-out labeler's ranks and, in the world, the gold labeler
# ---------------------------------------------------------------------------

def eval_step(params, batch, *, model: Transformer, beta):
    """Sums over one batch, so that batches combine exactly. Gold accuracy
    reuses the ranking statistics with ranks = -gold, as rm.eval_step."""
    logp_BxK = sequence_logps(params, model, batch)
    loss, stats = losses.dpo_loss(logp_BxK, batch["ref_logp"], batch["ranks"], batch["valid"], beta)
    rewards_BxK = losses.implicit_rewards(logp_BxK, batch["ref_logp"], batch["valid"], beta)
    has_gold_BxK = batch["valid"] & jnp.isfinite(batch["gold"])
    _, gold = losses.ranking_loss(rewards_BxK, jnp.where(has_gold_BxK, -batch["gold"], 0.0),
                                  has_gold_BxK)
    return {"loss_sum": loss * stats["n_prompts"], "n_prompts": stats["n_prompts"],
            "correct": stats["accuracy"] * stats["n_pairs"], "n_pairs": stats["n_pairs"],
            "margin_sum": stats["margin"] * stats["n_pairs"],
            "gold_correct": gold["accuracy"] * gold["n_pairs"], "gold_pairs": gold["n_pairs"]}


def make_evaluator(runtime, model, eval_source, transform, batch_size, beta):
    """`evaluate(params)` over all of `eval_source` (a `WithRefLogps`, cut
    to the records evaluated): rm.ranking_evaluator on DPO's implicit rewards."""
    step = jit_cache.jit_partial(eval_step, dict(model=model, beta=beta))
    return rm.ranking_evaluator(runtime, step, eval_source, transform, batch_size)


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

def check_config(config):
    if not config.init_from and not config.model.get("pretrained"):
        raise ConfigError(
            "dpo needs --config.init_from=<SFT workdir> (the policy starts from it and it is "
            "the frozen reference; or model.pretrained=<HF dir or .gguf>)")
    # data.k_max, algo.beta: their domains (rlhf_jax/config_domains.py).


def open_init(config) -> Optional[checkpoint.Source]:
    """init_from's checkpoint opened once (its meta read once): a language
    model's. None without init_from (a pretrained model)."""
    if not config.init_from:
        return None
    source = roles.open_checkpoint(config.init_from, "init_from")
    meta = source.meta
    if meta.get("model", {}).get("head", "lm") != "lm":
        raise ConfigError(
            f"init_from={config.init_from!r} is a {meta.get('stage') or 'scalar-head'} "
            f"checkpoint with a {meta['model']['head']!r} head, not a language model: DPO "
            f"trains a policy, which needs the LM head; give the workdir of an sft stage")
    return source


def _trains(workdir: str, steps: int) -> bool:
    """Whether the loop will run a step: not when the workdir's latest
    checkpoint is at `steps` already (a finished run, re-run: restored as it
    is) or past it (the loop refuses it)."""
    return not checkpoint.has_checkpoint(workdir) or checkpoint.resolve(workdir)[1] < steps


def run(config, workdir: str, judge=None):
    """`judge`: the gold labeler (rlhf_jax.world.gold_score) for the implicit
    reward's gold accuracy on the held-out comparisons; None: none."""
    check_config(config)
    source = open_init(config)
    runtime = sharding.Runtime(config)
    cfg, tok, pretrained_params = resolve.stage_model(config, "lm",
                                                      source.meta if source else None)
    max_len, k_max = int(config.data.max_len), int(config.data.k_max)
    beta = float(config.algo.beta)
    resolve.check_context(cfg, max_len, "data.max_len", rope_ok=True)

    # The RM's checks: bad records name file and line (or are dropped and counted).
    check = preprocess.length_check(tok, "comparisons", max_len=max_len, k_max=k_max)
    train_src, eval_src = data_setup.open_train_eval(config, "comparisons", check)
    dropped = {"dropped": train_src.n_dropped
               + (eval_src.n_dropped if config.data.eval_path else 0)}
    if dropped["dropped"] and not checkpoint.has_checkpoint(workdir):  # once, not on resume
        writer = MetricsWriter(workdir, "dpo", progress=False)
        writer.write(0, {"dpo/dropped": dropped["dropped"]})
        writer.log(f"[dpo] dropped invalid records: {dropped['dropped']} comparisons "
                   f"{dict(train_src.drop_reasons)}")
        writer.close()
    if len(train_src) == 0:
        raise ConfigError(f"data.path={config.data.path!r} has no records")

    batch_size = int(config.train.batch_size)
    steps = rm.train_steps(config, len(train_src))
    run_config = config.copy_and_resolve_references()  # the caller's config keeps steps 0
    run_config.train.steps = steps
    # The evaluator reads the first train.eval_batches batches: only those
    # records need reference log-probs.
    n_eval = min(len(eval_src), int(config.train.eval_batches) * batch_size)
    if n_eval < len(eval_src):
        eval_src = eval_src.subset(np.arange(n_eval), f"{eval_src.name}[:{n_eval}]")
    optimizer = train_state.make_optimizer(run_config.train)
    with runtime.activations():
        state, shardings, step = train_state.compile_supervised(
            runtime, cfg, optimizer, functools.partial(train_step, beta=beta), config.seed,
            source or "", pretrained_params)
        eval_model = Transformer(cfg)
        ref_eval = None
        train_with_ref = WithRefLogps(train_src, None)
        loader = data_setup.loader(config, runtime, train_with_ref, batch_size,
                                   functools.partial(train_example, tok, k_max=k_max,
                                                     max_len=max_len))
        if _trains(workdir, steps):
            # The state's params before the loop restores a checkpoint are
            # init_from's (or the pretrained model's): the reference. Only
            # the records the run's steps read (all of them from an epoch
            # on), the same set on a resume, so resumed batches are the same.
            t0 = time.time()
            read = np.unique([i for s in range(steps) for i in loader.global_record_indices(s)])
            train_with_ref.ref_logp_NxK = reference_logps(
                runtime, eval_model, state.params, train_src, tok, k_max, max_len, batch_size,
                indices=read)
            if len(eval_src):
                ref_eval = reference_logps(runtime, eval_model, state.params, eval_src, tok,
                                           k_max, max_len, batch_size)
            if jax.process_index() == 0:
                print(f"[dpo] reference log-probs of {len(read)} + {len(eval_src)} "
                      f"comparisons in {time.time() - t0:.1f}s", flush=True)
        evaluate = None
        if len(eval_src):
            evaluate = make_evaluator(
                runtime, eval_model, WithRefLogps(eval_src, ref_eval),
                functools.partial(eval_example, tok, k_max=k_max, max_len=max_len, judge=judge),
                batch_size, beta)
        meta = dict(resolve.model_meta(cfg, resolve.tokenizer_spec(config, source.meta if source else None)),
                    init_from=config.init_from, beta=beta, k_max=k_max, train_steps=steps,
                    **dropped)
        return loop.run(loop.Loop(
            stage="dpo", train=run_config.train, workdir=workdir, state=state,
            state_shardings=shardings, step_fn=loop.supervised_step(runtime, loader, step),
            meta=meta, evaluate=evaluate,
            units_per_step=batch_size * rm.mean_ranked_pairs(train_src), units_name="pairs_per_s",
            progress_keys=("loss", "accuracy")))
