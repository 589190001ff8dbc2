"""Tokenizers: a built-in byte-level one and HF `tokenizers` (tokenizer.json).

Every tokenizer has a pad id distinct from its end-of-sequence id: PPO masks
tokens after EOS, and a pad that equals EOS would hide where a response ended.

The conversation format of the instruction world (WORLD.md) is
`User: {prompt}\nAssistant: {response}<eos>`; a tokenizer with a chat template
(e.g. ChatML for SmolLM2) replaces it through `prompt_format`.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

DEFAULT_PROMPT_FORMAT = "User: {prompt}\nAssistant: "
# Separates the documents of one `{"text"}` record (e.g. the conversations of
# a page); each document is followed by EOS when tokenized. The ASCII record
# separator, as JSON text sequences (RFC 7464) use it.
DOCUMENT_SEPARATOR = "\x1e"
CHATML_PROMPT_FORMAT = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then pad, eos.

    For models trained here from scratch: no vocabulary to ship, and any string
    round-trips exactly.
    """

    kind = "byte"

    def __init__(self, prompt_format: str = DEFAULT_PROMPT_FORMAT):
        self.pad_id = 256
        self.eos_id = 257
        self.vocab_size = 258
        self.prompt_format = prompt_format

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A HuggingFace `tokenizers` tokenizer (a `tokenizer.json` or an object)."""

    kind = "hf"

    def __init__(self, tokenizer, eos_token: str, pad_token: Optional[str] = None,
                 prompt_format: str = DEFAULT_PROMPT_FORMAT):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"tokenizer has no end-of-sequence token {eos_token!r}")
        self.eos_id = eos
        pad = tokenizer.token_to_id(pad_token) if pad_token else None
        if pad is None or pad == eos:
            # Pads are never attended to nor scored, so any id other than EOS
            # serves; take the last id that is not EOS.
            pad = self.vocab_size - 1 if self.vocab_size - 1 != eos else self.vocab_size - 2
        self.pad_id = pad
        self.prompt_format = prompt_format

    @classmethod
    def from_file(cls, path: str, **kw) -> "HFTokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(path), **kw)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def from_directory(path: str):
    """Loads the tokenizer of an HF model directory (tokenizer.json + configs)."""
    cfg = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(path, name)
        if os.path.exists(p):
            with open(p) as f:
                cfg.update({k: v for k, v in json.load(f).items() if v is not None})

    def _tok(v):
        return v.get("content") if isinstance(v, dict) else v

    eos = _tok(cfg.get("eos_token")) or "</s>"
    pad = _tok(cfg.get("pad_token"))
    template = cfg.get("chat_template") or ""
    jinja = os.path.join(path, "chat_template.jinja")  # where transformers >= 4.5x writes it
    if not template and os.path.exists(jinja):
        with open(jinja) as f:
            template = f.read()
    fmt = CHATML_PROMPT_FORMAT if "<|im_start|>" in str(template) else DEFAULT_PROMPT_FORMAT
    return HFTokenizer.from_file(os.path.join(path, "tokenizer.json"), eos_token=eos,
                                 pad_token=pad, prompt_format=fmt)


def encode_prompt(tok, prompt: str) -> list[int]:
    """Ids of the conversation up to where the response begins."""
    return tok.encode(tok.prompt_format.format(prompt=prompt))


def encode_response(tok, response: str) -> list[int]:
    """Ids of a response followed by end-of-sequence."""
    return tok.encode(response) + [tok.eos_id]


def decode_response(tok, ids: Sequence[int]) -> tuple[str, bool]:
    """Text of a sampled response cut at EOS, and whether EOS was reached."""
    ids = [int(i) for i in ids]
    finished = tok.eos_id in ids
    if finished:
        ids = ids[: ids.index(tok.eos_id)]
    ids = [i for i in ids if i != tok.pad_id]
    return tok.decode(ids), finished


def signature(tok) -> tuple:
    """What two tokenizers must share for one's token ids to mean the same to
    the other's models (policies judged on one prompt set, an RM scoring a
    policy's samples): the vocabulary itself (a hash of every token and its
    id, not its size: two vocabularies of one size may differ), the special
    ids and the prompt format."""
    return (type(tok).__name__, vocabulary_hash(tok), tok.eos_id, tok.pad_id, tok.prompt_format)


def vocabulary_hash(tok) -> str:
    """SHA-256 of the (token, id) pairs, sorted by id; the byte tokenizer's is fixed."""
    import hashlib
    if isinstance(tok, ByteTokenizer):
        return f"byte-{tok.vocab_size}"
    pairs = sorted(tok.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in pairs).encode()).hexdigest()
