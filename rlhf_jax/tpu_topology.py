"""TPU slices by their Cloud TPU names, and their compile-only devices.

`topology("v5p-128")` is the slice `rlhf_jax.aot` compiles for (its
`get_topology_desc` arguments and its chips' HBM); `topology_devices` asks
libtpu for its devices, which compile but never run.
"""
from __future__ import annotations

import importlib.util
import math
from typing import NamedTuple, Optional


class Topology(NamedTuple):
    """A TPU slice as `get_topology_desc` wants it, and its chips' HBM.

    Names follow Cloud TPU's accelerator types: v4-N and v5p-N count
    TensorCores (2 per chip, one megacore device each), v5e-N and v6e-N chips.
    HBM per chip from Google's TPU pages (v4 32, v5e 16, v5p 95, v6e 32 GB),
    compared here as GiB; the runtime keeps a little of it."""
    name: str
    topology_name: str      # "v5:4x4x4"
    chip_config_name: str   # "megacore" | "default"
    wrap: tuple             # torus wrap-around per dimension
    hbm_gib: float

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology_name.split(":")[1].split("x"))


# Slice shapes as Cloud TPU (and MaxText's accelerator_to_spec_map.py) define them.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}
_FAMILIES = {  # family: (topology prefix, chip config, TensorCores per counted unit, HBM GiB)
    "v4": ("v4", "megacore", 2, 32.0),
    "v5p": ("v5", "megacore", 2, 95.0),
    "v5e": ("v5e", "default", 1, 16.0),
    "v6e": ("v6e", "default", 1, 32.0),
}


def topology(name: str) -> Topology:
    """`v5p-128` -> Topology (64 chips, v5:4x4x4); a ValueError lists the known ones."""
    family, _, count = name.partition("-")
    if family not in _FAMILIES or not count.isdigit():
        raise ValueError(f"--topology={name!r}: expected <family>-<count> with family one of "
                         f"{', '.join(_FAMILIES)} (e.g. v5e-16, v5p-128)")
    prefix, chip_config, per_chip, hbm = _FAMILIES[family]
    chips = int(count) // per_chip
    shapes = _SHAPES_3D if per_chip == 2 else _SHAPES_2D
    if int(count) % per_chip or chips not in shapes:
        known = ", ".join(f"{family}-{c * per_chip}" for c in shapes)
        raise ValueError(f"--topology={name!r}: not a slice this tool knows ({known})")
    shape = shapes[chips]
    dims = [int(d) for d in shape.split("x")]
    if per_chip == 2:   # 3D torus: wrap-around on full cubes (4x4x4 and up)
        wrap = tuple(chips >= 64 for _ in dims)
    else:               # 2D torus: a dimension of 16 wraps
        wrap = tuple(d == 16 for d in dims) + (False,)
    return Topology(name, f"{prefix}:{shape}", chip_config, wrap, hbm)


def libtpu_version() -> Optional[str]:
    """The installed libtpu's version, or None when it is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    from importlib import metadata
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "unknown"


def topology_devices(topo: Topology) -> list:
    """The slice's compile-only TPU devices (libtpu required)."""
    if libtpu_version() is None:
        raise RuntimeError(
            f"libtpu is not installed: `pip install -e '.[tpu]'` (jax[tpu]: the libtpu jax "
            f"names) to compile for {topo.name} on this host")
    from jax.experimental.topologies import get_topology_desc
    return get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                             chip_config_name=topo.chip_config_name,
                             chips_per_host_bounds=(2, 2, 1) if topo.chips >= 4 else (1, 1, 1),
                             num_slices=1, wrap=topo.wrap).devices
