"""The on-disk layout of an image on cluster storage: one OME-Zarr (NGFF 0.5, Zarr v3) group.

Layout of ``<data_root>/images/<id>/image.zarr``::

    zarr.json            group; attributes["ome"] = {"version": "0.5", "multiscales", "omero"}
                         attributes["omeflow"] = {"image_id", "block_size", "complete"}
    0/zarr.json, 0/c/... level 0, shape (c, y, x), the image dtype
    1/ ...               2x mean-downsampled in y and x, and so on
    .omeflow-progress    append-only log of the blocks the export finished (see export_zarr)

Every level has chunks ``(1, chunk, chunk)`` (default 1024) inside shards ``(1, block, block)``
(default 2048): one file per shard and channel. Writers and readers work in *blocks* that are
exactly the shards (:func:`blocks`), so no two writers ever touch one shard file.

The pyramid halves y and x (``ceil(n / 2)``, mean of the 2x2 neighbourhood, edge pixels average
what exists) until the largest side fits in one chunk. Level ``L`` has scale ``2**L`` times the
physical pixel size and a translation of ``(2**L - 1) / 2`` level-0 pixels (pixel centres of a
mean-downsampled level sit between the level-0 centres they average).

numpy and zarr are imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import zarr

NGFF_VERSION = "0.5"
DEFAULT_CHUNK = 1024
DEFAULT_BLOCK = 2048
PROGRESS_FILE = ".omeflow-progress"

Block = tuple[int, int, int, int]


class ZarrLayoutError(ValueError):
    """The Zarr on disk is missing or does not match what a step expects. Names the fix."""


def image_zarr_path(image_dir: Path) -> Path:
    """Where the OME-Zarr of an image lives inside its data folder."""
    return Path(image_dir) / "image.zarr"


def level_shapes(shape_yx: tuple[int, int], stop_at: int = DEFAULT_CHUNK) -> list[tuple[int, int]]:
    """(y, x) of every pyramid level: halve (ceil) until the largest side is ``<= stop_at``."""
    y, x = int(shape_yx[0]), int(shape_yx[1])
    if y < 1 or x < 1:
        raise ValueError(f"image shape {shape_yx} is empty")
    shapes = [(y, x)]
    while max(y, x) > stop_at:
        y, x = -(-y // 2), -(-x // 2)
        shapes.append((y, x))
    return shapes


def blocks(shape_yx: tuple[int, int], block: int) -> list[Block]:
    """Row-major tiling of ``shape_yx`` into ``block`` squares: ``[(y0, y1, x0, x1), ...]``.

    Edge blocks are clipped to the image, so every pixel is in exactly one block.
    """
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    ny, nx = int(shape_yx[0]), int(shape_yx[1])
    return [
        (y0, min(y0 + block, ny), x0, min(x0 + block, nx))
        for y0 in range(0, ny, block)
        for x0 in range(0, nx, block)
    ]


def blocks_intersecting(
    shape_yx: tuple[int, int], block: int, bbox: tuple[float, float, float, float]
) -> list[Block]:
    """The blocks of :func:`blocks` that meet ``bbox = (ymin, ymax, xmin, xmax)`` (pixels)."""
    ymin, ymax, xmin, xmax = bbox
    return [
        b
        for b in blocks(shape_yx, block)
        if b[0] < ymax and b[1] > ymin and b[2] < xmax and b[3] > xmin
    ]


def dtype_window(dtype: Any) -> tuple[float, float]:
    """The full value range of ``dtype`` (integer limits; 0..1 for floats)."""
    import numpy as np

    dt = np.dtype(dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def _ome_attrs(
    name: str,
    shapes: Sequence[tuple[int, int]],
    dtype: Any,
    channel_names: Sequence[str],
    pixel_size_um: tuple[float, float] | None,
) -> dict[str, Any]:
    """The ``attributes["ome"]`` block of NGFF 0.5 for an image of these levels."""
    space: dict[str, Any] = {"type": "space"}
    if pixel_size_um is not None:
        space["unit"] = "micrometer"
    px, py = pixel_size_um if pixel_size_um is not None else (1.0, 1.0)
    datasets = []
    for level in range(len(shapes)):
        f = 2**level
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, py * f, px * f]},
                    {
                        "type": "translation",
                        "translation": [0.0, py * (f - 1) / 2, px * (f - 1) / 2],
                    },
                ],
            }
        )
    lo, hi = dtype_window(dtype)
    palette = ["0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF"]
    channels = [
        {
            "label": label,
            "color": palette[i % len(palette)] if len(channel_names) > 1 else "FFFFFF",
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"min": lo, "max": hi, "start": lo, "end": hi},
        }
        for i, label in enumerate(channel_names)
    ]
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", **space},
                    {"name": "x", **space},
                ],
                "datasets": datasets,
                "type": "mean",
            }
        ],
        "omero": {"name": name, "channels": channels, "rdefs": {"model": "color"}},
    }


def create_image(
    path: Path,
    *,
    size_c: int,
    shape_yx: tuple[int, int],
    dtype: str,
    channel_names: Sequence[str],
    pixel_size_um: tuple[float, float] | None = None,
    name: str = "",
    chunk: int = DEFAULT_CHUNK,
    block: int = DEFAULT_BLOCK,
    extra_attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> zarr.Group:
    """Create an empty OME-NGFF 0.5 image group with every pyramid level (fill value 0).

    Every level gets chunks ``(1, chunk, chunk)`` and shards ``(1, block, block)``; ``block`` must
    be a multiple of ``chunk``. The pyramid stops once the largest side fits in one chunk.
    """
    import numpy as np
    import zarr
    from zarr.codecs import BloscCodec

    if chunk < 1 or block < chunk or block % chunk:
        raise ValueError(
            f"block size {block} must be a positive multiple of the chunk size {chunk} "
            "(a shard holds whole chunks); e.g. block_size=2048, chunk_size=1024"
        )
    if len(channel_names) != size_c:
        raise ValueError(f"{len(channel_names)} channel names for {size_c} channels")
    dt = np.dtype(dtype)
    shapes = level_shapes(shape_yx, stop_at=chunk)
    attrs: dict[str, Any] = {
        "ome": _ome_attrs(name, shapes, dt, list(channel_names), pixel_size_um),
        "omeflow": {"block_size": block, "chunk_size": chunk, **(extra_attrs or {})},
    }
    group = zarr.create_group(str(path), zarr_format=3, attributes=attrs, overwrite=overwrite)
    compressor = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=dt.itemsize)
    for level, (ny, nx) in enumerate(shapes):
        group.create_array(
            str(level),
            shape=(size_c, ny, nx),
            dtype=dt,
            chunks=(1, chunk, chunk),
            shards=(1, block, block),
            compressors=[compressor],
            fill_value=0,
            dimension_names=("c", "y", "x"),
        )
    return group


def open_image(path: Path, mode: str = "r") -> zarr.Group:
    """Open an image group; :class:`ZarrLayoutError` says how to create it if it is missing."""
    import zarr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise ZarrLayoutError(f"no OME-Zarr at {path}; run export_zarr for this image first")
    group = zarr.open_group(str(path), mode=mode, zarr_format=3)  # type: ignore[arg-type]
    if "ome" not in group.attrs or "multiscales" not in group.attrs["ome"]:
        raise ZarrLayoutError(
            f"{path} is a Zarr group without OME-NGFF 0.5 multiscales; "
            "rerun export_zarr with overwrite=true"
        )
    return group


def multiscale(group: zarr.Group) -> dict[str, Any]:
    """The first ``multiscales`` entry of an opened image group."""
    return dict(group.attrs["ome"]["multiscales"][0])


def level_count(path: Path) -> int:
    """Number of pyramid levels of the image at ``path``."""
    return len(multiscale(open_image(path))["datasets"])


def open_level(path: Path, level: int = 0, mode: str = "r") -> zarr.Array:
    """The ``(c, y, x)`` array of one pyramid level; errors name the levels that exist."""
    group = open_image(path, mode=mode)
    datasets = multiscale(group)["datasets"]
    if not 0 <= level < len(datasets):
        raise ZarrLayoutError(
            f"{path} has levels 0..{len(datasets) - 1}; level={level} does not exist"
        )
    return group[datasets[level]["path"]]  # type: ignore[return-value]


def channel_names(path: Path) -> list[str]:
    """Channel labels (``omero.channels[].label``), or ``c0, c1, ...`` when absent."""
    group = open_image(path)
    omero = group.attrs["ome"].get("omero") or {}
    labels = [str(ch.get("label", "")) for ch in omero.get("channels", [])]
    size_c = open_level(path, 0).shape[0]
    if len(labels) != size_c or not all(labels):
        return [f"c{i}" for i in range(size_c)]
    return labels


def pixel_size_um(path: Path) -> tuple[float, float] | None:
    """Level-0 physical pixel size ``(x, y)`` in micrometres, or None when it is unknown."""
    ms = multiscale(open_image(path))
    axes = {a["name"]: a for a in ms["axes"]}
    if axes.get("x", {}).get("unit") != "micrometer":
        return None
    for t in ms["datasets"][0]["coordinateTransformations"]:
        if t["type"] == "scale":
            return float(t["scale"][2]), float(t["scale"][1])
    return None


def downsample_mean(data: np.ndarray) -> np.ndarray:
    """2x mean-downsampling of the last two axes (``ceil`` sizes; edges average what exists).

    Integers are averaged exactly and rounded half up; the result keeps the input dtype.
    """
    import numpy as np

    *lead, ny, nx = data.shape
    oy, ox = -(-ny // 2), -(-nx // 2)
    integer = data.dtype.kind in "ui"
    acc = np.zeros((*lead, oy, ox), dtype=np.int64 if integer else np.float64)
    cnt = np.zeros((oy, ox), dtype=np.int64)
    for dy in (0, 1):
        for dx in (0, 1):
            part = data[..., dy::2, dx::2]
            py, px = part.shape[-2:]
            acc[..., :py, :px] += part
            cnt[:py, :px] += 1
    if integer:
        return ((acc + cnt // 2) // cnt).astype(data.dtype)
    return (acc / cnt).astype(data.dtype)


def source_region(blk: Block, src_shape_yx: tuple[int, int]) -> Block:
    """The region of the level above that a block of the next (2x smaller) level averages."""
    y0, y1, x0, x1 = blk
    return (2 * y0, min(2 * y1, src_shape_yx[0]), 2 * x0, min(2 * x1, src_shape_yx[1]))


def shard_files(array_dir: Path) -> list[Path]:
    """Every chunk/shard data file under one level's directory (metadata excluded)."""
    return sorted(p for p in Path(array_dir).rglob("*") if p.is_file() and p.name != "zarr.json")


def describe_layout(arr: zarr.Array) -> str:
    """``shape=... dtype=... chunks=... shards=...`` of an array, for error messages."""
    return f"shape={tuple(arr.shape)} dtype={arr.dtype} chunks={arr.chunks} shards={arr.shards}"

