"""Step registry: step name -> module (``Params`` + ``run``) and default resources.

Adding a workflow step = one module under ``hpc_jobs/steps/`` + one entry here (see the
README, "Adding a step"). The gateway accepts only names listed here; the Airflow side takes
step names, operator arguments and trigger-form Params from here too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from hpc_jobs.protocol import Resources

#: Step names: use these constants (or ``STEPS``), never string literals, on both sides.
CLUSTER_CHECK = "cluster_check"
CHECK_IMAGES = "check_images"
EXPORT_ZARR = "export_zarr"
SEGMENT_NUCLEI = "segment_nuclei"
ECDF = "ecdf"
SELECT_CANDIDATES = "select_candidates"
TRAIN_CLASSIFIER = "train_classifier"
PREDICT = "predict"
WRITEBACK = "writeback"
FIND_IMAGES = "find_images"


@dataclass(frozen=True)
class StepSpec:
    """One registered step."""

    name: str
    module: str
    resources: Resources
    description: str
    #: Whether the job opens the image store (and so may need an OMERO session key).
    needs_store: bool = True

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def params_model(self) -> type[BaseModel]:
        return self.load().Params

    @property
    def entry(self) -> Callable[[Any, Any], dict]:
        return self.load().run


STEPS: dict[str, StepSpec] = {
    spec.name: spec
    for spec in [
        StepSpec(
            name=CLUSTER_CHECK,
            module="hpc_jobs.steps.cluster_check",
            resources=Resources(cpus=1, mem_mb=512, time_min=10),
            description="Report node, CPUs, memory, GPUs, Python and package versions.",
            needs_store=False,
        ),
        StepSpec(
            name=CHECK_IMAGES,
            module="hpc_jobs.steps.check_images",
            resources=Resources(cpus=1, mem_mb=1024, time_min=10),
            description="Check images, channels and tissue ROIs before a run.",
        ),
        StepSpec(
            name=EXPORT_ZARR,
            module="hpc_jobs.steps.export_zarr",
            resources=Resources(cpus=4, mem_mb=8192, time_min=120),
            description="Export an image from the store to OME-Zarr (NGFF 0.5) on HPC storage.",
        ),
        StepSpec(
            name=SEGMENT_NUCLEI,
            module="hpc_jobs.steps.segment_nuclei",
            resources=Resources(cpus=8, mem_mb=16384, time_min=240),
            description="Tiled Cellpose nuclei segmentation with per-nucleus statistics.",
        ),
        StepSpec(
            name=ECDF,
            module="hpc_jobs.steps.ecdf",
            resources=Resources(cpus=2, mem_mb=4096, time_min=60),
            description="Per tissue ROI (holes subtracted) histograms, eCDFs and quantiles.",
        ),
        StepSpec(
            name=SELECT_CANDIDATES,
            module="hpc_jobs.steps.select_candidates",
            resources=Resources(cpus=2, mem_mb=4096, time_min=60),
            description="Candidate nuclei (marker above a per-ROI eCDF quantile or a fixed "
            "threshold) and their 8-bit crops for annotation.",
        ),
        StepSpec(
            name=TRAIN_CLASSIFIER,
            module="hpc_jobs.steps.train_classifier",
            resources=Resources(cpus=4, mem_mb=8192, time_min=120),
            description="Train a ResNet-50 cell classifier from a label snapshot (split by "
            "image), with held-out metrics next to the marker-mean baseline's.",
            needs_store=False,
        ),
        StepSpec(
            name=PREDICT,
            module="hpc_jobs.steps.predict",
            resources=Resources(cpus=8, mem_mb=16384, time_min=240),
            description="A trained classifier's probability for every nucleus of an image "
            "(optionally a job array over nucleus ranges + a merge).",
        ),
        StepSpec(
            name=WRITEBACK,
            module="hpc_jobs.steps.writeback",
            resources=Resources(cpus=1, mem_mb=4096, time_min=60),
            description="Predictions to the image store: ROIs per positive cell, the per-cell "
            "table, densities per tissue ROI.",
        ),
        StepSpec(
            name=FIND_IMAGES,
            module="hpc_jobs.steps.find_images",
            resources=Resources(cpus=1, mem_mb=1024, time_min=10),
            description="Images of a dataset or tag that have no results for a model yet "
            "(nightly batches).",
        ),
    ]
}


def get_step(name: str) -> StepSpec | None:
    """The spec of a registered step, or None."""
    return STEPS.get(name)


def require_step(name: str) -> StepSpec:
    """The spec of a registered step; an unknown name raises ``ValueError`` listing the known."""
    spec = STEPS.get(name)
    if spec is None:
        raise ValueError(
            f"unknown step {name!r}; registered steps: {', '.join(sorted(STEPS))} "
            "(add a step to hpc_jobs/registry.py)"
        )
    return spec
