"""``HpcStepOperator``: run one registered cluster step as a Slurm job (or a local job).

submit (idempotent job key) → defer to :class:`~operators.triggers.HpcJobTrigger` →
``execute_complete``: the job log tail goes into the Airflow task log, and the terminal state
becomes a result, a retry or a failure:

============================  ===========================================================
COMPLETED                     success; the step's ``summary.json`` is the task's XCom
PREEMPTED, NODE_FAIL,         ``AirflowException`` (the cluster's fault: Airflow retries
BOOT_FAIL                     with a new try number, hence a new job)
FAILED, TIMEOUT, CANCELLED,   ``AirflowFailException`` naming state, exit code, log tail
OUT_OF_MEMORY, DEADLINE, ...  (no retry: running it again would fail the same way)
============================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from hooks.hpc import DEFAULT_CONN_ID, HpcGatewayHook
from hpc_jobs.protocol import JobState, job_key_for
from operators.triggers import HpcJobTrigger


class HpcStepOperator(BaseOperator):
    """Run a step of ``hpc_jobs.registry`` on the cluster through the gateway.

    :param step: registered step name (``cluster_check``, ``export_zarr`` ...).
    :param step_params: the step's params (validated by its model on the cluster). Templated.
    :param hpc_resources: overrides of the step's default resources (cpus, mem_mb, time_min, gpus,
        partition, array). Templated.
    :param hpc_conn_id: gateway connection (see :class:`~hooks.hpc.HpcGatewayHook`).
    :param omero_conn_id: if set and the step opens the image store, a short-lived OMERO
        session key is minted for this job (see :mod:`hooks.omero`).
    :param poll_interval: seconds between (shared) status polls.
    :param log_tail_bytes: how much of the job log to copy into the task log at the end.
    """

    template_fields: Sequence[str] = ("step_params", "hpc_resources")
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.step_params = step_params or {}
        self.hpc_resources = hpc_resources or {}
        self.hpc_conn_id = hpc_conn_id
        self.omero_conn_id = omero_conn_id
        self.poll_interval = poll_interval
        self.log_tail_bytes = log_tail_bytes
        self._job_id: str | None = None

    @cached_property
    def hook(self) -> HpcGatewayHook:
        """One hook per operator run: its SSH connection serves submit, log, result, cancel."""
        return HpcGatewayHook(self.hpc_conn_id)

    def job_key(self, context: Context) -> str:
        """dag / run / task / map index / try: one cluster job per Airflow try."""
        ti = context["ti"]
        return job_key_for(
            ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1), ti.try_number
        )

    def prepare_params(self, context: Context) -> dict[str, Any]:
        """Hook for subclasses: the params sent to the cluster (default: ``step_params``)."""
        return dict(self.step_params)

    def mint_secrets(self, context: Context) -> dict[str, str]:
        """An OMERO session key for this job when an OMERO connection is configured."""
        if not self.omero_conn_id:
            return {}
        from hooks.omero import OmeroSessionHook

        return {"omero_session_key": OmeroSessionHook(self.omero_conn_id).mint_session_key()}

    def execute(self, context: Context) -> Any:
        hook = self.hook
        params = self.prepare_params(context)
        job_key = self.job_key(context)
        reply = hook.submit(
            self.step,
            job_key,
            params=params,
            resources=self.hpc_resources,
            secrets=self.mint_secrets(context),
        )
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
        self.defer(
            trigger=HpcJobTrigger(
                job_id=reply.job_id,
                hpc_conn_id=self.hpc_conn_id,
                poll_interval=self.poll_interval,
                native_id=reply.native_id,
            ),
            method_name="execute_complete",
        )

    def _log_tail(self, job_id: str) -> str:
        try:
            tail = self.hook.log(job_id, offset=-self.log_tail_bytes, max_bytes=self.log_tail_bytes)
        except Exception as exc:  # noqa: BLE001 - the log is a courtesy; the state decides
            self.log.warning("could not read the job log: %s", exc)
            return ""
        text = tail.text
        if tail.offset > 0:
            text = "…" + text.split("\n", 1)[-1]
        return text

    def raise_for_state(self, event: dict[str, Any]) -> None:
        """Copy the job's log tail into the task log; raise unless the job COMPLETED."""
        job_id = event["job_id"]
        self._job_id = job_id
        state = JobState(event.get("state", "UNKNOWN"))
        tail = self._log_tail(job_id)
        if tail:
            self.log.info("---- cluster job %s log (tail) ----\n%s", job_id, tail.rstrip())
        what = (
            f"cluster job {job_id} (native id {event.get('native_id') or '?'}) ended {state.value}"
            f" (exit code {event.get('exit_code')}"
            + (f", {event['reason']}" if event.get("reason") else "")
            + ")"
        )
        if event.get("error"):
            raise AirflowException(f"lost track of cluster job {job_id}: {event['error']}")
        if state is JobState.PENDING:  # the trigger gave up on a job that can never start
            self.hook.cancel(job_id)
            raise AirflowFailException(
                f"{what}: Slurm will never start this job as submitted ({event.get('reason')}); "
                f"it asked for {self.hpc_resources or 'the step defaults'}: lower hpc_resources "
                "or ask the HPC admin which partition/account fits. The job was cancelled."
            )
        if state is JobState.COMPLETED:
            self.log.info("%s", what)
            return
        if state.retryable:
            raise AirflowException(f"{what}: a cluster-side failure, worth a retry")
        hint = {
            JobState.TIMEOUT: "raise the time limit (hpc_resources time_min) or split the work",
            JobState.OUT_OF_MEMORY: "ask for more memory (hpc_resources mem_mb)",
            JobState.CANCELLED: "someone cancelled the job (scancel or Airflow)",
        }.get(state, "see the log tail below")
        raise AirflowFailException(f"{what}; {hint}\n---- log tail ----\n{tail[-3000:]}")

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger fired: the step's summary, or an exception."""
        self.raise_for_state(event)
        result = self.hook.result(event["job_id"])
        return result.data if result.data is not None else result.text

    def on_kill(self) -> None:
        if self._job_id:
            self.log.info("cancelling cluster job %s", self._job_id)
            self.hook.cancel(self._job_id)
