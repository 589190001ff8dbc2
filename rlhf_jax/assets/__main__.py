"""Replaces the shipped base model with a pretrain workdir's final params:

    python -m rlhf_jax.main --config configs/pretrain.py --workdir workdirs/world_base
    python -m rlhf_jax.assets workdirs/world_base

Only params and meta are kept (no optimizer state), so the package stays small.
"""
import os
import shutil
import sys

from rlhf_jax import checkpoint
from rlhf_jax.assets import WORLD_BASE


def main(argv) -> int:
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    dest = os.path.join(os.path.dirname(os.path.abspath(__file__)), WORLD_BASE)
    old = os.path.join(dest, checkpoint.CHECKPOINTS)
    if os.path.isdir(old):
        shutil.rmtree(old)
    step = checkpoint.export_params(argv[1], dest)
    meta = checkpoint.read_meta(dest)
    print(f"shipped step {step} of {os.path.abspath(argv[1])} to {dest} "
          f"(model: {meta.get('model')})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
