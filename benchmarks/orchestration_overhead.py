"""Orchestration overhead: Airflow task time minus the cluster job's own run time.

Runs ``omeflow_cluster_check`` N times with ``dag.test()`` (one process, so DAG parsing is paid
once) and, per run, takes the task instance's wall time (first start to end, deferral included)
and the job's elapsed time as the scheduler reports it. Prints the median and spread of the
difference: what Airflow + SSH + gateway + scheduler queueing + polling add to a job.

    python benchmarks/orchestration_overhead.py --runs 10             # embedded default
    python benchmarks/orchestration_overhead.py --runs 10 --sandbox   # SSH + Slurm sandbox
    python benchmarks/orchestration_overhead.py --quick               # 1 run, embedded (CI)

Must run with AIRFLOW_HOME set to a migrated home whose dags_folder is this repo's dags/
(``make bench-overhead`` prepares one under var/bench).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sandbox", action="store_true", help="go through SSH + Slurm")
    parser.add_argument("--quick", action="store_true",
                        help="1 run and 3 status round trips (CI: checks that it still runs)")
    args = parser.parse_args()
    trip_calls = 20
    if args.quick:
        args.runs, trip_calls = 1, 3
    if args.sandbox:
        from hpc_jobs.sandbox import sandbox_env

        env = sandbox_env()
        os.environ["AIRFLOW_CONN_OMEFLOW_HPC"] = json.dumps({
            "conn_type": "ssh", "host": env["host"], "port": env["port"], "login": env["user"],
            "extra": {"key_file": env["key_file"],
                      "host_key": f"{env['host_key_type']} {env['host_key']}"},
        })
    else:  # the embedded default is an explicit choice (see hooks/hpc.py)
        os.environ["AIRFLOW__OMEFLOW__HPC_TRANSPORT"] = "local"
    from airflow.dag_processing.dagbag import DagBag

    from hooks.hpc import HpcGatewayHook

    dag = DagBag(str(REPO / "dags")).get_dag("omeflow_cluster_check")
    hook = HpcGatewayHook()
    rows = []
    for i in range(args.runs):
        t0 = time.time()
        run = dag.test(run_conf={})
        wall = time.time() - t0
        ti = run.get_task_instances()[0]
        job = ti.xcom_pull(task_ids="cluster_check", key="hpc_job")
        status = hook.status([job["job_id"]])[0]
        task_s = (ti.end_date - ti.start_date).total_seconds()
        job_s = status.elapsed_s or 0.0
        rows.append((task_s, job_s, task_s - job_s, wall))
        print(f"run {i + 1:2d}: {run.state}  task {task_s:6.2f} s  job {job_s:5.2f} s  "
              f"overhead {task_s - job_s:6.2f} s  (dag.test wall {wall:5.1f} s)", flush=True)
    # one gateway round trip (SSH exec or subprocess + validation + one scheduler query)
    ids = [hook.status([job["job_id"]])[0].job_id]
    trips = []
    for _ in range(trip_calls):
        t0 = time.perf_counter()
        hook.status(ids)
        trips.append(time.perf_counter() - t0)
    print(f"gateway status round trip: median {statistics.median(trips) * 1000:.0f} ms "
          f"(min {min(trips) * 1000:.0f}, max {max(trips) * 1000:.0f}, {trip_calls} calls)")
    overhead = [r[2] for r in rows]
    transport = "ssh+slurm" if args.sandbox else "local"
    print(f"\n{transport}: runs={len(rows)} median overhead {statistics.median(overhead):.2f} s "
          f"(min {min(overhead):.2f}, max {max(overhead):.2f}); median task "
          f"{statistics.median(r[0] for r in rows):.2f} s, median job "
          f"{statistics.median(r[1] for r in rows):.2f} s; overhead / task = "
          f"{statistics.median(overhead) / statistics.median(r[0] for r in rows):.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
