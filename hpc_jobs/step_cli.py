"""``omeflow step run NAME --params '{...}'``: run one step by itself, for fast development.

Goes through the real gateway code (``hpc_jobs.gateway.handle``: strict validation of the
request and of the step's params, the scheduler, the job directory, the audit line) on the
embedded default: the site file ``var/site.toml`` under ``$AIRFLOW_HOME`` (or this source
checkout), created if missing, unless ``--site`` or ``$OMEFLOW_SITE_CONFIG`` names another.
Submits, streams the job log to stderr while it runs, then prints the step's summary JSON on
stdout. Exit status: 0 when the job COMPLETED, 1 when it ended in another state (named), 2
when the request was refused (the gateway's message names the fix), 130 on Ctrl-C (the job is
cancelled first). No Airflow import: this is cluster-side code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hpc_jobs.protocol import JobState, JobStatus, LogReply, StatusReply, job_key_for
from hpc_jobs.registry import STEPS


class StepRunError(Exception):
    """The gateway refused a call (its error code and message)."""


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not JSON ({exc}); quote the object for the shell, e.g. '{{\"sleep_s\": 1}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``omeflow step run ...``."""
    sub = parser.add_subparsers(dest="step_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run one step through the gateway and wait for it",
                         description=__doc__.splitlines()[0])
    run.add_argument("name", choices=sorted(STEPS), metavar="NAME",
                     help=f"registered step: {', '.join(sorted(STEPS))}")
    run.add_argument("--params", type=_json_object, default={},
                     help="the step's params as a JSON object (its Params model's fields)")
    run.add_argument("--resources", type=_json_object, default={},
                     help='overrides of the step\'s resources, e.g. \'{"cpus": 2}\'')
    run.add_argument("--site", type=Path, default=None,
                     help="site file (default: $OMEFLOW_SITE_CONFIG, else the embedded "
                     "default var/site.toml)")
    run.add_argument("--timeout", type=float, default=None,
                     help="cancel the job and fail after this many seconds")


class _Gateway:
    """Calls into the gateway's own request handler with one site file."""

    def __init__(self, site: Path) -> None:
        self.site = site

    def call(self, verb: str, request: dict[str, Any]) -> dict[str, Any]:
        from hpc_jobs.gateway import handle

        reply, _status = handle(verb, json.dumps(request).encode(), self.site)
        if reply.get("ok") is False:
            error = reply.get("error") or {}
            raise StepRunError(f"{error.get('code')}: {error.get('message')}")
        return reply

    def status(self, job_id: str) -> JobStatus:
        return StatusReply.model_validate(self.call("status", {"job_ids": [job_id]})).jobs[0]

    def log(self, job_id: str, offset: int) -> LogReply:
        return LogReply.model_validate(
            self.call("log", {"job_id": job_id, "offset": offset, "max_bytes": 65536})
        )


def _drain_log(gateway: _Gateway, job_id: str, offset: int) -> int:
    """Copy new job log bytes to stderr; returns the next offset."""
    while True:
        try:
            piece = gateway.log(job_id, offset)
        except StepRunError:  # no log yet
            return offset
        if piece.text:
            sys.stderr.write(piece.text)
            sys.stderr.flush()
        if piece.next_offset <= offset or piece.next_offset >= piece.size:
            return piece.next_offset
        offset = piece.next_offset


def run_step(name: str, params: dict[str, Any], resources: dict[str, Any], site: Path,
             timeout: float | None = None) -> int:
    """Submit ``name``, stream its log, print its summary; the exit status (see module doc)."""
    gateway = _Gateway(site)
    key = job_key_for("step-run", name, time.strftime("%Y%m%dT%H%M%S"), os.getpid())
    try:
        reply = gateway.call("submit", {"step": name, "job_key": key, "params": params,
                                        "resources": resources})
    except StepRunError as exc:
        print(f"omeflow step run: refused: {exc}", file=sys.stderr)
        return 2
    job_id = reply["job_id"]
    print(f"{name}: job {job_id} (native id {reply['native_id']}) on {site}", file=sys.stderr)
    start, delay, offset = time.monotonic(), 0.2, 0
    try:
        while True:
            status = gateway.status(job_id)
            offset = _drain_log(gateway, job_id, offset)
            if status.state.terminal:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                gateway.call("cancel", {"job_id": job_id})
                print(f"{name}: job {job_id} still {status.state.value} after {timeout:g} s; "
                      "cancelled it (raise --timeout)", file=sys.stderr)
                return 1
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    except KeyboardInterrupt:
        gateway.call("cancel", {"job_id": job_id})
        print(f"\n{name}: interrupted; job {job_id} cancelled", file=sys.stderr)
        return 130
    _drain_log(gateway, job_id, offset)
    if status.state is not JobState.COMPLETED:
        print(f"{name}: job {job_id} ended {status.state.value} (exit code {status.exit_code}"
              + (f", {status.reason}" if status.reason else "") + ")", file=sys.stderr)
        return 1
    result = gateway.call("result", {"job_id": job_id, "name": "summary.json"})
    data = result.get("data")
    print(json.dumps(data, indent=2, sort_keys=True) if data is not None else result.get("text"))
    return 0


def main(args: argparse.Namespace) -> int:
    """``omeflow step run``."""
    from hpc_jobs.embedded import embedded_site_path

    site = args.site or embedded_site_path()
    return run_step(args.name, args.params, args.resources, site, args.timeout)
