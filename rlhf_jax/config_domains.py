"""What each config key accepts, checked before anything is built or compiled.

`check(config)` walks a stage's config (the pipeline's too, with its stage
blocks) and refuses the first value outside its key's domain, in one line
naming the key, the value and what is allowed:

    config error: train.lr=-1.0: must be a number > 0

A key's domain is found by its last two names (`train.lr`, `algo.clip`),
then by its own name (a stage config's top-level keys, e.g. `seed`, which
sit one block deeper in the pipeline: `ppo.seed`); `block.*` covers a block
whose keys are free (`evaluate.policies.<name>`). Every key of every config
file has a domain (tests/test_configs.py checks it), so a new key comes
with its domain, in the table of its block below.

Checks that relate keys to each other or to files (batch divisible by the
mesh, lengths within the model's context, checkpoints that exist) stay in
the stages; this module holds the per-key domains only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from rlhf_jax import rl
from rlhf_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Domain:
    """`ok(value)` and the text of what is allowed."""
    allowed: str
    ok: Callable[[Any], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def Int(lo: Optional[int] = None, hi: Optional[int] = None, but: tuple = ()) -> Domain:
    text = ("an integer" + (f" >= {lo}" if lo is not None else "")
            + (f" and <= {hi}" if hi is not None else "")
            + (f", not {', '.join(map(str, but))}" if but else ""))
    return Domain(text, lambda v: _is_int(v) and (lo is None or v >= lo)
                  and (hi is None or v <= hi) and v not in but)


def Num(lo: Optional[float] = None, hi: Optional[float] = None, lo_open=False, hi_open=False,
        extra: tuple = ()) -> Domain:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    text = "a number" + (" " + " and ".join(parts) if parts else "")
    if extra:
        text += f" (or {', '.join(map(str, extra))})"

    def ok(v):
        if not _is_num(v):
            return False
        if v in extra:
            return True
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)
    return Domain(text, ok)


def OneOf(*names) -> Domain:
    return Domain(f"one of {', '.join(map(repr, names))}", lambda v: v in names)


def TupleOf(item: Domain, min_len: int = 0) -> Domain:
    return Domain(f"a tuple of {item.allowed}" + (f" (at least {min_len})" if min_len else ""),
                  lambda v: isinstance(v, (tuple, list)) and len(v) >= min_len
                  and all(item.ok(x) for x in v))


STR = Domain("a string", lambda v: isinstance(v, str))
BOOL = Domain("True or False", lambda v: isinstance(v, bool))
COUNT = Int(1)                       # sizes, counts, intervals
NONNEG = Int(0)                      # counts where 0 means none (or "all", said per key)
POSITIVE = Num(0, lo_open=True)
RATE = Num(0)                        # coefficients and penalties
PROB = Num(0, 1)
MESH_AXIS = Int(-1, but=(0,))        # a size, or -1 for the devices left
# (name, source, samples per prompt): collect's policy mix.
POLICY_MIX = Domain("a tuple of (name, source, count >= 1) triples",
                    lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(
                        isinstance(p, (tuple, list)) and len(p) == 3 and isinstance(p[0], str)
                        and isinstance(p[1], str) and _is_int(p[2]) and p[2] >= 1 for p in v))
AXIS_RULES = Domain("a tuple of (logical axis, mesh axis or axes or None) pairs",
                    lambda v: isinstance(v, (tuple, list)) and all(
                        isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
                        for r in v))

DOMAINS: dict[str, Domain] = {
    # A stage config's top-level keys.
    "stage": STR,
    "seed": Int(0, 2**32 - 1),
    "init_from": STR,
    "reward_from": STR,
    "reward_fn": STR,
    "logical_axis_rules": AXIS_RULES,
    "base_from": STR,
    "methods": TupleOf(STR, 1),
    "expand_layers": NONNEG,
    "checkpoint": STR,
    "prompts": STR,
    "output": STR,
    "demonstrations": STR,
    "flaw_rates": TupleOf(PROB, 1),
    "batch_size": COUNT,
    "score_batch_size": COUNT,
    "sample_temperature": POSITIVE,
    "reference": STR,
    "policy_order": TupleOf(STR),
    "fewshot_policy": STR,
    "fewshot_categories": TupleOf(STR),
    "policies.*": STR,
    "ppo_workdirs.*": STR,
    "report.notes": STR,
    "report.samples_per_policy": NONNEG,

    # model: the architecture (models/transformer.py ModelConfig).
    "model.arch": OneOf("llama", "gpt2"),
    "model.preset": STR,
    "model.pretrained": STR,
    "model.tokenizer": STR,
    "model.vocab_size": COUNT,
    "model.hidden": COUNT,
    "model.layers": COUNT,
    "model.heads": COUNT,
    "model.kv_heads": COUNT,
    "model.head_dim": NONNEG,        # 0: hidden / heads
    "model.intermediate": COUNT,
    "model.max_len": COUNT,
    "model.norm_eps": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.dropout": Num(0, 1, hi_open=True),
    "model.tie_embeddings": BOOL,
    "model.qkv_bias": BOOL,
    "model.remat": BOOL,
    "model.scan_unroll": COUNT,
    "model.matmul": OneOf("float32", "bf16"),
    "model.activations": OneOf("float32", "bfloat16"),

    # mesh: device counts per axis.
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,

    # data: where records come from and how long they may be.
    "data.path": STR,
    "data.eval_path": STR,
    "data.eval_fraction": Num(0, 1, lo_open=True, hi_open=True),
    "data.drop_invalid": BOOL,
    "data.max_len": COUNT,
    "data.max_prompt_len": NONNEG,
    "data.data_dir": STR,
    "data.pack": BOOL,
    "data.ptx_batch_size": COUNT,
    "data.split": STR,
    "data.demos_path": STR,
    "data.demos_records": COUNT,
    "data.eval_sft_path": STR,
    "data.k_max": Int(2, 9),
    "data.max_prompts": NONNEG,      # 0: all
    "data.ptx_path": STR,
    "data.text_path": STR,
    "data.text_split": STR,
    "data.text_batches": NONNEG,

    # train: the optimiser and the loop.
    "train.steps": NONNEG,           # rm, dpo: 0 = train.epochs passes
    "train.gold_eval": BOOL,         # ppo, grpo: log the rollouts' gold score
    "train.epochs": POSITIVE,
    "train.batch_size": COUNT,
    "train.lr": POSITIVE,
    "train.end_lr_ratio": PROB,
    "train.warmup_steps": NONNEG,
    "train.weight_decay": RATE,
    "train.b1": Num(0, 1, hi_open=True),
    "train.b2": Num(0, 1, hi_open=True),
    "train.grad_clip": RATE,         # 0: no clipping
    "train.log_every": COUNT,
    "train.eval_every": COUNT,
    "train.eval_batches": NONNEG,
    "train.checkpoint_every": COUNT,
    "train.keep_checkpoints": COUNT,
    "train.max_nonfinite_steps": COUNT,

    # sampling: how responses are drawn.
    "sampling.max_new_tokens": NONNEG,
    "sampling.temperature": POSITIVE,
    "sampling.top_k": NONNEG,        # 0: off
    "sampling.top_p": Num(0, 1, lo_open=True),
    "sampling.greedy": BOOL,

    # algo: PPO, GRPO and DPO.
    "algo.kl_coef": RATE,
    "algo.adaptive_kl": BOOL,
    "algo.kl_target": POSITIVE,
    "algo.kl_horizon": POSITIVE,
    "algo.kl_in": OneOf("loss", "reward"),
    "algo.gamma": PROB,
    "algo.lam": PROB,
    "algo.clip": POSITIVE,
    "algo.vf_clip": RATE,            # 0: unclipped
    "algo.vf_coef": RATE,
    "algo.value_lr": POSITIVE,
    "algo.epochs": COUNT,
    "algo.minibatches": COUNT,
    "algo.whiten_advantages": BOOL,
    "algo.ptx_coef": RATE,
    "algo.missing_eos_penalty": RATE,
    "algo.ema_decay": Num(0, 1, hi_open=True),
    "algo.group_size": Int(2),
    "algo.advantage": OneOf(*rl.ADVANTAGE_KINDS),
    "algo.scale_by_std": BOOL,
    "algo.beta": POSITIVE,

    # comparisons: collect's labelling run.
    "comparisons.prompts": STR,
    "comparisons.split": STR,
    "comparisons.eval_prompts": STR,
    "comparisons.eval_split": STR,
    "comparisons.num_prompts": COUNT,
    "comparisons.num_eval_prompts": NONNEG,
    "comparisons.batch_size": COUNT,
    "comparisons.base_from": STR,
    "comparisons.policies": POLICY_MIX,
    "comparisons.noise_scale": Num(0, extra=(-1, -1.0)),   # -1: calibrated to the world
}


def domain_of(path: tuple) -> Optional[Domain]:
    """The domain of the key at `path` (its names from the config's root)."""
    if len(path) >= 2:
        for key in (f"{path[-2]}.{path[-1]}", f"{path[-2]}.*"):
            if key in DOMAINS:
                return DOMAINS[key]
    return DOMAINS.get(path[-1])


def leaves(config, prefix: tuple = ()):
    """(path, value) of every leaf key of a ConfigDict."""
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys") and not isinstance(value, dict):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def check(config) -> None:
    """Refuses the first key whose value is outside its domain.

    Keys without a domain (a fork's own keys) are left to whoever reads
    them; the shipped configs have none (tests/test_configs.py).

    Raises:
      ConfigError: `<key>=<value>: must be <allowed>`.
    """
    for path, value in leaves(config):
        key = ".".join(path)
        domain = domain_of(path)
        if domain is not None and not domain.ok(value):
            raise ConfigError(f"{key}={value!r}: must be {domain.allowed}")
