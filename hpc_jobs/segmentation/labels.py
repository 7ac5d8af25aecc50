"""The OME-NGFF 0.5 label image ``<image.zarr>/labels/nuclei`` (zarr v3).

Layout (NGFF 0.5: metadata under the ``ome`` key of ``zarr.json`` attributes)::

    image.zarr/labels/zarr.json          {"ome": {"version": "0.5", "labels": ["nuclei"]}}
    image.zarr/labels/nuclei/zarr.json   {"ome": {"version": "0.5", "multiscales": [...],
                                                  "image-label": {"source": {"image": "../../"}}}}
    image.zarr/labels/nuclei/0           uint32 (y, x), same chunks / shards as the image
    image.zarr/labels/nuclei/1 ...       one level per image level, same shapes: nearest
                                         neighbour (level L pixel (i, j) = level-0 pixel
                                         (i * 2**L, j * 2**L)), so scale 2**L, no translation

Creation is race-free for array tasks: the group tree is built in a temporary folder inside
``image.zarr`` and moved into place with one ``rename``; whoever loses the race uses the
winner's (identical) array. Writers then only write whole shard-aligned tile cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import zarr

NAME = "nuclei"
NGFF_VERSION = "0.5"


def _image_scale(image_zarr: Path) -> tuple[list[float], list[str | None]]:
    """(scale, units) of the image's level-0 y and x axes, from its multiscales metadata."""
    try:
        attrs = json.loads((image_zarr / "zarr.json").read_text()).get("attributes", {})
        ms = (attrs.get("ome", attrs).get("multiscales") or [{}])[0]
        axes = ms.get("axes", [])
        ds = ms.get("datasets", [{}])[0]
        scale = next(t["scale"] for t in ds.get("coordinateTransformations", [])
                     if t.get("type") == "scale")
        names = [a["name"] if isinstance(a, dict) else a for a in axes]
        units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
        iy, ix = names.index("y"), names.index("x")
        return [float(scale[iy]), float(scale[ix])], [units[iy], units[ix]]
    except (OSError, ValueError, KeyError, StopIteration, IndexError, TypeError):
        return [1.0, 1.0], [None, None]


def _label_attrs(image_zarr: Path, levels: int) -> dict[str, Any]:
    scale, units = _image_scale(image_zarr)
    axes: list[dict[str, Any]] = []
    for name, unit in zip(("y", "x"), units, strict=True):
        axis: dict[str, Any] = {"name": name, "type": "space"}
        if unit:
            axis["unit"] = unit
        axes.append(axis)
    return {"ome": {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": NAME, "axes": axes,
            "datasets": [{"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": [v * 2 ** level for v in scale]}]}
                for level in range(levels)],
            "type": "nearest",
        }],
        "image-label": {"source": {"image": "../../"}},
    }}


def _build(root: Path, shapes: list[tuple[int, int]], chunks: tuple[int, int],
           shards: tuple[int, int] | None, image_zarr: Path) -> None:
    group = zarr.open_group(root, mode="w", zarr_format=3)
    group.attrs.update(_label_attrs(image_zarr, len(shapes)))
    for level, shape in enumerate(shapes):
        group.create_array(str(level), shape=shape, chunks=chunks, shards=shards,
                           dtype="uint32", fill_value=0, dimension_names=["y", "x"])


def _complete(target: Path, shapes: list[tuple[int, int]]) -> bool:
    """Whether ``target`` has exactly the label levels of ``shapes`` (older runs wrote one)."""
    try:
        ms = json.loads((target / "zarr.json").read_text())["attributes"]["ome"]["multiscales"]
        if len(ms[0]["datasets"]) != len(shapes):
            return False
        return all(tuple(zarr.open_array(target / str(level), mode="r").shape) == shape
                   for level, shape in enumerate(shapes))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def ensure_labels(image_zarr: Path, shapes: list[tuple[int, int]], chunks: tuple[int, int],
                  shards: tuple[int, int] | None) -> list[zarr.Array]:
    """Create ``labels/nuclei`` with one level per ``shapes`` entry (the image's pyramid) once,
    atomically, and return its arrays. A label group with other levels (an older run's, or
    another image size) is replaced: callers hold the image's exclusive lock."""
    image_zarr = Path(image_zarr)
    labels_dir = image_zarr / "labels"
    target = labels_dir / NAME
    shapes = [tuple(int(v) for v in s) for s in shapes]  # type: ignore[misc]
    if target.exists() and not _complete(target, shapes):
        trash = image_zarr / f".trash-labels-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if not target.exists():
        tmp = image_zarr / f".tmp-labels-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            if not labels_dir.exists():
                top = zarr.open_group(tmp, mode="w", zarr_format=3)
                top.attrs.update({"ome": {"version": NGFF_VERSION, "labels": [NAME]}})
                _build(tmp / NAME, shapes, chunks, shards, image_zarr)
                with contextlib.suppress(OSError):  # another writer created it first
                    os.rename(tmp, labels_dir)
            if not target.exists():
                _build(tmp / NAME, shapes, chunks, shards, image_zarr)
                try:
                    os.rename(tmp / NAME, target)
                    _register(labels_dir)
                except OSError:
                    pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [zarr.open_array(target / str(level), mode="r+") for level in range(len(shapes))]


def _register(labels_dir: Path) -> None:
    """Add ``nuclei`` to the ``labels`` list of an existing labels group."""
    group = zarr.open_group(labels_dir, mode="r+", zarr_format=3)
    ome = dict(group.attrs.get("ome", {}))
    names = list(ome.get("labels", []))
    if NAME not in names:
        names.append(NAME)
    ome.update({"version": NGFF_VERSION, "labels": names})
    group.attrs["ome"] = ome
