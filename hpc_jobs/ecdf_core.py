"""Exact per-region intensity histograms, eCDFs and quantiles (pure functions, no store).

Regions. A *tissue region* is one ROI's shapes whose text starts with ``tissue_`` (several
shapes of one ROI form a MultiPolygon: their union). Every shape whose text starts with
``hole_`` (in any ROI) is subtracted from every tissue region it intersects. Coordinates are
OMERO's: ``x`` = column, ``y`` = row, level-0 pixels, origin top-left. Self-intersecting
outlines are repaired with ``shapely.make_valid``; ellipses become 256-gons.

Pixel convention. Pixel (row ``r``, column ``c``) with centre ``p = (c + 0.5, r + 0.5)`` belongs
to a region iff ``p`` is in the *interior* of the tissue union and *not in any hole* (not in its
interior nor on its boundary)::

    shapely.contains_xy(tissue, c + 0.5, r + 0.5) and not shapely.intersects_xy(holes, ...)

i.e. the interior of "tissue minus closed holes". Regions partly outside the image simply lose
the pixels that do not exist (no geometric clipping, so no rounded intersection vertices). At
pyramid level ``L`` the shapes are scaled by ``2**-L`` and the same rule applies to that
level's pixels.

Rasterisation is an even-odd scanline fill per block (:func:`rasterize`) in the image's own
(row, column) orientation for any block shape, edge blocks included; centres within rounding
reach of a boundary are decided by shapely's robust predicates, so masks equal the rule above
exactly. Histograms cover the whole dtype range (256 bins for 8-bit, 65536 for 16-bit images)
and are summed over the blocks meeting a region's bounding box: exact integers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from hpc_jobs.stores.base import (
    HOLE_PREFIX,
    TISSUE_PREFIX,
    EllipseShape,
    PolygonShape,
    Roi,
    Shape,
)

if TYPE_CHECKING:
    import numpy as np
    from shapely.geometry.base import BaseGeometry

QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
#: Vertices used to turn an (OMERO) ellipse into a polygon.
ELLIPSE_VERTICES = 256
#: dtypes whose full range is histogrammed (bins = every representable value).
HISTOGRAM_DTYPES = ("uint8", "uint16", "int8", "int16")


class RegionError(ValueError):
    """The image has no usable tissue region. The message names the fix."""


@dataclass
class Region:
    """One tissue ROI in level-0 pixels: the union of its tissue shapes and the holes in it."""

    roi_id: int
    name: str
    tissue: BaseGeometry
    holes: BaseGeometry | None
    n_shapes: int
    n_holes: int
    notes: list[str] = field(default_factory=list)

    @property
    def geometry(self) -> BaseGeometry:
        """Tissue minus holes (for areas and display; masks use :func:`region_mask`)."""
        return self.tissue if self.holes is None else self.tissue.difference(self.holes)


# --------------------------------------------------------------------------- geometry
def shape_geometry(shape: Shape) -> BaseGeometry | None:
    """A valid polygonal shapely geometry for a polygon or ellipse shape (None for others)."""
    import numpy as np
    import shapely
    from shapely.geometry import Polygon

    if isinstance(shape, PolygonShape):
        if len(shape.points) < 3:
            return None
        geom = Polygon(shape.points)
    elif isinstance(shape, EllipseShape):
        t = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
        geom = Polygon(
            np.column_stack(
                [shape.x + shape.radius_x * np.cos(t), shape.y + shape.radius_y * np.sin(t)]
            )
        )
    else:
        return None
    if not geom.is_valid:  # hand-drawn outlines may self-intersect
        geom = shapely.make_valid(geom)
    return _polygonal(geom)


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Keep only the polygonal parts of ``geom`` (make_valid may add lines/points)."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(geom, Polygon | MultiPolygon):
        return geom
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, Polygon | MultiPolygon)]
    return shapely.union_all(parts) if parts else Polygon()


def tissue_regions(rois: Sequence[Roi], size_x: int, size_y: int) -> list[Region]:
    """Tissue regions of an image: per ROI its ``tissue_`` shapes and the holes meeting them.

    Raises :class:`RegionError` (naming the fix) when no ROI has a tissue shape.
    """
    import shapely
    from shapely.geometry import Polygon, box

    holes = [
        g
        for roi in rois
        for s in roi.shapes
        if s.text.startswith(HOLE_PREFIX) and (g := shape_geometry(s)) is not None
    ]
    frame = box(0, 0, size_x, size_y)
    regions = []
    for roi in rois:
        tissue = [s for s in roi.shapes if s.text.startswith(TISSUE_PREFIX)]
        if not tissue:
            continue
        notes = list(roi.notes)  # shapes the store could not represent
        geoms = []
        for s in tissue:
            g = shape_geometry(s)
            if g is None or g.is_empty:
                notes.append(f"shape {s.text!r} ({type(s).__name__}) has no area; ignored")
            else:
                geoms.append(g)
        geom = _polygonal(shapely.union_all(geoms)) if geoms else Polygon()
        mine = [h for h in holes if geom.intersects(h)]
        hole_geom = _polygonal(shapely.union_all(mine)) if mine else None
        region = Region(roi.roi_id, "", geom, hole_geom, len(tissue), len(mine), notes)
        if not frame.contains(region.geometry):
            notes.append("partly outside the image; only pixels inside the image count")
        texts = sorted({s.text for s in tissue})
        region.name = roi.name if roi.name.startswith(TISSUE_PREFIX) else "+".join(texts)
        regions.append(region)
    if not regions:
        raise RegionError(
            "the image has no tissue region: draw a polygon whose text starts with "
            f"'{TISSUE_PREFIX}' in OMERO (holes: text starting with '{HOLE_PREFIX}')"
        )
    return regions


def scale_geometry(geom: BaseGeometry | None, factor: float) -> BaseGeometry | None:
    """``geom`` with coordinates multiplied by ``factor`` about the origin (level change)."""
    import shapely

    if geom is None or factor == 1:
        return geom
    return shapely.transform(geom, lambda xy: xy * factor)


def ring_edges(geom: BaseGeometry) -> np.ndarray:
    """All boundary edges of a polygonal geometry as an ``(n, 4)`` array ``xa, ya, xb, yb``."""
    import numpy as np
    import shapely

    rings = []
    for poly in shapely.get_parts(geom):
        if poly.is_empty:
            continue
        rings.append(np.asarray(poly.exterior.coords))
        rings.extend(np.asarray(r.coords) for r in poly.interiors)
    if not rings:
        return np.zeros((0, 4))
    return np.concatenate([np.hstack([r[:-1], r[1:]]) for r in rings if len(r) > 1])


# --------------------------------------------------------------------------- rasterisation
def rasterize(
    geometry: BaseGeometry,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    edges: np.ndarray | None = None,
    closed: bool = False,
) -> np.ndarray:
    """Boolean mask of rows ``y0:y1``, columns ``x0:x1``: pixels whose centre is in ``geometry``.

    Equal, pixel for pixel, to ``shapely.contains_xy(geometry, c + 0.5, r + 0.5)`` (interior),
    or with ``closed`` to ``shapely.intersects_xy`` (interior or boundary). Computed by an
    even-odd scanline fill of the rings (``edges`` from :func:`ring_edges`, computed if not
    given): for each centre row ``yc = r + 0.5`` an edge crosses it iff
    ``min(ya, yb) <= yc < max(ya, yb)`` (half-open: vertices count once, horizontal edges
    never). Sorted along the row, crossings alternate entering/leaving; a centre is inside iff
    it lies between an entering and the next leaving crossing (strictly, unless ``closed``).
    Centres within floating-point reach of a crossing, on a vertex or on a horizontal edge are
    decided by shapely's robust predicate. The result has shape ``(y1 - y0, x1 - x0)``, index
    ``[r - y0, c - x0]``.
    """
    import numpy as np
    import shapely

    h, w = y1 - y0, x1 - x0
    mask = np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    if edges is None:
        edges = ring_edges(geometry)
    if h <= 0 or w <= 0 or len(edges) == 0:
        return mask
    xa, ya, xb, yb = edges.T
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    # rows r with lo <= r + 0.5 < hi, clipped to the block
    r_start = np.maximum(np.ceil(lo - 0.5), y0).astype(np.int64)
    r_stop = np.minimum(np.ceil(hi - 0.5), y1).astype(np.int64)
    counts = np.maximum(r_stop - r_start, 0)
    doubt_r: list[np.ndarray] = []
    doubt_c: list[np.ndarray] = []
    # horizontal edges lying on a row of centres: their centres are boundary points
    flat = (ya == yb) & (np.floor(ya) + 0.5 == ya) & (ya > y0) & (ya < y1)
    flat_edges = zip(np.minimum(xa, xb)[flat], np.maximum(xa, xb)[flat], ya[flat], strict=True)
    for xs, xe, yy in flat_edges:
        cols = np.arange(max(x0, int(np.floor(xs - 0.5))), min(x1, int(np.ceil(xe - 0.5)) + 1))
        doubt_r.append(np.full(cols.size, int(yy - 0.5)))
        doubt_c.append(cols)
    # vertices on (or within rounding reach of) a pixel centre are boundary points too
    vx, vy = np.round(xa - 0.5), np.round(ya - 0.5)
    on_centre = (
        (np.abs(xa - 0.5 - vx) < 1e-9) & (np.abs(ya - 0.5 - vy) < 1e-9)
        & (vx >= x0) & (vx < x1) & (vy >= y0) & (vy < y1)
    )
    if on_centre.any():
        doubt_r.append(vy[on_centre].astype(np.int64))
        doubt_c.append(vx[on_centre].astype(np.int64))
    keep = counts > 0
    if keep.any():
        xa, ya, xb, yb = xa[keep], ya[keep], xb[keep], yb[keep]
        r_start, counts = r_start[keep], counts[keep]
        edge = np.repeat(np.arange(len(counts)), counts)
        first = np.cumsum(counts) - counts
        rows = r_start[edge] + (np.arange(edge.size) - first[edge])
        yc = rows + 0.5
        dx, dy = xb[edge] - xa[edge], yb[edge] - ya[edge]
        # exact numerator for integer / half-integer vertices; one correctly rounded division
        xc = xa[edge] + (yc - ya[edge]) * dx / dy
        order = np.lexsort((xc, rows))
        rows, xc = rows[order], xc[order]
        # rank of each crossing within its row: even = entering, odd = leaving
        row_first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
        row_len = np.diff(np.r_[row_first, rows.size])
        rank = np.arange(rows.size) - np.repeat(row_first, row_len)
        entering = (rank & 1) == 0
        # open: entering at x -> centres c + 0.5 > x inside: first column floor(x - 0.5) + 1;
        #       leaving at x -> centres c + 0.5 >= x outside: first column ceil(x - 0.5).
        # closed: entering -> c + 0.5 >= x inside: ceil(x - 0.5); leaving -> c + 0.5 > x out.
        after, at_or_after = np.floor(xc - 0.5) + 1, np.ceil(xc - 0.5)
        if closed:
            col = np.where(entering, at_or_after, after) - x0
        else:
            col = np.where(entering, after, at_or_after) - x0
        col = np.clip(col, 0, w).astype(np.int64)
        toggles = np.zeros((h, w + 1), dtype=np.uint8)  # uint8 wraps mod 256: parity kept
        np.add.at(toggles, (rows - y0, col), 1)
        parity = np.cumsum(toggles[:, :w], axis=1, dtype=np.uint8)
        mask = np.bitwise_and(parity, 1, out=parity).view(bool)
        # centres within rounding reach of a crossing: let the robust predicate decide
        scale = np.abs(xa).max() + np.abs(ya).max() + abs(x1) + abs(y1) + 1.0
        tol = 1e-12 * scale * (1.0 + np.abs(dx / dy))[order]
        c_lo = np.maximum(np.ceil(xc - tol - 0.5), x0).astype(np.int64)
        c_hi = np.minimum(np.floor(xc + tol - 0.5), x1 - 1).astype(np.int64)
        near = c_hi >= c_lo
        for r, a, b in zip(rows[near], c_lo[near], c_hi[near], strict=True):
            doubt_c.append(np.arange(a, b + 1))
            doubt_r.append(np.full(b + 1 - a, r))
    if doubt_r:
        rr, cc = np.concatenate(doubt_r), np.concatenate(doubt_c)
        predicate = shapely.intersects_xy if closed else shapely.contains_xy
        mask[rr - y0, cc - x0] = predicate(geometry, cc + 0.5, rr + 0.5)
    return mask


# --------------------------------------------------------------------------- histograms
def histogram_bins(dtype: Any) -> tuple[int, int]:
    """``(offset, n_bins)`` for a dtype: bin ``i`` holds value ``i + offset``."""
    import numpy as np

    dt = np.dtype(dtype)
    if dt.name not in HISTOGRAM_DTYPES:
        raise ValueError(
            f"eCDFs are computed over the full value range of 8- or 16-bit integer images; "
            f"this image is {dt.name} (convert it to uint16 when exporting)"
        )
    info = np.iinfo(dt)
    return int(info.min), int(info.max) - int(info.min) + 1


def bincount(values: np.ndarray, offset: int, n_bins: int) -> np.ndarray:
    """Exact histogram (int64) of integer ``values`` over ``n_bins`` bins from ``offset``."""
    import numpy as np

    flat = values.ravel()
    if offset:
        flat = flat.astype(np.int64) - offset
    return np.bincount(flat, minlength=n_bins).astype(np.int64, copy=False)


@dataclass
class _Prepared:
    index: int
    tissue: BaseGeometry
    holes: BaseGeometry | None
    tissue_edges: np.ndarray
    hole_edges: np.ndarray | None
    bbox: tuple[float, float, float, float]  # ymin, ymax, xmin, xmax (level pixels)


def region_mask(
    tissue: BaseGeometry,
    holes: BaseGeometry | None,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    edges: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> np.ndarray:
    """Pixels of a block whose centre is inside ``tissue`` and outside every (closed) hole."""
    t_edges, h_edges = edges if edges is not None else (None, None)
    mask = rasterize(tissue, y0, y1, x0, x1, t_edges)
    if holes is not None and mask.any():
        mask &= ~rasterize(holes, y0, y1, x0, x1, h_edges, closed=True)
    return mask


def region_histograms(
    read_block: Callable[[int, int, int, int], np.ndarray],
    shape_yx: tuple[int, int],
    dtype: Any,
    regions: Sequence[tuple[BaseGeometry, BaseGeometry | None]],
    n_channels: int,
    block: int,
    workers: int = 1,
) -> tuple[np.ndarray, dict[str, int]]:
    """Histograms ``(n_regions, n_channels, n_bins)`` of the pixels of each region.

    ``regions`` are ``(tissue, holes)`` geometries in the pixels of the array read;
    ``read_block(y0, y1, x0, x1)`` returns the ``(n_channels, y1 - y0, x1 - x0)`` pixels of a
    block (all wanted channels). Only blocks meeting some region's bounding box are read, each
    once, in ``workers`` threads. Returns the histograms and counters (blocks read, blocks
    entirely inside a region).
    """
    import numpy as np
    import shapely
    from shapely.geometry import box

    from hpc_jobs import ngff

    offset, n_bins = histogram_bins(dtype)
    prepared = []
    for i, (tissue, holes) in enumerate(regions):
        if tissue.is_empty:
            continue
        shapely.prepare(tissue)
        if holes is not None:
            shapely.prepare(holes)
        xmin, ymin, xmax, ymax = tissue.bounds
        prepared.append(
            _Prepared(
                i, tissue, holes, ring_edges(tissue),
                None if holes is None else ring_edges(holes), (ymin, ymax, xmin, xmax),
            )
        )
    work: dict[tuple[int, int, int, int], list[_Prepared]] = {}
    for p in prepared:
        for b in ngff.blocks_intersecting(shape_yx, block, p.bbox):
            work.setdefault(b, []).append(p)

    def one_block(blk: tuple[int, int, int, int]) -> tuple[dict[int, np.ndarray], int]:
        y0, y1, x0, x1 = blk
        centres = box(x0 + 0.5, y0 + 0.5, x1 - 0.5, y1 - 0.5)  # hull of the pixel centres
        data = None
        out: dict[int, np.ndarray] = {}
        full = 0
        for p in work[blk]:
            if not p.tissue.intersects(centres):
                continue
            if data is None:
                data = np.asarray(read_block(y0, y1, x0, x1))
            if shapely.contains_properly(p.tissue, centres) and (
                p.holes is None or not p.holes.intersects(centres)
            ):
                full += 1
                hist = [bincount(data[c], offset, n_bins) for c in range(n_channels)]
            else:
                mask = region_mask(
                    p.tissue, p.holes, y0, y1, x0, x1, (p.tissue_edges, p.hole_edges)
                )
                if not mask.any():
                    continue
                hist = [bincount(data[c][mask], offset, n_bins) for c in range(n_channels)]
            out[p.index] = np.stack(hist)
        return out, full

    hists = np.zeros((len(regions), n_channels, n_bins), dtype=np.int64)
    stats = {"blocks": len(work), "blocks_full": 0}
    for out, full in _map(one_block, sorted(work), workers):
        stats["blocks_full"] += full
        for i, h in out.items():
            hists[i] += h
    return hists, stats


def _map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterable[Any]:
    """``map`` in ``workers`` threads (plain ``map`` for one), results in completion order."""
    if workers <= 1:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed

    items = list(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ecdf") as pool:
        futures = [pool.submit(fn, it) for it in items]
        for fut in as_completed(futures):
            yield fut.result()


# --------------------------------------------------------------------------- statistics
def quantile_from_hist(hist: np.ndarray, q: float, offset: int = 0) -> int | None:
    """Inverse eCDF: the smallest value ``v`` with ``F(v) >= q`` (numpy's ``inverted_cdf``)."""
    import numpy as np

    cum = np.cumsum(hist)
    n = int(cum[-1]) if cum.size else 0
    if n == 0:
        return None
    # F(v) >= q  <=>  cum[v] >= q * n, in exact arithmetic on q's decimal value
    frac = Fraction(str(q))
    target = min(max(-(-frac.numerator * n // frac.denominator), 1), n)
    return int(np.searchsorted(cum, target, side="left")) + offset


def hist_summary(
    hist: np.ndarray, offset: int = 0, quantiles: Sequence[float] = QUANTILES
) -> dict[str, Any]:
    """Pixel count, mean, min, max and quantiles of one histogram (None when empty)."""
    import numpy as np

    n = int(hist.sum())
    nz = np.flatnonzero(hist)
    if n == 0:
        return {"pixels": 0, "mean": None, "min": None, "max": None,
                "quantiles": {f"{q:g}": None for q in quantiles}}
    values = np.arange(hist.size, dtype=np.int64) + offset
    total = int((values * hist).sum())  # exact in int64 (< 2**63 for any realistic region)
    return {
        "pixels": n,
        "mean": total / n,
        "min": int(nz[0]) + offset,
        "max": int(nz[-1]) + offset,
        "quantiles": {f"{q:g}": quantile_from_hist(hist, q, offset) for q in quantiles},
    }


def sparse_ecdf(hist: np.ndarray, offset: int = 0) -> tuple[np.ndarray, ...]:
    """The eCDF at its jumps: ``(values, counts, cumulative counts, F(value))``."""
    import numpy as np

    nz = np.flatnonzero(hist)
    counts = hist[nz]
    cum = np.cumsum(counts)
    total = cum[-1] if cum.size else 1
    return nz.astype(np.int64) + offset, counts, cum, cum / total
