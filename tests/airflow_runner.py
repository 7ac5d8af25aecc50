"""Run one DAG with ``dag.test()`` in a fresh process and print a JSON result line.

Used by tests through :func:`tests.conftest.run_dag` (a subprocess per run keeps Airflow's
process-global state out of pytest). Prints ``OMEFLOW_RESULT {...}`` with the run state, each
task instance's state and its return-value XCom.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    dag_id, conf = sys.argv[1], json.loads(sys.argv[2])
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    if bag.import_errors:
        print("OMEFLOW_RESULT " + json.dumps({"import_errors": bag.import_errors}))
        return 1
    dag = bag.get_dag(dag_id)
    run = dag.test(run_conf=conf)
    tasks = {}
    for ti in run.get_task_instances():
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        tasks[key] = {
            "state": str(ti.state),
            "try_number": ti.try_number,
            "xcom": ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index, key="return_value"),
            "hpc_job": ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index, key="hpc_job"),
        }
    result = {"state": str(run.state), "run_id": run.run_id, "tasks": tasks}
    print("OMEFLOW_RESULT " + json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
