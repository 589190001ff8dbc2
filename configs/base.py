"""Fields every stage shares. Stage configs start from `get_base_config()`.

Configs are locked (`lock_config=True`): `--config.train.stpes=5` fails
instead of being silently ignored.
"""
import ml_collections


def model_config(**overrides) -> ml_collections.ConfigDict:
    """Architecture of a model trained here from scratch (byte-level tokenizer).

    Fields mirror rlhf_jax.models.transformer.ModelConfig. With `init_from`,
    the architecture comes from that checkpoint and only the runtime fields
    (dropout, matmul, activations, remat, scan_unroll) of this block apply.
    """
    m = ml_collections.ConfigDict(dict(
        arch="llama", vocab_size=264, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=0,
        intermediate=384, max_len=128, norm_eps=1e-6, rope_theta=10000.0,
        tie_embeddings=False, qkv_bias=False, dropout=0.0,
        matmul="float32", activations="float32", remat=False,
        # Layers per layer-scan iteration: the world's 4-layer models run
        # unrolled (faster on CPU; see ModelConfig.scan_unroll).
        scan_unroll=4,
        # "byte", a tokenizer.json, or an HF directory.
        tokenizer="byte",
        # An HF directory or a .gguf file; replaces the architecture fields.
        pretrained="",
        # A named architecture (rlhf_jax/models/presets.py: llama3_8b,
        # llama3_70b); replaces the architecture fields, random init.
        preset="",
    ))
    m.update(overrides)
    return m


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.seed = 0
    c.model = model_config()
    # Device mesh: sizes of the data, fsdp and tensor axes; -1 takes the rest.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Empty: rlhf_jax.sharding.DEFAULT_RULES. Else a tuple of (logical, mesh axes).
    c.logical_axis_rules = ()
    # An earlier stage's workdir (its latest checkpoint) or a checkpoint dir.
    c.init_from = ""
    c.data = ml_collections.ConfigDict(dict(
        path="",                 # a .jsonl file or tfds:NAME/CONFIG
        eval_path="",            # held-out data; empty: a split of `path`
        eval_fraction=0.05,
        drop_invalid=False,      # drop and count bad records instead of failing
        # prompt + response tokens: a world prompt (at most 82 bytes with its
        # format) and the longest demonstration (`Sure! ` and a 4-fold
        # `repeat`: 42 tokens with EOS) within 88 + 48 new tokens.
        max_len=136,
        max_prompt_len=88,
        data_dir="",             # TFDS data dir; empty: ~/.cache/rlhf_jax/tfds
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=32,
        lr=1e-3,
        end_lr_ratio=0.1,        # cosine decays to lr * end_lr_ratio
        warmup_steps=50,
        weight_decay=0.01,
        b1=0.9,
        b2=0.95,
        grad_clip=1.0,
        log_every=10,
        eval_every=200,
        eval_batches=8,
        checkpoint_every=200,
        keep_checkpoints=2,
        # A NaN/inf loss or gradient skips the update; this many in a row stop the run.
        max_nonfinite_steps=5,
    ))
    return c


def sampling_config(**overrides):
    """The `sampling` block of every stage that samples: greedy by default."""
    s = ml_collections.ConfigDict(dict(max_new_tokens=48, temperature=1.0, top_k=0, top_p=1.0,
                                       greedy=True))
    s.update(overrides)
    return s
