"""Step ``train_classifier``: a ResNet-50 cell classifier from a label snapshot.

Input: ``labels`` (``[image_id, nucleus_id, 0|1]``, at most
:data:`~hpc_jobs.classifier.snapshot.MAX_LABELS`) and its ``snapshot_hash``, checked here.
Positions come from each image's ``nuclei.parquet`` (``segment_nuclei``), never from the
caller; crops from the image's OME-Zarr through :func:`hpc_jobs.classifier.data.crops_for`
(the same function ``predict`` uses), normalised by the tissue eCDF display range.

Split, never by cell:

- held-out = ``holdout_fraction`` of the images (at least one; drawn with ``random_seed``);
  with one image only, ``holdout_fraction`` of its ``split_block`` x ``split_block`` px
  spatial blocks (``split.kind`` says which);
- early stopping watches the loss on spatial blocks of the *training* images
  (``early_stop_fraction``), so the held-out cells are used for nothing but the metrics and
  stay comparable between models (``compare_with``).

Training: random flips, 90-degree rotations and a small intensity jitter; each epoch draws
the training cells with equal weight per class (class balancing); AdamW; stops after
``patience`` epochs without a better early-stop loss and keeps the best weights. With
``random_seed`` and the same thread count a CPU run is reproducible. ``device``: ``auto``
(CUDA when present), ``cpu`` or ``cuda``; torch threads = the job's CPUs.

Metrics on the held-out cells: ROC-AUC, PR-AUC, F1 and confusion matrix at
``decision_threshold``, and the same for the marker-mean baseline (``c<marker>_mean`` of the
nuclei table, its threshold the best-F1 one on the training cells) and, with
``compare_with``, for that model.

Output: ``<site models.classifier folder>/<name>.pt`` + ``<name>.json``
(:func:`hpc_jobs.classifier.model.save_classifier`); the summary holds the path, params,
snapshot hash, split, metrics, git commit and timings.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from hpc_jobs.classifier.snapshot import MAX_LABELS, snapshot_hash
from hpc_jobs.progress import ProgressReporter
from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import DapiChannel, ImageId, MarkerChannel, ModelName

#: A file name in the site's classifier folder (no path: the folder is the site's choice).
NucleusId = Annotated[int, Field(ge=1, le=2**32 - 1)]
#: 1 positive, 0 negative. An int range, not ``Literal[0, 1]``: a Literal accepts JSON
#: ``true`` as 1 even in strict mode (True == 1), an int field in strict mode refuses it.
Label = Annotated[int, Field(ge=0, le=1)]
CLASS_NAMES = ["negative", "positive"]


class Params(StepParams):
    """Parameters of ``train_classifier`` (also the Airflow trigger form)."""

    labels: list[tuple[ImageId, NucleusId, Label]] = Field(
        min_length=2, max_length=MAX_LABELS,
        description="Label snapshot: [image_id, nucleus_id, 1 positive | 0 negative] (unsure "
        "left out); built from the annotation store by celldetector_train.",
    )
    snapshot_hash: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the canonical label snapshot (hpc_jobs.classifier.snapshot).",
    )
    name: ModelName | None = Field(
        None, description="Model file name (default: resnet50-<snapshot hash[:12]>-s<seed>).")
    marker_channel: MarkerChannel = -1
    dapi_channel: DapiChannel = 0
    input_size: int = Field(
        32, ge=16, le=128, multiple_of=8,
        description="Edge (level-0 px) of the crop around each nucleus the network sees.")
    epochs: int = Field(20, ge=1, le=500, description="Most training epochs.")
    patience: int = Field(
        4, ge=1, le=100, description="Stop after this many epochs without a lower "
        "early-stopping loss.")
    batch_size: int = Field(32, ge=2, le=1024, description="Crops per training batch.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW weight decay.")
    decision_threshold: float = Field(
        0.5, gt=0, lt=1, description="Probability above which a cell counts as positive.")
    holdout_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of images (one image: of spatial blocks) held "
        "out for the metrics.")
    early_stop_fraction: float = Field(
        0.15, gt=0, lt=1, description="Share of the training images' spatial blocks that "
        "watch the loss for early stopping.")
    split_block: int = Field(
        512, ge=64, le=16384, description="Edge (px) of the spatial blocks of a split.")
    random_seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed of split, sampling, augmentation and "
        "initialisation (a CPU run with the same threads is reproducible).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when the node has a GPU, else CPU.")
    pretrained: ModelName | None = Field(
        None, description="torchvision/ImageNet resnet50 weights file in the site's classifier "
        "folder to start from (default: random initialisation).")
    compare_with: ModelName | None = Field(
        None, description="A trained model (name in the site's classifier folder) to "
        "evaluate on the same held-out cells.")

    @model_validator(mode="after")
    def _check(self) -> Params:
        got = snapshot_hash(self.labels)  # also refuses a nucleus labelled twice
        if got != self.snapshot_hash:
            raise ValueError(
                f"snapshot_hash does not match the labels (sha256 of the canonical snapshot is "
                f"{got}): rebuild the snapshot with hpc_jobs.classifier.snapshot")
        if len({v for _, _, v in self.labels}) < 2:
            raise ValueError("labels hold one class only: label positives and negatives")
        if self.dapi_channel == self.marker_channel:
            raise ValueError(f"dapi_channel and marker_channel are both {self.dapi_channel}")
        return self

    @property
    def model_name(self) -> str:
        return self.name or f"resnet50-{self.snapshot_hash[:12]}-s{self.random_seed}"


# ----------------------------------------------------------------------------- data
def load_cells(ctx: StepContext, params: Params) -> tuple[Any, list[int]]:
    """One row per label: image_id, nucleus_id, label, x, y, marker_mean; and the channels
    ``[dapi, marker]`` (marker resolved against the image)."""
    import pandas as pd

    from hpc_jobs import ngff

    df = pd.DataFrame(params.labels, columns=["image_id", "nucleus_id", "label"])
    parts, channels = [], None
    for image_id, sub in df.groupby("image_id", sort=True):
        image_dir = ctx.site.data_root / "images" / str(int(image_id))
        table_path = image_dir / "nuclei.parquet"
        if not table_path.exists():
            raise FileNotFoundError(
                f"image {image_id} has no nuclei table on this cluster ({table_path}): run "
                f"celldetector_preprocess for image {image_id} or drop its labels")
        size_c = int(ngff.open_level(ngff.image_zarr_path(image_dir), 0).shape[0])
        marker = size_c - 1 if params.marker_channel == -1 else params.marker_channel
        for name, c in (("marker_channel", marker), ("dapi_channel", params.dapi_channel)):
            if not 0 <= c < size_c:
                raise ValueError(f"image {image_id} has {size_c} channels; {name}={c} is out "
                                 "of range")
        if channels is not None and channels != [params.dapi_channel, marker]:
            raise ValueError(f"image {image_id} resolves marker_channel=-1 to {marker}, other "
                             f"images to {channels[1]}: give marker_channel explicitly")
        channels = [params.dapi_channel, marker]
        column = f"c{marker}_mean"
        table = pd.read_parquet(table_path)
        if column not in table.columns:
            raise ValueError(f"{table_path} has no column {column!r}: rerun segment_nuclei")
        table = table[["id", "x", "y", column]].rename(
            columns={"id": "nucleus_id", column: "marker_mean"})
        merged = sub.merge(table, on="nucleus_id", how="left")
        unknown = merged.nucleus_id[merged.x.isna()].tolist()
        if unknown:
            raise ValueError(
                f"image {image_id} has no nucleus {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''} ({len(unknown)} labels): the image was "
                "segmented again since the labels were made; relabel or drop them")
        parts.append(merged)
    assert channels is not None
    return pd.concat(parts, ignore_index=True), channels


def _blocks(cells: Any, block: int) -> Any:
    """A spatial block key per cell (image, block row, block column)."""
    import numpy as np

    return (cells.image_id.to_numpy().astype(np.int64) * 1_000_003 * 1_000_003
            + (cells.y.to_numpy() // block).astype(np.int64) * 1_000_003
            + (cells.x.to_numpy() // block).astype(np.int64))


def _pick(keys: Any, fraction: float, rng: Any) -> Any:
    """A ``fraction`` (at least one, never all) of the distinct ``keys`` -> mask over keys."""
    import numpy as np

    uniq = np.unique(keys)
    if uniq.size < 2:
        raise ValueError("cannot split: all labelled cells lie in one spatial block; label "
                         "cells over a larger area, use more images or a smaller split_block")
    n = min(max(1, round(fraction * uniq.size)), uniq.size - 1)
    return np.isin(keys, rng.choice(uniq, size=n, replace=False))


def split(cells: Any, params: Params) -> tuple[Any, dict[str, Any]]:
    """``(role per cell: "train" | "early_stop" | "holdout", split info)``: by image, or by spatial
    blocks with one image; early stopping on blocks of the training images."""
    import numpy as np

    rng = np.random.default_rng([params.random_seed, 11])
    images = cells.image_id.to_numpy()
    n_images = np.unique(images).size
    if n_images >= 2:
        holdout = _pick(images, params.holdout_fraction, rng)
        kind = "by image"
    else:
        holdout = _pick(_blocks(cells, params.split_block), params.holdout_fraction, rng)
        kind = f"by spatial blocks of {params.split_block} px (one image only)"
    train_keys = _blocks(cells, params.split_block)
    early = np.zeros(len(cells), dtype=bool)
    early[~holdout] = _pick(train_keys[~holdout], params.early_stop_fraction, rng)
    role = np.where(holdout, "holdout", np.where(early, "early_stop", "train"))
    info = {
        "kind": kind,
        "holdout_images": sorted({int(i) for i in images[holdout]}),
        "train_images": sorted({int(i) for i in images[~holdout]}),
        "cells": {r: int((role == r).sum()) for r in ("train", "early_stop", "holdout")},
        "positives": {r: int(cells.label.to_numpy()[role == r].sum())
                      for r in ("train", "early_stop", "holdout")},
    }
    for r in ("train", "early_stop", "holdout"):
        labels = cells.label.to_numpy()[role == r]
        if labels.size == 0 or labels.min() == labels.max():
            raise ValueError(
                f"the {r} cells of this split ({info['cells'][r]}, {int(labels.sum())} "
                f"positive) lack a class: label more cells of both classes, or change "
                "random_seed / holdout_fraction / split_block")
    return role, info


def augment(batch: Any, rng: Any) -> Any:
    """Random flips, 90-degree rotations and intensity jitter (x0.9-1.1, +-0.03) per crop."""
    import numpy as np

    out = np.empty_like(batch)
    for i, crop in enumerate(batch):
        c = np.rot90(crop, k=int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            c = c[:, :, ::-1]
        gain = rng.uniform(0.9, 1.1, (c.shape[0], 1, 1))
        shift = rng.uniform(-0.03, 0.03, (c.shape[0], 1, 1))
        out[i] = c * gain + shift
    return out


# ----------------------------------------------------------------------------- model
def pick_device(choice: str) -> str:
    """``cuda`` / ``cpu`` for the ``device`` param (``cuda`` without a GPU is an error)."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but this node has no usable CUDA GPU: submit with "
                           "hpc_resources gpus=1 to a GPU partition, or use device='auto'")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def predict_proba(model: Any, crops: Any, device: str, batch: int = 256) -> Any:
    """Positive-class probability per crop (eval mode, no gradients)."""
    import numpy as np
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            x = torch.from_numpy(np.ascontiguousarray(crops[i : i + batch])).to(device)
            out.append(torch.softmax(model(x), dim=1)[:, 1].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def recalibrate_bn(model: Any, x: Any, device: str, batch: int = 128) -> None:
    """Set every BatchNorm's running statistics to the exact mean/variance over ``x``.

    With few batches per epoch the running averages lag far behind the weights and eval-mode
    predictions collapse to one class; one no-gradient pass fixes that ("precise BN")."""
    import numpy as np
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            if len(x[i : i + batch]) >= 2:
                model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).to(device))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


def fit(model: Any, x: Any, y: Any, x_es: Any, y_es: Any, params: Params, device: str,
        log: Any, progress: ProgressReporter | None = None) -> dict[str, Any]:
    """Train with class-balanced sampling and augmentation; early stopping on (x_es, y_es).
    ``progress`` (if given) counts the epochs."""
    import copy

    import numpy as np
    import torch

    rng = np.random.default_rng([params.random_seed, 12])
    weights = np.where(y == 1, 0.5 / max(1, int(y.sum())), 0.5 / max(1, int((y == 0).sum())))
    opt = torch.optim.AdamW(model.parameters(), lr=params.learning_rate,
                            weight_decay=params.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    best, best_state, best_epoch, history = float("inf"), None, 0, []
    for epoch in range(1, params.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = rng.choice(len(y), size=len(y), replace=True, p=weights)
        train_loss = 0.0
        for i in range(0, len(order), params.batch_size):
            idx = order[i : i + params.batch_size]
            if idx.size < 2:  # BatchNorm needs two samples
                continue
            xb = torch.from_numpy(augment(x[idx], rng)).to(device)
            yb = torch.from_numpy(y[idx].astype(np.int64)).to(device)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            train_loss += float(loss.detach()) * idx.size
        recalibrate_bn(model, x, device)
        es_loss = 0.0
        with torch.no_grad():
            for i in range(0, len(y_es), 256):
                xb = torch.from_numpy(np.ascontiguousarray(x_es[i : i + 256])).to(device)
                yb = torch.from_numpy(y_es[i : i + 256].astype(np.int64)).to(device)
                es_loss += float(loss_fn(model(xb), yb)) * len(yb)
        es_loss /= len(y_es)
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": round(train_loss / len(order), 5),
                        "early_stop_loss": round(es_loss, 5), "seconds": round(seconds, 3),
                        "crops_per_s": round(len(order) / seconds, 1)})
        log(f"epoch {epoch}: train loss {train_loss / len(order):.4f}, early-stop loss "
            f"{es_loss:.4f}, {len(order) / seconds:.0f} crops/s")
        if progress is not None:
            progress.update(epoch, message=f"training, early-stop loss {es_loss:.4f}")
        if es_loss < best:
            best, best_epoch = es_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= params.patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    return {"epochs_run": len(history), "best_epoch": best_epoch,
            "best_early_stop_loss": round(best, 5), "history": history}


def git_commit() -> str | None:
    """The commit of the installed code when it is a git checkout (else None)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and len(out) == 40 else None


# ----------------------------------------------------------------------------- run
def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Train, evaluate on held-out cells, and write the model file."""
    import numpy as np
    import torch

    from hpc_jobs.classifier import data, metrics
    from hpc_jobs.classifier import model as cm

    t0 = time.perf_counter()
    torch.set_num_threads(ctx.cpus)
    torch.manual_seed(params.random_seed)
    device = pick_device(params.device)
    models_dir = ctx.site.models.classifier_dir(ctx.site.data_root)
    compare_path = models_dir / f"{params.compare_with}.pt" if params.compare_with else None
    if compare_path is not None and not compare_path.is_file():
        raise FileNotFoundError(f"compare_with={params.compare_with!r}: no {compare_path}; "
                                "give a model name from the registry")
    cells, channels = load_cells(ctx, params)
    role, split_info = split(cells, params)
    rule = data.display_rule()
    crops = np.zeros((len(cells), len(channels), params.input_size, params.input_size),
                     dtype=np.float32)
    for image_id, idx in cells.groupby("image_id").indices.items():
        image_dir = ctx.site.data_root / "images" / str(int(image_id))
        with ctx.lock_image(int(image_id), exclusive=False, purpose="train_classifier"):
            display = data.display_for(image_dir, channels, rule["low"], rule["high"])
            crops[idx] = data.crops_for(image_dir, cells[["x", "y"]].to_numpy()[idx], channels,
                                        params.input_size, display)
    t_crops = time.perf_counter() - t0
    ctx.log(f"train_classifier: {len(cells)} labelled cells ({int(cells.label.sum())} "
            f"positive) from {cells.image_id.nunique()} image(s); split {split_info['kind']}: "
            f"{split_info['cells']}; device {device}, {torch.get_num_threads()} threads")
    y = cells.label.to_numpy().astype(np.int64)
    tr, es, ho = role == "train", role == "early_stop", role == "holdout"
    net = cm.resnet50(num_classes=2, in_channels=len(channels))
    if params.pretrained:
        skipped = cm.load_pretrained(net, models_dir / params.pretrained)
        ctx.log(f"started from {params.pretrained} (not loaded: {skipped})")
    net = net.to(device)
    with ctx.progress("epochs", total=params.epochs, message="training") as epochs:
        training = fit(net, crops[tr], y[tr], crops[es], y[es], params, device, ctx.log, epochs)
        epochs.finish(f"trained: {training['epochs_run']} epochs, best {training['best_epoch']}")
    t_train = time.perf_counter() - t0 - t_crops

    marker = cells.marker_mean.to_numpy(dtype=np.float64)
    base_thr = metrics.best_f1_threshold(y[tr], marker[tr])
    results = {
        "model": metrics.summary(y[ho], predict_proba(net, crops[ho], device),
                                 params.decision_threshold),
        "baseline_marker_mean": metrics.summary(y[ho], marker[ho], base_thr),
    }
    if compare_path is not None:
        other, meta = cm.load_classifier(compare_path, device)
        o_disp = [data.display_for(ctx.site.data_root / "images" / str(int(i)), meta["channels"],
                                   meta["display"]["low"], meta["display"]["high"])
                  for i in split_info["holdout_images"]]
        o_crops = np.zeros((int(ho.sum()), len(meta["channels"]), meta["crop_size"],
                            meta["crop_size"]), dtype=np.float32)
        held = cells[ho].reset_index(drop=True)
        for disp, image_id in zip(o_disp, split_info["holdout_images"], strict=True):
            idx = np.flatnonzero(held.image_id.to_numpy() == image_id)
            o_crops[idx] = data.crops_for(ctx.site.data_root / "images" / str(image_id),
                                          held[["x", "y"]].to_numpy()[idx], meta["channels"],
                                          meta["crop_size"], disp)
        results["compare_with"] = {
            "name": params.compare_with, "path": str(compare_path),
            **metrics.summary(y[ho], predict_proba(other, o_crops, device), meta["threshold"]),
        }
    path = models_dir / f"{params.model_name}.pt"
    commit = git_commit()
    meta = {
        "arch": cm.ARCH, "channels": channels, "crop_size": params.input_size, "display": rule,
        "class_names": CLASS_NAMES, "threshold": params.decision_threshold,
        "marker_channel": channels[1], "dapi_channel": channels[0],
        "snapshot_hash": params.snapshot_hash, "labels": len(params.labels),
        "split": split_info, "metrics": results, "git_commit": commit, "job": ctx.job_key,
    }
    cm.save_classifier(path, net.cpu(), meta)
    seconds = time.perf_counter() - t0
    hist = training["history"]
    summary = {
        "name": params.model_name,
        "path": str(path),
        "arch": cm.ARCH,
        "params": params.model_dump(exclude={"labels"}),
        "snapshot_hash": params.snapshot_hash,
        "labels": len(params.labels),
        "channels": channels,
        "split": split_info,
        "metrics": results,
        "training": training,
        "device": device,
        "threads": torch.get_num_threads(),
        "git_commit": commit,
        "crops_per_s": round(float(np.median([h["crops_per_s"] for h in hist])), 1),
        "crops_s": round(t_crops, 3),
        "train_s": round(t_train, 3),
        "seconds": round(seconds, 3),
    }
    m, b = results["model"], results["baseline_marker_mean"]
    ctx.log(f"train_classifier done: held-out ROC-AUC {m['roc_auc']} (marker mean "
            f"{b['roc_auc']}), F1 {m['f1']} ({b['f1']}); {path}; {seconds:.1f}s")
    return summary
