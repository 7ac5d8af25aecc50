"""Orchestration overhead: Airflow task time minus the cluster job's own run time.

Runs ``omeflow_cluster_check`` N times with ``dag.test()`` (one process, so DAG parsing is paid
once) and, per run, takes the task instance's wall time (first start to end, deferral included)
and the job's elapsed time as the scheduler reports it. Prints the median and spread of the
difference: what Airflow + SSH + gateway + scheduler queueing + polling add to a job.

Each run is also broken down along its critical path, from events measured in the same run:
the hook's own records (``hooks.hpc.STATS``: SSH connection set-ups and gateway calls with
wall-clock bounds) and, with ``--sandbox``, Slurm's millisecond log lines for the job (submit
RPC, allocation, launch on the node, completion). Per run and as medians over the runs:

    task start-up      task instance start -> first gateway activity (Airflow task run)
    ssh connect        SSH handshakes of the sync hook (in its submit and result calls)
    submit call        the submit exec (gateway process start + validation + sbatch)
    slurm scheduling   submit reply -> Slurm allocates the job (its scheduling tick)
    job start-up       allocation -> slurmd launches the batch script
    job                launch -> Slurm records the job complete (not overhead)
    poll back-off      job complete -> the status poll that saw it returned (and, apart, the
                       gateway call of that poll: the rest is the wait for the next poll)
    task resume        trigger fired -> resumed task's first gateway call (Airflow)
    result call        the result exec (gateway process start + file read)
    task finish        result reply -> task instance end

plus the gateway process start alone (a ``ping`` round trip on an open connection) and the
SSH connections opened per run (sync hook, async trigger client).

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
import re
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: Critical-path slices in order (``job`` is the job's own run, not overhead).
SLICES = ("task start-up", "ssh connect", "submit call", "slurm scheduling", "job start-up",
          "job", "poll back-off", "task resume", "result call", "task finish")
SLURM_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})\] (.*)$")


def sandbox_connection() -> dict[str, Any]:
    """The Airflow connection (JSON form) of the sandbox's SSH gateway, host key pinned."""
    from hpc_jobs.sandbox import sandbox_env

    env = sandbox_env()
    return {
        "conn_type": "ssh", "host": env["host"], "port": env["port"], "login": env["user"],
        "extra": {"key_file": env["key_file"],
                  "host_key": f"{env['host_key_type']} {env['host_key']}"},
    }


def slurm_events(native_id: str) -> dict[str, float]:
    """Epoch seconds of the job's submit RPC, allocation, launch and completion, read from the
    sandbox's slurmctld / slurmd logs (millisecond resolution; the sandbox runs on this host)."""
    from hpc_jobs.sandbox import paths

    patterns = {
        "submit": re.compile(rf"_slurm_rpc_submit_batch_job: JobId={native_id}\b"),
        "allocate": re.compile(rf"(Allocate|Started) JobId={native_id}\b"),
        "complete": re.compile(rf"_job_complete: JobId={native_id}\b"),
        "launch": re.compile(rf"Launching batch job {native_id}\b"),
    }
    found: dict[str, float] = {}
    for log in (paths.SLURMCTLD_LOG, paths.SLURMD_LOG):
        with open(log, "rb") as fh:  # the tail is enough: the job ran just now
            fh.seek(max(0, fh.seek(0, 2) - 2_000_000))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
        for line in lines:
            m = SLURM_LINE.match(line)
            if not m:
                continue
            for name, pattern in patterns.items():
                if name not in found and pattern.search(m.group(2)):
                    # Slurm logs local time; a naive datetime's timestamp() reads it as such
                    found[name] = datetime.fromisoformat(m.group(1)).timestamp()
    return found


def breakdown(ti: Any, native_id: str, events: list[Any], sandbox: bool) -> dict[str, float]:
    """Seconds per critical-path slice of one run (see the module docstring); missing events
    (the local scheduler has no Slurm log) leave their slices out."""
    start, end = ti.start_date.timestamp(), ti.end_date.timestamp()
    calls = [e for e in events if e.kind == "call"]
    submit = next(e for e in calls if e.verb == "submit")
    result = next(e for e in calls if e.verb == "result" and e.start > submit.end)
    polls = [e for e in calls if e.verb == "status" and e.side == "async"]
    seen = max((e for e in polls if e.end <= result.start), key=lambda e: e.end)
    # the sync hook connects inside its first call (submit; result after the resume)
    connects = [e for e in events if e.kind == "connect" and e.side == "sync"
                and submit.start <= e.start <= result.end]

    def inside(call: Any) -> float:
        return sum(c.end - c.start for c in connects if call.start <= c.start <= call.end)

    out = {
        "task start-up": submit.start - start,
        "ssh connect": sum(c.end - c.start for c in connects),
        "submit call": submit.end - submit.start - inside(submit),
        "task resume": result.start - seen.end,
        "result call": result.end - result.start - inside(result),
        "task finish": end - result.end,
    }
    slurm = slurm_events(native_id) if sandbox else {}
    if {"allocate", "launch", "complete"} <= set(slurm):
        out["slurm scheduling"] = slurm["allocate"] - submit.end
        out["job start-up"] = slurm["launch"] - slurm["allocate"]
        out["job"] = slurm["complete"] - slurm["launch"]
        out["poll back-off"] = seen.end - slurm["complete"]
        # of which the seen poll's own gateway call; the rest is the wait for that poll
        out["back-off: poll call"] = seen.end - seen.start
    else:  # local scheduler: queue + run + back-off together
        out["job + queue + poll back-off"] = seen.end - submit.end
    if "job" in out:  # task time minus the job's own run, at millisecond resolution
        out["overhead"] = end - start - out["job"]
    out["async connects"] = sum(e.kind == "connect" and e.side == "async" for e in events)
    out["sync connects"] = sum(e.kind == "connect" and e.side == "sync" for e in events)
    out["status polls"] = len(polls)
    return out


def spread(values: list[float]) -> str:
    return (f"{statistics.median(values):7.3f} (min {min(values):6.3f}, "
            f"max {max(values):6.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sandbox", action="store_true", help="go through SSH + Slurm")
    parser.add_argument("--quick", action="store_true",
                        help="1 run and 3 status round trips (CI: checks that it still runs)")
    parser.add_argument("--first-poll", type=float, default=None, metavar="S",
                        help="experiment: set the poller's FIRST_POLL_S for this run")
    args = parser.parse_args()
    trip_calls = 20
    if args.quick:
        args.runs, trip_calls = 1, 3
    if args.sandbox:
        os.environ["AIRFLOW_CONN_OMEFLOW_HPC"] = json.dumps(sandbox_connection())
    else:  # the embedded default is an explicit choice (see hooks/hpc.py)
        os.environ["AIRFLOW__OMEFLOW__HPC_TRANSPORT"] = "local"
    from airflow.dag_processing.dagbag import DagBag

    from hooks.hpc import STATS, HpcGatewayHook

    if args.first_poll is not None:  # an experiment, printed with the results
        import operators.triggers

        operators.triggers.FIRST_POLL_S = args.first_poll
        print(f"experiment: FIRST_POLL_S = {args.first_poll} s")
    dag = DagBag(str(REPO / "dags")).get_dag("omeflow_cluster_check")
    hook = HpcGatewayHook()
    rows = []
    parts: list[dict[str, float]] = []
    for i in range(args.runs):
        STATS.reset()
        t0 = time.time()
        run = dag.test(run_conf={})
        wall = time.time() - t0
        events = list(STATS.events)
        ti = run.get_task_instances()[0]
        job = ti.xcom_pull(task_ids="cluster_check", key="hpc_job")
        status = hook.status([job["job_id"]])[0]
        task_s = (ti.end_date - ti.start_date).total_seconds()
        job_s = status.elapsed_s or 0.0
        rows.append((task_s, job_s, task_s - job_s, wall))
        parts.append(breakdown(ti, str(job["native_id"]), events, args.sandbox))
        print(f"run {i + 1:2d}: {run.state}  task {task_s:6.2f} s  job {job_s:5.2f} s  "
              f"overhead {task_s - job_s:6.2f} s  (dag.test wall {wall:5.1f} s)", flush=True)
        print("        " + ", ".join(f"{k} {v:.3f}" for k, v in parts[-1].items()), flush=True)
    # one gateway round trip (SSH exec or subprocess + validation + one scheduler query), and
    # the gateway process alone (ping: no scheduler command), both on an open connection
    ids = [hook.status([job["job_id"]])[0].job_id]
    trips, pings = [], []
    for _ in range(trip_calls):
        t0 = time.perf_counter()
        hook.status(ids)
        trips.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hook.ping()
        pings.append(time.perf_counter() - t0)
    STATS.reset()
    t0 = time.perf_counter()
    HpcGatewayHook().ping()  # a new hook: its first call includes the connection set-up
    first_call = time.perf_counter() - t0
    connect_s = STATS.ssh_connect_s
    print(f"gateway status round trip: median {statistics.median(trips) * 1000:.0f} ms "
          f"(min {min(trips) * 1000:.0f}, max {max(trips) * 1000:.0f}, {trip_calls} calls)")
    print(f"gateway process start (ping on an open connection): median "
          f"{statistics.median(pings) * 1000:.0f} ms (min {min(pings) * 1000:.0f}, max "
          f"{max(pings) * 1000:.0f}); first call of a new hook {first_call * 1000:.0f} ms, of "
          f"which SSH connect {connect_s * 1000:.0f} ms")
    names = [k for k in SLICES if all(k in p for p in parts)]
    names += [k for k in parts[0] if k not in SLICES]
    print(f"\nbreakdown over {len(parts)} runs, seconds: median (min, max)")
    for name in names:
        print(f"  {name:28s} {spread([p[name] for p in parts])}")
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
