"""Metrics: metrics.jsonl, TensorBoard events (tensorboardX), console progress.

`metrics.jsonl` holds one JSON object a line: `stage`, `step`, `time` (unix
seconds) and float metrics. Only process 0 writes.

The console gets one tqdm bar per stage: steps done, steps/s, ETA, and the
stage's progress keys (a `*_per_s` key as a rate, `tokens/s=22.9k`). On a
terminal it redraws in place; written to a file or a pipe it is a whole
line every `_FILE_INTERVAL_S` seconds and one when the stage ends, so a log
holds a line or two per stage, not redraws. `RLHF_JAX_NO_PROGRESS=1` turns
the bars off (CI).
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Mapping, Optional

import jax
import numpy as np

_FILE_INTERVAL_S = 60.0


def _to_float(v):
    v = np.asarray(jax.device_get(v))
    return float(v) if v.size == 1 else None


class MetricsWriter:
    def __init__(self, workdir: str, stage: str, total_steps: Optional[int] = None,
                 progress: bool = True, label: str = ""):
        """`label` names the progress bar (default: the stage)."""
        self.stage = stage
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        self._tty = sys.stderr.isatty()
        self._last_line = time.time()
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))
        except ImportError:  # TensorBoard events are optional; metrics.jsonl is not.
            self._tb = None
        if progress and total_steps and os.environ.get("RLHF_JAX_NO_PROGRESS") != "1":
            from tqdm import tqdm
            # Not on a terminal the bar draws into nothing; `_line` prints its state.
            self._bar = tqdm(total=total_steps, desc=label or stage, unit="step", dynamic_ncols=True,
                             file=None if self._tty else io.StringIO(),
                             mininterval=0.1 if self._tty else _FILE_INTERVAL_S)

    def start_at(self, step: int):
        """A resumed stage: its bar starts at `step`, its rate counts this run's steps only."""
        if self._bar is not None:
            self._bar.n = self._bar.initial = self._bar.last_print_n = step
            self._bar.refresh()

    def write(self, step: int, metrics: Mapping, progress_keys: tuple = ()):
        """Writes host-side floats; arrays are fetched here (call it one step late)."""
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": int(step), "time": time.time()}
        for k, v in metrics.items():
            f = _to_float(v)
            if f is not None:
                row[k] = f
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("stage", "step", "time"):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            if progress_keys:    # an eval or finalize row keeps the training postfix
                self._bar.set_postfix({_short(k): _format(k, row[k]) for k in progress_keys
                                       if k in row}, refresh=False)
            self._bar.update(int(step) - self._bar.n)   # redraws when mininterval has passed
            if (not self._tty and int(step) < self._bar.total
                    and time.time() - self._last_line >= _FILE_INTERVAL_S):
                self._line()            # the last step's line is close()'s

    def _line(self):
        print(self._bar, file=sys.stderr, flush=True)
        self._last_line = time.time()

    def log(self, message: str):
        if self.enabled:
            if self._bar is not None and self._tty:
                self._bar.write(message)
            else:
                print(message, flush=True)

    def close(self):
        if self._bar is not None:
            if not self._tty:
                self._line()
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _short(key: str) -> str:
    return key.split("/")[-1].replace("_per_s", "/s")


def _format(key: str, value: float) -> str:
    if key.endswith("_per_s"):
        from tqdm import tqdm
        return tqdm.format_sizeof(value)
    return f"{value:.4g}"


def read_metrics(workdir: str, stage: Optional[str] = None) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]
