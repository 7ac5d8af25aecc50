"""omeflow_cluster_check: the first DAG a new site runs.

Submits the ``cluster_check`` step through the gateway and shows what the compute node offers
(hostname, CPUs, memory, GPUs, Python and package versions) in the task log and XCom.
``sleep_s`` and ``exit_code`` let an admin check that time limits, cancellation and failures
reach Airflow.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from hpc_jobs.registry import CLUSTER_CHECK
from operators.params import form_args, step_form
from operators.step import StepOperator

#: The form params that are not step fields: the job's time limit (checks that Slurm enforces
#: it, with ``sleep_s``). Every other param is generated from ``cluster_check.Params``.
DAG_ONLY_PARAMS: dict[str, Param] = {
    "time_min": Param(10, type="integer", minimum=1, maximum=1440,
                      description="the job's time limit in minutes"),
}

with DAG(
    dag_id="omeflow_cluster_check",
    description="Check the cluster side: node, CPUs, memory, GPUs, Python, packages",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,
    tags=["omeflow", "admin"],
    params={**step_form([CLUSTER_CHECK]), **DAG_ONLY_PARAMS},
    doc_md=__doc__,
) as dag:
    StepOperator(
        task_id=CLUSTER_CHECK,
        step=CLUSTER_CHECK,
        **form_args(CLUSTER_CHECK),
        hpc_resources={"time_min": "{{ params.time_min }}"},
        poll_interval=2.0,
    )
