"""HuggingFace checkpoints on the import side, and config.json both ways.

Holds `PretrainedError`, the memory-mapped safetensors reader (single file or
sharded index), `config_from_hf` / `hf_config_from` (transformers
`config.json` <-> ModelConfig), and the lazy parameter "sources" that map a
checkpoint's tensors onto our tree: `_llama_source` (shared with GGUF) and
`_gpt2_source`, with `_hf_source` for an HF directory.

Layouts. HF linear weights are [out, in]; ours are einsum kernels with the
input axis first: q/k/v [E, heads, D], o [heads, D, E], gate/up [E, M],
down [M, E], lm_head [E, V], stacked over layers by the layer scan. GPT-2's
Conv1D weights are already [in, out], and its `c_attn` holds q, k, v side by
side on the output axis.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Callable, Iterable

import numpy as np

from rlhf_jax.models.transformer import ModelConfig


class PretrainedError(ValueError):
    """A checkpoint the pretrained importers and exporter cannot read or write faithfully."""


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
