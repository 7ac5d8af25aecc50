"""predict on a small synthetic slide: every nucleus, probabilities, array + merge == one job.

Plumbing, not accuracy: the classifier is an untrained (seeded) ResNet-50 saved with the
classifier module's own ``save_classifier``; accuracy is train_classifier's tests' business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from hpc_jobs.predictions import parts_dir, predictions_path
from hpc_jobs.steps import predict
from tests.science.predict_slide import context, prepare_slide

MODEL = "untrained-r50"


def save_untrained(folder: Path, name: str = MODEL, threshold: float = 0.5) -> Path:
    """An untrained seeded ResNet-50 classifier file (2 channels, 32 px crops)."""
    import torch

    from hpc_jobs.classifier.data import display_rule
    from hpc_jobs.classifier.model import resnet50, save_classifier

    torch.manual_seed(0)
    meta = {"arch": "resnet50", "channels": [0, 1], "crop_size": 32, "display": display_rule(),
            "class_names": ["negative", "positive"], "threshold": threshold}
    return save_classifier(folder / f"{name}.pt", resnet50(2, 2), meta)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    s = prepare_slide(tmp_path_factory.mktemp("predict"))
    site = context(s["root"], "x").site
    save_untrained(site.models.classifier_dir(site.data_root))
    return s


def _run(slide: dict[str, Any], job: str, phase: str = "all",
         task: tuple[int, int] | None = None) -> dict[str, Any]:
    params = predict.Params(image_id=slide["image_id"], classifier=MODEL, device="cpu",
                            inference_batch=4, phase=phase)
    return predict.run(params, context(slide["root"], job, task))


def test_one_row_per_nucleus_with_probabilities(slide: dict[str, Any]) -> None:
    summary = _run(slide, "all")
    df = pd.read_parquet(predictions_path(slide["image_dir"], MODEL))
    truth = slide["truth"]
    assert len(df) == len(truth) == summary["crops"] > 8  # every nucleus, several batches
    assert (df["id"].to_numpy() == np.sort(truth["id"].to_numpy())).all()
    assert np.allclose(df[["x", "y"]], truth.sort_values("id")[["x", "y"]])
    assert df["probability"].between(0, 1).all()
    assert df["probability"].std() > 0  # a real forward pass per crop, not one constant
    assert ((df["probability"] >= 0.5) == df["positive"]).all()
    assert set(df["class"]) <= {"negative", "positive"}
    assert ((df["class"] == "positive") == df["positive"]).all()


def test_array_of_two_plus_merge_equals_one_job(slide: dict[str, Any]) -> None:
    _run(slide, "single")
    single = pd.read_parquet(predictions_path(slide["image_dir"], MODEL))
    predictions_path(slide["image_dir"], MODEL).unlink()
    rows = [_run(slide, f"t{t}", "tiles", (t, 2))["rows"] for t in range(2)]
    assert rows[0][0] == 0 and rows[0][1] == rows[1][0] and rows[1][1] == len(single)
    assert rows[0][1] % 4 == 0  # cut at a batch edge
    merged = _run(slide, "merge", "merge")
    assert merged["parts"] == 2
    assert not list(parts_dir(slide["image_dir"], MODEL).glob("*.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(predictions_path(slide["image_dir"], MODEL)),
                                  single)


def test_merge_with_a_missing_part_names_the_task(slide: dict[str, Any]) -> None:
    _run(slide, "t0-only", "tiles", (0, 3))
    with pytest.raises(RuntimeError, match=r"array task\(s\) \[1, 2\] of 3 wrote no part"):
        _run(slide, "merge-missing", "merge")
    for f in parts_dir(slide["image_dir"], MODEL).glob("*.parquet"):
        f.unlink()


def test_unknown_model_lists_the_registered_ones(slide: dict[str, Any]) -> None:
    params = predict.Params(image_id=slide["image_id"], classifier="nope", device="cpu")
    with pytest.raises(FileNotFoundError, match=rf"no classifier 'nope'.*{MODEL}"):
        predict.run(params, context(slide["root"], "nope"))


@pytest.mark.parametrize("bad", ["../x", "a/b", "$(touch /tmp/c)", "", ".hidden", "x\n"])
def test_classifier_name_cannot_leave_the_model_folder(bad: str) -> None:
    from pydantic import ValidationError

    from hpc_jobs.steps import writeback

    with pytest.raises(ValidationError, match="classifier"):
        predict.Params(image_id=1, classifier=bad)
    with pytest.raises(ValidationError, match="classifier"):
        writeback.Params(image_id=1, classifier=bad)
