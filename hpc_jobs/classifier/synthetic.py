"""Synthetic training slides for tests and benchmarks of the classifier.

:func:`prepare_slide` generates a slide (``hpc_jobs.synth``, usually with decoys) into the
site's local store, runs the real ``export_zarr`` and ``ecdf`` steps, and writes the image's
``nuclei.parquet`` from the synthetic *truth* positions instead of running Cellpose (a
stand-in for ``segment_nuclei`` that keeps CI small; segmentation has its own tests). The
marker mean column (``c<marker>_mean``) is computed from the exported pixels in a
``window`` x ``window`` box, like ``segment_nuclei``'s statistics.

:func:`truth_labels` is a stand-in for people: the truth class of every nucleus whose marker
mean passes ``min_marker_mean`` (a preselection like the candidates').
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from hpc_jobs.steps.base import StepContext
    from hpc_jobs.synth import SynthSpec


def prepare_slide(ctx: StepContext, spec: SynthSpec, truth_dir: Path, window: int = 21,
                  block: int = 256) -> tuple[int, pd.DataFrame]:
    """``(image_id, truth table with a marker_mean column)`` of a new preprocessed slide."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hpc_jobs import ngff
    from hpc_jobs.steps import ecdf, export_zarr
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import generate

    with LocalStore(ctx.site.store.path) as store:
        image_id = generate(spec, store, truth_dir, tile=256)["image_id"]
    export_zarr.run(export_zarr.Params(image_id=image_id, block_size=block), ctx)
    ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    image_dir = ctx.image_dir(image_id)
    marker_c = spec.channels - 1
    marker = np.asarray(ngff.open_level(ngff.image_zarr_path(image_dir), 0)[marker_c],
                        dtype=np.float64)
    table = pq.read_table(Path(truth_dir) / "nuclei.parquet").to_pandas()
    half = window // 2
    padded = np.pad(marker, half)
    ix, iy = np.rint(table.x.to_numpy()).astype(int), np.rint(table.y.to_numpy()).astype(int)
    means = np.array([padded[y : y + window, x : x + window].mean()
                      for x, y in zip(ix, iy, strict=True)])
    table["marker_mean"] = means
    nuclei = pa.table({
        "id": table.id.to_numpy().astype(np.int64), "x": table.x.to_numpy(),
        "y": table.y.to_numpy(), "area": np.pi * table.radius_x * table.radius_y,
        f"c{marker_c}_mean": means,
    })
    pq.write_table(nuclei, image_dir / "nuclei.parquet")
    return image_id, table


def truth_labels(image_id: int, table: pd.DataFrame, min_marker_mean: float = 200.0
                 ) -> list[list[int]]:
    """``[image_id, nucleus_id, truth 0|1]`` for nuclei whose marker mean passes the bar."""
    sel = table[table.marker_mean > min_marker_mean]
    return [[int(image_id), int(i), int(p)] for i, p in zip(sel.id, sel.positive, strict=True)]
