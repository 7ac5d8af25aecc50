"""Step ``select_candidates``: nuclei for people to label, and their crops.

Reads what the landed steps wrote for the image (nothing is recomputed):

- ``<image dir>/nuclei.parquet`` (``segment_nuclei``): id, x, y, area, ``c<k>_<stat>``;
- ``<image dir>/image.zarr/labels/nuclei`` (``segment_nuclei``): the label image;
- ``<image dir>/ecdf/histograms.parquet`` (``ecdf``): per tissue ROI and channel histograms;
- ``<image dir>/image.zarr`` (``export_zarr``): the pixels the crops show;
- the image's ROIs from the store (the same tissue regions as ``ecdf``).

Rule. A nucleus counts when its centroid lies in a tissue ROI (pixel-centre convention of
:mod:`hpc_jobs.ecdf_core`: the point ``(x + 0.5, y + 0.5)`` is inside the tissue union and
in no hole; a nucleus in two overlapping ROIs belongs to the first). It is a candidate when
its marker statistic (``c<marker>_<statistic>``) is strictly above the ROI's threshold:

- ``rule="quantile"``: the ``quantile``-th quantile of that ROI's marker eCDF (the smallest
  value ``v`` with ``F(v) >= q``), so that thresholds are comparable across slides;
- ``rule="fixed"``: ``threshold`` for every ROI (the original CellDetector used 200).

More than ``max_candidates`` are sampled down reproducibly (``seed``). The rule, its params
and the threshold per ROI are in the summary.

Outputs in the job's ``outputs/``: ``crops.<nnnn>.json`` chunks (candidate rows + PNGs, see
:mod:`hpc_jobs.crops`), each fetched by the gateway's ``result`` verb; the chunk names are
listed in ``summary.json``.
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Any, Literal

from pydantic import Field, model_validator

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import DapiChannel, ImageId, MarkerChannel

#: Zoom factors rendered per candidate (zoom k covers k x crop_size level-0 px).
ZOOMS = (1, 2)


class Params(StepParams):
    """Parameters of ``select_candidates`` (also the Airflow trigger form)."""

    image_id: ImageId
    marker_channel: MarkerChannel = -1
    dapi_channel: DapiChannel = 0
    statistic: Literal["mean", "median"] = Field(
        "mean", description="Per-nucleus marker statistic (window statistics of segment_nuclei)."
    )
    rule: Literal["quantile", "fixed"] = Field(
        "quantile",
        description="quantile: statistic above the q-th quantile of the tissue ROI's marker "
        "eCDF (comparable across slides); fixed: statistic above `threshold`.",
    )
    quantile: float = Field(
        0.95, gt=0, lt=1, description="q of the quantile rule (e.g. 0.95)."
    )
    threshold: float = Field(
        200.0, ge=0, description="Threshold of the fixed rule (the original CellDetector: 200)."
    )
    max_candidates: int = Field(
        5000, ge=1, le=100000,
        description="At most this many candidates per image (a reproducible random sample).",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the sample above the cap.")
    crop_size: int = Field(
        64, ge=16, le=256, multiple_of=8,
        description="Edge (px) of every crop PNG; the close-up covers crop_size level-0 px, "
        "the wide view twice that.",
    )
    display_low: float = Field(
        0.01, ge=0, lt=1, description="eCDF quantile shown as black (per ROI and channel)."
    )
    display_high: float = Field(
        0.995, gt=0, le=1, description="eCDF quantile shown as full brightness."
    )

    @model_validator(mode="after")
    def _display_range(self) -> Params:
        if self.display_low >= self.display_high:
            raise ValueError(f"display_low={self.display_low} must be below display_high="
                             f"{self.display_high} (e.g. 0.01 and 0.995)")
        return self


def _fail_missing(path: Any, image_id: int, step: str) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"image {image_id} has no {path.name} at {path}: run {step} for image {image_id} "
            "first (celldetector_preprocess)"
        )


def load_histograms(path: Any, channels: list[int], dtype: str) -> dict[tuple[int, int], Any]:
    """Dense histograms ``{(roi_id, channel): counts over the dtype range}`` from ``ecdf``
    (bin ``i`` holds value ``i + offset``, ``ecdf_core.histogram_bins``)."""
    import numpy as np
    import pandas as pd

    from hpc_jobs import ecdf_core

    df = pd.read_parquet(path, columns=["roi_id", "channel", "value", "count"])
    df = df[df.channel.isin(channels)]
    offset, n_bins = ecdf_core.histogram_bins(dtype)
    out: dict[tuple[int, int], Any] = {}
    for (roi_id, channel), sub in df.groupby(["roi_id", "channel"]):
        hist = np.zeros(n_bins, dtype=np.int64)
        hist[sub.value.to_numpy() - offset] = sub["count"].to_numpy()
        out[(int(roi_id), int(channel))] = hist
    return out


def assign_rois(x: Any, y: Any, regions: list[Any]) -> Any:
    """Index into ``regions`` of the first region holding each centroid, -1 for none."""
    import numpy as np
    import shapely

    px, py = np.asarray(x, dtype=np.float64) + 0.5, np.asarray(y, dtype=np.float64) + 0.5
    roi = np.full(px.shape, -1, dtype=np.int64)
    for i, region in enumerate(regions):
        inside = shapely.contains_xy(region.tissue, px, py)
        if region.holes is not None:
            inside &= ~shapely.intersects_xy(region.holes, px, py)
        roi[(roi < 0) & inside] = i
    return roi


def _empty_roi_warnings(
    thresholds: list[dict[str, Any]], params: Params, stat: Any, roi_index: Any
) -> list[str]:
    """One line per tissue ROI with nuclei but no candidate, naming what to change.

    A window mean rarely reaches a high quantile of the tissue's *pixel* eCDF: with the lab's
    101 px window the marker signal of one cell is diluted by its surroundings.
    """
    out = []
    for i, row in enumerate(thresholds):
        if row["nuclei"] == 0 or row["candidates"] > 0 or row["threshold"] is None:
            continue
        top = float(stat[roi_index == i].max())
        how = (f"q={params.quantile} of its marker eCDF" if params.rule == "quantile"
               else "the fixed threshold")
        out.append(
            f"no nucleus of ROI {row['roi']!r} ({row['nuclei']} nuclei) has a marker "
            f"{params.statistic} above {row['threshold']:g} ({how}); the highest is {top:g}. "
            "If the ROI should have candidates: lower `quantile`, use rule='fixed' with a lower "
            "`threshold`, or segment with a smaller statistics `window` (segment_nuclei)"
        )
    return out


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Select the candidates of one image and render their crops into chunk files."""
    import numpy as np
    import pandas as pd

    from hpc_jobs import crops, ecdf_core, ngff

    t0 = time.perf_counter()
    image_dir = ctx.image_dir(params.image_id)
    zarr_path = ngff.image_zarr_path(image_dir)
    table_path = image_dir / "nuclei.parquet"
    hist_path = image_dir / "ecdf" / "histograms.parquet"
    labels_path = zarr_path / "labels" / "nuclei"
    with ctx.lock_image(params.image_id, exclusive=False, purpose="select_candidates"), closing(
        ctx.open_store()
    ) as store:
        info = store.get_image(params.image_id)
        marker = info.size_c - 1 if params.marker_channel == -1 else params.marker_channel
        info.check_channel(marker, "marker_channel")
        info.check_channel(params.dapi_channel, "dapi_channel")
        for path, step in ((zarr_path, "export_zarr"), (table_path, "segment_nuclei"),
                           (labels_path, "segment_nuclei"), (hist_path, "ecdf")):
            _fail_missing(path, params.image_id, step)
        regions = ecdf_core.tissue_regions(
            store.get_rois(params.image_id), info.size_x, info.size_y
        )
        table = pd.read_parquet(table_path)
        column = f"c{marker}_{params.statistic}"
        if column not in table.columns:
            raise ValueError(
                f"{table_path} has no column {column!r} (marker_channel={marker}): rerun "
                "segment_nuclei for this image"
            )
        channels = list(range(info.size_c))
        hists = load_histograms(hist_path, channels, info.dtype)
        offset, _ = ecdf_core.histogram_bins(info.dtype)
        missing = [r.roi_id for r in regions if (r.roi_id, marker) not in hists]
        if missing:
            raise ValueError(
                f"the eCDF of image {params.image_id} has no ROI(s) {missing} (channel "
                f"{marker}): the ROIs changed since it ran; rerun ecdf for this image"
            )
        roi_index = assign_rois(table.x.to_numpy(), table.y.to_numpy(), regions)
        stat = table[column].to_numpy(dtype=np.float64)
        thresholds: list[dict[str, Any]] = []
        selected = np.zeros(len(table), dtype=bool)
        for i, region in enumerate(regions):
            hist = hists[(region.roi_id, marker)]
            if params.rule == "quantile":
                thr = ecdf_core.quantile_from_hist(hist, params.quantile, offset)
            else:
                thr = params.threshold
            in_roi = roi_index == i
            chosen = in_roi & (stat > thr) if thr is not None else np.zeros_like(in_roi)
            selected |= chosen
            thresholds.append({
                "roi_id": region.roi_id, "roi": region.name, "threshold": thr,
                "nuclei": int(in_roi.sum()), "candidates": int(chosen.sum()),
            })
        warnings = _empty_roi_warnings(thresholds, params, stat, roi_index)
        for warning in warnings:
            ctx.log(f"WARNING: {warning}")
        rows = np.flatnonzero(selected)
        eligible = int(rows.size)
        if rows.size > params.max_candidates:
            rng = np.random.default_rng(params.seed)
            rows = np.sort(rng.choice(rows, size=params.max_candidates, replace=False))
        ctx.log(
            f"select_candidates image {params.image_id}: {len(table)} nuclei, "
            f"{int((roi_index >= 0).sum())} in {len(regions)} tissue ROI(s), {eligible} above "
            f"the threshold ({params.rule}), {rows.size} kept; marker channel {marker}"
        )
        def level(roi_id: int, c: int, q: float) -> float:
            hist = hists.get((roi_id, c))
            v = None if hist is None else ecdf_core.quantile_from_hist(hist, q, offset)
            return 0.0 if v is None else float(v)

        displays = {
            region.roi_id: crops.Display(
                lo=[level(region.roi_id, c, params.display_low) for c in channels],
                hi=[level(region.roi_id, c, params.display_high) for c in channels],
            )
            for region in regions
        }
        picked = table.iloc[rows].reset_index(drop=True)
        picked.insert(0, "roi_id", [regions[int(k)].roi_id for k in roi_index[rows]])
        picked.insert(1, "roi", [regions[int(k)].name for k in roi_index[rows]])
        picked.insert(2, "marker_value", stat[rows])
        t_select = time.perf_counter() - t0

        arr = ngff.open_level(zarr_path, 0)
        lab_arr = ngff.open_level(labels_path, 0)
        if tuple(lab_arr.shape) != tuple(arr.shape[1:]):
            raise ValueError(f"{labels_path} is {tuple(lab_arr.shape)} but the image is "
                             f"{tuple(arr.shape[1:])}: rerun segment_nuclei")
        block = int((arr.shards or arr.chunks)[1])

        def read(y0: int, y1: int, x0: int, x1: int) -> tuple[Any, Any]:
            return np.asarray(arr[:, y0:y1, x0:x1]), np.asarray(lab_arr[y0:y1, x0:x1])

        half = max(ZOOMS) * params.crop_size // 2
        writer = crops.ChunkWriter(ctx.outputs)
        records = picked.to_dict(orient="records")
        centres = picked[["y", "x"]].to_numpy(dtype=np.float64)
        reporter = ctx.progress("crops", total=len(records), message="rendering crops")
        reporter.update(0, force=True)
        for i, px, lab in crops.windows(read, tuple(arr.shape[1:]), centres, half, block):
            reporter.advance()
            row = {k: _plain(v) for k, v in records[i].items()}
            row["crops"] = crops.render(
                px, lab, int(row["id"]), displays[row["roi_id"]], params.crop_size, ZOOMS,
                params.dapi_channel, marker,
            )
            writer.add(row)
        writer.flush()
        reporter.finish("crops written")
    seconds = time.perf_counter() - t0
    summary = {
        "image_id": params.image_id,
        "job_id": ctx.job_key,
        "rule": params.rule,
        "rule_params": {
            "statistic": params.statistic, "column": column, "marker_channel": marker,
            **({"quantile": params.quantile} if params.rule == "quantile"
               else {"threshold": params.threshold}),
            "max_candidates": params.max_candidates, "seed": params.seed,
        },
        "thresholds": thresholds,
        "warnings": warnings,
        "nuclei": len(table),
        "eligible": eligible,
        "candidates": int(rows.size),
        "channel_names": list(info.channel_names),
        "display": {"low": params.display_low, "high": params.display_high,
                    "ranges": {str(k): {"lo": list(d.lo), "hi": list(d.hi)}
                               for k, d in displays.items()}},
        "crops": {"size": params.crop_size, "zooms": list(ZOOMS), "schema": crops.CHUNK_SCHEMA,
                  "chunks": writer.names, "bytes": writer.bytes_written},
        "select_s": round(t_select, 3),
        "render_s": round(seconds - t_select, 3),
        "seconds": round(seconds, 3),
    }
    ctx.log(f"select_candidates done: {rows.size} candidates in {len(writer.names)} chunk(s), "
            f"{seconds:.1f}s")
    return summary


def _plain(value: Any) -> Any:
    """A JSON-able Python value for a numpy / pandas scalar (NaN -> None)."""
    import math

    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
