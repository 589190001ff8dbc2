"""When RLHF pays: the main job across demonstrator flaw rates
(configs/demo_quality.py).

For each f of `flaw_rates` the pipeline (stages/instructgpt.py) runs in
`<workdir>/f<f>/` on the demonstrations of flaw rate f, from one base model;
then `demo_quality.json` gathers each f's gold scores and their 95% intervals
over prompts, and `report.md` draws them against f. Each sub-pipeline skips
its finished stages, so rerunning the command resumes the sweep.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
from matplotlib.figure import Figure

from rlhf_jax import console, report
from rlhf_jax.errors import ConfigError
from rlhf_jax.stages import instructgpt

FIGURE = "demo_quality.png"
# (eval.json key, label) of the two panels: greedy and temperature-1 gold.
PANELS = (("gold_score", "gold score (greedy)"),
          ("gold_score_sampled", "gold score (temperature 1)"))


def flaw_dir(workdir: str, flaw_rate: float) -> str:
    return os.path.join(workdir, f"f{float(flaw_rate):g}")


def demonstrations_at(spec: str, flaw_rate: float) -> str:
    """The world demonstrations `spec` (its f = 0 name) at flaw rate `flaw_rate`."""
    return f"{spec}_f{float(flaw_rate):g}" if flaw_rate else spec


def _pipeline_config(config, flaw_rate: float, base: str):
    sub = config.copy_and_resolve_references()
    sub.unlock()
    sub.stage = "pipeline"
    sub.base_from = base
    sub.sft.data.path = demonstrations_at(config.demonstrations, flaw_rate)
    del sub["flaw_rates"], sub["demonstrations"]
    return sub


def run(config, workdir: str, run_one: Callable):
    rates = [float(f) for f in config.flaw_rates]
    if not rates or any(not 0.0 <= f <= 1.0 for f in rates) or len(set(rates)) < len(rates):
        raise ConfigError(f"flaw_rates={tuple(config.flaw_rates)}: expected distinct rates in [0, 1]")
    base = config.base_from
    if base == "pretrain":      # one base model for every f
        base = os.path.join(workdir, "pretrain")
        marker = os.path.join(workdir, ".done", "pretrain")
        if not os.path.exists(marker):
            sub = instructgpt._stage_config(config, "pretrain")
            run_one(sub, base)
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(marker), exist_ok=True)
                open(marker, "w").close()
    for f in rates:
        console.say(f"[demo_quality] flaw rate {f:g}: {flaw_dir(workdir, f)}")
        instructgpt.run(_pipeline_config(config, f, base), flaw_dir(workdir, f), run_one)
    if jax.process_index() == 0:
        points = gather(workdir, rates)
        with open(os.path.join(workdir, "demo_quality.json"), "w") as fh:
            json.dump(points, fh, indent=1)
        path = write_report(workdir, points)
        for line in summary(points):
            console.say(line)
        console.say(f"report: {path}")


def gather(workdir: str, rates: Sequence[float]) -> list[dict]:
    """Per f: each policy's gold scores (greedy, sampled), their 95%
    intervals, and the paired gain over SFT with its interval."""
    keys = ("gold_score", "gold_score_ci95", "gold_score_sampled", "gold_score_sampled_ci95",
            "gain_vs_sft", "gain_vs_sft_ci95", "gain_vs_sft_sampled", "gain_vs_sft_sampled_ci95",
            "win_rate_vs_sft", "win_rate_vs_sft_sampled")
    points = []
    for f in rates:
        with open(os.path.join(flaw_dir(workdir, f), "eval.json")) as fh:
            policies = json.load(fh)["policies"]
        points.append({"flaw_rate": f, "policies": {
            name: {k: m.get(k) for k in keys} for name, m in policies.items()}})
    return points


def beyond_noise(points: Sequence[dict], key: str, policy: str = "ppo_ptx") -> list[float]:
    """The flaw rates at which `policy`'s paired gain over SFT (`key`:
    gain_vs_sft or gain_vs_sft_sampled) is above 0 by more than its 95%
    interval."""
    out = []
    for p in points:
        m = p["policies"].get(policy, {})
        if m.get(key) is not None and m[key] - (m.get(key + "_ci95") or 0.0) > 0:
            out.append(p["flaw_rate"])
    return out


def summary(points: Sequence[dict]) -> list[str]:
    lines = []
    for key, what in (("gain_vs_sft_sampled", "sampled"), ("gain_vs_sft", "greedy")):
        rates = beyond_noise(points, key)
        lines.append(f"[demo_quality] PPO-ptx above SFT beyond the 95% interval ({what}): "
                     + (f"at f = {', '.join(f'{f:g}' for f in rates)}" if rates else "at no f"))
    return lines


def figure(points: Sequence[dict], path: str):
    rates = [p["flaw_rate"] for p in points]
    names = [n for n in points[0]["policies"]] if points else []
    fig = Figure(figsize=(10, 4))
    for i, (key, label) in enumerate(PANELS):
        ax = fig.add_subplot(1, 2, i + 1)
        for name in names:
            y = [p["policies"][name].get(key) for p in points]
            if any(v is None for v in y):
                continue
            err = [p["policies"][name].get(key + "_ci95") or 0.0 for p in points]
            ax.errorbar(rates, y, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xlabel("demonstrator flaw rate f")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    report._save(fig, path)


def write_report(workdir: str, points: Sequence[dict]) -> str:
    figure(points, os.path.join(workdir, FIGURE))
    names = list(points[0]["policies"]) if points else []
    lines = ["# When RLHF pays: demonstration quality", "",
             "Gold score of each policy against the demonstrators' flaw rate f (WORLD.md, "
             "\"The demonstrators\"); error bars and ± are 95% intervals over the held-out "
             "prompts; the gains over SFT are paired over the same prompts. Each f's own "
             "report is in `f<f>/report.md`.", "", f"![gold against f]({FIGURE})", ""]
    header = ["f"] + [f"`{n}` {label}" for n in names for label in ("greedy", "sampled")]
    header += ["PPO-ptx gain (greedy)", "PPO-ptx gain (sampled)", "win (sampled)"]
    rows = []
    for p in points:
        m = p["policies"]
        row = [f"{p['flaw_rate']:g}"]
        row += [report._pm(m[n], k) for n in names for k in ("gold_score", "gold_score_sampled")]
        ppo = m.get("ppo_ptx", {})
        row += [report._pm(ppo, "gain_vs_sft"), report._pm(ppo, "gain_vs_sft_sampled"),
                report._fmt(ppo.get("win_rate_vs_sft_sampled"))]
        rows.append(row)
    lines += report._table(header, rows) + [""]
    lines += [line.removeprefix("[demo_quality] ") + "." for line in summary(points)]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")
    return path


__all__ = ["run", "gather", "beyond_noise", "summary", "write_report", "demonstrations_at"]
