"""The OMERO lane: OmeroStore's conversions with real omero-py classes (no server needed).

Runs where omero-py imports (Python 3.10 + zeroc-ice 3.6.5: ``bash scripts/omero_lane.sh``);
skipped elsewhere. What needs a server is in tests/contract (``bash scripts/omero_lane.sh
contract`` with OMERO_HOST, OMERO_USER, OMERO_PASSWORD set).
"""

from __future__ import annotations

import math
import shutil
import socket
import ssl
import subprocess
import threading

import pytest

omero = pytest.importorskip("omero", reason="omero-py is not installed (make test-omero-lane)")

from omero.model import (  # noqa: E402
    AffineTransformI,
    EllipseI,
    LengthI,
    LineI,
    PointI,
    PolygonI,
    RectangleI,
    RoiI,
)
from omero.model.enums import UnitsLength  # noqa: E402
from omero.rtypes import rdouble, rlong, rstring  # noqa: E402

from hpc_jobs.stores.base import (  # noqa: E402
    EllipseShape,
    ImageInfo,
    NewRoi,
    PointShape,
    PolygonShape,
    StoreError,
)
from hpc_jobs.stores.omero import OmeroStore, _Image  # noqa: E402
from hpc_jobs.stores.omero_delete import delete2_request  # noqa: E402
from hpc_jobs.stores.omero_shapes import (  # noqa: E402
    namespace_of,
    shape_from_omero,
    shape_to_omero,
)
from hpc_jobs.stores.omero_units import length_um  # noqa: E402

SHAPES = [
    PolygonShape(((10.5, 20.0), (300.25, 20.0), (300.25, 410.75), (10.5, 410.75)), "tissue_1"),
    PolygonShape(((50.0, 60.0), (70.0, 60.0), (60.0, 90.0)), "hole_1"),
    PointShape(1234.5, 987.25, "cell 17: positive p=0.93"),
    EllipseShape(400.0, 300.0, 12.5, 9.0, "nucleus 3"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: type(s).__name__ + ":" + s.text)
def test_shapes_round_trip_through_real_omero_model(shape) -> None:
    converted = shape_to_omero(shape)
    assert isinstance(
        converted, {PolygonShape: PolygonI, PointShape: PointI, EllipseShape: EllipseI}[type(shape)]
    )
    assert converted.getTextValue().getValue() == shape.text
    assert shape_from_omero(converted) == (shape, None)


def test_polygon_points_use_omero_x_y_order() -> None:
    """OMERO's points string is "x,y x,y ...": x is the column, as in our shapes."""
    poly = shape_to_omero(PolygonShape(((1.0, 2.0), (3.0, 4.0), (5.0, 6.0))))
    assert poly.getPoints().getValue().startswith("1.0,2.0 3.0,4.0")


def test_legacy_points_on_a_real_polygon() -> None:
    poly = PolygonI()
    poly.setPoints(rstring("points[309,427, 366,503, 190,491] points1[309,427, 366,503, 190,491]"))
    shape, _ = shape_from_omero(poly)
    assert shape.points == ((309, 427), (366, 503), (190, 491))


def _transform(a00, a10, a01, a11, a02, a12) -> AffineTransformI:
    t = AffineTransformI()
    for name, v in zip(
        ("00", "10", "01", "11", "02", "12"), (a00, a10, a01, a11, a02, a12), strict=True
    ):
        getattr(t, f"setA{name}")(rdouble(v))
    return t


def test_real_transformed_rectangle_and_rotated_ellipse() -> None:
    rect = RectangleI()
    for k, v in dict(X=0, Y=0, Width=10, Height=20).items():
        getattr(rect, f"set{k}")(rdouble(v))
    rect.setTextValue(rstring("tissue_r"))
    rect.setTransform(_transform(1, 0, 0, 1, 5, 7))
    shape, note = shape_from_omero(rect)
    assert note is None and shape.points == ((5, 7), (15, 7), (15, 27), (5, 27))
    ell = EllipseI()
    for k, v in dict(X=0, Y=0, RadiusX=10, RadiusY=2).items():
        getattr(ell, f"set{k}")(rdouble(v))
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    ell.setTransform(_transform(c, s, -s, c, 0, 0))
    shape, _ = shape_from_omero(ell)
    assert isinstance(shape, PolygonShape)
    assert max(y for _, y in shape.points) == pytest.approx(math.hypot(10 * s, 2 * c), rel=1e-3)


def test_line_is_refused_with_a_note() -> None:
    line = LineI()
    line.setTextValue(rstring("tissue_x"))
    shape, note = shape_from_omero(line)
    assert shape is None and "Line" in note


def test_real_length_units_convert_to_micrometres() -> None:
    assert length_um(LengthI(250.0, UnitsLength.NANOMETER)) == pytest.approx(0.25)
    assert length_um(LengthI(0.5, UnitsLength.MILLIMETER)) == pytest.approx(500.0)
    assert length_um(LengthI(0.65, UnitsLength.MICROMETER)) == pytest.approx(0.65)
    assert length_um(LengthI(1.0, UnitsLength.PIXEL)) is None
    assert length_um(LengthI(1.0, UnitsLength.REFERENCEFRAME)) is None


def test_shapes_attach_to_a_real_roi() -> None:
    roi = RoiI()
    roi.setDescription(rstring("omeflow:ns=omeflow/nuclei"))
    for shape in SHAPES:
        roi.addShape(shape_to_omero(shape))
    assert len(roi.copyShapes()) == len(SHAPES)
    assert namespace_of(roi.getDescription().getValue()) == "omeflow/nuclei"


def test_degenerate_polygon_is_refused() -> None:
    with pytest.raises(StoreError, match="at least 3 points"):
        shape_to_omero(PolygonShape(((0.0, 0.0), (1.0, 1.0))))


def test_real_delete2_request() -> None:
    req = delete2_request("Roi", [3, 1, 2])
    assert isinstance(req, omero.cmd.Delete2) and req.targetObjects == {"Roi": [3, 1, 2]}


class _Opts(dict):
    def setOmeroGroup(self, g):  # noqa: N802
        self["omero.group"] = str(g)

    def getOmeroGroup(self):  # noqa: N802
        return self.get("omero.group")

    def copy(self):
        return _Opts(self)


class _Handle:
    def getResponse(self):  # noqa: N802
        return omero.cmd.Delete2Response(deletedObjects={"ome.model.roi.Roi": [41, 42]})

    def close(self):
        pass


class _Conn:
    """A connection recording the group each call ran in (real omero.model objects)."""

    def __init__(self) -> None:
        self.SERVICE_OPTS = _Opts({"omero.group": "-1"})  # noqa: N815
        self.calls: list[tuple[str, str]] = []
        conn = self

        class Query:
            def projection(self, q, params, ctx):
                conn.calls.append(("query", ctx.getOmeroGroup()))
                return [[rlong(41)], [rlong(42)]]

        class Update:
            def saveAndReturnArray(self, objs, ctx):  # noqa: N802
                conn.calls.append(("save", ctx.getOmeroGroup()))
                for i, o in enumerate(objs):
                    o.setId(rlong(100 + i))
                return objs

        class SF:
            def submit(self, req, ctx):
                conn.calls.append(("delete", ctx.getOmeroGroup()))
                assert req.targetObjects == {"Roi": [41, 42]}
                return _Handle()

        class C:
            sf = SF()

        self.q, self.u, self.c = Query(), Update(), C()

    def getQueryService(self):  # noqa: N802
        return self.q

    def getUpdateService(self):  # noqa: N802
        return self.u


def test_write_rois_reads_in_all_groups_and_writes_in_the_image_group() -> None:
    conn = _Conn()
    store = OmeroStore(conn)
    info = ImageInfo(5, "img", 10, 10, 1, "uint16", ("DAPI",))
    store._images[5] = _Image(info, group_id=53, pixels_id=9)
    ids = store.write_rois(5, [NewRoi((PointShape(1.0, 2.0, "n"),))], "omeflow/test")
    assert ids == [100]
    assert conn.calls == [("query", "-1"), ("save", "53"), ("delete", "53")]
    assert conn.SERVICE_OPTS.getOmeroGroup() == "-1"


def test_join_without_a_server_names_the_problem() -> None:
    with socket.socket() as s:  # a port on loopback where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        OmeroStore.join("127.0.0.1", port, "0123456789abcdef", secure=True)


def test_join_with_a_missing_ca_file_is_refused(tmp_path) -> None:
    with pytest.raises(StoreError, match="CA file"):
        OmeroStore.join("127.0.0.1", 4064, "0123456789abcdef", ca_file=tmp_path / "nope.pem")


def _cert(tmp_path, name: str, cn: str) -> tuple[str, str]:
    """A self-signed certificate + key for ``cn`` (IP SAN), made with the openssl CLI."""
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-addext",
            f"subjectAltName=IP:{cn}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture
def tls_impostor(tmp_path):
    """A TLS server on loopback with its own self-signed certificate (not OMERO)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    cert, key = _cert(tmp_path, "impostor", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(16)
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], cert, tmp_path
    srv.close()


def test_pinned_ca_refuses_an_impostor_server(tls_impostor) -> None:
    """omero-py's default accepts any certificate; a pinned CA refuses a foreign one."""
    port, impostor_cert, tmp_path = tls_impostor
    site_ca, _ = _cert(tmp_path, "site-ca", "127.0.0.1")
    with pytest.raises(StoreError, match="TLS handshake .* failed .*not signed by the pinned CA"):
        OmeroStore.join("127.0.0.1", port, "0123456789abcdef", ca_file=site_ca)
    # the default (no CA) completes the handshake with the impostor: the key would be sent
    with pytest.raises(StoreError) as default:
        OmeroStore.join("127.0.0.1", port, "0123456789abcdef")
    assert "TLS handshake" not in str(default.value)
    # pinning the impostor's own certificate passes TLS: the pin itself is what decides
    with pytest.raises(StoreError) as pinned_right:
        OmeroStore.join("127.0.0.1", port, "0123456789abcdef", ca_file=impostor_cert)
    assert "TLS handshake" not in str(pinned_right.value)
