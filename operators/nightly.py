"""What ``celldetector_nightly`` adds to the per-image operators: its settings and the model.

- :func:`nightly_settings`: ``[omeflow] nightly_cron``, ``nightly_dataset``, ``nightly_tag``,
  ``nightly_max_images`` (``airflow.cfg``), checked, each error naming the setting to fix;
- :class:`CurrentModelOperator`: the classifier the registry marks current; with none, the
  run ends (the rest skipped) with a message saying how to mark one, instead of failing;
- :class:`FindImagesOperator`: the ``find_images`` step (images of the dataset/tag without
  results for that model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from hpc_jobs.registry import FIND_IMAGES
from operators.prediction import ResolveClassifierOperator, resolve_classifier
from operators.step import StepOperator

SECTION = "omeflow"
DEFAULT_CRON = "0 2 * * *"


@dataclass(frozen=True)
class NightlySettings:
    """The ``[omeflow] nightly_*`` settings, parsed."""

    cron: str
    dataset: int | None
    tag: int | str | None
    max_images: int | None


def _positive_int(key: str, text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"[{SECTION}] {key} = {text!r}: give a positive integer id, or leave "
                         "it empty")
    return int(text)


def nightly_settings() -> NightlySettings:
    """Read and check the nightly settings (a bad cron or id names the setting)."""
    from airflow.configuration import conf
    from croniter import croniter

    def get(key: str, fallback: str = "") -> str:
        return str(conf.get(SECTION, key, fallback=fallback) or "").strip()

    cron = get("nightly_cron", DEFAULT_CRON) or DEFAULT_CRON
    if not croniter.is_valid(cron):
        raise ValueError(f"[{SECTION}] nightly_cron = {cron!r} is not a cron expression; "
                         f"e.g. {DEFAULT_CRON!r} (02:00 UTC every day)")
    tag_text = get("nightly_tag")
    tag: int | str | None = (int(tag_text) if tag_text.isdigit() else tag_text) or None
    return NightlySettings(cron=cron, dataset=_positive_int("nightly_dataset",
                                                            get("nightly_dataset")),
                           tag=tag, max_images=_positive_int("nightly_max_images",
                                                             get("nightly_max_images")))


class CurrentModelOperator(ResolveClassifierOperator):
    """The classifier marked current in the annotation store's model registry.

    Unlike ``celldetector_predict``'s ``current`` (current, else the newest), a nightly run
    predicts only with a model someone accepted: with none marked current the task is
    skipped, and with it the rest of the run, saying how to mark one.

    :param annotations_conn_id: the annotation store's connection.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("model", "current")
        super().__init__(**kwargs)

    def execute(self, context: Context) -> dict[str, Any]:
        from operators.candidates import open_annotation_store

        store = open_annotation_store(self.annotations_conn_id, self.log)
        current = store.current_model()
        if current is None:
            raise AirflowSkipException(
                "no model is marked current in the registry, so there is nothing to predict "
                "with: train one with celldetector_train (it becomes current when it beats the "
                "current one or none is current) or promote a registered model "
                "(AnnotationStore.promote_model)")
        chosen = resolve_classifier([current], "current", current)
        self.log.info("current classifier %s (model id %s, %s)", chosen["classifier"],
                      chosen["model_id"], chosen["path"])
        return chosen


class FindImagesOperator(StepOperator):
    """The images of a dataset and/or tag that have no results for a model yet.

    Arguments: the fields of ``hpc_jobs.steps.find_images.Params``, templated.
    """

    step_name = FIND_IMAGES
