"""Metrics: metrics.jsonl, TensorBoard events (tensorboardX), console progress.

`metrics.jsonl` holds one JSON object a line: `stage`, `step`, `time` (unix
seconds) and float metrics. Only process 0 writes.
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping, Optional

import jax
import numpy as np


def _to_float(v):
    v = np.asarray(jax.device_get(v))
    return float(v) if v.size == 1 else None


class MetricsWriter:
    def __init__(self, workdir: str, stage: str, total_steps: Optional[int] = None,
                 progress: bool = True):
        self.stage = stage
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))
        except ImportError:  # TensorBoard events are optional; metrics.jsonl is not.
            self._tb = None
        if progress and total_steps:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, desc=stage, dynamic_ncols=True,
                             disable=os.environ.get("RLHF_JAX_NO_PROGRESS") == "1")

    def start_at(self, step: int):
        if self._bar is not None:
            self._bar.n = step
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
            self._bar.n = int(step)
            shown = {k.split("/")[-1]: f"{row[k]:.4g}" for k in progress_keys if k in row}
            self._bar.set_postfix(shown, refresh=True)

    def log(self, message: str):
        if self.enabled:
            if self._bar is not None:
                self._bar.write(message)
            else:
                print(message, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str, stage: Optional[str] = None) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]
