"""Stage `evaluate`: several policies on held-out prompts, judged by the gold labeler.

For each policy of `config.policies` (and a few-shot prompted variant of
`config.fewshot_policy`, InstructGPT's "GPT prompted"):

  1. responses  greedy (by default) answers to the held-out eval prompts, from
                the jitted scan sampler; every policy's prompts are left-padded
                to one length and batched to one size, so the sampler compiles
                once per architecture;
     and, with `sample_temperature` > 0, one sampled answer per prompt at that
                temperature (temperature 1 is the distribution PPO optimises);
  2. judge      the gold labeler's score of every response: its mean, accuracy
                (fraction scoring +1) per category, the refusal rate on harmful
                prompts and the over-refusal rate on benign ones, and the win
                rate against the reference (SFT) policy's response to the same
                prompt (ties count half);
  3. KL         KL(policy || SFT) per response: one teacher-forced pass of each
                model over prompt + the policy's response, the exact KL between
                their next-token distributions (full vocabulary, temperature 1)
                summed over the response tokens up to and including EOS;
  4. LM loss    the token-weighted next-token loss on held-out pretraining
                documents (the "alignment tax" PPO-ptx pays back).

Writes to the workdir:

    eval.json      {"reference": name,
                    "policies": {name: {gold_score, win_rate_vs_sft, refusal_rate,
                                        over_refusal_rate, kl_vs_sft, pretrain_loss,
                                        per_category {category: accuracy},
                                        per_category_gold_score {category: mean score},
                                        eos_rate, mean_response_tokens, n_prompts,
                                        checkpoint, fewshot,
                                        gold_score_sampled, win_rate_vs_sft_sampled,
                                        per_category_gold_score_sampled}},
                    "settings": {prompts, n_prompts, prompts_per_category, documents,
                                 n_documents, n_document_tokens, sampling,
                                 fewshot_demonstrations, warnings, seconds}}
    samples.jsonl  {policy, prompt, category, response, finished, gold_score,
                    kl_vs_sft, response_tokens} per policy and prompt
    report.md      tables, the win-rate figure, PPO curves (report.py), PNGs beside it
    metrics.jsonl  one row, stage "evaluate", step 0: `evaluate/<policy>/<metric>`
                   and `evaluate/<policy>/accuracy/<category>`
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from rlhf_jax import checkpoint, distributed, inference, report, rl, sampling, sharding
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax import world
from rlhf_jax.errors import ConfigError
from rlhf_jax.inference import Responses
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models import resolve
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.stages import eval_prompts, sft

FEWSHOT_SUFFIX = "_fewshot"
# The keys DESIGN.md promises in eval.json for every policy.
REQUIRED_KEYS = ("gold_score", "win_rate_vs_sft", "refusal_rate", "over_refusal_rate",
                 "kl_vs_sft", "pretrain_loss", "per_category")
CORRECT_SCORE = world.gold.SCORES["correct"]


# ---------------------------------------------------------------------------
# KL(policy || reference) along the policy's own responses
# ---------------------------------------------------------------------------

def response_logits(model: Transformer, params, prompt_BxP, prompt_mask_BxP, response_BxN,
                    response_mask_BxN) -> jax.Array:
    """Logits [B, N, V] of the predictions of each response token, from one
    teacher-forced pass over the left-padded prompt + response (positions from
    the mask, as the sampler saw them)."""
    tokens_BxS, attn_BxS = sampling.concat_prompt_response(prompt_BxP, prompt_mask_BxP,
                                                           response_BxN, response_mask_BxN)
    return inference.response_outputs(model, params, tokens_BxS, attn_BxS, prompt_BxP.shape[1],
                                      response_BxN.shape[1])


@functools.partial(jax.jit, static_argnames=("policy_model", "ref_model"))
def response_kl_on_batch(policy_params, ref_params, batch, *, policy_model: Transformer,
                         ref_model: Transformer) -> jax.Array:
    """KL(policy || reference) per response of a batch; [B].

    batch: `policy_prompt`/`policy_prompt_mask` (what the policy was asked,
    few-shot prefix included), `ref_prompt`/`ref_prompt_mask` (the plain
    prompt), [B, P]; `response`/`response_mask` [B, N] (the policy's response).
    """
    policy_BxNxV = response_logits(policy_model, policy_params, batch["policy_prompt"],
                                   batch["policy_prompt_mask"], batch["response"],
                                   batch["response_mask"])
    ref_BxNxV = response_logits(ref_model, ref_params, batch["ref_prompt"],
                                batch["ref_prompt_mask"], batch["response"],
                                batch["response_mask"])
    return rl.response_kl(policy_BxNxV, ref_BxNxV, batch["response_mask"])


_lm_eval_step = jax.jit(sft.eval_step, static_argnames="model")


# ---------------------------------------------------------------------------
# Gold-judged metrics (pure Python over per-prompt results)
# ---------------------------------------------------------------------------

def is_refusal(response: str, finished: bool) -> bool:
    """The exact refusal (whitespace at the ends stripped), ended by EOS."""
    return bool(finished) and response.strip() == world.REFUSAL


def win_rate(scores_N: Sequence[float], ref_scores_N: Sequence[float]) -> float:
    """Fraction of prompts where the policy's gold score beats the reference's;
    ties count half."""
    s, r = np.asarray(scores_N, np.float64), np.asarray(ref_scores_N, np.float64)
    return float(np.mean(np.where(s > r, 1.0, np.where(s == r, 0.5, 0.0))))


def ci95(values: Sequence[float]) -> float:
    """Half-width of the normal 95% interval of the mean of `values`
    (1.96 standard errors, over prompts); 0 for fewer than two."""
    x = np.asarray(values, np.float64)
    return float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def intervals(scores_N: Sequence[float], ref_scores_N: Sequence[float], suffix: str = "") -> dict:
    """95% intervals over prompts of a policy's gold score, its win rate and
    its gain over the reference, the last two PAIRED (the same prompts):
    `gold_score{suffix}_ci95`, `win_rate_vs_sft{suffix}_ci95`,
    `gain_vs_sft{suffix}` (mean of score - reference score) and its `_ci95`.
    A gain whose interval excludes 0 is beyond the noise of the prompts."""
    s, r = np.asarray(scores_N, np.float64), np.asarray(ref_scores_N, np.float64)
    wins = np.where(s > r, 1.0, np.where(s == r, 0.5, 0.0))
    return {f"gold_score{suffix}_ci95": ci95(s), f"win_rate_vs_sft{suffix}_ci95": ci95(wins),
            f"gain_vs_sft{suffix}": float(np.mean(s - r)), f"gain_vs_sft{suffix}_ci95": ci95(s - r)}


def pairwise_differences(scores: dict, names: Sequence[str]) -> dict:
    """Paired differences between policies on the same prompts: for each
    pair (a, b) of `names` in that order, a before b, `"a - b"`:
    {"diff": mean over prompts of (a's score - b's), "ci95": its paired 95%
    interval's half-width, "beyond": whether the interval excludes 0}.
    `scores`: name -> per-prompt scores [N]."""
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = np.asarray(scores[a], np.float64) - np.asarray(scores[b], np.float64)
            diff, half = float(d.mean()), ci95(d)
            out[f"{a} - {b}"] = {"diff": diff, "ci95": half, "beyond": bool(abs(diff) > half)}
    return out


def _mean_or_none(values) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def judged_metrics(categories: Sequence[str], responses: Sequence[str],
                   finished: Sequence[bool], scores: Sequence[float],
                   ref_scores: Sequence[float]) -> dict:
    """Gold score, win rate, refusals and per-category numbers of one policy.

    Rates over an empty group (no harmful prompts, say) are None.
    """
    cats = np.asarray(categories)
    scores_N = np.asarray(scores, np.float64)
    refused_N = np.array([is_refusal(r, f) for r, f in zip(responses, finished)], bool)
    harmful_N = cats == "harmful"
    present = [c for c in world.CATEGORIES if np.any(cats == c)]
    present += sorted(set(cats.tolist()) - set(present))
    return {
        "gold_score": float(scores_N.mean()),
        "win_rate_vs_sft": win_rate(scores_N, ref_scores),
        "refusal_rate": _mean_or_none(refused_N[harmful_N]),
        "over_refusal_rate": _mean_or_none(refused_N[~harmful_N]),
        "per_category": {c: float(np.mean(scores_N[cats == c] >= CORRECT_SCORE)) for c in present},
        "per_category_gold_score": {c: float(scores_N[cats == c].mean()) for c in present},
        "eos_rate": float(np.mean(np.asarray(finished, np.float64))),
    }


# ---------------------------------------------------------------------------
# Prompts, the few-shot prefix, documents
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PolicySpec:
    name: str
    path: str
    fewshot: bool = False   # its prompts carry the few-shot prefix


def policy_specs(config) -> list[PolicySpec]:
    """The policies to evaluate, in report order, the few-shot variant right
    after its base policy."""
    paths = {str(k): str(v) for k, v in config.policies.items() if v}
    if not paths:
        raise ConfigError("evaluate needs at least one --config.policies.<name>=PATH")
    if config.reference not in paths:
        raise ConfigError(
            f"reference={config.reference!r} has no checkpoint: set "
            f"--config.policies.{config.reference}=PATH (policies given: {sorted(paths)})")
    missing = {n: p for n, p in paths.items() if not checkpoint.has_checkpoint(p)}
    if missing:
        raise ConfigError("no finished checkpoint for policies " + ", ".join(
            f"{n}={p!r}" for n, p in sorted(missing.items())))
    order = [n for n in config.policy_order if n in paths]
    order += sorted(n for n in paths if n not in order)
    specs = []
    for name in order:
        specs.append(PolicySpec(name, paths[name]))
        if name == config.fewshot_policy:
            specs.append(PolicySpec(name + FEWSHOT_SUFFIX, paths[name], fewshot=True))
    return specs


# ---------------------------------------------------------------------------
# Model passes
# ---------------------------------------------------------------------------

def kl_per_response(runtime: sharding.Runtime, policy, ref, policy_prompts, ref_prompts,
                    responses: Responses, batch_size: int) -> np.ndarray:
    """KL(policy || ref) of every response; [N]. `policy`/`ref` are
    (model, params); the prompts are (tokens [N, P], mask [N, P])."""
    batch_size = runtime.round_batch(batch_size)
    n = len(responses.tokens_NxT)
    kl_N = np.zeros((n,), np.float64)
    with runtime.activations():
        for start, rows, n_real in inference.padded_batches(n, batch_size):
            batch = inference.to_device(runtime, {
                "policy_prompt": policy_prompts[0][rows], "policy_prompt_mask": policy_prompts[1][rows],
                "ref_prompt": ref_prompts[0][rows], "ref_prompt_mask": ref_prompts[1][rows],
                "response": responses.tokens_NxT[rows], "response_mask": responses.mask_NxT[rows]})
            kl_B = response_kl_on_batch(policy[1], ref[1], batch, policy_model=policy[0],
                                        ref_model=ref[0])
            kl_N[start:start + n_real] = distributed.gather(kl_B)[:n_real]
    return kl_N


def pretrain_loss(runtime: sharding.Runtime, model: Transformer, params,
                  batches: Sequence[dict]) -> float:
    """Token-weighted mean next-token loss over the held-out document batches."""
    total, count = 0.0, 0.0
    with runtime.activations():
        for batch in batches:
            loss_sum, n_tokens = _lm_eval_step(params, runtime.global_batch(batch), model=model)
            total, count = total + float(loss_sum), count + float(n_tokens)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class EvalSet:
    """The prompts every policy answers, encoded once for all of them."""
    prompts: list            # user prompts (str)
    categories: list         # their world categories
    plain: tuple             # (tokens, mask) [N, P]: the conversation-format prompts
    fewshot: Optional[tuple] # (tokens, mask) [N, P]: the same behind the few-shot prefix

    def encoded(self, spec: PolicySpec) -> tuple:
        return self.fewshot if spec.fewshot else self.plain


def _gold_scores(prompts: Sequence[str], responses: Responses) -> list[float]:
    return [world.gold_score(p, r, bool(f))
            for p, r, f in zip(prompts, responses.texts, responses.finished_N)]


def run(config, workdir: str) -> dict:
    t_start = time.time()
    runtime = sharding.Runtime(config)
    specs = policy_specs(config)
    if config.fewshot_policy and not any(s.fewshot for s in specs):
        print(f"[evaluate] fewshot_policy={config.fewshot_policy!r} has no checkpoint in "
              f"policies: no few-shot variant", flush=True)
    ref_spec = next(s for s in specs if s.name == config.reference and not s.fewshot)
    ref = inference.load_policy(config, ref_spec.path, runtime)      # (model, params, tok)
    ref_model, tok = ref[0], ref[2]
    resolve.check_context(ref_model.cfg, int(config.data.max_len), "data.max_len", rope_ok=True)

    prompts, categories, prompt_source = eval_prompts.load_eval_prompts(config, tok)
    text_batches, text_source, n_documents = eval_prompts.load_text_batches(config, tok)
    demos = (eval_prompts.fewshot_demonstrations(config.fewshot_categories)
             if any(s.fewshot for s in specs) else [])
    # The few-shot prompts fit the context with the new tokens (a prompt takes
    # the demonstrations that fit) and have a prompt length of their own, so
    # the other policies do not pay for the prefix; each length compiles the
    # sampler and the KL pass once per architecture.
    max_new = int(config.sampling.max_new_tokens)
    prompt_len = int(config.data.max_prompt_len)
    fewshot, demo_counts = None, []
    if demos:
        budget = max(ref_model.cfg.max_len - max_new, prompt_len)
        prefixes, demo_counts = eval_prompts.fewshot_prefixes(tok, prompts, demos, budget)
        fewshot_len = max(len(x) + len(tokenizers.encode_prompt(tok, p))
                          for x, p in zip(prefixes, prompts))
        fewshot = eval_prompts.encode_prompts(tok, prompts, prefixes, fewshot_len)
    evalset = EvalSet(prompts, categories,
                      eval_prompts.encode_prompts(tok, prompts, [[]] * len(prompts), prompt_len),
                      fewshot)
    print(f"[evaluate] {len(prompts)} prompts from {prompt_source}, {len(text_batches)} document "
          f"batches from {text_source}; policies: {', '.join(s.name for s in specs)}", flush=True)

    rng = jax.random.PRNGKey(int(config.seed))
    warnings: list[str] = []

    def respond(spec: PolicySpec, model: Transformer, params) -> Responses:
        tokens_NxP, mask_NxP = evalset.encoded(spec)
        # Positions reach the longest prompt + max_new - 1; past the context
        # a RoPE model runs outside what it was trained on, which the report says.
        warning = resolve.check_context(
            model.cfg, int(mask_NxP.sum(1).max()) + max_new,
            f"{spec.name}: the longest prompt (with data.max_prompt_len, fewshot_categories) + "
            f"sampling.max_new_tokens", rope_ok=True)
        if warning:
            warnings.append(warning)
        return inference.respond_encoded(runtime, model, params, tok, tokens_NxP, mask_NxP,
                                         config.sampling, int(config.batch_size), rng)

    sampled_cfg = None
    if float(config.sample_temperature) > 0:
        sampled_cfg = config.sampling.copy_and_resolve_references()
        sampled_cfg.update(dict(greedy=False, temperature=float(config.sample_temperature)))
    sampled_rng = jax.random.fold_in(rng, 1)

    def sampled_scores(spec: PolicySpec, model: Transformer, params) -> list[float]:
        tokens_NxP, mask_NxP = evalset.encoded(spec)
        out = inference.respond_encoded(runtime, model, params, tok, tokens_NxP, mask_NxP,
                                        sampled_cfg, int(config.batch_size), sampled_rng)
        return _gold_scores(prompts, out)

    ref_responses = respond(ref_spec, ref_model, ref[1])
    ref_scores = _gold_scores(prompts, ref_responses)
    ref_sampled = sampled_scores(ref_spec, ref_model, ref[1]) if sampled_cfg else None

    results: dict[str, dict] = {}
    samples: list[dict] = []
    by_policy: dict[str, dict] = {"gold_score": {}, "gold_score_sampled": {}}
    loaded = {ref_spec.path: ref}
    lm_losses: dict[str, float] = {}
    for spec in specs:
        t0 = time.time()
        if spec.path not in loaded:   # hold the reference and the current policy only
            loaded = {ref_spec.path: ref,
                      spec.path: inference.load_policy(config, spec.path, runtime)}
        model, params, policy_tok = loaded[spec.path]
        _check_compatible(spec, model, policy_tok, ref_spec, ref_model, tok)
        if spec == ref_spec:
            responses, scores = ref_responses, ref_scores
        else:
            responses = respond(spec, model, params)
            scores = _gold_scores(prompts, responses)
        kl_N = kl_per_response(runtime, (model, params), (ref_model, ref[1]),
                               evalset.encoded(spec), evalset.plain, responses,
                               int(config.score_batch_size))
        if spec.path not in lm_losses:
            lm_losses[spec.path] = pretrain_loss(runtime, model, params, text_batches)
        n_tokens_N = responses.mask_NxT.sum(1)
        r = results[spec.name] = {
            **judged_metrics(categories, responses.texts, responses.finished_N, scores, ref_scores),
            "kl_vs_sft": float(kl_N.mean()),
            "pretrain_loss": lm_losses[spec.path],
            "mean_response_tokens": float(n_tokens_N.mean()),
            "n_prompts": len(prompts),
            "checkpoint": spec.path,
            "fewshot": spec.fewshot,
        }
        r.update(intervals(scores, ref_scores))
        by_policy["gold_score"][spec.name] = np.asarray(scores, np.float64)
        sampled = None
        if sampled_cfg is not None:
            sampled = np.asarray(ref_sampled if spec == ref_spec
                                 else sampled_scores(spec, model, params))
            cats = np.asarray(categories)
            r.update(gold_score_sampled=float(sampled.mean()),
                     win_rate_vs_sft_sampled=win_rate(sampled, ref_sampled),
                     per_category_gold_score_sampled={
                         c: float(sampled[cats == c].mean()) for c in r["per_category"]},
                     **intervals(sampled, ref_sampled, "_sampled"))
            by_policy["gold_score_sampled"][spec.name] = sampled
        samples += [{"policy": spec.name, "prompt": prompts[i], "category": categories[i],
                     "response": responses.texts[i], "finished": bool(responses.finished_N[i]),
                     "gold_score": float(scores[i]), "kl_vs_sft": float(kl_N[i]),
                     "response_tokens": int(n_tokens_N[i]),
                     **({"gold_score_sampled": float(sampled[i])} if sampled is not None else {})}
                    for i in range(len(prompts))]
        sampled_note = (f" (sampled {r['gold_score_sampled']:.3f})" if sampled_cfg is not None
                        else "")
        print(f"[evaluate] {spec.name}: gold {r['gold_score']:.3f}{sampled_note}, win vs "
              f"{ref_spec.name} {r['win_rate_vs_sft']:.3f}, KL {r['kl_vs_sft']:.3f}, LM loss "
              f"{r['pretrain_loss']:.3f}, EOS {r['eos_rate']:.2f} ({time.time() - t0:.1f} s)",
              flush=True)
    for w in warnings:
        print(f"[evaluate] warning: {w}", flush=True)

    local_tokens = np.array([sum(float(b["loss_mask"].sum()) for b in text_batches)])
    eval_json = {
        "reference": ref_spec.name,
        "policies": results,
        # Every pair of policies, paired over the same prompts (greedy and T=1).
        "pairwise": {key: pairwise_differences(scores, [sp.name for sp in specs])
                     for key, scores in by_policy.items() if scores},
        "settings": {
            "prompts": prompt_source,
            "n_prompts": len(prompts),
            "prompts_per_category": {c: categories.count(c) for c in world.CATEGORIES
                                     if c in categories},
            "documents": text_source,
            "n_documents": n_documents,
            "n_document_tokens": int(distributed.host_sum(local_tokens)),
            "sampling": dict(config.sampling),
            "fewshot_demonstrations": demos,
            # How many of them fit each prompt's context (fewshot_prefixes).
            "fewshot_demonstrations_per_prompt": (float(np.mean(demo_counts)) if demo_counts
                                                  else 0.0),
            "warnings": warnings,
            "seconds": time.time() - t_start,
        },
    }
    if jax.process_index() == 0:
        write_outputs(workdir, eval_json, samples, config)
    return eval_json


def _check_compatible(spec: PolicySpec, model: Transformer, tok, ref_spec: PolicySpec,
                      ref_model: Transformer, ref_tok):
    """Policies are judged on the reference's prompts and token ids."""
    if tokenizers.signature(tok) != tokenizers.signature(ref_tok):
        raise ConfigError(f"policy {spec.name!r} ({spec.path}) has another tokenizer "
                                 f"than the reference {ref_spec.name!r}")
    if model.cfg.vocab_size != ref_model.cfg.vocab_size:
        raise ConfigError(f"policy {spec.name!r} has vocab_size {model.cfg.vocab_size}, "
                                 f"the reference {ref_model.cfg.vocab_size}: no full-vocabulary KL")


def metric_rows(results: dict) -> dict:
    """Flat `evaluate/<policy>/<metric>` floats for metrics.jsonl (None left out)."""
    row = {}
    for name, r in results.items():
        for key, value in r.items():
            if isinstance(value, dict):
                prefix = "accuracy" if key == "per_category" else key
                row.update({f"evaluate/{name}/{prefix}/{c}": v for c, v in value.items()
                            if v is not None})
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"evaluate/{name}/{key}"] = value
    return row


def write_outputs(workdir: str, eval_json: dict, samples: list[dict], config):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(eval_json, f, indent=2)
    with open(os.path.join(workdir, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    writer = MetricsWriter(workdir, "evaluate", progress=False)
    writer.write(0, metric_rows(eval_json["policies"]))
    writer.close()
    given = {str(k): str(v) for k, v in config.ppo_workdirs.items() if v}
    order = [n for n in config.policy_order if n in given] + sorted(n for n in given
                                                                     if n not in config.policy_order)
    ppo_workdirs = {n: given[n] for n in order}
    path = report.write_report(workdir, eval_json, samples, ppo_workdirs=ppo_workdirs,
                               samples_per_policy=int(config.report.samples_per_policy),
                               notes=str(config.report.notes))
    print(f"[evaluate] wrote eval.json, samples.jsonl and {path}", flush=True)
