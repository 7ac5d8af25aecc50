"""The CellDetector preprocessing operators: :class:`~operators.step.StepOperator` with the
step fixed. Their arguments are exactly the fields of the step's ``Params`` model
(``hpc_jobs/steps/<step>.py``), and only the values given are sent: the model's defaults apply
to the rest. Only segmentation adds behaviour of its own (tiles on a job array, then a merge).
"""

from __future__ import annotations

from hpc_jobs.registry import ECDF, EXPORT_ZARR, SEGMENT_NUCLEI
from operators.array_merge import ArrayMergeStepOperator
from operators.step import StepOperator


class ExportZarrOperator(StepOperator):
    """Export an image from the store to OME-Zarr (NGFF 0.5) on cluster storage.

    Arguments: the fields of ``hpc_jobs.steps.export_zarr.Params`` (``image_id``,
    ``block_size``, ``chunk_size``, ``overwrite``, ``workers``), templated.
    """

    step_name = EXPORT_ZARR


class EcdfOperator(StepOperator):
    """Histograms, eCDFs and quantiles per tissue ROI (holes subtracted) and channel.

    Arguments: the fields of ``hpc_jobs.steps.ecdf.Params``, templated.
    """

    step_name = ECDF


class SegmentNucleiOperator(ArrayMergeStepOperator):
    """Tiled Cellpose segmentation of one image, optionally as a Slurm array + merge.

    Arguments: the fields of ``hpc_jobs.steps.segment_nuclei.Params`` except ``phase`` (set
    here), templated, and:

    :param array_tasks: > 1 splits the tiles over that many array tasks (one node each), then
        a merge array (``phase="merge"``, its own job key: task t paints the cores of its
        tiles, task 0 writes the table) whose summary is the task's result; 1 runs everything
        in one job. Templated. The pattern is
        :class:`~operators.array_merge.ArrayMergeStepOperator`'s.
    """

    step_name = SEGMENT_NUCLEI
