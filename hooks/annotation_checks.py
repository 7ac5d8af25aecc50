"""Input checks of the annotation store: every value from a caller is checked here, and a
refusal names the fix. Also the store's errors, its clock and Cohen's kappa."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from hooks.annotation_schema import LABELS

#: Upper bound of one crop PNG.
MAX_CROP_BYTES = 1 << 20
MAX_ZOOM = 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_KIND = re.compile(r"[a-z0-9_]{1,32}")
_CANDIDATE_KEYS = {"nucleus_id", "x", "y", "area", "roi", "score", "stats"}


class AnnotationStoreError(Exception):
    """The annotation store cannot be used as configured; the message names the fix."""


class StoreNotMigrated(AnnotationStoreError):
    """The database is not at the newest schema revision."""


class AnnotationInputError(ValueError):
    """A value given to the store is not acceptable; the message names the fix."""


class NotFound(LookupError):
    """No candidate set, candidate or crop with that id."""


def utcnow() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes (stored as UTC): make them aware."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def check_label(value: Any) -> str:
    """``value`` if it is one of :data:`LABELS`."""
    if value not in LABELS:
        raise AnnotationInputError(
            f"label {value!r} is not allowed; use one of {', '.join(LABELS)}"
        )
    return str(value)


def check_annotator(value: Any) -> str:
    """``value`` if it is a usable annotator name."""
    if not isinstance(value, str) or not value.strip() or len(value) > 250:
        raise AnnotationInputError(
            f"annotator {value!r}: give the user name (a non-empty string of at most 250 "
            "characters)"
        )
    return value


def check_int(name: str, value: Any) -> int:
    """``value`` as an int if it is integral (``3.0`` passes, ``3.5``, ``"a"`` and bools do
    not)."""
    if isinstance(value, bool):
        raise AnnotationInputError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            as_int = None
        if as_int is None or as_int != value:
            raise AnnotationInputError(f"{name} must be an integer, got {value!r}")
        value = as_int
    return int(value)


def check_number(name: str, value: Any) -> float:
    """``value`` as a finite float."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise AnnotationInputError(f"{name} must be a finite number, got {value!r}")
    return number


def json_clean(value: Any, where: str) -> Any:
    """JSON-storable copy of ``value``: numpy scalars to Python, non-finite floats to None."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        with contextlib.suppress(TypeError, ValueError):
            value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_clean(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v, where) for v in value]
    raise AnnotationInputError(
        f"{where}: {type(value).__name__} is not JSON (use numbers, strings, lists, dicts)"
    )


def params_hash(rule: str, params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of (rule, params): a candidate set's rule identity."""
    canonical = json.dumps([rule, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def candidate_row(set_id: int, image_id: int, item: Mapping[str, Any], rng: random.Random
                  ) -> dict[str, Any]:
    """The ``candidates`` row of one input mapping (unknown keys go into ``stats``)."""
    if not isinstance(item, Mapping):
        raise AnnotationInputError(f"a candidate must be a mapping, got {type(item).__name__}")
    missing = [k for k in ("nucleus_id", "x", "y", "area") if k not in item]
    if missing:
        raise AnnotationInputError(f"candidate {dict(item)!r} lacks {', '.join(missing)}")
    nid = check_int("nucleus_id", item["nucleus_id"])
    stats = dict(item.get("stats") or {})
    stats.update({k: v for k, v in item.items() if k not in _CANDIDATE_KEYS})
    roi = item.get("roi")
    if roi is not None and (not isinstance(roi, str) or len(roi) > 250):
        raise AnnotationInputError(f"candidate {nid}: roi must be a name (str), got {roi!r}")
    score = item.get("score")
    return {
        "set_id": set_id,
        "image_id": image_id,
        "nucleus_id": nid,
        "x": check_number(f"candidate {nid}: x", item["x"]),
        "y": check_number(f"candidate {nid}: y", item["y"]),
        "area": check_number(f"candidate {nid}: area", item["area"]),
        "roi": roi,
        "stats": json_clean(stats, f"candidate {nid}: stats"),
        "score": None if score is None else check_number(f"candidate {nid}: score", score),
        "rand_key": rng.random(),
    }


def check_crop(item: Any) -> tuple[int, str, int, bytes]:
    """``(nucleus_id, kind, zoom, png)`` checked: kind pattern, zoom range, PNG, size."""
    try:
        nucleus_id, kind, zoom, png = item
    except (TypeError, ValueError):
        raise AnnotationInputError(
            "a crop is a tuple (nucleus_id, kind, zoom, png_bytes)"
        ) from None
    nid = check_int("nucleus_id", nucleus_id)
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise AnnotationInputError(
            f"crop kind {kind!r}: use 1-32 characters a-z, 0-9, _ (e.g. 'dapi', 'composite')"
        )
    zoom = check_int("zoom", zoom)
    if not 1 <= zoom <= MAX_ZOOM:
        raise AnnotationInputError(f"crop zoom {zoom} is out of range 1..{MAX_ZOOM}")
    if not isinstance(png, (bytes, bytearray, memoryview)):
        raise AnnotationInputError(f"crop of nucleus {nid}: PNG bytes expected")
    png = bytes(png)
    if not png.startswith(PNG_SIGNATURE):
        raise AnnotationInputError(f"crop {kind}/{zoom} of nucleus {nid} is not a PNG")
    if len(png) > MAX_CROP_BYTES:
        raise AnnotationInputError(
            f"crop {kind}/{zoom} of nucleus {nid} has {len(png)} bytes; at most "
            f"{MAX_CROP_BYTES} (render a smaller crop)"
        )
    return nid, kind, zoom, png


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of paired labels; None when undefined (expected agreement is 1)."""
    n = len(pairs)
    if not n:
        return None
    observed = sum(a == b for a, b in pairs) / n
    count_a: dict[str, int] = defaultdict(int)
    count_b: dict[str, int] = defaultdict(int)
    for a, b in pairs:
        count_a[a] += 1
        count_b[b] += 1
    expected = sum(count_a[k] * count_b[k] for k in count_a) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)
