"""Two runs on one image: the steps hold the image's lock (another process plays the other run).

Writers (export_zarr, the segmentation merge) need the image exclusive; readers (segmentation
tiles, ecdf) share it. A step that cannot get the image in ``ctx.lock_wait_s`` fails naming the
job that holds it; a re-run of a complete export writes nothing and only needs it shared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_jobs import ngff
from hpc_jobs.image_lock import ImageLockedError
from hpc_jobs.steps import ecdf, export_zarr, segment_nuclei
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.local import LocalStore
from tests.image_lock_holder import Holder
from tests.science.conftest import make_context

EXPORT_RUN = "celldetector_preprocess.manual__2026-11-21T20_00_00.export_zarr.0.1.0a1b2c3d4e"
READ_RUN = "celldetector_preprocess.manual__2026-11-21T20_05_00.ecdf.0.1.5f6a7b8c9d"


@pytest.fixture
def ctx(tmp_path: Path) -> StepContext:
    ctx = make_context(tmp_path / "site", cpus=1)
    ctx.lock_wait_s = 0.5
    return ctx


@pytest.fixture
def image_id(ctx: StepContext) -> int:
    pixels = np.random.default_rng(3).integers(0, 4000, size=(2, 300, 200), dtype=np.uint16)
    with LocalStore(ctx.site.store.path) as store:
        return store.add_image("slide", pixels, channel_names=["DAPI", "CD3"])


def export(ctx: StepContext, image_id: int, **kw: object) -> dict:
    params = export_zarr.Params(image_id=image_id, block_size=256, chunk_size=128, **kw)
    return export_zarr.run(params, ctx)


def test_ecdf_waits_for_a_re_export_and_names_the_exporting_run(ctx, image_id) -> None:
    export(ctx, image_id)
    with Holder(ctx.image_dir(image_id), EXPORT_RUN, exclusive=True, purpose="export_zarr"), \
            pytest.raises(ImageLockedError, match=EXPORT_RUN) as err:
        ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    assert f"image {image_id} is in use by job {EXPORT_RUN}" in str(err.value)
    assert ctx.job_key in str(err.value), "and says which job waited"
    assert not (ctx.image_dir(image_id) / "ecdf").exists(), "nothing was read or written"


def test_overwrite_waits_for_a_reader_and_a_complete_export_does_not(ctx, image_id) -> None:
    first = export(ctx, image_id)
    zarr_path = ngff.image_zarr_path(ctx.image_dir(image_id))
    before = {p: p.stat().st_mtime_ns for p in zarr_path.rglob("*") if p.is_file()}
    with Holder(ctx.image_dir(image_id), READ_RUN, exclusive=False, purpose="ecdf"):
        again = export(ctx, image_id)  # complete and matching: writes nothing, shares
        assert again["blocks_written"] == 0 and again["blocks_skipped"] == first["blocks_written"]
        with pytest.raises(ImageLockedError, match=READ_RUN):
            export(ctx, image_id, overwrite=True)
    after = {p: p.stat().st_mtime_ns for p in zarr_path.rglob("*") if p.is_file()}
    assert after == before, "the reader's Zarr was not touched while it read"
    assert export(ctx, image_id, overwrite=True)["blocks_written"] == first["blocks_written"]


def test_segmentation_tiles_share_the_image_and_the_merge_needs_it_alone(
        ctx, image_id, cellpose_model) -> None:
    export(ctx, image_id)
    image_dir = ctx.image_dir(image_id)
    with Holder(image_dir, EXPORT_RUN, exclusive=True, purpose="export_zarr"), \
            pytest.raises(ImageLockedError, match=EXPORT_RUN):
        segment_nuclei.run(segment_nuclei.Params(image_id=image_id, block_size=256,
                                                 phase="tiles"), ctx)
    assert not (image_dir / "segmentation").exists(), "no tile was segmented"
    with Holder(image_dir, READ_RUN, exclusive=False, purpose="ecdf"):
        tiles = segment_nuclei.run(segment_nuclei.Params(image_id=image_id, block_size=256,
                                                         phase="tiles"), ctx)
        assert tiles["tiles"] == tiles["tiles_total"] == 2
        with pytest.raises(ImageLockedError, match=READ_RUN):
            segment_nuclei.run(segment_nuclei.Params(image_id=image_id, block_size=256,
                                                     phase="merge"), ctx)
        assert not (image_dir / "nuclei.parquet").exists()
    merged = segment_nuclei.run(segment_nuclei.Params(image_id=image_id, block_size=256,
                                                      phase="merge"), ctx)
    assert (image_dir / "nuclei.parquet").is_file() and merged["model_sha256"]
