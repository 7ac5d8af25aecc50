"""The prediction operators: ``predict`` (array over nucleus ranges + merge) and ``writeback``.

Their arguments are the fields of the steps' ``Params`` models (``hpc_jobs/steps/predict.py``,
``hpc_jobs/steps/writeback.py``); only the values given are sent.
"""

from __future__ import annotations

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
