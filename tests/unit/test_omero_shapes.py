"""OMERO shapes without a server or omero-py: point strings, transforms, units, notes.

Fakes stand in for omero.model classes only where omero-py is absent; they carry the same
class names (``PolygonI``...) and getters, returning rtype-like objects with ``getValue``.
The lane (tests/omero) runs the same conversions with the real classes.
"""

from __future__ import annotations

import math

import pytest

from hpc_jobs.ecdf_core import ELLIPSE_VERTICES, tissue_regions
from hpc_jobs.stores.base import EllipseShape, PointShape, PolygonShape, Roi, StoreError
from hpc_jobs.stores.omero_shapes import (
    affine_of,
    format_points,
    parse_points,
    shape_from_omero,
)
from hpc_jobs.stores.omero_units import length_um, pixel_size_um

TRIANGLE = ((309.0, 427.0), (366.0, 503.0), (190.0, 491.0))


# ----------------------------------------------------------------------------- points
@pytest.mark.parametrize(
    "text",
    [
        "309,427 366,503 190,491",  # current clients (and format_points)
        "309, 427 366, 503 190, 491",  # a space after the comma
        "309,427, 366,503, 190,491",  # comma + space between points
        # the legacy form, verbatim from omero-py's src/omero/util/ROI_utils.py docstring
        "points[309,427, 366,503, 190,491] points1[309,427, 366,503, 190,491] "
        "points2[309,427, 366,503, 190,491]",
        "309,427,366,503,190,491",  # ROI_utils PolygonData.listToString of [x1, y1, x2, ...]
        "  309.0,427.0   366.0,503.0\t190.0,491.0 ",
    ],
)
def test_points_in_every_format_upstream_writes(text: str) -> None:
    assert parse_points(text) == TRIANGLE


def test_legacy_form_uses_the_first_list_only() -> None:
    text = "points[0,0, 10,0, 10,10] points1[99,99, 98,98, 97,97] mask[0,0,0]"
    assert parse_points(text) == ((0, 0), (10, 0), (10, 10))


def test_points_round_trip_exactly() -> None:
    pts = ((1.5, 2.25), (1e-3, 12345.678), (-100.0, 0.0), (3e-7, 2.5e10))
    assert parse_points(format_points(pts)) == pts


@pytest.mark.parametrize("bad", ["1,2 3", "1,2 x,4", "1;2 3;4 5;6"])
def test_unreadable_points_name_the_problem(bad: str) -> None:
    with pytest.raises(StoreError, match="cannot read polygon points"):
        parse_points(bad)


# ----------------------------------------------------------------------------- fakes
class R:
    """An rtype: ``getValue()``."""

    def __init__(self, v):
        self._v = v

    def getValue(self):  # noqa: N802 - omero's name
        return self._v


class AffineTransformI:
    def __init__(self, a00, a10, a01, a11, a02, a12):
        self.m = {"00": a00, "10": a10, "01": a01, "11": a11, "02": a02, "12": a12}

    def __getattr__(self, name):
        if name.startswith("getA"):
            return lambda: R(self.m[name[4:]])
        raise AttributeError(name)


class _Shape:
    def __init__(self, text="", transform=None, sid=7, **fields):
        self.fields = {k: R(v) for k, v in fields.items()}
        self.text, self.transform, self.sid = text, transform, sid

    def getTextValue(self):  # noqa: N802
        return R(self.text)

    def getTransform(self):  # noqa: N802
        return self.transform

    def getId(self):  # noqa: N802
        return R(self.sid)

    def __getattr__(self, name):
        if name.startswith("get"):
            key = name[3].lower() + name[4:]
            return lambda: self.fields[key]
        raise AttributeError(name)


class PolygonI(_Shape):
    pass


class RectangleI(_Shape):
    pass


class EllipseI(_Shape):
    pass


class PointI(_Shape):
    pass


class LineI(_Shape):
    pass


def rot(deg: float, tx: float = 0.0, ty: float = 0.0) -> AffineTransformI:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return AffineTransformI(c, s, -s, c, tx, ty)  # a00 a10 a01 a11 a02 a12


# ----------------------------------------------------------------------------- transforms
def test_untransformed_shapes_convert_unchanged() -> None:
    poly, note = shape_from_omero(PolygonI("tissue_1", points="0,0 10,0 10,10"))
    assert poly == PolygonShape(((0, 0), (10, 0), (10, 10)), "tissue_1") and note is None
    ell, _ = shape_from_omero(EllipseI("n", x=5, y=6, radiusX=3, radiusY=2))
    assert ell == EllipseShape(5, 6, 3, 2, "n")
    pt, _ = shape_from_omero(PointI("p", x=1.5, y=2.5))
    assert pt == PointShape(1.5, 2.5, "p")


def test_identity_transform_is_no_transform() -> None:
    assert affine_of(PointI(transform=AffineTransformI(1, 0, 0, 1, 0, 0))) is None


def test_polygon_transform_is_applied() -> None:
    s = PolygonI("tissue_1", transform=AffineTransformI(2, 0, 0, 3, 100, 200), points="1,1 2,1 2,2")
    poly, _ = shape_from_omero(s)
    assert poly.points == ((102, 203), (104, 203), (104, 206))


def test_rectangle_becomes_a_transformed_polygon() -> None:
    plain, note = shape_from_omero(RectangleI("tissue_r", x=10, y=20, width=30, height=40))
    assert note is None
    assert plain == PolygonShape(((10, 20), (40, 20), (40, 60), (10, 60)), "tissue_r")
    turned, _ = shape_from_omero(
        RectangleI("tissue_r", x=0, y=0, width=10, height=20, transform=rot(90))
    )
    # 90 degrees: (x, y) -> (-y, x)
    flat = [v for p in turned.points for v in p]
    assert flat == pytest.approx([0, 0, 0, 10, -20, 10, -20, 0], abs=1e-9)


def test_rotated_ellipse_is_its_rotated_outline() -> None:
    """A 30-degree ellipse: every vertex lies on the rotated ellipse, none on the unrotated."""
    cx, cy, rx, ry = 100.0, 50.0, 40.0, 10.0
    shape, note = shape_from_omero(
        EllipseI("tissue_e", x=cx, y=cy, radiusX=rx, radiusY=ry, transform=rot(30))
    )
    assert note is None and isinstance(shape, PolygonShape)
    assert len(shape.points) == ELLIPSE_VERTICES and shape.text == "tissue_e"
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    # rotated centre
    mx = sum(p[0] for p in shape.points) / len(shape.points)
    my = sum(p[1] for p in shape.points) / len(shape.points)
    assert (mx, my) == pytest.approx((c * cx - s * cy, s * cx + c * cy), abs=1e-6)
    for x, y in shape.points:  # back-rotate: on the original ellipse
        u, v = c * x + s * y - cx, -s * x + c * y - cy
        assert (u / rx) ** 2 + (v / ry) ** 2 == pytest.approx(1.0, abs=1e-9)
    # the old code returned the axis-aligned ellipse: its extreme point is not on this one
    assert max(x for x, _ in shape.points) < cx + rx - 1


def test_scaled_ellipse_stays_an_ellipse() -> None:
    shape, _ = shape_from_omero(
        EllipseI(
            "e", x=10, y=10, radiusX=4, radiusY=2, transform=AffineTransformI(2, 0, 0, -3, 1, 1)
        )
    )
    assert shape == EllipseShape(21, -29, 8, 6, "e")


def test_shapes_without_area_are_refused_with_a_note_in_the_region_report() -> None:
    line, note = shape_from_omero(LineI("tissue_2", sid=42, x1=0, y1=0, x2=5, y2=5))
    assert line is None
    assert "42" in note and "Line" in note and "tissue_2" in note and "Polygon" in note
    roi = Roi(1, (PolygonShape(((0, 0), (50, 0), (50, 50), (0, 50)), "tissue_1"),), notes=(note,))
    (region,) = tissue_regions([roi], 100, 100)
    assert note in region.notes


# ----------------------------------------------------------------------------- units
class LengthI:
    """omero.model.LengthI's surface: value, unit and the converting copy constructor."""

    TO_UM = {"MICROMETER": 1.0, "NANOMETER": 1e-3, "MILLIMETER": 1e3, "INCH": 25400.0}

    def __init__(self, value, unit):
        if isinstance(value, LengthI):
            self.unit = unit
            self.value = value.value * self.TO_UM[str(value.unit)] / self.TO_UM[unit]
        else:
            self.value, self.unit = value, unit

    def getValue(self):  # noqa: N802
        return self.value

    def getUnit(self):  # noqa: N802
        return self.unit


@pytest.mark.parametrize(
    ("value", "unit", "um"),
    [
        (0.25, "MICROMETER", 0.25),
        (250.0, "NANOMETER", 0.25),
        (0.0005, "MILLIMETER", 0.5),
        (1.0, "PIXEL", None),
        (1.0, "REFERENCEFRAME", None),
        (0.0, "MICROMETER", None),
    ],
)
def test_pixel_sizes_come_in_micrometres(value, unit, um) -> None:
    got = length_um(LengthI(value, unit))
    assert got == (None if um is None else pytest.approx(um))


def test_pixel_size_pair_asks_for_units() -> None:
    class Img:
        def getPixelSizeX(self, units=None):  # noqa: N802
            assert units is True  # the Length, not the bare number in its stored unit
            return LengthI(500.0, "NANOMETER")

        def getPixelSizeY(self, units=None):  # noqa: N802
            return None

    assert pixel_size_um(Img()) == pytest.approx((0.5, 0.5))
