"""TFDS feature specs of the record kinds (DESIGN.md, JSONL inputs).

Every builder, for local JSONL files and for the instruction world alike,
writes one of these kinds, so that a user's own data and the world's go
through the same readers.
"""
import numpy as np
import tensorflow_datasets as tfds

KINDS = ("demonstrations", "comparisons", "prompts", "text")


def features(kind: str) -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    if kind == "demonstrations":
        spec = {"prompt": text(), "response": text()}
    elif kind == "comparisons":
        # Pairwise {"chosen", "rejected"} records are stored as the K=2 case.
        spec = {"prompt": text(), "responses": tfds.features.Sequence(text()),
                "ranks": tfds.features.Sequence(np.int32),
                # [K] bools when the JSONL gave them, else empty (all finished).
                "finished": tfds.features.Sequence(np.bool_)}
    elif kind == "prompts":
        spec = {"prompt": text()}
    elif kind == "text":
        spec = {"text": text()}
    else:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    # The instruction world tags records with their task category (empty for
    # user data) so that evaluation can report per-category accuracy.
    spec["category"] = text()
    return tfds.features.FeaturesDict(spec)


def stored(record: dict, kind: str) -> dict:
    """A normalised record with every field its kind's features hold (the
    optional ones at their empty default)."""
    if kind == "comparisons" and "finished" not in record:
        return {**record, "finished": []}
    return record


def unstored(record: dict) -> dict:
    """The inverse of `stored`: the optional fields left at their empty default
    are dropped, so a record reads back as its JSONL line was normalised."""
    if record.get("finished") == []:
        del record["finished"]
    return record
