"""Step ``find_images``: the images of a dataset or tag that have no results for a model yet.

What ``celldetector_nightly`` runs first. The images in the configured dataset and/or with
the configured tag (:meth:`~hpc_jobs.stores.base.ImageStore.list_image_ids`) are kept unless
they already carry ``writeback``'s map annotation for the model (namespace
``omeflow.celldetector/<model>``, :func:`hpc_jobs.predictions.namespace_for`): a second run
the same night finds nothing to do. ``max_images`` caps a batch (lowest ids first; the rest
are picked up by the next run). The summary lists the ids to process and, for every other
image, why it was skipped.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import DatasetId, ModelName, TagRef


class Params(StepParams):
    """Parameters of ``find_images``."""

    dataset: DatasetId = None
    tag: TagRef = None
    classifier: ModelName
    max_images: Annotated[int, Field(ge=1, le=10000)] | None = Field(
        None, description="Process at most this many images per run (lowest ids first).")

    @model_validator(mode="after")
    def _one_selector(self) -> Params:
        if self.dataset is None and self.tag is None:
            raise ValueError("find_images needs a dataset id or a tag: set [omeflow] "
                             "nightly_dataset or nightly_tag (or 'dataset'/'tag' in the "
                             "run's conf)")
        return self


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """The ids to process and why each other image of the selection was skipped."""
    from hpc_jobs.predictions import namespace_for

    ns = namespace_for(params.classifier)
    todo: list[int] = []
    skipped: dict[str, str] = {}
    with ctx.open_store() as store:
        selected = store.list_image_ids(dataset=params.dataset, tag=params.tag)
        for image_id in selected:
            if store.get_map_annotations(image_id, ns):
                skipped[str(image_id)] = f"has results for model {params.classifier} ({ns})"
            elif params.max_images is not None and len(todo) >= params.max_images:
                skipped[str(image_id)] = (f"over max_images={params.max_images}; the next "
                                          "run picks it up")
            else:
                todo.append(image_id)
    where = " and ".join(
        w for w in (params.dataset is not None and f"dataset {params.dataset}",
                    params.tag is not None and f"tag {params.tag!r}") if w)
    ctx.log(f"find_images: {len(selected)} images in {where}; {len(todo)} to process "
            f"with {params.classifier}: {todo}; skipped {skipped}")
    return {"image_ids": todo, "skipped": skipped, "selected": len(selected),
            "model": params.classifier, "namespace": ns}
