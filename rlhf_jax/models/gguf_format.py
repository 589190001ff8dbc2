"""GGUF (llama.cpp) files on the import side: the memory-mapped reader, the
ModelConfig from `{arch}.*` metadata, the dequantized tensor source (with the
Q/K row permutation llama.cpp's converter applies to llama models undone),
and the byte-level BPE tokenizer rebuilt from `tokenizer.ggml.*` vocab/merges.
"""
from __future__ import annotations

import functools
import os
import struct
import warnings
from typing import Any, NamedTuple

import numpy as np

from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.models.hf_format import PretrainedError, _llama_source
from rlhf_jax.models.transformer import ModelConfig


_GGUF_LLAMA_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight", "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias", "v_bias": "blk.{i}.attn_v.bias",
    "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight", "attn_norm": "blk.{i}.attn_norm.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
}


def _gguf_reader(path: str):
    """The file's metadata and its tensors (memory-mapped); the last file read
    is kept, since weights and tokenizer are usually read one after the other."""
    st = os.stat(path)
    return _cached_reader(os.path.realpath(path), st.st_mtime_ns, st.st_size)


class _GGUFTensor(NamedTuple):
    name: str
    shape: tuple            # ggml order: the fastest-varying dimension first
    tensor_type: Any        # gguf.GGMLQuantizationType
    data: np.ndarray        # numpy order; quantized types as their raw bytes per row


class _GGUFFile(NamedTuple):
    fields: dict            # metadata key -> value (arrays as lists)
    tensors: list


# GGUF metadata value types (gguf.GGUFValueType) with a fixed size, as struct
# formats; 8 is a string (u64 length, UTF-8 bytes), 9 an array (item type, u64
# count, items).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, mtime_ns: int, size: int) -> _GGUFFile:
    """Reads a little-endian GGUF file (versions 2 and 3): a header, the
    metadata, the tensor infos, then the aligned tensor data
    (github.com/ggml-org/ggml/blob/master/docs/gguf.md). `gguf.GGUFReader`
    reads the same, but builds NumPy views of every string of the vocabulary
    and merges: 5 s for SmolLM2's metadata, against 0.1 s here."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise PretrainedError("reading .gguf files needs the `gguf` package") from e
    data = np.memmap(path, mode="r")
    buf = memoryview(data)
    off = 0

    def scalar(code):
        nonlocal off
        (out,) = struct.unpack_from("<" + code, buf, off)
        off += struct.calcsize(code)
        return out

    def string():
        nonlocal off
        (n,) = struct.unpack_from("<Q", buf, off)
        off += 8 + n
        return str(buf[off - n:off], "utf-8", errors="replace")

    def value(kind):
        nonlocal off
        if kind == _GGUF_STRING:
            return string()
        if kind == _GGUF_ARRAY:
            item, count = scalar("I"), scalar("Q")
            if item == _GGUF_STRING:
                return [string() for _ in range(count)]
            if item in _GGUF_SCALARS:
                dtype = np.dtype("<" + _GGUF_SCALARS[item])
                out = np.frombuffer(buf, dtype, count, off).tolist()
                off += dtype.itemsize * count
                return out
            return [value(item) for _ in range(count)]
        if kind not in _GGUF_SCALARS:
            raise PretrainedError(f"{path}: GGUF metadata value type {kind} is not known")
        return scalar(_GGUF_SCALARS[kind])

    if bytes(buf[:4]) != b"GGUF":
        raise PretrainedError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    off = 4
    version = scalar("I")
    if version not in (2, 3):
        raise PretrainedError(f"{path}: GGUF version {version} is not supported (2 and 3 "
                              "little-endian are)")
    n_tensors, n_fields = scalar("Q"), scalar("Q")
    fields = {}
    for _ in range(n_fields):
        key = string()
        fields[key] = value(scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(scalar("Q") for _ in range(scalar("I")))
        infos.append((name, dims, GGMLQuantizationType(scalar("I")), scalar("Q")))
    align = int(fields.get("general.alignment", 32))
    start = -(-off // align) * align
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    tensors = []
    for name, dims, kind, offset in infos:
        shape, n = tuple(reversed(dims)), int(np.prod(dims))
        if kind in plain:
            dtype = plain[kind]
        else:                         # blocks of quantized values, as bytes per row
            block, size = GGML_QUANT_SIZES[kind]
            dtype, n, shape = np.uint8, n * size // block, quant_shape_to_byte_shape(shape, kind)
        array = np.ndarray((n,), dtype, data, start + offset).reshape(shape)
        tensors.append(_GGUFTensor(name, dims, kind, array))
    return _GGUFFile(fields, tensors)


def _gguf_field(reader, key: str, default=None):
    return reader.fields.get(key, default)


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def _gguf_config(reader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise PretrainedError(f"GGUF architecture {arch!r} is not supported (llama, qwen2)")
    f = lambda key, default=None: _gguf_field(reader, f"{arch}.{key}", default)
    scaling = f("rope.scaling.type")
    if scaling not in (None, "none"):
        raise PretrainedError(f"GGUF rope scaling {scaling!r} is not supported")
    hidden, heads = int(f("embedding_length")), int(f("attention.head_count"))
    head_dim = int(f("attention.key_length", hidden // heads))
    rope_dim = int(f("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise PretrainedError(f"partial rotary embeddings (rope dim {rope_dim} of {head_dim}) "
                              "are not supported")
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors["token_embd.weight"]
    vocab = int(embd.shape[-1])  # ggml order: [embed, vocab]
    return ModelConfig(
        arch="llama", vocab_size=vocab, hidden=hidden, layers=int(f("block_count")), heads=heads,
        kv_heads=int(f("attention.head_count_kv", heads)),
        head_dim=0 if head_dim * heads == hidden else head_dim,
        intermediate=int(f("feed_forward_length")), max_len=int(f("context_length", 2048)),
        norm_eps=_f32(f("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(f("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensors, qkv_bias=arch == "qwen2")


def _gguf_source(reader, cfg: ModelConfig) -> tuple[dict, Any]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    used = set()

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise PretrainedError(f"GGUF file has no tensor {name!r}")
        used.add(name)
        shape = tuple(int(s) for s in reversed(t.shape))   # ggml ne order -> numpy
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(t.data, dtype=np.float32)
        else:
            data = dequantize(t.data, t.tensor_type).astype(np.float32)
        return data.reshape(shape)

    arch = _gguf_field(reader, "general.architecture")
    src = _llama_source(cfg, get, _GGUF_LLAMA_NAMES, permute_qk=arch == "llama")

    class _Used:
        def unused(self):
            return sorted(set(tensors) - used)
    return src, _Used()


# ---------------------------------------------------------------------------
# GGUF tokenizer -> HF `tokenizers` Tokenizer
# ---------------------------------------------------------------------------

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) and how they split text
# before byte-level BPE (llama.cpp src/llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "default": ("gpt2", None), "gpt2": ("gpt2", None), "gpt-2": ("gpt2", None),
    # SmolLM, StarCoder: every digit on its own, then the GPT-2 split.
    "smollm": ("gpt2", "digits"), "starcoder": ("gpt2", "digits"), "refact": ("gpt2", "digits"),
    "llama3": ("regex", _LLAMA3_SPLIT), "llama-v3": ("regex", _LLAMA3_SPLIT),
    "llama-bpe": ("regex", _LLAMA3_SPLIT), "smaug-bpe": ("regex", _LLAMA3_SPLIT),
    "qwen2": ("regex", _QWEN2_SPLIT), "deepseek-r1-qwen": ("regex", _QWEN2_SPLIT),
}


def _gguf_hf_tokenizer(reader):
    """A byte-level BPE `tokenizers.Tokenizer` (and token metadata) from a
    GGUF file's `tokenizer.ggml.*` fields."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise PretrainedError(
            f"GGUF tokenizer model {model!r} is not supported: only byte-level BPE ('gpt2', as in "
            "SmolLM2, Llama 3, Qwen2) can be rebuilt; use the model's HF directory instead")
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in (_gguf_field(reader, "tokenizer.ggml.merges") or [])]
    types = list(_gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise PretrainedError("GGUF vocabulary has duplicate tokens")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    kind, arg = _PRE_SPLITS.get(pre, (None, None))
    if kind is None:
        warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}: using the GPT-2 split")
        kind, arg = "gpt2", None
    if kind == "gpt2":
        steps = [pre_tokenizers.Digits(individual_digits=True)] if arg == "digits" else []
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps = [pre_tokenizers.Split(Regex(arg), behavior="isolated", invert=False),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    # 3: control (special, e.g. <|im_end|>), 4: user-defined (matched whole).
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if int(ty) == 3]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if int(ty) == 4]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)

    def tok_at(key):
        i = _gguf_field(reader, f"tokenizer.ggml.{key}")
        return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    meta = {k: tok_at(k + "_token_id") for k in ("bos", "eos", "padding", "unknown")}
    meta["chat_template"] = _gguf_field(reader, "tokenizer.chat_template")
    return tk, meta


def _attach(tok, bos_id=None, chat_template=None):
    """Token metadata the `rlhf_jax.tokenizer` classes do not carry themselves."""
    tok.bos_id = bos_id
    tok.chat_template = chat_template
    return tok


def _gguf_tokenizer(reader):
    tk, meta = _gguf_hf_tokenizer(reader)
    _, eos = meta["eos"]
    if eos is None:
        raise PretrainedError("GGUF file names no tokenizer.ggml.eos_token_id")
    template = meta["chat_template"] or ""
    fmt = (tokenizers.CHATML_PROMPT_FORMAT if "<|im_start|>" in template
           else tokenizers.DEFAULT_PROMPT_FORMAT)
    tok = tokenizers.HFTokenizer(tk, eos_token=eos, pad_token=meta["padding"][1], prompt_format=fmt)
    return _attach(tok, meta["bos"][0], meta["chat_template"])
