"""omeflow's Airflow plugin: the "HPC jobs" page, its nav entry and the "Cluster job log" link.

- ``fastapi_apps``: a small FastAPI app mounted at :data:`URL_PREFIX` (``/omeflow``):

  ``GET /omeflow/jobs``
      the last :data:`PAGE_SIZE` task instances that pushed the ``hpc_job`` XCom
      (:class:`~operators.hpc_step.HpcStepOperator` and its subclasses), with their Airflow
      state, cluster job id, Slurm native id and the live cluster state from ONE batched
      ``status`` call per gateway connection.
  ``GET /omeflow/jobs/{job_id}/log``
      the tail of that job's log (``HpcGatewayHook.log``); ``job_id`` must match the
      protocol's :data:`~hpc_jobs.protocol.JobKey` pattern.

  Airflow 3 gives plugin apps no authentication, so every route depends on Airflow's own
  :func:`airflow.api_fastapi.core_api.security.get_user` (JWT from ``Authorization: Bearer`` or
  the ``_token`` cookie the UI sets: 401 without one, 403 for a bad one) and then asks the auth
  manager: the page needs read access to task instances and lists only Dags the user may read;
  the log view needs read access to the task logs of the job's Dag.
- ``external_views``: a nav entry "HPC jobs" that frames the page in the Airflow UI.
- ``operator_extra_links``: "Cluster job log" on ``HpcStepOperator`` (and its subclasses known
  when the plugin loads) → the log view of the task's cluster job.
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from hooks.hpc import DEFAULT_CONN_ID, HpcGatewayError, HpcGatewayHook, HpcTransportError
from hpc_jobs.protocol import MAX_CHUNK_BYTES, JobKey, JobStatus
from operators.hpc_step import HpcStepOperator

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

#: Where the FastAPI app is mounted in the API server.
URL_PREFIX = "/omeflow"
#: XCom key that HpcStepOperator pushes: ``{"job_id", "native_id"}`` (``hpc_conn_id`` optional).
HPC_JOB_XCOM = "hpc_job"
#: Rows on the jobs page.
PAGE_SIZE = 50
#: How many recent ``hpc_job`` XComs the log view searches for a job id.
LOOKUP_LIMIT = 5000
#: Default tail of the log view.
DEFAULT_TAIL_BYTES = 64 * 1024

_JOB_KEY = TypeAdapter(JobKey)


# ------------------------------------------------------------------------------------------------
# Reading the metadata DB
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HpcJobRow:
    """One task instance that ran a cluster job (its ``hpc_job`` XCom) and its Airflow state."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    operator: str | None
    state: str | None
    job_id: str
    native_id: str | None
    hpc_conn_id: str
    pushed_at: datetime | None


def _decode_xcom(value: Any) -> dict[str, Any] | None:
    """The ``hpc_job`` XCom as a dict (stored as JSON, or as JSON text), else None."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict) or not isinstance(value.get("job_id"), str):
        return None
    return value


def recent_hpc_jobs(
    session: Session, dag_ids: Iterable[str] | None, limit: int = PAGE_SIZE
) -> list[HpcJobRow]:
    """The newest ``limit`` task instances with an ``hpc_job`` XCom, newest first.

    :param dag_ids: only these Dags (the ones the user may read); None means all.
    """
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.xcom import XComModel as X

    stmt = (
        select(
            X.dag_id, X.run_id, X.task_id, X.map_index, X.value, X.timestamp,
            TI.state, TI.try_number, TI.operator,
        )
        .join(
            TI,
            and_(
                TI.dag_id == X.dag_id, TI.run_id == X.run_id,
                TI.task_id == X.task_id, TI.map_index == X.map_index,
            ),
        )
        .where(X.key == HPC_JOB_XCOM)
        .order_by(X.timestamp.desc())
        .limit(limit)
    )
    if dag_ids is not None:
        dag_ids = set(dag_ids)
        if not dag_ids:
            return []
        stmt = stmt.where(X.dag_id.in_(dag_ids))
    rows = []
    for r in session.execute(stmt):
        job = _decode_xcom(r.value)
        if job is None:
            continue
        rows.append(
            HpcJobRow(
                dag_id=r.dag_id, run_id=r.run_id, task_id=r.task_id, map_index=r.map_index,
                try_number=r.try_number, operator=r.operator,
                state=str(r.state.value if hasattr(r.state, "value") else r.state)
                if r.state is not None else None,
                job_id=job["job_id"],
                native_id=str(job["native_id"]) if job.get("native_id") is not None else None,
                hpc_conn_id=str(job.get("hpc_conn_id") or DEFAULT_CONN_ID),
                pushed_at=r.timestamp,
            )
        )
    return rows


def live_status(rows: Sequence[HpcJobRow]) -> tuple[dict[str, JobStatus], list[str]]:
    """Cluster state of all rows: ONE ``status`` call per gateway connection (usually one).

    :return: job id → status, and the errors (one line per connection that failed).
    """
    by_conn: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row.job_id not in by_conn[row.hpc_conn_id]:
            by_conn[row.hpc_conn_id].append(row.job_id)
    found: dict[str, JobStatus] = {}
    errors: list[str] = []
    for conn_id, job_ids in by_conn.items():
        try:
            for job in HpcGatewayHook(conn_id, timeout=30).status(job_ids):
                found[job.job_id] = job
        except (HpcGatewayError, HpcTransportError) as exc:
            errors.append(f"connection {conn_id!r}: {exc}")
    return found, errors


# ------------------------------------------------------------------------------------------------
# Authorization (plugin apps get none from Airflow: every route depends on these)
# ------------------------------------------------------------------------------------------------
UserDep = Annotated[BaseUser, Depends(get_user)]


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def require_task_instance_reader(user: UserDep) -> BaseUser:
    """401/403 unless the caller is logged in and may read task instances of some Dag."""
    if not _auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.TASK_INSTANCE, user=user
    ):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden: you may not read task instances")
    return user


ReaderDep = Annotated[BaseUser, Depends(require_task_instance_reader)]


def readable_dag_ids(user: BaseUser) -> set[str]:
    """Dags whose task instances ``user`` may read."""
    return _auth_manager().get_authorized_dag_ids(user=user, method="GET")


# ------------------------------------------------------------------------------------------------
# HTML (every dynamic value goes through html.escape / quote)
# ------------------------------------------------------------------------------------------------
_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1rem}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
    "text-align:left;font-size:.9rem}th{background:#f3f3f3}"
    "pre{background:#111;color:#eee;padding:.75rem;white-space:pre-wrap;word-break:break-all}"
    ".error{color:#a00}"
)


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>{body}</body></html>",
        status_code=status_code,
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def log_path(job_id: str) -> str:
    """Path of the log view of ``job_id`` (below the API server's root)."""
    return f"{URL_PREFIX}/jobs/{quote(job_id, safe='')}/log"


def _ti_ui_path(row: HpcJobRow) -> str:
    path = (
        f"/dags/{quote(row.dag_id, safe='')}/runs/{quote(row.run_id, safe='')}"
        f"/tasks/{quote(row.task_id, safe='')}"
    )
    return path + (f"/mapped/{row.map_index}" if row.map_index >= 0 else "")


def _root(request: Request) -> str:
    """The API server's root path (non-empty behind a base_url with a sub path)."""
    root = str(request.scope.get("root_path") or "")
    return root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else root


def render_jobs(
    rows: Sequence[HpcJobRow], live: dict[str, JobStatus], errors: Sequence[str], root: str
) -> str:
    """The jobs table as HTML."""
    head = (
        "<tr><th>Dag</th><th>Run</th><th>Task</th><th>Try</th><th>Airflow state</th>"
        "<th>Cluster job</th><th>Native id</th><th>Cluster state</th><th>Exit code</th>"
        "<th>Elapsed s</th><th>Reason</th><th>Log</th></tr>"
    )
    lines = []
    for row in rows:
        job = live.get(row.job_id)
        task = row.task_id + (f"[{row.map_index}]" if row.map_index >= 0 else "")
        elapsed = f"{job.elapsed_s:.0f}" if job and job.elapsed_s is not None else ""
        lines.append(
            "<tr>"
            f"<td>{_e(row.dag_id)}</td><td>{_e(row.run_id)}</td>"
            f"<td><a href='{_e(root + _ti_ui_path(row))}' target='_top'>{_e(task)}</a></td>"
            f"<td>{_e(row.try_number)}</td>"
            f"<td class='airflow-state'>{_e(row.state)}</td>"
            f"<td class='job-id'>{_e(row.job_id)}</td><td>{_e(row.native_id)}</td>"
            f"<td class='cluster-state'>{_e(job.state.value if job else 'unavailable')}</td>"
            f"<td>{_e(job.exit_code if job else '')}</td><td>{_e(elapsed)}</td>"
            f"<td>{_e(job.reason if job else '')}</td>"
            f"<td><a href='{_e(root + log_path(row.job_id))}'>log</a></td>"
            "</tr>"
        )
    problems = "".join(
        f"<p class='error'>Live cluster state unavailable: {_e(err)}</p>" for err in errors
    )
    if not rows:
        return problems + "<p>No cluster jobs yet (or none in Dags you may read).</p>"
    return (
        problems
        + f"<p>The last {len(rows)} task instances that ran a cluster job.</p>"
        + f"<table><thead>{head}</thead><tbody>{''.join(lines)}</tbody></table>"
    )


# ------------------------------------------------------------------------------------------------
# The FastAPI app
# ------------------------------------------------------------------------------------------------
app = FastAPI(
    title="omeflow",
    description="HPC jobs of omeflow's cluster steps (needs an Airflow login).",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@app.get("/jobs", response_class=HTMLResponse, name="jobs")
def jobs_page(request: Request, user: ReaderDep, session: SessionDep) -> HTMLResponse:
    """Recent HPC jobs with Airflow state and live cluster state (one status call)."""
    rows = recent_hpc_jobs(session, readable_dag_ids(user), PAGE_SIZE)
    live, errors = live_status(rows) if rows else ({}, [])
    return _page("HPC jobs", render_jobs(rows, live, errors, _root(request)))


@app.get("/jobs/{job_id}/log", response_class=HTMLResponse, name="job_log")
def job_log(
    request: Request,
    job_id: str,
    user: ReaderDep,
    session: SessionDep,
    tail_bytes: Annotated[int, Query(ge=1, le=MAX_CHUNK_BYTES)] = DEFAULT_TAIL_BYTES,
) -> HTMLResponse:
    """The tail of one cluster job's log, for users who may read that task's logs."""
    try:
        job_id = _JOB_KEY.validate_python(job_id)
    except ValidationError:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"{job_id[:200]!r} is not a cluster job id (letters, digits and _ . = -, starting "
            "with a letter or digit, at most 160 characters); copy it from the HPC jobs page",
        ) from None
    row = next(
        (r for r in recent_hpc_jobs(session, readable_dag_ids(user), LOOKUP_LIMIT)
         if r.job_id == job_id),
        None,
    )
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no task instance you may read ran cluster job {job_id!r} (the log view searches "
            f"the last {LOOKUP_LIMIT} cluster jobs); check the id on the HPC jobs page",
        )
    if not _auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.TASK_LOGS,
        details=DagDetails(id=row.dag_id), user=user,
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"Forbidden: you may not read task logs of {row.dag_id!r}"
        )
    back = f"<p><a href='{_e(_root(request) + URL_PREFIX + '/jobs')}'>All HPC jobs</a></p>"
    meta = (
        f"<p>Dag {_e(row.dag_id)}, run {_e(row.run_id)}, task {_e(row.task_id)}, "
        f"try {_e(row.try_number)}; native id {_e(row.native_id)}</p>"
    )
    try:
        reply = HpcGatewayHook(row.hpc_conn_id, timeout=30).log(
            job_id, offset=-tail_bytes, max_bytes=tail_bytes
        )
    except (HpcGatewayError, HpcTransportError) as exc:
        body = back + meta + f"<p class='error'>The gateway did not return the log: {_e(exc)}</p>"
        return _page(f"Cluster job {job_id}", body, status.HTTP_502_BAD_GATEWAY)
    shown = f"bytes {reply.offset}-{reply.next_offset} of {reply.size}"
    body = back + meta + f"<p>{_e(shown)}</p><pre class='log'>{_e(reply.text)}</pre>"
    return _page(f"Cluster job {job_id}", body)


# ------------------------------------------------------------------------------------------------
# Operator extra link
# ------------------------------------------------------------------------------------------------
def _base_url() -> str:
    try:
        from airflow.configuration import conf
    except ImportError:  # pragma: no cover - a worker without airflow-core
        from airflow.sdk.configuration import conf  # type: ignore[no-redef]
    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def _hpc_job_of(ti_key: TaskInstanceKey) -> dict[str, Any] | None:
    """The ``hpc_job`` XCom of a task instance: through the Task SDK inside a task, else the DB."""
    try:
        from airflow.sdk.execution_time import task_runner

        in_task = getattr(task_runner, "SUPERVISOR_COMMS", None) is not None
    except ImportError:  # pragma: no cover
        in_task = False
    if in_task:
        from airflow.sdk import XCom

        return _decode_xcom(XCom.get_value(ti_key=ti_key, key=HPC_JOB_XCOM))

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        raw = session.execute(
            XComModel.get_many(
                key=HPC_JOB_XCOM, run_id=ti_key.run_id, dag_ids=ti_key.dag_id,
                task_ids=ti_key.task_id, map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).scalar()
    return _decode_xcom(raw)


class ClusterJobLogLink(BaseOperatorLink):
    """"Cluster job log": the plugin's log view of the task's cluster job (its ``hpc_job`` XCom).

    Works where Airflow calls it: in the API server (registered through this plugin) and in the
    worker (if listed in an operator's ``operator_extra_links``). Empty when the task has not
    submitted a job yet.
    """

    name = "Cluster job log"
    operators: list[type[BaseOperator]] = []  # filled by the plugin (see _hpc_operator_classes)

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        job = _hpc_job_of(ti_key)
        if job is None:
            return ""
        return _base_url() + log_path(job["job_id"])


def _hpc_operator_classes() -> list[type[BaseOperator]]:
    """HpcStepOperator and its subclasses in the ``operators`` package (Airflow matches a
    plugin's link to exact classes, so each per-step subclass must be listed)."""
    import importlib
    import pkgutil

    import operators

    for mod in pkgutil.iter_modules(operators.__path__, prefix="operators."):
        try:
            importlib.import_module(mod.name)
        except Exception as exc:  # noqa: BLE001 - one broken module must not hide the plugin
            log.warning("omeflow plugin: cannot import %s (%s); its operators get no "
                        "'Cluster job log' link until the import error is fixed", mod.name, exc)
    found: list[type[BaseOperator]] = []
    todo: list[type[BaseOperator]] = [HpcStepOperator]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


ClusterJobLogLink.operators = _hpc_operator_classes()


# ------------------------------------------------------------------------------------------------
# The plugin
# ------------------------------------------------------------------------------------------------
class OmeflowPlugin(AirflowPlugin):
    """omeflow: the HPC jobs page (auth enforced), its nav entry and the cluster job log link."""

    name = "omeflow"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "omeflow HPC jobs"}]
    external_views = [
        {
            "name": "HPC jobs",
            # relative to the API server's base URL (no leading slash)
            "href": URL_PREFIX.lstrip("/") + "/jobs",
            "destination": "nav",
            "url_route": "omeflow-hpc-jobs",
            "category": "browse",
        }
    ]
    operator_extra_links = [ClusterJobLogLink()]
