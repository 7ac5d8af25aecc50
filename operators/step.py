"""``StepOperator``: any registered step, its params given as keyword arguments.

``StepOperator(task_id=..., step=EXPORT_ZARR, image_id=3, overwrite=True)`` submits
``export_zarr`` with ``{"image_id": 3, "overwrite": True}``: only the values given are sent,
so the step model's own defaults apply to the rest (nothing is restated here). Argument names
are checked against the step's model when the DAG is parsed; a wrong one is refused with the
list of valid ones. Values may be templates (``"{{ params.block_size }}"``); with
``render_template_as_native_obj=True`` they reach the cluster as JSON numbers, lists, ...

A subclass fixes the step with ``step_name`` (checked against the registry when the class is
defined) and adds only what the generic operator cannot do (e.g. the segmentation's
tiles-then-merge). ``enabled`` (templated) skips the task when it renders false, so a DAG can
leave out a step the user deselected in the trigger form.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any, ClassVar

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowSkipException

from hpc_jobs.registry import require_step
from operators.hpc_step import HpcStepOperator
from operators.params import check_step_args

_FALSE = (False, "False", "false", 0, None, "")


@cache
def operator_arg_names(cls: type[BaseOperator]) -> frozenset[str]:
    """Keyword arguments of ``cls`` and its bases' ``__init__`` (the operator's own arguments,
    as opposed to the step's params)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                names.add(p.name)
    return frozenset(names)


class StepOperator(HpcStepOperator):
    """Run one registered step; its params are keyword arguments named like its model's fields.

    :param step: registered step name (``hpc_jobs.registry`` constants); fixed by subclasses
        through ``step_name``.
    :param enabled: skip this task when it renders false (templated).
    :param step_args: the step's params, by field name; only these are sent (templated).

    Every other keyword argument goes to :class:`~operators.hpc_step.HpcStepOperator`
    (``hpc_resources``, ``hpc_conn_id``, ``omero_conn_id``, ``poll_interval`` ...) or
    ``BaseOperator``.
    """

    template_fields: Sequence[str] = (*HpcStepOperator.template_fields, "enabled")
    #: The step a subclass runs (a ``hpc_jobs.registry`` name); empty for the generic operator.
    step_name: ClassVar[str] = ""
    #: Fields of the step this operator sets itself; refused as arguments.
    fills: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.step_name:
            require_step(cls.step_name)  # a typo fails at import, naming the registered steps
            check_step_args(cls.step_name, cls.fills)

    def __init__(self, *, step: str | None = None, enabled: Any = True, **kwargs: Any) -> None:
        if self.step_name and step not in (None, self.step_name):
            raise TypeError(f"{type(self).__name__} runs step {self.step_name!r}, not {step!r}")
        step = step or self.step_name
        if not step:
            raise TypeError(f"{type(self).__name__} needs step= (a registered step name)")
        fields = require_step(step).params_model.model_fields
        own = operator_arg_names(type(self))
        if "step_params" in kwargs:
            raise TypeError(
                f"{type(self).__name__}: give the step's params as keyword arguments "
                "(e.g. block_size=...), not step_params"
            )
        step_args = {k: kwargs.pop(k) for k in list(kwargs) if k in fields or k not in own}
        check_step_args(step, step_args, refused=self.fills)
        super().__init__(step=step, step_params=step_args, **kwargs)
        self.enabled = enabled

    def execute(self, context: Context) -> Any:
        if self.enabled in _FALSE:
            raise AirflowSkipException(f"{self.step} was not selected for this run")
        return super().execute(context)
