"""The tables of rlhf_jax.aot's records: the console report of one stage's
compiled steps, and README's mesh table (`python -m rlhf_jax.aot
--table_from records.jsonl`), with its depth extrapolation.
"""
from __future__ import annotations

import json

GiB = 2 ** 30


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def verdict(r: dict) -> str:
    """One step's line on the console: fits or not, its peak against the HBM."""
    return (f"{r['step']}: {'fits' if r['fits'] else 'does NOT fit'}, peak "
            f"{r['peak'] / GiB:.2f} GiB of {r['hbm_gib']:g} GiB HBM per chip "
            f"(compiled in {r['compile_s']:.0f} s)")


def batch_cell(r: dict) -> str:
    """The batch and its lengths: `512 x (512 + 512)` (PPO: rollouts x
    (prompt + response) tokens), `64 x 2048` (SFT), or the batch alone for a
    record without lengths."""
    if "response_len" in r:
        return f"{r['batch_size']} x ({r['prompt_len']} + {r['response_len']})"
    if "max_len" in r:
        return f"{r['batch_size']} x {r['max_len']}"
    return str(r["batch_size"])


def resident_line(r: dict, unit: int = GiB, unit_name: str = "GiB") -> str:
    """What a PPO iteration keeps on each chip throughout, part by part."""
    parts = r["resident"]
    return (f"resident per chip, {unit_name}: "
            + " + ".join(f"{k} {v / unit:.2f}" for k, v in parts.items() if v)
            + f" = {sum(parts.values()) / unit:.2f}")


def format_report(records: list[dict]) -> str:
    """A console table of one stage's records: GiB per chip."""
    if not records:
        return "(no steps compiled)"
    h = records[0]
    mesh = " x ".join(f"{k}={v}" for k, v in h["mesh"].items())
    unit, unit_name = (GiB, "GiB") if max(r["peak"] for r in records) >= GiB else (2 ** 20, "MiB")
    lines = [f"{h['stage']} | model {h['model']} ({_count(h['params'])} params, "
             f"{h['layers']} layers, matmul {h['matmul']}, activations {h['activations']}, "
             f"remat {h['remat']}) | batch {batch_cell(h)}"
             + (f", {h['minibatches']} minibatches" if "minibatches" in h else ""),
             f"{h['topology']}: {h['chips']} x {h['device_kind']} ({h['hbm_gib']:g} GiB HBM "
             f"each) | mesh {mesh} | jax {h['jax']}, libtpu {h['libtpu']}",
             f"{unit_name} per chip:",
             f"{'step':<11}{'args':>8}{'outputs':>9}{'aliased':>9}{'temp':>8}{'code':>7}"
             f"{'total':>8}{'other':>8}{'peak':>8}{'HBM':>7}  {'fits':<5}"
             f"{'TFLOP/step':>11}{'per chip':>10}{'compile s':>10}"]
    for r in records:
        g = lambda k: r[k] / unit  # noqa: E731
        lines.append(
            f"{r['step']:<11}{g('args'):8.2f}{g('outputs'):9.2f}{g('aliased'):9.2f}"
            f"{g('temp'):8.2f}{g('code'):7.2f}{g('total'):8.2f}{g('other'):8.2f}"
            f"{g('peak'):8.2f}{r['hbm_gib']:7g}  {'yes' if r['fits'] else 'NO':<5}"
            f"{r['flops'] / 1e12:11.1f}{r['flops'] / r['chips'] / 1e12:10.2f}"
            f"{r['compile_s']:10.1f}")
    if "resident" in h:
        lines.append(resident_line(h, unit, unit_name))
    return "\n".join(lines)


def extrapolated_peak(rs: list[dict], layers: int) -> float:
    """Peak bytes at `layers` layers, linear in depth through the records'
    two largest layer counts (one step, one mesh): a LOWER BOUND. Params and
    optimizer state grow exactly linearly, but the peak is the largest of
    several phases' working sets, and at a few layers the head's (logits)
    hides the layer stack's: Llama-3-8B's SFT step on v5p-128 extrapolated
    from 2 and 4 layers to 6.3 GiB, and compiled at 32 layers needs 9.1.
    Compile at full depth where the host allows (a layer scan's compile time
    does not grow with depth)."""
    (l1, p1), (l2, p2) = sorted((r["layers"], r["peak"]) for r in rs)[-2:]
    return p2 + (p2 - p1) / (l2 - l1) * (layers - l2)


def markdown_table(records: list[dict]) -> str:
    """README's mesh table: one row per stage run, its worst step's peak.
    A step of a preset compiled with fewer layers (`--layers`) at two depths
    is extrapolated to the preset's depth (`extrapolated_peak`), and says so:
    in the cell when it is the worst step, after it when another step is
    (its bound, which may be the one to grow past the worst)."""
    from rlhf_jax.models import presets
    runs: dict = {}
    for r in records:
        key = (r["model"], r["stage"], r["topology"], json.dumps(r["mesh"]), batch_cell(r))
        runs.setdefault(key, {}).setdefault(r["step"], []).append(r)
    rows = ["| model | stage | topology (chips) | mesh (data x fsdp x tensor) | batch | "
            "peak HBM per chip, GiB (step) | chip HBM, GiB | fits |",
            "|---|---|---|---|---|---|---|---|"]
    for (model, stage, topo, _, _), steps in runs.items():
        depth = presets.PRESETS.get(model, {}).get("layers")
        peaks, notes = {}, {}
        for name, rs in steps.items():
            full = [r for r in rs if r["layers"] == depth]
            if depth and not full and len({r["layers"] for r in rs}) >= 2:
                peaks[name] = extrapolated_peak(rs, depth)
                notes[name] = f"from {' and '.join(str(r['layers']) for r in rs)} layers"
            else:
                peaks[name] = max(full or rs, key=lambda r: r["layers"])["peak"]
        h = next(iter(steps.values()))[0]
        worst = max(peaks, key=peaks.get)
        cell = (f"{peaks[worst] / GiB:.1f} ({worst}"
                + (f", at least: {notes[worst]})" if worst in notes else ")")
                + "".join(f"; {name} at least {peaks[name] / GiB:.1f}, {note}"
                          for name, note in notes.items() if name != worst))
        mesh = " x ".join(str(v) for v in h["mesh"].values())
        fits = all(p <= h["hbm_gib"] * GiB for p in peaks.values())
        rows.append(f"| {model} | {stage} | {topo} ({h['chips']}) | {mesh} | {batch_cell(h)} | "
                    f"{cell} | {h['hbm_gib']:g} | {'yes' if fits else '**no**'} |")
    return "\n".join(rows)
