"""What a run prints: quiet third-party logging, one line per event, the results.

By default the console holds one progress bar per stage (metrics.py), our
own `[stage] ...` lines, one line per dataset built locally, and the
evaluation table at the end. Orbax, TFDS and JAX log through absl at INFO
(hundreds of lines a stage: `CheckpointManager created ...`, `Reusing
dataset ...`); those come back with `--verbose`. Warnings stay, each
message once, except a few that our own use of the libraries always
triggers and that ask for nothing (`_EXPECTED`). Processes other than 0
show errors only, so a multi-process run does not print everything N times.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile

from absl import logging as absl_logging

# Substrings of warnings every run triggers by design: Orbax on the earlier
# stages' checkpoints we open read-only, TFDS on a JSONL build named by its
# digest (data/builders.py) before its first build.
_EXPECTED = ("Given directory is read only",
             "Using custom data configuration",
             "has no dataset_info.json")

_verbose = False


def verbose() -> bool:
    """Whether `configure` was asked for the libraries' own output."""
    return _verbose


def expected(message: str) -> bool:
    """Whether a library warning is one the console drops (`_EXPECTED`)."""
    return any(s in message for s in _EXPECTED)


class _OnceFilter(logging.Filter):
    """Lets each warning template through once; drops `_EXPECTED` ones."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if _verbose or record.levelno < logging.WARNING or record.levelno >= logging.ERROR:
            return True
        if expected(record.getMessage()):
            return False
        template = record.msg if isinstance(record.msg, str) else repr(record.msg)
        key = (record.name, record.levelno, template)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def configure(verbose: bool = False, primary: bool = True):
    """Sets absl (and so Orbax, TFDS, JAX) logging for the console.

    Call once before the stages run (main.py does), and again with
    `primary=False` on processes other than 0 once `jax.distributed` is up.
    """
    global _verbose
    _verbose = bool(verbose)
    if verbose:
        level = absl_logging.INFO
    else:
        level = absl_logging.WARNING if primary else absl_logging.ERROR
    absl_logging.set_verbosity(level)
    # Without absl's handler on the root logger (a library use, not main.py),
    # set_verbosity leaves Python's root logger alone.
    logging.getLogger().setLevel(absl_logging.converter.absl_to_standard(level))
    handlers = list(logging.getLogger().handlers) + [absl_logging.get_absl_handler()]
    for h in handlers:
        if not any(isinstance(f, _OnceFilter) for f in h.filters):
            h.addFilter(_OnceFilter())


def say(message: str):
    """Prints one line on process 0."""
    import jax
    if jax.process_index() == 0:
        print(message, flush=True)


# (eval.json key, column title, least width) of the console's results table.
# Temperature-1 samples first: InstructGPT's Figure 1 compares samples
# (labelers judged sampled outputs), greedy decoding beside them.
_COLUMNS = (("gold_score_sampled", "gold (T=1)", 7), ("win_rate_vs_sft_sampled", "win (T=1)", 7),
            ("gold_score", "gold", 7), ("win_rate_vs_sft", "win vs {ref}", 7),
            ("refusal_rate", "refusal", 7), ("over_refusal_rate", "over-refusal", 7),
            ("kl_vs_sft", "KL", 7), ("pretrain_loss", "LM loss", 7))


def _cell(value, width: int) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:>{width}.3f}"
    return f"{'-':>{width}}"


def eval_table(eval_json: dict) -> list[str]:
    """The evaluation of every policy in `eval_json` (eval.json's contents)
    as fixed-width lines: a header, then one row per policy in file order."""
    policies = eval_json.get("policies", {})
    ref = eval_json.get("reference", "sft")
    name_w = max([len("policy")] + [len(n) for n in policies])
    columns = [(key, title.format(ref=ref)) for key, title, _ in _COLUMNS]
    widths = [max(w, len(title)) for (_, title), (_, _, w) in zip(columns, _COLUMNS)]
    header = f"{'policy':<{name_w}}" + "".join(
        f"  {title:>{w}}" for (_, title), w in zip(columns, widths))
    rows = [f"{name:<{name_w}}" + "".join(f"  {_cell(m.get(key), w)}"
                                          for (key, _), w in zip(columns, widths))
            for name, m in policies.items()]
    return [header, *rows]


@contextlib.contextmanager
def stderr_held(verbose: bool = False):
    """File descriptor 2 into a temporary file for the block, and dropped,
    unless `verbose`; replayed on the real stderr when the block raises.

    libtpu, started on a host without a TPU, writes its probe of the machine
    from C++ straight to fd 2 before its logging is initialised (5 lines:
    "could not determine TPU accelerator type", an E-line from
    common_lib.cc, a source location trace), which TPU_MIN_LOG_LEVEL,
    TPU_STDERR_LOG_LEVEL and TF_CPP_MIN_LOG_LEVEL do not silence (libtpu
    0.0.50.1); the main job avoids it by leaving TPU out of JAX's platforms
    (hostenv.skip_absent_tpu), which a compile for a TPU topology cannot.
    Python's own stderr (warnings, absl) goes through fd 2 too."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            sys.stderr.flush()
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
