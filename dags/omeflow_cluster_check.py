"""omeflow_cluster_check: the first DAG a new site runs.

Submits the ``cluster_check`` step through the gateway and shows what the compute node offers
(hostname, CPUs, memory, GPUs, Python and package versions) in the task log and XCom.
``sleep_s`` and ``exit_code`` let an admin check that time limits, cancellation and failures
reach Airflow.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from operators.hpc_step import HpcStepOperator

with DAG(
    dag_id="omeflow_cluster_check",
    description="Check the cluster side: node, CPUs, memory, GPUs, Python, packages",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,
    tags=["omeflow", "admin"],
    params={
        "sleep_s": Param(0, type="integer", minimum=0, maximum=86400,
                         description="sleep this long in the job (checks cancel / time limit)"),
        "exit_code": Param(0, type="integer", minimum=0, maximum=255,
                           description="exit with this status (checks failure reporting)"),
        "time_min": Param(10, type="integer", minimum=1, maximum=1440,
                          description="the job's time limit in minutes"),
    },
    doc_md=__doc__,
) as dag:
    HpcStepOperator(
        task_id="cluster_check",
        step="cluster_check",
        step_params={"sleep_s": "{{ params.sleep_s }}", "exit_code": "{{ params.exit_code }}"},
        hpc_resources={"time_min": "{{ params.time_min }}"},
        poll_interval=2.0,
    )
