"""The label snapshot a training job receives: compact, bounded, and hashed.

A snapshot is a list of ``[image_id, nucleus_id, label]`` (label 1 = marker-positive, 0 =
negative; "unsure" is never sent). It travels in the submit body, so it is capped at
:data:`MAX_LABELS` entries (worst case ~26 bytes each: the body stays below the gateway's
256 KiB). Its hash is the sha256 of the canonical form (entries sorted, compact JSON), computed
by the Airflow side when it builds the snapshot and checked again on the cluster; it is the
model's training-data provenance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

#: Most labels one training job takes in its submit body.
MAX_LABELS = 8000


def canonical(labels: Iterable[Sequence[int]]) -> list[list[int]]:
    """Entries as ``[int, int, int]`` lists, sorted (duplicates are an error)."""
    rows = sorted([int(i), int(n), int(v)] for i, n, v in labels)
    for a, b in zip(rows, rows[1:], strict=False):
        if a[:2] == b[:2]:
            raise ValueError(f"nucleus {a[1]} of image {a[0]} is labelled twice in the snapshot")
    return rows


def snapshot_hash(labels: Iterable[Sequence[int]]) -> str:
    """sha256 (hex) of the canonical snapshot."""
    text = json.dumps(canonical(labels), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
