"""report.md for the evaluate stage (and the pipeline): metric tables, the
win-rate figure, PPO training curves and sample responses.

    path = write_report(workdir, eval_json, samples, ppo_workdirs={"ppo_ptx": DIR})

`eval_json` is what stages.evaluate writes to eval.json (`reference`,
`policies` {name: metrics}, `settings`); `samples` are the samples.jsonl rows
(`policy`, `prompt`, `category`, `response`, `finished`, `gold_score`). PNG
figures are written beside report.md with matplotlib's object-oriented API
(Agg canvas, no pyplot state, no display needed).
"""
from __future__ import annotations

import html
import os
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rlhf_jax.metrics import read_metrics

# (eval.json key, column title) of the main table.
METRIC_COLUMNS = (      # sampled first: InstructGPT's Figure 1 compares samples
    ("gold_score_sampled", "gold score (sampled)"),
    ("win_rate_vs_sft_sampled", "win rate (sampled)"),
    ("gold_score", "gold score"),
    ("win_rate_vs_sft", "win rate vs SFT"),
    ("refusal_rate", "refusal (harmful)"),
    ("over_refusal_rate", "over-refusal (benign)"),
    ("kl_vs_sft", "KL(policy ‖ SFT)"),
    ("pretrain_loss", "pretraining LM loss"),
    ("eos_rate", "EOS rate"),
    ("mean_response_tokens", "mean length (tokens)"),
)
# (eval.json key, column) of the intervals table: each value ± its `_ci95`.
INTERVAL_COLUMNS = (
    ("gold_score_sampled", "gold (sampled)"),
    ("gain_vs_sft_sampled", "gain vs SFT (sampled)"),
    ("win_rate_vs_sft_sampled", "win rate (sampled)"),
    ("gold_score", "gold"),
    ("gain_vs_sft", "gain vs SFT"),
    ("win_rate_vs_sft", "win rate"),
)
# (metrics.jsonl key of the PPO stage, axis label, file name) of the PPO curves.
PPO_CURVES = (
    ("ppo/score", "reward model score", "ppo_score.png"),
    ("ppo/kl", "KL(policy ‖ SFT) per response", "ppo_kl.png"),
    ("ppo/gold_score", "gold score of the rollouts", "ppo_gold_score.png"),
)
WIN_RATE_FIGURE = "win_rate.png"
OVEROPTIMISATION_FIGURE = "ppo_overoptimisation.png"
# Iterations in the moving average that picks the best stopping point.
STOP_WINDOW = 5


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}f}"


def _policy_table(policies: dict, names: Sequence[str], columns, cell) -> list[str]:
    """A row per policy, a column per (key, title) of `columns`, each cell
    `cell(that policy's metrics, key)`."""
    return _table(["policy"] + [t for _, t in columns],
                  [[f"`{n}`"] + [cell(policies[n], k) for k, _ in columns] for n in names])


def _pm(metrics: dict, key: str) -> str:
    """`value ± half-width` of `key` and its `_ci95`, "–" when absent."""
    if metrics.get(key) is None:
        return "–"
    ci = metrics.get(key + "_ci95")
    return _fmt(metrics[key]) + (f" ± {_fmt(ci)}" if ci is not None else "")


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell, whitespace made visible."""
    text = html.escape(text, quote=False).replace("|", "\\|")
    return text.replace("\n", "\\n").replace("\t", "\\t") or "(empty)"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _save(fig: Figure, path: str):
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def pairwise_section(pairwise: Mapping[str, Mapping[str, dict]]) -> list[str]:
    """The report's differences between every two policies (evaluate's
    `pairwise`), T=1 first, and a line naming those beyond their paired
    95% interval."""
    order = [k for k in ("gold_score_sampled", "gold_score") if pairwise.get(k)]
    if not order:
        return []
    pairs = list(pairwise[order[0]])
    label = {"gold_score_sampled": "gold (T=1)", "gold_score": "gold (greedy)"}
    lines = ["", "## Differences between policies", "",
             "Mean over prompts of (the first policy's gold score − the second's on the same "
             "prompt) ± the half-width of its paired 95% interval; * marks a difference beyond "
             "its interval.", ""]
    rows = [[pair] + [f"{pairwise[k][pair]['diff']:+.3f} ± {pairwise[k][pair]['ci95']:.3f}"
                      + (" *" if pairwise[k][pair]["beyond"] else "") for k in order]
            for pair in pairs]
    lines += _table(["policies"] + [label[k] for k in order], rows)
    beyond = [p for p in pairs if pairwise[order[0]][p]["beyond"]]
    lines += ["", f"Beyond their paired interval ({label[order[0]]}): "
                  + (", ".join(beyond) if beyond else "none") + "."]
    return lines


def win_outcomes(samples: Sequence[dict], policy: str, reference: str) -> np.ndarray:
    """Per prompt 1 (the policy's gold score beats the reference's), 0.5 (tie)
    or 0, pairing each policy's samples with the reference's in order."""
    mine = np.array([s["gold_score"] for s in samples if s["policy"] == policy], np.float64)
    ref = np.array([s["gold_score"] for s in samples if s["policy"] == reference], np.float64)
    return np.where(mine > ref, 1.0, np.where(mine == ref, 0.5, 0.0))


def win_rate_figure(eval_json: dict, samples: Sequence[dict], path: str):
    """InstructGPT's Figure 1 in miniature: win rate against the SFT policy per
    policy, with 95% confidence intervals over prompts: of temperature-1
    samples (what the paper's labelers compared) where evaluated, and of
    greedy responses beside them."""
    names = list(eval_json["policies"])
    reference = eval_json["reference"]
    policies = eval_json["policies"]
    greedy, greedy_err = [], []
    for name in names:
        outcomes = win_outcomes(samples, name, reference)
        greedy.append(policies[name]["win_rate_vs_sft"])
        greedy_err.append(1.96 * outcomes.std(ddof=1) / np.sqrt(len(outcomes))
                          if len(outcomes) > 1 else 0.0)
    series = [("greedy", greedy, greedy_err, "tab:gray")]
    if all(policies[n].get("win_rate_vs_sft_sampled") is not None for n in names):
        series.insert(0, ("temperature 1", [policies[n]["win_rate_vs_sft_sampled"] for n in names],
                          [policies[n].get("win_rate_vs_sft_sampled_ci95", 0.0) for n in names],
                          "tab:blue"))
    fig = Figure(figsize=(max(4.0, 1.6 * len(names) + 1.5), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (label, rates, errors, color) in enumerate(series):
        x = np.arange(len(names)) + (j - (len(series) - 1) / 2) * width
        bars = ax.bar(x, rates, width, yerr=errors, capsize=3, color=color, label=label)
        ax.bar_label(bars, labels=[f"{r:.2f}" for r in rates], padding=2, fontsize=7)
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel(f"win rate vs {reference}")
    ax.set_title("Gold-judged win rate against the SFT policy (ties count half)")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def ppo_figures(ppo_workdirs: Mapping[str, str], out_dir: str) -> tuple[list[tuple[str, str]], list[str]]:
    """One PNG per PPO curve present in any workdir's metrics.jsonl, one line
    per workdir. Returns ([(label, file name)], [notes on workdirs without rows])."""
    runs, notes = {}, []
    for name, workdir in ppo_workdirs.items():
        rows = sorted(read_metrics(workdir, "ppo"), key=lambda r: r["step"])
        if rows:
            runs[name] = rows
        else:
            notes.append(f"`{name}` ({workdir}) has no PPO rows in metrics.jsonl.")
    figures = []
    for key, label, filename in PPO_CURVES:
        curves = {n: [(r["step"], r[key]) for r in rows if key in r] for n, rows in runs.items()}
        curves = {n: c for n, c in curves.items() if c}
        if not curves:
            continue
        fig = Figure(figsize=(5.5, 3.4))
        ax = fig.add_subplot()
        for name, points in curves.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, marker="." if len(points) < 30 else None)
        ax.set_xlabel("PPO iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(f"{label} over PPO iterations")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, os.path.join(out_dir, filename))
        figures.append((label, filename))
    return figures, notes


def _moving_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean over `window` values centred on each (fewer at the ends)."""
    h = window // 2
    return np.array([x[max(0, i - h):i + h + 1].mean() for i in range(len(x))])


def overoptimisation_curve(rows: Sequence[dict]) -> dict:
    """Gao et al. (2022)'s view of one PPO run, from its metrics.jsonl rows:
    per iteration sqrt(KL(policy || SFT)) of the rollouts (k1 per response,
    floored at 0), the RM's score and the gold score of the same rollouts,
    each also as a moving mean over STOP_WINDOW iterations (one rollout
    batch is a noisy estimate), and where to stop: the iteration whose
    moving-mean gold score is highest."""
    rows = [r for r in sorted(rows, key=lambda r: r["step"])
            if "ppo/kl" in r and "ppo/score" in r and "ppo/gold_score" in r]
    steps = np.array([r["step"] for r in rows], np.int64)
    sqrt_kl = np.sqrt(np.maximum([r["ppo/kl"] for r in rows], 0.0))
    rm = np.array([r["ppo/score"] for r in rows], np.float64)
    gold = np.array([r["ppo/gold_score"] for r in rows], np.float64)
    out = {"step": steps, "sqrt_kl": sqrt_kl, "rm_score": rm, "gold_score": gold}
    if len(rows):
        w = min(STOP_WINDOW, len(rows))
        out.update({f"smooth_{k}": _moving_mean(out[k], w)
                    for k in ("sqrt_kl", "rm_score", "gold_score")})
        best = int(np.argmax(out["smooth_gold_score"]))
        out.update(best_step=int(steps[best]), best_sqrt_kl=float(out["smooth_sqrt_kl"][best]),
                   best_gold=float(out["smooth_gold_score"][best]),
                   final_gold=float(out["smooth_gold_score"][-1]))
    return out


def overoptimisation_figure(curves: Mapping[str, dict], path: str):
    """Gold and RM score of the rollouts against sqrt(KL to SFT), one line a
    run (moving means; each iteration's values as faint dots)."""
    fig = Figure(figsize=(10, 3.6))
    gold_ax, rm_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, c in curves.items():
        line, = gold_ax.plot(c["smooth_sqrt_kl"], c["smooth_gold_score"], label=name)
        color = line.get_color()
        gold_ax.scatter(c["sqrt_kl"], c["gold_score"], s=6, alpha=0.3, color=color)
        rm_ax.plot(c["smooth_sqrt_kl"], c["smooth_rm_score"], label=name, color=color)
        rm_ax.scatter(c["sqrt_kl"], c["rm_score"], s=6, alpha=0.3, color=color)
        gold_ax.axvline(c["best_sqrt_kl"], color=color, ls=":", alpha=0.7)
    for ax, what in ((gold_ax, "gold score"), (rm_ax, "reward model score")):
        ax.set_xlabel("sqrt(KL(policy ‖ SFT)) per response, nats^½")
        ax.set_ylabel(what + " of the rollouts")
        ax.grid(alpha=0.3)
        ax.legend()
    gold_ax.set_title("Gold (true) reward: where to stop (dotted)")
    rm_ax.set_title(f"RM (proxy) reward; lines: means over {STOP_WINDOW} iterations")
    _save(fig, path)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def data_scale_sentence(settings: dict) -> str:
    """What the numbers were measured on, in one paragraph."""
    per_cat = settings.get("prompts_per_category", {})
    counts = sorted(set(per_cat.values()))
    per = (f"{counts[0]} per category" if len(counts) == 1
           else f"{min(counts)} to {max(counts)} per category") if counts else "no categories"
    s = settings.get("sampling", {})
    decoding = ("greedy decoding" if s.get("greedy", True)
                else f"sampling at temperature {s.get('temperature')}, top-k {s.get('top_k')}, "
                     f"top-p {s.get('top_p')}")
    return (f"Data scale: {settings['n_prompts']} held-out evaluation prompts ({per}, "
            f"{len(per_cat)} categories; words the training data never used) from "
            f"`{settings['prompts']}`, answered with {decoding} and at most "
            f"{s.get('max_new_tokens')} new tokens; the pretraining LM loss is the token-weighted "
            f"mean over {settings['n_documents']} held-out pretraining documents "
            f"({settings['n_document_tokens']} tokens) from `{settings['documents']}`.")


def _sample_indices(samples: Sequence[dict], policy: str, k: int) -> list[int]:
    """Positions (within a policy's samples) of the first prompt of each of k
    categories spread evenly over those present (the first and last included),
    so the shown prompts cover different tasks."""
    first: dict[str, int] = {}
    for i, s in enumerate(x for x in samples if x["policy"] == policy):
        first.setdefault(s["category"], i)
    positions = list(first.values())
    if k <= 0 or not positions:
        return []
    if k >= len(positions):
        return positions
    return [positions[j] for j in sorted(set(np.linspace(0, len(positions) - 1, k).round().astype(int)))]


def write_report(workdir: str, eval_json: dict, samples: Sequence[dict],
                 ppo_workdirs: Optional[Mapping[str, str]] = None, samples_per_policy: int = 5,
                 notes: str = "", title: str = "Evaluation report") -> str:
    """Writes `<workdir>/report.md` and its PNG figures; returns the report's path."""
    os.makedirs(workdir, exist_ok=True)
    policies, reference = eval_json["policies"], eval_json["reference"]
    settings = eval_json["settings"]
    names = list(policies)
    lines = [f"# {title}", "", data_scale_sentence(settings)]
    if notes:
        lines += ["", notes]
    demos = settings.get("fewshot_demonstrations") or []
    fewshot = [n for n in names if policies[n].get("fewshot")]
    if demos and fewshot:
        shown = "; ".join(f"\"{_cell(d['prompt'])}\" → \"{_cell(d['response'])}\"" for d in demos)
        lines += ["", f"`{'`, `'.join(fewshot)}` is prompted with {len(demos)} demonstrations "
                      f"(train words, each a whole conversation ended by EOS) before every "
                      f"prompt (InstructGPT's \"GPT prompted\"): {shown}."]

    lines += ["", "## Metrics", "",
              f"Gold labeler's judgement of each policy's responses; win rate and KL against "
              f"`{reference}`. KL(policy ‖ SFT) is the exact per-token KL between the two "
              f"models' next-token distributions, summed over the policy's own response "
              f"(up to and including EOS) and averaged over prompts.", ""]
    lines += _policy_table(policies, names, METRIC_COLUMNS, lambda m, k: _fmt(m.get(k)))

    if any("gain_vs_sft" in policies[n] for n in names):
        lines += ["", "## Intervals", "",
                  f"Mean ± the half-width of its 95% interval over prompts. The gain is the "
                  f"mean over prompts of (policy's gold score − `{reference}`'s on the same "
                  f"prompt), so its interval is paired; a gain whose interval excludes 0 is "
                  f"beyond the noise of the prompts.", ""]
        lines += _policy_table(policies, names, INTERVAL_COLUMNS, _pm)

    lines += pairwise_section(eval_json.get("pairwise", {}))

    win_path = os.path.join(workdir, WIN_RATE_FIGURE)
    win_rate_figure(eval_json, samples, win_path)
    lines += ["", "## Win rate against SFT", "",
              f"Per prompt, a policy wins when the gold labeler scores its response above "
              f"`{reference}`'s (ties count half); error bars are 95% intervals over prompts. "
              f"The analogue of InstructGPT's Figure 1, whose labelers compared samples: "
              f"temperature-1 samples (blue) lead, greedy responses beside them.", "",
              f"![win rate against {reference}]({WIN_RATE_FIGURE})"]

    categories = []
    for n in names:
        categories += [c for c in policies[n]["per_category"] if c not in categories]
    lines += ["", "## Accuracy per category", "",
              "Fraction of responses the gold labeler scores +1 (exact and concise; for "
              "`harmful`, the exact refusal).", ""]
    lines += _table(["policy"] + categories,
                    [[f"`{n}`"] + [_fmt(policies[n]["per_category"].get(c)) for c in categories]
                     for n in names])

    lines += ["", "## PPO training curves", ""]
    if ppo_workdirs:
        figures, missing = ppo_figures(ppo_workdirs, workdir)
        lines += ["From the metrics.jsonl of: "
                  + ", ".join(f"`{n}` ({d})" for n, d in ppo_workdirs.items()) + "."]
        lines += [""] + missing if missing else []
        for label, filename in figures:
            lines += ["", f"![{label}]({filename})"]
        if not figures:
            lines += ["", "No PPO curves to plot."]
        curves = {n: overoptimisation_curve(read_metrics(d, "ppo")) for n, d in ppo_workdirs.items()}
        curves = {n: c for n, c in curves.items() if len(c["step"])}
        if curves:
            overoptimisation_figure(curves, os.path.join(workdir, OVEROPTIMISATION_FIGURE))
            lines += ["", "## Over-optimisation (Gao et al. 2022)", "",
                      "The RM's score (the proxy PPO maximises) and the gold score of the same "
                      "rollouts (temperature-1 samples), against the square root of their KL to "
                      "SFT. Where the gold curve turns down while the RM's still rises, PPO is "
                      f"exploiting the RM: stop there. \"Best\" is the iteration whose gold "
                      f"score, averaged over {STOP_WINDOW} iterations, is highest (and the "
                      f"sqrt(KL) there the same average). These are the PPO prompts' rollouts "
                      f"(training words), not the held-out evaluation.", ""]
            lines += _table(["run", "best iteration", "sqrt(KL) there", "gold there",
                             "gold at the end", "iterations"],
                            [[f"`{n}`", str(c["best_step"]), _fmt(c["best_sqrt_kl"]),
                              _fmt(c["best_gold"]), _fmt(c["final_gold"]), str(len(c["step"]))]
                             for n, c in curves.items()])
            lines += ["", f"![over-optimisation]({OVEROPTIMISATION_FIGURE})"]
    else:
        lines += ["No PPO workdir was given (`ppo_workdirs`), so there are no training curves."]

    lines += ["", "## Sample responses", "",
              "The same prompts for every policy (one per category shown). Responses are "
              "cut at EOS; \"(no EOS)\" marks one that hit the length limit.", ""]
    ref_idx = _sample_indices(samples, names[0], samples_per_policy) if names else []
    for n in names:
        mine = [s for s in samples if s["policy"] == n]
        rows = []
        for i in ref_idx:
            s = mine[i]
            response = _cell(s["response"]) + ("" if s.get("finished", True) else " (no EOS)")
            rows.append([s["category"], _cell(s["prompt"]), response, _fmt(s["gold_score"], 1)])
        lines += [f"### `{n}`", ""] + _table(["category", "prompt", "response", "gold"], rows) + [""]

    if settings.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in settings["warnings"]] + [""]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
