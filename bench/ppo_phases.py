"""Where a PPO iteration of the main job goes: sample, score, update, host.

    python bench/ppo_phases.py --workdir workdirs/igpt_m0            # PPO-ptx, 12 iterations
    python bench/ppo_phases.py --workdir W --method ppo --iterations 20

Runs the PPO stage of configs/instructgpt.py (the `ppo` block, with the
method's overrides) from the SFT and RM of a finished main-job workdir, into
a temporary workdir, and times each part of every iteration on the host
clock, blocking on the device after each: the sampler (`sampling.sample`),
scoring (`score_rollout`), the update (`ppo_update`), and the rest (the
prompt and pretraining batches, the loop's own work: metrics, logging,
checkpoints), which is the iteration's time less the three. Blocking removes
the overlap the stage normally has (the host prepares the next batch while
the device works), so the parts add up to a little more than the stage's
unblocked `ppo/iteration_s`, which is printed beside them from a second run
without the timers. The first `--skip` iterations (compiles) are left out
of the means. Also prints the rollouts' mean response length and the rows x tokens
the forward passes of scoring and of the update ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stage_config(workdir: str, method: str, iterations: int):
    from configs import instructgpt
    from rlhf_jax.stages import instructgpt as pipeline
    config = instructgpt.get_config()
    block, paths = pipeline.method_run(config, method, os.path.join(workdir, "sft"),
                                       os.path.join(workdir, "rm"), {})
    sub = pipeline._stage_config(config, block, **paths)
    sub.train.steps = iterations
    sub.train.checkpoint_every = iterations
    return sub


def _run(sub, timed: bool):
    """Runs the stage; returns (per-iteration phase seconds or None, metrics rows)."""
    import jax
    from rlhf_jax import stages
    from rlhf_jax.stages import ppo

    phases: list[dict] = []
    originals = (ppo.sampling.sample, ppo.iteration_fn)

    def clock(name, fn):
        def timed_fn(*args, **kwargs):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            row = phases[-1]
            row[name] = row.get(name, 0.0) + time.perf_counter() - t0
            if name in ("score", "update"):       # the rows the forward passes ran on
                packed = [a for a in args if hasattr(a, "segments")]
                shape = packed[0].segments.shape[-2:] if packed else (
                    args[4].shape[0], args[4].shape[1] + args[5].shape[1]) if name == "score" \
                    else args[1].tokens.shape
                row[f"{name}_shape"] = "x".join(map(str, shape))
            return out
        return timed_fn

    def iteration_fn(config, runtime, models, hp, tok, ref_params, reward_params, score_fn,
                     update_fn, *rest, **kwargs):
        step = originals[1](config, runtime, models, hp, tok, ref_params, reward_params,
                            clock("score", score_fn), clock("update", update_fn), *rest,
                            **kwargs)

        def timed_step(state, it):
            phases.append({})
            t0 = time.perf_counter()
            state, metrics = step(state, it)
            jax.block_until_ready(state)
            phases[-1]["iteration"] = time.perf_counter() - t0
            return state, metrics
        return timed_step

    out = tempfile.mkdtemp(prefix="ppo_phases_")
    if timed:
        ppo.sampling.sample = clock("sample", originals[0])
        ppo.iteration_fn = iteration_fn
    try:
        stages.run(sub, out)
    finally:
        ppo.sampling.sample, ppo.iteration_fn = originals
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return (phases if timed else None), rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished main job's workdir")
    parser.add_argument("--method", default="ppo_ptx", choices=("ppo", "ppo_ptx"))
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--skip", type=int, default=4, help="iterations left out (compiles)")
    parser.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("RLHF_JAX_NO_PROGRESS", "1")
    sub = _stage_config(args.workdir, args.method, args.iterations)

    phases, rows = _run(sub, timed=True)
    _, free_rows = _run(sub, timed=False)
    keep = phases[args.skip:]

    def mean(key):
        return statistics.mean(p.get(key, 0.0) for p in keep)

    it = mean("iteration")
    parts = {k: mean(k) for k in ("sample", "score", "update")}
    parts["host"] = it - sum(parts.values())
    steady = [r for r in rows if "ppo/iteration_s" in r][args.skip:]
    free = [r["ppo/iteration_s"] for r in free_rows if "ppo/iteration_s" in r][args.skip:]
    lengths = [r["ppo/response_length"] for r in steady]
    result = {
        "method": args.method, "iterations": args.iterations, "skipped": args.skip,
        "blocked_iteration_s": it, "parts_s": parts,
        "unblocked_iteration_s": statistics.mean(free),
        "response_length_mean": statistics.mean(lengths),
        "score_shapes": sorted({p.get("score_shape") for p in keep}),
        "update_shapes": sorted({p.get("update_shape") for p in keep}),
    }
    result["unblocked_s_per_response_token"] = (
        result["unblocked_iteration_s"] / (result["response_length_mean"] * sub.train.batch_size))
    print(f"PPO iteration of {args.method} (batch {sub.train.batch_size}, mean response "
          f"{result['response_length_mean']:.1f} tokens), means of iterations "
          f"{args.skip + 1}-{args.iterations}:")
    print(f"{'part':<10}{'s':>8}{'share':>8}")
    for k, v in parts.items():
        print(f"{k:<10}{v:8.3f}{v / it:8.1%}")
    print(f"{'blocked':<10}{it:8.3f}")
    print(f"unblocked iteration (a second run, no timers): {result['unblocked_iteration_s']:.3f} s,"
          f" {1e3 * result['unblocked_s_per_response_token']:.2f} ms per response token")
    print(f"rows x tokens of the forward passes: scoring {result['score_shapes']}, "
          f"each update minibatch {result['update_shapes']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
