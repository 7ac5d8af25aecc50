"""Poll cost: what the triggerer spends on status polls with 100 and 1000 tracked jobs.

Runs the real triggers (``operators.triggers.HpcJobTrigger``, sharing one ``StatusPoller``) in
this process's event loop, as a triggerer does, for N tracked jobs, and measures over a
steady-state window (after the poller's start-up ramp reached the poll interval):

- gateway calls per interval (``status`` calls; ids are sent in batches of ``MAX_STATUS_IDS``)
- triggerer CPU seconds per minute (this process: the triggers, the poller, the gateway client,
  JSON and reply validation; with SSH also the encryption), and, for the local transport, the
  gateway processes' CPU seconds per minute (they run on this host then)
- SSH connections opened during the whole run (one shared connection expected)

Of the N tracked jobs, ``--real`` are real jobs (``cluster_check`` sleeping for the run,
submitted through the gateway, cancelled at the end); the others are job keys never submitted,
which the gateway answers as UNKNOWN with a reason: the same request and reply size and the same
triggerer work per job, without starting hundreds of processes (local) or filling the shared
sandbox's queue (Slurm). Their gateway-side cost is lower than that of real jobs (no scheduler
lookup), so the gateway CPU here is a lower bound.

    python benchmarks/poll_cost.py                 # local gateway, 100 and 1000 jobs
    python benchmarks/poll_cost.py --sandbox       # also the SSH gateway of the sandbox
    python benchmarks/poll_cost.py --quick         # CI: local, short window (<= 30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONN_ID = "omeflow_poll_cost"


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


async def measure(n_jobs: int, real_ids: list[str], interval: float, window: float,
                  min_polls: int) -> dict[str, float]:
    """Track ``n_jobs`` jobs (``real_ids`` first) with real triggers; numbers of the window."""
    from hooks.hpc import STATS
    from operators.triggers import FIRST_POLL_S, HpcJobTrigger, StatusPoller

    run_tag = uuid.uuid4().hex[:8]
    ids = real_ids + [f"poll-cost-{run_tag}-{i:05d}" for i in range(n_jobs - len(real_ids))]
    triggers = [HpcJobTrigger(job_id=j, hpc_conn_id=CONN_ID, poll_interval=interval,
                              unknown_timeout=3600.0) for j in ids]

    async def first_event(trigger: HpcJobTrigger) -> Any:
        async for event in trigger.run():
            return event.payload
        return None

    poller = StatusPoller.get(CONN_ID, interval)
    polls_start = poller.polls
    tasks = [asyncio.create_task(first_event(t)) for t in triggers]
    # the ramp: after jobs arrive, delays start at FIRST_POLL_S and double; measure once they
    # reached the interval
    ramp = 1 + max(0, math.ceil(math.log2(interval / FIRST_POLL_S)))
    ramp_deadline = time.monotonic() + 60 + 8 * interval
    while not (poller.polls - polls_start >= ramp and poller.delays[-1] >= interval):
        if time.monotonic() > ramp_deadline or any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.05)
    done = [t for t in tasks if t.done()]
    if done:
        raise RuntimeError(f"{len(done)} triggers fired before the window: "
                           f"{[t.result() for t in done][:3]}")
    calls0, polls0, events0 = STATS.calls["status"], poller.polls, len(STATS.events)
    cpu0, child0, wall0 = time.process_time(), children_cpu(), time.monotonic()
    await asyncio.sleep(window)
    # a poll may take longer than the interval (gateway start-up on a busy host): the window
    # lasts until min_polls polls ended in it (the rate is then set by the poll duration)
    while poller.polls - polls0 < min_polls and time.monotonic() - wall0 < 10 * window + 120:
        await asyncio.sleep(0.05)
    calls, polls = STATS.calls["status"] - calls0, poller.polls - polls0
    tracked = len(poller.waiters)
    cpu, child = time.process_time() - cpu0, children_cpu() - child0
    wall = time.monotonic() - wall0
    spans = [e.end - e.start for e in list(STATS.events)[events0:]
             if e.kind == "call" and e.verb == "status"]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    poll_task = getattr(poller, "_task", None)  # let its last call end (no orphan process)
    if poll_task is not None:
        await asyncio.wait([poll_task], timeout=120)
    return {
        "jobs": n_jobs,
        "polls": polls,
        "calls": calls,
        "calls_per_interval": calls / (wall / interval),
        "call_s": statistics.median(spans) if spans else float("nan"),
        "cpu_per_min": cpu / wall * 60,
        "gateway_cpu_per_min": child / wall * 60,
        "batch": tracked,
        "wall": wall,
    }


def set_connection(sandbox: bool, root: Path) -> str:
    """Point ``CONN_ID`` at the sandbox's SSH gateway or at a local gateway under ``root``."""
    if sandbox:
        from orchestration_overhead import sandbox_connection

        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(sandbox_connection())
        return "ssh"
    from hpc_jobs.config import SiteConfig

    site = root / "site.toml"
    site.write_text(SiteConfig.local(root).to_toml())
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "generic", "extra": {"transport": "local", "config": str(site)}})
    return "local"


def run_transport(sandbox: bool, sizes: list[int], repeats: int, real: int, interval: float,
                  window: float, min_polls: int) -> dict[int, list[dict[str, float]]]:
    from hooks.hpc import STATS, HpcGatewayHook

    with tempfile.TemporaryDirectory(prefix="poll_cost_") as tmp:
        transport = set_connection(sandbox, Path(tmp))
        hook = HpcGatewayHook(CONN_ID)
        STATS.reset()
        tag = uuid.uuid4().hex[:8]
        # real jobs sleep through every measurement of this transport, then are cancelled
        sleep_s = int(len(sizes) * repeats * (window + 8 * interval + 30)) + 60
        real_ids = [hook.submit("cluster_check", f"poll-cost-real-{tag}-{i}",
                                params={"sleep_s": sleep_s},
                                resources={"time_min": sleep_s // 60 + 2}).job_id
                    for i in range(real)]
        results: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
        connects_before = STATS.ssh_connects

        async def all_runs() -> None:
            """One event loop, as in a triggerer: job sets come and go, the loop stays."""
            for _ in range(repeats):
                for n in sizes:
                    row = await measure(n, real_ids, interval, window, min_polls)
                    results[n].append(row)
                    print(f"{transport:5s} {n:5d} jobs: {row['polls']:3.0f} polls, "
                          f"{row['calls']:3.0f} status calls in {row['wall']:.1f} s "
                          f"({row['calls_per_interval']:.2f} per {interval:g} s interval, "
                          f"{row['batch']:.0f} ids tracked, call {row['call_s']:.2f} s); "
                          f"triggerer CPU {row['cpu_per_min']:.2f} s/min; gateway CPU here "
                          f"{row['gateway_cpu_per_min']:.2f} s/min", flush=True)

        try:
            asyncio.run(all_runs())
        finally:
            for job_id in real_ids:
                hook.cancel(job_id)
        print(f"{transport:5s} SSH connections opened by the triggers: "
              f"{STATS.ssh_connects - connects_before} "
              f"({repeats * len(sizes)} job sets one after another in one event loop)")
        return results


def summarize(transport: str, results: dict[int, list[dict[str, float]]],
              interval: float) -> None:
    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[n])

    def rng(n: int, key: str) -> str:
        values = [r[key] for r in results[n]]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    print(f"\n{transport}: jobs  calls/interval  status call s  triggerer CPU s/min  "
          f"gateway CPU s/min here"
          f"   (median (min-max) over {len(next(iter(results.values())))} runs, interval "
          f"{interval:g} s)")
    for n in results:
        print(f"{transport}: {n:5d}  {rng(n, 'calls_per_interval'):>16s}  "
              f"{rng(n, 'call_s'):>16s}  {rng(n, 'cpu_per_min'):>19s}  "
              f"{rng(n, 'gateway_cpu_per_min'):>19s}")
    small, large = min(results), max(results)
    print(f"{transport}: ratio {large}/{small} jobs: calls per interval "
          f"{med(large, 'calls_per_interval') / med(small, 'calls_per_interval'):.2f}, "
          f"triggerer CPU {med(large, 'cpu_per_min') / max(med(small, 'cpu_per_min'), 1e-9):.2f}"
          f"; per-job polling would make {large} calls per interval (shared poll: "
          f"{med(large, 'calls_per_interval'):.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="tracked jobs, comma-separated")
    parser.add_argument("--interval", type=float, default=5.0, help="poll interval (s)")
    parser.add_argument("--window", type=float, default=60.0, help="measured seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real", type=int, default=1, help="real (sleeping) jobs among them")
    parser.add_argument("--sandbox", action="store_true",
                        help="also through the sandbox's SSH gateway and Slurm")
    parser.add_argument("--quick", action="store_true", help="CI: local only, short window")
    args = parser.parse_args()
    if args.quick:
        args.interval, args.window, args.repeats, args.sandbox = 1.0, 2.0, 1, False
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("AIRFLOW__OMEFLOW__HPC_TRANSPORT", "ssh")
    transports = [False] + ([True] if args.sandbox else [])
    for sandbox in transports:
        results = run_transport(sandbox, sizes, args.repeats, args.real, args.interval,
                                args.window, 1 if args.quick else 2)
        summarize("ssh" if sandbox else "local", results, args.interval)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    raise SystemExit(main())
