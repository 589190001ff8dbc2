"""Checkpoints through Orbax: one CheckpointManager per stage.

A checkpoint holds three items:
  params  the model parameters (what another stage's `init_from` reads),
  train   everything else a resumed run needs to continue exactly: optimizer
          state, step, RNG key, and stage extras (KL controller, EMA weights),
  meta    JSON: the data position (batches consumed), the model config and the
          tokenizer, so a later stage can rebuild the architecture.
Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save restarts from the last complete step.

Orbax stores no checksum, and a garbled chunk can restore silently. So
`meta` also holds a CRC-32 of every saved array ("checksums", by item and
tree path), and `Checkpointer.restore_latest` verifies them. A damaged step
(a read error or a checksum mismatch) is moved aside, never deleted, to
`checkpoints/corrupt-<step>/`, with one line saying so, and the previous
step is tried. Arrays not fully addressable from one process (multi-host
shardings) are not summed; their checkpoints are checked by Orbax's reads only.

Below the manager: restoring a model's params straight into a stage's
shardings, and grafting one model's params onto another (an RM from an SFT
checkpoint keeps the backbone and gets a fresh head).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import zlib
from typing import Any, NamedTuple, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rlhf_jax import sharding
from rlhf_jax.errors import ConfigError
from rlhf_jax.models.resolve import saved_model_config
from rlhf_jax.models.transformer import Transformer

CHECKPOINTS = "checkpoints"

# Orbax saves a replicated array "replica-parallel": each replica writes one
# slice of it, cut by an eagerly dispatched slice op (one compile per shape).
# For small arrays the cuts cost more than the writes they share out (on 8
# CPU devices they were a third of a checkpoint save); below 1 MiB a replica
# one replica writes the whole array. The default handler's metadata store
# is kept.
_REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _register_array_handler():
    default = ocp.type_handlers.get_type_handler(jax.Array)
    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(default, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=_REPLICA_PARALLEL_MIN_BYTES)
    with _quiet_logs():     # Orbax warns of every override
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _abstract(tree):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Damaged(Exception):
    """A checkpoint step that cannot be read back as saved."""


def tree_checksums(tree) -> dict[str, str]:
    """`{tree path: "dtype:crc32"}` of every fully addressable array leaf."""
    leaves = [(jax.tree_util.keystr(path), x) for path, x in
              jax.tree_util.tree_leaves_with_path(tree)
              if getattr(x, "is_fully_addressable", True)]
    values = jax.device_get([x for _, x in leaves])
    return {key: f"{np.asarray(v).dtype}:{zlib.crc32(np.ascontiguousarray(v).tobytes()):08x}"
            for (key, _), v in zip(leaves, values)}


def verify_checksums(item: str, tree, sums: Optional[dict]) -> None:
    """Raises Damaged if a leaf of `tree` differs from its saved checksum.
    Leaves without one (older checkpoints, multi-host arrays) or restored
    into another dtype are not checked."""
    if not sums:
        return
    for key, got in tree_checksums(tree).items():
        want = sums.get(key)
        if want is not None and want.split(":")[0] == got.split(":")[0] and want != got:
            raise Damaged(f"{item} array {key} fails its checksum")


def quarantine(directory: str, step: int) -> str:
    """Moves step `step` of `directory` aside to `corrupt-<step>` (a free
    name); returns where it went."""
    aside = os.path.join(directory, f"corrupt-{step}")
    n = 1
    while os.path.exists(aside):
        n += 1
        aside = os.path.join(directory, f"corrupt-{step}.{n}")
    if jax.process_index() == 0:
        os.rename(os.path.join(directory, str(step)), aside)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"quarantine {directory} {step}")
    return aside


def _reason(error: BaseException) -> str:
    """An exception as one short line (Orbax/TensorStore errors run long)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def _quiet_logs():
    """Orbax's and TensorStore's absl lines and asyncio's reports held back."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _quiet_read_errors():
    """Orbax and TensorStore log a damaged read at length (absl ERROR lines,
    asyncio's "Task exception was never retrieved" with a traceback);
    `restore_latest` says it in one line instead."""
    with _quiet_logs():
        try:
            yield
        except BaseException:
            # Abandoned read tasks report now, while quiet. Only after a
            # failed read: a full collection costs 1-2 s in a process
            # holding a model.
            gc.collect()
            raise


_register_array_handler()


def _leaf_shapes(tree) -> list:
    return sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(tree))


class Checkpointer:
    def __init__(self, workdir: str, save_every: int, keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
        self.save_every = max(int(save_every), 1)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def should_save(self, step: int, final: bool = False) -> bool:
        return final or step % self.save_every == 0

    def save(self, step: int, params, train, meta: dict, force: bool = False):
        if step in self.manager.all_steps():
            return
        meta = dict(meta, checksums={"params": tree_checksums(params),
                                     "train": tree_checksums(train)})
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, params_like, train_like) -> tuple[Any, Any, dict]:
        """Restores into the shapes, dtypes and shardings of `*_like` (arrays or
        jax.ShapeDtypeStruct with .sharding)."""
        r = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_like)),
            train=ocp.args.StandardRestore(_abstract(train_like)),
            meta=ocp.args.JsonRestore()))
        return r.params, r.train, r.meta

    def restore_latest(self, params_like, train_like):
        """(step, params, train, meta) of the latest step that reads back as
        saved, or None if there is no checkpoint. Damaged steps are moved
        aside (`quarantine`) with a warning, newest first.

        Raises:
          ConfigError: the checkpoints were made for other shapes (other
            settings), or every step is damaged.
        """
        moved = []
        while (step := self.manager.latest_step()) is not None:
            try:
                with _quiet_read_errors():
                    params, train, meta = self._restore_checked(step, params_like, train_like)
                return step, params, train, meta
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any read error means a damaged step
                aside = quarantine(self.directory, step)
                moved.append(aside)
                if jax.process_index() == 0:
                    print(f"warning: checkpoint {os.path.join(self.directory, str(step))} is "
                          f"damaged ({_reason(e)}); moved it to {aside} and trying the one "
                          "before", file=sys.stderr, flush=True)
                self.manager.reload()
        if moved:
            raise ConfigError(f"{self.directory}: no checkpoint reads back as saved (moved aside: "
                              f"{', '.join(moved)}); delete the workdir to start over")
        return None

    def _restore_checked(self, step: int, params_like, train_like):
        path = os.path.join(self.directory, str(step))
        for item, like in (("params", params_like), ("train", train_like)):
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(path, item)))
            saved = saved.tree if hasattr(saved, "tree") else saved
            if _leaf_shapes(saved) != _leaf_shapes(like):
                raise ConfigError(f"{path} holds a {item} item of other shapes than this run's: "
                                  "it was made with other settings; use a new workdir or delete it")
        params, train, meta = self.restore(step, params_like, train_like)
        if not isinstance(meta, dict):
            raise Damaged("its meta is not a JSON object")
        sums = meta.get("checksums") or {}
        verify_checksums("params", params, sums.get("params"))
        verify_checksums("train", train, sums.get("train"))
        return params, train, meta

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _read_only() -> ocp.CheckpointManagerOptions:
    # With what read_only implies spelled out: Orbax warns of each option it has to change.
    return ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)


def resolve(path: str) -> tuple[str, int]:
    """(checkpoint directory, step) for an `init_from` path: a stage workdir
    (latest step of its checkpoints/), a checkpoints directory (latest step),
    or one step's directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_from: no such directory: {path}")
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        path = os.path.join(path, CHECKPOINTS)
    if os.path.isdir(os.path.join(path, "params")) and os.path.basename(path).isdigit():
        return os.path.dirname(path), int(os.path.basename(path))
    mngr = ocp.CheckpointManager(path, options=_read_only())
    step = mngr.latest_step()
    mngr.close()
    if step is None:
        raise FileNotFoundError(f"init_from: no finished checkpoint under {path}")
    return path, step


def has_checkpoint(path: str) -> bool:
    try:
        resolve(path)
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _reading(directory: str, step: int):
    """Reads of another stage's checkpoint (init_from, reward_from): a damaged
    one is moved aside and reported in one line. Its stage, run again (the
    pipeline does so: instructgpt.finished), resumes from the step before."""
    try:
        with _quiet_read_errors():
            yield
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - any read error means a damaged step
        aside = quarantine(directory, step)
        raise ConfigError(
            f"checkpoint {os.path.join(directory, str(step))} is damaged ({_reason(e)}); moved "
            f"it to {aside}: run the stage that wrote it again to resume it from its previous "
            "checkpoint") from None


class Source(NamedTuple):
    """A finished checkpoint opened once: where it is (`resolve`) and its
    meta, read once. What the functions that read a checkpoint's params
    take instead of a path, so a stage reads each meta once."""
    path: str
    directory: str
    step: int
    meta: dict


def open_source(path) -> Source:
    """`path` (a stage workdir, checkpoints dir or step dir) resolved and
    its meta read; a Source is returned as it is."""
    if isinstance(path, Source):
        return path
    directory, step = resolve(path)
    return Source(path, directory, step, _read_meta_at(directory, step))


def read_meta(path: str) -> dict:
    return _read_meta_at(*resolve(path))


def _read_meta_at(directory: str, step: int) -> dict:
    mngr = ocp.CheckpointManager(directory, options=_read_only())
    try:
        with _reading(directory, step):
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            if not isinstance(meta, dict):
                raise Damaged("its meta is not a JSON object")
    finally:
        mngr.close()
    return meta


def load_saved_params(path: str):
    """Params only, in the shapes and dtypes they were saved with, on the
    default device: for inspection, export and tests."""
    directory, step = resolve(path)
    # The handler's metadata, not StandardCheckpointer's: that one looks for a
    # step's _CHECKPOINT_METADATA inside the item and warns on the console.
    meta = ocp.StandardCheckpointHandler().metadata(
        epath.Path(os.path.join(directory, str(step), "params")))
    tree = meta.tree if hasattr(meta, "tree") else meta
    like = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    return load_params(path, like)


def write_params(dest: str, step: int, params, meta: dict) -> str:
    """Writes params and meta (no optimizer or train state) as a one-step
    checkpoint under `<dest>/checkpoints/<step>`, a directory any stage's
    `init_from` takes. Returns `dest`."""
    mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(dest), CHECKPOINTS),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    meta = dict(meta, checksums={"params": tree_checksums(params)})
    mngr.save(int(step), args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return dest


def export_params(path: str, dest: str) -> int:
    """`path`'s params and meta as a params-only checkpoint in `dest`
    (write_params). Returns the step."""
    _, step = resolve(path)
    write_params(dest, step, load_saved_params(path), read_meta(path))
    return step


def load_params(path, params_like):
    """Params only, from another stage's checkpoint (a path or a Source),
    into `params_like`'s shardings."""
    source = open_source(path)
    directory, step = source.directory, source.step
    sums = (source.meta.get("checksums") or {}).get("params")
    mngr = ocp.CheckpointManager(directory, options=_read_only())
    try:
        with _reading(directory, step):
            params = mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params_like)))).params
            verify_checksums("params", params, sums)
    finally:
        mngr.close()
    return params


# ---------------------------------------------------------------------------
# A model's params from a checkpoint, in a stage's shardings
# ---------------------------------------------------------------------------

def graft_params(target, source):
    """`target` with every leaf that `source` has at the same path and shape
    replaced: a reward model from an SFT checkpoint keeps the backbone and
    gets a fresh scalar head."""
    flat_src = flax.traverse_util.flatten_dict(source)
    flat_tgt = flax.traverse_util.flatten_dict(target)
    n = 0
    for k, v in flat_tgt.items():
        s = flat_src.get(k)
        if s is not None and s.shape == v.shape:
            flat_tgt[k] = s
            n += 1
    if n == 0:
        raise ConfigError("init_from: the checkpoint shares no parameters with this model")
    return flax.traverse_util.unflatten_dict(flat_tgt)


def restore_target(model: Transformer, runtime: sharding.Runtime):
    """(abstract params with their shardings, the shardings) of `model` on
    `runtime`: what a checkpoint restores into, without running init."""
    abstract = sharding.abstract_params(model)
    shardings = sharding.logical_shardings(abstract, runtime.mesh, runtime.rules)
    return sharding.abstract_like(sharding.strip_boxes(abstract), shardings), shardings


def put(tree, shardings):
    """`tree`'s leaves placed by `shardings` (a matching tree)."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)


def load_params_from(path, runtime: sharding.Runtime, target_params, target_shardings):
    """Params of the checkpoint at `path` (or a Source), restored directly
    into this stage's shardings and grafted onto `target_params` (heads may
    differ)."""
    path = open_source(path)
    src_model = Transformer(saved_model_config(path.meta))
    source = load_params(path, restore_target(src_model, runtime)[0])
    return put(graft_params(target_params, source), target_shardings)


def restore_model_params(path, runtime: sharding.Runtime, model: Transformer, rng=None):
    """`model`'s params from the checkpoint at `path`, restored straight into
    their shardings (no random init, no compile) when the checkpoint has the
    same head; otherwise initialised from `rng` (default key 0) and grafted
    (e.g. a value model from an SFT checkpoint). `path`: or a Source.
    Returns (params, shardings)."""
    path = open_source(path)
    if path.meta.get("model", {}).get("head", "lm") == model.cfg.head:
        like, shardings = restore_target(model, runtime)
        return load_params(path, like), shardings
    params, shardings = runtime.init_params(model, jax.random.PRNGKey(0) if rng is None else rng)
    return load_params_from(path, runtime, params, shardings), shardings
