"""The prediction operators: the model lookup, ``predict`` (array over nucleus ranges +
merge) and ``writeback``.

Their arguments are the fields of the steps' ``Params`` models (``hpc_jobs/steps/predict.py``,
``hpc_jobs/steps/writeback.py``); only the values given are sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from hpc_jobs.registry import PREDICT, WRITEBACK
from operators.array_merge import ArrayMergeStepOperator
from operators.step import StepOperator


class PredictOperator(ArrayMergeStepOperator):
    """A classifier's probability for every nucleus of one image.

    Arguments: the fields of ``hpc_jobs.steps.predict.Params`` except ``phase``, templated,
    and ``array_tasks`` (> 1: an array over nucleus ranges, then one merge job that
    concatenates the parts; see :class:`~operators.array_merge.ArrayMergeStepOperator`).
    """

    step_name = PREDICT
    merge_as_array = False


class WritebackOperator(StepOperator):
    """ROIs, the per-cell table and densities of one image's predictions, in the image store.

    Arguments: the fields of ``hpc_jobs.steps.writeback.Params``, templated.
    """

    step_name = WRITEBACK


def resolve_classifier(models: list[dict[str, Any]], ref: Any,
                       current: dict[str, Any] | None = None) -> dict[str, Any]:
    """The registered model ``ref`` names: an id, or ``current`` (``current`` if the registry
    marks one, else the newest). Returns ``{"model_id", "classifier", "path"}`` where
    ``classifier`` is the step field (the model file's name without ``.pt``)."""
    if not models:
        raise AirflowFailException("no classifier is registered yet: train one with "
                                   "celldetector_train")
    text = str(ref).strip()
    if text in ("", "current"):
        row = current or models[0]  # models() is newest first
    else:
        if not text.isdigit():
            raise AirflowFailException(f"model={ref!r}: give a registered model id or 'current'")
        by_id = {int(m["id"]): m for m in models}
        if int(text) not in by_id:
            raise AirflowFailException(f"model {text} is not registered; registered ids: "
                                       f"{sorted(by_id)}")
        row = by_id[int(text)]
    path = PurePosixPath(str(row["path"]))
    if path.suffix != ".pt":
        raise AirflowFailException(f"model {row['id']} has path {path}: expected a <name>.pt "
                                   "classifier file written by train_classifier")
    return {"model_id": int(row["id"]), "classifier": path.stem, "path": str(path)}


class ResolveClassifierOperator(BaseOperator):
    """Look up the classifier to predict with in the annotation store's model registry.

    :param model: a registered model id or ``current`` (templated).
    :param annotations_conn_id: the annotation store's connection.
    """

    template_fields: Sequence[str] = ("model",)

    def __init__(self, *, model: Any = "current",
                 annotations_conn_id: str = "omeflow_annotations", **kwargs: Any) -> None:
        kwargs.setdefault("multiple_outputs", True)  # output["classifier"] in DAGs
        super().__init__(**kwargs)
        self.model = model
        self.annotations_conn_id = annotations_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from operators.candidates import open_annotation_store

        store = open_annotation_store(self.annotations_conn_id, self.log)
        current_model = getattr(store, "current_model", None)
        current = current_model() if callable(current_model) else None
        chosen = resolve_classifier(store.models(), self.model, current)
        self.log.info("classifier %s (model id %s, %s)", chosen["classifier"],
                      chosen["model_id"], chosen["path"])
        return chosen
