"""Constrained field types that several steps share: one meaning, one schema.

A field that two steps both take (``image_id``, ``dapi_channel``, ``block_size`` ...) is
declared here once and used by both ``Params`` models, so the gateway and the Airflow trigger
form (generated from the models, see ``operators/params.py``) apply the same bounds to it.
``tests/unit/test_step_manifest.py`` refuses two registered steps whose same-named fields
have different JSON schemas.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: An image in the image store (OMERO ids start at 1).
ImageId = Annotated[int, Field(ge=1, description="Image id in the image store.")]

#: A dataset in the image store whose images a run takes (OMERO dataset id).
DatasetId = Annotated[
    Annotated[int, Field(ge=1)] | None,
    Field(description="Dataset id in the image store: take every image in it."),
]

#: A tag whose images a run takes: its annotation id, or its text (every tag with that text).
TagRef = Annotated[
    Annotated[int, Field(ge=1)] | Annotated[str, Field(min_length=1, max_length=255)] | None,
    Field(description="Tag (annotation id, or its text): take every image carrying it."),
]

#: The nuclear stain channel (the lab's DAPI is channel 0).
DapiChannel = Annotated[
    int, Field(ge=0, le=255, description="Channel index of the nuclear stain (DAPI).")
]

#: The marker channel (the lab's marker is the last channel).
MarkerChannel = Annotated[
    int, Field(ge=-1, le=255, description="Channel index of the marker (-1 = the last channel).")
]

#: Edge of the square blocks one writer (export) and one Cellpose tile core (segmentation)
#: own; equal to the Zarr shard edge. A multiple of 64 so that every chunk edge in common use
#: (16, 32, 64, ... 1024 when it is a multiple of 1024) divides it; 64 is the smallest tile
#: that still holds a nucleus with its context.
BlockSize = Annotated[
    int,
    Field(
        ge=64, le=16384, multiple_of=64,
        description="Edge (px) of the blocks one writer / one Cellpose tile owns (= the Zarr "
        "shard edge; segment_nuclei needs the export's block size or a multiple of it). 2048 "
        "suits whole slides.",
    ),
]

#: Threads reading or writing blocks of an image inside one job (``None``: the job's CPUs).
Workers = Annotated[
    Annotated[int, Field(ge=1, le=256)] | None,
    Field(description="Parallel block readers/writers in the job (default: the job's CPUs)."),
]

#: A classifier's name: the file ``<name>.pt`` in the site's classifier folder (written by
#: ``train_classifier``, read by ``predict`` and named in ``writeback``'s namespace).
ModelName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", examples=["cd8-2026-01-01"],
          description="Classifier name (file <name>.pt in the site's classifier folder)."),
]
