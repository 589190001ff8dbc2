"""Simulated labelers (WORLD.md, "Simulated labelers").

A labeler ranks the K responses of a prompt by utility = gold score + Gumbel
noise, one independent draw per labeler and per distinct gold score: responses
of equal gold score tie (a labeler marks equally good answers as equal, as
InstructGPT's interface allowed), so every pair a labeler orders carries a
real difference. With Gumbel noise the preference between two responses whose
gold scores differ by d is exactly Bradley-Terry, P(prefer the better) =
sigmoid(d / scale), which is the model the reward model's pairwise loss
assumes: the RM can in principle recover the gold ordering, and the noise
sets how hard that is.

The scale is not a tuned constant: `calibrate_noise_scale` computes, from
samples of the pretraining corpus's mixture, the scale at which two
independent labelers agree on 73% of the pairs they both order (InstructGPT:
72.6 +- 1.5% inter-labeler agreement, ties excluded as in the paper), that is
on pairs of responses with different gold scores.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from rlhf_jax.world.datasets import corpus_response
from rlhf_jax.world.gold import score_task
from rlhf_jax.world.tasks import CATEGORIES, sample_task

TARGET_AGREEMENT = 0.73
# Pairs of corpus responses used for calibration: the estimate's standard
# error is about 0.2% of agreement, and the whole calibration takes ~1 s.
N_CALIBRATION_PAIRS = 16_000


def rank(scores: Sequence[float], rng: np.random.Generator, noise_scale: float) -> np.ndarray:
    """One labeler's ranking of K responses: int32 ranks, 0 = best.

    utility_i = scores_i + noise_scale * Gumbel_g(i), with one draw per
    distinct gold score g, and rank_i is the number of responses with a
    strictly higher utility. Responses of equal gold score (identical strings
    among them) therefore share a rank: a tie, which gives no training pair.
    With noise_scale = 0 the labeler is the gold labeler.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D [K], got shape {scores.shape}")
    levels, level_of = np.unique(scores, return_inverse=True)
    noise = rng.gumbel(size=len(levels))[level_of]
    utility = scores + noise_scale * noise
    return (utility[None, :] > utility[:, None]).sum(axis=1).astype(np.int32)


def pairwise_agreement(ranks_a: np.ndarray, ranks_b: np.ndarray) -> tuple[int, int]:
    """(agreeing pairs, pairs) between two rankings of the same responses.

    Works on [K] or batched [..., K] rank arrays. A pair counts only when both
    labelers prefer one response strictly (ties excluded, as in the paper).
    """
    a = np.asarray(ranks_a)
    b = np.asarray(ranks_b)
    if a.shape != b.shape:
        raise ValueError(f"rank shapes differ: {a.shape} vs {b.shape}")
    da = np.sign(a[..., :, None] - a[..., None, :])
    db = np.sign(b[..., :, None] - b[..., None, :])
    upper = np.triu(np.ones(a.shape[-1:] * 2, dtype=bool), k=1)
    counted = (da != 0) & (db != 0) & upper
    return int((counted & (da == db)).sum()), int(counted.sum())


def inter_labeler_agreement(score_groups: Sequence[Sequence[float]],
                            rng: np.random.Generator, noise_scale: float) -> float:
    """Simulated agreement of two independent labelers over several prompts,
    each given as the gold scores of its K responses (K may vary). Used by
    the tests on corpus samples and by the pipeline on its own samples."""
    agree = total = 0
    for scores in score_groups:
        a = rank(scores, rng, noise_scale)
        b = rank(scores, rng, noise_scale)
        n_agree, n_pairs = pairwise_agreement(a, b)
        agree += n_agree
        total += n_pairs
    return agree / total if total else float("nan")


def expected_agreement(score_diffs: np.ndarray, noise_scale: float) -> float:
    """Exact expected agreement of two independent labelers over pairs of
    responses with (non-zero) gold score differences `score_diffs`.

    Each labeler prefers the better of a pair with p = sigmoid(|d| / scale)
    (the difference of two Gumbels is logistic); two independent labelers
    agree with probability p^2 + (1 - p)^2. Pairs of equal gold score tie for
    every labeler and count in no agreement, so they must not be passed.
    """
    d = np.abs(np.asarray(score_diffs, dtype=np.float64))
    if np.any(d == 0):
        raise ValueError("pairs of equal gold score tie and have no agreement; leave them out")
    if noise_scale <= 0:
        return 1.0
    p = 1.0 / (1.0 + np.exp(-d / noise_scale))
    return float(np.mean(p * p + (1.0 - p) * (1.0 - p)))


def calibration_score_diffs(seed: int = 0, n_pairs: int = N_CALIBRATION_PAIRS) -> np.ndarray:
    """Gold score differences of pairs of corpus responses to the same prompt
    (uniform categories, training words) that differ in gold score. Pairs of
    equal score are dropped: they tie for every labeler and count in no
    agreement statistic."""
    rng = np.random.default_rng([seed, 73])
    diffs = []
    for _ in range(n_pairs):
        task = sample_task(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))], "train")
        first, second = corpus_response(task, rng), corpus_response(task, rng)
        d = score_task(task, first) - score_task(task, second)
        if d != 0:
            diffs.append(d)
    return np.asarray(diffs)


@functools.lru_cache(maxsize=None)
def calibrate_noise_scale(seed: int = 0, target: float = TARGET_AGREEMENT) -> float:
    """The Gumbel scale at which two labelers agree on `target` of the pairs of
    corpus responses that they order (those of different gold scores).

    Expected agreement falls monotonically from 1 (no noise) to 0.5 as the
    scale grows, so bisection on log(scale) finds the unique solution.
    The expectation is computed exactly per pair, so the only error is the
    sampling of pairs (standard error ~0.002 in agreement).
    """
    diffs = calibration_score_diffs(seed)
    ceiling = expected_agreement(diffs, 0.0)
    if not 0.5 < target < ceiling:
        raise ValueError(f"target agreement {target} outside the reachable range "
                         f"(0.5, {ceiling:.3f}) for the corpus mixture")
    lo, hi = np.log(1e-4), np.log(1e3)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if expected_agreement(diffs, float(np.exp(mid))) > target:
            lo = mid          # too little noise: labelers agree too often
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def __getattr__(name: str):
    # NOISE_SCALE is computed on first use (PEP 562), never typed in by hand.
    if name == "NOISE_SCALE":
        return calibrate_noise_scale()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
