"""Entry point: `python -m rlhf_jax.main --config configs/<stage>.py[:variant] --workdir DIR`.

Intentionally short: parse flags, start the multi-host runtime, dispatch on
`config.stage`. Everything else lives in importable, tested modules.
"""
import ast
import os
import sys

if __name__ == "__main__":
    # Before anything heavy is imported: restart once with huge-page malloc
    # (rlhf_jax/hostenv.py says why).
    from rlhf_jax import hostenv
    hostenv.reexec_with_hugepage_malloc()
    hostenv.skip_absent_tpu()       # no libtpu start-up lines on a host without a TPU

# Config files import their shared base as `configs.base`: make the directory
# holding `configs/` importable wherever the command runs from.
for _arg in sys.argv:
    if _arg.startswith("--config="):
        _root = os.path.dirname(os.path.dirname(os.path.abspath(_arg.split("=", 1)[1].split(":")[0])))
        sys.path.insert(0, _root)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logging (absl: Orbax, "
                             "TFDS, JAX) and TFDS's build output; by default only warnings, once.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag or `--config.*` override (an
    unknown key, a value of the wrong type) reported in one line, exit 2,
    instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = str(e)
        if msg[:1] in "'\"":        # a KeyError's repr inside ml_collections' AttributeError
            try:
                msg = ast.literal_eval(msg)
            except (SyntaxError, ValueError):
                pass
        msg = " ".join(msg.split())
        if isinstance(e, (AttributeError, KeyError)):
            msg = f"unknown config key {msg}"
        sys.stderr.write(f"rlhf_jax: error: {msg} (flags: {' '.join(argv[1:])})\n")
        sys.exit(2)


def main(argv):
    del argv
    from rlhf_jax import console
    console.configure(_VERBOSE.value)       # before anything logs
    import jax
    from rlhf_jax import distributed, errors, stages

    distributed.initialize()
    console.configure(_VERBOSE.value, primary=jax.process_index() == 0)
    with errors.reported():
        stages.run(_CONFIG.value, os.path.abspath(_WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
