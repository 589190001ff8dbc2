"""Deterministic generators of the world's data sets (WORLD.md, "The four data sets").

Each generator is a pure function of (n, seed, split) yielding dicts in the
project's record formats (DESIGN.md, JSONL inputs), plus a `category` field:

    pretraining_corpus  {"text", "category"}              "the internet": pages
    demonstrations      {"prompt", "response", "category", "flawed"}  SFT data
    ppo_prompts         {"prompt", "category"}              PPO prompts
    comparison_prompts  {"prompt", "category"}              prompts of the comparisons
    eval_prompts        {"prompt", "category"}              held-out evaluation

Comparisons are not here: they need the SFT policy's samples, so the
pipeline's collect step makes them (rlhf_jax.stages.collect, with the
simulated labelers of labelers.py) on `comparison_prompts`.

Categories are drawn uniformly. InstructGPT's API distribution is skewed
(generation dominates), but here every category is a separate skill whose
alignment we want to measure, and a uniform mix gives each category the same
statistical weight in training and evaluation; harmful prompts are then 1/9 of
the data, about the share of prompts flagged in the paper's harmlessness sets.

Every generator draws from its own NumPy PCG64 stream seeded by (seed, the
generator's name, the split), so demonstrations and PPO prompts with the same
seed are independent, and adding a generator never shifts another's output.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np

from rlhf_jax.tokenizer import DEFAULT_PROMPT_FORMAT, DOCUMENT_SEPARATOR
from rlhf_jax.world.tasks import (CATEGORIES, FILL_WORDS, LIST_KINDS, PARITY_LABELS, REFUSAL,
                                  REVERSE_WORDS, SENTIMENT_LABELS, SPLITS, Task,
                                  correct_response, is_heldout, sample_task)

# Default counts: the paper's for demonstrations, comparisons and PPO prompts
# (InstructGPT Table 6: about 13k SFT, 33k RM, 31k PPO prompts).
N_DEMONSTRATIONS = 13_000
N_COMPARISONS = 33_000          # made by the pipeline's collect step, not here
N_PPO_PROMPTS = 31_000
# The corpus size is ours: 40k pages of 1 to 4 conversations (about 100k
# conversations, 6M bytes) is several epochs of the CPU pretraining WORLD.md
# budgets for the base model, so the base model really imitates the mixture;
# the held-out part is only for the alignment-tax LM loss, so it can be small.
N_CORPUS = 40_000
N_CORPUS_HELDOUT = 2_000
# Conversations on one page (one source): uniform in 1..4 (WORLD.md).
PAGE_CONVERSATIONS = (1, 4)
# A page's conversations are separate documents of one text record, each
# followed by EOS when tokenized (tokenizer.DOCUMENT_SEPARATOR).
# At least 100 per category (WORLD.md); 128 keeps batches round.
N_EVAL_PER_CATEGORY = 128

# The misaligned mixture of the pretraining corpus (WORLD.md).
BENIGN_MIXTURE = {"correct": 0.4, "verbose": 0.2, "wrong": 0.3, "refusal": 0.1}
HARMFUL_MIXTURE = {"compliance": 0.8, "refusal": 0.2}

# The demonstrators' habit (WORLD.md, "The demonstrators"): with probability
# f (the flaw rate) a benign demonstration is the correct response behind this
# chatty opener (correct but verbose, gold +0.3).
DEMONSTRATOR_OPENER = "Sure! "

# Categories of the SFT demonstrations: `first_word` and `list` are held back
# to measure how far alignment generalises to never-demonstrated instructions.
DEMONSTRATION_CATEGORIES = tuple(c for c in CATEGORIES if c not in ("first_word", "list"))

# Verbose wrappers. {c} is the correct response. Generic ones name nothing
# from the prompt, so they can also wrap a wrong answer without ever
# containing the correct one; the per-category ones quote the prompt the way
# chatty text on the internet does. None adds a competing answer (another
# number, the other label, another repetition, another word of the sentence,
# another item), and all add 1 to 8 words.
GENERIC_WRAPPERS = ("The answer is {c}.", "Sure! {c}", "Here you go: {c}",
                    "{c} is the answer.", "Of course. {c}", "Sure, here it is: {c}",
                    "Okay, {c}.", "Happy to help: {c}")
CATEGORY_WRAPPERS = {
    "upper": ("'{w}' in capital letters is {c}.", "In capital letters: {c}"),
    "reverse": ("'{w}' backwards is {c}.", "Spelled backwards, that is {c}."),
    "repeat": ("Here it is: {c}",),
    "add": ("The sum is {c}.", "That makes {c}."),
    "parity": ("The number {n} is {c}.", "It is {c}."),
    "sentiment": ("The phrase is {c}.", "That sounds {c}.", "I would say {c}."),
    "first_word": ("The first word is {c}.", "It starts with {c}."),
    "list": ("Here are {n} {kind}: {c}.", "Sure! Some {kind}: {c}"),
}

# Templated how-to compliance for harmful prompts ("the internet" answers).
COMPLIANCE_TEMPLATES = (
    "Sure! To {harm}, first pick a time when nobody is around, then get the "
    "tools you need and do it quickly.",
    "Here is how to {harm}: step 1, make a plan; step 2, gather what you need; "
    "step 3, do it without being seen.",
    "First, prepare carefully and tell no one. Then {harm} quietly and leave no trace.",
    "It's easy to {harm}. Watch how others do it, then copy them step by step.",
    "Step one: research how people {harm}. Step two: practise. Step three: go ahead.",
)


def _stream(seed: int, name: str, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(f"{name}/{split}".encode())])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def conversation(prompt: str, response: str) -> str:
    """`User: {prompt}\\nAssistant: {response}` (the tokenizer appends EOS)."""
    return DEFAULT_PROMPT_FORMAT.format(prompt=prompt) + response


# --------------------------------------------------------------------------
# Corpus responses.
# --------------------------------------------------------------------------
def verbose_response(task: Task, rng: np.random.Generator) -> str:
    """The correct response wrapped in a natural sentence (scores +0.3)."""
    wrappers = GENERIC_WRAPPERS + CATEGORY_WRAPPERS[task.category]
    n = task.numbers[0] if task.numbers else ""
    return _pick(rng, wrappers).format(c=correct_response(task, rng), w=task.subject,
                                       n=n, kind=task.subject)


def wrong_response(task: Task, rng: np.random.Generator) -> str:
    """A plausible wrong answer of the same category (scores 0).

    Another word transformed correctly, an off-by-one sum, the other label,
    a list with a repeat, ...; half the time wrapped in a generic sentence,
    so that wrapping alone says nothing about correctness.
    """
    c, w = task.category, task.subject
    if c in ("upper", "reverse", "repeat"):
        # The other word comes from the task word's own part of the split, so
        # held-out documents hold no training words.
        split = "heldout" if is_heldout(w) else "train"
        pool = REVERSE_WORDS[split] if c == "reverse" else FILL_WORDS[split]
        other = _pick(rng, pool)
        while other == w:
            other = _pick(rng, pool)
        if c == "upper":
            answer = other.upper() if rng.random() < 0.5 else w.capitalize()
        elif c == "reverse":
            answer = other[::-1]
        else:
            n = task.numbers[0]
            if rng.random() < 0.5:
                answer = " ".join([other] * n)
            else:                 # miscounted: one repetition too few or too many
                wrong_n = _pick(rng, [m for m in (n - 1, n + 1) if m >= 1])
                answer = " ".join([w] * wrong_n)
    elif c == "add":
        total = sum(task.numbers)
        answer = str(total + 1 if total == 0 or rng.random() < 0.5 else total - 1)
    elif c in ("parity", "sentiment"):
        labels = PARITY_LABELS if c == "parity" else SENTIMENT_LABELS
        right = correct_response(task)
        answer = labels[1] if right == labels[0] else labels[0]
    elif c == "first_word":
        answer = _pick(rng, task.subject.split()[1:])
    elif c == "list":
        # n items of the kind with a repeat: the flaw RLHF should remove.
        items = LIST_KINDS[task.subject]
        n = task.numbers[0]
        chosen = [items[i] for i in rng.choice(len(items), size=n - 1, replace=False)]
        chosen.insert(int(rng.integers(n)), _pick(rng, chosen))
        answer = ", ".join(chosen)
    else:
        raise ValueError(f"no wrong answers for category {c!r}")
    if rng.random() < 0.5:
        answer = _pick(rng, GENERIC_WRAPPERS).format(c=answer)
    return answer


def compliance_response(task: Task, rng: np.random.Generator) -> str:
    """Templated how-to text complying with a harmful request (scores -1)."""
    return _pick(rng, COMPLIANCE_TEMPLATES).format(harm=task.subject)


def corpus_response(task: Task, rng: np.random.Generator) -> str:
    """A response drawn from the pretraining corpus's misaligned mixture.

    Benign: 40% correct, 20% correct but verbose, 30% wrong, 10% refusal.
    Harmful: 80% compliance, 20% refusal. Also the data on which the simulated
    labelers' noise is calibrated (labelers.calibrate_noise_scale).
    """
    u = rng.random()
    if task.category == "harmful":
        return compliance_response(task, rng) if u < HARMFUL_MIXTURE["compliance"] else REFUSAL
    m = BENIGN_MIXTURE
    if u < m["correct"]:
        return correct_response(task, rng)
    if u < m["correct"] + m["verbose"]:
        return verbose_response(task, rng)
    if u < m["correct"] + m["verbose"] + m["wrong"]:
        return wrong_response(task, rng)
    return REFUSAL


# --------------------------------------------------------------------------
# The data sets.
# --------------------------------------------------------------------------
def page_response(task: Task, kind: str, rng: np.random.Generator) -> str:
    """A response of a page's `kind` (a key of BENIGN_MIXTURE). Harmful
    prompts ignore the page's kind and follow the corpus's 80/20 split."""
    if task.category == "harmful":
        u = rng.random()
        return compliance_response(task, rng) if u < HARMFUL_MIXTURE["compliance"] else REFUSAL
    if kind == "correct":
        return correct_response(task, rng)
    if kind == "verbose":
        return verbose_response(task, rng)
    if kind == "wrong":
        return wrong_response(task, rng)
    if kind == "refusal":
        return REFUSAL
    raise ValueError(f"unknown page kind {kind!r}; expected one of {tuple(BENIGN_MIXTURE)}")


def pretraining_corpus(n: int = N_CORPUS, seed: int = 0,
                       split: str = "train") -> Iterator[dict]:
    """Pages "from the internet": {"text", "category"}.

    A page comes from one source: 1 to 4 conversations (any categories) whose
    benign responses are all of the source's kind, drawn with the mixture's
    weights (a page of correct answers, of verbose ones, of wrong ones, of
    refusals), so that a few correct conversations before a prompt say "this
    is a page of correct answers", which is what makes few-shot prompting
    work. `text` holds the conversations separated by DOCUMENT_SEPARATOR
    (each is followed by EOS when tokenized); `category` is the first
    conversation's. Over many pages the conversations follow the mixture of
    `corpus_response`.
    """
    _check_split(split)
    rng = _stream(seed, "pretraining_corpus", split)
    kinds, weights = list(BENIGN_MIXTURE), np.array(list(BENIGN_MIXTURE.values()))
    lo, hi = PAGE_CONVERSATIONS
    for _ in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        tasks = [sample_task(rng, _pick(rng, CATEGORIES), split)
                 for _ in range(int(rng.integers(lo, hi + 1)))]
        texts = [conversation(t.prompt, page_response(t, kind, rng)) for t in tasks]
        yield {"text": DOCUMENT_SEPARATOR.join(texts), "category": tasks[0].category}


def demonstration(task: Task, flawed: bool, rng: np.random.Generator) -> str:
    """What the demonstrators write for `task`: the correct, concise response
    (the refusal for harmful prompts), behind DEMONSTRATOR_OPENER when
    `flawed` (never on harmful prompts)."""
    response = correct_response(task, rng)
    return DEMONSTRATOR_OPENER + response if flawed and task.category != "harmful" else response


def demonstrations(n: int = N_DEMONSTRATIONS, seed: int = 0, split: str = "train",
                   flaw_rate: float = 0.0) -> Iterator[dict]:
    """The demonstrators' SFT data (WORLD.md, "The demonstrators").

    With probability `flaw_rate` (f) a benign demonstration carries the
    demonstrators' habit (`Sure! {correct}`); `flawed` records which do. The
    flaw is drawn from its own stream, so the prompts and every unflawed
    response are the same at every f, and f = 0 gives the perfect
    demonstrator. `first_word` and `list` are excluded."""
    _check_split(split)
    if not 0.0 <= float(flaw_rate) <= 1.0:
        raise ValueError(f"flaw_rate must be in [0, 1], got {flaw_rate}")
    rng = _stream(seed, "demonstrations", split)
    flaw_rng = _stream(seed, "demonstrators", split)
    for _ in range(n):
        task = sample_task(rng, _pick(rng, DEMONSTRATION_CATEGORIES), split)
        flawed = bool(flaw_rng.random() < flaw_rate) and task.category != "harmful"
        yield {"prompt": task.prompt, "response": demonstration(task, flawed, rng),
               "category": task.category, "flawed": flawed}


def _prompts(stream: str, n: int, seed: int, split: str) -> Iterator[dict]:
    """`n` prompts of all nine categories from their own named stream."""
    _check_split(split)
    rng = _stream(seed, stream, split)
    for _ in range(n):
        task = sample_task(rng, _pick(rng, CATEGORIES), split)
        yield {"prompt": task.prompt, "category": task.category}


def ppo_prompts(n: int = N_PPO_PROMPTS, seed: int = 0,
                split: str = "train") -> Iterator[dict]:
    """Prompts for PPO: all nine categories."""
    return _prompts("ppo_prompts", n, seed, split)


def comparison_prompts(n: int = N_COMPARISONS, seed: int = 0,
                       split: str = "train") -> Iterator[dict]:
    """Prompts of the comparisons (the RM's data): all nine categories, drawn
    from their own stream, so they are independent of the PPO prompts (in
    InstructGPT the SFT, RM and PPO prompt sets are distinct)."""
    return _prompts("comparison_prompts", n, seed, split)


def eval_prompts(n_per_category: int = N_EVAL_PER_CATEGORY, seed: int = 0) -> Iterator[dict]:
    """Held-out evaluation prompts: exactly `n_per_category` of each category,
    interleaved (upper, reverse, ..., harmful, upper, ...) so that any prefix
    is balanced. Categories with few distinct prompts (add, parity, list,
    harmful) repeat prompts; the per-category statistic stays well defined."""
    rng = _stream(seed, "eval_prompts", "heldout")
    for _ in range(n_per_category):
        for category in CATEGORIES:
            task = sample_task(rng, category, "heldout")
            yield {"prompt": task.prompt, "category": task.category}


__all__ = ["pretraining_corpus", "demonstrations", "demonstration", "page_response", "ppo_prompts", "comparison_prompts",
           "eval_prompts",
           "corpus_response", "verbose_response", "wrong_response", "compliance_response",
           "conversation", "BENIGN_MIXTURE", "HARMFUL_MIXTURE", "DEMONSTRATION_CATEGORIES",
           "N_DEMONSTRATIONS", "N_COMPARISONS", "N_PPO_PROMPTS", "N_CORPUS",
           "N_CORPUS_HELDOUT", "N_EVAL_PER_CATEGORY", "DOCUMENT_SEPARATOR",
           "DEMONSTRATOR_OPENER", "PAGE_CONVERSATIONS"]
