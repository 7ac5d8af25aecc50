"""writeback on a small synthetic slide with a given predictions table (the truth's classes).

Real LocalStore, real steps; expected densities are computed here from the truth's polygons
(shapely) and the truth table, with nothing from ``hpc_jobs.density``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import shapely

from hpc_jobs.predictions import namespace_for, predictions_path
from hpc_jobs.steps import writeback
from hpc_jobs.stores.base import (
    BULK_ANNOTATIONS_NS,
    NewRoi,
    PointShape,
    PolygonShape,
    StoreError,
)
from hpc_jobs.stores.local import LocalStore
from tests.science.predict_slide import context, prepare_slide

MODEL = "cd8-test"
#: A person's annotation in another namespace-less ROI: never touched by writeback.
LAB_NOTE = ((10.0, 10.0), (40.0, 10.0), (40.0, 40.0))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    s = prepare_slide(tmp_path_factory.mktemp("writeback"))
    truth = s["truth"]
    pos = truth["positive"].to_numpy(bool)
    preds = pd.DataFrame({"id": truth["id"].astype("int64"), "x": truth["x"], "y": truth["y"],
                          "probability": np.where(pos, 0.9, 0.1),
                          "class": np.where(pos, "positive", "negative"), "positive": pos})
    path = predictions_path(s["image_dir"], MODEL)
    path.parent.mkdir(parents=True, exist_ok=True)
    preds.to_parquet(path, index=False)
    with LocalStore(context(s["root"], "x").site.store.path) as store:
        store.add_roi(s["image_id"], PolygonShape(LAB_NOTE, "lab note"), name="lab note")
    s["preds"] = preds
    return s


def _store(slide: dict[str, Any]) -> LocalStore:
    return LocalStore(context(slide["root"], "x").site.store.path)


def _run(slide: dict[str, Any], job: str, **kw: Any) -> dict[str, Any]:
    params = writeback.Params(image_id=slide["image_id"], classifier=MODEL, **kw)
    return writeback.run(params, context(slide["root"], job))


def test_twice_leaves_one_set_and_the_lab_rois(slide: dict[str, Any]) -> None:
    image_id, ns = slide["image_id"], namespace_for(MODEL)
    with _store(slide) as store:
        lab_before = [r for r in store.get_rois(image_id) if r.namespace is None]
        n_images = len(store.list_images())
    first = _run(slide, "wb1")
    second = _run(slide, "wb2")
    n_pos = int(slide["preds"]["positive"].sum())
    assert n_pos > 0 and first["rois"] == second["rois"] == n_pos
    with _store(slide) as store:
        mine = store.get_rois(image_id, ns)
        assert len(mine) == n_pos  # exactly one set, the second run's
        table_ids = _table(store, image_id)["roi_id"]
        assert {r.roi_id for r in mine} == set(table_ids[table_ids >= 0])
        got = sorted((s.x, s.y) for r in mine for s in r.shapes)
        want = sorted(zip(slide["preds"]["x"][slide["preds"]["positive"]],
                          slide["preds"]["y"][slide["preds"]["positive"]], strict=True))
        assert np.allclose(got, want)
        assert all(s.text.startswith("positive p=0.9") for r in mine for s in r.shapes)
        assert [r for r in store.get_rois(image_id) if r.namespace is None] == lab_before
        assert any(s.text.startswith("tissue_") for r in lab_before for s in r.shapes)
        assert len(store.list_images()) == n_images
        tables = store.list_attachments(image_id, BULK_ANNOTATIONS_NS)
        assert [a.name for a in tables] == [f"{MODEL}.cells"]


def _table(store: LocalStore, image_id: int) -> pd.DataFrame:
    (att,) = store.list_attachments(image_id, BULK_ANNOTATIONS_NS)
    return pd.read_parquet(io.BytesIO(store.read_attachment(image_id, att.file_id)))


def test_per_cell_table_has_every_nucleus(slide: dict[str, Any]) -> None:
    _run(slide, "wb-table")
    with _store(slide) as store:
        table = _table(store, slide["image_id"])
    assert list(table.columns) == ["id", "x", "y", "probability", "class", "roi_id"]
    assert len(table) == len(slide["truth"])
    assert ((table["roi_id"] >= 0) == (table["class"] == "positive")).all()


def test_polygon_outlines_cover_their_nucleus(slide: dict[str, Any]) -> None:
    _run(slide, "wb-poly", shape="polygon")
    labels, preds = slide["labels"], slide["preds"]
    with _store(slide) as store:
        rois = store.get_rois(slide["image_id"], namespace_for(MODEL))
    assert len(rois) == int(preds["positive"].sum())
    for roi in rois:
        (shape,) = roi.shapes
        assert isinstance(shape, PolygonShape)
        nid = int(roi.name.rsplit(" ", 1)[1])
        area = float(np.count_nonzero(labels == nid))
        poly = shapely.Polygon(shape.points)
        # the traced outline has the nucleus' pixel area within its boundary's half pixel
        assert abs(poly.area - area) <= 0.5 * poly.length + 1, (nid, poly.area, area)
    _run(slide, "wb-point-again")  # back to points: still one set
    with _store(slide) as store:
        rois = store.get_rois(slide["image_id"], namespace_for(MODEL))
    assert all(isinstance(s, PointShape) for r in rois for s in r.shapes)


def test_densities_equal_a_hand_computation(slide: dict[str, Any]) -> None:
    summary = _run(slide, "wb-dens")
    regions, truth = slide["regions"], slide["truth"]
    holes = [shapely.Polygon(h["points"]) for h in regions["holes"]]
    frame = shapely.box(0, 0, regions["width"], regions["height"])
    want = {}
    for t in regions["tissues"]:
        geom = shapely.Polygon(t["points"])
        for h in holes:
            if geom.intersects(h):
                geom = geom.difference(h)
        geom = geom.intersection(frame)
        inside = shapely.contains_xy(geom, truth["x"] + 0.5, truth["y"] + 0.5)
        positives = int((inside & truth["positive"].to_numpy(bool)).sum())
        area_mm2 = geom.area * 0.5 * 0.5 / 1e6
        want[t["name"]] = (positives, area_mm2, positives / area_mm2)
    assert any(h["inside"] for h in regions["holes"])  # the slide really has a hole
    got = {d["name"]: (d["positives"], d["area_mm2"], d["positives_per_mm2"])
           for d in summary["densities"]}
    assert got.keys() == want.keys()
    for name, (p, a, d) in want.items():
        assert got[name][0] == p and p > 0
        assert got[name][1] == pytest.approx(a, rel=1e-9)
        assert got[name][2] == pytest.approx(d, rel=1e-9)
    ns = namespace_for(MODEL)
    with _store(slide) as store:
        (ann,) = store.get_map_annotations(slide["image_id"], ns)
        files = {a.name: a for a in store.list_attachments(slide["image_id"], ns)}
        text = store.read_attachment(slide["image_id"], files[f"{MODEL}.densities.csv"].file_id)
    for name, (p, _, d) in want.items():
        assert ann.values[f"{name} positives"] == str(p)
        assert float(ann.values[f"{name} positives/mm2"]) == pytest.approx(d, rel=1e-3)
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(text.decode()))}
    assert {n: int(r["positives"]) for n, r in rows.items()} == {n: w[0] for n, w in want.items()}
    # the plot people see in OMERO.web: a PNG attached beside the CSV, one bar per tissue ROI
    assert summary["plot"] == f"{MODEL}.densities.png"
    with _store(slide) as store:
        png = store.read_attachment(slide["image_id"], files[summary["plot"]].file_id)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_no_pixel_size_names_the_fix(tmp_path: Path) -> None:
    from hpc_jobs.density import PixelSizeMissing, mm2_per_px
    from hpc_jobs.stores.base import ImageInfo

    info = ImageInfo(7, "slide", 10, 10, 2, "uint16", ("DAPI", "CD8"))
    with pytest.raises(PixelSizeMissing, match="set the pixel size in OMERO.*densities=false"):
        mm2_per_px(info)


class _DeleteFailsAfterOneBatch(LocalStore):
    """A LocalStore whose delete dies after its first batch (a crash mid-way)."""

    def delete_rois(self, image_id: int, roi_ids: Any, batch: int = 1) -> None:
        ids = list(roi_ids)
        super().delete_rois(image_id, ids[:1], batch=1)
        raise StoreError("connection lost")


def test_replace_writes_new_first_then_deletes_old(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "store") as plain:
        image_id = plain.add_image("a", np.zeros((1, 16, 16), np.uint16))
        plain.add_roi(image_id, PointShape(1, 1, "tissue_person"))
        old = plain.write_rois(image_id, [NewRoi((PointShape(i, i, "old"),)) for i in range(3)],
                               "omeflow.celldetector/m")
    with _DeleteFailsAfterOneBatch(tmp_path / "store") as store:
        with pytest.raises(StoreError, match="connection lost"):
            store.write_rois(image_id, [NewRoi((PointShape(5, 5, "new"),))],
                             "omeflow.celldetector/m")
        texts = [s.text for r in store.get_rois(image_id, "omeflow.celldetector/m")
                 for s in r.shapes]
        assert texts.count("new") == 1  # the new result is there although the delete died
        assert texts.count("old") == len(old) - 1
        assert [s.text for r in store.get_rois(image_id) if r.namespace is None
                for s in r.shapes] == ["tissue_person"]
    with LocalStore(tmp_path / "store") as plain:  # a re-run cleans up
        plain.write_rois(image_id, [NewRoi((PointShape(6, 6, "new"),))], "omeflow.celldetector/m")
        assert [s.text for r in plain.get_rois(image_id, "omeflow.celldetector/m")
                for s in r.shapes] == ["new"]
