"""``check_images``: pick a run's images and validate them in seconds, before hours of
cluster work.

The images are picked the way a lab member thinks of them: explicit ``image_ids``, every
image of an OMERO ``dataset``, every image carrying a ``tag`` (its id or its text), or any
mix (the union; dataset and tag together: images in both, as the store lists them). The log
and the summary say how many images matched and which, per selector.

For every image: it exists in the store, the DAPI and marker channels are in range, and
(when eCDFs are wanted) it has at least one tissue ROI. All problems are reported at once,
each naming its fix; the job fails if there is any.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import DapiChannel, DatasetId, ImageId, MarkerChannel, TagRef
from hpc_jobs.stores.base import TISSUE_PREFIX, ImageNotFound, ImageStore, StoreError

#: Most images one run may take (a larger selection is refused, naming the fix).
MAX_IMAGES = 1000


class Params(StepParams):
    """Parameters of ``check_images``."""

    image_ids: list[ImageId] = Field(
        default_factory=list, max_length=MAX_IMAGES,
        description="Image ids (in the image store) to process; may be empty when a dataset "
        "or a tag picks the images.",
    )
    dataset: DatasetId = None
    tag: TagRef = None
    dapi_channel: DapiChannel = 0
    marker_channel: MarkerChannel = -1
    need_tissue: bool = Field(
        default=True, description="Require a tissue ROI (needed by the ecdf step)."
    )


    @model_validator(mode="after")
    def _some_images(self) -> Params:
        if not self.image_ids and self.dataset is None and self.tag is None:
            raise ValueError("no images picked: give image_ids, a dataset id or a tag "
                             "(in the trigger form, or 'image_ids'/'dataset'/'tag' in the conf)")
        return self


def pick_images(params: Params, store: ImageStore) -> tuple[list[int], dict[str, Any]]:
    """The run's image ids (sorted union of the selectors) and what each selector matched."""
    matched: dict[str, Any] = {}
    ids = set(params.image_ids)
    if params.image_ids:
        matched["image_ids"] = sorted(ids)
    if params.dataset is not None or params.tag is not None:
        listed = store.list_image_ids(dataset=params.dataset, tag=params.tag)
        where = " and ".join(
            w for w in (params.dataset is not None and f"dataset {params.dataset}",
                        params.tag is not None and f"tag {params.tag!r}") if w)
        if not listed:
            raise StoreError(f"{where} holds no images: check the id/text in OMERO, or pick "
                             "images by id")
        matched[where] = listed
        ids.update(listed)
    if len(ids) > MAX_IMAGES:
        raise StoreError(f"{len(ids)} images picked, more than {MAX_IMAGES} per run: pick a "
                         "smaller dataset or tag, or split the run")
    return sorted(ids), matched


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Pick the images, check every one; raise one error listing every problem."""
    problems: list[str] = []
    images: list[dict[str, Any]] = []
    store = ctx.open_store()
    try:
        image_ids, matched = pick_images(params, store)
        ctx.log(f"{len(image_ids)} images picked: {image_ids} ("
                + "; ".join(f"{k}: {len(v)} {v}" for k, v in matched.items()) + ")")
        for image_id in image_ids:
            if image_id < 1:
                problems.append(f"image id {image_id} is not valid (ids start at 1)")
                continue
            try:
                info = store.get_image(image_id)
            except ImageNotFound as exc:
                problems.append(str(exc))
                continue
            marker = info.size_c - 1 if params.marker_channel == -1 else params.marker_channel
            for channel, what in (
                (params.dapi_channel, "dapi_channel"),
                (marker, "marker_channel"),
            ):
                try:
                    info.check_channel(channel, what)
                except StoreError as exc:
                    problems.append(str(exc))
            tissues = 0
            if params.need_tissue:
                tissues = sum(
                    1
                    for roi in store.get_rois(image_id)
                    for shape in roi.shapes
                    if shape.text.startswith(TISSUE_PREFIX)
                )
                if not tissues:
                    problems.append(
                        f"image {image_id} ({info.name}) has no tissue ROI: draw a polygon whose "
                        f"text starts with '{TISSUE_PREFIX}' in OMERO, or deselect the ecdf step"
                    )
            images.append(
                {
                    "image_id": image_id,
                    "name": info.name,
                    "size_x": info.size_x,
                    "size_y": info.size_y,
                    "channels": list(info.channel_names),
                    "marker_channel": marker,
                    "tissue_shapes": tissues,
                }
            )
            ctx.log(
                f"image {image_id} ({info.name}): {info.size_x} x {info.size_y}, "
                f"channels {list(info.channel_names)}, {tissues} tissue shapes"
            )
    finally:
        store.close()
    if problems:
        raise StoreError("; ".join(problems))
    return {"image_ids": [i["image_id"] for i in images], "images": images,
            "matched": {k: list(v) for k, v in matched.items()}}
