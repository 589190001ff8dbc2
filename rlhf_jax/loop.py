"""The host loop every training stage runs: pretrain, SFT, RM and PPO.

A stage hands `run` a `Loop`: its state, a `step_fn(state, step) -> (state,
metrics)` that dispatches one step (a supervised update, or a PPO
iteration: rollout, scoring and update), and what to log, evaluate and
checkpoint. The loop owns everything else, once for all stages:

- resume: the latest checkpoint in the workdir is restored into the state's
  shardings, and the loop continues from its step (the data position is the
  step: loaders are indexed by it);
- metrics, read one step late: the host dispatches step s + 1 before it reads
  step s's metrics, so it never waits for the step it just dispatched;
- the non-finite guard: every step's `nonfinite` count (consecutive skipped
  updates) is checked, a skipped update is always logged, and
  `train.max_nonfinite_steps` in a row stop the run;
- checkpoints every `train.checkpoint_every` steps and at the end;
- preemption: SIGTERM, or Orbax's preemption notice on multi-host TPU, saves
  a checkpoint at the next step boundary and raises `errors.Preempted`.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Optional

import jax

from rlhf_jax import checkpoint, sharding
from rlhf_jax.errors import ConfigError, Preempted
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.train_state import TrainState, join


class Preemption:
    """SIGTERM (or Orbax's preemption notice on TPU) asks for a checkpoint at
    the next step boundary and a clean exit."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. under some test runners)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        if self.requested:
            return True
        try:  # reached at the same step on every host of a multi-host run
            from orbax.checkpoint import multihost
            return bool(multihost.reached_preemption(step))
        except Exception:
            return False

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _split(state):
    return state.split()


@dataclasses.dataclass
class Loop:
    """One training stage, for `run`.

    `step_fn(state, step)` dispatches step `step` (0-based) and returns the
    new state and a dict of device metrics with at least `nonfinite`.
    `split(state) -> (params, train)` gives the two checkpoint items (params:
    what a later stage reads) and `join(params, train)` inverts it; both also
    apply to the tree of shardings (`saved_params` may replace the params
    item saved). `host_metrics(step, metrics, seconds per
    step, None on an unlogged step) -> dict` adds host-side figures to a
    row and may pop non-scalar entries (PPO's sampled tokens, for the gold
    score).
    """
    stage: str
    train: Any                       # the config's `train` block
    workdir: str
    state: Any
    state_shardings: Any
    step_fn: Callable
    meta: dict
    evaluate: Optional[Callable] = None       # evaluate(params) -> metrics
    # `finalize(state) -> (state, metrics, meta)`, applied once to the trained
    # state just before the final checkpoint, which then holds its result and
    # `meta` (the RM's bias normalisation). A finished stage, re-run, is restored
    # as saved and never finalized again.
    finalize: Optional[Callable] = None
    host_metrics: Optional[Callable] = None
    units_per_step: float = 0.0      # tokens (or pairs) per step, for the rate metric
    units_name: str = "tokens_per_s"
    progress_keys: tuple = ()
    label: str = ""                  # the progress bar's name; default the stage
    step_name: str = "step"          # "iteration" for PPO, in messages
    split: Callable = _split
    join: Callable = join
    # `saved_params(state)`: the params item a checkpoint holds, where it is
    # not split(state)[0] (PPO's bias-corrected EMA of the policy weights).
    saved_params: Optional[Callable] = None


def supervised_step(runtime: sharding.Runtime, loader, train_step,
                    prepare: Callable[[dict], dict] = lambda batch: batch) -> Callable:
    """`step_fn` of a supervised stage: batch `step` of `loader`, laid out by
    `prepare` on the host, through the jitted `train_step(state, batch)`."""
    def step_fn(state: TrainState, step: int):
        return train_step(state, runtime.global_batch(prepare(loader.batch(step))))
    return step_fn


def restore_or_start(ckpt: checkpoint.Checkpointer, loop: Loop) -> tuple[Any, int]:
    """The state at the latest checkpoint that reads back as saved (damaged
    ones are moved aside: Checkpointer.restore_latest), or the initial one."""
    params_like, train_like = loop.split(loop.state)
    sh_params, sh_train = loop.split(loop.state_shardings)
    found = ckpt.restore_latest(sharding.abstract_like(params_like, sh_params),
                                sharding.abstract_like(train_like, sh_train))
    if found is None:
        return loop.state, 0
    step, params, train, _ = found
    return loop.join(params, train), step


def _prefixed(stage: str, metrics: dict) -> dict:
    return {k if "/" in k else f"{stage}/{k}": v for k, v in metrics.items()}


def run(loop: Loop):
    """Runs `loop` from its last checkpoint to `train.steps`; returns the state."""
    t = loop.train
    total = int(t.steps)
    name = f"[{loop.stage}]"
    ckpt = checkpoint.Checkpointer(loop.workdir, t.checkpoint_every, t.keep_checkpoints)
    state, start = restore_or_start(ckpt, loop)
    if start > total:
        # A run of more steps stopped here: resuming would skip its end
        # (the RM's bias normalisation included) and call it finished.
        raise ConfigError(f"{ckpt.directory} holds {loop.step_name} {start}, past train.steps="
                          f"{total}: it was made with other settings; use a new workdir or "
                          f"delete it")
    writer = MetricsWriter(loop.workdir, loop.stage, total_steps=total, label=loop.label)
    if start:
        writer.log(f"{name} resuming from {loop.step_name} {start} ({ckpt.directory})")
        writer.start_at(start)
    preempt = Preemption()
    final_meta = {}         # what `loop.finalize` adds to the final checkpoint's meta
    progress = tuple(f"{loop.stage}/{k}" for k in loop.progress_keys)
    if loop.units_per_step:
        progress += (f"{loop.stage}/{loop.units_name}",)

    def save(step, final=False):
        params, train = loop.split(state)
        if loop.saved_params is not None:
            params = loop.saved_params(state)
        meta = dict(loop.meta, **final_meta, stage=loop.stage, step=step, data_step=step)
        ckpt.save(step, params, train, meta, force=final)

    def finalize(step):
        nonlocal state
        state, metrics, meta = loop.finalize(state)
        final_meta.update(meta)
        writer.write(step, _prefixed(loop.stage, metrics))
        writer.log(f"{name} finalized at {loop.step_name} {step}: " +
                   ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()))

    def row_of(step, metrics, seconds_per_step):
        metrics = jax.device_get(metrics)
        if loop.host_metrics is not None:
            metrics = dict(metrics, **loop.host_metrics(step, metrics, seconds_per_step))
        row = _prefixed(loop.stage, metrics)
        if loop.units_per_step and seconds_per_step is not None:
            row[f"{loop.stage}/{loop.units_name}"] = loop.units_per_step / seconds_per_step
        return row

    # The previous step's (step, device metrics, is a log step), read one step
    # late so the host never waits for the step it just dispatched.
    previous = None
    t0, last_logged = time.time(), start

    def settle(prev, check: bool = True):
        nonlocal t0, last_logged
        prev_step, prev_metrics, is_log_step = prev
        nonfinite = int(prev_metrics["nonfinite"])
        if is_log_step:
            jax.block_until_ready(prev_metrics)
            seconds = max(time.time() - t0, 1e-9) / max(prev_step - last_logged, 1)
            writer.write(prev_step, row_of(prev_step, prev_metrics, seconds),
                         progress_keys=progress)
            t0, last_logged = time.time(), prev_step
        elif nonfinite:     # a skipped update is always logged
            writer.write(prev_step, row_of(prev_step, prev_metrics, None))
        if check and nonfinite >= t.max_nonfinite_steps:
            raise FloatingPointError(
                f"{name} {nonfinite} non-finite updates in a row at {loop.step_name} "
                f"{prev_step} ({loop.step_name}s {prev_step - nonfinite + 1}-{prev_step} "
                f"skipped): stopping (train.max_nonfinite_steps={t.max_nonfinite_steps})")

    try:
        for step in range(start, total):
            state, metrics = loop.step_fn(state, step)
            if previous is not None:
                settle(previous)
                previous = None
            done = step + 1
            current = (done, metrics, done % t.log_every == 0 or done == total)
            if done == total:
                # The last step's row now, before the evaluation, finalize and
                # the final save, so its rate counts the steps only.
                settle(current, check=False)
                current = None
            if loop.evaluate is not None and (done % t.eval_every == 0 or done == total):
                ev = _prefixed(loop.stage, loop.evaluate(state.params))
                writer.write(done, ev)
                writer.log(f"{name} {loop.step_name} {done}: " +
                           ", ".join(f"{k}={float(v):.4g}" for k, v in ev.items()))
            if done == total and loop.finalize is not None:
                finalize(done)
            if ckpt.should_save(done, final=done == total):
                save(done, final=done == total)
            # Asked once a step: SIGTERM or Orbax's preemption notice
            # (multi-host), which is not `preempt.requested`, both stop here.
            if preempt.check(done) and done < total:
                settle(current, check=False)    # this step's row, before the exit
                save(done, final=True)
                ckpt.close()
                writer.log(f"{name} preempted: checkpoint saved at {loop.step_name} {done}")
                raise Preempted(done)
            previous = current
        if previous is not None:
            settle(previous, check=False)       # the run is complete and saved
        if start >= total and ckpt.latest_step() is None:
            if loop.finalize is not None:
                finalize(total)
            save(total, final=True)
    finally:
        preempt.restore()
        ckpt.close()
        writer.close()
    return state
