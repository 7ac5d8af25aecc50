"""The crops the classifier sees, the same for training and prediction.

A crop is ``size`` x ``size`` level-0 pixels of the chosen channels centred on a nucleus
(zero outside the image), read from the image's OME-Zarr in tiles (:func:`hpc_jobs.crops.windows`:
each tile once, with a margin). Each channel is normalised like the annotation crops that
people label: ``[lo, hi]`` -> ``[0, 1]``, clipped, where ``lo`` / ``hi`` are quantiles
(``display_low`` / ``display_high``) of the tissue eCDF of that channel (``ecdf`` step, the
histograms of all tissue ROIs of the image summed), so the same tissue brightness gives the
same input on every slide. The rule is stored with the model (``meta["display"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_jobs.crops import Display

if TYPE_CHECKING:
    import numpy as np

DISPLAY_RULE = "tissue-ecdf"
DEFAULT_LOW = 0.01
DEFAULT_HIGH = 0.995


def display_rule(low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH) -> dict[str, Any]:
    """The normalisation rule as stored in a model's meta."""
    if not 0 <= low < high <= 1:
        raise ValueError(f"display low={low} must be below high={high}, both in [0, 1]")
    return {"rule": DISPLAY_RULE, "low": low, "high": high}


def display_for(
    image_dir: Path, channels: Sequence[int], low: float = DEFAULT_LOW,
    high: float = DEFAULT_HIGH,
) -> Display:
    """Display range of ``channels`` (in that order) from the image's tissue eCDF."""
    import numpy as np
    import pandas as pd

    from hpc_jobs import ecdf_core, ngff

    path = Path(image_dir) / "ecdf" / "histograms.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run ecdf for this image first "
                                "(celldetector_preprocess)")
    dtype = ngff.open_level(ngff.image_zarr_path(Path(image_dir)), 0).dtype
    offset, n_bins = ecdf_core.histogram_bins(dtype)
    df = pd.read_parquet(path, columns=["channel", "value", "count"])
    lo, hi = [], []
    for c in channels:
        sub = df[df.channel == c]
        if sub.empty:
            raise ValueError(f"{path} has no histogram of channel {c}: rerun ecdf with all "
                             "channels for this image")
        hist = np.bincount(sub.value.to_numpy() - offset, weights=sub["count"].to_numpy(),
                           minlength=n_bins)
        lo.append(float(ecdf_core.quantile_from_hist(hist, low, offset) or 0))
        hi.append(float(ecdf_core.quantile_from_hist(hist, high, offset) or 0))
    return Display(lo=lo, hi=hi)


def normalise(window: np.ndarray, display: Display) -> np.ndarray:
    """``(C, h, w)`` pixels -> float32 in [0, 1] per channel by ``display``."""
    import numpy as np

    out = np.empty(window.shape, dtype=np.float32)
    for c in range(window.shape[0]):
        lo, hi = float(display.lo[c]), float(display.hi[c])
        span = hi - lo
        if span <= 0:
            out[c] = window[c] > lo
        else:
            out[c] = np.clip((window[c].astype(np.float32) - lo) / span, 0.0, 1.0)
    return out


def crops_for(
    image_dir: Path, xy: np.ndarray | Sequence[Sequence[float]], channels: Sequence[int],
    size: int, display: Display,
) -> np.ndarray:
    """Crops ``(n, len(channels), size, size)`` float32 around the points ``xy`` (n, 2) as
    ``(x, y)`` level-0 px (the nuclei table's columns), in the order given."""
    import numpy as np

    from hpc_jobs import ngff
    from hpc_jobs.crops import windows

    if size < 8 or size % 2:
        raise ValueError(f"crop size {size} must be even and >= 8")
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    arr = ngff.open_level(ngff.image_zarr_path(Path(image_dir)), 0)
    size_c = int(arr.shape[0])
    bad = [c for c in channels if not 0 <= c < size_c]
    if bad:
        raise ValueError(f"channel(s) {bad} out of range: the image has {size_c} channels")
    if len(display.lo) != len(channels):
        raise ValueError(f"display has {len(display.lo)} ranges for {len(channels)} channels")
    chans = list(channels)
    out = np.zeros((len(pts), len(chans), size, size), dtype=np.float32)
    if not len(pts):
        return out
    block = int((arr.shards or arr.chunks)[1])

    def read(y0: int, y1: int, x0: int, x1: int) -> tuple[Any, Any]:
        px = np.stack([np.asarray(arr[c, y0:y1, x0:x1]) for c in chans])
        return px, np.zeros((y1 - y0, x1 - x0), dtype=bool)

    centres = pts[:, ::-1]  # (y, x)
    for i, px, _ in windows(read, tuple(arr.shape[1:]), centres, size // 2, block):
        out[i] = normalise(px, display)
    return out
