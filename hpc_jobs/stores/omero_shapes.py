"""OMERO shapes <-> store shapes: point strings, affine transforms, shape conversion.

Pure functions over omero.model objects (or anything with the same getters), so all of it is
checked without a server and, except :func:`shape_to_omero`, without omero-py.

Upstream facts relied on:

- Polygon ``points``: current clients write ``"x,y x,y ..."``; older clients wrote the legacy
  form ``"points[309,427, 366,503, 190,491] points1[...] points2[...]"`` (a comma and a space
  between points; the example is omero-py's own, ``src/omero/util/ROI_utils.py``,
  ``pointsStringToXYlist``), and that module's ``PolygonData.listToString`` writes a flat
  ``"x,y,x,y"``. Only the first list (``points[...]``) of the legacy form is the outline.
- Shape transforms are OME ``AffineTransform`` (``omero.model.AffineTransformI``:
  ``a00 a10 a01 a11 a02 a12``), mapping ``(x, y)`` to
  ``(a00*x + a01*y + a02, a10*x + a11*y + a12)`` (OME-XML schema ``AffineTransform``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from hpc_jobs.ecdf_core import ELLIPSE_VERTICES
from hpc_jobs.stores.base import EllipseShape, PointShape, PolygonShape, Shape, StoreError

#: Namespaces of ROIs written by omeflow live in the ROI description (OMERO ROIs have no ns).
NS_PREFIX = "omeflow:ns="

Affine = tuple[float, float, float, float, float, float]  # a00, a10, a01, a11, a02, a12
IDENTITY: Affine = (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = re.compile(rf"^\s*({_NUMBER})\s*,\s*({_NUMBER})\s*$")
_LEGACY_FIRST = re.compile(r"points\[([^\]]*)\]")


def _val(x: Any) -> Any:
    """Unwrap an omero rtype (or None)."""
    return None if x is None else (x.getValue() if hasattr(x, "getValue") else x)


def format_points(points: Sequence[tuple[float, float]]) -> str:
    """OMERO's polygon ``points`` string: ``"x,y x,y ..."``."""
    return " ".join(f"{float(x)!r},{float(y)!r}" for x, y in points)


def parse_points(text: str) -> tuple[tuple[float, float], ...]:
    """The outline of an OMERO ``points`` string, in any format OMERO clients have written.

    Accepts ``"x,y x,y"``, ``"x, y x, y"``, ``"x,y, x,y"`` (comma between points) and the
    legacy ``"points[...] points1[...] ..."`` form (the first list is the outline).
    """
    text = (text or "").strip()
    legacy = _LEGACY_FIRST.search(text)
    if legacy:
        text = legacy.group(1)
    numbers = re.findall(_NUMBER, text)
    # every separator between numbers must be a comma and/or whitespace: no junk
    rest = re.sub(_NUMBER, " ", text).replace(",", " ")
    if rest.strip() or len(numbers) % 2:
        raise StoreError(
            f"cannot read polygon points {text[:80]!r}: expected 'x,y x,y ...' "
            "(fix or redraw the shape in OMERO)"
        )
    vals = [float(n) for n in numbers]
    return tuple(zip(vals[0::2], vals[1::2], strict=True))


def namespace_of(description: str | None) -> str | None:
    """The namespace stored in an ROI description, or None for people-drawn ROIs."""
    if description and description.startswith(NS_PREFIX):
        return description[len(NS_PREFIX) :]
    return None


def affine_of(shape: Any) -> Affine | None:
    """The shape's affine transform as ``(a00, a10, a01, a11, a02, a12)``, None if unset."""
    t = shape.getTransform() if hasattr(shape, "getTransform") else None
    if t is None:
        return None
    vals = tuple(_val(getattr(t, f"getA{k}")()) for k in ("00", "10", "01", "11", "02", "12"))
    if any(v is None for v in vals):
        raise StoreError(
            f"shape {_val(shape.getId())} has an incomplete transform {vals}: fix it in OMERO"
        )
    aff = tuple(float(v) for v in vals)
    return None if aff == IDENTITY else aff  # type: ignore[return-value]


def apply_affine(aff: Affine | None, x: float, y: float) -> tuple[float, float]:
    """``(x, y)`` mapped by ``aff`` (identity for None)."""
    if aff is None:
        return float(x), float(y)
    a00, a10, a01, a11, a02, a12 = aff
    return a00 * x + a01 * y + a02, a10 * x + a11 * y + a12


def _ellipse(cx: float, cy: float, rx: float, ry: float, text: str, aff: Affine | None) -> Shape:
    if aff is None:
        return EllipseShape(cx, cy, rx, ry, text)
    a00, a10, a01, a11, _, _ = aff
    if a01 == 0.0 and a10 == 0.0:  # scale + shift only: still an axis-aligned ellipse
        x, y = apply_affine(aff, cx, cy)
        return EllipseShape(x, y, abs(a00) * rx, abs(a11) * ry, text)
    # rotation or shear: the image of the ellipse, as a polygon (same vertex count as ecdf)
    pts = tuple(
        apply_affine(aff, cx + rx * math.cos(t), cy + ry * math.sin(t))
        for t in (2 * math.pi * i / ELLIPSE_VERTICES for i in range(ELLIPSE_VERTICES))
    )
    return PolygonShape(pts, text)


def shape_from_omero(s: Any) -> tuple[Shape | None, str | None]:
    """A store shape for an OMERO shape, with its transform applied; or (None, note).

    Supported: Polygon, Rectangle (-> polygon), Ellipse (rotated -> polygon), Point. Other
    kinds (Line, Polyline, Mask, Label) have no area and are returned as ``(None, note)`` so
    the caller can report them.
    """
    kind = type(s).__name__.removesuffix("I")
    text = _val(s.getTextValue()) or ""
    sid = _val(s.getId())
    aff = affine_of(s)
    if kind == "Polygon":
        pts = tuple(apply_affine(aff, x, y) for x, y in parse_points(_val(s.getPoints())))
        return PolygonShape(pts, text), None
    if kind == "Rectangle":
        x, y = float(_val(s.getX())), float(_val(s.getY()))
        w, h = float(_val(s.getWidth())), float(_val(s.getHeight()))
        corners = ((x, y), (x + w, y), (x + w, y + h), (x, y + h))
        return PolygonShape(tuple(apply_affine(aff, *c) for c in corners), text), None
    if kind == "Ellipse":
        vals = (_val(s.getX()), _val(s.getY()), _val(s.getRadiusX()), _val(s.getRadiusY()))
        return _ellipse(*(float(v) for v in vals), text, aff), None
    if kind == "Point":
        return PointShape(
            *apply_affine(aff, float(_val(s.getX())), float(_val(s.getY()))), text
        ), None
    return None, (
        f"shape {sid} {text!r} is a {kind}, which has no area; ignored "
        "(draw tissue and holes as Polygon, Rectangle or Ellipse)"
    )


def shape_to_omero(shape: Shape) -> Any:
    """An omero.model shape for a store shape (no transform: coordinates are level 0)."""
    from omero.model import EllipseI, PointI, PolygonI
    from omero.rtypes import rdouble, rstring

    if isinstance(shape, PolygonShape):
        if len(shape.points) < 3:
            raise StoreError(f"a polygon needs at least 3 points, got {len(shape.points)}")
        s = PolygonI()
        s.setPoints(rstring(format_points(shape.points)))
    elif isinstance(shape, PointShape):
        s = PointI()
        s.setX(rdouble(shape.x))
        s.setY(rdouble(shape.y))
    elif isinstance(shape, EllipseShape):
        s = EllipseI()
        s.setX(rdouble(shape.x))
        s.setY(rdouble(shape.y))
        s.setRadiusX(rdouble(shape.radius_x))
        s.setRadiusY(rdouble(shape.radius_y))
    else:
        raise StoreError(
            f"unsupported shape {type(shape).__name__}; use PolygonShape, PointShape or "
            "EllipseShape"
        )
    s.setTextValue(rstring(shape.text))
    return s
