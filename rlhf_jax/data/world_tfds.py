"""TFDS builders of the instruction world's data sets (WORLD.md).

    builder = prepare("demonstrations_tiny", data_dir)          # builds once
    source = tfds.data_source("instruction_world/demonstrations_tiny",
                              data_dir=data_dir, split="train")
    source[0]  # {"prompt": b"...", "response": b"...", "category": b"..."}

The builders write array_record files, which `tfds.data_source` (and so
grain) reads by random access with no TensorFlow installed; `as_dataset`
would need TensorFlow and is never used. Importing this module registers the
`instruction_world` builder with TFDS.

Configs (each also as `<name>_tiny` with small counts, for tests):
    corpus          text     train (train words), heldout (held-out words:
                             the alignment-tax LM loss); pages of 1 to 4
                             conversations
    demonstrations  demonstrations   train, heldout (SFT validation); by the
                             perfect demonstrator. `demonstrations_f0.45`
                             (also `demonstrations_tiny_f0.45`): flaw rate
                             f = 0.45 (WORLD.md, "The demonstrators"), each
                             record's `flawed` saying whether it carries the
                             flaw; f is part of the config's name, so a build
                             at one f is never read at another.
    ppo_prompts     prompts  train, heldout
    comparison_prompts  prompts  train (the collect step's), heldout (its
                             held-out comparisons)
    eval_prompts    prompts  heldout only
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import builders
from rlhf_jax.data.features import features
from rlhf_jax.world import datasets as world

FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False)
class WorldConfig(tfds.core.BuilderConfig):
    """A world data set: which generator, which record kind, how many per split.

    `sizes` maps split -> count (for eval_prompts: count per category).
    """
    generator: str = ""
    kind: str = ""
    sizes: tuple[tuple[str, int], ...] = ()
    seed: int = 0
    flaw_rate: float = 0.0      # demonstrations only


_FULL = {
    "corpus": ("pretraining_corpus", "text",
               (("train", world.N_CORPUS), ("heldout", world.N_CORPUS_HELDOUT))),
    "demonstrations": ("demonstrations", "demonstrations",
                       (("train", world.N_DEMONSTRATIONS), ("heldout", 1_000))),
    "ppo_prompts": ("ppo_prompts", "prompts",
                    (("train", world.N_PPO_PROMPTS), ("heldout", 1_000))),
    "comparison_prompts": ("comparison_prompts", "prompts",
                           (("train", world.N_COMPARISONS), ("heldout", 1_000))),
    "eval_prompts": ("eval_prompts", "prompts", (("heldout", world.N_EVAL_PER_CATEGORY),)),
}
_TINY = {
    "corpus": (("train", 512), ("heldout", 128)),
    "demonstrations": (("train", 256), ("heldout", 64)),
    "ppo_prompts": (("train", 256), ("heldout", 64)),
    "comparison_prompts": (("train", 256), ("heldout", 64)),
    "eval_prompts": (("heldout", 16),),
}


VERSION = tfds.core.Version("2.0.0")
FLAW_SUFFIX = "_f"


def _config(name: str, split_sizes, flaw_rate: float = 0.0) -> WorldConfig:
    base = name.removesuffix("_tiny")
    generator, kind, _ = _FULL[base]
    flaw = f", flaw rate {flaw_rate:g}" if flaw_rate else ""
    return WorldConfig(
        name=name + (f"{FLAW_SUFFIX}{flaw_rate:g}" if flaw_rate else ""), version=VERSION,
        description=f"instruction world {base} ({kind} records), "
                    + ", ".join(f"{s}: {n}" for s, n in split_sizes)
                    + (" per category" if base == "eval_prompts" else "") + flaw,
        generator=generator, kind=kind, sizes=split_sizes, flaw_rate=float(flaw_rate))


def _configs() -> list[WorldConfig]:
    return [_config(name + suffix, split_sizes)
            for name, (_, _, sizes) in _FULL.items()
            for suffix, split_sizes in (("", sizes), ("_tiny", _TINY[name]))]


def builder_config(config_name: str) -> WorldConfig:
    """The config named `config_name`: one of CONFIG_NAMES, or a demonstrations
    config with its flaw rate, `demonstrations[_tiny]_f<rate>` (rate in [0, 1];
    `_f0` is the perfect demonstrator's, the config without the suffix)."""
    known = {c.name: c for c in InstructionWorld.BUILDER_CONFIGS}
    if config_name in known:
        return known[config_name]
    base, sep, rate = config_name.rpartition(FLAW_SUFFIX)
    if sep and base in ("demonstrations", "demonstrations_tiny"):
        try:
            flaw_rate = float(rate)
        except ValueError:
            flaw_rate = -1.0
        if 0.0 <= flaw_rate <= 1.0:
            if flaw_rate == 0.0:
                return known[base]
            return _config(base, known[base].sizes, flaw_rate)
    raise ValueError(f"unknown instruction_world config {config_name!r}: expected one of "
                     f"{sorted(known)}, or demonstrations[_tiny]_f<flaw rate in [0, 1]>")


class InstructionWorld(builders.QuietBuild, tfds.core.GeneratorBasedBuilder):
    """The instruction world (WORLD.md): corpus, demonstrations and prompts."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "2.0.0": "Corpus documents are pages of 1 to 4 conversations from one "
                              "source; demonstrations record `flawed` and take a flaw rate."}
    BUILDER_CONFIGS = _configs()

    def _info(self) -> tfds.core.DatasetInfo:
        spec = features(self.builder_config.kind)
        if self.builder_config.generator == "demonstrations":
            spec = tfds.features.FeaturesDict({**spec, "flawed": np.bool_})
        return self.dataset_info_from_configs(
            features=spec,
            supervised_keys=None,
            # Records are already i.i.d. draws; keeping generation order makes
            # the files equal the generators' output (eval_prompts stays
            # interleaved by category) and readers shuffle anyway.
            disable_shuffling=True,
            homepage="https://arxiv.org/abs/2203.02155",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated from code
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.sizes}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        if cfg.generator == "eval_prompts":
            records = world.eval_prompts(n, seed=cfg.seed)
        elif cfg.generator == "demonstrations":
            records = world.demonstrations(n, seed=cfg.seed, split=split, flaw_rate=cfg.flaw_rate)
        else:
            records = getattr(world, cfg.generator)(n, seed=cfg.seed, split=split)
        # Integer keys in generation order (stored in that order, see _info).
        yield from enumerate(records)


def prepare(config_name: str, data_dir: str | os.PathLike) -> InstructionWorld:
    """The builder of `instruction_world/<config_name>` in `data_dir`, built
    (array_record) if it is not there yet.

    Under a file lock, as JSONL builds are: the processes of one
    multi-process run (launch/local.sh on a fresh cache) otherwise build it
    at once and all but one fail renaming into the finished directory.
    """
    data_dir = os.fspath(data_dir)
    with builders.file_lock(os.path.join(data_dir, InstructionWorld.name, config_name + ".lock")):
        # Constructed under the lock: a builder looks for existing data when
        # it is created.
        builder = InstructionWorld(config=builder_config(config_name), data_dir=data_dir,
                                   file_format=FILE_FORMAT)
        builders.prepare_locally(builder)
    return builder


CONFIG_NAMES = tuple(c.name for c in InstructionWorld.BUILDER_CONFIGS)
