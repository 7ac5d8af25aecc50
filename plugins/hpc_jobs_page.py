"""The HPC jobs page: routes under ``/omeflow/jobs`` (``router`` is included in the omeflow
plugin's FastAPI app).

``GET  /omeflow/jobs[?dag_id=&state=&page=&per_page=]``
    task instances that ran a cluster job (newest first, grouped by Dag run, 25 a page) with
    their Airflow state and the cluster's: state, node, elapsed / limit, exit code, reason,
    array tasks by state, progress (per job and per array task), MaxRSS; a cancel button on
    live jobs the user may edit; below, the cluster's queue for the service account. ONE
    ``status`` call and ONE ``queue`` call per gateway connection.
``GET  /omeflow/jobs/log?dag_id=&run_id=&task_id=[&map_index=][&try_number=][&phase=merge]``
    one task try's job: its status and a live log tail (the "Cluster job log" extra link).
``GET  /omeflow/jobs/log/chunk?...&offset=N``
    JSON: the log bytes from ``offset`` on (the job view's script asks for the bytes after the
    ``next_offset`` it has, never the whole log again) and the job's state.
``POST /omeflow/jobs/cancel?dag_id=&run_id=&task_id=[&map_index=][&try_number=]``
    cancels the task try's job(s) through the gateway with ``by=<the Airflow user name>``, then
    303 back to the page the button was on.
``GET  /omeflow/jobs/static/<file>``
    ``hpc_jobs_page.css`` / ``.js``.

Authorisation (plugin apps get none from Airflow): every route depends on Airflow's
:func:`~airflow.api_fastapi.core_api.security.get_user` (JWT from ``Authorization: Bearer`` or
the UI's ``_token`` cookie: 401 without one, 403 for a bad one). The page needs read access to
task instances and lists only Dags the user may read; the job view needs read access to the
Dag's task logs; cancel needs edit access to the Dag (Airflow's own
:func:`~airflow.api_fastapi.core_api.security.requires_access_dag` with ``PUT``).

Cross-site requests: the UI's cookie authenticates the browser, so a page elsewhere could make
it POST a cancel. A cancel must carry :func:`cancel_token` (an HMAC of the user and the job
under ``[api] secret_key``: only a page this server rendered for that user has it) and, when
the browser sends them, an ``Origin`` of this server and a same-origin ``Sec-Fetch-Site``;
else 403 and nothing is cancelled.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import get_user, requires_access_dag
from annotation_page import own_origins
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from hpc_jobs_data import (
    GATEWAY_ERRORS,
    GATEWAY_TIMEOUT_S,
    PAGE_SIZE,
    URL_PREFIX,
    HpcJobRow,
    JobFilter,
    Phase,
    cancel_task_try,
    cluster_queues,
    live_status,
    log_path,
    recent_hpc_jobs,
    resolve_job_try,
    task_hpc_conn_id,
    task_query,
)
from hpc_jobs_render import AIRFLOW_STATES, page, render_job_view, render_jobs, render_queue
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from hooks.hpc import HpcGatewayError, HpcGatewayHook
from hpc_jobs.protocol import MAX_CHUNK_BYTES, JobStatus

log = logging.getLogger(__name__)

#: Default tail of the job view's log.
DEFAULT_TAIL_BYTES = 64 * 1024
#: Files served under ``jobs/static/`` (nothing else: no request path touches the disk).
STATIC = {
    "hpc_jobs_page.js": "text/javascript; charset=utf-8",
    "hpc_jobs_page.css": "text/css; charset=utf-8",
}
HERE = Path(__file__).resolve().parent
#: Characters the gateway accepts in ``cancel(by=...)`` (:data:`hpc_jobs.protocol.CancelledBy`).
_BY_BAD = re.compile(r"[^A-Za-z0-9_.@+-]")
#: A job key as the redirect after a cancel names it (:data:`hpc_jobs.protocol.JobKey`).
_JOB_KEY = r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$"

router = APIRouter()
UserDep = Annotated[BaseUser, Depends(get_user)]
IdParam = Annotated[str, Query(min_length=1, max_length=250)]


# ------------------------------------------------------------------------------------------------
# Authorisation
# ------------------------------------------------------------------------------------------------
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


def may_edit(user: BaseUser, dag_id: str) -> bool:
    """Whether ``user`` may edit ``dag_id`` (needed to cancel its jobs)."""
    return bool(_auth_manager().is_authorized_dag(
        method="PUT", details=DagDetails(id=dag_id), user=user))


def _require_log_reader(user: BaseUser, dag_id: str) -> None:
    if not _auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.TASK_LOGS,
        details=DagDetails(id=dag_id), user=user,
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"Forbidden: you may not read task logs of {dag_id!r}"
        )


def _secret() -> bytes:
    from airflow.configuration import conf

    key = conf.get("api", "secret_key", fallback="") or ""
    if not key:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "[api] secret_key is empty: set it to enable cancelling jobs")
    return key.encode()


def cancel_token(user: BaseUser, job_id: str) -> str:
    """The token a cancel of ``job_id`` by ``user`` must carry: HMAC-SHA256 of both under
    ``[api] secret_key``. Only pages this server rendered for that user contain it."""
    msg = f"omeflow-cancel\0{user.get_id()}\0{job_id}".encode()
    return hmac.new(_secret(), msg, hashlib.sha256).hexdigest()


def check_same_origin(request: Request) -> None:
    """403 for a request the browser says came from another site (``Origin``,
    ``Sec-Fetch-Site``)."""
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() not in own_origins(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"Forbidden: cross-origin request from {origin!r}; cancel from this "
                            "server's HPC jobs page")
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "Forbidden: cross-site request (Sec-Fetch-Site); cancel from this "
                            "server's HPC jobs page")


def cancelled_by(user: BaseUser) -> str:
    """The user's name as the gateway records it (characters it does not accept become ``_``)."""
    name = _BY_BAD.sub("_", str(user.get_name() or user.get_id()))[:64]
    return name if name[:1].isalnum() else ("u" + name)[:64]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _root(request: Request) -> str:
    """The API server's root path (non-empty behind a base_url with a sub path)."""
    root = str(request.scope.get("root_path") or "")
    return root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else root


def _task_row(session: Any, dag_id: str, run_id: str, task_id: str, map_index: int,
              try_number: int | None) -> HpcJobRow:
    """The task instance's row for ``try_number`` (default: its latest try); 404 with what to
    do when the task or the try does not exist."""
    from airflow.models.taskinstance import TaskInstance as TI

    ti = session.execute(
        select(TI.try_number, TI.dag_version_id, TI.state, TI.operator).where(
            TI.dag_id == dag_id, TI.run_id == run_id, TI.task_id == task_id,
            TI.map_index == map_index,
        )
    ).first()
    what = f"task {task_id!r}" + (f" [{map_index}]" if map_index >= 0 else "")
    if ti is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no {what} in run {run_id!r} of Dag {dag_id!r}; open the job from the HPC jobs "
            "page or the task's 'Cluster job log' link",
        )
    latest = ti.try_number or 0
    try_number = latest if try_number is None else try_number
    if not 1 <= try_number <= latest:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"{what} of run {run_id!r} has not run try {try_number} (tries so far: {latest}), "
            "so it has no cluster job for it",
        )
    state = ti.state.value if hasattr(ti.state, "value") else ti.state
    return resolve_job_try(HpcJobRow(
        dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index,
        try_number=try_number, operator=ti.operator, state=state,
        hpc_conn_id=task_hpc_conn_id(session, dag_id, task_id, ti.dag_version_id),
        pushed_at=None,
    ))


def _notice(cancelled: str | None) -> str:
    """What the page says after the cancel redirect (built here, never taken from the URL)."""
    if not cancelled:
        return ""
    return f"Cancel sent for cluster job {cancelled}; its state below updates as the cluster acts."


def _status_of(row: HpcJobRow, job_id: str) -> tuple[JobStatus | None, str]:
    try:
        found = HpcGatewayHook(row.hpc_conn_id, timeout=GATEWAY_TIMEOUT_S).status([job_id])
    except GATEWAY_ERRORS as exc:
        return None, f"Cluster state unavailable: {exc}"
    return (found[0] if found else None), ""


# ------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------
@router.get("/jobs", response_class=HTMLResponse, name="jobs")
def jobs_page(
    request: Request, user: ReaderDep, session: SessionDep,
    dag_id: Annotated[str | None, Query(max_length=250)] = None,
    state: Annotated[str | None, Query(max_length=32)] = None,
    page_no: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=200)] = PAGE_SIZE,
    cancelled: Annotated[str | None, Query(max_length=160, pattern=_JOB_KEY)] = None,
) -> HTMLResponse:
    """Recent HPC jobs with Airflow state and live cluster state, and the cluster's queue."""
    if state and state not in AIRFLOW_STATES:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"unknown state {state!r}; use one of {', '.join(AIRFLOW_STATES)}")
    flt = JobFilter(dag_id=dag_id or None, state=state or None, page=page_no,
                    per_page=per_page)
    jp = recent_hpc_jobs(session, readable_dag_ids(user), flt)
    live, errors, rows = live_status(jp.rows) if jp.rows else ({}, [], [])
    jp = replace(jp, rows=rows)
    editable = {d for d in {r.dag_id for r in jp.rows} if may_edit(user, d)}
    tokens = {r.job_id: cancel_token(user, r.job_id) for r in jp.rows
              if r.job_id and r.dag_id in editable}
    root = _root(request)
    from hooks.hpc import DEFAULT_CONN_ID

    queues, queue_errors = cluster_queues([DEFAULT_CONN_ID, *(r.hpc_conn_id for r in jp.rows)])
    body = (render_jobs(jp, flt, live, errors, root, tokens, _notice(cancelled))
            + render_queue(queues, queue_errors, root))
    return page("HPC jobs", body, root)


@router.get("/jobs/log", response_class=HTMLResponse, name="job_log")
def job_log(
    request: Request,
    user: UserDep,
    session: SessionDep,
    dag_id: IdParam,
    run_id: IdParam,
    task_id: IdParam,
    map_index: Annotated[int, Query(ge=-1)] = -1,
    try_number: Annotated[int | None, Query(ge=1)] = None,
    phase: Phase | None = None,
    tail_bytes: Annotated[int, Query(ge=1, le=MAX_CHUNK_BYTES)] = DEFAULT_TAIL_BYTES,
    cancelled: Annotated[str | None, Query(max_length=160, pattern=_JOB_KEY)] = None,
) -> HTMLResponse:
    """One task try's cluster job: status, progress, cancel and the live log tail, for users
    who may read that Dag's task logs. The job id is recomputed from the task instance and the
    connection comes from the Dag: no XCom can point this view elsewhere. ``try_number``
    defaults to the task instance's latest try."""
    _require_log_reader(user, dag_id)
    row = _task_row(session, dag_id, run_id, task_id, map_index, try_number)
    job_id = row.phase_job_id(phase) or ""
    root = _root(request)
    title = f"Cluster job: {row.task_label}"
    job, status_error = _status_of(row, job_id)
    reply, log_error, code = None, "", 200
    try:
        reply = HpcGatewayHook(row.hpc_conn_id, timeout=GATEWAY_TIMEOUT_S).log(
            job_id, offset=-tail_bytes, max_bytes=tail_bytes)
    except HpcGatewayError as exc:
        missing = exc.code == "NOT_FOUND"
        log_error = (
            f"This try has no {phase + ' ' if phase else ''}cluster job (yet): {exc.message}"
            if missing else f"The gateway refused to return the log: {exc}")
        code = status.HTTP_404_NOT_FOUND if missing else status.HTTP_502_BAD_GATEWAY
    except GATEWAY_ERRORS as exc:
        log_error, code = f"No log from the gateway: {exc}", status.HTTP_502_BAD_GATEWAY
    token = cancel_token(user, job_id) if may_edit(user, dag_id) and not phase else None
    chunk = f"{root}{URL_PREFIX}/jobs/log/chunk?" + urlencode(
        task_query(dag_id, run_id, task_id, map_index, row.try_number, phase))
    body = render_job_view(row, phase, job, status_error, reply, log_error, root, chunk, token,
                           _notice(cancelled))
    return page(title, body, root, code, script=reply is not None)


@router.get("/jobs/log/chunk", name="job_log_chunk")
def job_log_chunk(
    user: UserDep,
    session: SessionDep,
    dag_id: IdParam,
    run_id: IdParam,
    task_id: IdParam,
    offset: Annotated[int, Query(ge=0, le=2**62)],
    map_index: Annotated[int, Query(ge=-1)] = -1,
    try_number: Annotated[int | None, Query(ge=1)] = None,
    phase: Phase | None = None,
    max_bytes: Annotated[int, Query(ge=1, le=MAX_CHUNK_BYTES)] = DEFAULT_TAIL_BYTES,
) -> JSONResponse:
    """The job log's bytes from ``offset`` on (at most ``max_bytes``) and the job's state:
    what the job view's script appends to the log it shows."""
    _require_log_reader(user, dag_id)
    row = _task_row(session, dag_id, run_id, task_id, map_index, try_number)
    job_id = row.phase_job_id(phase) or ""
    hook = HpcGatewayHook(row.hpc_conn_id, timeout=GATEWAY_TIMEOUT_S)
    try:
        reply = hook.log(job_id, offset=offset, max_bytes=max_bytes)
        found = hook.status([job_id])
    except HpcGatewayError as exc:
        code = status.HTTP_404_NOT_FOUND if exc.code == "NOT_FOUND" else status.HTTP_502_BAD_GATEWAY
        return JSONResponse({"error": str(exc)}, code, headers={"Cache-Control": "no-store"})
    except GATEWAY_ERRORS as exc:
        return JSONResponse({"error": f"no log from the gateway: {exc}"},
                            status.HTTP_502_BAD_GATEWAY, headers={"Cache-Control": "no-store"})
    job = found[0] if found else None
    return JSONResponse(
        {"offset": reply.offset, "next_offset": reply.next_offset, "size": reply.size,
         "text": reply.text, "state": job.state.value if job else None,
         "terminal": bool(job and job.state.terminal)},
        headers={"Cache-Control": "no-store"},
    )


@router.post(
    "/jobs/cancel", name="cancel_job",
    dependencies=[Depends(requires_access_dag("PUT"))],
)
async def cancel_job(
    request: Request,
    user: UserDep,
    session: SessionDep,
    dag_id: IdParam,
    run_id: IdParam,
    task_id: IdParam,
    map_index: Annotated[int, Query(ge=-1)] = -1,
    try_number: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """Cancel the task try's cluster job (and its later phases' jobs) as ``user``; 303 back.

    Needs edit access to the Dag (``requires_access_dag("PUT")`` reads ``dag_id`` from the
    query), a same-origin request and the page's :func:`cancel_token` in the form body.
    """
    check_same_origin(request)
    form = parse_qs((await request.body()).decode("utf-8", "replace")[:4096])
    row = _task_row(session, dag_id, run_id, task_id, map_index, try_number)
    job_id = row.job_id or ""
    sent = (form.get("token") or [""])[0]
    if not hmac.compare_digest(sent.encode(), cancel_token(user, job_id).encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "Forbidden: the cancel token is missing or wrong; cancel from the "
                            "HPC jobs page (reload it if it is old)")
    by = cancelled_by(user)
    try:
        # a gateway call (SSH or a subprocess) blocks: not on the api-server's event loop
        reply = await run_in_threadpool(cancel_task_try, row, by)
    except GATEWAY_ERRORS as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY,
                            f"the gateway did not cancel {job_id}: {exc}") from exc
    log.info("%s cancelled cluster job %s (now %s)", by, job_id, reply.state.value)
    root = _root(request)
    # back to the page the button was on; it names the job (no free text travels in the URL)
    done = urlencode({"cancelled": job_id})
    if (form.get("back") or [""])[0] == "job":
        target = root + log_path(dag_id, run_id, task_id, map_index, row.try_number) + "&" + done
    else:
        target = f"{root}{URL_PREFIX}/jobs?{done}"
    return RedirectResponse(target, status.HTTP_303_SEE_OTHER)


@router.get("/jobs/static/{name}", name="jobs_static")
def jobs_static(name: str, user: UserDep) -> Response:
    """The page's script and stylesheet (only the files in :data:`STATIC`)."""
    if name not in STATIC:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no static file {name!r}")
    return Response((HERE / name).read_bytes(), media_type=STATIC[name],
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
