"""Tokenization transforms: one record -> a dict of fixed-shape numpy arrays.

Conventions shared by every transform here:

- Sequences are `prompt ids + response ids + EOS` (`tokenizer.encode_prompt`,
  `tokenizer.encode_response`), RIGHT-padded with `tok.pad_id`; prompts for
  sampling are LEFT-padded so that every prompt ends at the same position.
- `attn_mask` / `mask` are int32, 1 = a real token, 0 = padding.
- `loss_mask[t]` weights the prediction MADE AT position t, i.e. of target
  token `tokens[t + 1]`. With logits `[B, T, V]` from `tokens`:

      nll  = cross_entropy(logits[:, :-1], tokens[:, 1:])       # [B, T-1]
      loss = sum(nll * loss_mask[:, :-1]) / sum(loss_mask[:, :-1])

  `loss_mask[:, -1]` is always 0 (nothing follows the last position), and
  `tokens[1:][loss_mask[:-1] == 1]` are exactly the scored targets.
- A sequence that does not fit raises `ValueError`; callers reject such
  records when loading, with `length_check` as `open_source(..., check=...)`,
  so that the error names the file and line (or drops it, counted).
"""
from __future__ import annotations

import bisect
from typing import Optional, Sequence

import numpy as np

from rlhf_jax.tokenizer import DOCUMENT_SEPARATOR, encode_prompt, encode_response

# Rank given to the padding slots of a comparison (never a real rank: K <= 9).
INVALID_RANK = np.iinfo(np.int32).max


def _sequence(tok, prompt_ids: list[int], response_ids: list[int], max_len: int
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """Right-padded `tokens`, `attn_mask` [max_len] and the real length."""
    ids = prompt_ids + response_ids
    n = len(ids)
    if n > max_len:
        raise ValueError(f"prompt + response is {n} tokens ({len(prompt_ids)} + "
                         f"{len(response_ids)}), more than max_len={max_len}; reject long "
                         f"records at load time with preprocess.length_check")
    tokens = np.full((max_len,), tok.pad_id, dtype=np.int32)
    tokens[:n] = ids
    attn_mask = np.zeros((max_len,), dtype=np.int32)
    attn_mask[:n] = 1
    return tokens, attn_mask, n


def sft_length(tok, record: dict) -> int:
    """Tokens of a demonstration as `sft_example` lays it out: prompt + response + EOS."""
    return len(encode_prompt(tok, record["prompt"])) + len(encode_response(tok, record["response"]))


def sft_example(tok, record: dict, max_len: int) -> dict[str, np.ndarray]:
    """A demonstration for supervised fine-tuning.

    Returns:
      tokens: int32 [max_len], prompt + response + EOS, right-padded with pad_id.
      loss_mask: float32 [max_len], 1 at positions t whose target tokens[t + 1]
        is a response token or the EOS (t = P-1 .. P+R-1 for a prompt of P ids
        and a response of R ids plus EOS); 0 elsewhere.
      attn_mask: int32 [max_len], 1 on the P + R + 1 real tokens.

    Raises:
      ValueError: the sequence is longer than max_len, or the prompt encodes
        to no tokens (the first response token would have no predictor).
    """
    prompt_ids = encode_prompt(tok, record["prompt"])
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; the first response token "
                         "could not be predicted")
    tokens, attn_mask, n = _sequence(tok, prompt_ids, encode_response(tok, record["response"]),
                                     max_len)
    loss_mask = np.zeros((max_len,), dtype=np.float32)
    loss_mask[len(prompt_ids) - 1: n - 1] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask, "attn_mask": attn_mask}


def text_example(tok, record: dict, max_len: int) -> dict[str, np.ndarray]:
    """Pretraining text (the "ptx" of PPO-ptx): text + EOS, every next token scored.

    A text may hold several documents separated by DOCUMENT_SEPARATOR (the
    ASCII record separator, U+001E; the world's pages of conversations): each
    document is followed by EOS, as the conversations of a chat are.
    A text longer than max_len - 1 tokens is TRUNCATED to its first max_len
    tokens (its EOS is then cut off); nothing is dropped or split.

    Returns:
      tokens: int32 [max_len], text + EOS, right-padded with pad_id.
      loss_mask: float32 [max_len], 1 at t = 0 .. n-2 for n real tokens
        (every real next token is a target).
      attn_mask: int32 [max_len], 1 on the n real tokens.
    """
    ids = text_ids(tok, record["text"])[:max_len]
    tokens, attn_mask, n = _sequence(tok, [], ids, max_len)
    loss_mask = np.zeros((max_len,), dtype=np.float32)
    loss_mask[: max(n - 1, 0)] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask, "attn_mask": attn_mask}


def text_ids(tok, text: str) -> list[int]:
    """A text's ids as `text_example` lays them out: each document + EOS."""
    ids = []
    for document in text.split(DOCUMENT_SEPARATOR):
        ids += tok.encode(document) + [tok.eos_id]
    return ids


def pack_texts(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Groups texts into rows of at most max_len tokens (sequence packing).

    Best fit, longest first: each row starts with the longest text left and
    takes the longest that still fits, until none does. A text longer than
    max_len gets a row of its own (and is truncated there, as by
    `text_example`). Deterministic: ties go to the lower index.

    Returns:
      rows: lists of indices into `lengths`; every index appears once.
    """
    by_length: dict[int, list[int]] = {}
    for i in reversed(range(len(lengths))):  # pop() then takes the lowest index
        by_length.setdefault(min(int(lengths[i]), max_len), []).append(i)
    present = sorted(by_length)              # lengths with texts left, ascending
    rows = []

    def take(length: int) -> int:
        i = by_length[length].pop()
        if not by_length[length]:
            present.remove(length)
        return i

    while present:
        top = present[-1]
        row, space = [take(top)], max_len - top
        while present and present[0] <= space:
            fit = present[bisect.bisect_right(present, space) - 1]
            row.append(take(fit))
            space -= fit
        rows.append(row)
    return rows


def packed_text_example(tok, record: dict, max_len: int) -> dict[str, np.ndarray]:
    """Several texts in one row (`record["texts"]`, grouped by `pack_texts`).

    Each text is laid out as by `text_example` and gets its own segment id
    (1, 2, ...) in `attn_mask`, which the model reads as "attend within the
    segment, positions from 0" (models.transformer.attention_inputs), so the
    row computes what the texts would alone. Every next token within a text
    is a target; the first token of the next text is not.

    Returns:
      tokens: int32 [max_len], right-padded with pad_id.
      loss_mask: float32 [max_len].
      attn_mask: int32 [max_len], the segment id of each token, 0 = padding.
    """
    tokens = np.full((max_len,), tok.pad_id, dtype=np.int32)
    loss_mask = np.zeros((max_len,), dtype=np.float32)
    attn_mask = np.zeros((max_len,), dtype=np.int32)
    at = 0
    for segment, text in enumerate(record["texts"], start=1):
        ids = text_ids(tok, text)[:max_len - at]
        if not ids:
            break
        tokens[at:at + len(ids)] = ids
        attn_mask[at:at + len(ids)] = segment
        loss_mask[at:at + len(ids) - 1] = 1.0
        at += len(ids)
    return {"tokens": tokens, "loss_mask": loss_mask, "attn_mask": attn_mask}


def prompt_length(tok, record: dict) -> int:
    """Tokens of a record's prompt (the conversation up to the response)."""
    return len(encode_prompt(tok, record["prompt"]))


def prompt_example(tok, record: dict, max_prompt_len: int) -> dict[str, np.ndarray]:
    """A prompt for sampling, LEFT-padded so generation starts at one position for all rows.

    Returns:
      tokens: int32 [max_prompt_len], pad_id then the prompt ids.
      mask: int32 [max_prompt_len], 1 on the real (rightmost) prompt tokens.
        Positions for a model are `cumsum(mask) - 1` (clipped at 0).

    Raises:
      ValueError: the prompt is longer than max_prompt_len.
    """
    ids = encode_prompt(tok, record["prompt"])
    n = len(ids)
    if n > max_prompt_len:
        raise ValueError(f"prompt is {n} tokens, more than max_prompt_len={max_prompt_len}; "
                         f"reject long prompts at load time with preprocess.length_check")
    tokens = np.full((max_prompt_len,), tok.pad_id, dtype=np.int32)
    mask = np.zeros((max_prompt_len,), dtype=np.int32)
    if n:
        tokens[-n:] = ids
        mask[-n:] = 1
    return {"tokens": tokens, "mask": mask}


def comparison_length(tok, record: dict) -> int:
    """Tokens of the longest prompt + response + EOS of a comparison."""
    p = len(encode_prompt(tok, record["prompt"]))
    return p + max(len(encode_response(tok, r)) for r in record["responses"])


def comparison_example(tok, record: dict, k_max: int, max_len: int) -> dict[str, np.ndarray]:
    """A K-wise comparison for the reward model, K <= k_max slots filled.

    Slot k < K holds prompt + responses[k] + EOS; slots k >= K are padding.

    Returns:
      tokens: int32 [k_max, max_len], right-padded with pad_id (padding slots
        are all pad_id).
      attn_mask: int32 [k_max, max_len], 1 = real token (padding slots all 0:
        a model must tolerate fully masked rows, e.g. a finite mask value).
      last_index: int32 [k_max], index of each slot's last real token, the EOS,
        where the reward is read (0 for padding slots).
      ranks: int32 [k_max], 0 = best, ties allowed; INVALID_RANK in padding slots.
      valid: bool [k_max], True for the K real slots. A pair (i, j) is a
        training pair iff valid[i] & valid[j] & (ranks[i] < ranks[j]).

    Raises:
      ValueError: K > k_max, or a sequence longer than max_len.
    """
    responses, ranks = record["responses"], record["ranks"]
    k = len(responses)
    if k > k_max:
        raise ValueError(f"comparison has {k} responses, more than k_max={k_max}")
    prompt_ids = encode_prompt(tok, record["prompt"])
    out = {
        "tokens": np.full((k_max, max_len), tok.pad_id, dtype=np.int32),
        "attn_mask": np.zeros((k_max, max_len), dtype=np.int32),
        "last_index": np.zeros((k_max,), dtype=np.int32),
        "ranks": np.full((k_max,), INVALID_RANK, dtype=np.int32),
        "valid": np.zeros((k_max,), dtype=bool),
    }
    for i, (response, rank) in enumerate(zip(responses, ranks)):
        tokens, attn_mask, n = _sequence(tok, prompt_ids, encode_response(tok, response), max_len)
        out["tokens"][i] = tokens
        out["attn_mask"][i] = attn_mask
        out["last_index"][i] = n - 1
        out["ranks"][i] = rank
        out["valid"][i] = True
    return out


def distinct_rows(batch: dict, buckets: Sequence[tuple[int, int]], row_offset: int = 0
                  ) -> dict[str, np.ndarray]:
    """A batch of `comparison_example`s with each prompt's distinct responses
    laid out once, as rows of forward passes grouped by length.

    A peaked policy answers a prompt with the same string several times (five
    SFT samples are often one answer); identical sequences get identical
    scores, so a K-wise loss needs only a prompt's distinct responses computed
    (about half the slots of the world's comparisons). Padding slots take no
    row. Rows are grouped into length buckets, each a forward pass over
    sequences cut to its length: attention's cost grows with the square of
    the length, and most world sequences are half the context. The loss over
    slots is unchanged: every slot reads its row's score.

    Args:
      batch: tokens/attn_mask [B, K, L], last_index [B, K], valid [B, K] and
        any other per-prompt arrays (passed through).
      buckets: ((length, rows), ...) by increasing length, the last length L:
        a response goes to the shortest bucket that holds it and has room,
        else to a longer one. When the distinct responses do not fit at all,
        one bucket (L, B * K) holds them (a second compiled shape).
      row_offset: added to `slot_row` (a process's first row in a
        multi-process global batch).

    Returns:
      the batch without tokens/attn_mask/last_index, plus per bucket g
      row_tokens_g, row_attn_mask_g [rows_g, length_g]: its sequences, then
        padding rows (all-zero attention);
      row_last_index_g [rows_g]: each row's last real token (0 for padding);
      and slot_row [B, K] int32: the row each slot reads, counting through the
        buckets in order (padding slots: row 0; masked by `valid`).
    """
    tokens_BxKxL, valid_BxK = batch["tokens"], batch["valid"]
    b, k, l = tokens_BxKxL.shape
    if buckets[-1][0] != l:
        raise ValueError(f"the last bucket's length {buckets[-1][0]} must be the batch's {l}")
    first: dict[tuple[int, bytes], tuple[int, int]] = {}    # (prompt, sequence) -> its slot
    for i in range(b):
        for j in range(k):
            if valid_BxK[i, j]:
                first.setdefault((i, tokens_BxKxL[i, j].tobytes()), (i, j))
    distinct = list(first.values())
    lengths = [int(batch["last_index"][i, j]) + 1 for i, j in distinct]
    placed = _place(lengths, buckets)
    if placed is None:
        buckets = [(l, b * k)]
        placed = _place(lengths, buckets)
    out = {key: v for key, v in batch.items() if key not in ("tokens", "attn_mask", "last_index")}
    row_of: dict[tuple[int, int], int] = {}
    start = 0
    for g, ((length, rows), members) in enumerate(zip(buckets, placed)):
        src = [distinct[m] for m in members]
        for r, slot in enumerate(src):
            row_of[slot] = start + r
        # Padding rows repeat slot (0, 0)'s ids with no attention: finite, unread.
        src_b, src_k = np.asarray(src + [(0, 0)] * (rows - len(src)), np.int64).reshape(-1, 2).T
        real = np.arange(rows) < len(src)
        out[f"row_tokens_{g}"] = tokens_BxKxL[src_b, src_k, :length]
        out[f"row_attn_mask_{g}"] = np.where(real[:, None], batch["attn_mask"][src_b, src_k, :length],
                                             0).astype(batch["attn_mask"].dtype)
        out[f"row_last_index_{g}"] = np.where(real, batch["last_index"][src_b, src_k],
                                              0).astype(batch["last_index"].dtype)
        start += rows
    slot_row = np.zeros((b, k), np.int32)
    for i in range(b):
        for j in range(k):
            if valid_BxK[i, j]:
                slot_row[i, j] = row_of[first[(i, tokens_BxKxL[i, j].tobytes())]]
    out["slot_row"] = slot_row + np.int32(row_offset)
    return out


def _place(lengths: Sequence[int], buckets) -> Optional[list[list[int]]]:
    """Indices of `lengths` per bucket, each in the shortest bucket that holds
    it and has room (longest first, so short ones fill what is left); None
    when they do not all fit."""
    room = [rows for _, rows in buckets]
    placed: list[list[int]] = [[] for _ in buckets]
    for m in sorted(range(len(lengths)), key=lambda m: -lengths[m]):
        for g, (length, _) in enumerate(buckets):
            if lengths[m] <= length and room[g]:
                placed[g].append(m)
                room[g] -= 1
                break
        else:
            return None
    for members in placed:
        members.sort()
    return placed


def length_check(tok, kind: str, max_len: Optional[int] = None,
                 max_prompt_len: Optional[int] = None, k_max: Optional[int] = None):
    """A `check(record) -> Optional[str]` for `open_source` enforcing token limits.

    Each given limit applies where it makes sense for `kind`:
      max_len: prompt + response + EOS (demonstrations; every response of a
        comparison). Texts are truncated instead, so never rejected.
      max_prompt_len: the prompt (demonstrations, comparisons, prompts).
      k_max: the number of responses of a comparison.
    """

    def check(record: dict) -> Optional[str]:
        if max_prompt_len is not None and "prompt" in record:
            n = prompt_length(tok, record)
            if n > max_prompt_len:
                return f"prompt is {n} tokens, more than max_prompt_len={max_prompt_len}"
        if kind == "comparisons":
            if k_max is not None and len(record["responses"]) > k_max:
                return f"{len(record['responses'])} responses, more than k_max={k_max}"
            if max_len is not None:
                n = comparison_length(tok, record)
                if n > max_len:
                    return (f"prompt + longest response + EOS is {n} tokens, "
                            f"more than max_len={max_len}")
        elif kind == "demonstrations" and max_len is not None:
            n = sft_length(tok, record)
            if n > max_len:
                return f"prompt + response + EOS is {n} tokens, more than max_len={max_len}"
        return None

    return check
