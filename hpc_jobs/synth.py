"""Synthetic whole-slide images with ground truth, and the ``omeflow synth`` subcommand.

What an image holds (uint16, one z-plane):

- channel 0 ``DAPI``: nuclei, slightly elliptical blobs (mean radius 7-11 px, so Cellpose's
  diameter 20 fits) with a smooth profile and varied brightness, never overlapping;
- the last channel (the marker, default name ``CD8``): a known subset of the nuclei
  (``positive_fraction``, default 30 %) carries a bright cell-body signal around the nucleus;
  negatives get none. In a 21x21 window the positives' marker mean is far above 200, the
  negatives' below it;
- channels in between (if ``channels > 2``): a weak nuclear signal;
- everywhere: a background gradient, a slightly brighter tissue background, and shot + read
  noise (Gaussian approximation of Poisson).

Tissue: 1-3 irregular star-shaped polygons (ROI text ``tissue_1``...) side by side, and at
least one hole (``hole_1``) inside ``tissue_1``. Nuclei lie wholly inside tissue, never in a
hole.

Streaming: nothing is ever held for the whole image. Nuclei come from a jittered grid of
cells (``cell`` px, at most one nucleus per cell, so they cannot overlap); cells are grouped
in fixed blocks and each block draws its random numbers from its own RNG seeded with
``(seed, block)``, so any region is rendered from just the blocks around it, and a nucleus
crossing a tile edge is rendered identically on both sides. Noise comes from fixed 256x256
blocks seeded the same way. :func:`render_region` is the pure function behind it (the
segmentation tests may reuse it).

Decoys (``decoy_fraction`` > 0, ``--decoys FRACTION``): that fraction of the *negative*
nuclei gets marker signal that is not a marker-positive cell, bright enough that the
nucleus' marker mean in a small window lands in the positives' range (so it passes a
marker-mean preselection): ``diffuse`` (a broad Gaussian patch, no cell body), ``offcentre``
(a cell-body-like blob beside the nucleus, like spill-over from a neighbour) or ``speck`` (a
tiny, very bright spot). Decoys draw from their own RNG stream, so the nuclei and every pixel
of a slide without decoys stay exactly as they were; the truth table gains ``decoy`` (kind,
"" for none), ``decoy_dx``, ``decoy_dy``, ``decoy_peak``, and ``positive`` stays the true class.

Ground truth (``--out-truth``): ``nuclei.parquet`` (id, x, y, radius_x, radius_y, angle,
radius, positive, tissue, peaks), ``labels.zarr`` (zarr v3 uint32 label image, chunked like
the tiles, written tile by tile; label = nucleus id, ids are the global cell index + 1 so
they are unique but not contiguous), ``regions.json`` (tissue and hole polygons).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hpc_jobs.stores.local import LocalStore

#: Nucleus semi-axes: mean radius r in [R_MIN, R_MAX], elongation e in [1, E_MAX];
#: a = r*sqrt(e), b = r/sqrt(e).
R_MIN, R_MAX, E_MAX = 7.0, 11.0, 1.3
A_MAX = R_MAX * math.sqrt(E_MAX)
#: How far (in units of the normalised elliptical distance) signals reach.
DAPI_REACH, MARKER_REACH = 1.6, 2.3
MARKER_SCALE = 1.4  # marker profile: exp(-(d / MARKER_SCALE)^4)
NOISE_BLOCK = 256
CELLS_PER_BLOCK = 32
SCHEMA_VERSION = 1
#: Decoy kinds (index = the code in a block's ``decoy`` column; 0 = none).
DECOY_KINDS = ("", "diffuse", "offcentre", "speck")
DIFFUSE_SIGMA = 14.0  # px, isotropic Gaussian
OFFCENTRE_RADIUS = 8.0  # px, profile exp(-(r / R)^4) like a cell body
SPECK_RADIUS = 2.5  # px, profile exp(-(r / R)^2)
#: How far decoy signal reaches from its own centre, and its centre from the nucleus (px).
DECOY_REACH = {1: 3 * DIFFUSE_SIGMA, 2: 1.7 * OFFCENTRE_RADIUS, 3: 4 * SPECK_RADIUS}
DECOY_MARGIN = 15.0 + 3 * DIFFUSE_SIGMA


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines a synthetic image (same spec -> same pixels)."""

    width: int
    height: int
    seed: int = 0
    channels: int = 2
    #: grid cell size in px: at most one nucleus per cell (sets the minimum spacing).
    cell: int = 36
    #: fraction of cells (inside tissue) that hold a nucleus.
    occupancy: float = 0.8
    positive_fraction: float = 0.3
    pixel_size_um: float = 0.5
    marker_name: str = "CD8"
    #: Fraction of negative nuclei with decoy marker signal (0: none, the classic slide).
    decoy_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decoy_fraction <= 1.0:
            raise ValueError(f"decoy_fraction={self.decoy_fraction} must be in [0, 1] (e.g. 0.3)")
        if self.width < 64 or self.height < 64:
            raise ValueError(f"image must be at least 64x64; got {self.width}x{self.height}")
        if self.channels < 2:
            raise ValueError(f"channels={self.channels}: need DAPI + a marker (>= 2)")
        if self.cell < 2 * A_MAX + 2:
            raise ValueError(
                f"cell={self.cell} px is too small: nuclei need >= {2 * A_MAX + 2:.0f}"
            )

    def as_dict(self) -> dict[str, Any]:
        """The spec as written to the truth (``decoy_fraction`` only when used, so slides
        without decoys keep their exact truth files)."""
        out = asdict(self)
        if not self.decoy_fraction:
            del out["decoy_fraction"]
        return out

    @property
    def channel_names(self) -> list[str]:
        middle = [f"C{i}" for i in range(1, self.channels - 1)]
        return ["DAPI", *middle, self.marker_name]


@dataclass(frozen=True)
class Region:
    """A tissue or hole polygon, ``points`` as [(x, y), ...] in level-0 px."""

    name: str
    points: tuple[tuple[float, float], ...]
    inside: str | None = None  # for holes: the tissue that contains it


def _star(
    rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, n: int, wobble: float
) -> tuple[tuple[float, float], ...]:
    """An irregular star-shaped polygon: radius(t) = (rx, ry) (1 + sum of low harmonics)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    ks = np.arange(2, 6)
    amps = rng.uniform(0.3, 1.0, ks.size)
    amps *= wobble / amps.sum()
    phases = rng.uniform(0, 2 * np.pi, ks.size)
    for k, a, p in zip(ks, amps, phases, strict=True):
        r += a * np.cos(k * t + p)
    xs, ys = cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)
    return tuple((round(float(x), 2), round(float(y), 2)) for x, y in zip(xs, ys, strict=True))


class Synth:
    """The deterministic layout of one :class:`SynthSpec` plus region rendering."""

    def __init__(self, spec: SynthSpec, cache_blocks: int = 64) -> None:
        self.spec = spec
        self._blocks: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self._cache_blocks = cache_blocks
        self.ncx = math.ceil(spec.width / spec.cell)
        self.ncy = math.ceil(spec.height / spec.cell)
        self.block_px = CELLS_PER_BLOCK * spec.cell

    # regions ---------------------------------------------------------------
    @cached_property
    def regions(self) -> tuple[list[Region], list[Region]]:
        """``(tissues, holes)``: 1-3 tissues side by side along the long axis, >= 1 hole."""
        s = self.spec
        rng = np.random.default_rng([s.seed, 0])
        n = int(rng.integers(1, 4))
        horizontal = s.width >= s.height
        slab = (s.width if horizontal else s.height) / n
        other = s.height if horizontal else s.width
        tissues, holes = [], []
        for i in range(n):
            c_along, c_across = slab * (i + 0.5), other / 2
            cx, cy = (c_along, c_across) if horizontal else (c_across, c_along)
            # wobble 0.3 keeps each tissue within 0.47 of its slab: no overlaps, no clipping
            r_along, r_across = 0.36 * slab, 0.36 * other
            rx, ry = (r_along, r_across) if horizontal else (r_across, r_along)
            tissues.append(Region(f"tissue_{i + 1}", _star(rng, cx, cy, rx, ry, 64, 0.3)))
            if i == 0 or rng.random() < 0.5:  # holes around the centre (star-shaped: inside)
                hr = 0.2 * min(rx, ry)
                hole = _star(rng, cx, cy, hr, hr, 24, 0.2)
                holes.append(Region(f"hole_{len(holes) + 1}", hole, inside=f"tissue_{i + 1}"))
        return tissues, holes

    @cached_property
    def _shapely(self) -> dict[str, Any]:
        import shapely

        tissues, holes = self.regions
        t_polys = [shapely.Polygon(t.points) for t in tissues]
        h_polys = [shapely.Polygon(h.points) for h in holes]
        margin = A_MAX + 2
        allowed = shapely.union_all([p.buffer(-margin) for p in t_polys])
        if h_polys:
            allowed = allowed.difference(shapely.union_all([p.buffer(margin) for p in h_polys]))
        shapely.prepare(allowed)
        for p in t_polys:
            shapely.prepare(p)
        return {"allowed": allowed, "tissues": t_polys}

    # nuclei ----------------------------------------------------------------
    def _block(self, bi: int, bj: int) -> dict[str, np.ndarray]:
        """Nuclei of block (row bi, column bj): fixed draws for every cell, then filtered."""
        key = (bi, bj)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        import shapely

        s = self.spec
        rng = np.random.default_rng([s.seed, 1, bi, bj])
        k = CELLS_PER_BLOCK
        n = k * k
        gy, gx = np.divmod(np.arange(n), k)
        gy, gx = gy + bi * k, gx + bj * k
        occupied = rng.random(n) < s.occupancy
        jitter = (s.cell - 2 * A_MAX - 1) / 2
        x = (gx + 0.5) * s.cell + rng.uniform(-jitter, jitter, n)
        y = (gy + 0.5) * s.cell + rng.uniform(-jitter, jitter, n)
        r = rng.uniform(R_MIN, R_MAX, n)
        e = rng.uniform(1.0, E_MAX, n)
        theta = rng.uniform(0, np.pi, n)
        positive = rng.random(n) < s.positive_fraction
        dapi_peak = rng.uniform(900, 3000, n)
        marker_peak = rng.uniform(1200, 2600, n)
        mid_peak = rng.uniform(0, 600, n)
        keep = occupied & (gx < self.ncx) & (gy < self.ncy)
        keep &= (x < s.width - A_MAX - 1) & (y < s.height - A_MAX - 1)
        if keep.any():
            keep[keep] = shapely.contains_xy(self._shapely["allowed"], x[keep], y[keep])
        tissue = np.zeros(n, np.int16)
        for t, poly in enumerate(self._shapely["tissues"], start=1):
            if keep.any():
                inside = np.zeros(n, bool)
                inside[keep] = shapely.contains_xy(poly, x[keep], y[keep])
                tissue[inside] = t
        block = {
            "id": (gy * self.ncx + gx + 1).astype(np.uint32),
            "x": x,
            "y": y,
            "radius_x": r * np.sqrt(e),
            "radius_y": r / np.sqrt(e),
            "angle": theta,
            "radius": r,
            "positive": positive,
            "tissue": tissue,
            "dapi_peak": dapi_peak,
            "marker_peak": marker_peak,
            "mid_peak": mid_peak,
        }
        if s.decoy_fraction > 0:
            block.update(self._decoys(bi, bj, positive))
        block = {name: v[keep] for name, v in block.items()}
        self._blocks[key] = block
        if len(self._blocks) > self._cache_blocks:
            self._blocks.popitem(last=False)
        return block

    def _decoys(self, bi: int, bj: int, positive: np.ndarray) -> dict[str, np.ndarray]:
        """Decoy draws of one block (own RNG stream ``(seed, 3, block)``)."""
        n = positive.size
        rng = np.random.default_rng([self.spec.seed, 3, bi, bj])
        is_decoy = ~positive & (rng.random(n) < self.spec.decoy_fraction)
        kind = rng.integers(1, len(DECOY_KINDS), n)
        angle = rng.uniform(0, 2 * np.pi, n)
        u = rng.random(n)
        # distance of the decoy centre from the nucleus centre, and peak, per kind; peaks are
        # set so a 21 px window mean lands in the positives' range (~1000-2200)
        dist = np.choose(kind - 1, [2 + 4 * u, 11 + 4 * u, 3 + 5 * u])
        peak = np.choose(kind - 1, [1100 + 1300 * u, 4500 + 4500 * u, 22000 + 22000 * u])
        peak = peak * rng.uniform(0.9, 1.1, n)
        return {
            "decoy": np.where(is_decoy, kind, 0).astype(np.int8),
            "decoy_dx": np.where(is_decoy, dist * np.cos(angle), 0.0),
            "decoy_dy": np.where(is_decoy, dist * np.sin(angle), 0.0),
            "decoy_peak": np.where(is_decoy, peak, 0.0),
        }

    def blocks(self) -> list[tuple[int, int]]:
        """Every block of the image, row-major."""
        nb_y = math.ceil(self.ncy / CELLS_PER_BLOCK)
        nb_x = math.ceil(self.ncx / CELLS_PER_BLOCK)
        return [(i, j) for i in range(nb_y) for j in range(nb_x)]

    def nuclei_near(self, y0: int, y1: int, x0: int, x1: int, margin: float) -> dict[str, Any]:
        """Nuclei whose centre lies within ``margin`` px of the region."""
        bp = self.block_px
        bi0, bi1 = int((y0 - margin) // bp), int((y1 + margin) // bp)
        bj0, bj1 = int((x0 - margin) // bp), int((x1 + margin) // bp)
        parts = [
            self._block(bi, bj)
            for bi in range(max(0, bi0), bi1 + 1)
            for bj in range(max(0, bj0), bj1 + 1)
        ]
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        sel = (cat["x"] >= x0 - margin) & (cat["x"] < x1 + margin)
        sel &= (cat["y"] >= y0 - margin) & (cat["y"] < y1 + margin)
        return {k: v[sel] for k, v in cat.items()}

    def nuclei_table(self) -> Any:
        """All nuclei as a pandas DataFrame (one block at a time; a few MB per 100k)."""
        import pandas as pd

        tissues, _ = self.regions
        frames = []
        for bi, bj in self.blocks():
            b = self._block(bi, bj)
            frames.append(pd.DataFrame({k: b[k] for k in b}))
        df = pd.concat(frames, ignore_index=True).sort_values("id", ignore_index=True)
        names = np.array(["", *[t.name for t in tissues]], dtype=object)
        df["tissue"] = names[df["tissue"].to_numpy()]
        if "decoy" in df:
            df["decoy"] = np.array(DECOY_KINDS, dtype=object)[df["decoy"].to_numpy()]
        return df

    # rendering ---------------------------------------------------------------
    @cached_property
    def _edges(self) -> np.ndarray:
        """All tissue and hole polygon edges as rows (x1, y1, x2, y2), float64."""
        tissues, holes = self.regions
        rows = []
        for reg in [*tissues, *holes]:
            p = np.asarray(reg.points, dtype=np.float64)
            q = np.roll(p, -1, axis=0)
            rows.append(np.hstack([p, q]))
        return np.vstack(rows)

    def tissue_mask(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels (centres at integer x, y) in tissue and not in a hole: even-odd scanlines.

        Computed in global coordinates, so a pixel gets the same answer in any region.
        """
        e = self._edges
        ys = np.arange(y0, y1, dtype=np.float64)[:, None]
        ey1, ey2 = e[:, 1][None, :], e[:, 3][None, :]
        crosses = (ey1 <= ys) != (ey2 <= ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = e[:, 0] + (ys - ey1) * (e[:, 2] - e[:, 0]) / (ey2 - ey1)
        rr, kk = np.nonzero(crosses)
        col = np.ceil(xc[rr, kk]).astype(np.int64) - x0  # crossing at xc <= pixel x counts
        w = x1 - x0
        left = col <= 0
        start = np.bincount(rr[left], minlength=y1 - y0) & 1  # parity at the first column
        mask = np.zeros((y1 - y0, w), bool)
        mask[start.astype(bool)] = True
        inner = ~left & (col < w)
        for r, c in zip(rr[inner].tolist(), col[inner].tolist(), strict=True):
            row = mask[r, c:]
            np.logical_not(row, out=row)
        return mask

    def _background(
        self, c: int, y0: int, y1: int, x0: int, x1: int, mask: np.ndarray
    ) -> np.ndarray:
        s = self.spec
        last = s.channels - 1
        base, gx, gy, tissue_add = (120.0, 60.0, 40.0, 60.0) if c == 0 else (70.0, 30.0, 20.0, 25.0)
        if c == last:
            base, gx, gy, tissue_add = 60.0, 25.0, 15.0, 20.0
        ys = (np.arange(y0, y1, dtype=np.float32) / s.height)[:, None]
        xs = (np.arange(x0, x1, dtype=np.float32) / s.width)[None, :]
        bg = np.float32(base) + np.float32(gx) * xs + np.float32(gy) * ys
        bg = bg + np.float32(tissue_add) * mask
        return bg.astype(np.float32, copy=False)

    def _noise(self, c: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Standard normals, the same for a pixel whatever region asks (fixed blocks)."""
        nb = NOISE_BLOCK
        out = np.empty((y1 - y0, x1 - x0), np.float32)
        for by in range(y0 // nb, (y1 - 1) // nb + 1):
            for bx in range(x0 // nb, (x1 - 1) // nb + 1):
                z = np.random.default_rng([self.spec.seed, 2, c, by, bx]).standard_normal(
                    (nb, nb), dtype=np.float32
                )
                ya, yb = max(y0, by * nb), min(y1, (by + 1) * nb)
                xa, xb = max(x0, bx * nb), min(x1, (bx + 1) * nb)
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = z[
                    ya - by * nb : yb - by * nb, xa - bx * nb : xb - bx * nb
                ]
        return out

    def render(
        self,
        y0: int,
        y1: int,
        x0: int,
        x1: int,
        channels: list[int] | None = None,
        labels: bool = True,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels ``[y0:y1, x0:x1]``: ``(uint16 (len(channels), h, w), uint32 labels | None)``."""
        s = self.spec
        y0, y1 = max(0, y0), min(s.height, y1)
        x0, x1 = max(0, x0), min(s.width, x1)
        chans = list(range(s.channels)) if channels is None else list(channels)
        for c in chans:
            if not 0 <= c < s.channels:
                raise ValueError(f"channel {c} out of range 0..{s.channels - 1}")
        h, w = y1 - y0, x1 - x0
        signal = {c: np.zeros((h, w), np.float32) for c in chans}
        lab = np.zeros((h, w), np.uint32) if labels else None
        last = s.channels - 1
        need_marker = last in chans
        reach = MARKER_REACH if need_marker else DAPI_REACH
        margin = reach * A_MAX + 1
        decoys = need_marker and s.decoy_fraction > 0
        if decoys:
            margin = max(margin, DECOY_MARGIN + 1)
        nuc = self.nuclei_near(y0, y1, x0, x1, margin=margin)
        for i in range(nuc["id"].size):
            if decoys and nuc["decoy"][i]:
                self._add_decoy(signal[last], nuc, i, y0, y1, x0, x1)
            cx, cy, a, b = nuc["x"][i], nuc["y"][i], nuc["radius_x"][i], nuc["radius_y"][i]
            pos = bool(nuc["positive"][i])
            ext = (MARKER_REACH if (need_marker and pos) else DAPI_REACH) * a
            ya, yb = max(y0, int(cy - ext)), min(y1, int(cy + ext) + 2)
            xa, xb = max(x0, int(cx - ext)), min(x1, int(cx + ext) + 2)
            if ya >= yb or xa >= xb:
                continue
            dy = (np.arange(ya, yb, dtype=np.float32) - np.float32(cy))[:, None]
            dx = (np.arange(xa, xb, dtype=np.float32) - np.float32(cx))[None, :]
            ct, st = np.float32(math.cos(nuc["angle"][i])), np.float32(math.sin(nuc["angle"][i]))
            u = (dx * ct + dy * st) / np.float32(a)
            v = (dy * ct - dx * st) / np.float32(b)
            d2 = u * u + v * v
            win = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            if lab is not None:
                lab[win][d2 <= 1.0] = nuc["id"][i]
            prof = None
            for c in chans:
                if c == last:
                    if pos:  # zero beyond the reach, so the bounding box never matters
                        m = d2 / np.float32(MARKER_SCALE**2)
                        mprof = np.where(d2 <= MARKER_REACH**2, np.exp(-(m * m)), 0)
                        signal[c][win] += np.float32(nuc["marker_peak"][i]) * mprof
                    continue
                if prof is None:
                    prof = np.where(d2 <= DAPI_REACH**2, np.exp(-(d2 * d2)), 0)
                peak = nuc["dapi_peak"][i] if c == 0 else nuc["mid_peak"][i]
                signal[c][win] += np.float32(peak) * prof
        out = np.empty((len(chans), h, w), np.uint16)
        mask = self.tissue_mask(y0, y1, x0, x1)
        for k, c in enumerate(chans):
            sig = signal[c] + self._background(c, y0, y1, x0, x1, mask)
            sig += np.sqrt(sig + np.float32(25.0)) * self._noise(c, y0, y1, x0, x1)
            np.clip(np.rint(sig), 0, 65535, out=sig)
            out[k] = sig
        return out, lab


    @staticmethod
    def _add_decoy(marker: np.ndarray, nuc: dict[str, Any], i: int, y0: int, y1: int, x0: int,
                   x1: int) -> None:
        """Add nucleus ``i``'s decoy signal to the marker plane of region ``[y0:y1, x0:x1]``."""
        kind = int(nuc["decoy"][i])
        cx, cy = nuc["x"][i] + nuc["decoy_dx"][i], nuc["y"][i] + nuc["decoy_dy"][i]
        ext = DECOY_REACH[kind]
        ya, yb = max(y0, int(cy - ext)), min(y1, int(cy + ext) + 2)
        xa, xb = max(x0, int(cx - ext)), min(x1, int(cx + ext) + 2)
        if ya >= yb or xa >= xb:
            return
        dy = (np.arange(ya, yb, dtype=np.float32) - np.float32(cy))[:, None]
        dx = (np.arange(xa, xb, dtype=np.float32) - np.float32(cx))[None, :]
        r2 = dx * dx + dy * dy
        if kind == 1:
            prof = np.exp(-r2 / np.float32(2 * DIFFUSE_SIGMA**2))
        elif kind == 2:
            m = r2 / np.float32(OFFCENTRE_RADIUS**2)
            prof = np.exp(-(m * m))
        else:
            prof = np.exp(-r2 / np.float32(SPECK_RADIUS**2))
        prof = np.where(r2 <= np.float32(ext * ext), prof, 0)
        marker[ya - y0 : yb - y0, xa - x0 : xb - x0] += np.float32(nuc["decoy_peak"][i]) * prof


_SYNTHS: OrderedDict[SynthSpec, Synth] = OrderedDict()


def synth_for(spec: SynthSpec) -> Synth:
    """A cached :class:`Synth` per spec (layout and nucleus blocks are reused)."""
    if spec not in _SYNTHS:
        _SYNTHS[spec] = Synth(spec)
        if len(_SYNTHS) > 4:
            _SYNTHS.popitem(last=False)
    return _SYNTHS[spec]


def render_region(
    spec: SynthSpec, y0: int, y1: int, x0: int, x1: int, channels: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pure rendering: ``(uint16 (c, h, w), uint32 labels (h, w))`` of ``[y0:y1, x0:x1]``.

    The same spec and pixel always give the same value, whatever region is asked for.
    """
    pixels, labels = synth_for(spec).render(y0, y1, x0, x1, channels=channels)
    assert labels is not None
    return pixels, labels


# ----------------------------------------------------------------------------- generation
def generate(
    spec: SynthSpec,
    store: LocalStore,
    out_truth: Path,
    tile: int = 1024,
    levels: int = 1,
    name: str | None = None,
) -> dict[str, Any]:
    """Write the image into ``store`` (with tissue/hole ROIs) and the truth into ``out_truth``.

    Streams tile by tile: memory is bounded by a few tiles plus the nucleus table.
    """
    import zarr

    t0 = time.perf_counter()
    synth = Synth(spec)
    out_truth = Path(out_truth)
    out_truth.mkdir(parents=True, exist_ok=True)
    labels_path = out_truth / "labels.zarr"
    labels = zarr.create_array(
        store=str(labels_path),
        shape=(spec.height, spec.width),
        chunks=(tile, tile),
        dtype="uint32",
        fill_value=0,
        zarr_format=3,
        overwrite=True,
        dimension_names=("y", "x"),
    )

    def source(c: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        px, lab = synth.render(y0, y1, x0, x1, channels=[c], labels=c == 0)
        if lab is not None:
            labels[y0:y1, x0:x1] = lab
        return px[0]

    image_id = store.create_image(
        name or f"synth-{spec.width}x{spec.height}-seed{spec.seed}",
        size_x=spec.width,
        size_y=spec.height,
        channel_names=spec.channel_names,
        source=source,
        dtype="uint16",
        pixel_size_um=(spec.pixel_size_um, spec.pixel_size_um),
        tile=tile,
        levels=levels,
    )
    render_s = time.perf_counter() - t0

    from hpc_jobs.stores.base import PolygonShape

    tissues, holes = synth.regions
    for reg in [*tissues, *holes]:
        store.add_roi(image_id, PolygonShape(reg.points, reg.name), name=reg.name)
    regions_path = out_truth / "regions.json"
    regions_path.write_text(
        json.dumps(
            {
                "width": spec.width,
                "height": spec.height,
                "tissues": [{"name": t.name, "points": t.points} for t in tissues],
                "holes": [{"name": h.name, "points": h.points, "inside": h.inside} for h in holes],
            },
            indent=1,
        )
    )

    import pyarrow as pa
    import pyarrow.parquet as pq

    df = synth.nuclei_table()
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {
        b"omeflow.schema_version": str(SCHEMA_VERSION).encode(),
        b"omeflow.synth_spec": json.dumps(spec.as_dict()).encode(),
        b"omeflow.image_id": str(image_id).encode(),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    nuclei_path = out_truth / "nuclei.parquet"
    pq.write_table(table, nuclei_path)
    (out_truth / "spec.json").write_text(json.dumps(spec.as_dict(), indent=1))
    total_s = time.perf_counter() - t0
    mpx = spec.width * spec.height / 1e6
    return {
        "image_id": image_id,
        "store": str(store.root),
        "width": spec.width,
        "height": spec.height,
        "channels": spec.channel_names,
        "nuclei": len(df),
        "positives": int(df["positive"].sum()),
        **({"decoys": int((df["decoy"] != "").sum())} if "decoy" in df else {}),
        "tissues": [t.name for t in tissues],
        "holes": [h.name for h in holes],
        "truth": {
            "nuclei": str(nuclei_path),
            "labels": str(labels_path),
            "regions": str(regions_path),
        },
        "seconds": round(total_s, 2),
        "mpx_per_s": round(mpx / render_s, 3) if render_s > 0 else None,
    }


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``omeflow synth``."""
    parser.add_argument("--store", type=Path, required=True, help="LocalStore folder")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=int, default=2, help="DAPI + ... + marker (>= 2)")
    parser.add_argument("--marker-name", default="CD8")
    parser.add_argument("--tile", type=int, default=1024, help="TIFF tile size (multiple of 16)")
    parser.add_argument("--levels", type=int, default=1, help="resolution levels (pyramid)")
    parser.add_argument("--positive-fraction", type=float, default=0.3)
    parser.add_argument("--pixel-size-um", type=float, default=0.5)
    parser.add_argument(
        "--decoys", type=float, default=0.0, metavar="FRACTION",
        help="fraction of negative nuclei with decoy marker signal (diffuse / off-centre / "
        "speck) that passes a marker-mean threshold (default 0: none)",
    )
    parser.add_argument("--name", default=None, help="image name (default: synth-WxH-seedS)")
    parser.add_argument(
        "--out-truth", type=Path, default=None, help="truth folder (default: STORE/truth/<id>)"
    )


def main(args: argparse.Namespace) -> int:
    """Generate one image and print a JSON summary (image id, truth paths, throughput)."""
    import tempfile

    from hpc_jobs.stores.local import LocalStore

    try:
        spec = SynthSpec(
            width=args.width,
            height=args.height,
            seed=args.seed,
            channels=args.channels,
            positive_fraction=args.positive_fraction,
            pixel_size_um=args.pixel_size_um,
            marker_name=args.marker_name,
            decoy_fraction=args.decoys,
        )
    except ValueError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    store = LocalStore(args.store)
    out = args.out_truth
    staging = None
    if out is None:  # the id is known only after the image is written
        staging = Path(tempfile.mkdtemp(prefix=".truth-", dir=store.root))
        out = staging
    summary = generate(spec, store, out, tile=args.tile, levels=args.levels, name=args.name)
    if staging is not None:
        final = store.root / "truth" / str(summary["image_id"])
        final.parent.mkdir(exist_ok=True)
        staging.rename(final)
        summary["truth"] = {k: str(final / Path(v).name) for k, v in summary["truth"].items()}
    print(json.dumps(summary, indent=1))
    return 0
