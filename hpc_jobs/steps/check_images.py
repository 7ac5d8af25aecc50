"""``check_images``: validate a run's inputs in seconds, before hours of cluster work.

For every image id: the image exists in the store, the DAPI and marker channels are in
range, and (when eCDFs are wanted) it has at least one tissue ROI. All problems are reported
at once, each naming its fix; the job fails if there is any.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import DapiChannel, ImageId, MarkerChannel
from hpc_jobs.stores.base import TISSUE_PREFIX, ImageNotFound, StoreError


class Params(StepParams):
    """Parameters of ``check_images``."""

    image_ids: list[ImageId] = Field(
        min_length=1, max_length=1000, description="Image ids (in the image store) to process."
    )
    dapi_channel: DapiChannel = 0
    marker_channel: MarkerChannel = -1
    need_tissue: bool = Field(
        default=True, description="Require a tissue ROI (needed by the ecdf step)."
    )


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Check every image; raise one error listing every problem."""
    problems: list[str] = []
    images: list[dict[str, Any]] = []
    store = ctx.open_store()
    try:
        for image_id in params.image_ids:
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
    return {"image_ids": [i["image_id"] for i in images], "images": images}
