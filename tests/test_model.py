"""The decoder: cached decoding equals the full forward pass; heads; names; precision."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params
from rlhf_jax.models import readout
from rlhf_jax.models.decoding import decode, decoding_params, init_layer_caches
from rlhf_jax.models.transformer import (ModelConfig, Transformer, expand_layers, init_cache,
                                         positions_from_mask)

LLAMA = ModelConfig(arch="llama", vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2,
                    intermediate=96, max_len=64)
GPT2 = ModelConfig(arch="gpt2", vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=4,
                   intermediate=96, max_len=64, tie_embeddings=True)
QWEN = LLAMA.replace(qkv_bias=True, tie_embeddings=True)


def _init(cfg, t=8, seed=0):
    """The model and its boxed init params (jitted, remembered: helpers.init_params)."""
    return Transformer(cfg), init_params(cfg, seed, t, boxed=True)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, attn_mask=None, rngs=None):
    """`model.apply` compiled once per (model, shapes): eagerly every call
    compiles the layer scan again, seconds each."""
    return model.apply({"params": params}, tokens, attn_mask=attn_mask, rngs=rngs)


def _cached_logits(model, params, tokens, mask, prefill, s, unrolled):
    """Logits of `tokens` fed as a prefill of `prefill` tokens then one token
    per call, through the module's cached call or the unrolled `decode`."""
    b, t = tokens.shape
    pos = positions_from_mask(mask)
    kv_mask = jnp.concatenate([mask[:, :prefill], jnp.zeros((b, s - prefill), jnp.int32)], 1)
    if unrolled:
        dparams, cache = decoding_params(model, params), init_layer_caches(model.cfg, b, s)
        step = jax.jit(lambda toks, p, m, c, i: decode(model, dparams, toks, p, m, c, i))
    else:
        cache = init_cache(model.cfg, b, s)
        step = jax.jit(lambda toks, p, m, c, i: model.apply(
            {"params": params}, toks, positions=p, attn_mask=m, cache=c, cache_index=i))
    out, cache = step(tokens[:, :prefill], pos[:, :prefill], kv_mask, cache, jnp.int32(0))
    outs = [out]
    for i in range(prefill, t):
        kv_mask = kv_mask.at[:, i].set(mask[:, i])
        o, cache = step(tokens[:, i:i + 1], pos[:, i:i + 1], kv_mask, cache, jnp.int32(i))
        outs.append(o)
    return jnp.concatenate(outs, axis=1), cache


def _biased(cfg):
    model, boxed = _init(cfg)
    # Make biases non-zero so that they matter.
    return model, jax.tree_util.tree_map(lambda x: x + 0.01 if x.ndim <= 3 else x, nn.unbox(boxed))


_DECODE_MASK = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10, [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("unrolled", [False, True], ids=["module", "decode"])
@pytest.mark.parametrize("cfg", [LLAMA, GPT2, QWEN], ids=["llama", "gpt2", "qwen2"])
def test_cached_decode_equals_full_forward(cfg, unrolled):
    model, params = _biased(cfg)
    b, t, prefill, s = 3, 10, 4, 14
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, cfg.vocab_size)
    mask = _DECODE_MASK
    full = _apply(model, params, tokens, mask)
    inc, _ = _cached_logits(model, params, tokens, mask, prefill, s, unrolled)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(inc)[real], np.asarray(full)[real], atol=2e-5, rtol=1e-5)
    assert full.shape == (b, t, cfg.vocab_size)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2, QWEN], ids=["llama", "gpt2", "qwen2"])
def test_unrolled_decode_equals_the_modules_cached_call_in_bf16(cfg):
    """The sampler's path (per-layer weights cast once, per-layer caches) gives
    the module's cached call's logits and cache with bf16 matmuls too (f32:
    the test above)."""
    cfg = cfg.replace(matmul="bf16")
    model, params = _biased(cfg)
    dparams = decoding_params(model, params)
    kernel = dparams["layers"][1]["attn"]["q"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    assert kernel.shape == params["layers"]["attn"]["q"]["kernel"].shape[1:]
    if cfg.qkv_bias or cfg.arch == "gpt2":   # biases stay f32
        assert dparams["layers"][1]["attn"]["q"]["bias"].dtype == jnp.float32
    tokens = jax.random.randint(jax.random.PRNGKey(4), (3, 10), 0, cfg.vocab_size)
    ref, ref_cache = _cached_logits(model, params, tokens, _DECODE_MASK, 4, 12, unrolled=False)
    got, got_cache = _cached_logits(model, params, tokens, _DECODE_MASK, 4, 12, unrolled=True)
    real = np.asarray(_DECODE_MASK, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
    for name in ("k", "v"):
        stacked = np.stack([np.asarray(c[name]) for c in got_cache])
        assert stacked.shape == ref_cache[name].shape == (cfg.layers, 3, cfg.kv_heads, 12, 16)
        np.testing.assert_allclose(stacked, np.asarray(ref_cache[name]), atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_real_logits():
    model, params = _init(LLAMA)
    params = nn.unbox(params)
    toks = jax.random.randint(jax.random.PRNGKey(2), (1, 6), 0, 256)
    plain = _apply(model, params, toks)
    padded = jnp.concatenate([jnp.full((1, 3), 7), toks], axis=1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = _apply(model, params, padded, mask)
    np.testing.assert_allclose(out[:, 3:], plain, atol=2e-5)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_packed_segments_compute_what_each_text_alone_does(cfg):
    """Segment ids in attn_mask: each packed text's logits equal its own row's."""
    model, params = _init(cfg, t=12)
    params = nn.unbox(params)
    toks = jax.random.randint(jax.random.PRNGKey(3), (1, 12), 0, 256)
    packed = _apply(model, params, toks, jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0]]))
    for lo, hi in ((0, 5), (5, 8), (8, 11)):
        alone = _apply(model, params, toks[:, lo:hi])
        np.testing.assert_allclose(packed[:, lo:hi], alone, atol=2e-5)
    with pytest.raises(AssertionError):  # a 0/1 mask lets the later texts see the first
        np.testing.assert_allclose(_apply(model, params, toks, (jnp.arange(12) < 11)[None])[:, 5:8],
                                   _apply(model, params, toks[:, 5:8]), atol=2e-5)


def test_positions_restart_per_segment_and_keep_the_0_1_layout():
    seg = jnp.array([[0, 0, 1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]])
    assert positions_from_mask(seg).tolist() == [[0, 0, 0, 1, 2, 0, 1, 0, 0, 0],
                                                 [0, 1, 1, 2, 2, 2, 2, 2, 2, 2]]


def test_scalar_head_and_param_names():
    cfg = LLAMA.replace(head="scalar")
    model, boxed = _init(cfg)
    params = nn.unbox(boxed)
    out = _apply(model, params, jnp.ones((2, 5), jnp.int32))
    assert out.shape == (2, 5) and out.dtype == jnp.float32
    assert "lm_head" not in params and "score_head" in params
    # Every parameter carries one logical name per dimension; layers are stacked.
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(l, nn.LogicallyPartitioned) for l in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
    assert params["layers"]["attn"]["q"]["kernel"].shape == (cfg.layers, 64, 4, 16)
    assert params["layers"]["attn"]["k"]["kernel"].shape == (cfg.layers, 64, 2, 16)


def test_bf16_matmul_close_to_f32():
    model, params = _init(LLAMA)
    params = nn.unbox(params)
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, 256)
    f32 = _apply(model, params, toks)
    bf = _apply(Transformer(LLAMA.replace(matmul="bf16")), params, toks)
    assert bf.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(bf - f32)))
    assert 0 < err < 0.05, err


def test_dropout_only_when_not_deterministic():
    cfg = LLAMA.replace(dropout=0.5)
    model, params = _init(cfg)
    params = nn.unbox(params)
    toks = jnp.ones((1, 6), jnp.int32)
    a = _apply(Transformer(cfg), params, toks)
    b = _apply(Transformer(cfg), params, toks)
    np.testing.assert_array_equal(a, b)
    train = Transformer(cfg, deterministic=False)
    c = _apply(train, params, toks, rngs={"dropout": jax.random.PRNGKey(0)})
    d = _apply(train, params, toks, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(c, d)


def test_gqa_matches_repeated_kv_heads():
    """GQA with 2 kv heads equals MHA whose 4 kv heads repeat each of them."""
    model, params = _init(LLAMA)
    params = nn.unbox(params)
    mha_cfg = LLAMA.replace(kv_heads=4)
    mha = Transformer(mha_cfg)
    p = jax.tree_util.tree_map(lambda x: x, params)
    attn = dict(p["layers"]["attn"])
    for name in ("k", "v"):
        k = attn[name]["kernel"]  # [L, E, 2, D]
        attn[name] = {"kernel": jnp.repeat(k, 2, axis=2)}
    p = dict(p, layers=dict(p["layers"], attn=attn))
    toks = jax.random.randint(jax.random.PRNGKey(4), (2, 7), 0, 256)
    np.testing.assert_allclose(_apply(mha, p, toks), _apply(model, params, toks), atol=2e-5)


@pytest.mark.parametrize("eq,x_shape,w_shape", [
    ("bte,ehd->bthd", (2, 5, 8), (8, 3, 4)),       # q / k / v
    ("bthd,hde->bte", (2, 5, 3, 4), (3, 4, 8)),    # attention output
    ("bte,em->btm", (2, 5, 8), (8, 6)),            # MLP
    ("bte,ev->btv", (1, 1, 8), (8, 7)),            # a head at one decode position
    ("btkgd,bskd->bkgts", (2, 5, 2, 2, 4), (2, 6, 2, 4)),  # not a projection: the einsum
])
@pytest.mark.parametrize("matmul", ["float32", "bf16"])
def test_dense_matmul_equals_einsum(eq, x_shape, w_shape, matmul):
    """Projections run as one 2-D matmul (faster to differentiate on CPU); values
    and both gradients must be the einsum's."""
    from rlhf_jax.models.transformer import _dense_mm, _mm
    cfg = LLAMA.replace(matmul=matmul)
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    w = jax.random.normal(jax.random.PRNGKey(1), w_shape)
    cot = jax.random.normal(jax.random.PRNGKey(2), jnp.einsum(eq, x, w).shape)
    tol = dict(rtol=2e-2, atol=2e-2) if matmul == "bf16" else dict(rtol=1e-5, atol=1e-5)
    out, out_vjp = jax.vjp(lambda a, b: _dense_mm(cfg, eq, a, b), x, w)
    ref, ref_vjp = jax.vjp(lambda a, b: _mm(cfg, eq, a, b), x, w)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, **tol)
    for g, r in zip(out_vjp(cot), ref_vjp(cot)):      # d/dx and d/dw
        np.testing.assert_allclose(g, r, **tol)


def test_scan_unroll_changes_nothing_but_speed():
    """scan_unroll keeps the params' structure and the math: logits and
    gradients equal those of the rolled layer loop."""
    cfg = LLAMA.replace(layers=3)
    _, boxed = _init(cfg)
    params = nn.unbox(boxed)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)

    def loss(p, c):
        return jnp.mean(jax.nn.log_softmax(Transformer(c).apply({"params": p}, tokens))[..., 0])

    # The loss and its gradient in one program per config (the config static;
    # eagerly each call compiles its scans again).
    loss_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    rolled = loss_and_grad(params, cfg)
    # 2 of 3 layers: an unrolled pair, then the remainder's rolled iteration.
    unrolled = cfg.replace(scan_unroll=2)
    # The structure init gives, without running it.
    boxed_u = jax.eval_shape(lambda r: Transformer(unrolled).init(
        r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(nn.unbox(boxed_u)) == jax.tree_util.tree_structure(params)
    value, grad = loss_and_grad(params, unrolled)
    np.testing.assert_allclose(value, rolled[0], rtol=1e-6)
    for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(rolled[1])):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_outputs_at_is_the_slice_of_the_full_call(head):
    """PPO's head over the response positions only equals the full call, sliced."""
    model, boxed = _init(QWEN.replace(head=head))
    params = nn.unbox(boxed)
    toks = jax.random.randint(jax.random.PRNGKey(5), (3, 10), 0, 256)
    full = _apply(model, params, toks, _DECODE_MASK)
    part = jax.jit(lambda p, t: model.apply({"params": p}, t, 5, 4, attn_mask=_DECODE_MASK,
                                            method=Transformer.outputs_at))(params, toks)
    assert part.shape == full[:, 5:9].shape
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, 5:9]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cfg", [QWEN.replace(layers=3, head="scalar"), GPT2.replace(layers=1)],
                         ids=["qwen2-3-layers-scalar", "gpt2-1-layer-lm"])
def test_readout_at_cols_equals_the_full_call_and_its_gradient(cfg):
    """The reward model's read at a few positions a row (the last layer
    computed there only) equals the full call read there, on left-padded,
    right-padded and packed rows, and so does its gradient."""
    model, params = _biased(cfg)
    toks = jax.random.randint(jax.random.PRNGKey(7), (3, 10), 0, 256)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                      [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]])
    cols = jnp.array([[9, 4], [6, 0], [2, 6]])

    def full(p, c):
        out = model.apply({"params": p}, toks, attn_mask=mask)
        return jnp.take_along_axis(out, c if out.ndim == 2 else c[..., None], axis=1)

    def read(p, c):
        return readout.outputs_at_cols(model, p, toks, c, mask)

    def with_grad(f):       # (outputs, gradient of a function of them), one compile
        return jax.jit(jax.value_and_grad(lambda p, c: (jnp.sum(jnp.sin(f(p, c))), f(p, c)),
                                          has_aux=True))

    (_, want), g_full = with_grad(full)(params, cols)
    read_fn = with_grad(read)
    (_, got), g_read = read_fn(params, cols)
    assert got.shape == want.shape == (3, 2) + (() if cfg.head == "scalar" else (300,))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_read)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)
    # The last layer's queries at other positions give other outputs.
    (_, other), _ = read_fn(params, cols[:, ::-1])
    assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-4


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_block_expansion_starts_as_the_shallower_network(cfg):
    """expand_layers: the deeper network's logits equal the original's, its
    new layers are copies of the old ones but for zeroed output projections
    (kernels and biases), and once those move the new layers do compute."""
    model, params = _biased(cfg)
    deep_cfg = cfg.replace(layers=cfg.layers + 3)
    deep = expand_layers(params, 3)
    assert jax.tree_util.tree_structure(deep) == jax.tree_util.tree_structure(params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(deep["layers"])[0]:
        old = params["layers"]
        for k in path:
            old = old[k.key]
        assert leaf.shape == (deep_cfg.layers,) + old.shape[1:]
        np.testing.assert_array_equal(leaf[:cfg.layers], old)
        projection = any(k.key in ("o", "down") for k in path)
        for i in range(3):
            np.testing.assert_array_equal(leaf[cfg.layers + i],
                                          0 * old[i % cfg.layers] if projection else old[i % cfg.layers])
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, cfg.vocab_size)
    shallow_logits = _apply(model, params, tokens)
    np.testing.assert_allclose(_apply(Transformer(deep_cfg), deep, tokens), shallow_logits,
                               atol=1e-5, rtol=1e-5)
    moved = jax.tree_util.tree_map(lambda x: x + 0.05, deep)
    assert not np.allclose(_apply(Transformer(deep_cfg), moved, tokens),
                           _apply(model, jax.tree_util.tree_map(lambda x: x + 0.05, params), tokens))
