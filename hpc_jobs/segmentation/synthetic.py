"""Synthetic nuclei images with ground-truth labels (model bootstrap, tests, benchmarks).

Nuclei are filled ellipses (semi-axes ~7-11 px, so diameter ~20 px) on a jittered grid,
with per-nucleus brightness, a little texture, optical blur and camera noise, rendered as
uint16 like a DAPI channel. Extra channels (markers) are smooth noise with bright nuclei in
a random subset, so the per-nucleus statistics have something to measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import zarr


@dataclass(frozen=True)
class NucleiSpec:
    """Parameters of the rendered nuclei."""

    radius_min: float = 7.0
    radius_max: float = 11.0
    spacing: int = 30
    occupancy: float = 0.75
    background: float = 300.0
    brightness: tuple[float, float] = (1500.0, 5000.0)
    noise_sigma: float = 60.0
    blur_sigma: float = 1.0


def render_nuclei(
    shape: tuple[int, int],
    seed: int = 0,
    spec: NucleiSpec | None = None,
    channels: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``(image, labels)``: image (channels, y, x) uint16, labels (y, x) int32.

    Nuclei never overlap (each lives in its own jittered grid cell), so ``labels`` is exact
    ground truth; label ids are 1..N in row-major order of the grid.
    """
    spec = spec or NucleiSpec()
    rng = np.random.default_rng(seed)
    h, w = shape
    s = spec.spacing
    rmax = spec.radius_max
    labels = np.zeros((h, w), np.int32)
    dapi = np.zeros((h, w), np.float32)
    jitter = max(0.0, s / 2 - rmax - 1.0)
    next_id = 1
    for cy0 in np.arange(s / 2, h, s):
        for cx0 in np.arange(s / 2, w, s):
            if rng.random() > spec.occupancy:
                continue
            cy = cy0 + rng.uniform(-jitter, jitter)
            cx = cx0 + rng.uniform(-jitter, jitter)
            a = rng.uniform(spec.radius_min, spec.radius_max)
            b = rng.uniform(spec.radius_min, min(spec.radius_max, a * 1.0 + 1e-6))
            theta = rng.uniform(0, np.pi)
            y0, y1 = int(max(0, np.floor(cy - rmax - 1))), int(min(h, np.ceil(cy + rmax + 2)))
            x0, x1 = int(max(0, np.floor(cx - rmax - 1))), int(min(w, np.ceil(cx + rmax + 2)))
            if y1 <= y0 or x1 <= x0:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
            inside = u * u + v * v <= 1.0
            if inside.sum() < 20:
                continue
            level = rng.uniform(*spec.brightness)
            texture = 1.0 + 0.15 * rng.standard_normal(inside.shape).astype(np.float32)
            labels[y0:y1, x0:x1][inside] = next_id
            dapi[y0:y1, x0:x1][inside] = level * texture[inside]
            next_id += 1
    dapi = ndimage.gaussian_filter(dapi, spec.blur_sigma)
    out = np.empty((channels, h, w), np.uint16)
    out[0] = _finish(dapi + spec.background, spec.noise_sigma, rng)
    for c in range(1, channels):
        marker = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 8)
        marker = 150.0 + 400.0 * marker
        ids = np.arange(1, next_id)
        positive = ids[rng.random(ids.size) < 0.2]
        marker[np.isin(labels, positive)] += 600.0
        out[c] = _finish(marker, spec.noise_sigma, rng)
    return out, labels


def _finish(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    img = img + sigma * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 65535).astype(np.uint16)


def write_as_export(path: Path, image: np.ndarray, chunk: int, block: int,
                    image_id: int | None = None) -> zarr.Group:
    """Write (c, y, x) uint16 pixels at ``path`` in the layout ``export_zarr`` writes
    (OME-NGFF 0.5 via :func:`hpc_jobs.ngff.create_image`, every pyramid level filled, marked
    complete), so steps read it as an exported image. Replaces what is at ``path``."""
    from hpc_jobs import ngff

    group = ngff.create_image(
        path, size_c=image.shape[0], shape_yx=image.shape[1:], dtype=str(image.dtype),
        channel_names=[f"c{i}" for i in range(image.shape[0])], chunk=chunk, block=block,
        extra_attrs={"image_id": image_id, "complete": False}, overwrite=True,
    )
    level = image
    for i, _ in enumerate(ngff.multiscale(group)["datasets"]):
        if i:
            level = ngff.downsample_mean(level)
        group[str(i)][...] = level
    group.attrs["omeflow"] = {**dict(group.attrs["omeflow"]), "complete": True}
    return group
