"""``HpcStepOperator``: run one registered cluster step as a Slurm job (or a local job).

submit (idempotent job key; a lost reply is retried with the same key, so one try is one
job) → defer to :class:`~operators.triggers.HpcJobTrigger` (with a timeout: the job's time
limit plus ``queue_allowance``) → ``execute_complete``: the job log tail and one accounting line
(node, elapsed / time limit, exit code, MaxRSS) go into the Airflow
task log, and what the trigger reported becomes a result, a retry or a failure:

===============================  ============================================================
COMPLETED                        success; the step's ``summary.json`` is the task's XCom
PREEMPTED, NODE_FAIL, BOOT_FAIL  ``AirflowException`` (the cluster's fault: Airflow retries
                                 with a new try number, hence a new job)
FAILED with exit code 75         ``AirflowException`` (retry): the step reported a condition
(``EXIT_RETRY_LATER``)           that passes by itself (pyramid being built, image locked)
FAILED, TIMEOUT, CANCELLED,      ``AirflowFailException`` naming state, exit code, a hint and
OUT_OF_MEMORY, DEADLINE          the log tail (no retry: it would fail the same way)
PENDING that never starts        the job is cancelled, then ``AirflowFailException`` naming
                                 the Slurm reason and the resources asked for
UNKNOWN for ``unknown_timeout``  the job is cancelled, then ``AirflowFailException``: its
                                 directory vanished or Slurm purged it
RUNNING, REQUEUED, SUSPENDED     (the trigger never sends them) cancelled, then
                                 ``AirflowFailException``
no status poll worked for        ``AirflowException`` (retry) if the trigger cancelled the
``poll_outage_limit``            job first; else ``AirflowFailException`` naming the job to
                                 check on the cluster (a retry could run it twice)
connection misconfigured         ``AirflowFailException`` naming the fix
deferral timeout, trigger        the job is cancelled, then Airflow's ``TaskDeferralTimeout``
crash (Airflow's ``__fail__``)   or ``TaskDeferralError`` as usual
===============================  ============================================================

Crash safety (:meth:`HpcStepOperator.reusable_earlier_job`): the job key is the job id persisted
before deferring (the cluster keeps the job under it). A retry first asks, in ONE ``status``
call, about the jobs of the earlier tries of the same *generation* (tries since the task
instance was created or last cleared: Airflow raises ``max_tries`` on a clear, so the first try
of a generation is ``max_tries - retries + 1``, the rule Airflow's own reschedule lookup uses).
A job of theirs that is still PENDING / RUNNING (a worker lost right after submit, the try
failed by heartbeat timeout) is reattached: no second job, no new OMERO session. Else a job
of theirs that COMPLETED is taken as it is (its try failed after the job, in Airflow: a worker
lost while resuming, or Airflow 3.3's stale defer-exit event, apache/airflow#72716, that fails
a resumed try): the retry reads its result instead of computing it again (an array's tiles
are kept; a failed merge is run anew). An earlier job that failed (exit 75 included) and the
jobs of a generation before a clear are never reused: the try submits its own job; live jobs
of an earlier generation are cancelled (the user asked for a rerun, not a second copy).

OMERO session keys (:meth:`HpcStepOperator.submit_job`): a step whose registry entry opens
the image store (``needs_store``) gets a key from the site's OMERO connection
(``[omeflow] omero_conn_id``, or the ``omero_conn_id`` argument), minted only when its job is
created (a reattach to an existing job sends none), valid for :meth:`deferral_timeout`. The
key is never kept on this side (no XCom, no trigger kwargs, no log); the cluster side ends
the session when the job ends (``hpc_jobs/run.py``, the gateway's ``status`` / ``cancel``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import Any, NoReturn

from airflow.sdk import BaseOperator, Context
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.triggers.base import BaseTrigger
from pydantic import ValidationError

from hooks.hpc import DEFAULT_CONN_ID, HpcConfigError, HpcGatewayError, HpcGatewayHook
from hpc_jobs.protocol import (
    EXIT_RETRY_LATER,
    ErrorCode,
    JobState,
    JobStatus,
    ResourceOverrides,
    Resources,
    SubmitReply,
    job_key_for,
)
from operators.triggers import POLL_OUTAGE_LIMIT_S, UNKNOWN_TIMEOUT_S, HpcJobTrigger

#: Default time a job may wait in the queue, on top of its time limit, before the deferral
#: times out (Airflow then resumes the task with ``__fail__``; the job is cancelled).
QUEUE_ALLOWANCE = timedelta(days=1)


#: Later cluster jobs of one task try, each with its own key (``SegmentNucleiOperator``'s merge
#: job after its tile array). The HPC jobs page shows their logs too.
MERGE_PHASE = "merge"
PHASES: tuple[str, ...] = (MERGE_PHASE,)

#: ``[omeflow] omero_conn_id``: the site's OMERO connection, the default of every
#: ``HpcStepOperator(omero_conn_id=...)``; empty = no OMERO (the local store, no session keys).
OMERO_CONN_SETTING = ("omeflow", "omero_conn_id")


def site_omero_conn_id() -> str | None:
    """The site's OMERO connection id (``[omeflow] omero_conn_id``), None when it is empty."""
    from airflow.configuration import conf

    section, key = OMERO_CONN_SETTING
    return str(conf.get(section, key, fallback="") or "").strip() or None


#: ``[omeflow] hpc_task_retries``: retries of every cluster-step task unless the Dag or the
#: task sets ``retries``. A lost worker (the retry reattaches), a preempted or failed node,
#: exit 75 (EXIT_RETRY_LATER) and Airflow 3.3's spurious fail of a resumed try
#: (apache/airflow#72716; the retry takes the completed job's result) all need one.
RETRIES_SETTING = ("omeflow", "hpc_task_retries")
DEFAULT_RETRIES = 2
#: Wait between two tries of a cluster-step task (``[omeflow] hpc_retry_delay_s``).
RETRY_DELAY_SETTING = ("omeflow", "hpc_retry_delay_s")
DEFAULT_RETRY_DELAY_S = 120


def site_retries() -> tuple[int, timedelta]:
    """The site's retries and retry delay for cluster-step tasks (see :data:`RETRIES_SETTING`)."""
    from airflow.configuration import conf

    retries = conf.getint(*RETRIES_SETTING, fallback=DEFAULT_RETRIES)
    delay = conf.getfloat(*RETRY_DELAY_SETTING, fallback=DEFAULT_RETRY_DELAY_S)
    if retries < 0 or delay < 0:
        raise ValueError(f"[omeflow] hpc_task_retries = {retries} / hpc_retry_delay_s = "
                         f"{delay}: use numbers >= 0 (e.g. 2 and 120)")
    return retries, timedelta(seconds=delay)


def task_job_key(
    dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int,
    phase: str | None = None,
) -> str:
    """The cluster job id of one task try (dag / run / task / map index / try: one job per try),
    plus ``phase`` for a later job of the same try (see :data:`PHASES`)."""
    parts = (dag_id, run_id, task_id, map_index, try_number)
    return job_key_for(*parts, phase) if phase else job_key_for(*parts)


def _is_live(status: JobStatus) -> bool:
    """A job that still holds (or waits for) cluster resources: worth reattaching to."""
    return not status.state.terminal and status.state is not JobState.UNKNOWN


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def accounting_line(event: dict[str, Any]) -> str:
    """One line for the task log at the end of a job: node, elapsed / time limit, exit code
    and MaxRSS (what the scheduler's accounting knows; ``?`` for what it does not)."""
    rss = event.get("max_rss_mb")
    return (
        f"cluster job {event.get('job_id')} {event.get('state')}: node {event.get('node') or '?'}"
        f", elapsed {_duration(event.get('elapsed_s'))} of {_duration(event.get('time_limit_s'))}"
        f" limit, exit code {'?' if event.get('exit_code') is None else event['exit_code']}"
        f", MaxRSS {'?' if rss is None else f'{float(rss):.1f} MiB'}"
    )


class HpcStepOperator(BaseOperator):
    """Run a step of ``hpc_jobs.registry`` on the cluster through the gateway.

    :param step: registered step name (``cluster_check``, ``export_zarr`` ...).
    :param step_params: the step's params (validated by its model on the cluster). Templated.
    :param hpc_resources: overrides of the step's default resources (cpus, mem_mb, time_min, gpus,
        partition, array). Templated.
    :param hpc_conn_id: gateway connection (see :class:`~hooks.hpc.HpcGatewayHook`).
    :param omero_conn_id: OMERO connection (:class:`~hooks.omero.OmeroSessionHook`); default
        ``[omeflow] omero_conn_id``, ``""`` for none. If set and the step opens the image
        store, a short-lived session key is minted for each job this task creates.
    :param poll_interval: seconds between (shared) status polls.
    :param log_tail_bytes: how much of the job log to copy into the task log at the end.
    :param unknown_timeout: seconds a job may stay UNKNOWN (the cluster no longer knows it)
        before the task cancels it and fails.
    :param poll_outage_limit: seconds without a working status poll before the trigger
        cancels the job and gives up.
    :param queue_allowance: how long a job may wait in the queue; the deferral's timeout is
        the job's time limit (times the waves of a throttled array) plus this.
    """

    #: ``hpc_conn_id`` is listed so that it is kept in the serialized Dag, where the HPC jobs
    #: page reads it (never from an XCom).
    template_fields: Sequence[str] = ("step_params", "hpc_resources", "hpc_conn_id")
    #: The trigger's event carries a COMPLETED job's ``summary.json`` (and always the log
    #: tail): the resumed task makes no gateway call (no SSH handshake) of its own.
    result_in_event: bool = True
    template_fields_renderers = {"step_params": "json", "hpc_resources": "json"}
    ui_color = "#d7ecff"

    def __init__(
        self,
        *,
        step: str,
        step_params: dict[str, Any] | None = None,
        hpc_resources: dict[str, Any] | None = None,
        hpc_conn_id: str = DEFAULT_CONN_ID,
        omero_conn_id: str | None = None,
        poll_interval: float = 10.0,
        log_tail_bytes: int = 8000,
        unknown_timeout: float = UNKNOWN_TIMEOUT_S,
        poll_outage_limit: float = POLL_OUTAGE_LIMIT_S,
        queue_allowance: timedelta = QUEUE_ALLOWANCE,
        **kwargs: Any,
    ) -> None:
        given = {**(kwargs.get("default_args") or {}), **kwargs}  # the Dag's, then the task's
        if "retries" not in given or "retry_delay" not in given:
            retries, delay = site_retries()
            kwargs.setdefault("retries", given.get("retries", retries))
            kwargs.setdefault("retry_delay", given.get("retry_delay", delay))
        super().__init__(**kwargs)
        self.step = step
        self.step_params = step_params or {}
        self.hpc_resources = hpc_resources or {}
        self.hpc_conn_id = hpc_conn_id
        self.omero_conn_id = site_omero_conn_id() if omero_conn_id is None else omero_conn_id
        self.poll_interval = poll_interval
        self.log_tail_bytes = log_tail_bytes
        self.unknown_timeout = unknown_timeout
        self.poll_outage_limit = poll_outage_limit
        self.queue_allowance = queue_allowance
        self._job_id: str | None = None

    @cached_property
    def hook(self) -> HpcGatewayHook:
        """One hook per operator run: its SSH connection serves submit, log, result, cancel."""
        return HpcGatewayHook(self.hpc_conn_id)

    def job_key(self, context: Context, try_number: int | None = None) -> str:
        """dag / run / task / map index / try: one cluster job per Airflow try (``try_number``:
        another try of this task instance; default the running one)."""
        ti = context["ti"]
        return task_job_key(
            ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1),
            ti.try_number if try_number is None else try_number,
        )

    def first_try_of_generation(self, context: Context) -> int:
        """The first try since the task instance was created or last cleared.

        Airflow sets ``max_tries = try_number + retries`` when a task is cleared (and
        ``retries`` at creation), so this is ``max_tries - retries + 1``, clamped to
        ``1..try_number``. For a task instance without ``max_tries`` (not Airflow's) the
        running try.
        """
        ti = context["ti"]
        max_tries = getattr(ti, "max_tries", None)
        if not isinstance(max_tries, int):
            return int(ti.try_number)
        return max(1, min(int(ti.try_number), max_tries - int(self.retries or 0) + 1))

    def job_keys_of_try(self, context: Context, try_number: int) -> list[tuple[str, str]]:
        """(job key, method that resumes on its end) of each job one try may submit, the
        last one first (subclasses with a merge job add it)."""
        return [(self.job_key(context, try_number), "execute_complete")]

    def earlier_job_keys(self, context: Context) -> tuple[list[tuple[str, str]], list[str]]:
        """Jobs of earlier tries: those of this generation, newest first (with their resume
        method), and those of earlier generations (before a clear); none for a task
        instance that does not say where its generation began (no ``max_tries``)."""
        ti = context["ti"]
        if not isinstance(getattr(ti, "max_tries", None), int):
            return [], []
        first = self.first_try_of_generation(context)
        same = [k for t in range(int(ti.try_number) - 1, first - 1, -1)
                for k in self.job_keys_of_try(context, t)]
        older = [key for t in range(first - 1, 0, -1)
                 for key, _ in self.job_keys_of_try(context, t)]
        return same, older

    def reusable_earlier_job(self, context: Context) -> tuple[JobStatus, str] | None:
        """The job of an earlier try of this generation to take instead of submitting: one
        still PENDING / RUNNING (a lost worker's), else the newest that COMPLETED; with the
        method that resumes on its end. None when there is none.

        One ``status`` call for all earlier tries' keys. Live jobs of an earlier generation (the
        task was cleared while its job ran) and any second live job are cancelled.
        """
        same, older = self.earlier_job_keys(context)
        if not same and not older:
            return None
        statuses = self.hook.status([key for key, _ in same] + older)
        live = [s for s in statuses if _is_live(s)]
        method_of = dict(same)
        found = next(((s, method_of[s.job_id]) for s in live if s.job_id in method_of), None)
        if found is None:  # statuses come newest try first, a try's last phase first
            found = next(((s, method_of[s.job_id]) for s in statuses
                          if s.state is JobState.COMPLETED and s.job_id in method_of), None)
        for status in live:
            if found is None or status.job_id != found[0].job_id:
                self.log.warning("cluster job %s of an earlier try is still %s and no try "
                                 "waits for it; cancelling it", status.job_id, status.state.value)
                self._cancel_quietly(status.job_id)
        return found

    def prepare_params(self, context: Context) -> dict[str, Any]:
        """Hook for subclasses: the params sent to the cluster (default: ``step_params``)."""
        return dict(self.step_params)

    def needs_session(self) -> bool:
        """True when this step opens the image store and an OMERO connection is configured."""
        from hpc_jobs.registry import get_step

        spec = get_step(self.step)
        return bool(self.omero_conn_id) and spec is not None and spec.needs_store

    def mint_secrets(self, context: Context) -> dict[str, str]:
        """A new OMERO session key for one job of this task ({} when it needs none).

        Its time-to-live and idle timeout are :meth:`deferral_timeout` (the job's time limit
        times its array waves, plus the queue allowance): no job this task waits for outlives
        it. The session is for the connection's ``job_user`` (docs/omero.md).
        """
        if not self.needs_session():
            return {}
        from hooks.omero import MAX_TTL_S, OmeroSessionHook

        ttl_s = math.ceil(self.deferral_timeout().total_seconds())
        if ttl_s > MAX_TTL_S:
            raise AirflowFailException(
                f"{self.task_id}: the task may wait {self.deferral_timeout()} for its job (time "
                f"limit x array waves + queue_allowance), longer than an OMERO session may live "
                f"({timedelta(seconds=MAX_TTL_S)}); lower hpc_resources time_min, throttle the "
                "array less, or lower queue_allowance"
            )
        key = OmeroSessionHook(self.omero_conn_id).mint_session_key(ttl_s=ttl_s, idle_s=ttl_s)
        return {"omero_session_key": key}

    def submit_job(self, context: Context, job_key: str, params: dict[str, Any]) -> SubmitReply:
        """Submit the job ``job_key`` of this task, or reattach to it.

        A session key is minted only for a job the cluster does not have yet (``status``
        answers ``native_id=None``); a reattach sends no secrets. A key that no job got (the
        gateway refused the request, or a racing submit created the job first) is ended here.
        """
        hook = self.hook
        secrets: dict[str, str] = {}
        if self.needs_session() and hook.status([job_key])[0].native_id is None:
            secrets = self.mint_secrets(context)
        try:
            reply = hook.submit(
                self.step, job_key, params=params, resources=self.hpc_resources, secrets=secrets
            )
        except (HpcGatewayError, HpcConfigError) as exc:
            # RETRY_SAME_KEY: the job directory (with the key) is kept for a resubmit
            if secrets and getattr(exc, "code", None) != ErrorCode.RETRY_SAME_KEY.value:
                self._end_unused_session(secrets)
            raise
        if secrets and not reply.created:
            self._end_unused_session(secrets)
        return reply

    def _end_unused_session(self, secrets: dict[str, str]) -> None:
        """End a session minted for a job that did not take it (best-effort)."""
        from hooks.omero import OmeroSessionHook

        try:
            OmeroSessionHook(self.omero_conn_id).close_session(secrets["omero_session_key"])
        except Exception as exc:  # noqa: BLE001 - it expires by its time-to-live anyway
            self.log.warning("could not end an unused OMERO session: %s", type(exc).__name__)

    def job_resources(self) -> Resources:
        """The step's default resources with ``hpc_resources`` applied (before the site's
        clamping, so an upper bound of what the cluster grants)."""
        from hpc_jobs.registry import get_step

        spec = get_step(self.step)
        base = spec.resources if spec is not None else Resources()
        try:
            return ResourceOverrides.model_validate(self.hpc_resources).apply(base)
        except ValidationError:  # the gateway refuses it with the details at submit
            return base

    def deferral_timeout(self) -> timedelta:
        """Backstop for the trigger: the job's time limit (times the waves a throttled array
        needs) plus ``queue_allowance``."""
        from hpc_jobs.protocol import array_indices

        resources = self.job_resources()
        waves = 1
        if resources.array:
            tasks = len(array_indices(resources.array))
            _, _, throttle = resources.array.partition("%")
            waves = math.ceil(tasks / int(throttle)) if throttle and int(throttle) > 0 else 1
        return timedelta(minutes=resources.time_min * waves) + self.queue_allowance

    def defer(
        self,
        *,
        trigger: BaseTrigger,
        method_name: str,
        kwargs: dict[str, Any] | None = None,
        timeout: timedelta | int | float | None = None,
    ) -> NoReturn:
        """``BaseOperator.defer`` with :meth:`deferral_timeout` when no timeout is given
        (subclasses that defer again, e.g. for a merge job, get it too)."""
        super().defer(
            trigger=trigger,
            method_name=method_name,
            kwargs=kwargs,
            timeout=self.deferral_timeout() if timeout is None else timeout,
        )

    def execute(self, context: Context) -> Any:
        hook = self.hook
        try:
            earlier = self.reusable_earlier_job(context)
            if earlier is not None:
                return self.reattach(context, *earlier)
            params = self.prepare_params(context)
            reply = self.submit_job(context, self.job_key(context), params)
        except HpcConfigError as exc:
            raise AirflowFailException(str(exc)) from exc
        self._job_id = reply.job_id
        self.log.info(
            "%s job %s: %s (native id %s, via %s)",
            self.step,
            "submitted" if reply.created else "already existed, reattached",
            reply.job_id,
            reply.native_id,
            hook.transport,
        )
        context["ti"].xcom_push(
            key="hpc_job",
            value={
                "job_id": reply.job_id,
                "native_id": reply.native_id,
                "hpc_conn_id": self.hpc_conn_id,
            },
        )
        if reply.state.terminal:
            status = hook.status([reply.job_id])[0]
            return self.execute_complete(context, status.model_dump(mode="json"))
        self.defer(trigger=self.trigger_for(reply.job_id, reply.native_id),
                   method_name="execute_complete")

    def reattach(self, context: Context, status: JobStatus, method_name: str) -> Any:
        """Take a job of an earlier try instead of submitting a second one (nothing is sent to
        the cluster: no parameters, no OMERO session): wait for it while it runs, or resume
        with ``method_name`` at once when it COMPLETED."""
        self._job_id = status.job_id
        self.log.info(
            "%s job %s of an earlier try is %s (native id %s): reattached, no new job",
            self.step, status.job_id, status.state.value, status.native_id,
        )
        context["ti"].xcom_push(
            key="hpc_job",
            value={"job_id": status.job_id, "native_id": status.native_id,
                   "hpc_conn_id": self.hpc_conn_id},
        )
        if status.state.terminal:
            return getattr(self, method_name)(context, status.model_dump(mode="json"))
        self.defer(trigger=self.trigger_for(status.job_id, status.native_id or ""),
                   method_name=method_name)

    def trigger_for(self, job_id: str, native_id: str = "") -> HpcJobTrigger:
        """The trigger that waits for ``job_id`` with this operator's limits."""
        return HpcJobTrigger(
            job_id=job_id,
            hpc_conn_id=self.hpc_conn_id,
            poll_interval=self.poll_interval,
            native_id=native_id,
            unknown_timeout=self.unknown_timeout,
            poll_outage_limit=self.poll_outage_limit,
            log_tail_bytes=self.log_tail_bytes,
            fetch_result=self.result_in_event,
        )

    def resume_execution(
        self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context
    ) -> Any:
        """On Airflow's ``__fail__`` (deferral timeout, crashed trigger) cancel the job first:
        the task fails and a retry would start a second job next to an untracked one."""
        if next_method == TRIGGER_FAIL_REPR:
            job_ids = self.deferred_job_ids(context)
            try:  # one status call; only live jobs need a cancel
                job_ids = [s.job_id for s in self.hook.status(job_ids) if not s.state.terminal]
            except Exception as exc:  # noqa: BLE001 - then cancel each (a no-op when finished)
                self.log.warning("could not ask for the jobs' states (%s); cancelling each", exc)
            for job_id in job_ids:
                self.log.warning("the wait for cluster job %s failed; cancelling it", job_id)
                self._cancel_quietly(job_id)
        return super().resume_execution(next_method, next_kwargs, context)

    def deferred_job_ids(self, context: Context) -> list[str]:
        """Job ids a deferral of this try may be waiting for (recomputed from the task
        instance): this try's jobs and those of the earlier tries of its generation (a
        reattached job keeps its try's key)."""
        first = self.first_try_of_generation(context)
        return [key for t in range(int(context["ti"].try_number), first - 1, -1)
                for key, _ in self.job_keys_of_try(context, t)]

    def _cancel_quietly(self, job_id: str) -> str:
        """Cancel a job; returns what happened, for the failure message."""
        try:
            reply = self.hook.cancel(job_id)
        except Exception as exc:  # noqa: BLE001 - reported, the failure that follows decides
            self.log.warning("could not cancel cluster job %s: %s", job_id, exc)
            return (
                f"cancelling it failed ({exc}); check it on the cluster (squeue --name {job_id})"
            )
        return f"the job was cancelled (now {reply.state.value})"

    def _log_tail(self, job_id: str, event: dict[str, Any] | None = None) -> str:
        """The job log's last ``log_tail_bytes``: from the trigger's event when it carries them
        (no gateway call), else asked for."""
        carried = (event or {}).get("log_tail")
        if isinstance(carried, dict) and isinstance(carried.get("text"), str):
            offset, text = int(carried.get("offset") or 0), carried["text"]
        else:
            try:
                tail = self.hook.log(job_id, offset=-self.log_tail_bytes,
                                     max_bytes=self.log_tail_bytes)
            except Exception as exc:  # noqa: BLE001 - the log is a courtesy; the state decides
                self.log.warning("could not read the job log: %s", exc)
                return ""
            offset, text = tail.offset, tail.text
        if offset > 0:
            text = "…" + text.split("\n", 1)[-1]
        return text

    def raise_for_state(self, event: dict[str, Any]) -> None:
        """Copy the job's log tail into the task log; raise unless the job COMPLETED (see the
        module docstring's table)."""
        job_id = event["job_id"]
        self._job_id = job_id
        if event.get("error"):
            if event.get("cancelled"):
                raise AirflowException(f"lost track of cluster job {job_id}: {event['error']}")
            raise AirflowFailException(
                f"lost track of cluster job {job_id}: {event['error']}; not retried, so that no "
                "second job runs beside it: clear the task once the cause is fixed"
            )
        state = JobState(event.get("state", "UNKNOWN"))
        tail = self._log_tail(job_id, event)
        if tail:
            self.log.info("---- cluster job %s log (tail) ----\n%s", job_id, tail.rstrip())
        what = (
            f"cluster job {job_id} (native id {event.get('native_id') or '?'}) ended {state.value}"
            f" (exit code {event.get('exit_code')}"
            + (f", {event['reason']}" if event.get("reason") else "")
            + ")"
        )
        if state.terminal:
            self.log.info("%s", accounting_line(event))
        if state is JobState.COMPLETED:
            self.log.info("%s", what)
            return
        if not state.terminal:  # the job may still exist: never leave it running untracked
            cancelled = self._cancel_quietly(job_id)
            if state is JobState.PENDING:  # the trigger gave up on a job that can never start
                raise AirflowFailException(
                    f"{what}: Slurm will never start this job as submitted "
                    f"({event.get('reason')}); it asked for "
                    f"{self.hpc_resources or 'the step defaults'}: lower hpc_resources or ask "
                    f"the HPC admin which partition/account fits. {cancelled}."
                )
            if state is JobState.UNKNOWN:
                raise AirflowFailException(
                    f"{what}: the cluster no longer knows this job (its job directory vanished, "
                    "or Slurm purged it and it left no exit marker); "
                    f"{cancelled}. Check the job root on the cluster, then clear the task."
                )
            raise AirflowFailException(
                f"{what}: the job is not finished, yet the wait for it ended; {cancelled}"
            )
        if state.retryable:
            raise AirflowException(f"{what}: a cluster-side failure, worth a retry")
        if state is JobState.FAILED and event.get("exit_code") == EXIT_RETRY_LATER:
            raise AirflowException(
                f"{what}: the job reported a condition that passes by itself (see the log tail: "
                f"an image still being prepared, or in use by another run); retried later\n"
                f"---- log tail ----\n{tail[-3000:]}"
            )
        hint = {
            JobState.TIMEOUT: "raise the time limit (hpc_resources time_min) or split the work",
            JobState.OUT_OF_MEMORY: "ask for more memory (hpc_resources mem_mb)",
            JobState.CANCELLED: "someone cancelled the job (scancel or Airflow)",
        }.get(state, "see the log tail below")
        raise AirflowFailException(f"{what}; {hint}\n---- log tail ----\n{tail[-3000:]}")

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger fired: the step's summary, or an exception."""
        self.raise_for_state(event)
        carried = event.get("result")
        if isinstance(carried, dict):  # the trigger read it (no gateway call here)
            return carried["data"] if carried.get("data") is not None else carried.get("text")
        result = self.hook.result(event["job_id"])
        return result.data if result.data is not None else result.text

    def on_kill(self) -> None:
        if self._job_id:
            self.log.info("cancelling cluster job %s", self._job_id)
            self.hook.cancel(self._job_id)
