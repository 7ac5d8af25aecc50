"""A small preprocessed synthetic slide for the predict / writeback tests, without Cellpose.

The slide is generated into a LocalStore (tissue + hole ROIs, 0.5 µm pixels) and exported by
the real ``export_zarr``; the nuclei table and the level-0 labels are the synthetic truth's
(so tests compare against exactly known nuclei), the eCDF is the real ``ecdf`` step's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from hpc_jobs import ngff
from hpc_jobs.steps import ecdf, export_zarr
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.local import LocalStore
from hpc_jobs.synth import SynthSpec, generate
from tests.science.conftest import make_context

#: seed 1 at 384 x 256: two tissues, a hole in one (see tests/science/test_select_candidates).
SPEC = SynthSpec(width=384, height=256, seed=1)


def context(root: Path, job: str, task: tuple[int, int] | None = None) -> StepContext:
    """A step context on the slide's site with its own job directory."""
    ctx = make_context(root, cpus=1, task=task)
    ctx.job_dir = root / "jobs" / job
    return ctx


def prepare_slide(root: Path, ctx: StepContext | None = None) -> dict[str, Any]:
    """Generate, export, copy the truth's nuclei + labels in, run ecdf; return the facts.
    ``ctx``: the site to use (default: a local site under ``root``)."""
    ctx = ctx or context(root, "prep")
    with LocalStore(ctx.site.store.path) as store:
        synth = generate(SPEC, store, out_truth=root / "truth")
    image_id = int(synth["image_id"])
    export_zarr.run(export_zarr.Params(image_id=image_id, block_size=128), ctx)
    image_dir = ctx.image_dir(image_id)
    truth = pd.read_parquet(root / "truth" / "nuclei.parquet")
    truth[["id", "x", "y"]].to_parquet(image_dir / "nuclei.parquet", index=False)
    labels = np.asarray(zarr.open_array(str(root / "truth" / "labels.zarr"), mode="r")[...])
    zarr.create_array(store=str(ngff.image_zarr_path(image_dir) / "labels" / "nuclei" / "0"),
                      data=labels, chunks=(128, 128), zarr_format=3)
    ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    regions = json.loads((root / "truth" / "regions.json").read_text())
    return {"root": root, "image_id": image_id, "truth": truth, "labels": labels,
            "regions": regions, "image_dir": image_dir}
