"""What every per-image CellDetector DAG shares: its settings, its trigger form, the image
check that opens each run, and the map over the images that passed.

A per-image DAG reads::

    with image_dag("celldetector_x", "...", __doc__, steps=[STEP], filled=FILLED_BY_DAG,
                   dag_only_params=DAG_ONLY_PARAMS) as dag:
        check = check_images(steps=[STEP], filled=FILLED_BY_DAG, need_tissue=True)

        @task_group(group_id="image")
        def per_image(image_id: int) -> None:
            StepOperator(task_id=STEP, step=STEP, image_id=image_id, **form_args(STEP, ...))

        per_image.expand(image_id=checked_image_ids(check.output))
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from hpc_jobs.registry import CHECK_IMAGES
from operators.params import form_args, form_checker, step_form
from operators.step import StepOperator

#: Settings of every per-image CellDetector DAG: triggered by people (form / REST) or by other
#: DAGs, never backfilled, template values rendered as JSON values (numbers, lists).
IMAGE_DAG_SETTINGS: dict[str, Any] = {
    "schedule": None,
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "render_template_as_native_obj": True,
    "max_active_runs": 4,
    "tags": ["omeflow", "celldetector"],
}


def image_dag(
    dag_id: str, description: str, doc_md: str | None, *, steps: Sequence[str],
    filled: Collection[str], dag_only_params: Mapping[str, Param],
) -> DAG:
    """A per-image DAG whose form is ``check_images`` + ``steps``' user-facing fields (minus
    ``filled``, the fields the DAG sets itself) and ``dag_only_params``."""
    return DAG(
        dag_id=dag_id,
        description=description,
        doc_md=doc_md,
        params={
            **step_form([CHECK_IMAGES, *steps], exclude=filled),
            **dag_only_params,
        },
        **IMAGE_DAG_SETTINGS,
    )


def check_images(*, steps: Sequence[str], filled: Collection[str], need_tissue: Any
                 ) -> StepOperator:
    """The run's first task: the images picked (ids, a dataset, a tag; the log says how many
    matched and which) and every one checked in seconds (exists, channels in range, a
    tissue ROI when ``need_tissue``), each problem named with its fix; before it, the run's
    params are validated with every step model at once (cross-field rules such as ``halo >=
    2 x diameter`` fail here, not hours later when the step that needs them starts)."""
    return StepOperator(
        task_id=CHECK_IMAGES,
        step=CHECK_IMAGES,
        **form_args(CHECK_IMAGES, exclude=filled),
        need_tissue=need_tissue,
        pre_execute=form_checker([CHECK_IMAGES, *steps], exclude=filled),
        poll_interval=2.0,
    )


@task
def checked_image_ids(summary: dict) -> list[int]:
    """The image ids that passed the check (the map over images)."""
    return [int(i) for i in summary["image_ids"]]
