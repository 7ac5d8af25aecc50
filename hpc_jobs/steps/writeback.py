"""Step ``writeback``: a model's predictions back to the image store, for people to see.

Reads ``predictions/<model>.parquet`` (written by ``predict``) and writes, all under the
namespace ``omeflow.celldetector/<model>`` (:func:`hpc_jobs.predictions.namespace_for`):

- one ROI per predicted positive: a point at the nucleus centre, or (``shape="polygon"``) the
  nucleus outline traced in the level-0 labels; text ``<class> p=<probability>``;
  re-running replaces the namespace's ROIs (the store saves the new ones first, then deletes
  the older ones in batches), never touching ROIs outside the namespace (the lab's
  ``tissue_`` / ``hole_`` drawings);
- the per-cell table (``id, x, y, probability, class, roi_id``; ``roi_id`` -1 for negatives)
  as ``<model>.cells`` under the bulk-annotations namespace (OMERO.tables on OMERO, Parquet in
  the local store);
- with ``densities``: positives per mm² in each tissue ROI (holes subtracted,
  :mod:`hpc_jobs.density`) as a map annotation, a CSV and a PNG bar plot.

The image itself is never written or copied.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import ImageId, ModelName


class Params(StepParams):
    """Parameters of ``writeback`` (also the Airflow trigger form)."""

    image_id: ImageId
    classifier: ModelName
    shape: Literal["point", "polygon"] = Field(
        "point", description="ROI per positive cell: a point, or the nucleus outline.")
    densities: bool = Field(True, description="Positive cells per mm² per tissue ROI (needs "
                            "the image's physical pixel size).")
    run_label: str = Field("", max_length=200, description="Recorded with the results "
                           "(e.g. the Airflow run id).")


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Write the ROIs, the per-cell table and the densities of one image; return a summary."""
    import numpy as np

    from hpc_jobs.predictions import namespace_for, read_predictions

    t0 = time.perf_counter()
    image_dir = ctx.image_dir(params.image_id)
    ns = namespace_for(params.classifier)
    summary: dict[str, Any] = {"image_id": params.image_id, "model": params.classifier,
                               "namespace": ns, "shape": params.shape}
    with ctx.lock_image(params.image_id, exclusive=False, purpose="writeback"), \
            ctx.open_store() as store:
        # what is written to the store, one part at a time: ROIs, cell table, densities
        parts = ctx.progress("parts", total=3 if params.densities else 2, message="ROIs")
        parts.update(0, force=True)
        info = store.get_image(params.image_id)
        df = read_predictions(image_dir, params.classifier, params.image_id)
        pos = df["positive"].to_numpy(dtype=bool)
        rois = _positive_rois(df[pos], params, image_dir, ctx)
        if params.densities:  # fail on a missing pixel size before writing anything
            from hpc_jobs.density import mm2_per_px

            mm2_per_px(info)
        parts.update(message=f"writing {len(rois)} ROIs", force=True)
        roi_ids = store.write_rois(params.image_id, rois, ns, replace=True)
        parts.update(1, message="cell table", force=True)
        roi_col = np.full(len(df), -1, dtype=np.int64)
        roi_col[pos] = roi_ids
        table = {"id": df["id"].to_numpy(np.int64), "x": df["x"].to_numpy(np.float64),
                 "y": df["y"].to_numpy(np.float64),
                 "probability": df["probability"].to_numpy(np.float64),
                 "class": [str(c) for c in df["class"]], "roi_id": roi_col}
        table_id = store.write_table(params.image_id, table, f"{params.classifier}.cells")
        summary.update({"cells": len(df), "positives": int(pos.sum()), "rois": len(roi_ids),
                        "table_id": table_id})
        if params.densities:
            parts.update(2, message="densities", force=True)
            summary.update(_write_densities(store, info, df, pos, params, ns, ctx))
        parts.update(3 if params.densities else 2)
        parts.finish("written")
    ctx.log(f"writeback: image {params.image_id}: {summary['positives']} positive of "
            f"{summary['cells']} nuclei as {params.shape} ROIs under {ns}")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _positive_rois(pos_df: Any, params: Params, image_dir: Any, ctx: StepContext) -> list:
    from hpc_jobs.stores.base import NewRoi, PointShape, PolygonShape

    texts = [f"{c} p={p:.3f}" for c, p in zip(pos_df["class"], pos_df["probability"],
                                                strict=True)]
    names = [f"{params.classifier} nucleus {int(i)}" for i in pos_df["id"]]
    if params.shape == "point":
        return [NewRoi((PointShape(float(x), float(y), t),), n)
                for x, y, t, n in zip(pos_df["x"], pos_df["y"], texts, names, strict=True)]
    from hpc_jobs.outlines import nucleus_outlines

    outlines = nucleus_outlines(image_dir, pos_df["id"].to_numpy(), pos_df["x"].to_numpy(),
                                pos_df["y"].to_numpy())
    out = []
    for (nid, pts), t, n, x, y in zip(outlines, texts, names, pos_df["x"], pos_df["y"],
                                      strict=True):
        if pts is None:  # not found in the labels (should not happen): keep it as a point
            ctx.log(f"writeback: nucleus {nid} not found in the labels; written as a point")
            out.append(NewRoi((PointShape(float(x), float(y), t),), n))
        else:
            out.append(NewRoi((PolygonShape(pts, t),), n))
    return out


def _write_densities(store: Any, info: Any, df: Any, pos: Any, params: Params, ns: str,
                     ctx: StepContext) -> dict[str, Any]:
    import csv

    from hpc_jobs.density import COLUMNS, region_densities

    dens = region_densities(info, store.get_rois(params.image_id), df["x"].to_numpy(),
                            df["y"].to_numpy(), pos)
    values = {"model": params.classifier, "run": params.run_label}
    for d in dens:
        key = d.name or f"roi {d.roi_id}"
        values[f"{key} positives/mm2"] = f"{d.positives_per_mm2:.4g}"
        values[f"{key} positives"] = str(d.positives)
        values[f"{key} cells"] = str(d.cells)
        values[f"{key} area mm2"] = f"{d.area_mm2:.6g}"
    store.write_map_annotation(params.image_id, ns, values)
    out_dir = ctx.outputs
    csv_path = out_dir / f"{params.classifier}.densities.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        w.writeheader()
        for d in dens:
            w.writerow(d.row())
    store.attach_file(params.image_id, csv_path, ns, mimetype="text/csv")
    result: dict[str, Any] = {"densities": [d.row() for d in dens]}
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3, 0.8 * len(dens) + 2), 3), dpi=100)
    ax.bar([d.name or str(d.roi_id) for d in dens], [d.positives_per_mm2 for d in dens])
    ax.set_ylabel("positive cells / mm²")
    ax.set_title(f"image {params.image_id}, {params.classifier}")
    fig.tight_layout()
    png = out_dir / f"{params.classifier}.densities.png"
    fig.savefig(png)
    plt.close(fig)
    store.attach_file(params.image_id, png, ns, mimetype="image/png")
    result["plot"] = png.name
    return result
