#!/usr/bin/env python3
"""Run an omeflow DAG through Airflow's public REST API v2: what a nightly system copies.

Standard library only (Python >= 3.9), so the file can be copied to any machine that reaches
the api-server. One ``run`` does what a person does in the UI:

1. ``POST /auth/token`` with the user and password: a bearer token (JWT) for the calls below;
2. ``GET /api/v2/dags/{dag_id}``: the DAG exists (parsed, no import error);
3. ``PATCH /api/v2/dags/{dag_id}`` ``{"is_paused": false}`` when it is paused;
4. ``POST /api/v2/dags/{dag_id}/dagRuns`` ``{"logical_date": null, "conf": {...}}``: the
   api-server validates the conf against the DAG's params (the trigger form's rules);
5. ``GET /api/v2/dags/{dag_id}/dagRuns/{run_id}`` until the run is ``success`` or ``failed``;
6. ``GET /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances``: each task's state;
7. ``GET /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try}?map_index=N``:
   the log of the task named by ``--log`` (by default of the first failed task).

The password is read from ``$AIRFLOW_PASSWORD`` or ``--password-file`` (never from the command
line, where ``ps`` would show it). Exit status: 0 the run succeeded, 1 it failed, 2 a request was
refused (the message is the API's, followed by the fix), 3 ``--timeout`` passed first.

Example::

    export AIRFLOW_PASSWORD=...        # `make ui` prints it
    python scripts/airflow_rest.py --url http://127.0.0.1:8080 --user admin \\
        run celldetector_preprocess --conf '{"image_ids": [1, 2]}' --log 'image.ecdf[0]'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

#: Run states after which nothing more happens (Airflow 3's ``DagRunState``).
FINISHED = ("success", "failed")
EXIT_OK, EXIT_RUN_FAILED, EXIT_REFUSED, EXIT_TIMEOUT = 0, 1, 2, 3
#: Tries of a GET on a timeout or connection error.
GET_ATTEMPTS = 3


class RestError(Exception):
    """A request was refused or could not be made; the message names the fix."""


@dataclass
class TaskRef:
    """A task instance as ``task_id`` or ``task_id[map_index]`` (``image.ecdf[0]``)."""

    task_id: str
    map_index: int = -1

    @classmethod
    def parse(cls, text: str) -> TaskRef:
        if text.endswith("]") and "[" in text:
            task_id, index = text[:-1].rsplit("[", 1)
            if not index.isdigit():
                raise RestError(f"--log {text!r}: the map index in [...] must be a number, "
                                "e.g. 'image.ecdf[0]'")
            return cls(task_id, int(index))
        return cls(text)

    def __str__(self) -> str:
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"


def api_message(body: bytes) -> str:
    """The API's own words from an error body (FastAPI's ``detail``), else the raw text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        return text[:1000] or "(empty reply)"
    if isinstance(detail, list):  # request validation errors: one line per field
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                         if isinstance(d, dict) else str(d) for d in detail)
    if isinstance(detail, dict):
        return json.dumps(detail)
    return str(detail)


class AirflowClient:
    """A minimal client of Airflow's REST API v2 with a bearer token from ``/auth/token``."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = ""

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None,
                accept: str = "application/json") -> tuple[int, bytes]:
        """(status, body) of one call; connection problems raise :class:`RestError`."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        # reads (and the login) are retried on a timeout or a dropped connection (a busy or
        # restarting api-server); writes are not: a lost reply to a trigger must not become
        # two runs
        attempts = GET_ATTEMPTS if method == "GET" or path == "/auth/token" else 1
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as reply:  # noqa: S310
                    return reply.status, reply.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt < attempts:
                    time.sleep(2.0 * attempt)
                    continue
                if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                    raise RestError(
                        f"{method} {path}: no answer from {self.url} within {self.timeout:g} s; "
                        "the api-server is overloaded or stuck: check its log, or raise "
                        "--http-timeout") from None
                raise RestError(f"cannot reach the Airflow api-server at {self.url} ({reason}); "
                                "check --url and that the api-server runs (`make ui` starts one)"
                                ) from None
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, what: str, fix: str, body: Any = None,
             query: dict[str, Any] | None = None, ok: tuple[int, ...] = (200,)) -> Any:
        """The JSON reply of a call that must succeed; otherwise :class:`RestError` with the
        API's message and ``fix`` (401/403 get their own fix)."""
        status, raw = self.request(method, path, body, query)
        if status in ok:
            return json.loads(raw) if raw else None
        message = api_message(raw)
        if status == 401:
            fix = "the token was refused or has expired; log in again (run the script again)"
        elif status == 403:
            fix = "this user lacks the permission; ask an Airflow admin for the role that allows it"
        raise RestError(f"{what}: HTTP {status}: {message}\n  fix: {fix}")

    def login(self, user: str, password: str) -> None:
        """``POST /auth/token`` (Airflow's auth manager, e.g. the SimpleAuthManager)."""
        status, raw = self.request("POST", "/auth/token",
                                   {"username": user, "password": password})
        if status == 201 or status == 200:
            self.token = json.loads(raw)["access_token"]
            return
        message = api_message(raw)
        if status in (400, 401, 403):
            raise RestError(
                f"login as {user!r} refused: HTTP {status}: {message}\n  fix: check --user and "
                "the password in $AIRFLOW_PASSWORD / --password-file (`make ui` prints both; "
                "the SimpleAuthManager keeps them in simple_auth_manager_passwords_file)")
        raise RestError(f"login as {user!r} failed: HTTP {status}: {message}\n  fix: this "
                        "auth manager may not offer POST /auth/token; get a token its own way")

    # -- the DAG -------------------------------------------------------------------------

    def dag(self, dag_id: str) -> dict[str, Any]:
        status, raw = self.request("GET", f"/api/v2/dags/{q(dag_id)}")
        if status == 200:
            return json.loads(raw)
        if status == 404:
            known = self.dag_ids()
            raise RestError(
                f"DAG {dag_id!r} not found: {api_message(raw)}\n  fix: use one of "
                f"{', '.join(known) or '(none parsed yet)'}; a DAG file with an error is listed "
                "under GET /api/v2/importErrors (Browse -> Import errors), and a new file takes "
                "the dag-processor's refresh interval to appear")
        raise RestError(f"reading DAG {dag_id!r}: HTTP {status}: {api_message(raw)}\n  fix: "
                        "check the user's permissions on this DAG")

    def dag_ids(self) -> list[str]:
        status, raw = self.request("GET", "/api/v2/dags", query={"limit": 100})
        if status != 200:
            return []
        return sorted(d["dag_id"] for d in json.loads(raw).get("dags", []))

    def unpause(self, dag_id: str) -> None:
        self.call("PATCH", f"/api/v2/dags/{q(dag_id)}", f"unpausing {dag_id!r}",
                  "unpause it in the UI, or ask an admin for edit permission on the DAG",
                  body={"is_paused": False})

    # -- runs ----------------------------------------------------------------------------

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> str:
        """A new run (``logical_date`` null: runs now, any number of times); its run id."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if run_id:
            body["dag_run_id"] = run_id
        run = self.call(
            "POST", f"/api/v2/dags/{q(dag_id)}/dagRuns", f"the conf for {dag_id!r} was refused",
            "the conf must satisfy the DAG's params (the trigger form's fields and bounds): "
            f"see them with GET /api/v2/dags/{dag_id}/details (\"params\") or open the form",
            body=body)
        return str(run["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        run = self.call("GET", f"/api/v2/dags/{q(dag_id)}/dagRuns/{q(run_id)}",
                        f"reading run {run_id!r}", "check the DAG and run ids")
        return str(run["state"])

    def wait(self, dag_id: str, run_id: str, timeout_s: float, interval_s: float) -> str | None:
        """The run's final state, or None when ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while True:
            new = self.run_state(dag_id, run_id)
            if new != state:
                print(f"run {run_id}: {new}", flush=True)
                state = new
            if state in FINISHED:
                return state
            if time.monotonic() >= deadline:
                return None
            time.sleep(interval_s)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run (mapped ones one per map index), in pages of 100."""
        found: list[dict[str, Any]] = []
        while True:
            page = self.call(
                "GET", f"/api/v2/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances",
                f"listing the tasks of run {run_id!r}", "check the DAG and run ids",
                query={"limit": 100, "offset": len(found)})
            found += page["task_instances"]
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                return found

    def log(self, dag_id: str, run_id: str, task: TaskRef, try_number: int) -> str:
        """The task try's log as text (one line per structured log event)."""
        path = (f"/api/v2/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances/"
                f"{q(task.task_id)}/logs/{try_number}")
        reply = self.call("GET", path, f"reading the log of {task} try {try_number}",
                          "name a task of this run as TASK or TASK[MAP_INDEX] (see the table)",
                          query={"map_index": task.map_index, "full_content": "true"})
        return "\n".join(log_line(e) for e in reply.get("content", []))


def log_line(event: Any) -> str:
    """One structured log event (``{"timestamp", "level", "event", ...}``) as a text line."""
    if not isinstance(event, dict):
        return str(event)
    stamp = str(event.get("timestamp") or "")[:19]
    level = str(event.get("level") or "").upper()
    text = str(event.get("event", ""))
    return " ".join(p for p in (stamp, level and f"[{level}]", text) if p)


def q(part: str) -> str:
    """A path segment, quoted (run ids contain ``:`` and ``+``)."""
    return urllib.parse.quote(part, safe="")


def task_ref(ti: dict[str, Any]) -> TaskRef:
    return TaskRef(ti["task_id"], int(ti.get("map_index", -1)))


def print_tasks(tis: list[dict[str, Any]]) -> None:
    rows = sorted(tis, key=lambda t: (t.get("start_date") or "~", t["task_id"], t["map_index"]))
    width = max([len(str(task_ref(t))) for t in rows] + [4])
    print(f"{'task'.ljust(width)}  {'state':<16} try")
    for ti in rows:
        print(f"{str(task_ref(ti)).ljust(width)}  {str(ti['state']):<16} {ti.get('try_number')}")


def read_password(args: argparse.Namespace) -> str:
    if args.password_file:
        try:
            return args.password_file.read().strip()
        finally:
            args.password_file.close()
    password = os.environ.get("AIRFLOW_PASSWORD")
    if not password:
        raise RestError("no password: set $AIRFLOW_PASSWORD or pass --password-file FILE "
                        "(never on the command line)")
    return password


def parse_conf(args: argparse.Namespace) -> dict[str, Any]:
    text = args.conf_file.read() if args.conf_file else args.conf
    try:
        conf = json.loads(text)
    except ValueError as exc:
        raise RestError(f"--conf is not JSON ({exc}); e.g. --conf '{{\"image_ids\": [1]}}'"
                        ) from None
    if not isinstance(conf, dict):
        raise RestError("--conf must be a JSON object, e.g. '{\"image_ids\": [1]}'")
    return conf


def cmd_run(client: AirflowClient, args: argparse.Namespace) -> int:
    conf = args.conf_object
    dag = client.dag(args.dag_id)
    if dag.get("is_paused"):
        client.unpause(args.dag_id)
        print(f"unpaused {args.dag_id}")
    run_id = client.trigger(args.dag_id, conf, args.run_id)
    print(f"triggered {args.dag_id} run {run_id}", flush=True)
    if args.no_wait:
        return EXIT_OK
    state = client.wait(args.dag_id, run_id, args.timeout, args.interval)
    tis = client.task_instances(args.dag_id, run_id)
    print_tasks(tis)
    chosen = args.log
    if chosen is None and state == "failed":
        failed = [t for t in tis if t["state"] in ("failed", "upstream_failed")]
        failed = [t for t in failed if t["state"] == "failed"] or failed
        chosen = task_ref(failed[0]) if failed else None
    if chosen is not None:
        show_log(client, args.dag_id, run_id, chosen, tis)
    if state is None:
        print(f"error: run {run_id} still {client.run_state(args.dag_id, run_id)} after "
              f"--timeout {args.timeout:g} s; it goes on: look again with `tasks {args.dag_id} "
              f"'{run_id}'`", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_OK if state == "success" else EXIT_RUN_FAILED


def show_log(client: AirflowClient, dag_id: str, run_id: str, task: TaskRef,
             tis: list[dict[str, Any]]) -> None:
    match = [t for t in tis if t["task_id"] == task.task_id and t["map_index"] == task.map_index]
    if not match:
        names = ", ".join(sorted({str(task_ref(t)) for t in tis}))
        raise RestError(f"--log {task}: no such task instance in run {run_id!r}\n  fix: name one "
                        f"of {names}")
    try_number = int(match[0].get("try_number") or 0)
    if try_number < 1:
        print(f"---- log of {task}: it has not run (state {match[0]['state']}) ----")
        return
    print(f"---- log of {task}, try {try_number} ----")
    print(client.log(dag_id, run_id, task, try_number))


def cmd_tasks(client: AirflowClient, args: argparse.Namespace) -> int:
    client.dag(args.dag_id)
    print(f"run {args.run_id}: {client.run_state(args.dag_id, args.run_id)}")
    print_tasks(client.task_instances(args.dag_id, args.run_id))
    return EXIT_OK


def cmd_log(client: AirflowClient, args: argparse.Namespace) -> int:
    client.dag(args.dag_id)
    show_log(client, args.dag_id, args.run_id, args.task,
             client.task_instances(args.dag_id, args.run_id))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="password: $AIRFLOW_PASSWORD or --password-file. Exit: 0 success, 1 run failed, "
               "2 refused, 3 timeout.")
    parser.add_argument("--url", default=os.environ.get("AIRFLOW_URL", "http://127.0.0.1:8080"),
                        help="the api-server (default $AIRFLOW_URL or http://127.0.0.1:8080)")
    parser.add_argument("--user", default=os.environ.get("AIRFLOW_USER", "admin"),
                        help="default $AIRFLOW_USER or admin")
    parser.add_argument("--password-file", type=argparse.FileType("r"),
                        help="a file holding the password (else $AIRFLOW_PASSWORD)")
    parser.add_argument("--http-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="per request (default 60)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="unpause, trigger with a conf, wait, list tasks, show a log")
    run.add_argument("dag_id")
    conf = run.add_mutually_exclusive_group()
    conf.add_argument("--conf", default="{}", help="the run's conf, a JSON object")
    conf.add_argument("--conf-file", type=argparse.FileType("r"), help="the conf from a file")
    run.add_argument("--run-id", help="the run's id (default: Airflow makes one)")
    run.add_argument("--no-wait", action="store_true", help="trigger only")
    run.add_argument("--timeout", type=float, default=6 * 3600, metavar="SECONDS",
                     help="stop waiting after this long (the run goes on); default 6 h")
    run.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                     help="between state checks (default 10)")
    run.add_argument("--log", type=TaskRef.parse, metavar="TASK[MAP_INDEX]",
                     help="print this task's log at the end (default: the first failed task's)")

    tasks = sub.add_parser("tasks", help="a run's state and its tasks' states")
    tasks.add_argument("dag_id")
    tasks.add_argument("run_id")

    log = sub.add_parser("log", help="a task's log (its latest try)")
    log.add_argument("dag_id")
    log.add_argument("run_id")
    log.add_argument("task", type=TaskRef.parse, metavar="TASK[MAP_INDEX]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = AirflowClient(args.url, args.http_timeout)
    try:
        if args.command == "run":  # a typo in the conf is found before anything is sent
            args.conf_object = parse_conf(args)
        client.login(args.user, read_password(args))
        command = {"run": cmd_run, "tasks": cmd_tasks, "log": cmd_log}[args.command]
        return command(client, args)
    except RestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
