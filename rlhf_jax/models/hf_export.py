"""HF export: `save_pretrained` writes an HF directory (`config.json`,
`generation_config.json`, f32 `model.safetensors` or shards with an index,
and tokenizer files for an HF tokenizer) that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import numpy as np

from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.models.hf_format import PretrainedError, hf_config_from
from rlhf_jax.models.transformer import ModelConfig, Transformer

__all__ = ["save_pretrained"]

_CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


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
