"""Reading and validating the JSONL inputs (DESIGN.md, "JSONL inputs").

One JSON object a line; blank lines are skipped; line numbers are 1-based
physical lines of the file. Record kinds and their normalised form:

    demonstrations  {"prompt": str, "response": str}
    comparisons     {"prompt": str, "responses": [K str], "ranks": [K int]}
                    (0 = best, ties allowed, 2 <= K <= 9), or the pairwise
                    {"prompt": str, "chosen": str, "rejected": str}, which is
                    normalised to responses=[chosen, rejected], ranks=[0, 1];
                    optionally "finished": [K bool], False for a response cut at
                    the length limit before its end-of-sequence token (collect
                    writes it; the gold labeler scores such a response -1)
    prompts         {"prompt": str}
    text            {"text": str}

Every normalised record also carries "category" (a str, "" when absent).
Other fields are ignored. Strings are kept exactly as written; only the
emptiness checks look at them stripped.

A bad line raises `DataError`, whose message names the file, the line and the
field (`demos.jsonl:17: field 'response': must be a non-empty string`), or,
with `drop_invalid=True`, is dropped and counted by reason.
"""
from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any, Callable, Iterator, Optional

from rlhf_jax.data.features import KINDS
from rlhf_jax.errors import DataError  # noqa: F401  (defined at the bottom floor; raised here)

log = logging.getLogger(__name__)

MIN_RESPONSES = 2
MAX_RESPONSES = 9

# A caller's extra validator: returns None for a good record, else the problem.
Check = Callable[[dict], Optional[str]]


class _Invalid(Exception):
    """Raised inside validation; the caller adds the location."""

    def __init__(self, field: Optional[str], reason: str, detail: str = ""):
        super().__init__(reason)
        self.field, self.reason, self.detail = field, reason, detail


def _string(obj: dict, field: str, *, non_empty: bool = True) -> str:
    if field not in obj:
        raise _Invalid(field, "missing")
    value = obj[field]
    if not isinstance(value, str):
        raise _Invalid(field, "must be a string", f", got {type(value).__name__}")
    _encodable(value, field)
    if non_empty and not value.strip():
        raise _Invalid(field, "must be a non-empty string")
    return value


def _encodable(value: str, field: str, entry: str = ""):
    """JSON escapes can spell lone surrogates (\\ud800), which no UTF-8 text
    holds: the tokenizers and the array_record builder would fail on them later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Invalid(field, "not valid Unicode (a lone surrogate escape)",
                       f"{entry} at character {e.start}") from None


def _comparison(obj: dict) -> dict:
    prompt = _string(obj, "prompt")
    pairwise = "chosen" in obj or "rejected" in obj
    listwise = "responses" in obj or "ranks" in obj
    if pairwise and listwise:
        raise _Invalid("chosen", "give either 'responses'/'ranks' or 'chosen'/'rejected', not both")
    if pairwise:
        chosen = _string(obj, "chosen")
        rejected = _string(obj, "rejected")
        if chosen == rejected:
            raise _Invalid("rejected", "identical to 'chosen'")
        return {"prompt": prompt, "responses": [chosen, rejected], "ranks": [0, 1]}

    if "responses" not in obj:
        raise _Invalid("responses", "missing (or give 'chosen' and 'rejected')")
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise _Invalid("responses", "must be a list of strings",
                       f", got {type(responses).__name__}")
    if not MIN_RESPONSES <= len(responses) <= MAX_RESPONSES:
        raise _Invalid("responses", f"must hold {MIN_RESPONSES} to {MAX_RESPONSES} responses",
                       f", got {len(responses)}")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise _Invalid("responses", "entries must be strings",
                           f"; entry {i} is {type(r).__name__}")
        _encodable(r, "responses", f"; entry {i}")
        if not r.strip():
            raise _Invalid("responses", "entries must be non-empty strings", f"; entry {i} is empty")

    if "ranks" not in obj:
        raise _Invalid("ranks", "missing")
    ranks = obj["ranks"]
    if not isinstance(ranks, list):
        raise _Invalid("ranks", "must be a list of integers", f", got {type(ranks).__name__}")
    if len(ranks) != len(responses):
        raise _Invalid("ranks", "must have one entry per response",
                       f"; {len(ranks)} ranks for {len(responses)} responses")
    for i, r in enumerate(ranks):
        # bool is an int subclass; true/false are not ranks.
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise _Invalid("ranks", "entries must be non-negative integers",
                           f"; entry {i} is {r!r}")
    if len(set(ranks)) == 1:
        raise _Invalid("ranks", "all responses are tied, so there is no preference to learn")
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if responses[i] == responses[j] and ranks[i] != ranks[j]:
                raise _Invalid("responses", "identical responses ranked differently",
                               f"; entries {i} and {j}")
    record = {"prompt": prompt, "responses": list(responses), "ranks": [int(r) for r in ranks]}
    if "finished" in obj:
        finished = obj["finished"]
        if (not isinstance(finished, list) or len(finished) != len(responses)
                or not all(isinstance(f, bool) for f in finished)):
            raise _Invalid("finished", "must be a list of booleans, one per response",
                           f", got {json.dumps(finished)[:80]}")
        record["finished"] = list(finished)
    return record


def normalise(obj: Any, kind: str) -> dict:
    """Validates one parsed JSON value; returns the normalised record.

    Raises `_Invalid` (location-free); `validate_record` and `iter_jsonl` turn it
    into a `DataError`.
    """
    if not isinstance(obj, dict):
        raise _Invalid(None, "expected a JSON object", f", got {type(obj).__name__}")
    if kind == "demonstrations":
        record = {"prompt": _string(obj, "prompt"), "response": _string(obj, "response")}
    elif kind == "comparisons":
        record = _comparison(obj)
    elif kind == "prompts":
        record = {"prompt": _string(obj, "prompt")}
    elif kind == "text":
        record = {"text": _string(obj, "text")}
    else:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    record["category"] = _string(obj, "category", non_empty=False) if "category" in obj else ""
    return record


def validate_record(record: Any, kind: str, where: str, index: Optional[int],
                    check: Optional[Check] = None) -> dict:
    """`normalise` plus the caller's `check`, raising a located `DataError`."""
    try:
        record = normalise(record, kind)
    except _Invalid as e:
        raise DataError(where, index, e.field, e.reason, e.detail) from None
    if check is not None:
        problem = check(record)
        if problem:
            raise DataError(where, index, None, problem)
    return record


def _parse_line(raw: bytes, line_no: int) -> Any:
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte-order mark
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Invalid(None, "not valid UTF-8",
                       f" (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _Invalid(None, "invalid JSON", f": {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise _Invalid(None, "invalid JSON", ": nested too deeply") from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise _Invalid(None, "invalid JSON", f": {e}") from None


def iter_jsonl(path: str | os.PathLike, kind: str, check: Optional[Check] = None
               ) -> Iterator[tuple[int, Optional[dict], Optional[DataError]]]:
    """Yields `(line_no, record, None)` or `(line_no, None, error)` per non-blank line.

    Streams the file, so its size is not bounded by memory.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    path = os.fspath(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            # A byte-order mark alone does not make the first line non-blank.
            if not (raw[3:] if line_no == 1 and raw.startswith(b"\xef\xbb\xbf") else raw).strip():
                continue
            try:
                obj = _parse_line(raw, line_no)
                yield line_no, validate_record(obj, kind, path, line_no, check), None
            except _Invalid as e:
                yield line_no, None, DataError(path, line_no, e.field, e.reason, e.detail)
            except DataError as e:
                yield line_no, None, e


def read_jsonl(path: str | os.PathLike, kind: str, drop_invalid: bool = False,
               check: Optional[Check] = None,
               reasons: Optional[collections.Counter] = None) -> tuple[list[dict], int]:
    """Reads and validates a JSONL file of one record kind.

    Args:
      path: the file.
      kind: one of "demonstrations", "comparisons", "prompts", "text".
      drop_invalid: drop bad lines (counted and logged) instead of raising.
      check: extra validator `check(record) -> Optional[str]` on the normalised
        record (e.g. a token-length limit); a returned message is a
        `DataError` at that line.
      reasons: if given, a Counter updated with drop counts by reason.

    Returns:
      (records, n_dropped): normalised records in file order, and the number
      of dropped lines (always 0 when drop_invalid is False).

    Raises:
      DataError: on the first bad line (unless drop_invalid), or when the file
        holds no (valid) records.
      FileNotFoundError: if the file does not exist.
    """
    records, _, n_dropped = read_jsonl_with_lines(path, kind, drop_invalid, check, reasons)
    return records, n_dropped


def read_jsonl_with_lines(path, kind: str, drop_invalid: bool = False,
                          check: Optional[Check] = None,
                          reasons: Optional[collections.Counter] = None
                          ) -> tuple[list[dict], list[int], int]:
    """`read_jsonl` that also returns the line number of each kept record."""
    records, lines = [], []
    dropped = collections.Counter()
    for line_no, record, error in iter_jsonl(path, kind, check):
        if error is None:
            records.append(record)
            lines.append(line_no)
        elif drop_invalid:
            dropped[error.reason] += 1
        else:
            raise error
    n_dropped = sum(dropped.values())
    if reasons is not None:
        reasons.update(dropped)
    if n_dropped:
        log.warning("%s: dropped %d invalid line(s) of %d: %s", os.fspath(path), n_dropped,
                    n_dropped + len(records),
                    "; ".join(f"{n} x {r}" for r, n in dropped.most_common()))
    if not records:
        detail = f" ({n_dropped} invalid line(s) dropped)" if n_dropped else ""
        raise DataError(path, None, None, f"no {kind} records", detail)
    return records, lines, n_dropped
