"""Which Cellpose weights to use, loading them once per process, and running them.

Resolution order (first hit wins), see :func:`resolve_model_path`:

1. ``params.model``: a model file inside one of the site's model folders (a caller may not
   point torch at any other file), or a bare model name;
2. ``[models] cellpose`` in site.toml: a model file, or a directory holding model files;
3. ``$CELLPOSE_LOCAL_MODELS_PATH/<name>`` (cellpose's own variable);
4. the model trained by ``omeflow bootstrap-model`` in ``$OMEFLOW_CACHE/models/``.

``<name>`` is ``params.model`` when it is a bare name, else the lab's ``nuclei`` model
(``nucleitorch_0`` / ``nuclei``). Cellpose itself would silently fall back to downloading
``cyto3`` for a missing path; we check existence first and fail with a message naming the fix.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ENV_CACHE = "OMEFLOW_CACHE"
BOOTSTRAP_MODEL_NAME = "omeflow_nuclei_synth_v1"
DEFAULT_NAMES: tuple[str, ...] = ("nucleitorch_0", "nuclei")
FIX_HINT = "run `omeflow bootstrap-model` or set [models] cellpose in site.toml"

_LOADED: dict[tuple[str, str | None], Any] = {}


class ModelNotFoundError(FileNotFoundError):
    """No usable Cellpose weights were found; the message says how to provide some."""


def cache_dir() -> Path:
    """``$OMEFLOW_CACHE`` (default ``~/.cache/omeflow``)."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "omeflow").expanduser()


def bootstrapped_model_path() -> Path:
    """Where ``omeflow bootstrap-model`` puts (and the step looks for) the fallback model."""
    return cache_dir() / "models" / BOOTSTRAP_MODEL_NAME


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or value.startswith("~")


def allowed_model_roots(site_cellpose: Path | None) -> list[Path]:
    """Folders a ``params.model`` path may point into: the site's model folder (or the folder
    of its model file), ``$CELLPOSE_LOCAL_MODELS_PATH`` and the bootstrap cache."""
    roots: list[Path] = []
    if site_cellpose is not None:
        site = Path(site_cellpose).resolve()
        roots.append(site.parent if site.is_file() else site)
    if os.environ.get("CELLPOSE_LOCAL_MODELS_PATH"):
        roots.append(Path(os.environ["CELLPOSE_LOCAL_MODELS_PATH"]).resolve())
    roots.append((cache_dir() / "models").resolve())
    return roots


def resolve_model_path(requested: str | None, site_cellpose: Path | None) -> Path:
    """Return the weights file to use; raise :class:`ModelNotFoundError` naming the fix."""
    tried: list[str] = []
    names = DEFAULT_NAMES
    if requested:
        p = Path(requested).expanduser()
        if _looks_like_path(requested):
            # A caller-chosen path is loaded (unpickled) by torch: only files inside the
            # folders the HPC admin set up for models are acceptable.
            roots = allowed_model_roots(site_cellpose)
            if not any(p.resolve().is_relative_to(r) for r in roots):
                raise ModelNotFoundError(
                    f"params.model={requested!r} is outside this site's model folders "
                    f"({', '.join(map(str, roots)) or 'none configured'}); ask the HPC admin "
                    "to install the weights there and pass their name"
                )
        if p.is_file():
            return p.resolve()
        if _looks_like_path(requested) or p.is_dir():
            raise ModelNotFoundError(
                f"params.model={requested!r} is not a Cellpose model file; pass the path of "
                f"an existing weights file, or leave it empty to use the site model ({FIX_HINT})"
            )
        names = (requested,)
    if site_cellpose is not None:
        site_cellpose = Path(site_cellpose)
        if site_cellpose.is_file() and not requested:
            return site_cellpose
        if site_cellpose.is_dir():
            for name in names:
                if (site_cellpose / name).is_file():
                    return site_cellpose / name
        tried.append(f"site [models] cellpose = {site_cellpose}")
    env_dir = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    if env_dir:
        for name in names:
            if (Path(env_dir) / name).is_file():
                return Path(env_dir) / name
        tried.append(f"$CELLPOSE_LOCAL_MODELS_PATH={env_dir}")
    boot = bootstrapped_model_path()
    if not requested or requested == BOOTSTRAP_MODEL_NAME:
        if boot.is_file():
            return boot
        tried.append(str(boot))
    raise ModelNotFoundError(
        f"no Cellpose model {' or '.join(names)!s} found (looked in: {'; '.join(tried)}); "
        f"{FIX_HINT}"
    )


def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def eval_accepts_channels(eval_fn: Callable[..., Any]) -> bool:
    """Whether a Cellpose ``eval`` takes ``channels`` (3.x does; 4.x removed it)."""
    return "channels" in inspect.signature(eval_fn).parameters


def load_model(path: str | Path, sha256: str | None = None) -> Any:
    """A ``CellposeModel`` for ``path`` on the CPU, loaded once per process and cached.

    ``sha256`` (the file's content hash, when the caller has it) is part of the cache key, so
    weights retrained in place are loaded anew rather than served from the cache.
    """
    file = str(Path(path).resolve())
    key = (file, sha256)
    if key not in _LOADED:
        if not Path(file).is_file():
            raise ModelNotFoundError(f"Cellpose model {file} does not exist; {FIX_HINT}")
        from cellpose import models

        kwargs = _accepted(
            models.CellposeModel.__init__, {"gpu": False, "pretrained_model": file, "nchan": 2}
        )
        _LOADED[key] = models.CellposeModel(**kwargs)
    return _LOADED[key]


def preprocess(dapi: np.ndarray, log_transform: bool = True) -> np.ndarray:
    """The lab's preprocessing: ``log(1 + DAPI)`` as float32 (or plain float32)."""
    img = dapi.astype(np.float32, copy=False)
    return np.log1p(img) if log_transform else img


def segment(
    model: Any,
    image: np.ndarray,
    diameter: float = 20.0,
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    batch_size: int = 8,
    norm: tuple[float, float] | None = None,
) -> np.ndarray:
    """Run Cellpose on one preprocessed 2-D image; return int32 labels (0 = background).

    ``norm`` = (low, high): the fixed range (in ``image``'s values) that Cellpose maps to
    0..1, the same for every tile of a slide; None lets Cellpose use the image's own 1st/99th
    percentiles (which makes the result depend on what else is in the image).
    """
    normalize: bool | dict[str, Any] = True
    if norm is not None:
        # one row per network input channel: DAPI gets the range; the empty second channel
        # of a grayscale input stays 0 (identity range), as Cellpose leaves it by default
        nchan = int(getattr(model, "nchan", 2) or 1)
        normalize = {"lowhigh": [[float(norm[0]), float(norm[1])]] + [[0.0, 1.0]] * (nchan - 1)}
    kwargs: dict[str, Any] = {
        "diameter": diameter,
        "flow_threshold": flow_threshold,
        "cellprob_threshold": cellprob_threshold,
        "batch_size": batch_size,
        "normalize": normalize,
    }
    if eval_accepts_channels(model.eval):
        kwargs["channels"] = [0, 0]
    if not np.any(image != image.flat[0]):
        return np.zeros(image.shape, np.int32)
    out = model.eval(image, **kwargs)
    return np.asarray(out[0]).astype(np.int32, copy=False)
