"""The ImageStore contract: the same tests over every store that is available here.

``LocalStore`` always runs. ``OmeroStore`` runs when ``OMERO_HOST``, ``OMERO_USER`` and
``OMERO_PASSWORD`` are set (optional ``OMERO_PORT``, ``OMERO_SECURE``, ``OMERO_CA_FILE``) and
omero-py is installed; it creates its small test images with
``OmeroStore.create_image_from_array`` (BlitzGateway.createImageFromNumpySeq), so the user
needs permission to create images, and it deletes them afterwards.

OMERO-only tests at the end: a multi-level image (``OMERO_MULTILEVEL_IMAGE``, or one created
larger than the server's max plane and waited for while the server builds its pyramid), 5000
ROIs replaced twice, and writes by a second user who is not the image owner
(``OMERO_USER2``/``OMERO_PASSWORD2``, a member of the first user's default group, which must
be read-annotate or read-write). One command runs it all
against a site's test server: ``bash scripts/omero_lane.sh contract`` (docs/omero.md).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hpc_jobs.stores.base import (
    EllipseShape,
    ImageNotFound,
    ImageStore,
    NewRoi,
    PointShape,
    PolygonShape,
    StoreError,
)

NS = "omeflow.test/contract"


def _omero_env() -> dict[str, Any] | None:
    if not all(os.environ.get(k) for k in ("OMERO_HOST", "OMERO_USER", "OMERO_PASSWORD")):
        return None
    return {
        "host": os.environ["OMERO_HOST"],
        "port": int(os.environ.get("OMERO_PORT", "4064")),
        "user": os.environ["OMERO_USER"],
        "password": os.environ["OMERO_PASSWORD"],
        "secure": os.environ.get("OMERO_SECURE", "1") not in ("0", "false", "no"),
        "ca_file": os.environ.get("OMERO_CA_FILE") or None,
    }


def _omero_skip_reason() -> str | None:
    if _omero_env() is None:
        return "OMERO contract needs OMERO_HOST, OMERO_USER, OMERO_PASSWORD (no server here)"
    try:
        import omero  # noqa: F401
    except ImportError:
        return "omero-py not installed: pip install 'omeflow[omero]' (Python 3.10)"
    return None


def open_store(kind: str, root: str | None) -> ImageStore:
    """Open a store of ``kind``; also used by worker processes (must be picklable args)."""
    if kind == "local":
        from hpc_jobs.stores.local import LocalStore

        assert root is not None
        return LocalStore(Path(root))
    from hpc_jobs.stores.omero import OmeroStore

    env = _omero_env()
    assert env is not None
    return OmeroStore.login(**env)


class Harness:
    """A store under test plus the one thing the protocol lacks: creating images."""

    def __init__(self, kind: str, root: str | None) -> None:
        self.kind, self.root = kind, root
        self.store = open_store(kind, root)
        self.created: list[int] = []
        self.cleanup: list[tuple[str, int]] = []

    def make_image(
        self, pixels: np.ndarray, channel_names: list[str], pixel_size_um=(0.5, 0.25)
    ) -> int:
        if self.kind == "local":
            image_id = self.store.add_image(  # type: ignore[attr-defined]
                "contract", pixels, channel_names, pixel_size_um, tile=64, levels=2
            )
        else:
            image_id = self.store.create_image_from_array(  # type: ignore[attr-defined]
                "omeflow-contract", pixels, channel_names, pixel_size_um
            )
        self.created.append(image_id)
        return image_id

    def make_dataset(self, name: str, image_ids: list[int]) -> int:
        """A dataset holding ``image_ids`` (OMERO: Dataset + DatasetImageLinks)."""
        if self.kind == "local":
            return self.store.create_dataset(name, image_ids)  # type: ignore[attr-defined]
        import omero.model
        from omero.gateway import DatasetWrapper

        conn = self.store.conn  # type: ignore[attr-defined]
        ds = DatasetWrapper(conn, omero.model.DatasetI())
        ds.setName(name)
        ds.save()
        for image_id in image_ids:
            link = omero.model.DatasetImageLinkI()
            link.setParent(omero.model.DatasetI(ds.getId(), False))
            link.setChild(omero.model.ImageI(image_id, False))
            conn.getUpdateService().saveObject(link, conn.SERVICE_OPTS)
        self.cleanup.append(("Dataset", ds.getId()))
        return int(ds.getId())

    def tag(self, text: str, image_ids: list[int]) -> int:
        """Tag ``image_ids`` with a new tag ``text`` (OMERO: TagAnnotation + links)."""
        if self.kind == "local":
            return self.store.tag_images(text, image_ids)  # type: ignore[attr-defined]
        from omero.gateway import TagAnnotationWrapper

        conn = self.store.conn  # type: ignore[attr-defined]
        tag = TagAnnotationWrapper(conn)
        tag.setValue(text)
        tag.save()
        for image_id in image_ids:
            conn.getObject("Image", image_id).linkAnnotation(tag)
        self.cleanup.append(("Annotation", tag.getId()))
        return int(tag.getId())

    def close(self) -> None:
        if self.kind == "omero":
            for kind, obj_id in self.cleanup:
                self.store.conn.deleteObjects(kind, [obj_id], wait=True)  # type: ignore[attr-defined]
            for image_id in self.created:
                self.store.delete_image(image_id)  # type: ignore[attr-defined]
        self.store.close()


@pytest.fixture(params=["local", "omero"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "omero" and (reason := _omero_skip_reason()):
        pytest.skip(reason)
    h = Harness(request.param, str(tmp_path / "store") if request.param == "local" else None)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def pixels() -> np.ndarray:
    """A non-square 2-channel uint16 image whose size is not a multiple of the tile."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 65535, size=(2, 150, 213), dtype=np.uint16)


@pytest.fixture
def image(harness: Harness, pixels: np.ndarray) -> int:
    return harness.make_image(pixels, ["DAPI", "CD8"])


# ----------------------------------------------------------------------------- selection
def test_images_listed_by_dataset_and_tag(harness: Harness, pixels: np.ndarray) -> None:
    a, b, c = (harness.make_image(pixels, ["DAPI", "CD8"]) for _ in range(3))
    text = f"omeflow-contract-{os.getpid()}-{a}"
    dataset = harness.make_dataset(text, [a, b])
    tag_id = harness.tag(text, [b, c])
    store = harness.store
    assert store.list_image_ids(dataset=dataset) == [a, b]
    assert store.list_image_ids(tag=text) == [b, c]
    assert store.list_image_ids(tag=tag_id) == [b, c]
    assert store.list_image_ids(dataset=dataset, tag=text) == [b]
    assert store.list_image_ids(dataset=dataset, tag=tag_id) == [b]


def test_unknown_dataset_or_tag_is_named(harness: Harness, image: int) -> None:
    with pytest.raises(StoreError, match="no dataset 987654321"):
        harness.store.list_image_ids(dataset=987654321)
    with pytest.raises(StoreError, match="no tag 'omeflow-no-such-tag'"):
        harness.store.list_image_ids(tag="omeflow-no-such-tag")
    with pytest.raises(StoreError, match="needs a dataset id or a tag"):
        harness.store.list_image_ids()


# ----------------------------------------------------------------------------- metadata
def test_metadata(harness: Harness, image: int) -> None:
    info = harness.store.get_image(image)
    assert info.image_id == image >= 1
    assert (info.size_x, info.size_y, info.size_c) == (213, 150, 2)
    assert info.dtype == "uint16"
    assert info.channel_names == ("DAPI", "CD8")
    assert info.pixel_size_um == pytest.approx((0.5, 0.25))
    assert info.levels >= 1
    assert image in [i.image_id for i in harness.store.list_images()]


def test_unknown_image_is_clear(harness: Harness, image: int) -> None:
    with pytest.raises(ImageNotFound, match="999999"):
        harness.store.get_image(999999)
    with pytest.raises(ImageNotFound):
        harness.store.read_region(999999, 0, 0, 1, 0, 1)
    with pytest.raises(ImageNotFound):
        harness.store.get_rois(999999)
    if harness.kind == "local":
        with pytest.raises(ImageNotFound, match=rf"it has images .*{image}"):
            harness.store.get_image(image + 1000)


def test_channel_out_of_range_names_the_range(harness: Harness, image: int) -> None:
    with pytest.raises(StoreError, match=r"2 channels.*use 0\.\.1"):
        harness.store.read_region(image, 2, 0, 10, 0, 10)


# ----------------------------------------------------------------------------- pixels
@pytest.mark.parametrize(
    "region",
    [
        (0, 150, 0, 213),  # whole image
        (10, 75, 20, 130),  # interior, crosses tile edges
        (100, 400, 190, 500),  # clipped at the bottom-right edge
        (-20, 30, -5, 40),  # clipped at the top-left edge
        (149, 150, 212, 213),  # last pixel
    ],
)
def test_region_reads_equal_written_pixels(
    harness: Harness, image: int, pixels: np.ndarray, region: tuple[int, int, int, int]
) -> None:
    y0, y1, x0, x1 = region
    for c in range(2):
        got = harness.store.read_region(image, c, y0, y1, x0, x1)
        want = pixels[c, max(0, y0) : y1, max(0, x0) : x1]
        assert got.dtype == np.uint16
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_empty_region(harness: Harness, image: int) -> None:
    got = harness.store.read_region(image, 0, 500, 600, 0, 10)
    assert got.size == 0


def test_reduced_level(harness: Harness, image: int, pixels: np.ndarray) -> None:
    info = harness.store.get_image(image)
    if info.levels < 2:
        pytest.skip("store serves a single resolution level for this image")
    small = harness.store.read_region(image, 0, 0, 10_000, 0, 10_000, level=1)
    assert abs(small.shape[0] - 75) <= 1 and abs(small.shape[1] - 106) <= 1
    # a reduced level approximates the block mean of level 0
    ref = pixels[0, : 2 * small.shape[0], : 2 * small.shape[1]].astype(float)
    ref = ref.reshape(small.shape[0], 2, small.shape[1], 2).mean(axis=(1, 3))
    assert np.corrcoef(ref.ravel(), small.astype(float).ravel())[0, 1] > 0.5


# ----------------------------------------------------------------------------- ROIs
def _polygon(n: int, cx: float, cy: float, r: float, text: str) -> PolygonShape:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = tuple((float(cx + r * np.cos(a)), float(cy + r * 0.7 * np.sin(a))) for a in t)
    return PolygonShape(pts, text)


def test_roi_round_trip(harness: Harness, image: int) -> None:
    big = _polygon(500, 100.25, 70.5, 60.0, "tissue_1")
    hole = _polygon(7, 100, 70, 10, "hole_1")
    point = PointShape(12.5, 30.75, "nucleus 17")
    ellipse = EllipseShape(50.0, 60.0, 9.5, 7.25, "n2")
    ids = harness.store.write_rois(
        image,
        [NewRoi((big, hole), name="tissue"), NewRoi((point,)), NewRoi((ellipse,), name="e")],
        NS,
    )
    assert len(ids) == 3 and len(set(ids)) == 3
    rois = {r.roi_id: r for r in harness.store.get_rois(image, NS)}
    assert set(rois) == set(ids)
    tissue = rois[ids[0]]
    assert tissue.namespace == NS
    assert tissue.name == "tissue"
    polys = sorted((s for s in tissue.shapes if isinstance(s, PolygonShape)), key=lambda s: s.text)
    assert [s.text for s in polys] == ["hole_1", "tissue_1"]
    np.testing.assert_allclose(polys[1].points, big.points, atol=1e-6)
    np.testing.assert_allclose(polys[0].points, hole.points, atol=1e-6)
    (p,) = rois[ids[1]].shapes
    assert isinstance(p, PointShape) and (p.x, p.y, p.text) == (12.5, 30.75, "nucleus 17")
    (e,) = rois[ids[2]].shapes
    assert isinstance(e, EllipseShape)
    assert (e.x, e.y, e.radius_x, e.radius_y, e.text) == (50.0, 60.0, 9.5, 7.25, "n2")


def test_roi_namespace_replace_semantics(harness: Harness, image: int) -> None:
    rois = [NewRoi((PointShape(float(i), float(i), f"p{i}"),)) for i in range(4)]
    other = harness.store.write_rois(image, rois[:1], NS + "/other")
    first = harness.store.write_rois(image, rois, NS)
    second = harness.store.write_rois(image, rois, NS)  # replace: no duplicates
    got = harness.store.get_rois(image, NS)
    assert sorted(r.roi_id for r in got) == sorted(second)
    assert not set(first) & set(second)
    assert sorted(s.text for r in got for s in r.shapes) == ["p0", "p1", "p2", "p3"]
    # other namespaces are untouched; replace=False appends
    assert [r.roi_id for r in harness.store.get_rois(image, NS + "/other")] == other
    harness.store.write_rois(image, rois[:2], NS, replace=False)
    assert len(harness.store.get_rois(image, NS)) == 6
    # no filter: everything, including the other namespace
    assert len(harness.store.get_rois(image)) >= 7


def test_people_drawn_rois_survive_writes(harness: Harness, image: int) -> None:
    if harness.kind != "local":
        pytest.skip("drawing ROIs without a namespace is a LocalStore helper")
    store = harness.store
    rid = store.add_roi(image, _polygon(40, 80, 60, 30, "tissue_1"), name="drawn")  # type: ignore[attr-defined]
    store.write_rois(image, [NewRoi((PointShape(1, 1),))], NS)
    store.write_rois(image, [NewRoi((PointShape(2, 2),))], NS)
    drawn = [r for r in store.get_rois(image) if r.namespace is None]
    assert [r.roi_id for r in drawn] == [rid]
    with pytest.raises(StoreError, match="namespace"):
        store.write_rois(image, [NewRoi((PointShape(1, 1),))], "")


# ----------------------------------------------------------------------------- annotations
def test_map_annotations(harness: Harness, image: int) -> None:
    s = harness.store
    s.write_map_annotation(image, NS, {"threshold": "200", "model": "nuclei"})
    s.write_map_annotation(image, NS + "/b", {"k": "v"})
    s.write_map_annotation(image, NS, {"threshold": "250"})  # replaces
    got = s.get_map_annotations(image, NS)
    assert [(m.namespace, m.values) for m in got] == [(NS, {"threshold": "250"})]
    s.write_map_annotation(image, NS, {"extra": "1"}, replace=False)
    assert sorted(
        m.values.get("threshold", m.values.get("extra")) for m in s.get_map_annotations(image, NS)
    ) == ["1", "250"]
    assert {m.namespace for m in s.get_map_annotations(image)} >= {NS, NS + "/b"}


def test_attachments_round_trip(harness: Harness, image: int, tmp_path: Path) -> None:
    s = harness.store
    data = bytes(range(256)) * 100
    f = tmp_path / "ecdf.parquet"
    f.write_bytes(data)
    fid = s.attach_file(image, f, NS, mimetype="application/x-parquet")
    (att,) = s.list_attachments(image, NS)
    assert (att.file_id, att.name, att.namespace, att.size) == (fid, "ecdf.parquet", NS, len(data))
    assert s.read_attachment(image, fid) == data
    # same name + namespace again: replaced, not duplicated
    f.write_bytes(b"v2")
    fid2 = s.attach_file(image, f, NS)
    assert [a.file_id for a in s.list_attachments(image, NS)] == [fid2]
    assert s.read_attachment(image, fid2) == b"v2"
    # a different name is a second attachment
    s.attach_file(image, f, NS, name="other.json", mimetype="application/json")
    names = sorted(a.name for a in s.list_attachments(image, NS))
    assert names == ["ecdf.parquet", "other.json"]


def test_result_table_replaced_by_name(harness: Harness, image: int) -> None:
    """A per-cell table lands under the bulk-annotations namespace; the same name replaces."""
    from hpc_jobs.stores.base import BULK_ANNOTATIONS_NS

    s = harness.store
    cols = {"id": [1, 2], "probability": [0.25, 0.75], "class": ["neg", "pos"]}
    s.write_table(image, cols, "m.cells")
    second = s.write_table(image, {**cols, "probability": [0.5, 0.5]}, "m.cells")
    (att,) = s.list_attachments(image, BULK_ANNOTATIONS_NS)
    assert (att.file_id, att.name) == (second, "m.cells")
    with pytest.raises(StoreError, match="differ in length"):
        s.write_table(image, {"id": [1], "x": [1.0, 2.0]}, "bad")


# ----------------------------------------------------------------------------- concurrency
def _worker(kind: str, root: str | None, image_id: int, tag: str, n: int) -> None:
    store = open_store(kind, root)
    try:
        for i in range(n):
            roi = NewRoi((PointShape(float(i), 1.0, f"{tag}-{i}"),))
            store.write_rois(image_id, [roi], NS + "/shared", replace=False)
            store.write_map_annotation(image_id, f"{NS}/{tag}/{i}", {"i": str(i)})
    finally:
        store.close()


def test_concurrent_writers_do_not_lose_records(harness: Harness, image: int) -> None:
    n = 12 if harness.kind == "local" else 4
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(harness.kind, harness.root, image, tag, n))
        for tag in ("a", "b")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rois = harness.store.get_rois(image, NS + "/shared")
    texts = sorted(s.text for r in rois for s in r.shapes)
    assert texts == sorted(f"{t}-{i}" for t in "ab" for i in range(n))
    assert len({r.roi_id for r in rois}) == 2 * n
    anns = [m for m in harness.store.get_map_annotations(image) if m.namespace.count("/") == 3]
    assert len(anns) == 2 * n


def test_local_single_channel_image_reads(tmp_path) -> None:
    """A 1-channel image (the TIFF series has no channel axis) reads like any other."""
    import numpy as np

    from hpc_jobs.stores.local import LocalStore

    store = LocalStore(tmp_path / "store")
    pixels = np.arange(90 * 70, dtype=np.uint16).reshape(1, 90, 70)
    image_id = store.add_image("one-channel", pixels, ["DAPI"])
    assert store.get_image(image_id).size_c == 1
    np.testing.assert_array_equal(
        store.read_region(image_id, 0, 10, 50, 5, 60), pixels[0, 10:50, 5:60]
    )


# ----------------------------------------------------------------------------- OMERO only
@pytest.fixture
def omero_harness() -> Iterator[Harness]:
    if reason := _omero_skip_reason():
        pytest.skip(reason)
    h = Harness("omero", None)
    try:
        yield h
    finally:
        h.close()


def test_omero_multilevel_image(omero_harness: Harness) -> None:
    """A pyramid image: levels counted, every level reads, level 1 is level 0 halved.

    Uses ``OMERO_MULTILEVEL_IMAGE`` (the id of an image the site imported, e.g. a slide
    scan) when set; otherwise creates an image larger than the server's max plane and waits
    (``OMERO_PYRAMID_TIMEOUT`` s) while the server builds its pyramid.
    """
    import time

    from hpc_jobs.stores.omero_pixels import PyramidNotReady

    store = omero_harness.store
    pixels = None
    if os.environ.get("OMERO_MULTILEVEL_IMAGE"):
        image = int(os.environ["OMERO_MULTILEVEL_IMAGE"])
    else:
        max_w, max_h = store.conn.getMaxPlaneSize()  # type: ignore[attr-defined]
        rng = np.random.default_rng(11)
        pixels = rng.integers(0, 4000, size=(1, max_h + 77, max_w + 301), dtype=np.uint16)
        image = omero_harness.make_image(pixels, ["DAPI"])
    deadline = time.monotonic() + float(os.environ.get("OMERO_PYRAMID_TIMEOUT", "900"))
    while True:  # the server builds the pyramid in the background (PixelData service)
        try:
            fresh = open_store("omero", None)  # no cached "not ready" info
            try:
                info = fresh.get_image(image)
                fresh.read_region(image, 0, 0, 1, 0, 1, level=info.levels - 1)
            finally:
                fresh.close()
            break
        except PyramidNotReady as exc:
            assert "retry later" in str(exc)
            assert time.monotonic() < deadline, "pyramid not built in OMERO_PYRAMID_TIMEOUT s"
            time.sleep(10)
    info = store.get_image(image)
    assert info.levels >= 2
    assert [i.levels for i in store.list_images() if i.image_id == image] == [info.levels]
    y1, x1 = min(info.size_y, 2600), min(info.size_x, 3100)
    full = store.read_region(image, 0, 0, y1, 0, x1)  # crosses 2048-px tiles
    assert full.shape == (y1, x1)
    if pixels is not None:
        np.testing.assert_array_equal(full, pixels[0, :y1, :x1])
    whole1 = store.read_region(image, 0, 0, 10**6, 0, 10**6, level=info.levels - 1)
    assert 0 < whole1.size < info.size_x * info.size_y
    h, w = y1 // 2, x1 // 2
    small = store.read_region(image, 0, 0, h, 0, w, level=1)
    assert small.shape == (h, w)
    ref = full[: 2 * h, : 2 * w].astype(float).reshape(h, 2, w, 2).mean(axis=(1, 3))
    assert np.corrcoef(ref.ravel(), small.astype(float).ravel())[0, 1] > 0.5


def test_omero_5000_rois_replaced_twice(omero_harness: Harness, pixels: np.ndarray) -> None:
    """Replace with thousands of ROIs: exactly the last set remains (no silent cancel)."""
    store = omero_harness.store
    image = omero_harness.make_image(pixels, ["DAPI", "CD8"])
    n = 5000
    written = []
    for round_ in range(3):
        rois = [
            NewRoi((PointShape(float(i % 213), float(i % 150), f"r{round_}-{i}"),))
            for i in range(n)
        ]
        written.append(store.write_rois(image, rois, NS))
    got = store.get_rois(image, NS)
    assert len(got) == n
    assert sorted(r.roi_id for r in got) == sorted(written[-1])
    assert {s.text.split("-")[0] for r in got for s in r.shapes} == {"r2"}


def test_omero_write_by_a_user_who_is_not_the_owner(
    omero_harness: Harness, pixels: np.ndarray, tmp_path: Path
) -> None:
    """A second user of the group writes ROIs, a map annotation and a file on the owner's
    image (writes go to the image's group, not the all-groups context)."""
    from hpc_jobs.stores.omero import OmeroStore

    if not (os.environ.get("OMERO_USER2") and os.environ.get("OMERO_PASSWORD2")):
        pytest.skip("needs OMERO_USER2 / OMERO_PASSWORD2: a second member of the image's group")
    owner = omero_harness.store
    image = omero_harness.make_image(pixels, ["DAPI", "CD8"])
    env = _omero_env()
    assert env is not None
    env.update(user=os.environ["OMERO_USER2"], password=os.environ["OMERO_PASSWORD2"])
    other = OmeroStore.login(**env)
    try:
        assert other.get_image(image).size_x == 213
        ids = other.write_rois(image, [NewRoi((PointShape(3.0, 4.0, "by-user2"),))], NS)
        other.write_map_annotation(image, NS, {"by": "user2"})
        f = tmp_path / "report.json"
        f.write_text("{}")
        fid = other.attach_file(image, f, NS, name="renamed.json", mimetype="application/json")
        ids2 = other.write_rois(image, [NewRoi((PointShape(5.0, 6.0, "again"),))], NS)
    finally:
        other.close()
    assert [r.roi_id for r in owner.get_rois(image, NS)] == ids2 and not set(ids) & set(ids2)
    assert [m.values for m in owner.get_map_annotations(image, NS)] == [{"by": "user2"}]
    (att,) = owner.list_attachments(image, NS)
    assert (att.file_id, att.name) == (fid, "renamed.json")
