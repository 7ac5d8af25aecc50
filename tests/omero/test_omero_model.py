"""The OMERO lane: OmeroStore's conversions with real omero-py classes (no server needed).

Runs where omero-py imports (Python 3.10 + zeroc-ice 3.6.5: ``make test-omero-lane``); skipped
elsewhere. What needs a server is in tests/contract (set OMERO_HOST, OMERO_USER, OMERO_PASSWORD).
"""

from __future__ import annotations

import socket

import pytest

omero = pytest.importorskip("omero", reason="omero-py is not installed (make test-omero-lane)")

from omero.model import EllipseI, PointI, PolygonI, RoiI  # noqa: E402
from omero.rtypes import rstring  # noqa: E402

from hpc_jobs.stores.base import EllipseShape, PointShape, PolygonShape, StoreError  # noqa: E402
from hpc_jobs.stores.omero import OmeroStore, namespace_of  # noqa: E402

SHAPES = [
    PolygonShape(((10.5, 20.0), (300.25, 20.0), (300.25, 410.75), (10.5, 410.75)), "tissue_1"),
    PolygonShape(((50.0, 60.0), (70.0, 60.0), (60.0, 90.0)), "hole_1"),
    PointShape(1234.5, 987.25, "cell 17: positive p=0.93"),
    EllipseShape(400.0, 300.0, 12.5, 9.0, "nucleus 3"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: type(s).__name__ + ":" + s.text)
def test_shapes_round_trip_through_real_omero_model(shape) -> None:
    converted = OmeroStore._shape_to_omero(shape)
    assert isinstance(converted, {PolygonShape: PolygonI, PointShape: PointI,
                                  EllipseShape: EllipseI}[type(shape)])
    assert converted.getTextValue().getValue() == shape.text
    assert OmeroStore._shape_from_omero(converted) == shape


def test_polygon_points_use_omero_x_y_order() -> None:
    """OMERO's points string is "x,y x,y ...": x is the column, as in our shapes."""
    poly = OmeroStore._shape_to_omero(PolygonShape(((1.0, 2.0), (3.0, 4.0), (5.0, 6.0))))
    assert poly.getPoints().getValue().startswith("1.0,2.0 3.0,4.0")


def test_shapes_attach_to_a_real_roi() -> None:
    roi = RoiI()
    roi.setDescription(rstring("omeflow:ns=omeflow/nuclei"))
    for shape in SHAPES:
        roi.addShape(OmeroStore._shape_to_omero(shape))
    assert len(roi.copyShapes()) == len(SHAPES)
    assert namespace_of(roi.getDescription().getValue()) == "omeflow/nuclei"


def test_degenerate_polygon_is_refused() -> None:
    with pytest.raises(StoreError, match="at least 3 points"):
        OmeroStore._shape_to_omero(PolygonShape(((0.0, 0.0), (1.0, 1.0))))


def test_join_without_a_server_names_the_problem() -> None:
    with socket.socket() as s:  # a port on loopback where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        OmeroStore.join("127.0.0.1", port, "0123456789abcdef", secure=True)
