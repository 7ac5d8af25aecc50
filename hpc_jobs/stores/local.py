"""``LocalStore``: a directory of images plus ROI/annotation records people can read.

The embedded default store and the test double that is a *real* :class:`ImageStore`.

Layout under ``root``::

    store.json                      {"format": "omeflow-local-store", "version": 1}
    ids.json                        last id handed out per kind (image, roi, file, map,
                                    dataset, tag)
    datasets.json                   {"datasets": [{"id", "name", "image_ids": [...]}]}
    tags.json                       {"tags": [{"id", "text", "image_ids": [...]}]}
                                    (OMERO's Dataset -> DatasetImageLink -> Image and
                                    TagAnnotation <- ImageAnnotationLink <- Image)
    .lock                           fcntl lock guarding ids.json
    images/<id>/pixels.ome.tif      tiled BigTIFF, OME-XML (channel names, PhysicalSizeX/Y),
                                    one page per channel; pyramid levels as SubIFDs
    images/<id>/image.json          metadata (name, sizes, channels, pixel size, levels)
    images/<id>/rois.json           {"rois": [{"roi_id", "name", "namespace", "shapes": [...]}]}
    images/<id>/annotations.json    {"map_annotations": [{"id", "namespace", "values"}]}
    images/<id>/attachments.json    {"attachments": [{"file_id", "name", "namespace", ...}]}
    images/<id>/attachments/<file_id>/<name>
    images/<id>/.lock               fcntl lock: one writer of the records at a time

Every record file is replaced atomically (temp file + ``os.replace``), so readers never see a
half-written file and need no lock; writers take the image's lock for the whole
read-modify-write, so concurrent writers in several processes never lose records. Ids are
assigned monotonically per store (like OMERO's), under the store lock.

Creating an image (OMERO gets images by import; here it is an explicit call)::

    store = LocalStore(Path("var/store"))
    image_id = store.add_image("small", array_cyx, channel_names=["DAPI", "CD8"])
    # or, streaming tile by tile with bounded memory:
    image_id = store.create_image(
        "big", size_x=27437, size_y=19284, channel_names=["DAPI", "CD8"],
        source=lambda c, y0, y1, x0, x1: render(c, y0, y1, x0, x1), tile=512, levels=3,
    )
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hpc_jobs.fsutil import atomic_write, file_lock
from hpc_jobs.stores.base import (
    BULK_ANNOTATIONS_NS,
    DELETE_BATCH,
    Attachment,
    EllipseShape,
    ImageInfo,
    ImageNotFound,
    MapAnnotation,
    NewRoi,
    PointShape,
    PolygonShape,
    Roi,
    Shape,
    StoreError,
    TableColumns,
    check_selection,
    checked_attachment,
    checked_table,
)

#: ``source(c, y0, y1, x0, x1) -> 2-D array`` of one channel's pixels ``[y0:y1, x0:x1]``.
TileSource = Callable[[int, int, int, int, int], np.ndarray]

FORMAT = "omeflow-local-store"
FORMAT_VERSION = 1
PIXELS = "pixels.ome.tif"


# --------------------------------------------------------------------------- helpers
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomic write of a record; 0644: the store's records are for people to read."""
    atomic_write(path, data, mode=0o644)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (readable by people)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def shape_to_json(shape: Shape) -> dict[str, Any]:
    """One shape as a JSON record."""
    if isinstance(shape, PolygonShape):
        if len(shape.points) < 3:
            raise StoreError(f"a polygon needs at least 3 points, got {len(shape.points)}")
        pts = [[float(x), float(y)] for x, y in shape.points]
        return {"type": "polygon", "points": pts, "text": shape.text}
    if isinstance(shape, PointShape):
        return {"type": "point", "x": float(shape.x), "y": float(shape.y), "text": shape.text}
    if isinstance(shape, EllipseShape):
        return {
            "type": "ellipse",
            "x": float(shape.x),
            "y": float(shape.y),
            "radius_x": float(shape.radius_x),
            "radius_y": float(shape.radius_y),
            "text": shape.text,
        }
    raise StoreError(
        f"unsupported shape {type(shape).__name__}; use PolygonShape, PointShape or EllipseShape"
    )


def shape_from_json(rec: dict[str, Any]) -> Shape:
    """The inverse of :func:`shape_to_json`."""
    kind = rec.get("type")
    text = str(rec.get("text", ""))
    if kind == "polygon":
        return PolygonShape(tuple((float(x), float(y)) for x, y in rec["points"]), text)
    if kind == "point":
        return PointShape(float(rec["x"]), float(rec["y"]), text)
    if kind == "ellipse":
        return EllipseShape(
            float(rec["x"]), float(rec["y"]), float(rec["radius_x"]), float(rec["radius_y"]), text
        )
    raise StoreError(f"unknown shape type {kind!r} in rois.json (polygon, point or ellipse)")


def _downsample2(block: np.ndarray) -> np.ndarray:
    """2x2 mean of a 2-D block (odd trailing row/column dropped), same dtype."""
    h, w = block.shape[0] // 2, block.shape[1] // 2
    b = block[: 2 * h, : 2 * w].reshape(h, 2, w, 2)
    out = b.mean(axis=(1, 3), dtype=np.float64)
    if np.issubdtype(block.dtype, np.integer):
        out = np.rint(out)
    return out.astype(block.dtype)


def _check_image_id(image_id: object) -> int:
    if isinstance(image_id, bool) or not isinstance(image_id, int | np.integer) or image_id < 1:
        raise ImageNotFound(f"image ids are integers >= 1; got {image_id!r}")
    return int(image_id)


def _safe_name(name: str) -> str:
    if not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
        raise StoreError(
            f"attachment name {name!r} is not a plain file name; pass e.g. name='ecdf.parquet'"
        )
    return name


# --------------------------------------------------------------------------- store
class LocalStore:
    """An :class:`~hpc_jobs.stores.base.ImageStore` over a directory (see module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.images_dir = self.root / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        marker = self.root / "store.json"
        if not marker.exists():
            with file_lock(self.root / ".lock"):
                if not marker.exists():
                    atomic_write_json(marker, {"format": FORMAT, "version": FORMAT_VERSION})
        meta = _read_json(marker, {})
        if meta.get("format") != FORMAT:
            raise StoreError(
                f"{marker} is not an omeflow local store (format={meta.get('format')!r}); "
                "point store.path at an empty folder or an existing local store"
            )
        self._arrays: dict[tuple[int, int], Any] = {}
        self._files: list[Any] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()

    # context manager -------------------------------------------------------
    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the TIFF files opened for region reads."""
        with self._lock:
            for fh in self._files:
                with contextlib.suppress(Exception):
                    fh.close()
            self._files.clear()
            self._arrays.clear()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ids -------------------------------------------------------------------
    def _next_ids(self, kind: str, n: int = 1) -> list[int]:
        """``n`` fresh ids of ``kind``, monotonic per store, safe across processes."""
        path = self.root / "ids.json"
        with file_lock(self.root / ".lock"):
            ids = _read_json(path, {})
            last = int(ids.get(kind, 0))
            ids[kind] = last + n
            atomic_write_json(path, ids)
        return list(range(last + 1, last + n + 1))

    # images ----------------------------------------------------------------
    def _image_dir(self, image_id: int) -> Path:
        image_id = _check_image_id(image_id)
        path = self.images_dir / str(image_id)
        if not (path / "image.json").exists():
            raise ImageNotFound(self._not_found_message(image_id))
        return path

    def _image_ids(self) -> list[int]:
        return sorted(
            int(p.name)
            for p in self.images_dir.iterdir()
            if p.name.isdigit() and (p / "image.json").exists()
        )

    def _not_found_message(self, image_id: int) -> str:
        ids = self._image_ids()
        shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
        have = f"it has images {shown}" if ids else "it has no images yet"
        return (
            f"no image {image_id} in local store {self.root}; {have} "
            "(create one with LocalStore.create_image or `omeflow synth --store DIR`)"
        )

    def _meta(self, image_id: int) -> dict[str, Any]:
        return json.loads((self._image_dir(image_id) / "image.json").read_text())

    @staticmethod
    def _info(meta: dict[str, Any]) -> ImageInfo:
        px = meta.get("pixel_size_um")
        return ImageInfo(
            image_id=int(meta["image_id"]),
            name=str(meta["name"]),
            size_x=int(meta["size_x"]),
            size_y=int(meta["size_y"]),
            size_c=int(meta["size_c"]),
            dtype=str(meta["dtype"]),
            channel_names=tuple(meta["channel_names"]),
            pixel_size_um=(float(px[0]), float(px[1])) if px else None,
            levels=len(meta["level_shapes"]),
        )

    def list_images(self) -> list[ImageInfo]:
        """Every image in the store, by id."""
        out = []
        for image_id in self._image_ids():
            with contextlib.suppress(ImageNotFound, FileNotFoundError):
                out.append(self.get_image(image_id))
        return out

    def get_image(self, image_id: int) -> ImageInfo:
        """Metadata of one image; :class:`ImageNotFound` lists the ids that exist."""
        return self._info(self._meta(image_id))

    # datasets and tags -----------------------------------------------------
    def create_dataset(self, name: str, image_ids: Sequence[int] = ()) -> int:
        """A new dataset (like OMERO's) holding ``image_ids``; returns its id."""
        if not name.strip():
            raise StoreError("a dataset needs a name, e.g. 'nightly slides'")
        return self._new_group("datasets", {"name": name}, image_ids)

    def add_to_dataset(self, dataset_id: int, image_ids: Sequence[int]) -> None:
        """Link images into a dataset (an image already in it stays once)."""
        self._link("datasets", dataset_id, image_ids)

    def tag_images(self, tag: int | str, image_ids: Sequence[int]) -> int:
        """Tag images with a tag (its id, or its text: the tag with that text, created if
        there is none); returns the tag's id."""
        check_selection(None, tag)
        if isinstance(tag, str):
            found = [r["id"] for r in self._groups("tags") if r["text"] == tag]
            if not found:
                return self._new_group("tags", {"text": tag}, image_ids)
            tag = int(found[0])
        self._link("tags", tag, image_ids)
        return tag

    def list_image_ids(self, dataset: int | None = None, tag: int | str | None = None
                       ) -> list[int]:
        """Ids of the images in ``dataset`` and/or with ``tag`` (id or text), sorted."""
        check_selection(dataset, tag)
        existing = set(self._image_ids())
        selected = existing
        if dataset is not None:
            recs = [r for r in self._groups("datasets") if r["id"] == dataset]
            if not recs:
                known = [f"{r['id']} ({r['name']})" for r in self._groups("datasets")]
                raise StoreError(f"no dataset {dataset} in local store {self.root}; datasets: "
                                 f"{', '.join(known) or 'none'} (LocalStore.create_dataset)")
            selected = selected & set(recs[0]["image_ids"])
        if tag is not None:
            key = "id" if isinstance(tag, int) else "text"
            recs = [r for r in self._groups("tags") if r[key] == tag]
            if not recs:
                known = [f"{r['id']} ({r['text']})" for r in self._groups("tags")]
                raise StoreError(f"no tag {tag!r} in local store {self.root}; tags: "
                                 f"{', '.join(known) or 'none'} (LocalStore.tag_images)")
            selected = selected & {i for r in recs for i in r["image_ids"]}
        return sorted(selected)

    def _groups(self, kind: str) -> list[dict[str, Any]]:
        return list(_read_json(self.root / f"{kind}.json", {kind: []})[kind])

    def _new_group(self, kind: str, fields: dict[str, Any], image_ids: Sequence[int]) -> int:
        ids = sorted({self._image_dir(i) and int(i) for i in image_ids})  # all must exist
        (group_id,) = self._next_ids(kind.rstrip("s"))
        with file_lock(self.root / ".lock"):
            recs = self._groups(kind)
            recs.append({"id": group_id, **fields, "image_ids": ids})
            atomic_write_json(self.root / f"{kind}.json", {kind: recs})
        return group_id

    def _link(self, kind: str, group_id: int, image_ids: Sequence[int]) -> None:
        ids = {self._image_dir(i) and int(i) for i in image_ids}
        with file_lock(self.root / ".lock"):
            recs = self._groups(kind)
            for rec in recs:
                if rec["id"] == group_id:
                    rec["image_ids"] = sorted(set(rec["image_ids"]) | ids)
                    break
            else:
                raise StoreError(f"no {kind.rstrip('s')} {group_id} in local store {self.root}")
            atomic_write_json(self.root / f"{kind}.json", {kind: recs})

    def level_shape(self, image_id: int, level: int) -> tuple[int, int]:
        """``(size_y, size_x)`` of one resolution level."""
        shapes = self._meta(image_id)["level_shapes"]
        if not 0 <= level < len(shapes):
            raise StoreError(
                f"image {image_id} has {len(shapes)} resolution levels; level={level} is out "
                f"of range (use 0..{len(shapes) - 1})"
            )
        return int(shapes[level][0]), int(shapes[level][1])

    def pixels_path(self, image_id: int) -> Path:
        """The OME-TIFF file of an image (for tools that read TIFF directly)."""
        return self._image_dir(image_id) / PIXELS

    def _array(self, image_id: int, level: int) -> Any:
        import tifffile
        import zarr

        if os.getpid() != self._pid:  # forked: never share file offsets with the parent
            self._files, self._arrays, self._pid = [], {}, os.getpid()
            self._lock = threading.Lock()
        key = (image_id, level)
        arr = self._arrays.get(key)
        if arr is None:
            tif = tifffile.TiffFile(self.pixels_path(image_id))
            self._files.append(tif)
            arr = zarr.open_array(tif.series[0].aszarr(level=level), mode="r")
            self._arrays[key] = arr
        return arr

    def read_region(
        self, image_id: int, channel: int, y0: int, y1: int, x0: int, x1: int, level: int = 0
    ) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of one channel at ``level``, clipped to the image.

        Reads only the TIFF tiles the region touches (tifffile's zarr store).
        """
        info = self.get_image(image_id)
        info.check_channel(channel)
        sy, sx = self.level_shape(image_id, level)
        y0, y1 = max(0, int(y0)), min(sy, int(y1))
        x0, x1 = max(0, int(x0)), min(sx, int(x1))
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0)), dtype=info.dtype)
        with self._lock:
            arr = self._array(info.image_id, level)
            if arr.ndim == 2:  # a 1-channel TIFF series has no channel axis
                return np.asarray(arr[y0:y1, x0:x1])
            return np.asarray(arr[channel, y0:y1, x0:x1])

    def add_image(
        self,
        name: str,
        pixels: np.ndarray,
        channel_names: Sequence[str] | None = None,
        pixel_size_um: tuple[float, float] | None = None,
        tile: int = 512,
        levels: int = 1,
    ) -> int:
        """Create an image from an in-memory ``(c, y, x)`` (or ``(y, x)``) array."""
        arr = np.asarray(pixels)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise StoreError(f"pixels must be (c, y, x) or (y, x); got shape {arr.shape}")
        names = list(channel_names or [f"C{i}" for i in range(arr.shape[0])])
        return self.create_image(
            name,
            size_x=arr.shape[2],
            size_y=arr.shape[1],
            channel_names=names,
            source=lambda c, y0, y1, x0, x1: arr[c, y0:y1, x0:x1],
            dtype=arr.dtype.name,
            pixel_size_um=pixel_size_um,
            tile=tile,
            levels=levels,
        )

    def create_image(
        self,
        name: str,
        size_x: int,
        size_y: int,
        channel_names: Sequence[str],
        source: TileSource,
        dtype: str = "uint16",
        pixel_size_um: tuple[float, float] | None = None,
        tile: int = 512,
        levels: int = 1,
        compression: str | None = "zlib",
    ) -> int:
        """Create an image by streaming tiles from ``source``; returns its new id.

        ``source(c, y0, y1, x0, x1)`` is called once per TIFF tile, channel by channel, rows
        then columns, so memory stays bounded by a tile (plus, for ``levels > 1``, the
        reduced levels, which are spooled to disk-backed memmaps and never held in RAM).
        Level ``n`` is level ``n-1`` 2x2-mean-downsampled (floor sizes).
        """
        import tifffile

        if tile % 16 or tile <= 0:
            raise StoreError(f"tile={tile} must be a positive multiple of 16 (TIFF rule)")
        if size_x < 1 or size_y < 1:
            raise StoreError(f"image size must be >= 1x1; got {size_x}x{size_y}")
        if not channel_names:
            raise StoreError("channel_names must name at least one channel, e.g. ['DAPI']")
        dt = np.dtype(dtype)
        size_c = len(channel_names)
        shapes = [(size_y, size_x)]
        for _ in range(1, max(1, levels)):
            y, x = shapes[-1]
            if y < 2 or x < 2:
                break
            shapes.append((y // 2, x // 2))
        (image_id,) = self._next_ids("image")
        tmp_dir = self.images_dir / f".tmp-{image_id}-{uuid.uuid4().hex[:8]}"
        tmp_dir.mkdir()
        try:
            # Reduced levels are spooled to memmaps while level 0 streams to the TIFF.
            reduced = [
                np.lib.format.open_memmap(
                    tmp_dir / f".level{i}.npy", mode="w+", dtype=dt, shape=(size_c, *shp)
                )
                for i, shp in enumerate(shapes[1:], start=1)
            ]

            def level0_tiles() -> Iterator[np.ndarray]:
                for c in range(size_c):
                    for y0 in range(0, size_y, tile):
                        y1 = min(size_y, y0 + tile)
                        for x0 in range(0, size_x, tile):
                            x1 = min(size_x, x0 + tile)
                            block = np.asarray(source(c, y0, y1, x0, x1))
                            if block.shape != (y1 - y0, x1 - x0):
                                raise StoreError(
                                    f"tile source returned shape {block.shape} for "
                                    f"c={c} [{y0}:{y1}, {x0}:{x1}]; expected "
                                    f"{(y1 - y0, x1 - x0)}"
                                )
                            block = block.astype(dt, copy=False)
                            if reduced:
                                small = _downsample2(block)
                                reduced[0][
                                    c,
                                    y0 // 2 : y0 // 2 + small.shape[0],
                                    x0 // 2 : x0 // 2 + small.shape[1],
                                ] = small
                            yield np.ascontiguousarray(block)

            def level_tiles(arr: np.ndarray) -> Iterator[np.ndarray]:
                for c in range(arr.shape[0]):
                    for y0 in range(0, arr.shape[1], tile):
                        for x0 in range(0, arr.shape[2], tile):
                            yield np.ascontiguousarray(arr[c, y0 : y0 + tile, x0 : x0 + tile])

            metadata: dict[str, Any] = {
                "axes": "CYX",
                "Name": name,
                "Channel": {"Name": list(channel_names)},
            }
            if pixel_size_um:
                metadata.update(
                    PhysicalSizeX=float(pixel_size_um[0]),
                    PhysicalSizeXUnit="µm",
                    PhysicalSizeY=float(pixel_size_um[1]),
                    PhysicalSizeYUnit="µm",
                )
            kw: dict[str, Any] = {
                "tile": (tile, tile),
                "photometric": "minisblack",
                "compression": compression,
            }
            if compression == "zlib":
                kw["compressionargs"] = {"level": 1}
            with tifffile.TiffWriter(tmp_dir / PIXELS, bigtiff=True, ome=True) as tw:
                tw.write(
                    level0_tiles(),
                    shape=(size_c, size_y, size_x),
                    dtype=dt,
                    metadata=metadata,
                    subifds=len(reduced),
                    **kw,
                )
                for i, arr in enumerate(reduced):
                    if i + 1 < len(reduced):  # next level from this one, in row bands
                        nxt = reduced[i + 1]
                        for c in range(size_c):
                            for y0 in range(0, arr.shape[1], 2 * tile):
                                small = _downsample2(np.asarray(arr[c, y0 : y0 + 2 * tile]))
                                nxt[c, y0 // 2 : y0 // 2 + small.shape[0], : small.shape[1]] = small
                    arr.flush()
                    tw.write(
                        level_tiles(arr),
                        shape=arr.shape,
                        dtype=dt,
                        subfiletype=1,
                        metadata=None,
                        **kw,
                    )
            reduced.clear()
            for p in tmp_dir.glob(".level*.npy"):
                p.unlink()
            meta = {
                "image_id": image_id,
                "name": name,
                "size_x": int(size_x),
                "size_y": int(size_y),
                "size_c": size_c,
                "dtype": dt.name,
                "channel_names": list(channel_names),
                "pixel_size_um": list(pixel_size_um) if pixel_size_um else None,
                "level_shapes": [list(s) for s in shapes],
                "tile": tile,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 - 3.10
            }
            atomic_write_json(tmp_dir / "image.json", meta)
            os.rename(tmp_dir, self.images_dir / str(image_id))
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return image_id

    def delete_image(self, image_id: int) -> None:
        """Remove an image and all its records (ids are never reused)."""
        path = self._image_dir(image_id)
        trash = self.images_dir / f".trash-{image_id}-{uuid.uuid4().hex[:8]}"
        with file_lock(path / ".lock"):
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self.close()

    # ROIs ------------------------------------------------------------------
    def get_rois(self, image_id: int, namespace: str | None = None) -> list[Roi]:
        """ROIs of the image, by id; with ``namespace``, only those written under it."""
        recs = _read_json(self._image_dir(image_id) / "rois.json", {"rois": []})["rois"]
        out = []
        for r in recs:
            if namespace is not None and r.get("namespace") != namespace:
                continue
            shapes = tuple(shape_from_json(s) for s in r["shapes"])
            out.append(Roi(int(r["roi_id"]), shapes, str(r.get("name", "")), r.get("namespace")))
        return out

    def _write_rois(
        self, image_id: int, rois: Sequence[NewRoi], namespace: str | None, replace: bool
    ) -> list[int]:
        """New ROIs first (one atomic write), then, with ``replace``, the namespace's older
        ones deleted in chunks (:meth:`delete_rois`): a crash in between leaves old + new,
        never an image without results."""
        path = self._image_dir(image_id)
        new = []
        for roi in rois:
            if not roi.shapes:
                raise StoreError("an ROI needs at least one shape")
            new.append({"name": roi.name, "shapes": [shape_to_json(s) for s in roi.shapes]})
        with file_lock(path / ".lock"):
            recs = _read_json(path / "rois.json", {"rois": []})["rois"]
            old = [int(r["roi_id"]) for r in recs if r.get("namespace") == namespace]
            ids = self._next_ids("roi", len(new)) if new else []
            for roi_id, rec in zip(ids, new, strict=True):
                recs.append(
                    {
                        "roi_id": roi_id,
                        "name": rec["name"],
                        "namespace": namespace,
                        "shapes": rec["shapes"],
                    }
                )
            atomic_write_json(path / "rois.json", {"rois": recs})
        if replace and old:
            self.delete_rois(image_id, old)
        return ids

    def delete_rois(self, image_id: int, roi_ids: Sequence[int],
                    batch: int = DELETE_BATCH) -> None:
        """Delete ROIs by id, ``batch`` per atomic write (like the OMERO store's batches)."""
        path = self._image_dir(image_id)
        todo = [int(i) for i in roi_ids]
        for i in range(0, len(todo), batch):
            chunk = set(todo[i : i + batch])
            with file_lock(path / ".lock"):
                recs = _read_json(path / "rois.json", {"rois": []})["rois"]
                recs = [r for r in recs if int(r["roi_id"]) not in chunk]
                atomic_write_json(path / "rois.json", {"rois": recs})

    def write_rois(
        self, image_id: int, rois: Sequence[NewRoi], namespace: str, replace: bool = True
    ) -> list[int]:
        """Write ROIs under ``namespace``; ``replace`` then deletes the namespace's older ones
        (new first, so an interrupted replace leaves old + new, never none)."""
        if not namespace:
            raise StoreError(
                "write_rois needs a namespace (e.g. 'omeflow/nuclei'); for ROIs people drew "
                "use LocalStore.add_rois"
            )
        return self._write_rois(image_id, rois, namespace, replace)

    def add_rois(self, image_id: int, rois: Sequence[NewRoi]) -> list[int]:
        """Add ROIs as if people drew them (namespace None; never replaced by writers)."""
        return self._write_rois(image_id, rois, None, replace=False)

    def add_roi(self, image_id: int, *shapes: Shape, name: str = "") -> int:
        """Add one people-drawn ROI made of ``shapes``; returns its id."""
        return self.add_rois(image_id, [NewRoi(tuple(shapes), name)])[0]

    # map annotations ---------------------------------------------------------
    def get_map_annotations(
        self, image_id: int, namespace: str | None = None
    ) -> list[MapAnnotation]:
        """Map annotations on the image (optionally only one namespace)."""
        path = self._image_dir(image_id) / "annotations.json"
        recs = _read_json(path, {"map_annotations": []})["map_annotations"]
        return [
            MapAnnotation(r["namespace"], dict(r["values"]))
            for r in recs
            if namespace is None or r["namespace"] == namespace
        ]

    def write_map_annotation(
        self, image_id: int, namespace: str, values: dict[str, str], replace: bool = True
    ) -> None:
        """Attach key/values under ``namespace`` (keys and values stored as strings)."""
        if not namespace:
            raise StoreError("write_map_annotation needs a namespace, e.g. 'omeflow/ecdf'")
        path = self._image_dir(image_id)
        vals = {str(k): str(v) for k, v in values.items()}
        with file_lock(path / ".lock"):
            recs = _read_json(path / "annotations.json", {"map_annotations": []})["map_annotations"]
            if replace:
                recs = [r for r in recs if r["namespace"] != namespace]
            (ann_id,) = self._next_ids("map")
            recs.append({"id": ann_id, "namespace": namespace, "values": vals})
            atomic_write_json(path / "annotations.json", {"map_annotations": recs})

    # attachments -----------------------------------------------------------
    def attach_file(
        self,
        image_id: int,
        path: Path,
        namespace: str,
        name: str | None = None,
        mimetype: str = "application/octet-stream",
        replace: bool = True,
    ) -> int:
        """Copy ``path`` into the store; ``replace`` drops earlier ones of same name + ns."""
        src = checked_attachment(path, namespace)
        fname = _safe_name(name or src.name)
        img = self._image_dir(image_id)
        att_dir = img / "attachments"
        att_dir.mkdir(exist_ok=True)
        (file_id,) = self._next_ids("file")
        staging = att_dir / f".tmp-{file_id}"
        staging.mkdir()
        try:
            shutil.copyfile(src, staging / fname)
            size = (staging / fname).stat().st_size
            with file_lock(img / ".lock"):
                index = _read_json(img / "attachments.json", {"attachments": []})["attachments"]
                dropped = []
                if replace:
                    keep = []
                    for a in index:
                        same = a["name"] == fname and a["namespace"] == namespace
                        (dropped if same else keep).append(a)
                    index = keep
                os.rename(staging, att_dir / str(file_id))
                index.append(
                    {
                        "file_id": file_id,
                        "name": fname,
                        "namespace": namespace,
                        "size": size,
                        "mimetype": mimetype,
                    }
                )
                atomic_write_json(img / "attachments.json", {"attachments": index})
            for a in dropped:
                shutil.rmtree(att_dir / str(a["file_id"]), ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return file_id

    def write_table(
        self, image_id: int, columns: TableColumns, name: str, replace: bool = True
    ) -> int:
        """Attach the table as a Parquet file under :data:`BULK_ANNOTATIONS_NS`."""
        import tempfile

        import pyarrow as pa
        import pyarrow.parquet as pq

        checked_table(columns, name)
        self._image_dir(image_id)  # names the fix for an unknown image before any work
        with tempfile.TemporaryDirectory(prefix="omeflow-table-") as tmp:
            path = Path(tmp) / _safe_name(name)
            pq.write_table(pa.table({k: list(v) for k, v in columns.items()}), path)
            return self.attach_file(image_id, path, BULK_ANNOTATIONS_NS, name=path.name,
                                    mimetype="application/vnd.apache.parquet",
                                    replace=replace)

    def list_attachments(self, image_id: int, namespace: str | None = None) -> list[Attachment]:
        """Files attached to the image, by id."""
        index = _read_json(self._image_dir(image_id) / "attachments.json", {"attachments": []})
        return [
            Attachment(
                int(a["file_id"]),
                a["name"],
                a["namespace"],
                int(a["size"]),
                a.get("mimetype", "application/octet-stream"),
            )
            for a in index["attachments"]
            if namespace is None or a["namespace"] == namespace
        ]

    def attachment_path(self, image_id: int, file_id: int) -> Path:
        """Where an attachment's bytes live (read-only use)."""
        for a in self.list_attachments(image_id):
            if a.file_id == int(file_id):
                return self._image_dir(image_id) / "attachments" / str(a.file_id) / a.name
        have = [a.file_id for a in self.list_attachments(image_id)]
        raise StoreError(
            f"image {image_id} has no attachment {file_id}; its attachments are {have} "
            "(list them with list_attachments)"
        )

    def read_attachment(self, image_id: int, file_id: int) -> bytes:
        """The bytes of one attachment."""
        return self.attachment_path(image_id, file_id).read_bytes()
