"""The result file of one tile: ``<image_dir>/segmentation/tiles/<ty>_<tx>.npz``.

It holds every nucleus the tile *owns* (centroid in its core) plus its seam *candidates*
(centroid outside the core but within the claim margin; see :mod:`.tiling`), each with its
level-0 centroid, area, bounding box, boolean mask crop and window statistics. Files are
written to a temporary name and renamed, so a file that exists is complete: that is what
resume relies on. ``config_key`` records the settings that produced it; a file with another
key is stale and recomputed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


@dataclass
class TileResult:
    """Nuclei found by one tile (arrays are parallel, one entry per nucleus)."""

    tile: int
    ty: int
    tx: int
    config_key: str
    local: np.ndarray  # int32 Cellpose label inside the tile
    cy: np.ndarray  # float64 level-0 centroid row
    cx: np.ndarray  # float64 level-0 centroid column
    area: np.ndarray  # int64 pixels
    bbox: np.ndarray  # int64 (n, 4): y0, x0, y1, x1 level-0, half-open
    owned: np.ndarray  # bool: centroid in this tile's core
    mask_flat: np.ndarray  # bool, all crops raveled and concatenated
    mask_offsets: np.ndarray  # int64 (n + 1,)
    stats: np.ndarray  # float64 (n, channels, 4)
    info: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.local)

    def mask(self, i: int) -> np.ndarray:
        """Boolean crop of nucleus ``i`` (shape of its bbox)."""
        y0, x0, y1, x1 = self.bbox[i]
        crop = self.mask_flat[self.mask_offsets[i]:self.mask_offsets[i + 1]]
        return crop.reshape(int(y1 - y0), int(x1 - x0))


def tile_path(tiles_dir: Path, ty: int, tx: int) -> Path:
    return Path(tiles_dir) / f"{ty}_{tx}.npz"


def save(result: TileResult, path: Path) -> None:
    """Write atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    info_keys = sorted(result.info)
    np.savez(
        tmp, format_version=FORMAT_VERSION, tile=result.tile, ty=result.ty, tx=result.tx,
        config_key=np.array(result.config_key), local=result.local, cy=result.cy,
        cx=result.cx, area=result.area, bbox=result.bbox, owned=result.owned,
        mask_flat=result.mask_flat, mask_offsets=result.mask_offsets, stats=result.stats,
        info_keys=np.array(info_keys, dtype=str),
        info_values=np.array([result.info[k] for k in info_keys], dtype=np.float64),
    )
    os.replace(tmp, path)


def load(path: Path) -> TileResult:
    with np.load(path, allow_pickle=False) as z:
        keys = [str(k) for k in z["info_keys"]]
        return TileResult(
            tile=int(z["tile"]), ty=int(z["ty"]), tx=int(z["tx"]),
            config_key=str(z["config_key"]), local=z["local"], cy=z["cy"], cx=z["cx"],
            area=z["area"], bbox=z["bbox"], owned=z["owned"], mask_flat=z["mask_flat"],
            mask_offsets=z["mask_offsets"], stats=z["stats"],
            info=dict(zip(keys, z["info_values"].tolist(), strict=True)),
        )


def read_config_key(path: Path) -> str | None:
    """The config key of an existing result file, or None if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["config_key"])
    except (OSError, KeyError, ValueError):
        return None
