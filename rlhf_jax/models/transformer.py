"""One decoder for the Llama family and GPT-2, with an LM head or a scalar head.

Llama family: RMSNorm, RoPE (HF "rotate half" layout), SwiGLU, grouped-query
attention, tied or untied embeddings, optional qkv bias (Qwen2).
GPT-2: LayerNorm, learned positions, GELU MLP, biases everywhere, tied head.

The policy and the reference use the LM head (logits [B, T, V]); the reward
and value models replace the unembedding with a scalar head ([B, T]), as
InstructGPT does.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`,
`kv`, `mlp`, `vocab`, `layers`) and every major activation a logical
constraint (`batch`, `length`, `act_*`); `rlhf_jax.sharding` maps them onto a
mesh. Layers are one `nn.scan`, so compile time does not grow with depth;
the sampler's decode path (`decode`, end of file) unrolls them instead, over
per-layer weights split once per call, so that no decoded token copies them.

Attention masking works the same with or without a KV cache: `attn_mask`
[B, S] marks the key slots holding real tokens (left-padded prompts have
zeros at the front), and a query at slot q sees key slots s <= q.
Without a cache `attn_mask` may also hold segment ids, 1, 2, 3, ... rising
along a row (several documents packed into one row, as pretraining does,
`data.preprocess.packed_text_example`): a token then sees only its own
segment's earlier tokens and its positions restart at 0; a 0/1 mask is the
one-segment case.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"            # "llama" | "gpt2"
    vocab_size: int = 258
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 0              # 0: hidden // heads
    intermediate: int = 512
    max_len: int = 256             # context length (learned positions for gpt2)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    qkv_bias: bool = False
    dropout: float = 0.0
    # Mixed precision: params are always f32. `matmul` "bf16" feeds matmuls
    # bf16 inputs with f32 accumulation (about 5x faster than f32 on AMX CPUs
    # and the native mode of TPUs/GPUs); `activations` is the dtype carried
    # between layers.
    matmul: str = "float32"        # "float32" | "bf16"
    activations: str = "float32"   # "float32" | "bfloat16"
    head: str = "lm"               # "lm" | "scalar"
    remat: bool = False            # rematerialise each layer in the backward pass
    # Layers per iteration of the layer scan (jax.lax.scan's `unroll`): 1 keeps
    # one compiled layer body; more lets XLA fuse across layers and drops the
    # loop's per-layer slicing of stacked weights and residuals. On a 2-core
    # CPU, 4 made the bench's 4-layer PPO update 1.34x and RM step 1.2x
    # faster (BENCHMARKS.md); compile time grows with it. Params and results
    # are the same for any value.
    scan_unroll: int = 1

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}[name]


def _mm(cfg: ModelConfig, eq: str, x: Array, w: Array) -> Array:
    """einsum with the configured matmul precision, f32 accumulation."""
    if cfg.matmul == "bf16":
        out = jnp.einsum(eq, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                         preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum(eq, x.astype(jnp.float32), w.astype(jnp.float32))
    return out.astype(_dtype(cfg.activations))


def _dense_mm(cfg: ModelConfig, eq: str, x: Array, w: Array) -> Array:
    """`_mm` for a projection whose einsum contracts x's trailing axes with
    w's leading ones ("bte,ehd->bthd", "bthd,hde->bte", ...), computed as ONE
    2-D matmul [rows, in] @ [in, out] and reshaped back.

    Same math as the einsum. On XLA:CPU the 2-D form is much faster to
    differentiate: the einsum's weight gradient contracts over (b, t) and XLA
    materialises transposed copies of the activations for it, while the 2-D
    form's gradients are plain transposed-operand matmuls (an MLP layer's
    forward + backward at SmolLM2 shapes: 206 ms as einsums, 133 ms as 2-D
    matmuls; bench/ measures the whole step). Any other equation goes through
    the einsum."""
    lhs, out_sub = eq.split("->")
    x_sub, w_sub = lhs.split(",")
    n = sum(c not in out_sub for c in x_sub)
    if not (0 < n < len(x_sub) and x_sub[-n:] == w_sub[:n]
            and out_sub == x_sub[:-n] + w_sub[n:] and x.ndim == len(x_sub)):
        return _mm(cfg, eq, x, w)
    rows, out_shape = x.shape[:-n], w.shape[n:]
    x2 = x.reshape(-1, math.prod(x.shape[-n:]))
    w2 = w.reshape(math.prod(w.shape[:n]), -1)
    return _mm(cfg, "ri,io->ro", x2, w2).reshape(*rows, *out_shape)


def _param(module: nn.Module, name: str, shape, axes, init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


_kernel_init = nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
    """x @ W (+ b) for W of any rank, with logical names on W."""
    cfg: ModelConfig
    shape: tuple            # full kernel shape
    axes: tuple             # logical names of the kernel axes
    eq: str                 # einsum from input to output
    bias: bool = False
    bias_axes: tuple = ()
    init: Any = _kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = _param(self, "kernel", self.shape, self.axes, self.init)
        y = _dense_mm(self.cfg, self.eq, x, w)
        if self.bias:
            b = _param(self, "bias", self.shape[len(self.shape) - len(self.bias_axes):],
                       self.bias_axes, nn.initializers.zeros)
            y = y + b.astype(y.dtype)
        return y


class Norm(nn.Module):
    """RMSNorm (llama) or LayerNorm (gpt2), computed in f32."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = self.cfg.hidden
        x32 = x.astype(jnp.float32)
        scale = _param(self, "scale", (h,), ("norm",), nn.initializers.ones)
        if self.cfg.arch == "gpt2":
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale
            y = y + _param(self, "bias", (h,), ("norm",), nn.initializers.zeros)
        else:
            var = jnp.square(x32).mean(-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale
        return y.astype(_dtype(self.cfg.activations))


def rope(x_BxTxNxD: Array, positions_BxT: Array, theta: float) -> Array:
    """Rotary embedding in the HF "rotate half" layout (first half, second half)."""
    d = x_BxTxNxD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxTxNxD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxD.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxE, positions_BxT, mask_BxTxS, layer_cache, cache_index,
                 query_cols_BxN=None):
        """query_cols_BxN: the queries at these positions of each row only
        (keys and values at every position): the output is [B, N, E]."""
        cfg = self.cfg
        e, h, k, d = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.dim_per_head
        bias = cfg.qkv_bias or cfg.arch == "gpt2"
        x_q, q_positions = x_BxTxE, positions_BxT
        if query_cols_BxN is not None:
            x_q = jnp.take_along_axis(x_BxTxE, query_cols_BxN[..., None], axis=1)
            q_positions = jnp.take_along_axis(positions_BxT, query_cols_BxN, axis=1)
            mask_BxTxS = jnp.take_along_axis(mask_BxTxS, query_cols_BxN[..., None], axis=1)
        q = Dense(cfg, (e, h, d), ("embed", "heads", "kv"), "bte,ehd->bthd",
                  bias=bias, bias_axes=("heads", "kv"), name="q")(x_q)
        kk = Dense(cfg, (e, k, d), ("embed", "kv_heads", "kv"), "bte,ehd->bthd",
                   bias=bias, bias_axes=("kv_heads", "kv"), name="k")(x_BxTxE)
        v = Dense(cfg, (e, k, d), ("embed", "kv_heads", "kv"), "bte,ehd->bthd",
                  bias=bias, bias_axes=("kv_heads", "kv"), name="v")(x_BxTxE)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "act_kv"))
        if cfg.arch != "gpt2":
            q = rope(q, q_positions, cfg.rope_theta)
            kk = rope(kk, positions_BxT, cfg.rope_theta)

        b, t = q.shape[:2]
        g = h // k
        # Head-major layout [b, kv_heads, (group, t), d]: both products are
        # plain batched matmuls, which XLA:CPU differentiates without the
        # transposed copies the [b, t, ...] einsums cost (attention forward +
        # backward at the bench's RM shapes: 8.3 -> 6.1 ms).
        qg = q.reshape(b, t, k, g, d).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, d)
        kt, vt = kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)      # [b, k, t, d]
        new_cache = None
        if layer_cache is not None:
            # Write this chunk's keys/values into the static cache at
            # cache_index (the same slot for every row: prompts are left-padded).
            # The cache is head-major too, so decoding reads it without a copy.
            def write(cache_BxKxSxD, new_BxKxTxD):
                out = jax.lax.dynamic_update_slice_in_dim(
                    cache_BxKxSxD, new_BxKxTxD.astype(cache_BxKxSxD.dtype), cache_index, axis=2)
                return nn.with_logical_constraint(
                    out, ("cache_batch", "cache_heads", "cache_length", "cache_kv"))
            kt, vt = write(layer_cache["k"], kt), write(layer_cache["v"], vt)
            new_cache = {"k": kt, "v": vt}
        s = kt.shape[2]
        scores = _mm(cfg, "bkqd,bksd->bkqs", qg, kt).reshape(b, k, g, t, s)
        scores = scores.astype(jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
        # A finite minimum keeps fully masked rows (left pads) free of NaN.
        scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).reshape(b, k, g * t, s)
        out = _mm(cfg, "bkqs,bksd->bkqd", probs, vt).reshape(b, k, g, t, d)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
        out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", "act_kv"))
        y = Dense(cfg, (h, d, e), ("heads", "kv", "embed"), "bthd,hde->bte",
                  bias=cfg.arch == "gpt2", bias_axes=("embed",), name="o")(out)
        return y, new_cache


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxE):
        cfg = self.cfg
        e, m = cfg.hidden, cfg.intermediate
        if cfg.arch == "gpt2":
            hdn = Dense(cfg, (e, m), ("embed", "mlp"), "bte,em->btm", bias=True,
                        bias_axes=("mlp",), name="fc")(x_BxTxE)
            hdn = jax.nn.gelu(hdn.astype(jnp.float32), approximate=True).astype(hdn.dtype)
        else:
            gate = Dense(cfg, (e, m), ("embed", "mlp"), "bte,em->btm", name="gate")(x_BxTxE)
            up = Dense(cfg, (e, m), ("embed", "mlp"), "bte,em->btm", name="up")(x_BxTxE)
            hdn = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(up.dtype)
        hdn = nn.with_logical_constraint(hdn, ("batch", "length", "act_mlp"))
        return Dense(cfg, (m, e), ("mlp", "embed"), "btm,me->bte", bias=cfg.arch == "gpt2",
                     bias_axes=("embed",), name="down")(hdn)


class Block(nn.Module):
    """One pre-norm transformer layer; the scan body over layers."""
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, layer_cache, positions, mask, cache_index, query_cols=None):
        """query_cols [B, N]: the layer's output at these positions only
        (`readout.outputs_at_cols`)."""
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic or cfg.dropout == 0.0)
        a, new_cache = Attention(cfg, name="attn")(Norm(cfg, name="attn_norm")(x), positions,
                                                   mask, layer_cache, cache_index, query_cols)
        if query_cols is not None:
            x = jnp.take_along_axis(x, query_cols[..., None], axis=1)
        x = x + drop(a)
        x = x + drop(Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x)))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_cache


def layer_stack(cfg: ModelConfig, deterministic: bool, length: int, **module_kw):
    """`length` Blocks as one `nn.scan` (params stacked on a leading "layers"
    axis; rematerialised if cfg.remat). Transformer's stack is all cfg.layers;
    `readout.outputs_at_cols` runs the first cfg.layers - 1 on a slice."""
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        unroll=max(1, min(int(cfg.scan_unroll), length)),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, deterministic, **module_kw)


class Transformer(nn.Module):
    """Decoder. `__call__(tokens [B,T], ...)` -> logits [B,T,V] or scores [B,T].

    Args of `__call__`:
      tokens: int [B, T].
      positions: int [B, T]; default: from `attn_mask` (cumsum - 1 within each
        segment) without a cache, else cache_index + arange(T).
      attn_mask: [B, S] 1 where the key slot holds a real token; S = T without
        a cache, the cache length with one. Default: all real. Without a
        cache, rising segment ids 1, 2, ... for packed documents.
      cache: from `init_cache`; when given, returns (output, new_cache).
      cache_index: int scalar, the slot of tokens[:, 0] in the cache.

    `deterministic=False` (a module field, so the layer scan is built once in
    setup) enables dropout with the rng collection "dropout"; the parameters
    are the same either way.
    """
    cfg: ModelConfig
    deterministic: bool = True

    def setup(self):
        cfg = self.cfg
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(_kernel_init, ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden), jnp.float32)
        if cfg.arch == "gpt2":
            self.pos_embedding = self.param(
                "pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                (cfg.max_len, cfg.hidden), jnp.float32)
        self.final_norm = Norm(cfg, name="final_norm")
        if cfg.head == "scalar":
            self.score_head = Dense(cfg, (cfg.hidden, 1), ("embed", None), "bte,eo->bto",
                                    bias=True, bias_axes=(None,), init=nn.initializers.zeros,
                                    name="score_head")
        elif not cfg.tie_embeddings:
            self.lm_head = Dense(cfg, (cfg.hidden, cfg.vocab_size), ("embed", "vocab"),
                                 "bte,ev->btv", name="lm_head")
        deterministic = self.deterministic or cfg.dropout == 0.0
        self.embed_dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
        self.layers = layer_stack(cfg, deterministic, cfg.layers)

    def hidden_states(self, tokens, positions=None, attn_mask=None, cache=None,
                      cache_index=None):
        """Final-normed hidden states [B, T, E] (and the new cache)."""
        b, t = tokens.shape
        s = t if cache is None else cache["k"].shape[3]
        positions, mask, cache_index = attention_inputs(b, t, s, positions, attn_mask, cache_index,
                                                        cached=cache is not None)
        x, new_cache = self.layers(self.embed(tokens, positions), cache, positions, mask,
                                   cache_index)
        return self.final_norm(x), new_cache

    def embed(self, tokens, positions):
        """The layer stack's input [B, T, E]: token (and for gpt2 position) embeddings."""
        x = jnp.take(self.embedding, tokens, axis=0)
        if self.cfg.arch == "gpt2":
            x = x + jnp.take(self.pos_embedding, positions, axis=0)
        x = x.astype(_dtype(self.cfg.activations))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return self.embed_dropout(x)

    def output(self, x):
        """`head` of the layer stack's raw output (the final norm first)."""
        return self.head(self.final_norm(x))

    def head(self, x):
        """Logits [B, T, V] (or scores [B, T]) of final-normed hidden states."""
        cfg = self.cfg
        if cfg.head == "scalar":
            return self.score_head(x)[..., 0].astype(jnp.float32)          # [B, T]
        if cfg.tie_embeddings:
            out = _dense_mm(cfg, "bte,ev->btv", x, self.embedding.T)
        else:
            out = self.lm_head(x)
        return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, tokens, positions=None, attn_mask=None, cache=None, cache_index=None):
        x, new_cache = self.hidden_states(tokens, positions, attn_mask, cache, cache_index)
        out = self.head(x)
        return (out, new_cache) if cache is not None else out

    def outputs_at(self, tokens, start: int, length: int, attn_mask=None):
        """`__call__(tokens, attn_mask=...)[:, start:start + length]`, with the head
        applied at those positions only. PPO reads the response's positions only;
        at SmolLM2's vocabulary the LM head over the prompt too cost a tenth of
        the forward pass (and of its backward)."""
        x, _ = self.hidden_states(tokens, attn_mask=attn_mask)
        return self.head(x[:, start:start + length])

    def outputs_at_flat(self, tokens, index, attn_mask=None):
        """The head's outputs at positions `index` (int [G, N], or [G]) of the
        flattened [B * T] positions of `tokens`: packed rows
        (rlhf_jax.packed_rollouts) read back per rollout."""
        x, _ = self.hidden_states(tokens, attn_mask=attn_mask)
        rows = index if index.ndim == 2 else index[:, None]          # [G, N] or [G, 1]
        out = self.head(jnp.take(x.reshape(-1, x.shape[-1]), rows, axis=0))
        return out if index.ndim == 2 else out[:, 0]


def positions_from_mask(mask_BxT: Array) -> Array:
    """Positions of left- or right-padded rows: real tokens count 0, 1, 2, ...

    With segment ids (packed documents: 1, 2, 3, ... rising along the row, 0
    for padding) the count restarts at each new segment; a 0/1 mask is one
    segment, holes included. Padding gets the running count (0 before the
    first real token), as it always has."""
    seg = mask_BxT.astype(jnp.int32)
    real = (seg > 0).astype(jnp.int32)
    count = jnp.cumsum(real, axis=-1)
    # A segment starts where its id exceeds every earlier id; real tokens
    # before it (earlier segments) no longer count.
    prev_max = jnp.concatenate([jnp.zeros_like(seg[..., :1]),
                                jax.lax.cummax(seg, axis=seg.ndim - 1)[..., :-1]], axis=-1)
    starts = (seg > prev_max) & (seg > 0)
    offset = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=seg.ndim - 1)
    return jnp.maximum(count - 1 - offset, 0)


def attention_inputs(b, t, s, positions, attn_mask, cache_index, *, cached: bool):
    """Defaults and the [B, T, S] attention mask for T new tokens over S key slots.

    Without a cache, S = T and the mask is causal over `attn_mask` (default:
    all real), positions default to the mask's running count. With a cache,
    the T tokens sit at slots cache_index.. and see every real slot up to
    their own; positions default to their slots."""
    if not cached:
        attn_mask = jnp.ones((b, t), jnp.int32) if attn_mask is None else attn_mask
        positions = positions_from_mask(attn_mask) if positions is None else positions
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        # Real queries see their own segment; padding queries (0) see every
        # real key, as with a 0/1 mask (their outputs are never read).
        same = (attn_mask[:, :, None] == attn_mask[:, None, :]) | (attn_mask[:, :, None] == 0)
        return positions, causal[None] & same & (attn_mask[:, None, :] > 0), jnp.int32(0)
    attn_mask = jnp.ones((b, s), jnp.int32) if attn_mask is None else attn_mask
    if positions is None:
        positions = cache_index + jnp.broadcast_to(jnp.arange(t), (b, t))
    q_slot = cache_index + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & (attn_mask[:, None, :] > 0)
    return positions, mask, cache_index


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """A zeroed KV cache, {"k", "v"} of [layers, B, kv_heads, S, head_dim]
    (head-major, the layout attention reads).

    bf16 when matmuls or activations are: attention feeds keys and values to
    bf16 matmuls then anyway, so storing them rounded gives the same results
    and no step converts the whole cache."""
    if dtype is None:
        dtype = jnp.bfloat16 if jnp.bfloat16 in (_dtype(cfg.matmul), _dtype(cfg.activations)) \
            else jnp.float32
    shape = (cfg.layers, batch, cfg.kv_heads, length, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# ---------------------------------------------------------------------------
# Block expansion: a deeper network that starts as the shallower one
# ---------------------------------------------------------------------------

# The projections through which a layer writes to the residual stream.
OUTPUT_PROJECTIONS = ("o", "down")


def expand_layers(params, new_layers: int):
    """Block expansion (LLaMA Pro, Wu et al. 2024): the params of an L-layer
    network -> those of an (L + new_layers)-layer one that computes the same
    function. The new layers follow the old ones; layer L + i is a copy of
    layer i mod L with its output projections (attention `o`, MLP `down`,
    kernels and biases) zeroed, so it adds nothing to the residual stream
    until training moves them, and its other weights start as trained
    features rather than noise. Works on the stacked [layers, ...] arrays
    (numpy or jax); everything outside `layers` is kept."""
    if new_layers <= 0:
        return params
    n = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    copy_of = np.arange(new_layers) % n

    def grow(path, x):
        added = x[copy_of]
        if any(getattr(k, "key", None) in OUTPUT_PROJECTIONS for k in path):
            added = added * 0
        return jnp.concatenate([jnp.asarray(x), jnp.asarray(added)], axis=0)

    return {**params, "layers": jax.tree_util.tree_map_with_path(grow, params["layers"])}


# ---------------------------------------------------------------------------
# The decode path: the same layers, unrolled over per-layer params and caches.
#
# Inside a loop over new tokens, the layer scan would slice every layer's
# weights out of the stacked [layers, ...] arrays on every step, and XLA:CPU
# materialises each slice (a copy of all weights per token: 12 MB at the
# bench's TINY config, 0.5 GB at SmolLM2-135M), and scans the stacked cache
# in and out (another copy). A sampler instead splits the stack once per call
# (`decoding_params`) and runs `decode` inside its loop: each layer's weights
# are read in place, and each layer's cache is updated in place.
# ---------------------------------------------------------------------------

def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
