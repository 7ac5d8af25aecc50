"""Candidate crops for people to look at: small 8-bit PNGs rendered on the cluster.

Per candidate and zoom, one grey PNG per channel (named ``marker``, ``dapi``, ``c<index>``
for the others) and an RGB composite with the nucleus
outline. Every PNG is ``size`` x ``size`` pixels; zoom ``k`` (1, 2, ...) covers a window of
``k * size`` level-0 pixels centred on the nucleus, downsampled by ``k`` (block mean; the
labels by nearest neighbour). Pixels outside the image are black.

Display range. Channel ``c`` of a candidate in tissue ROI ``r`` maps ``[lo, hi]`` (quantiles
of that ROI's eCDF of channel ``c``, e.g. the 1st and 99.5th percentile) linearly to
``[0, 255]`` and clips: the same tissue brightness looks the same on every slide.

Composite: the marker in green, the nuclear stain (DAPI) in blue, the maximum of the other
channels in red; the outline of the candidate's own nucleus (its label's boundary pixels)
in yellow.

Chunks. Rendered candidates are written as JSON files ``crops.<nnnn>.json`` in the job's
``outputs/``, each below :data:`CHUNK_LIMIT` bytes, so the gateway's ``result`` verb (which
returns files up to ``protocol.MAX_CHUNK_BYTES``) fetches them one at a time::

    {"schema": CHUNK_SCHEMA, "chunk": 0, "candidates": [
        {...candidate row..., "crops": {"1": {"composite": "<b64 png>", "dapi": ..., "marker": ...},
                                        "2": {...}}}]}
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_jobs.protocol import MAX_CHUNK_BYTES

if TYPE_CHECKING:
    import numpy as np

CHUNK_SCHEMA = "omeflow-crops v1"
#: Largest chunk file written: below the gateway's limit, with room for its reply envelope.
CHUNK_LIMIT = MAX_CHUNK_BYTES - 64 * 1024
#: Composite colours (R, G, B) of the outline.
OUTLINE_RGB = (255, 255, 0)


def chunk_name(index: int) -> str:
    """The output file name of chunk ``index`` (``crops.0000.json``, ...)."""
    return f"crops.{index:04d}.json"


@dataclass(frozen=True)
class Display:
    """Display range of every channel (``lo[c]``, ``hi[c]``) for the candidates of one ROI."""

    lo: Sequence[float]
    hi: Sequence[float]


def to_uint8(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``[0, 255]``, clipped (``hi <= lo``: a step at ``lo``)."""
    import numpy as np

    span = float(hi) - float(lo)
    if span <= 0:
        return np.where(plane > lo, 255, 0).astype(np.uint8)
    scaled = (plane.astype(np.float64) - float(lo)) * (255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (in it, with a 4-neighbour outside it)."""
    import numpy as np

    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def downsample(data: np.ndarray, k: int) -> np.ndarray:
    """Block mean over ``k`` x ``k`` pixels of the last two axes (sizes divisible by ``k``)."""
    if k == 1:
        return data
    *lead, h, w = data.shape
    return data.reshape(*lead, h // k, k, w // k, k).mean(axis=(-3, -1))


def png(array: np.ndarray) -> str:
    """Base64 of a PNG of an 8-bit grey (h, w) or RGB (h, w, 3) array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def crop_kind(channel: int, dapi_channel: int, marker_channel: int) -> str:
    """The crop name of a channel: ``marker``, ``dapi``, else ``c<channel>``."""
    if channel == marker_channel:
        return "marker"
    return "dapi" if channel == dapi_channel else f"c{channel}"


def render(
    pixels: np.ndarray,
    labels: np.ndarray,
    label_id: int,
    display: Display,
    size: int,
    zooms: Sequence[int],
    dapi_channel: int,
    marker_channel: int,
) -> dict[str, dict[str, str]]:
    """PNGs of one candidate: ``{zoom: {"composite": b64, "dapi": b64, "marker": b64,
    "c<i>": b64 (other channels)}}``.

    ``pixels`` (c, W, W) and ``labels`` (W, W) are the widest window, ``W = max(zooms) *
    size``, centred on the nucleus.
    """
    import numpy as np

    wide = max(zooms) * size
    out: dict[str, dict[str, str]] = {}
    for k in zooms:
        m = (wide - k * size) // 2
        win = pixels[:, m : m + k * size, m : m + k * size]
        lab = labels[m : m + k * size, m : m + k * size][::k, ::k]
        small = downsample(win, k)
        grey = [to_uint8(small[c], display.lo[c], display.hi[c]) for c in range(len(small))]
        others = [g for c, g in enumerate(grey) if c not in (dapi_channel, marker_channel)]
        red = np.maximum.reduce(others) if others else np.zeros_like(grey[0])
        rgb = np.stack([red, grey[marker_channel], grey[dapi_channel]], axis=-1)
        rgb[outline(lab == label_id)] = OUTLINE_RGB
        crops = {"composite": png(rgb)}
        crops.update({
            crop_kind(c, dapi_channel, marker_channel): png(g) for c, g in enumerate(grey)
        })
        out[str(k)] = crops
    return out


def windows(
    read: Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]],
    shape_yx: tuple[int, int],
    centres: np.ndarray,
    half: int,
    block: int,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(row index, pixels (c, 2h, 2h), labels (2h, 2h))`` for every centre (y, x).

    Candidates are grouped by the ``block`` x ``block`` tile their centre falls in, and each
    tile is read once with a ``half``-pixel margin (``read(y0, y1, x0, x1)`` returns pixels
    and labels of an in-image region); windows reaching outside the image are zero-padded.
    """
    import numpy as np

    h, w = shape_yx
    cy = np.clip(np.rint(centres[:, 0]).astype(np.int64), 0, h - 1)
    cx = np.clip(np.rint(centres[:, 1]).astype(np.int64), 0, w - 1)
    tiles: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip((cy // block).tolist(), (cx // block).tolist(), strict=True)):
        tiles.setdefault(key, []).append(i)
    for (ty, tx), rows in sorted(tiles.items()):
        y0, x0 = ty * block - half, tx * block - half
        y1, x1 = min((ty + 1) * block, h) + half, min((tx + 1) * block, w) + half
        ry0, rx0, ry1, rx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        px, lab = read(ry0, ry1, rx0, rx1)
        pad = ((ry0 - y0, y1 - ry1), (rx0 - x0, x1 - rx1))
        px = np.pad(px, ((0, 0), *pad))
        lab = np.pad(lab, pad)
        for i in rows:
            oy, ox = int(cy[i]) - half - y0, int(cx[i]) - half - x0
            yield i, px[:, oy : oy + 2 * half, ox : ox + 2 * half], lab[
                oy : oy + 2 * half, ox : ox + 2 * half
            ]


class ChunkWriter:
    """Collects rendered candidates into ``crops.<nnnn>.json`` files below ``limit`` bytes."""

    def __init__(self, out_dir: Path, limit: int = CHUNK_LIMIT) -> None:
        self.out_dir = out_dir
        self.limit = limit
        self.names: list[str] = []
        self.bytes_written = 0
        self._rows: list[str] = []
        self._size = 0

    def _envelope(self, body: str) -> str:
        return (f'{{"schema": {json.dumps(CHUNK_SCHEMA)}, "chunk": {len(self.names)}, '
                f'"candidates": [{body}]}}\n')

    def add(self, row: dict[str, Any]) -> None:
        """Add one candidate (its row with ``crops``); starts a new chunk when full."""
        text = json.dumps(row, separators=(",", ":"), allow_nan=False)
        if len(self._envelope(text)) > self.limit:
            raise ValueError(
                f"one candidate's crops take {len(text)} bytes, more than a chunk may hold "
                f"({self.limit}); use a smaller crop_size"
            )
        if self._rows and len(self._envelope("")) + self._size + 1 + len(text) > self.limit:
            self.flush()
        self._size += len(text) + (1 if self._rows else 0)
        self._rows.append(text)

    def flush(self) -> None:
        """Write the pending candidates as the next chunk file (nothing when none)."""
        from hpc_jobs.fsutil import atomic_write

        if not self._rows:
            return
        data = self._envelope(",".join(self._rows))
        name = chunk_name(len(self.names))
        atomic_write(self.out_dir / name, data, mode=0o644)
        self.names.append(name)
        self.bytes_written += len(data)
        self._rows = []
        self._size = 0
