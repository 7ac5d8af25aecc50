"""crops_for / display_for against a hand computation on a small exported image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpc_jobs import ngff
from hpc_jobs.classifier.data import crops_for, display_for
from hpc_jobs.crops import Display
from hpc_jobs.segmentation.synthetic import write_as_export


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 1000, size=(3, 300, 260), dtype=np.uint16)
    d = tmp_path / "images" / "7"
    write_as_export(ngff.image_zarr_path(d), img, chunk=64, block=128, image_id=7)
    (d / "ecdf").mkdir(parents=True)
    rows = []
    for roi in (1, 2):  # two tissue ROIs: display_for sums their histograms
        for c in range(3):
            # channel c: values 10*c .. 10*c + 99, one pixel each, per ROI
            for v in range(10 * c, 10 * c + 100):
                rows.append({"roi_id": roi, "roi": f"tissue_{roi}", "channel": c,
                             "channel_name": f"c{c}", "value": v, "count": 1})
    pd.DataFrame(rows).to_parquet(d / "ecdf" / "histograms.parquet")
    np.save(tmp_path / "img.npy", img)
    return d


def test_display_from_summed_tissue_ecdf(image_dir: Path) -> None:
    disp = display_for(image_dir, [2, 0], low=0.01, high=0.995)
    # 200 values per channel (100 per ROI, each twice): F(v) >= 0.01 first at v = 10c + 0
    # (2/200), F(v) >= 0.995 at the last value 10c + 99.
    assert list(disp.lo) == [20.0, 0.0]
    assert list(disp.hi) == [119.0, 99.0]
    with pytest.raises(ValueError, match="no histogram of channel 5"):
        display_for(image_dir, [5])


def test_crops_equal_normalised_windows_and_zero_outside(image_dir: Path) -> None:
    img = np.load(image_dir.parent.parent / "img.npy")
    disp = Display(lo=[100.0, 0.0], hi=[600.0, 1000.0])
    xy = np.array([[130.0, 150.0], [5.0, 290.0], [200.0, 20.0]])
    out = crops_for(image_dir, xy, channels=[2, 0], size=16, display=disp)
    assert out.shape == (3, 2, 16, 16) and out.dtype == np.float32
    for i, (x, y) in enumerate(xy.astype(int)):
        pad = np.pad(img, ((0, 0), (8, 8), (8, 8)))
        win = pad[[2, 0], y : y + 16, x : x + 16].astype(np.float32)
        want = np.stack([np.clip((win[0] - 100) / 500, 0, 1), np.clip(win[1] / 1000, 0, 1)])
        np.testing.assert_allclose(out[i], want, atol=1e-6)
    # point (5, 290): window columns -3..12; the 3 columns outside the image are 0.
    assert (out[1, 0, :, :3] == 0).all()
    with pytest.raises(ValueError, match="out of range"):
        crops_for(image_dir, xy, channels=[3], size=16, display=Display([0.0], [1.0]))
