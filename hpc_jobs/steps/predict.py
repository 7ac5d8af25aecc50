"""Step ``predict``: a trained classifier's probability for EVERY nucleus of an image.

Reads the nuclei table (``segment_nuclei``), the OME-Zarr and the tissue eCDF (``ecdf``, for
the crops' display range: :func:`hpc_jobs.classifier.data.display_for`, the same crops as in
training), and writes ``predictions/<model>.parquet`` (:mod:`hpc_jobs.predictions`): nucleus
id, x, y, probability of the positive class (the model's last class), class by the model's
threshold.

The model is loaded once per process (:func:`loaded_model`); ``device`` auto picks CUDA when
present; torch uses the job's CPUs as threads.

Phases, like ``segment_nuclei`` (same names): ``all`` (one job), or for large slides a
Slurm array with ``phase="tiles"`` (task t of n classifies the t-th of n contiguous nucleus
ranges, cut at batch boundaries so every crop sees the same batch as in one job, and writes
its part), then one job with ``phase="merge"`` (checks every part is there, concatenates).

Active learning: with ``score_nuclei`` (the unlabelled candidates' nucleus ids, at most
:data:`MAX_SCORE_NUCLEI`), only those nuclei are classified, the image's predictions file is
left alone, and their probabilities go to ``outputs/scores.<nnnn>.json`` chunks
(``{"image_id", "model", "probabilities": {nucleus_id: p}}``, each below the gateway's
``result`` cap) listed in the summary's ``scores.chunks`` (with ``job_id``, as in
``select_candidates``); the Airflow side fetches them and
turns them into the annotation queue's uncertainty (``operators/scoring.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import ImageId, ModelName

if TYPE_CHECKING:
    import pandas as pd
    import torch

#: Crops cut from the Zarr per read (each read visits each block once); a multiple of batches.
READ_BATCHES = 8
#: Most nucleus ids one scoring job takes (~7 bytes each in the request body: < 256 KiB).
MAX_SCORE_NUCLEI = 20000
#: Probabilities per ``scores.<nnnn>.json`` chunk (~30 bytes each: far below 1 MiB).
SCORES_PER_CHUNK = 10000


class Params(StepParams):
    """Parameters of ``predict`` (also the Airflow trigger form)."""

    image_id: ImageId
    classifier: ModelName
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when the node has a GPU, else CPU.")
    inference_batch: int = Field(64, ge=1, le=4096, description="Crops per forward pass.")
    phase: Literal["all", "tiles", "merge"] = Field("all", description="Which part to run.")
    score_nuclei: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, max_length=MAX_SCORE_NUCLEI,
        description="Active learning (filled by celldetector_train): classify only these "
        "nuclei and return their probabilities; the predictions file is left alone.")


_MODELS: dict[tuple[str, str, str], tuple[Any, dict[str, Any]]] = {}


def loaded_model(path: Path, sha256: str, device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier at ``path`` on ``device``, loaded once per process (keyed on its hash)."""
    from hpc_jobs.classifier.model import load_classifier

    key = (str(path), sha256, device)
    if key not in _MODELS:
        _MODELS[key] = load_classifier(path, device=device)
    return _MODELS[key]


def model_file(ctx: StepContext, model: str) -> Path:
    """``<site classifier folder>/<model>.pt``; a missing one lists what is there."""
    folder = ctx.site.models.classifier_dir(ctx.site.data_root)
    path = folder / f"{model}.pt"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
        raise FileNotFoundError(f"no classifier {model!r} in {folder} (have: {have or 'none'});"
                                " train one with celldetector_train or pick a registered one")
    return path


def task_range(n: int, batch: int, task: int, tasks: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of task ``task`` of ``tasks``: contiguous, cut at batch edges."""
    n_batches = -(-n // batch)
    b0, b1 = n_batches * task // tasks, n_batches * (task + 1) // tasks
    return min(n, b0 * batch), min(n, b1 * batch)


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Classify this job's share of the nuclei (or merge the parts); return a summary."""
    from hpc_jobs.fsutil import file_sha256
    from hpc_jobs.predictions import parts_dir, predictions_path

    t0 = time.perf_counter()
    task, tasks = ctx.array_task_id or 0, ctx.array_task_count or 1
    if params.phase != "tiles" and tasks > 1:
        raise ValueError(f"phase={params.phase!r} cannot run as a job array; submit the array "
                         "with phase='tiles', then phase='merge'")
    if params.score_nuclei is not None and (params.phase != "all" or tasks > 1):
        raise ValueError("score_nuclei runs as one job with phase='all' (no array, no merge)")
    image_dir = ctx.image_dir(params.image_id)
    path = model_file(ctx, params.classifier)
    sha = file_sha256(path)
    summary: dict[str, Any] = {"image_id": params.image_id, "model": params.classifier,
                               "model_sha256": sha, "phase": params.phase,
                               "array_task": task, "array_tasks": tasks}
    final = predictions_path(image_dir, params.classifier)
    with ctx.lock_image(params.image_id, exclusive=False, purpose="predict"):
        if params.score_nuclei is not None:
            summary.update(_score(params, ctx, image_dir, path, sha))
        elif params.phase == "merge":
            summary.update(_merge(parts_dir(image_dir, params.classifier), final, image_dir,
                                  params.image_id, sha))
        else:
            nuclei = _nuclei(image_dir, params.image_id)
            start, stop = task_range(len(nuclei), params.inference_batch, task, tasks)
            df, stats = _classify(nuclei.iloc[start:stop], params, ctx, image_dir, path, sha)
            meta = {"model": params.classifier, "model_sha256": sha, "nuclei": str(len(nuclei)),
                    "threshold": str(stats.pop("threshold")),
                    "class_names": ",".join(stats.pop("class_names"))}
            out = final if params.phase == "all" else \
                parts_dir(image_dir, params.classifier) / f"{task}-of-{tasks}.parquet"
            _write(df, out, meta)
            summary.update({"rows": [start, stop], "predictions_path": str(out), **stats})
            ctx.log(f"predict: image {params.image_id} nuclei {start}..{stop} of "
                    f"{len(nuclei)}: {stats['positives']} positive, "
                    f"{stats['crops_per_s']:.1f} crops/s on {stats['device']}")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _nuclei(image_dir: Path, image_id: int) -> pd.DataFrame:
    import pandas as pd

    path = image_dir / "nuclei.parquet"
    if not path.exists():
        raise FileNotFoundError(f"image {image_id} has no nuclei table ({path}): run "
                                "segment_nuclei first (celldetector_preprocess)")
    return pd.read_parquet(path, columns=["id", "x", "y"]).sort_values("id",
                                                                     ignore_index=True)


def _score(params: Params, ctx: StepContext, image_dir: Path, path: Path, sha: str
           ) -> dict[str, Any]:
    """Probabilities of the ``score_nuclei`` only, as ``outputs/scores.<nnnn>.json`` chunks."""
    import json

    from hpc_jobs.fsutil import atomic_write

    wanted = sorted(set(params.score_nuclei or ()))
    nuclei = _nuclei(image_dir, params.image_id)
    nuclei = nuclei[nuclei["id"].isin(wanted)]
    if len(nuclei) != len(wanted):
        missing = sorted(set(wanted) - set(int(i) for i in nuclei["id"]))
        raise ValueError(f"image {params.image_id} has no nuclei {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} in its nuclei table: the "
                         "candidate set comes from another segmentation; select candidates "
                         "again (celldetector_candidates)")
    df, stats = _classify(nuclei, params, ctx, image_dir, path, sha)
    probs = {str(int(i)): float(p) for i, p in zip(df["id"], df["probability"], strict=True)}
    keys = list(probs)
    chunks = []
    for k in range(0, len(keys), SCORES_PER_CHUNK):
        name = f"scores.{k // SCORES_PER_CHUNK:04d}.json"
        body = {"image_id": params.image_id, "model": params.classifier,
                "probabilities": {n: probs[n] for n in keys[k : k + SCORES_PER_CHUNK]}}
        atomic_write(ctx.outputs / name, json.dumps(body).encode(), mode=0o644)
        chunks.append(name)
    ctx.log(f"predict: scored {len(probs)} candidate nuclei of image {params.image_id} "
            f"in {len(chunks)} chunk(s), {stats['crops_per_s']:.1f} crops/s on {stats['device']}")
    stats.pop("class_names")
    return {**stats, "job_id": ctx.job_key, "scores": {"chunks": chunks, "nuclei": len(probs)}}


def _classify(nuclei: pd.DataFrame, params: Params, ctx: StepContext, image_dir: Path,
              path: Path, sha: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    import numpy as np
    import pandas as pd
    import torch

    from hpc_jobs.classifier.data import crops_for, display_for
    from hpc_jobs.steps.train_classifier import pick_device

    torch.set_num_threads(ctx.cpus)
    device = pick_device(params.device)
    t_load = time.perf_counter()
    model, meta = loaded_model(path, sha, device)
    load_s = time.perf_counter() - t_load
    channels = [int(c) for c in meta["channels"]]
    disp = meta["display"]
    display = display_for(image_dir, channels, float(disp["low"]), float(disp["high"]))
    xy = nuclei[["x", "y"]].to_numpy(np.float64)
    probs = np.empty(len(xy), dtype=np.float64)
    read_s = infer_s = 0.0
    step = params.inference_batch * READ_BATCHES
    reporter = ctx.progress("nuclei", total=len(xy), message="predicting")
    with torch.inference_mode():
        for i in range(0, len(xy), step):
            reporter.update(i)
            t = time.perf_counter()
            crops = crops_for(image_dir, xy[i : i + step], channels, int(meta["crop_size"]),
                              display)
            read_s += time.perf_counter() - t
            t = time.perf_counter()
            for j in range(0, len(crops), params.inference_batch):
                batch = torch.from_numpy(crops[j : j + params.inference_batch]).to(device)
                p = torch.softmax(model(batch).float(), dim=1)[:, -1]
                probs[i + j : i + j + len(batch)] = p.cpu().numpy()
            infer_s += time.perf_counter() - t
    reporter.update(len(xy))
    reporter.finish("predicted")
    names = [str(c) for c in meta["class_names"]]
    threshold = float(meta["threshold"])
    positive = probs >= threshold
    df = pd.DataFrame({"id": nuclei["id"].to_numpy(np.int64), "x": xy[:, 0], "y": xy[:, 1],
                       "probability": probs,
                       "class": np.where(positive, names[-1], names[0]),
                       "positive": positive})
    total = read_s + infer_s
    return df, {"crops": len(df), "positives": int(positive.sum()), "device": device,
                "threads": ctx.cpus, "model_load_s": round(load_s, 3),
                "read_s": round(read_s, 3), "infer_s": round(infer_s, 3),
                "crops_per_s": len(df) / total if total > 0 else 0.0,
                "threshold": threshold, "class_names": names}


def _write(df: pd.DataFrame, path: Path, meta: dict[str, str]) -> None:
    """Write ``df`` with ``meta`` in the Parquet metadata, atomically."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hpc_jobs.fsutil import atomic_write

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           **{f"omeflow.{k}": v for k, v in meta.items()}})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue(), mode=0o644)


def _merge(parts: Path, final: Path, image_dir: Path, image_id: int, sha: str
           ) -> dict[str, Any]:
    """Concatenate the array's parts (all of one task count, same model) into ``final``."""
    import pandas as pd
    import pyarrow.parquet as pq

    files = sorted(parts.glob("*-of-*.parquet")) if parts.is_dir() else []
    counts = {int(f.stem.split("-of-")[1]) for f in files}
    if len(counts) != 1:
        raise RuntimeError(f"{parts}: parts of {sorted(counts) or 'no'} task counts; rerun "
                           "the predict array (phase='tiles') before the merge")
    (n,) = counts
    by_task = {int(f.stem.split("-of-")[0]): f for f in files if f.stem.endswith(f"-of-{n}")}
    missing = sorted(set(range(n)) - set(by_task))
    if missing:
        raise RuntimeError(f"{parts}: array task(s) {missing} of {n} wrote no part; rerun "
                           "them (phase='tiles')")
    metas = [pq.read_schema(by_task[t]).metadata for t in range(n)]
    if any(m.get(b"omeflow.model_sha256", b"").decode() != sha for m in metas):
        raise RuntimeError(f"{parts}: parts come from another version of the model; rerun "
                           "the predict array (phase='tiles')")
    df = pd.concat([pd.read_parquet(by_task[t]) for t in range(n)], ignore_index=True)
    nuclei = _nuclei(image_dir, image_id)
    if len(df) != len(nuclei) or not (df["id"].to_numpy() == nuclei["id"].to_numpy()).all():
        raise RuntimeError(f"{parts}: the parts cover {len(df)} nuclei, the table has "
                           f"{len(nuclei)}; rerun the predict array (phase='tiles')")
    meta = {k.decode()[len("omeflow."):]: v.decode() for k, v in metas[0].items()
            if k.startswith(b"omeflow.")}
    _write(df, final, meta)
    for f in files:
        f.unlink()
    return {"parts": n, "crops": len(df), "positives": int(df["positive"].sum()),
            "predictions_path": str(final)}
