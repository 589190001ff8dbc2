"""Hostile JSONL input, by property: for every record kind (demonstrations,
comparisons listwise and pairwise, prompts, text), a file of valid lines with
malformed, truncated, non-UTF-8, wrong-typed, over-long (a caller's `check`)
or otherwise invalid lines among them, plus blank lines, CRLF endings, a BOM
and a missing final newline, gives

  * drop_invalid=False: a `DataError` (never any other exception) naming the
    file, the physical line of the first bad record and, where one field is
    at fault, that field;
  * drop_invalid=True: exactly the valid records, normalised, in file order,
    with their line numbers, and every bad line counted by reason.

The expected normalised form is computed here, independently of
`rlhf_jax.data.jsonl`, so a silently wrong record fails too.
"""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_jax.data import jsonl
from rlhf_jax.data.jsonl import DataError

KINDS = ("demonstrations", "comparisons", "prompts", "text")
PRIMARY = {"demonstrations": "prompt", "comparisons": "prompt", "prompts": "prompt", "text": "text"}
MAX_CHARS = 40          # the `check` below: the primary field at most this long

SETTINGS = settings(max_examples=int(os.environ.get("RLHF_JAX_FUZZ_EXAMPLES", 60)), deadline=None,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def length_check(kind):
    """A caller's check, like data_setup.length_check: over-long records name the limit."""
    def check(record):
        n = len(record[PRIMARY[kind]])
        return f"{PRIMARY[kind]} is {n} chars, more than {MAX_CHARS}" if n > MAX_CHARS else None
    return check


# ---------------------------------------------------------------------------
# Valid records and their normalised form
# ---------------------------------------------------------------------------

# Any Unicode text (no surrogates: st.text never draws them) with something
# besides whitespace in it; kept short so the length check passes.
nonblank = st.text(max_size=12).map(lambda s: s + "x" if not s.strip() else s)
short_nonblank = st.text(max_size=MAX_CHARS - 1).map(lambda s: s + "x" if not s.strip() else s)
category = st.one_of(st.none(), st.text(max_size=6))
extras = st.dictionaries(st.sampled_from(["id", "meta", "score", "source"]),
                         st.one_of(st.integers(), st.text(max_size=5), st.none(),
                                   st.lists(st.integers(), max_size=3)), max_size=2)


@st.composite
def listwise(draw):
    k = draw(st.integers(2, 9))
    responses = draw(st.lists(nonblank, min_size=k, max_size=k, unique=True))
    ranks = draw(st.lists(st.integers(0, 5), min_size=k, max_size=k).filter(lambda r: len(set(r)) > 1))
    if k < 9 and draw(st.booleans()):   # a duplicate response, tied with its twin: allowed
        i = draw(st.integers(0, k - 1))
        responses.append(responses[i])
        ranks.append(ranks[i])
    return {"responses": responses, "ranks": ranks}


@st.composite
def pairwise(draw):
    chosen = draw(nonblank)
    rejected = draw(nonblank.filter(lambda s: s != chosen))
    return {"chosen": chosen, "rejected": rejected}


@st.composite
def valid_record(draw, kind):
    """(raw JSON object, expected normalised record)."""
    if kind == "text":
        raw = {"text": draw(short_nonblank)}
    else:
        raw = {"prompt": draw(short_nonblank)}
    if kind == "demonstrations":
        raw["response"] = draw(nonblank)
    elif kind == "comparisons":
        raw.update(draw(st.one_of(listwise(), pairwise())))
    cat = draw(category)
    if cat is not None:
        raw["category"] = cat
    for k, v in draw(extras).items():
        raw.setdefault(k, v)
    expected = {k: raw[k] for k in ("prompt", "response", "text", "responses", "ranks") if k in raw}
    if "chosen" in raw:
        expected["responses"] = [raw["chosen"], raw["rejected"]]
        expected["ranks"] = [0, 1]
    expected["category"] = raw.get("category", "")
    return raw, expected


def dumps(obj, draw) -> bytes:
    ascii_only = draw(st.booleans())
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8")


# ---------------------------------------------------------------------------
# Bad lines: (bytes, the field at fault or None, a piece of the reason)
# ---------------------------------------------------------------------------

WRONG_TYPES = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                        st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
BLANKS = ["", " ", "\t", "\n ", "\u3000", "\u2028"]


def _string_fields(raw):
    return [k for k in ("prompt", "response", "text", "chosen", "rejected") if k in raw]


@st.composite
def bad_line(draw, kind):
    raw, _ = draw(valid_record(kind))
    how = draw(st.sampled_from([
        "truncated", "garbage", "non_utf8", "not_object", "missing", "wrong_type", "blank_string",
        "surrogate", "too_long", "category", "deep", "huge_int"] + (
        ["k_out_of_range", "rank_bad", "rank_count", "all_tied", "twins_ranked", "both_forms",
         "entry_type", "entry_blank", "responses_type", "chosen_is_rejected"]
        if kind == "comparisons" else [])))
    fields = _string_fields(raw)
    listw = "responses" in raw

    if how == "truncated":              # cut anywhere (between characters), the closing brace lost
        text = json.dumps(raw, ensure_ascii=draw(st.booleans()))
        return text[:draw(st.integers(1, len(text) - 1))].encode(), None, "invalid JSON"
    if how == "garbage":                # 0xff never occurs in UTF-8
        return b"\xff" + draw(st.binary(max_size=20)).replace(b"\n", b""), None, "not valid UTF-8"
    if how == "non_utf8":               # a Latin-1 or cut multi-byte sequence inside a string
        field = draw(st.sampled_from(fields))
        raw[field] = raw[field] + "@@"
        text = json.dumps(raw, ensure_ascii=True).encode()
        bad = draw(st.sampled_from([b"\xe9", b"\xe2\x82", b"\xc3", b"\x80", b"\xed\xa0\x80"]))
        return text.replace(b"@@", bad, 1), None, "not valid UTF-8"
    if how == "not_object":
        value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(),
                               st.text(max_size=5), st.none(), st.booleans()))
        return dumps(value, draw), None, "expected a JSON object"
    if how == "deep":                   # RecursionError inside json
        depth = draw(st.integers(5000, 20000))
        return dumps(raw, draw)[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}", None, "invalid JSON"
    if how == "huge_int":               # beyond Python's int digit limit: a ValueError inside json
        return (dumps(raw, draw)[:-1] + b', "id": 1' + b"7" * draw(st.integers(4400, 6000)) + b"}",
                None, "invalid JSON")
    if how == "too_long":
        raw[PRIMARY[kind]] = draw(st.text(min_size=MAX_CHARS + 1, max_size=2 * MAX_CHARS)
                                  .filter(lambda s: s.strip()))
        return dumps(raw, draw), None, f"more than {MAX_CHARS}"
    if how == "category":
        raw["category"] = draw(WRONG_TYPES.filter(lambda v: not isinstance(v, str)))
        return dumps(raw, draw), "category", "must be a string"
    if how == "surrogate":              # a lone surrogate escape: valid JSON, not valid text
        field = draw(st.sampled_from(fields + (["responses", "category"] if listw else ["category"])))
        lone = draw(st.sampled_from(["\ud800", "\udfff", "\udc80"]))
        if field == "responses":
            i = draw(st.integers(0, len(raw["responses"]) - 1))
            raw["responses"][i] = raw["responses"][i] + lone
        else:
            raw[field] = raw.get(field, "") + lone
        return json.dumps(raw, ensure_ascii=True).encode(), field, "lone surrogate"

    if how == "missing":
        field = draw(st.sampled_from(fields + (["responses", "ranks"] if listw else [])))
        del raw[field]
        # a pairwise record missing one half is still pairwise: that half is named
        return dumps(raw, draw), field, "missing"
    if how == "wrong_type":
        field = draw(st.sampled_from(fields))
        raw[field] = draw(WRONG_TYPES)
        return dumps(raw, draw), field, "must be a string"
    if how == "blank_string":
        field = draw(st.sampled_from(fields))
        raw[field] = draw(st.sampled_from(BLANKS))
        return dumps(raw, draw), field, "non-empty"

    # Comparisons only.
    if how == "chosen_is_rejected":
        raw = {"prompt": raw["prompt"], "chosen": "same", "rejected": "same"}
        return dumps(raw, draw), "rejected", "identical"
    if how == "both_forms":
        raw.update(draw(listwise()))
        raw.update(draw(pairwise()))
        return dumps(raw, draw), "chosen", "not both"
    lw = draw(listwise())
    raw = {"prompt": raw["prompt"], **lw}
    k = len(lw["responses"])
    if how == "k_out_of_range":
        n = draw(st.sampled_from([0, 1, 10, 12]))
        raw["responses"] = [f"r{i}" for i in range(n)]
        raw["ranks"] = list(range(n))
        return dumps(raw, draw), "responses", "2 to 9"
    if how == "responses_type":
        raw["responses"] = draw(st.one_of(st.text(max_size=4), st.integers(), st.none(),
                                          st.dictionaries(st.text(max_size=2), st.integers())))
        return dumps(raw, draw), "responses", "must be a list"
    if how == "entry_type":
        raw["responses"][draw(st.integers(0, k - 1))] = draw(
            WRONG_TYPES.filter(lambda v: not isinstance(v, str)))
        return dumps(raw, draw), "responses", "must be strings"
    if how == "entry_blank":
        i = draw(st.integers(0, k - 1))
        raw["responses"][i] = draw(st.sampled_from(BLANKS))
        return dumps(raw, draw), "responses", "non-empty"
    if how == "rank_bad":
        raw["ranks"][draw(st.integers(0, k - 1))] = draw(st.one_of(
            st.integers(max_value=-1), st.booleans(), st.floats(allow_nan=False), st.text(max_size=2),
            st.none()))
        return dumps(raw, draw), "ranks", "non-negative integers"
    if how == "rank_count":
        n = draw(st.integers(0, 10).filter(lambda n: n != k))
        raw["ranks"] = list(range(n))
        return dumps(raw, draw), "ranks", "one entry per response"
    if how == "all_tied":
        raw["ranks"] = [draw(st.integers(0, 3))] * k
        return dumps(raw, draw), "ranks", "tied"
    if how == "twins_ranked":
        i, j = draw(st.lists(st.integers(0, k - 1), min_size=2, max_size=2, unique=True))
        raw["responses"][j] = raw["responses"][i]
        raw["ranks"][j] = raw["ranks"][i] + 1
        return dumps(raw, draw), "responses", "identical responses ranked differently"
    raise AssertionError(how)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

@st.composite
def jsonl_file(draw, kind, min_bad=0, max_bad=4):
    """(bytes, [(line_no, expected) of valid lines], [(line_no, field, reason) of bad lines])."""
    entries = [("good",) + draw(valid_record(kind)) for _ in range(draw(st.integers(0, 5)))]
    for _ in range(draw(st.integers(min_bad, max_bad))):
        entries.insert(draw(st.integers(0, len(entries))), ("bad",) + draw(bad_line(kind)))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    lines, good, bad = [], [], []
    for entry in entries:
        for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
            lines.append(draw(st.sampled_from([b"", b"  ", b"\t", b"\r"])))     # blank lines
        if entry[0] == "good":
            lines.append(dumps(entry[1], draw))
            good.append((len(lines), entry[2]))
        else:
            lines.append(entry[1])
            bad.append((len(lines), entry[2], entry[3]))
    data = eol.join(lines)
    if lines and draw(st.booleans()):
        data += eol                    # else the last line has no newline
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # a UTF-8 byte-order mark
    return data, good, bad


def _write(tmp_path_factory, data: bytes) -> str:
    path = os.path.join(str(tmp_path_factory.getbasetemp()), "fuzz.jsonl")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _assert_located(err, path, line, field, reason):
    assert type(err) is DataError, type(err)
    msg = str(err)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert err.path == path and err.line == line and err.field == field, (msg, line, field)
    assert msg.startswith(f"{path}:{line}: "), msg
    if field is not None:
        assert f"field {field!r}" in msg, msg
    assert reason in msg, (reason, msg)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_first_bad_line_is_reported_where_it_is(tmp_path_factory, kind, data):
    raw, good, bad = data.draw(jsonl_file(kind, min_bad=1))
    path = _write(tmp_path_factory, raw)
    with pytest.raises(Exception) as info:
        jsonl.read_jsonl(path, kind, check=length_check(kind))
    line, field, reason = bad[0]
    _assert_located(info.value, path, line, field, reason)


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_drop_invalid_keeps_exactly_the_valid_records(tmp_path_factory, kind, data):
    raw, good, bad = data.draw(jsonl_file(kind))
    path = _write(tmp_path_factory, raw)
    reasons = __import__("collections").Counter()
    try:
        records, lines, n_dropped = jsonl.read_jsonl_with_lines(
            path, kind, drop_invalid=True, check=length_check(kind), reasons=reasons)
    except DataError as e:
        assert not good, f"valid records lost: {e}"
        assert type(e) is DataError and e.line is None and str(e).startswith(f"{path}: no {kind} records")
        return
    assert records == [expected for _, expected in good]
    assert lines == [line for line, _ in good]
    assert n_dropped == len(bad) == sum(reasons.values())
    # Strings are kept exactly as written, types included.
    for r, (_, expected) in zip(records, good):
        assert json.dumps(r, sort_keys=True) == json.dumps(expected, sort_keys=True)
    # Without drop_invalid the same file is all good or fails at the first bad line.
    if bad:
        with pytest.raises(DataError) as info:
            jsonl.read_jsonl(path, kind, check=length_check(kind))
        _assert_located(info.value, path, *bad[0])
    else:
        assert jsonl.read_jsonl(path, kind, check=length_check(kind)) == (records, 0)


@SETTINGS
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_data_error(tmp_path_factory, data):
    """Whatever the bytes, every kind either reads records or raises a located DataError."""
    path = _write(tmp_path_factory, data)
    n_lines = data.count(b"\n") + 1
    for kind in KINDS:
        for drop in (False, True):
            try:
                records, n_dropped = jsonl.read_jsonl(path, kind, drop_invalid=drop)
            except DataError as e:
                assert type(e) is DataError and str(e).startswith(path)
                assert e.line is None or 1 <= e.line <= n_lines
            else:
                assert records and all(isinstance(r, dict) for r in records)
                assert not drop or n_dropped >= 0
