"""Step ``export_zarr``: copy an image from the image store to OME-Zarr on cluster storage.

Layout: see :mod:`hpc_jobs.ngff`. Level 0 is written block by block (a block = one shard
``(1, block, block)`` of every channel) by a thread pool sized by the job's CPUs; each worker
has its own store connection and reads all channels of its block with ``read_region``. Pyramid
levels follow, each computed block-parallel from the level above.

Resumable: after a block's shard files are written *and fsync'd*, one line ``level y0 y1 x0 x1``
is appended (and fsync'd) to ``image.zarr/.omeflow-progress``. A rerun skips exactly the blocks
listed there; a block interrupted mid-write has no line and is written again. The empty layout
is created in a temporary folder and renamed into place, so a crash during creation leaves
nothing half-made. An existing Zarr that does not match the image (shape, dtype, chunks,
shards) is refused with the fix (``overwrite=true``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from math import gcd
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import BlockSize, ImageId, Workers

if TYPE_CHECKING:
    import zarr

    from hpc_jobs.stores.base import ImageInfo, ImageStore

PROGRESS_VERSION = "omeflow-export-progress v1"


class Params(StepParams):
    """Parameters of ``export_zarr``."""

    image_id: ImageId
    block_size: BlockSize = 2048
    chunk_size: int | None = Field(
        default=None, ge=16, le=8192, multiple_of=16,
        description="Chunk edge (px) inside a shard; it must divide block_size (default: the "
        "largest power of two <= 1024 that divides block_size).",
    )
    overwrite: bool = Field(
        default=False,
        description="Delete an existing Zarr of this image and export anew (needed when the "
        "existing export has another block size or layout).",
    )
    workers: Workers = None

    @model_validator(mode="after")
    def _shard_holds_chunks(self) -> Params:
        if self.chunk_size is None:
            self.chunk_size = gcd(self.block_size, 1024)
        if self.block_size % self.chunk_size:
            raise ValueError(
                f"block_size={self.block_size} must be a multiple of chunk_size="
                f"{self.chunk_size} (a shard holds whole chunks), e.g. 2048 and 1024"
            )
        return self


# --------------------------------------------------------------------------- progress log
class ProgressLog:
    """Append-only, fsync'd record of finished blocks: one line ``level y0 y1 x0 x1``.

    The first line is a header naming the layout; a log with another header is ignored (its
    blocks are written again). Only newline-terminated lines count, so a line cut by a crash
    is never read as a finished block.
    """

    def __init__(self, path: Path, header: str) -> None:
        self.path = path
        self.header = header
        self._lock = threading.Lock()
        #: True once :meth:`load` found a log written for another layout (it is restarted).
        self.foreign = False

    def load(self) -> set[tuple[int, int, int, int, int]]:
        """Finished ``(level, y0, y1, x0, x1)`` entries (empty if the header differs)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return set()
        lines = text.split("\n")
        complete = lines[:-1]  # the part after the last "\n" is unterminated: ignore it
        if not complete or complete[0] != f"# {self.header}":
            self.foreign = True
            return set()
        done = set()
        for line in complete[1:]:
            fields = line.split()
            if len(fields) == 5 and all(f.isdigit() for f in fields):
                done.add(tuple(int(f) for f in fields))
        return done  # type: ignore[return-value]

    def start(self, reset: bool) -> None:
        """Write the header (``reset``), or terminate a cut-off last line before appending."""
        if reset or self.foreign or not self.path.exists():
            self._write(f"# {self.header}\n", mode="w")
            return
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    self._write("\n")

    def mark(self, level: int, blk: tuple[int, int, int, int]) -> None:
        """Record one finished block durably."""
        self._write(f"{level} {blk[0]} {blk[1]} {blk[2]} {blk[3]}\n")

    def _write(self, text: str, mode: str = "a") -> None:
        with self._lock, open(self.path, mode) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


# --------------------------------------------------------------------------- store per thread
class ThreadStores:
    """One store connection per worker thread (OMERO sessions are not safely shared)."""

    def __init__(self, opener: Callable[[], ImageStore]) -> None:
        self._opener = opener
        self._local = threading.local()
        self._opened: list[ImageStore] = []
        self._lock = threading.Lock()

    def get(self) -> ImageStore:
        """This thread's store, opened on first use."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._opener()
            self._local.store = store
            with self._lock:
                self._opened.append(store)
        return store

    def close(self) -> None:
        """Close every connection opened so far."""
        with self._lock:
            for store in self._opened:
                store.close()
            self._opened.clear()


# --------------------------------------------------------------------------- layout
def _header(info: ImageInfo, params: Params) -> str:
    return (
        f"{PROGRESS_VERSION} image={info.image_id} shape={info.size_c},{info.size_y},"
        f"{info.size_x} dtype={info.dtype} block={params.block_size} chunk={params.chunk_size}"
    )


def _check_existing(path: Path, info: ImageInfo, params: Params) -> str | None:
    """Why the Zarr at ``path`` cannot be resumed for this image, or None if it can."""
    from hpc_jobs import ngff

    try:
        group = ngff.open_image(path)
        levels = ngff.multiscale(group)["datasets"]
        arrays = [group[d["path"]] for d in levels]
    except (ngff.ZarrLayoutError, KeyError, ValueError, FileNotFoundError) as exc:
        return f"it is not a complete OME-Zarr image ({exc})"
    arr0 = arrays[0]
    want_shapes = ngff.level_shapes((info.size_y, info.size_x), stop_at=params.chunk_size)
    meta = dict(group.attrs.get("omeflow", {}))
    problems = []
    if meta.get("image_id") not in (None, info.image_id):
        problems.append(f"it was exported from image {meta.get('image_id')}")
    if tuple(arr0.shape) != (info.size_c, info.size_y, info.size_x):
        problems.append(
            f"its shape is {tuple(arr0.shape)}, the image is "
            f"{(info.size_c, info.size_y, info.size_x)} (c, y, x)"
        )
    if str(arr0.dtype) != info.dtype:
        problems.append(f"its dtype is {arr0.dtype}, the image is {info.dtype}")
    if arr0.chunks != (1, params.chunk_size, params.chunk_size) or arr0.shards != (
        1, params.block_size, params.block_size
    ):
        problems.append(
            f"it has chunks {arr0.chunks} and shards {arr0.shards}, this run asks for "
            f"chunk_size={params.chunk_size} block_size={params.block_size}"
        )
    if [tuple(a.shape[1:]) for a in arrays] != want_shapes:
        problems.append(f"its pyramid has {len(arrays)} levels, expected {len(want_shapes)}")
    return "; ".join(problems) or None


def _prepare(path: Path, info: ImageInfo, params: Params, log: Callable[[str], None]) -> bool:
    """Make sure a matching (possibly partly written) Zarr exists; True if freshly created."""
    import shutil
    import uuid

    from hpc_jobs import ngff

    if path.exists() and params.overwrite:
        log(f"overwrite=true: deleting {path}")
        shutil.rmtree(path)
    if path.exists():
        problem = _check_existing(path, info, params)
        if problem:
            raise ngff.ZarrLayoutError(
                f"{path} already exists but does not match image {info.image_id}: {problem}. "
                "Rerun export_zarr with overwrite=true to replace it"
            )
        return False
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        ngff.create_image(
            tmp,
            size_c=info.size_c,
            shape_yx=(info.size_y, info.size_x),
            dtype=info.dtype,
            channel_names=list(info.channel_names) or [f"c{i}" for i in range(info.size_c)],
            pixel_size_um=info.pixel_size_um,
            name=info.name,
            chunk=params.chunk_size,
            block=params.block_size,
            extra_attrs={"image_id": info.image_id, "complete": False},
        )
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _fsync_block(array_dir: Path, size_c: int, blk: tuple[int, int, int, int], block: int) -> None:
    """fsync the shard files of one block (default chunk keys: ``c/<c>/<iy>/<ix>``)."""
    iy, ix = blk[0] // block, blk[2] // block
    for c in range(size_c):
        shard = array_dir / "c" / str(c) / str(iy) / str(ix)
        try:
            fd = os.open(shard, os.O_RDONLY)
        except FileNotFoundError:  # an all-zero shard is not stored at all
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- parallel driver
def run_blocks(
    todo: Iterable[tuple[int, int, int, int]],
    task: Callable[[tuple[int, int, int, int]], int],
    on_done: Callable[[tuple[int, int, int, int]], None],
    workers: int,
) -> int:
    """Run ``task`` on every block with ``workers`` threads; ``on_done`` after each success.

    At most ``2 * workers`` blocks are in flight (bounded memory). On the first failure no new
    block starts, the running ones finish (and are recorded), then the error is raised.
    Returns the sum of the tasks' results (bytes).
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    pending = iter(list(todo))
    total = 0
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="export") as pool:
        running: dict[Future[int], tuple[int, int, int, int]] = {}

        def fill() -> None:
            while error is None and len(running) < 2 * workers:
                blk = next(pending, None)
                if blk is None:
                    return
                running[pool.submit(task, blk)] = blk

        fill()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                blk = running.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    error = error or exc
                    continue
                total += fut.result()
                on_done(blk)
            fill()
    if error is not None:
        raise error
    return total


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Export (or resume exporting) one image; returns a summary of what was written.

    Writing holds the image's lock exclusive (no reader sees a half-rewritten Zarr). A complete
    export that matches and is not to be overwritten writes nothing: that check holds the
    lock only shared, so re-running a DAG on an image another run is reading does not wait.
    """
    from hpc_jobs import ngff

    path = ngff.image_zarr_path(ctx.image_dir(params.image_id))
    stores = ThreadStores(ctx.open_store)
    try:
        info = stores.get().get_image(params.image_id)
        exclusive = False
        while True:
            with ctx.lock_image(params.image_id, exclusive=exclusive, purpose="export_zarr"):
                if exclusive or not _writes(path, info, params):
                    return _export(params, ctx, stores, info, path)
            exclusive = True  # something to write: drop the shared lock, take it exclusive
    finally:
        stores.close()


def _writes(path: Path, info: ImageInfo, params: Params) -> bool:
    """Whether exporting ``info`` to ``path`` would write anything. False for a complete
    export whose progress log lists every block of this layout (and for a Zarr that does not
    match: :func:`_prepare` refuses it without writing)."""
    from hpc_jobs import ngff

    if params.overwrite or not path.exists():
        return True
    try:
        group = ngff.open_image(path)
        complete = group.attrs.get("omeflow", {}).get("complete") is True
        shapes = [tuple(group[d["path"]].shape[1:]) for d in ngff.multiscale(group)["datasets"]]
    except (ngff.ZarrLayoutError, KeyError, ValueError, FileNotFoundError):
        return True
    progress = ProgressLog(path / ngff.PROGRESS_FILE, _header(info, params))
    done = progress.load()
    missing = any((level, *blk) not in done for level, shape in enumerate(shapes)
                  for blk in ngff.blocks(shape, params.block_size))
    return not complete or progress.foreign or missing


def _export(params: Params, ctx: StepContext, stores: ThreadStores, info: ImageInfo,
            path: Path) -> dict[str, Any]:
    """The export itself (call with the image's lock held)."""
    import numpy as np

    from hpc_jobs import ngff

    t0 = time.perf_counter()
    workers = params.workers or ctx.cpus
    created = _prepare(path, info, params, ctx.log)
    group = ngff.open_image(path, mode="r+")
    arrays: list[zarr.Array] = [
        group[d["path"]] for d in ngff.multiscale(group)["datasets"]  # type: ignore[misc]
    ]
    progress = ProgressLog(path / ngff.PROGRESS_FILE, _header(info, params))
    done = set() if created else progress.load()
    progress.start(reset=created)
    dtype = np.dtype(info.dtype)
    block = params.block_size
    written = skipped = 0
    nbytes = 0
    ctx.log(
        f"export image {info.image_id} ({info.name!r}) {info.size_c}x{info.size_y}x"
        f"{info.size_x} {info.dtype} -> {path} ({len(arrays)} levels, {workers} workers)"
    )

    def write_level0(blk: tuple[int, int, int, int]) -> int:
        y0, y1, x0, x1 = blk
        store = stores.get()
        data = np.empty((info.size_c, y1 - y0, x1 - x0), dtype=dtype)
        for c in range(info.size_c):
            tile = np.asarray(store.read_region(info.image_id, c, y0, y1, x0, x1, level=0))
            if tile.shape != data.shape[1:] or tile.dtype != dtype:
                raise ValueError(
                    f"store returned {tile.shape} {tile.dtype} for channel {c} "
                    f"[{y0}:{y1}, {x0}:{x1}] of image {info.image_id}; expected "
                    f"{data.shape[1:]} {dtype} (the store's metadata and pixels disagree)"
                )
            data[c] = tile
        arrays[0][:, y0:y1, x0:x1] = data
        _fsync_block(path / "0", info.size_c, blk, block)
        return data.nbytes

    def make_pyramid_task(level: int) -> Callable[[tuple[int, int, int, int]], int]:
        src, dst = arrays[level - 1], arrays[level]

        def task(blk: tuple[int, int, int, int]) -> int:
            sy0, sy1, sx0, sx1 = ngff.source_region(blk, tuple(src.shape[1:]))
            out = ngff.downsample_mean(np.asarray(src[:, sy0:sy1, sx0:sx1]))
            dst[:, blk[0] : blk[1], blk[2] : blk[3]] = out
            _fsync_block(path / str(level), info.size_c, blk, block)
            return out.nbytes

        return task

    levels = [ngff.blocks(tuple(arr.shape[1:]), block) for arr in arrays]
    reporter = ctx.progress("blocks", total=sum(len(b) for b in levels), message="exporting")
    reporter.update(sum((lv, *b) in done for lv, bs in enumerate(levels) for b in bs))

    def mark(level: int, blk: tuple[int, int, int, int]) -> None:
        progress.mark(level, blk)
        reporter.advance()

    for level, arr in enumerate(arrays):
        all_blocks = levels[level]
        todo = [b for b in all_blocks if (level, *b) not in done]
        skipped += len(all_blocks) - len(todo)
        if not todo:
            continue
        t_level = time.perf_counter()
        task = write_level0 if level == 0 else make_pyramid_task(level)
        reporter.update(message=f"exporting level {level}", force=True)
        nbytes += run_blocks(
            todo, task, lambda b, lv=level: mark(lv, b), workers  # type: ignore[misc]
        )
        written += len(todo)
        ctx.log(
            f"level {level} {tuple(arr.shape)}: {len(todo)} blocks written, "
            f"{len(all_blocks) - len(todo)} skipped, {time.perf_counter() - t_level:.1f}s"
        )
    reporter.finish("exported")
    meta = dict(group.attrs.get("omeflow", {}))
    if not meta.get("complete"):
        group.attrs["omeflow"] = {**meta, "complete": True}

    files = [p for p in path.rglob("*") if p.is_file()]
    seconds = time.perf_counter() - t0
    summary = {
        "image_id": info.image_id,
        "path": str(path),
        "shape": [info.size_c, info.size_y, info.size_x],
        "dtype": info.dtype,
        "levels": len(arrays),
        "level_shapes": [list(a.shape) for a in arrays],
        "chunks": list(arrays[0].chunks),
        "shards": list(arrays[0].shards or arrays[0].chunks),
        "blocks_written": written,
        "blocks_skipped": skipped,
        "bytes_written_uncompressed": nbytes,
        "bytes": sum(p.stat().st_size for p in files),
        "files": len(files),
        "seconds": round(seconds, 3),
    }
    ctx.log(f"export done: {summary}")
    return summary
