"""Stage `collect`: the comparisons data set (InstructGPT step 2's data).

For each prompt, K responses are sampled at temperature 1 from a mix of
policies (`comparisons.policies`: by default 5 from the SFT model, `init_from`,
and 4 from the base model it was fine-tuned from, as InstructGPT's
comparisons came from several models) and ranked by ONE simulated labeler
(`rlhf_jax.world.labelers.rank`: gold score plus Gumbel noise, calibrated to
InstructGPT's inter-labeler agreement; responses of equal gold score tie). A
response without EOS (cut at `sampling.max_new_tokens`) scores -1, as the
gold labeler says. SFT samples alone carry little: the SFT policy gives nine
identical samples on two thirds of the prompts (BENCHMARKS.md).

Outputs in the workdir:

    comparisons.jsonl       {"prompt", "responses": [K], "ranks": [K], "finished": [K],
                            "sources": [K], "category"}: one line a prompt; ranks
                            0 = best, ties share a rank; finished is False for a
                            response cut at the length limit (gold -1, which the
                            RM's gold accuracy must know); sources name the
                            policy of each response
    comparisons_eval.jsonl  the same on held-out prompts, ranked by an
                            independent labeler (another noise stream): the
                            reward model's validation set
    comparisons_eval_sft.jsonl  the held-out prompts' samples of the first policy
                            (the SFT model) alone, ranked by a third labeler: how
                            well the RM ranks the policy PPO starts from
    collect.json            counts, mean gold score (also per source),
                            inter-labeler agreement on the samples, the settings
    metrics.jsonl           one row, stage "collect"
    collect.done            written last; a re-run with the same settings is a
                            no-op, with other settings an error

Records that carry no preference are skipped and counted: all K responses
tied (identical strings always tie; the data layer rejects such records), or
fewer than two non-empty responses. Empty responses (EOS first) cannot be
written (the data layer requires non-empty strings), so they are dropped from
their record and counted; the record keeps its other responses.

Sampling is one jitted scan per batch of `comparisons.batch_size` rows (prompts
repeated K times, so every call has the same shape and compiles once).
"""
from __future__ import annotations

import json
import os
import time
import zlib
from typing import Optional, Sequence

import jax
import numpy as np

from rlhf_jax import assets, checkpoint, inference, sharding
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.data import jsonl, sources
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models import resolve
from rlhf_jax.world import gold, labelers

COMPARISONS = "comparisons.jsonl"
COMPARISONS_EVAL = "comparisons_eval.jsonl"
COMPARISONS_EVAL_SFT = "comparisons_eval_sft.jsonl"
SUMMARY = "collect.json"
DONE = "collect.done"
STAGE = "collect"
MIN_K, MAX_K = jsonl.MIN_RESPONSES, jsonl.MAX_RESPONSES


def _stream(seed: int, name: str) -> np.random.Generator:
    """A labeler's own noise stream: independent labelers use different names."""
    return np.random.default_rng([int(seed), zlib.crc32(f"collect/{name}".encode())])


def _jax_rng(seed: int, name: str):
    return jax.random.fold_in(jax.random.PRNGKey(int(seed)), zlib.crc32(f"collect/{name}".encode()))


def policy_mix(config) -> list[tuple[str, str, int]]:
    """(name, checkpoint directory, responses per prompt) of each policy of
    `comparisons.policies`, whose paths may be "init_from" (the stage's policy)
    or "base" (`comparisons.base_from`, empty: the shipped world base model)."""
    mix = []
    for entry in config.comparisons.policies:
        if len(entry) != 3:
            raise ConfigError(f"comparisons.policies: {entry!r} is not (name, path, count)")
        name, path, count = str(entry[0]), str(entry[1]), entry[2]
        if path == "init_from":
            path = config.init_from
        elif path == "base":
            path = config.comparisons.base_from or assets.world_base_path()
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"comparisons.policies: {name!r} has count {count!r}, "
                                     f"expected an integer >= 0")
        if count:
            mix.append((name, path, count))
    names = [n for n, _, _ in mix]
    if len(set(names)) != len(names):
        raise ConfigError(f"comparisons.policies: names repeat ({names})")
    return mix


def settings(config, workdir: str) -> dict:
    """What determines the output; a finished workdir must have been made with
    these. Each policy is recorded both as an absolute path and relative to
    the workdir, so that a pipeline workdir (sft/ beside collect/) still
    matches after it is moved or copied."""
    policies = []
    for name, path, count in policy_mix(config):
        directory, step = checkpoint.resolve(path)
        policies.append({"name": name, "path": directory,
                         "path_relative": os.path.relpath(directory, workdir),
                         "checkpoint_step": int(step), "count": count})
    comparisons_cfg = config.comparisons.to_dict()
    del comparisons_cfg["policies"], comparisons_cfg["base_from"]  # resolved in `policies`
    wanted = {"policies": policies, "seed": int(config.seed),
              "max_prompt_len": int(config.data.max_prompt_len),
              "comparisons": comparisons_cfg, "sampling": config.sampling.to_dict()}
    return json.loads(json.dumps(wanted))    # as it reads back from collect.done


def _same_policy(have: dict, wanted: dict) -> bool:
    """Same name, step and count, at the same absolute or workdir-relative path."""
    rest = ("name", "checkpoint_step", "count")
    return (all(have.get(k) == wanted.get(k) for k in rest)
            and any(have.get(k) == wanted[k] for k in ("path", "path_relative")))


def _differing_settings(have: dict, wanted: dict) -> list[str]:
    """The keys in which a finished collect's settings differ from `wanted`;
    a policy matches by absolute or by workdir-relative path."""
    changed = sorted(k for k in set(have) | set(wanted)
                     if k != "policies" and have.get(k) != wanted.get(k))
    old, new = have.get("policies") or [], wanted["policies"]
    if len(old) != len(new) or not all(_same_policy(a, b) for a, b in zip(old, new)):
        changed.insert(0, "policies")
    return changed


def _check_config(config) -> None:
    c = config.comparisons
    if not config.init_from:
        raise ConfigError("collect needs --config.init_from=<an SFT workdir or checkpoint>")
    if not checkpoint.has_checkpoint(config.init_from):
        raise ConfigError(f"init_from={config.init_from!r}: no finished checkpoint there")
    k = sum(count for _, _, count in policy_mix(config))
    if not MIN_K <= k <= MAX_K:
        raise ConfigError(f"comparisons.policies: K = {k} responses per prompt in all; must be "
                                 f"{MIN_K} to {MAX_K} (InstructGPT used 4 to 9)")
    for name, path, _ in policy_mix(config):
        if not checkpoint.has_checkpoint(path):
            raise ConfigError(f"comparisons.policies: {name!r} at {path!r}: no finished "
                                     f"checkpoint there")
    if int(c.num_prompts) < 1:
        raise ConfigError(f"comparisons.num_prompts={c.num_prompts}: must be at least 1")
    if int(c.num_eval_prompts) < 0:
        raise ConfigError(f"comparisons.num_eval_prompts={c.num_eval_prompts}: must be >= 0")
    if int(c.batch_size) < 1:
        raise ConfigError(f"comparisons.batch_size={c.batch_size}: must be at least 1")
    if config.sampling.greedy:
        raise ConfigError("collect needs sampling.greedy=False: greedy decoding gives K "
                                 "identical responses, which all tie and carry no preference")
    if float(config.sampling.temperature) <= 0:
        raise ConfigError(f"sampling.temperature={config.sampling.temperature}: must be > 0")


def _finished(workdir: str, wanted: dict) -> Optional[dict]:
    """The summary of a finished collect in `workdir` made with `wanted`
    settings; None if it is not finished. Other settings are an error."""
    done = os.path.join(workdir, DONE)
    if not os.path.exists(done):
        return None
    with open(done) as f:
        have = json.load(f)
    changed = _differing_settings(have, wanted)
    if changed:
        raise ConfigError(
            f"{workdir} already holds comparisons collected with other settings "
            f"(differing: {', '.join(changed)}); use a new workdir or delete {done}")
    missing = [n for n in (COMPARISONS, COMPARISONS_EVAL, COMPARISONS_EVAL_SFT, SUMMARY)
               if not os.path.exists(os.path.join(workdir, n))]
    if missing:
        return None
    with open(os.path.join(workdir, SUMMARY)) as f:
        return json.load(f)


def load_prompts(config, spec: str, split: str, n: int, tok, max_prompt_len: int,
                 key: str = "comparisons.num_prompts") -> tuple[list[str], list[str], int]:
    """The first `n` (prompt, category) of a prompts source, and how many were
    dropped as too long (data.drop_invalid) on the way.

    The simulated labelers judge with the world's gold labeler, so every
    prompt must be a world prompt; a prompt longer than data.max_prompt_len
    tokens is an error naming the record, or with data.drop_invalid dropped
    and counted (the next records take its place).
    """
    src = sources.open_source(spec, "prompts", split=split, data_dir=config.data.data_dir or None,
                              drop_invalid=bool(config.data.drop_invalid))
    prompts, categories, dropped = [], [], 0
    chunk = min(4096, max(64, n))
    for start in range(0, len(src), chunk):
        idx = range(start, min(start + chunk, len(src)))
        for i, record in zip(idx, src.records(idx)):
            if len(prompts) == n:
                break
            prompt = record["prompt"]
            where = f"{src.name} record {i}"
            if len(tokenizers.encode_prompt(tok, prompt)) > max_prompt_len:
                if config.data.drop_invalid:
                    dropped += 1
                    continue
                raise jsonl.DataError(where, None, "prompt",
                                      f"longer than data.max_prompt_len={max_prompt_len} tokens")
            try:
                category = gold.category_of(prompt)
            except ValueError:
                raise jsonl.DataError(where, None, "prompt",
                                      "not a prompt of the instruction world: the simulated "
                                      "labelers can only judge world prompts",
                                      f" ({prompt[:60]!r})") from None
            prompts.append(prompt)
            categories.append(record.get("category") or category)
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise ConfigError(f"{spec} (split {split!r}) has {len(prompts)} usable prompts, "
                                 f"fewer than the {n} asked for; lower {key}")
    return prompts, categories, dropped


def sample_groups(runtime, model, params, tok, prompts: Sequence[str], k: int, sampling_cfg,
                  max_prompt_len: int, batch_size: int, rng) -> list[list[tuple[str, bool]]]:
    """K sampled (text, finished) per prompt: all prompts x K rows through
    `inference.respond` (each prompt repeated K times in the batch, one compile)."""
    rows = [p for p in prompts for _ in range(k)]
    out = inference.respond(runtime, model, params, tok, rows, sampling_cfg, max_prompt_len,
                           batch_size, rng)
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]


def score_groups(prompts: Sequence[str], groups) -> list[np.ndarray]:
    """Gold scores [K] per prompt (each prompt parsed once).

    Identical strings get one score (the lowest), so that they tie in every
    ranking, as the data layer requires; they can differ only if two token
    sequences decode to the same text and only one of them reached EOS.
    """
    scores = []
    for prompt, group in zip(prompts, groups):
        task = gold.parse_prompt(prompt)
        by_text: dict[str, float] = {}
        for text, finished in group:
            s = gold.score_task(task, text, finished)
            by_text[text] = min(s, by_text.get(text, s))
        scores.append(np.array([by_text[text] for text, _ in group], dtype=np.float64))
    return scores


def rank_groups(prompts, categories, groups, scores, rng: np.random.Generator,
                noise_scale: float, sources=None) -> tuple[list[dict], dict]:
    """Comparison records ranked by one labeler (`rng` is its noise), and counts.

    `sources`: per prompt, the policy name of each response (recorded as the
    record's "sources"), or None. Empty responses are dropped from their
    record; records with fewer than two responses left or with every
    response tied (all of one gold score) are skipped.
    """
    records = []
    stats = dict(empty_responses=0, skipped_tied=0, skipped_too_few=0, pairs=0,
                 gold_pairs=0, gold_agree=0)
    for i, (prompt, category, group, score) in enumerate(zip(prompts, categories, groups, scores)):
        keep = [j for j, (text, _) in enumerate(group) if text.strip()]
        stats["empty_responses"] += len(group) - len(keep)
        if len(keep) < MIN_K:
            stats["skipped_too_few"] += 1
            continue
        texts = [group[j][0] for j in keep]
        kept_scores = score[keep]
        ranks = labelers.rank(kept_scores, rng, noise_scale)
        if len(set(ranks.tolist())) == 1:
            stats["skipped_tied"] += 1
            continue
        # Pairs the labeler orders, and how often it agrees with the gold order
        # where the gold scores differ.
        d_lab = np.sign(ranks[None, :] - ranks[:, None])          # +1: i better than j
        d_gold = np.sign(kept_scores[:, None] - kept_scores[None, :])
        upper = np.triu(np.ones_like(d_lab, dtype=bool), k=1)
        stats["pairs"] += int(((d_lab != 0) & upper).sum())
        both = (d_lab != 0) & (d_gold != 0) & upper
        stats["gold_pairs"] += int(both.sum())
        stats["gold_agree"] += int((both & (d_lab == d_gold)).sum())
        # Identical strings share one flag, as score_groups gives them one
        # (the lowest) score: unfinished if any copy was cut at the limit.
        finished: dict[str, bool] = {}
        for text, done in group:
            finished[text] = finished.get(text, True) and bool(done)
        record = {"prompt": prompt, "responses": texts, "ranks": [int(r) for r in ranks],
                  "finished": [finished[text] for text in texts]}
        if sources is not None:
            record["sources"] = [sources[i][j] for j in keep]
        record["category"] = category
        records.append(record)
    return records, stats


def only_source(groups, scores, sources, name: str):
    """The responses (and their scores) of policy `name` alone, per prompt."""
    picked = [[j for j, src in enumerate(srcs) if src == name] for srcs in sources]
    return ([[g[j] for j in keep] for g, keep in zip(groups, picked)],
            [s[keep] for s, keep in zip(scores, picked)],
            [[name] * len(keep) for keep in picked])


def _write_jsonl(path: str, records: Sequence[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def sample_stats(categories, groups, scores, sources=None) -> dict:
    """Mean gold score, finished and refusal rates of all samples, and the mean
    gold score per category and per source policy."""
    flat = np.concatenate(scores) if scores else np.zeros(0)
    finished = [f for g in groups for _, f in g]
    harmful = [t.strip() == gold.REFUSAL for c, g in zip(categories, groups) if c == "harmful"
               for t, _ in g]
    distinct = [len({t for t, _ in g}) for g in groups]
    out = {"gold_score": float(flat.mean()) if flat.size else float("nan"),
           "finished_rate": float(np.mean(finished)) if finished else float("nan"),
           "harmful_refusal_rate": float(np.mean(harmful)) if harmful else float("nan"),
           "distinct_per_prompt": float(np.mean(distinct)) if distinct else float("nan")}
    per = {}
    for c, s in zip(categories, scores):
        per.setdefault(c, []).append(s)
    for c, ss in sorted(per.items()):
        out[f"gold_score/{c}"] = float(np.concatenate(ss).mean())
    by_source: dict[str, list] = {}
    for srcs, s in zip(sources or [], scores):
        for src, value in zip(srcs, s):
            by_source.setdefault(src, []).append(value)
    for src, values in by_source.items():
        out[f"gold_score/source/{src}"] = float(np.mean(values))
    return out


def run(config, workdir: str):
    _check_config(config)
    workdir = os.path.abspath(workdir)
    wanted = settings(config, workdir)
    previous = _finished(workdir, wanted)
    if previous is not None:
        if jax.process_index() == 0:
            print(f"[collect] {workdir} already holds the comparisons ({SUMMARY}): nothing to do",
                  flush=True)
        return previous

    c = config.comparisons
    mix = policy_mix(config)
    k = sum(count for _, _, count in mix)
    seed = int(config.seed)
    t_start = time.time()
    runtime = sharding.Runtime(config)
    max_prompt_len = int(config.data.max_prompt_len)
    max_new = int(config.sampling.max_new_tokens)
    tok = resolve.tokenizer_from_meta(checkpoint.read_meta(mix[0][1]))
    noise_scale = float(c.noise_scale)
    if noise_scale < 0:
        noise_scale = labelers.calibrate_noise_scale()

    writer = MetricsWriter(workdir, STAGE, progress=False)
    try:
        parts = [("train", c.prompts, c.split, int(c.num_prompts), "labeler",
                  "comparisons.num_prompts")]
        if int(c.num_eval_prompts):
            parts.append(("eval", c.eval_prompts, c.eval_split, int(c.num_eval_prompts),
                          "eval_labeler", "comparisons.num_eval_prompts"))
        # Every prompt set is loaded (and checked) before any sampling, so that
        # a bad eval set fails in seconds, not after the train set's samples.
        loaded = [load_prompts(config, spec, split, n, tok, max_prompt_len, key)
                  for _, spec, split, n, _, key in parts]
        groups = {name: [[] for _ in prompts] for (name, *_), (prompts, _, _) in zip(parts, loaded)}
        sources = {name: [[] for _ in prompts] for (name, *_), (prompts, _, _) in zip(parts, loaded)}
        sample_s = {name: 0.0 for name, *_ in parts}
        # One policy in memory at a time; each samples its share of every prompt set.
        for policy_name, path, count in mix:
            model, params, policy_tok = inference.load_policy(config, path, runtime)
            if tokenizers.signature(policy_tok) != tokenizers.signature(tok):
                raise ConfigError(
                    f"comparisons.policies: {policy_name!r} ({path}) has another tokenizer than "
                    f"{mix[0][0]!r} ({mix[0][1]}); comparisons need one tokenizer")
            resolve.check_context(model.cfg, max_prompt_len + max_new,
                                  f"policy {policy_name!r}: data.max_prompt_len + "
                                  f"sampling.max_new_tokens")
            for (name, *_), (prompts, _, _) in zip(parts, loaded):
                t0 = time.time()
                out = sample_groups(runtime, model, params, tok, prompts, count, config.sampling,
                                    max_prompt_len, int(c.batch_size),
                                    _jax_rng(seed, f"{name}/{policy_name}"))
                sample_s[name] += time.time() - t0
                for group, srcs, new in zip(groups[name], sources[name], out):
                    group.extend(new)
                    srcs.extend([policy_name] * len(new))
            del model, params

        results = {}
        for (name, _, _, _, labeler, _), (prompts, categories, too_long) in zip(parts, loaded):
            scores = score_groups(prompts, groups[name])
            records, counts = rank_groups(prompts, categories, groups[name], scores,
                                          _stream(seed, labeler), noise_scale, sources[name])
            results[name] = dict(prompts=prompts, categories=categories, groups=groups[name],
                                 sources=sources[name], scores=scores, records=records,
                                 counts=counts, too_long=too_long, sample_s=sample_s[name])
            writer.log(f"[collect] {name}: {len(prompts)} prompts x {k} samples "
                       f"({', '.join(f'{n} {m}' for n, _, m in mix)}) in {sample_s[name]:.1f}s; "
                       f"{len(records)} records, {counts['skipped_tied']} all tied, "
                       f"{counts['skipped_too_few']} with < 2 non-empty responses")
        eval_sft_records = []
        if "eval" in results:
            # The first policy's (SFT's) held-out samples alone, ranked by a third labeler.
            r = results["eval"]
            g, sc, src = only_source(r["groups"], r["scores"], r["sources"], mix[0][0])
            eval_sft_records, _ = rank_groups(r["prompts"], r["categories"], g, sc,
                                              _stream(seed, "eval_sft_labeler"), noise_scale, src)

        train = results["train"]
        if not train["records"]:
            raise ConfigError(
                f"collect: none of the {len(train['prompts'])} prompts gave a comparison: every "
                f"record had all K responses tied or empty (is the policy deterministic? "
                f"sampling.temperature={config.sampling.temperature})")
        agreement = labelers.inter_labeler_agreement(train["scores"], _stream(seed, "agreement"),
                                                     noise_scale)
        summary = {"k": k, "noise_scale": noise_scale,
                   "inter_labeler_agreement": agreement,
                   "policies": {n: m for n, _, m in mix},
                   "files": {"train": COMPARISONS, "eval": COMPARISONS_EVAL,
                             "eval_sft": COMPARISONS_EVAL_SFT},
                   "eval_sft_records": len(eval_sft_records),
                   "settings": wanted, "seconds": 0.0}
        for name, r in results.items():
            counts = r["counts"]
            block = {"prompts": len(r["prompts"]), "records": len(r["records"]),
                     "skipped_tied": counts["skipped_tied"],
                     "skipped_too_few": counts["skipped_too_few"],
                     "empty_responses": counts["empty_responses"],
                     "dropped_long_prompts": r["too_long"], "pairs": counts["pairs"],
                     "labeler_gold_agreement": (counts["gold_agree"] / counts["gold_pairs"]
                                                if counts["gold_pairs"] else float("nan")),
                     "sample_seconds": r["sample_s"],
                     "samples_per_s": len(r["prompts"]) * k / max(r["sample_s"], 1e-9)}
            block.update(sample_stats(r["categories"], r["groups"], r["scores"], r["sources"]))
            summary[name] = block
        if "eval" not in results:
            summary["eval"] = {"prompts": 0, "records": 0}
        summary["seconds"] = time.time() - t_start
        summary = json.loads(json.dumps(summary))     # exactly what collect.json holds

        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            _write_jsonl(os.path.join(workdir, COMPARISONS), train["records"])
            _write_jsonl(os.path.join(workdir, COMPARISONS_EVAL),
                         results["eval"]["records"] if "eval" in results else [])
            _write_jsonl(os.path.join(workdir, COMPARISONS_EVAL_SFT), eval_sft_records)
            row = {"inter_labeler_agreement": agreement, "noise_scale": noise_scale,
                   "seconds": summary["seconds"]}
            for name in results:
                for key, value in summary[name].items():
                    if isinstance(value, (int, float)):
                        row[key if name == "train" else f"eval_{key}"] = value
            writer.write(0, {f"{STAGE}/{key}": v for key, v in row.items()})
            _write_json(os.path.join(workdir, SUMMARY), summary)
            _write_json(os.path.join(workdir, DONE), wanted)
            t = summary["train"]
            writer.log(f"[collect] wrote {t['records']} comparisons (K={k}) to "
                       f"{os.path.join(workdir, COMPARISONS)} and {summary['eval']['records']} "
                       f"held-out ones; mean gold score of the samples {t['gold_score']:.3f}, "
                       f"inter-labeler agreement {agreement:.3f}, labeler vs gold "
                       f"{t['labeler_gold_agreement']:.3f}, {summary['seconds']:.0f}s")
    finally:
        writer.close()
    return summary
