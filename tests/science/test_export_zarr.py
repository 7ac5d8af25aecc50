"""export_zarr: round trip, NGFF 0.5 validity, resume after a crash, one file per shard."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from pydantic import ValidationError

from hpc_jobs import ngff
from hpc_jobs.steps import export_zarr
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.local import LocalStore
from tests.science.conftest import make_context

SHAPE = (3, 300, 200)  # (c, y, x): non-square, not a multiple of the block
BLOCK, CHUNK = 64, 32


def make_ctx(tmp_path: Path, cpus: int = 2) -> StepContext:
    """A StepContext on a local site under ``tmp_path`` (2 CPUs: the block-parallel path)."""
    return make_context(tmp_path, cpus=cpus)


def random_image(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """uint16 pixels over the whole range, every channel different."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 65536, size=shape, dtype=np.uint16)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[StepContext, int, np.ndarray]:
    ctx = make_ctx(tmp_path)
    pixels = random_image(SHAPE)
    with LocalStore(ctx.site.store.path) as store:
        image_id = store.add_image(
            "slide", pixels, channel_names=["DAPI", "CD3", "CD8"], pixel_size_um=(0.325, 0.5)
        )
    return ctx, image_id, pixels


def params(image_id: int, **kw: object) -> export_zarr.Params:
    return export_zarr.Params(image_id=image_id, block_size=BLOCK, chunk_size=CHUNK, **kw)


def expected_pyramid(pixels: np.ndarray) -> list[np.ndarray]:
    levels = [pixels]
    for _ in ngff.level_shapes(pixels.shape[1:], stop_at=CHUNK)[1:]:
        levels.append(ngff.downsample_mean(levels[-1]))
    return levels


def test_round_trip_every_channel_and_level(setup):
    ctx, image_id, pixels = setup
    summary = export_zarr.run(params(image_id), ctx)
    path = Path(summary["path"])
    assert path == ctx.image_dir(image_id) / "image.zarr"
    assert summary["shape"] == list(SHAPE)
    n_blocks = sum(
        len(ngff.blocks(s, BLOCK)) for s in ngff.level_shapes(SHAPE[1:], stop_at=CHUNK)
    )
    assert summary["blocks_written"] == n_blocks and summary["blocks_skipped"] == 0
    # plain zarr, no omeflow code
    group = zarr.open_group(str(path), mode="r")
    for c in range(SHAPE[0]):
        np.testing.assert_array_equal(group["0"][c], pixels[c])
    want = expected_pyramid(pixels)
    assert summary["levels"] == len(want) == 5  # 300 -> 150 -> 75 -> 38 -> 19 (<= chunk)
    for level, arr in enumerate(want):
        np.testing.assert_array_equal(group[str(level)][:], arr)
    # mean downsampling really is the mean of each 2x2 neighbourhood
    y, x = 7, 11
    quad = pixels[1, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].astype(np.int64)
    assert int(group["1"][1, y, x]) == (quad.sum() + 2) // 4


def test_metadata_is_valid_ngff_05(setup):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr_models.v05.image import Image

    ctx, image_id, _ = setup
    path = Path(export_zarr.run(params(image_id), ctx)["path"])
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == 3
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    model = Image.from_zarr(group)  # raises if not valid NGFF 0.5
    ms = model.attributes.ome.multiscales[0]
    assert [a.name for a in ms.axes] == ["c", "y", "x"]
    assert [a.type for a in ms.axes] == ["channel", "space", "space"]
    assert ms.axes[1].unit == ms.axes[2].unit == "micrometer"
    scales = [d.coordinateTransformations[0].scale for d in ms.datasets]
    assert scales[0] == [1.0, 0.5, 0.325]
    assert scales[2] == [1.0, 2.0, 1.3]
    assert [ch["label"] for ch in ome["omero"]["channels"]] == ["DAPI", "CD3", "CD8"]
    assert ome["omero"]["channels"][0]["window"] == {
        "min": 0.0, "max": 65535.0, "start": 0.0, "end": 65535.0
    }
    # ome-zarr-py opens it and sees every level
    nodes = list(Reader(parse_url(str(path)))())
    assert any(isinstance(s, Multiscales) for s in nodes[0].specs)
    assert [tuple(d.shape) for d in nodes[0].data] == [
        (3, *s) for s in ngff.level_shapes(SHAPE[1:], stop_at=CHUNK)
    ]
    assert nodes[0].metadata["channel_names"] == ["DAPI", "CD3", "CD8"]
    # helpers for readers
    assert ngff.channel_names(path) == ["DAPI", "CD3", "CD8"]
    assert ngff.pixel_size_um(path) == (0.325, 0.5)
    assert ngff.open_level(path, 0).shape == SHAPE
    with pytest.raises(ngff.ZarrLayoutError, match="levels 0..4"):
        ngff.open_level(path, 5)


def test_one_file_per_shard_not_per_chunk(setup):
    ctx, image_id, _ = setup
    path = Path(export_zarr.run(params(image_id), ctx)["path"])
    for level, (ny, nx) in enumerate(ngff.level_shapes(SHAPE[1:], stop_at=CHUNK)):
        files = ngff.shard_files(path / str(level))
        shards = -(-ny // BLOCK) * -(-nx // BLOCK)
        chunks = -(-ny // CHUNK) * -(-nx // CHUNK)
        assert len(files) == SHAPE[0] * shards
        if level == 0:
            assert (shards, chunks) == (20, 70)  # a file per chunk would be 3.5x as many
    arr = zarr.open_array(str(path / "0"), mode="r")
    assert arr.chunks == (1, CHUNK, CHUNK) and arr.shards == (1, BLOCK, BLOCK)


def test_default_layout_is_1024_chunks_in_2048_shards(tmp_path: Path):
    group = ngff.create_image(
        tmp_path / "image.zarr", size_c=2, shape_yx=(5000, 3000), dtype="uint16",
        channel_names=["a", "b"],
    )
    arr = group["0"]
    assert arr.chunks == (1, 1024, 1024) and arr.shards == (1, 2048, 2048)
    assert [group[str(i)].shape for i in range(4)] == [
        (2, 5000, 3000), (2, 2500, 1500), (2, 1250, 750), (2, 625, 375)
    ]
    assert ngff.blocks((5000, 3000), 2048)[-1] == (4096, 5000, 2048, 3000)


class FailingStore:
    """Wraps a LocalStore; after ``budget`` region reads (shared by all threads) it raises."""

    def __init__(self, inner: LocalStore, state: dict) -> None:
        self.inner, self.state = inner, state

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def read_region(self, *args, **kw):
        with self.state["lock"]:
            self.state["reads"] += 1
            if self.state["reads"] > self.state["budget"]:
                raise ConnectionError("simulated crash of the image server")
        return self.inner.read_region(*args, **kw)

    def close(self) -> None:
        self.inner.close()


def test_resume_after_crash_writes_only_the_rest(setup, tmp_path: Path):
    ctx, image_id, pixels = setup
    state = {"reads": 0, "budget": 20, "lock": threading.Lock()}  # 20 reads = 6 blocks + 2/3
    ctx.open_store = lambda: FailingStore(LocalStore(ctx.site.store.path), state)
    with pytest.raises(ConnectionError, match="simulated crash"):
        export_zarr.run(params(image_id), ctx)
    path = ctx.image_dir(image_id) / "image.zarr"
    progress = (path / ngff.PROGRESS_FILE).read_text().splitlines()
    done = [tuple(map(int, line.split())) for line in progress[1:]]
    assert 1 <= len(done) <= 6  # the block that crashed after 2 of 3 channels is not done
    assert all(d[0] == 0 for d in done)  # no pyramid level was started
    assert zarr.open_group(str(path)).attrs["omeflow"]["complete"] is False
    # a crash while appending the next line leaves a cut-off line: it must not count
    with open(path / ngff.PROGRESS_FILE, "a") as fh:
        fh.write("0 64 12")

    reads = {"n": 0}

    class CountingStore(LocalStore):
        def read_region(self, *a, **kw):
            reads["n"] += 1
            return super().read_region(*a, **kw)

    ctx.open_store = lambda: CountingStore(ctx.site.store.path)
    summary = export_zarr.run(params(image_id), ctx)
    level0_blocks = len(ngff.blocks(SHAPE[1:], BLOCK))
    total = sum(len(ngff.blocks(s, BLOCK)) for s in ngff.level_shapes(SHAPE[1:], stop_at=CHUNK))
    assert summary["blocks_skipped"] == len(done)
    assert summary["blocks_written"] == total - len(done)
    assert reads["n"] == (level0_blocks - len(done)) * SHAPE[0]
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["omeflow"]["complete"] is True
    for level, arr in enumerate(expected_pyramid(pixels)):
        np.testing.assert_array_equal(group[str(level)][:], arr)
    # identical to a fresh export, byte for byte (same codecs, same data)
    fresh_ctx = make_ctx(tmp_path / "fresh")
    with LocalStore(fresh_ctx.site.store.path) as s2:
        fresh_id = s2.add_image("slide", pixels, ["DAPI", "CD3", "CD8"], pixel_size_um=(0.325, 0.5))
    fresh = Path(export_zarr.run(params(fresh_id), fresh_ctx)["path"])
    for f in ngff.shard_files(fresh / "0"):
        assert (path / f.relative_to(fresh)).read_bytes() == f.read_bytes()
    # a third run has nothing left to do
    again = export_zarr.run(params(image_id), ctx)
    assert again["blocks_written"] == 0 and again["blocks_skipped"] == total


def test_existing_zarr_that_does_not_match_is_refused_then_overwritten(setup):
    ctx, image_id, pixels = setup
    path = ctx.image_dir(image_id) / "image.zarr"
    ngff.create_image(
        path, size_c=1, shape_yx=(10, 10), dtype="uint8", channel_names=["x"], chunk=32, block=64
    )
    with pytest.raises(ngff.ZarrLayoutError, match="overwrite=true") as err:
        export_zarr.run(params(image_id), ctx)
    assert "(1, 10, 10)" in str(err.value) and "uint8" in str(err.value)
    summary = export_zarr.run(params(image_id, overwrite=True), ctx)
    np.testing.assert_array_equal(zarr.open_array(str(path / "0"))[:], pixels)
    assert summary["blocks_skipped"] == 0
    # another block size than the existing shards: refused, naming both
    with pytest.raises(ngff.ZarrLayoutError, match="block_size=128"):
        export_zarr.run(export_zarr.Params(image_id=image_id, block_size=128, chunk_size=32), ctx)


def test_params_are_checked():
    with pytest.raises(ValidationError, match="multiple of chunk_size"):
        export_zarr.Params(image_id=1, block_size=1536, chunk_size=1024)
    with pytest.raises(ValidationError):
        export_zarr.Params(image_id=0)
    with pytest.raises(ValidationError):
        export_zarr.Params(image_id=1, bogus=True)
    schema = export_zarr.Params.model_json_schema()
    assert json.dumps(schema) and schema["properties"]["block_size"]["default"] == 2048


def test_progress_log_counts_only_complete_lines_of_its_own_layout(tmp_path: Path):
    path = tmp_path / "progress"
    log = export_zarr.ProgressLog(path, "layout A")
    assert log.load() == set()
    log.start(reset=True)
    log.mark(0, (0, 64, 0, 64))
    log.mark(1, (0, 32, 0, 32))
    with open(path, "a") as fh:
        fh.write("0 64 128 0")  # cut off by a crash
    again = export_zarr.ProgressLog(path, "layout A")
    assert again.load() == {(0, 0, 64, 0, 64), (1, 0, 32, 0, 32)}
    again.start(reset=False)  # terminates the cut line before appending
    again.mark(0, (64, 128, 0, 64))
    assert export_zarr.ProgressLog(path, "layout A").load() == {
        (0, 0, 64, 0, 64), (1, 0, 32, 0, 32), (0, 64, 128, 0, 64)
    }
    other = export_zarr.ProgressLog(path, "layout B")
    assert other.load() == set()  # written for another layout: nothing counts
    other.start(reset=False)
    other.mark(0, (0, 64, 0, 64))
    assert export_zarr.ProgressLog(path, "layout B").load() == {(0, 0, 64, 0, 64)}
