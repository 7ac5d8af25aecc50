"""omeflow's Airflow plugin: the "HPC jobs" page, its nav entry and the "Cluster job log" link.

- ``fastapi_apps``: a small FastAPI app mounted at :data:`URL_PREFIX` (``/omeflow``):

  ``GET /omeflow/jobs``
      the last :data:`PAGE_SIZE` task instances that pushed the ``hpc_job`` XCom
      (:class:`~operators.hpc_step.HpcStepOperator` and its subclasses), with their Airflow
      state, cluster job id, Slurm native id and the live cluster state from ONE batched
      ``status`` call per gateway connection.
  ``GET /omeflow/jobs/log?dag_id=&run_id=&task_id=[&map_index=][&try_number=][&phase=merge]``
      the tail of one task try's cluster job log (``HpcGatewayHook.log``).

  The XCom only says which task instances ran a cluster job. What is read comes from the task
  instance alone, never from the XCom (anyone who may write XComs could forge one): the job id
  is recomputed from dag / run / task / map index / try (:func:`task_job_key`, as the operator
  computes it), and the gateway connection is the task's ``hpc_conn_id`` in the serialized Dag,
  else :data:`~hooks.hpc.DEFAULT_CONN_ID` (:func:`task_hpc_conn_id`).

  Airflow 3 gives plugin apps no authentication, so every route depends on Airflow's own
  :func:`airflow.api_fastapi.core_api.security.get_user` (JWT from ``Authorization: Bearer`` or
  the ``_token`` cookie the UI sets: 401 without one, 403 for a bad one) and then asks the auth
  manager: the page needs read access to task instances and lists only Dags the user may read;
  the log view needs read access to the task logs of the task's Dag.
- ``external_views``: a nav entry "HPC jobs" that frames the page in the Airflow UI.
- ``operator_extra_links``: "Cluster job log" on ``HpcStepOperator`` (and its subclasses known
  when the plugin loads) → the log view of the task try.
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import quote, urlencode

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from annotation_page import router as annotation_router
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from hooks.hpc import (
    DEFAULT_CONN_ID,
    HpcConfigError,
    HpcGatewayError,
    HpcGatewayHook,
    HpcTransportError,
)
from hpc_jobs.protocol import MAX_CHUNK_BYTES, JobStatus
from operators.hpc_step import PHASES, HpcStepOperator, task_job_key

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

#: Where the FastAPI app is mounted in the API server.
URL_PREFIX = "/omeflow"
#: XCom key that HpcStepOperator pushes when it submitted a job. Only its presence is used:
#: its values (job id, connection) are never trusted.
HPC_JOB_XCOM = "hpc_job"
#: Rows on the jobs page.
PAGE_SIZE = 50
#: Default tail of the log view.
DEFAULT_TAIL_BYTES = 64 * 1024
#: Jobs a task try may run after its first one, named by the extra part of their job key
#: (:data:`operators.hpc_step.PHASES`: SegmentNucleiOperator's merge job after its tile array).
Phase = Literal[PHASES]  # type: ignore[valid-type]


# ------------------------------------------------------------------------------------------------
# Reading the metadata DB
# ------------------------------------------------------------------------------------------------
_DAG_BAG: Any = None


def _dag_bag() -> Any:
    """The serialized Dags from the metadata DB, cached as the API server's own (LRU + TTL)."""
    global _DAG_BAG
    if _DAG_BAG is None:
        from airflow.api_fastapi.common.dagbag import create_dag_bag

        _DAG_BAG = create_dag_bag()
    return _DAG_BAG


def task_hpc_conn_id(
    session: Session, dag_id: str, task_id: str, dag_version_id: Any = None
) -> str:
    """The gateway connection of a task: its ``hpc_conn_id`` in the serialized Dag (the version
    the task instance ran, else the latest), else :data:`~hooks.hpc.DEFAULT_CONN_ID`.

    Never from an XCom. Airflow serializes template fields and BaseOperator's own fields only,
    so a task's ``hpc_conn_id`` is there only if its operator lists it in ``template_fields``;
    a templated (unrendered) value is not used either.
    """
    bag = _dag_bag()
    dag = bag.get_dag(dag_version_id, session=session) if dag_version_id else None
    dag = dag or bag.get_latest_version_of_dag(dag_id, session=session)
    value = None
    if dag is not None and dag.has_task(task_id):
        value = getattr(dag.get_task(task_id), "hpc_conn_id", None)
    if isinstance(value, str) and value and "{{" not in value:
        return value
    return DEFAULT_CONN_ID


@dataclass(frozen=True)
class HpcJobRow:
    """One task instance that ran a cluster job: its job id and connection (recomputed from the
    task instance, see :func:`task_job_key`, :func:`task_hpc_conn_id`) and its Airflow state."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    operator: str | None
    state: str | None
    hpc_conn_id: str
    pushed_at: datetime | None

    @property
    def job_id(self) -> str | None:
        """The try's first cluster job; None before the task's first try."""
        return self.phase_job_id(None)

    def phase_job_id(self, phase: str | None) -> str | None:
        """The try's job of ``phase`` (None: the first job; ``merge``: its merge job); None
        before the task's first try."""
        if self.try_number < 1:
            return None
        return task_job_key(self.dag_id, self.run_id, self.task_id, self.map_index,
                            self.try_number, phase)

    def log_path(self, phase: str | None = None) -> str:
        return log_path(self.dag_id, self.run_id, self.task_id, self.map_index, self.try_number,
                        phase)


def _phases() -> tuple[str, ...]:
    return get_args(Phase)


def _has_hpc_job(value: Any) -> bool:
    """Whether an ``hpc_job`` XCom looks like one the operator pushed (a dict with a job id)."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return isinstance(value, dict) and isinstance(value.get("job_id"), str)


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
            TI.state, TI.try_number, TI.operator, TI.dag_version_id,
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
    conns: dict[tuple[str, str, Any], str] = {}
    for r in session.execute(stmt):
        if not _has_hpc_job(r.value):
            continue
        where = (r.dag_id, r.task_id, r.dag_version_id)
        if where not in conns:
            conns[where] = task_hpc_conn_id(session, *where)
        rows.append(
            HpcJobRow(
                dag_id=r.dag_id, run_id=r.run_id, task_id=r.task_id, map_index=r.map_index,
                try_number=r.try_number or 0, operator=r.operator,
                state=str(r.state.value if hasattr(r.state, "value") else r.state)
                if r.state is not None else None,
                hpc_conn_id=conns[where], pushed_at=r.timestamp,
            )
        )
    return rows


def live_status(rows: Sequence[HpcJobRow]) -> tuple[dict[str, JobStatus], list[str]]:
    """Cluster state of all rows' jobs (and their later phases' jobs, e.g. a merge): ONE
    ``status`` call per gateway connection (usually one).

    :return: job id → status, and the errors (one line per connection that failed).
    """
    by_conn: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        for job_id in (row.job_id, *(row.phase_job_id(p) for p in _phases())):
            if job_id and job_id not in by_conn[row.hpc_conn_id]:
                by_conn[row.hpc_conn_id].append(job_id)
    found: dict[str, JobStatus] = {}
    errors: list[str] = []
    for conn_id, job_ids in by_conn.items():
        try:
            for job in HpcGatewayHook(conn_id, timeout=30).status(job_ids):
                found[job.job_id] = job
        except (HpcGatewayError, HpcTransportError, HpcConfigError) as exc:
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
    # cluster job ids are long (dag.run.task.map.try + hash): wrap them, keep the rest readable
    ".job-id,.native-id{font-family:monospace;font-size:.8rem;word-break:break-all;"
    "max-width:14rem}"
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


def log_path(
    dag_id: str, run_id: str, task_id: str, map_index: int = -1,
    try_number: int | None = None, phase: str | None = None,
) -> str:
    """Path of the log view of one task try's cluster job (below the API server's root)."""
    query: dict[str, object] = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id}
    if map_index >= 0:
        query["map_index"] = map_index
    if try_number is not None:
        query["try_number"] = try_number
    if phase:
        query["phase"] = phase
    return f"{URL_PREFIX}/jobs/log?{urlencode(query)}"


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
        "<th>Cluster state</th><th>Exit code</th><th>Elapsed s</th><th>Reason</th><th>Log</th>"
        "<th>Cluster job</th><th>Native id</th></tr>"
    )
    lines = []
    for row in rows:
        job = live.get(row.job_id) if row.job_id else None
        links = [f"<a href='{_e(root + row.log_path())}'>log</a>"] if row.job_id else []
        for phase in _phases():
            later = live.get(row.phase_job_id(phase) or "")
            if later is not None and later.native_id is not None:  # the phase's job exists
                links.append(f"<a href='{_e(root + row.log_path(phase))}'>{_e(phase)} log</a>")
        cluster_state = job.state.value if job else (
            "unavailable" if row.job_id else "not submitted")
        task = row.task_id + (f"[{row.map_index}]" if row.map_index >= 0 else "")
        elapsed = f"{job.elapsed_s:.0f}" if job and job.elapsed_s is not None else ""
        lines.append(
            "<tr>"
            f"<td>{_e(row.dag_id)}</td><td>{_e(row.run_id)}</td>"
            f"<td><a href='{_e(root + _ti_ui_path(row))}' target='_top'>{_e(task)}</a></td>"
            f"<td>{_e(row.try_number)}</td>"
            f"<td class='airflow-state'>{_e(row.state)}</td>"
            f"<td class='cluster-state'>{_e(cluster_state)}</td>"
            f"<td>{_e(job.exit_code if job else '')}</td><td>{_e(elapsed)}</td>"
            f"<td>{_e(job.reason if job else '')}</td>"
            f"<td class='log'>{' '.join(links)}</td>"
            f"<td class='job-id'>{_e(row.job_id)}</td>"
            f"<td class='native-id'>{_e(job.native_id if job else '')}</td>"
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
# the annotation page (plugins/annotation_page.py; its routes enforce auth themselves)
app.include_router(annotation_router)


@app.get("/jobs", response_class=HTMLResponse, name="jobs")
def jobs_page(request: Request, user: ReaderDep, session: SessionDep) -> HTMLResponse:
    """Recent HPC jobs with Airflow state and live cluster state (one status call)."""
    rows = recent_hpc_jobs(session, readable_dag_ids(user), PAGE_SIZE)
    live, errors = live_status(rows) if rows else ({}, [])
    return _page("HPC jobs", render_jobs(rows, live, errors, _root(request)))


@app.get("/jobs/log", response_class=HTMLResponse, name="job_log")
def job_log(
    request: Request,
    user: UserDep,
    session: SessionDep,
    dag_id: Annotated[str, Query(min_length=1, max_length=250)],
    run_id: Annotated[str, Query(min_length=1, max_length=250)],
    task_id: Annotated[str, Query(min_length=1, max_length=250)],
    map_index: Annotated[int, Query(ge=-1)] = -1,
    try_number: Annotated[int | None, Query(ge=1)] = None,
    phase: Phase | None = None,
    tail_bytes: Annotated[int, Query(ge=1, le=MAX_CHUNK_BYTES)] = DEFAULT_TAIL_BYTES,
) -> HTMLResponse:
    """The tail of one task try's cluster job log, for users who may read that Dag's task logs.

    The job id is recomputed from the task instance and the connection comes from the Dag
    (:func:`task_job_key`, :func:`task_hpc_conn_id`): no XCom can point this view elsewhere.
    ``try_number`` defaults to the task instance's latest try.
    """
    from airflow.models.taskinstance import TaskInstance as TI

    if not _auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.TASK_LOGS,
        details=DagDetails(id=dag_id), user=user,
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"Forbidden: you may not read task logs of {dag_id!r}"
        )
    ti = session.execute(
        select(TI.try_number, TI.dag_version_id).where(
            TI.dag_id == dag_id, TI.run_id == run_id, TI.task_id == task_id,
            TI.map_index == map_index,
        )
    ).first()
    what = f"task {task_id!r}" + (f" [{map_index}]" if map_index >= 0 else "")
    if ti is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no {what} in run {run_id!r} of Dag {dag_id!r}; open the log from the HPC jobs "
            "page or the task's 'Cluster job log' link",
        )
    latest = ti.try_number or 0
    if try_number is None:
        try_number = latest
    if not 1 <= try_number <= latest:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"{what} of run {run_id!r} has not run try {try_number} (tries so far: {latest}), "
            "so it has no cluster job for it",
        )
    job_id = task_job_key(dag_id, run_id, task_id, map_index, try_number, phase)
    conn_id = task_hpc_conn_id(session, dag_id, task_id, ti.dag_version_id)

    back = f"<p><a href='{_e(_root(request) + URL_PREFIX + '/jobs')}'>All HPC jobs</a></p>"
    meta = (
        f"<p>Dag {_e(dag_id)}, run {_e(run_id)}, {_e(what)}, try {_e(try_number)}"
        + (f", {_e(phase)} job" if phase else "")
        + f"; cluster job <span class='job-id'>{_e(job_id)}</span> via {_e(conn_id)}</p>"
    )
    title = f"Cluster job log: {task_id}" + (f" [{map_index}]" if map_index >= 0 else "")
    try:
        reply = HpcGatewayHook(conn_id, timeout=30).log(
            job_id, offset=-tail_bytes, max_bytes=tail_bytes
        )
    except HpcGatewayError as exc:
        missing = exc.code == "NOT_FOUND"
        text = (
            f"This try has no {phase + ' ' if phase else ''}cluster job (yet): {exc.message}"
            if missing else f"The gateway refused to return the log: {exc}"
        )
        code = status.HTTP_404_NOT_FOUND if missing else status.HTTP_502_BAD_GATEWAY
        return _page(title, back + meta + f"<p class='error'>{_e(text)}</p>", code)
    except (HpcTransportError, HpcConfigError) as exc:
        body = back + meta + f"<p class='error'>No log from the gateway: {_e(exc)}</p>"
        return _page(title, body, status.HTTP_502_BAD_GATEWAY)
    shown = f"bytes {reply.offset}-{reply.next_offset} of {reply.size}"
    body = back + meta + f"<p>{_e(shown)}</p><pre class='log'>{_e(reply.text)}</pre>"
    return _page(title, body)


# ------------------------------------------------------------------------------------------------
# Operator extra link
# ------------------------------------------------------------------------------------------------
def _base_url() -> str:
    try:
        from airflow.configuration import conf
    except ImportError:  # pragma: no cover - a worker without airflow-core
        from airflow.sdk.configuration import conf  # type: ignore[no-redef]
    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def _submitted_a_job(ti_key: TaskInstanceKey) -> bool:
    """Whether the task instance pushed its ``hpc_job`` XCom (Task SDK inside a task, else the
    DB). Only decides whether the link shows: the link itself names the task try."""
    try:
        from airflow.sdk.execution_time import task_runner

        in_task = getattr(task_runner, "SUPERVISOR_COMMS", None) is not None
    except ImportError:  # pragma: no cover
        in_task = False
    if in_task:
        from airflow.sdk import XCom

        return _has_hpc_job(XCom.get_value(ti_key=ti_key, key=HPC_JOB_XCOM))

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        raw = session.execute(
            XComModel.get_many(
                key=HPC_JOB_XCOM, run_id=ti_key.run_id, dag_ids=ti_key.dag_id,
                task_ids=ti_key.task_id, map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).scalar()
    return _has_hpc_job(raw)


class ClusterJobLogLink(BaseOperatorLink):
    """"Cluster job log": the plugin's log view of the task try's cluster job.

    Works where Airflow calls it: in the API server (registered through this plugin) and in the
    worker (if listed in an operator's ``operator_extra_links``). Empty when the task has not
    submitted a job yet.
    """

    name = "Cluster job log"
    operators: list[type[BaseOperator]] = []  # filled by the plugin (see _hpc_operator_classes)

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        if not _submitted_a_job(ti_key):
            return ""
        return _base_url() + log_path(
            ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index, ti_key.try_number
        )


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
        },
        {
            "name": "Annotate",
            "href": URL_PREFIX.lstrip("/") + "/annotate",
            "destination": "nav",
            "url_route": "omeflow-annotate",
            "category": "browse",
        },
    ]
    operator_extra_links = [ClusterJobLogLink()]
