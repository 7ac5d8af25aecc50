"""Step ``ecdf``: exact per tissue ROI (holes subtracted) histograms, eCDFs and quantiles.

Reads the image's OME-Zarr (written by ``export_zarr``) and its ROIs from the store. Regions,
pixel convention and exactness: see :mod:`hpc_jobs.ecdf_core`. Outputs, in
``<image dir>/ecdf/`` (each replaced atomically):

- ``histograms.parquet``: roi_id, roi, channel, channel_name, value, count (non-zero bins only);
- ``ecdf.parquet``: the same rows plus cum_count and ecdf = F(value) (the eCDF at its jumps);
- ``quantiles.parquet``: one row per ROI and channel: pixels, mean, min, max, q0.01 .. q0.99;
- ``summary.json``: the same per ROI and channel, plus ROI notes (clipped, holes, empty).

With ``attach`` (default) the three tables and the JSON are attached to the image under the
namespace ``omeflow.ecdf`` (replacing earlier ones) and a map annotation in that namespace
carries the main numbers as ``<roi>/<channel>/<key>``.
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import ImageId, Workers

if TYPE_CHECKING:
    import numpy as np

    from hpc_jobs.ecdf_core import Region

NAMESPACE = "omeflow.ecdf"
SCHEMA = "omeflow-ecdf v1"
#: Keys of the map annotation per ROI and channel (quantile keys are p<percent>).
ANNOTATION_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class Params(StepParams):
    """Parameters of ``ecdf``."""

    image_id: ImageId
    channels: list[Annotated[int, Field(ge=0, le=255)]] | None = Field(
        default=None, min_length=1, description="Channels to measure (default: all)."
    )
    level: int = Field(default=0, ge=0, le=16, description="Pyramid level (0 = full size).")
    workers: Workers = None
    attach: bool = Field(
        default=True, description="Attach the results and a map annotation to the image."
    )


def _write_table(df: Any, path: Path) -> None:
    """Write a DataFrame to Parquet atomically, with the schema version in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hpc_jobs.fsutil import atomic_write

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"omeflow.schema"] = SCHEMA.encode()
    buf = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    atomic_write(path, buf.getvalue().to_pybytes(), mode=0o644)


def _write_json(obj: Any, path: Path) -> None:
    import json

    from hpc_jobs.fsutil import atomic_write

    atomic_write(path, json.dumps(obj, indent=1, allow_nan=False) + "\n", mode=0o644)


def build_outputs(
    regions: list[Region],
    hists: np.ndarray,
    channels: list[int],
    channel_names: list[str],
    offset: int,
) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """Histogram, eCDF and quantile tables plus the per-ROI summary records."""
    import numpy as np
    import pandas as pd

    from hpc_jobs import ecdf_core

    hist_parts, q_rows, records = [], [], []
    for i, region in enumerate(regions):
        rec: dict[str, Any] = {
            "roi_id": region.roi_id,
            "roi": region.name,
            "n_shapes": region.n_shapes,
            "n_holes": region.n_holes,
            "notes": list(region.notes),
            "channels": [],
        }
        for j, c in enumerate(channels):
            hist = hists[i, j]
            values, counts, cum, f = ecdf_core.sparse_ecdf(hist, offset)
            hist_parts.append(
                pd.DataFrame(
                    {
                        "roi_id": np.full(values.size, region.roi_id, dtype=np.int64),
                        "roi": region.name,
                        "channel": np.full(values.size, c, dtype=np.int32),
                        "channel_name": channel_names[c],
                        "value": values.astype(np.int64),
                        "count": counts.astype(np.int64),
                        "cum_count": cum.astype(np.int64),
                        "ecdf": f.astype(np.float64),
                    }
                )
            )
            stats = ecdf_core.hist_summary(hist, offset)
            rec["channels"].append({"channel": c, "channel_name": channel_names[c], **stats})
            q_rows.append(
                {
                    "roi_id": region.roi_id,
                    "roi": region.name,
                    "channel": c,
                    "channel_name": channel_names[c],
                    **{k: stats[k] for k in ("pixels", "mean", "min", "max")},
                    **{f"q{k}": v for k, v in stats["quantiles"].items()},
                }
            )
        if rec["channels"] and rec["channels"][0]["pixels"] == 0:
            rec["notes"].append("no pixel centre lies inside this region")
        records.append(rec)
    full = pd.concat(hist_parts, ignore_index=True)
    histograms = full[["roi_id", "roi", "channel", "channel_name", "value", "count"]]
    quantiles = pd.DataFrame(q_rows)
    for col in [c for c in quantiles.columns if c.startswith("q") or c in ("min", "max")]:
        quantiles[col] = quantiles[col].astype("Int64")
    return histograms, full, quantiles, records


def annotation_values(records: list[dict[str, Any]], level: int) -> dict[str, str]:
    """Map-annotation key/values: ``<roi>/<channel>/{pixels,mean,p5,...}`` as strings."""
    values = {"schema": SCHEMA, "level": str(level)}
    for rec in records:
        for ch in rec["channels"]:
            key = f"{rec['roi']}/{ch['channel_name']}"
            values[f"{key}/pixels"] = str(ch["pixels"])
            values[f"{key}/mean"] = "" if ch["mean"] is None else f"{ch['mean']:.3f}"
            for q in ANNOTATION_QUANTILES:
                v = ch["quantiles"][f"{q:g}"]
                values[f"{key}/p{q * 100:g}"] = "" if v is None else str(v)
    return values


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Compute the histograms, eCDFs and quantiles of every tissue ROI of one image."""
    import numpy as np

    from hpc_jobs import ecdf_core, ngff
    from hpc_jobs.fsutil import file_lock

    t0 = time.perf_counter()
    image_dir = ctx.image_dir(params.image_id)
    path = ngff.image_zarr_path(image_dir)
    # a reader of the image's Zarr: shared with other readers, never during a re-export
    with ctx.lock_image(params.image_id, exclusive=False, purpose="ecdf"), closing(
        ctx.open_store()
    ) as store:
        info = store.get_image(params.image_id)
        channels = list(range(info.size_c)) if params.channels is None else params.channels
        if not channels:
            raise ValueError("channels=[] selects nothing; leave it out to measure all channels")
        for c in channels:
            info.check_channel(c)
        if not path.exists():
            raise ngff.ZarrLayoutError(
                f"image {params.image_id} has no OME-Zarr at {path}: run export_zarr for image "
                f"{params.image_id} first"
            )
        group = ngff.open_image(path)
        if group.attrs.get("omeflow", {}).get("complete") is False:
            raise ngff.ZarrLayoutError(
                f"the export of image {params.image_id} to {path} is incomplete: rerun "
                "export_zarr (it resumes where it stopped)"
            )
        level0 = ngff.open_level(path, 0)
        if tuple(level0.shape) != (info.size_c, info.size_y, info.size_x):
            raise ngff.ZarrLayoutError(
                f"{path} has shape {tuple(level0.shape)} but image {params.image_id} is "
                f"{(info.size_c, info.size_y, info.size_x)} (c, y, x): rerun export_zarr with "
                "overwrite=true"
            )
        arr = ngff.open_level(path, params.level)
        offset, _ = ecdf_core.histogram_bins(arr.dtype)
        regions = ecdf_core.tissue_regions(
            store.get_rois(params.image_id), info.size_x, info.size_y
        )
        scale = 2.0**-params.level
        geoms = [
            (ecdf_core.scale_geometry(r.tissue, scale), ecdf_core.scale_geometry(r.holes, scale))
            for r in regions
        ]
        block = int((arr.shards or arr.chunks)[1])
        workers = params.workers or ctx.cpus
        sel = np.asarray(channels)
        whole = channels == list(range(info.size_c))

        blocks = len(ngff.blocks(tuple(arr.shape[1:]), block))
        reporter = ctx.progress("blocks", total=blocks, message="histograms")

        def read_block(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            reporter.advance()
            if whole:
                return np.asarray(arr[:, y0:y1, x0:x1])
            return np.asarray(arr.get_orthogonal_selection((sel, slice(y0, y1), slice(x0, x1))))

        ctx.log(
            f"ecdf image {params.image_id}: {len(regions)} tissue ROI(s), channels {channels}, "
            f"level {params.level} {tuple(arr.shape)}, block {block}, {workers} workers"
        )
        hists, counters = ecdf_core.region_histograms(
            read_block, tuple(arr.shape[1:]), arr.dtype, geoms, len(channels), block, workers
        )
        reporter.update(blocks)  # blocks outside every region are never read
        reporter.finish("eCDF tables")
        names = list(info.channel_names) or [f"c{i}" for i in range(info.size_c)]
        histograms, full, quantiles, records = build_outputs(
            regions, hists, channels, names, offset
        )
        out_dir = image_dir / "ecdf"
        out_dir.mkdir(exist_ok=True)
        # another run computing this image's eCDF now: write the four files as one set
        with file_lock(out_dir / ".write-lock"):
            files = {
                "histograms": out_dir / "histograms.parquet",
                "ecdf": out_dir / "ecdf.parquet",
                "quantiles": out_dir / "quantiles.parquet",
                "summary": out_dir / "summary.json",
            }
            _write_table(histograms, files["histograms"])
            _write_table(full, files["ecdf"])
            _write_table(quantiles, files["quantiles"])
            _write_json(
                {
                    "schema": SCHEMA,
                    "image_id": params.image_id,
                    "level": params.level,
                    "dtype": str(arr.dtype),
                    "pixel_rule": "pixel (row r, col c) is in a region iff its centre "
                    "(x, y) = (c + 0.5, r + 0.5) is inside the union of the ROI's tissue_ "
                    "shapes (shapely.contains_xy) and in no hole_ shape "
                    "(not shapely.intersects_xy)",
                    "quantile_rule": "smallest value v with F(v) >= q (inverted_cdf)",
                    "rois": records,
                },
                files["summary"],
            )
            for rec in records:
                for note in rec["notes"]:
                    ctx.log(f"ROI {rec['roi_id']} {rec['roi']!r}: {note}")
            attachments: dict[str, int] = {}
            if params.attach:
                for key, fpath in files.items():
                    mimetype = "application/json" if fpath.suffix == ".json" else (
                        "application/vnd.apache.parquet"
                    )
                    attachments[key] = store.attach_file(
                        params.image_id, fpath, namespace=NAMESPACE, mimetype=mimetype,
                        replace=True,
                    )
                store.write_map_annotation(
                    params.image_id, NAMESPACE, annotation_values(records, params.level),
                    replace=True,
                )
    seconds = time.perf_counter() - t0
    pixels = int(hists[:, 0].sum())
    summary = {
        "image_id": params.image_id,
        "level": params.level,
        "channels": channels,
        "rois": [
            {"roi_id": r["roi_id"], "roi": r["roi"], "pixels": r["channels"][0]["pixels"]}
            for r in records
        ],
        "blocks_read": counters["blocks"],
        "region_pixels": pixels,
        "outputs": {k: str(v) for k, v in files.items()},
        "attachments": attachments,
        "seconds": round(seconds, 3),
    }
    ctx.log(f"ecdf done: {summary}")
    return summary
