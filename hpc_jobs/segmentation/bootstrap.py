"""Train the small fallback Cellpose nuclei model on synthetic nuclei (``omeflow bootstrap-model``).

No model weights can be downloaded on the cluster (or in CI), so the platform can train its
own: a Cellpose 3.x ``CPnet`` (nchan=2, diam_mean=20) trained from scratch on rendered
nuclei (:mod:`.synthetic`) in log(1+DAPI) space, like the real pipeline sees them.

Known pitfall handled here: after a short run (~20 epochs on 128 px crops) the BatchNorm
running statistics lag far behind the weights, and the model in eval mode finds no seeds.
We therefore re-estimate them: reset the running stats, run the net in train mode without
gradients over augmented training crops (cumulative average), then switch to eval mode and
save. The result is cached in ``$OMEFLOW_CACHE/models/`` (default ``~/.cache/omeflow``);
:func:`ensure_model` trains at most once, under a file lock, so concurrent callers wait for
the first one instead of training twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpc_jobs.fsutil import atomic_write, file_lock
from hpc_jobs.segmentation.model import BOOTSTRAP_MODEL_NAME, cache_dir, preprocess, segment
from hpc_jobs.segmentation.synthetic import render_nuclei

DIAM_MEAN = 20.0
CROP = 128


def _net_input(img: np.ndarray) -> np.ndarray:
    """(2, y, x) float32 exactly as ``CellposeModel.eval`` feeds a grayscale image."""
    from cellpose import models, transforms

    x = transforms.convert_image(img, [0, 0], nchan=2)
    params = {**models.normalize_default, "normalize": True, "invert": False}
    x = transforms.normalize_img(x, **params)
    return np.ascontiguousarray(x.transpose(2, 0, 1).astype(np.float32))


def _dataset(n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    imgs, lbls = [], []
    for i in range(n):
        img, lab = render_nuclei((size, size), seed=seed + i)
        imgs.append(_net_input(preprocess(img[0])))
        lbls.append(lab)
    return imgs, lbls


def _recalibrate_batchnorm(net: Any, imgs: list[np.ndarray], rounds: int, seed: int) -> None:
    """Re-estimate BatchNorm running stats: train mode, no gradients, cumulative average."""
    import torch
    from cellpose import transforms

    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches below
    np.random.seed(seed)
    net.train()
    with torch.no_grad():
        for _ in range(rounds):
            idx = np.random.permutation(len(imgs))[:8]
            crops = transforms.random_rotate_and_resize(
                [imgs[i] for i in idx], rescale=np.ones(len(idx)), scale_range=0.5,
                xy=(CROP, CROP),
            )[0]
            net(torch.from_numpy(crops).to(net.device))
    for m in bns:
        m.momentum = 0.1
    net.eval()


def evaluate(model_path: Path, size: int = 256, seed: int = 10_000) -> dict[str, float]:
    """AP@0.5 (and F1) of a model file on a fresh synthetic image."""
    from cellpose import metrics

    from hpc_jobs.segmentation.model import load_model

    img, truth = render_nuclei((size, size), seed=seed)
    pred = segment(load_model(model_path), preprocess(img[0]), diameter=DIAM_MEAN)
    ap, tp, fp, fn = metrics.average_precision([truth], [pred], threshold=[0.5])
    f1 = 2 * tp[0, 0] / max(1.0, 2 * tp[0, 0] + fp[0, 0] + fn[0, 0])
    return {"ap50": float(ap[0, 0]), "f1": float(f1), "n_true": int(truth.max()),
            "n_pred": int(pred.max())}


def train(out: Path, epochs: int = 20, n_images: int = 32, size: int = 160, seed: int = 0,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and save the bootstrap model to ``out`` (a file path); return its metadata."""
    import torch
    from cellpose import models
    from cellpose import train as cp_train

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    imgs, lbls = _dataset(n_images, size, seed)
    model = models.CellposeModel(gpu=False, pretrained_model=False, nchan=2,
                                 diam_mean=DIAM_MEAN, mkldnn=False)
    net = model.net
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        log(f"bootstrap: training {epochs} epochs on {n_images} synthetic {size}px images")
        cp_train.train_seg(
            net, train_data=imgs, train_labels=lbls, channels=None, normalize=False,
            n_epochs=epochs, batch_size=8, bsize=CROP, learning_rate=0.005,
            weight_decay=1e-5, save_path=tmp, save_every=10_000, min_train_masks=5,
            model_name="tmp",
        )
        t_train = time.perf_counter() - t0
        _recalibrate_batchnorm(net, imgs, rounds=30, seed=seed + 1)
        tmp_file = Path(tmp) / "weights"
        net.save_model(str(tmp_file))
        os.replace(tmp_file, out)
    meta: dict[str, Any] = {
        "name": BOOTSTRAP_MODEL_NAME, "epochs": epochs, "n_images": n_images, "size": size,
        "crop": CROP, "diam_mean": DIAM_MEAN, "seed": seed,
        "train_seconds": round(t_train, 1),
        "seconds": round(time.perf_counter() - t0, 1), "cellpose": _cellpose_version(),
        "torch": torch.__version__,
    }
    meta["eval"] = evaluate(out)
    log(f"bootstrap: {meta}")
    return meta


def _cellpose_version() -> str:
    from importlib.metadata import version

    return version("cellpose")


def ensure_model(out_dir: Path | None = None, epochs: int = 20, force: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Return the bootstrapped model path, training it first if it is not cached yet.

    Safe to call from several processes at once: one trains, the others wait on a lock and
    then find the file.
    """
    out_dir = Path(out_dir) if out_dir else cache_dir() / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BOOTSTRAP_MODEL_NAME
    with file_lock(out_dir / f".{BOOTSTRAP_MODEL_NAME}.lock"):
        if path.is_file() and not force:
            return path
        meta = train(path, epochs=epochs, log=log)
        atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2), mode=0o644)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``omeflow bootstrap-model``."""
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the weights (default: $OMEFLOW_CACHE/models, "
                             "OMEFLOW_CACHE defaulting to ~/.cache/omeflow)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")


def main(args: argparse.Namespace) -> int:
    """Train (or find) the bootstrap model and print its path."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("cellpose.train").setLevel(logging.INFO)
    if shutil.which("nvidia-smi") is None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    path = ensure_model(args.out, epochs=args.epochs, force=args.force)
    meta = path.with_suffix(".json")
    print(path)
    if meta.is_file():
        print(meta.read_text())
    return 0
