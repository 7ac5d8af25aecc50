"""What the HPC jobs page shows, read from Airflow's metadata DB and the gateway.

- :func:`recent_hpc_jobs`: the task instances that ran a cluster job (they pushed the ``hpc_job``
  XCom), newest first, filtered by Dag and Airflow state, one page at a time.
- :func:`live_status`: their jobs' cluster state from ONE batched ``status`` call per gateway
  connection; :func:`cluster_queues`: the scheduler's queue for the service account
  (``queue`` verb) per connection.

The XCom only says which task instances ran a cluster job. What is read comes from the task
instance alone, never from the XCom (anyone who may write XComs could forge one): the job id is
recomputed from dag / run / task / map index / try (:func:`~operators.hpc_step.task_job_key`, as
the operator computes it), and the gateway connection is the task's ``hpc_conn_id`` in the
serialized Dag, else :data:`~hooks.hpc.DEFAULT_CONN_ID` (:func:`task_hpc_conn_id`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, get_args
from urllib.parse import urlencode

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from hooks.hpc import (
    DEFAULT_CONN_ID,
    HpcConfigError,
    HpcGatewayError,
    HpcGatewayHook,
    HpcTransportError,
)
from hpc_jobs.protocol import CancelReply, JobStatus, QueueEntry
from operators.hpc_step import PHASES, task_job_key

log = logging.getLogger(__name__)

#: Where the plugin's FastAPI app is mounted in the API server.
URL_PREFIX = "/omeflow"
#: XCom key that HpcStepOperator pushes when it submitted a job. Only its presence is used:
#: its values (job id, connection) are never trusted.
HPC_JOB_XCOM = "hpc_job"
#: Task instances per page of the jobs page.
PAGE_SIZE = 25
#: Jobs a task try may run after its first one, named by the extra part of their job key
#: (:data:`operators.hpc_step.PHASES`: SegmentNucleiOperator's merge job after its tile array).
Phase = Literal[PHASES]  # type: ignore[valid-type]
#: Errors of a gateway call that the page shows instead of failing.
GATEWAY_ERRORS = (HpcGatewayError, HpcTransportError, HpcConfigError)
#: Seconds one gateway call of the page may take.
GATEWAY_TIMEOUT_S = 30


def phases() -> tuple[str, ...]:
    """The later phases a task try may run (``merge``)."""
    return get_args(Phase)


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


def log_path(
    dag_id: str, run_id: str, task_id: str, map_index: int = -1,
    try_number: int | None = None, phase: str | None = None,
) -> str:
    """Path of the job view (status and live log) of one task try's cluster job."""
    query = task_query(dag_id, run_id, task_id, map_index, try_number, phase)
    return f"{URL_PREFIX}/jobs/log?{urlencode(query)}"


def task_query(
    dag_id: str, run_id: str, task_id: str, map_index: int = -1,
    try_number: int | None = None, phase: str | None = None,
) -> dict[str, object]:
    """The query parameters that name one task try (and phase) in the page's routes."""
    query: dict[str, object] = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id}
    if map_index >= 0:
        query["map_index"] = map_index
    if try_number is not None:
        query["try_number"] = try_number
    if phase:
        query["phase"] = phase
    return query


@dataclass(frozen=True)
class HpcJobRow:
    """One task instance that ran a cluster job: its job id and connection (recomputed from the
    task instance, see :func:`~operators.hpc_step.task_job_key`, :func:`task_hpc_conn_id`) and
    its Airflow state."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    operator: str | None
    state: str | None
    hpc_conn_id: str
    pushed_at: datetime | None
    #: The try whose job this try waits for: a try that lost its worker is retried and the
    #: retry reattaches to the earlier try's job (operators/hpc_step.py). None: its own.
    job_try: int | None = None

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
                            self.job_try or self.try_number, phase)

    def earlier_job_ids(self) -> list[str]:
        """The first jobs of this task instance's earlier tries, newest first: where a retry
        that reattached finds its job (never another task instance's)."""
        return [task_job_key(self.dag_id, self.run_id, self.task_id, self.map_index, t)
                for t in range(self.try_number - 1, 0, -1)]

    def resolved(self, found: dict[str, JobStatus]) -> HpcJobRow:
        """This row with :attr:`job_try` set when the try has no job of its own but an earlier
        try of the same task instance has one (the try reattached to it)."""
        own = found.get(self.job_id or "")
        if self.try_number <= 1 or (own is not None and own.native_id is not None):
            return self
        earlier_ids = self.earlier_job_ids()
        for t, job_id in zip(range(self.try_number - 1, 0, -1), earlier_ids, strict=True):
            earlier = found.get(job_id)
            if earlier is not None and earlier.native_id is not None:
                return replace(self, job_try=t)
        return self

    def log_path(self, phase: str | None = None) -> str:
        return log_path(self.dag_id, self.run_id, self.task_id, self.map_index, self.try_number,
                        phase)

    @property
    def task_label(self) -> str:
        return self.task_id + (f"[{self.map_index}]" if self.map_index >= 0 else "")


def has_hpc_job(value: Any) -> bool:
    """Whether an ``hpc_job`` XCom looks like one the operator pushed (a dict with a job id)."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return isinstance(value, dict) and isinstance(value.get("job_id"), str)


@dataclass(frozen=True)
class JobFilter:
    """The page's filters: one Dag, one Airflow task state (``none``: no state yet)."""

    dag_id: str | None = None
    state: str | None = None
    page: int = 1
    per_page: int = PAGE_SIZE


@dataclass
class JobPage:
    """One page of :func:`recent_hpc_jobs`: its rows, how many match, which Dags have jobs."""

    rows: list[HpcJobRow]
    total: int
    page: int
    page_size: int
    dag_ids: list[str] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


def recent_hpc_jobs(
    session: Session, dag_ids: Iterable[str] | None, flt: JobFilter | None = None,
) -> JobPage:
    """The task instances with an ``hpc_job`` XCom, newest first (by when the job was
    submitted), filtered by ``flt``, page ``flt.page`` of ``flt.per_page`` rows.

    :param dag_ids: only these Dags (the ones the user may read); None means all.
    """
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.xcom import XComModel as X

    flt = flt or JobFilter()
    page_size = flt.per_page
    joined = and_(TI.dag_id == X.dag_id, TI.run_id == X.run_id,
                  TI.task_id == X.task_id, TI.map_index == X.map_index)
    where = [X.key == HPC_JOB_XCOM]
    if dag_ids is not None:
        dag_ids = set(dag_ids)
        if not dag_ids:
            return JobPage([], 0, 1, page_size)
        where.append(X.dag_id.in_(dag_ids))
    known = sorted(session.scalars(
        select(X.dag_id).where(*where).distinct()
    ))
    if flt.dag_id:
        where.append(X.dag_id == flt.dag_id)
    if flt.state == "none":
        where.append(TI.state.is_(None))
    elif flt.state:
        where.append(TI.state == flt.state)
    total = session.scalar(select(func.count()).select_from(X).join(TI, joined).where(*where))
    page = min(max(1, flt.page), max(1, -(-int(total or 0) // page_size)))
    stmt = (
        select(
            X.dag_id, X.run_id, X.task_id, X.map_index, X.value, X.timestamp,
            TI.state, TI.try_number, TI.operator, TI.dag_version_id,
        )
        .join(TI, joined)
        .where(*where)
        .order_by(X.timestamp.desc(), X.task_id, X.map_index)
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    rows = []
    conns: dict[tuple[str, str, Any], str] = {}
    for r in session.execute(stmt):
        if not has_hpc_job(r.value):
            continue
        at = (r.dag_id, r.task_id, r.dag_version_id)
        if at not in conns:
            conns[at] = task_hpc_conn_id(session, *at)
        rows.append(
            HpcJobRow(
                dag_id=r.dag_id, run_id=r.run_id, task_id=r.task_id, map_index=r.map_index,
                try_number=r.try_number or 0, operator=r.operator,
                state=str(r.state.value if hasattr(r.state, "value") else r.state)
                if r.state is not None else None,
                hpc_conn_id=conns[at], pushed_at=r.timestamp,
            )
        )
    return JobPage(rows, int(total or 0), page, page_size, known)


def live_status(
    rows: Sequence[HpcJobRow],
) -> tuple[dict[str, JobStatus], list[str], list[HpcJobRow]]:
    """Cluster state of all rows' jobs (and their later phases' jobs, e.g. a merge, and the
    earlier tries' jobs a retry may have reattached to): ONE ``status`` call per gateway
    connection (usually one).

    :return: job id → status, the errors (one line per connection that failed), and the rows
        resolved to the job each try waits for (:meth:`HpcJobRow.resolved`).
    """
    by_conn: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        earlier = [replace(row, job_try=t) for t in range(row.try_number - 1, 0, -1)]
        ids = [r.phase_job_id(p) for r in (row, *earlier) for p in (None, *phases())]
        for job_id in ids:
            if job_id and job_id not in by_conn[row.hpc_conn_id]:
                by_conn[row.hpc_conn_id].append(job_id)
    found: dict[str, JobStatus] = {}
    errors: list[str] = []
    for conn_id, job_ids in by_conn.items():
        try:
            for job in HpcGatewayHook(conn_id, timeout=GATEWAY_TIMEOUT_S).status(job_ids):
                found[job.job_id] = job
        except GATEWAY_ERRORS as exc:
            errors.append(f"connection {conn_id!r}: {exc}")
    resolved = [row.resolved(found) for row in rows]
    return found, errors, resolved


def resolve_job_try(row: HpcJobRow) -> HpcJobRow:
    """``row`` resolved to the job its try waits for (one ``status`` call, only for a retry):
    the log view and the cancel of a try that reattached reach the earlier try's job."""
    if row.try_number <= 1:
        return row
    try:
        jobs = HpcGatewayHook(row.hpc_conn_id, timeout=GATEWAY_TIMEOUT_S).status(
            [row.job_id or "", *row.earlier_job_ids()])
    except GATEWAY_ERRORS as exc:
        log.warning("could not resolve %s's job: %s", row.task_label, exc)
        return row
    return row.resolved({job.job_id: job for job in jobs})


def cluster_queues(conn_ids: Iterable[str]) -> tuple[dict[str, list[QueueEntry]], list[str]]:
    """The scheduler's queue (pending and running jobs of the service account) through each
    gateway connection: ONE ``queue`` call per connection.

    :return: connection → its queue, and the errors (one line per connection that failed).
    """
    queues: dict[str, list[QueueEntry]] = {}
    errors: list[str] = []
    for conn_id in dict.fromkeys(conn_ids):
        try:
            queues[conn_id] = HpcGatewayHook(conn_id, timeout=GATEWAY_TIMEOUT_S).queue().jobs
        except GATEWAY_ERRORS as exc:
            errors.append(f"connection {conn_id!r}: {exc}")
    return queues, errors


def cancel_task_try(row: HpcJobRow, by: str) -> CancelReply:
    """Cancel the task try's job and its later phases' jobs (a merge) through its gateway
    connection, recorded as cancelled ``by`` that person. The first job's reply is returned;
    a phase job that was never submitted is skipped.

    :raises HpcGatewayError | HpcTransportError | HpcConfigError: the first job's cancel failed.
    """
    if row.job_id is None:
        raise HpcConfigError(f"{row.task_label} has not run yet: there is no job to cancel")
    hook = HpcGatewayHook(row.hpc_conn_id, timeout=GATEWAY_TIMEOUT_S)
    reply = hook.cancel(row.job_id, by=by)
    for phase in phases():
        try:
            hook.cancel(row.phase_job_id(phase) or "", by=by)
        except HpcGatewayError as exc:
            if exc.code != "NOT_FOUND":
                log.warning("cancel of %s's %s job: %s", row.job_id, phase, exc)
    return reply
