"""The per-nucleus predictions table that ``predict`` writes and ``writeback`` reads.

``<image dir>/predictions/<model>.parquet``: one row per nucleus of the nuclei table, columns
:data:`COLUMNS` (``id``, ``x``, ``y`` as in the nuclei table; ``probability`` of the positive
class; ``class`` its name by the model's threshold; ``positive``). The file's metadata records
the model (name, sha256, threshold, class names). Array tasks write ``parts/<task>.parquet``
beside it, which the merge concatenates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("id", "x", "y", "probability", "class", "positive")
#: Namespace prefix of everything writeback attaches for a model (``<prefix>/<model>``).
NAMESPACE_PREFIX = "omeflow.celldetector"



def namespace_for(model: str) -> str:
    """The namespace of a model's ROIs, map annotations and attachments on an image."""
    return f"{NAMESPACE_PREFIX}/{model}"


def predictions_dir(image_dir: Path) -> Path:
    return Path(image_dir) / "predictions"


def predictions_path(image_dir: Path, model: str) -> Path:
    """Where ``predict`` writes the model's predictions for the image."""
    return predictions_dir(image_dir) / f"{model}.parquet"


def parts_dir(image_dir: Path, model: str) -> Path:
    """Where the array tasks of ``predict`` write their parts."""
    return predictions_dir(image_dir) / f"{model}.parts"


def read_predictions(image_dir: Path, model: str, image_id: int) -> pd.DataFrame:
    """The predictions table (pandas); a missing one names the fix (run predict)."""
    import pandas as pd

    path = predictions_path(image_dir, model)
    if not path.exists():
        raise FileNotFoundError(
            f"image {image_id} has no predictions of model {model!r} ({path}): run predict "
            "with this model first (celldetector_predict)")
    return pd.read_parquet(path)
