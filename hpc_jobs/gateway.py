"""``omeflow-gateway``: the one program the orchestrator's SSH key may run.

Installed in ``authorized_keys`` as (``omeflow keys create`` writes the line)::

    command="/opt/omeflow/venv/bin/omeflow-gateway --config /etc/omeflow/site.toml
        --caller alice",restrict,from="10.0.0.5",expiry-time="20270101" ssh-ed25519 AAAA...

``--caller`` names the OMERO user the key belongs to. Every job is recorded with its caller
(``job.json``) and belongs to it: ``status``, ``log``, ``result`` and ``cancel`` of another
caller's job answer exactly as for a job that does not exist, and ``submit`` of a key another
caller holds is a CONFLICT. Several keys can so share one HPC account. Without ``--caller``
(the embedded default's local transport, or a single service key) the caller is
:data:`~hpc_jobs.protocol.DEFAULT_CALLER` (``"local"``), a name no key may give explicitly.

sshd runs it for every connection with the client's command line in ``SSH_ORIGINAL_COMMAND``.
That command line must be exactly one verb (:data:`hpc_jobs.protocol.VERBS`); the request is a
JSON object on stdin (at most :data:`~hpc_jobs.protocol.MAX_BODY_BYTES`), validated strictly
against the verb's model and, for ``submit``, the step's own params model. The reply is one JSON
object on stdout; a refusal exits non-zero with an :class:`~hpc_jobs.protocol.ErrorReply`.

Nothing received is ever given to a shell, evaluated, or used as a path without validation:
job ids are restricted identifiers mapped to ``<job_root>/<job_id>``, output names are single
path components opened without following links. Secrets (OMERO session keys) go to a 0600 file
in the job directory and nowhere else; when a ``status`` or ``cancel`` finds a job ended
(cancelled, timed out, killed, an array finished) with that file still there, the gateway
ends the job's session and removes the file, once (the job itself does it when a plain job's
step returns, ``hpc_jobs/run.py``). Every call appends one line to the audit log
(``<job_root>/.audit.log`` unless the site sets ``audit_log``), caller included; a call the
gateway cannot audit (the log cannot be opened for appending) is refused before it acts.

``status`` also returns, in the same call, each job's latest progress (the last line of its
``progress.jsonl``, or per array task of ``progress.<task>.jsonl`` plus their sum; read from the
end of the file, see :mod:`hpc_jobs.progress`), and the node, time limit and peak memory the
scheduler reports. ``cancel`` may name the person who asked (``by``): it is recorded in the job
directory (``cancelled_by.json``) and the audit line, and the cancelled job's ``status`` reason
then reads ``cancelled by <by>``. ``queue`` lists the caller's pending and running jobs as the
scheduler sees them (one query), others' left out as everywhere else.

For the embedded default (no SSH), the Airflow side runs this same program as a subprocess
with ``SSH_ORIGINAL_COMMAND`` set, so both transports exercise identical code.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from hpc_jobs import __version__, tunnel
from hpc_jobs.config import SiteConfig
from hpc_jobs.jobdir import JobDir, JobDirError
from hpc_jobs.progress import summed
from hpc_jobs.protocol import (
    DEFAULT_CALLER,
    MAX_BODY_BYTES,
    MAX_CHUNK_BYTES,
    REQUEST_MODELS,
    VERBS,
    CancelReply,
    CancelRequest,
    ErrorCode,
    GatewayError,
    JobState,
    JobStatus,
    LogReply,
    LogRequest,
    PingReply,
    QueueEntry,
    QueueReply,
    QueueRequest,
    ResultReply,
    ResultRequest,
    StatusReply,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    array_indices,
    validate_caller,
)
from hpc_jobs.registry import STEPS, get_step
from hpc_jobs.schedulers.base import (
    JobSpec,
    Scheduler,
    SchedulerError,
    SchedulerTimeout,
    get_scheduler,
)

#: Why a job id is unknown to this caller. The same words whether the directory never
#: existed, was removed, or belongs to another caller: existence must not leak across callers.
NO_SUCH_JOB = (
    "no such job: {job_id} was never submitted by this caller, or its directory was removed "
    "from the job root"
)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(body: bytes) -> dict[str, Any]:
    """Decode a request body: UTF-8, one JSON object, no duplicate keys, no NaN/Infinity."""
    if len(body) > MAX_BODY_BYTES:
        raise GatewayError(
            ErrorCode.BODY_TOO_LARGE,
            f"request body is larger than {MAX_BODY_BYTES} bytes; send fewer job ids per call",
        )
    if not body.strip():
        return {}
    try:
        text = body.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise GatewayError(ErrorCode.BAD_JSON, "request body is not valid UTF-8") from None
    if "\x00" in text:
        raise GatewayError(ErrorCode.BAD_JSON, "request body contains a NUL character")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise GatewayError(ErrorCode.BAD_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise GatewayError(ErrorCode.BAD_JSON, "request body must be a JSON object")
    return obj


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors without the offending input values (they may be hostile or secret)."""
    return [
        {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


def validate_request(verb: str, obj: dict[str, Any]) -> BaseModel:
    """Validate a decoded body against the verb's request model."""
    try:
        return REQUEST_MODELS[verb].model_validate(obj, strict=True)
    except ValidationError as exc:
        details = _errors(exc)
        first = details[0] if details else {"loc": [], "msg": "invalid"}
        raise GatewayError(
            ErrorCode.BAD_REQUEST,
            f"invalid {verb} request: {'.'.join(first['loc']) or '(body)'}: {first['msg']}",
            details,
        ) from None


class Gateway:
    """Carries out one validated request of one caller against the site's scheduler and job
    root. Jobs of other callers are invisible to it."""

    def __init__(
        self,
        site: SiteConfig,
        config_path: Path,
        scheduler: Scheduler | None = None,
        caller: str = DEFAULT_CALLER,
    ):
        self.site = site
        self.config_path = config_path
        self._scheduler = scheduler
        self.caller = caller
        #: job id -> what happened to the session of each job whose secrets this call retired
        #: (for the audit line; never a key).
        self.retired: dict[str, str] = {}

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = get_scheduler(self.site)
        return self._scheduler

    def job(self, job_id: str) -> JobDir:
        return JobDir.of(self.site.job_root, job_id)

    # -- verbs ----------------------------------------------------------------------------
    def ping(self, _req: BaseModel) -> PingReply:
        return PingReply(
            version=__version__,
            scheduler=self.site.scheduler,
            steps=sorted(STEPS),
            server_time=time.time(),
        )

    def submit(self, req: SubmitRequest) -> SubmitReply:
        spec = get_step(req.step)
        if spec is None:
            raise GatewayError(
                ErrorCode.UNKNOWN_STEP,
                f"unknown step {req.step!r}; this cluster offers: {', '.join(sorted(STEPS))}",
            )
        try:
            # JSON mode + strict: no silent coercion, but JSON-native types (str -> Path) work.
            params = spec.params_model.model_validate_json(json.dumps(req.params), strict=True)
        except ValidationError as exc:
            details = _errors(exc)
            first = details[0]
            raise GatewayError(
                ErrorCode.BAD_PARAMS,
                f"invalid params for step {req.step!r}: {'.'.join(first['loc']) or '(params)'}: "
                f"{first['msg']}",
                details,
            ) from None
        # A step's defaults are suggestions: scaled down to what this site allows. A caller's
        # explicit override above the site's limits is refused with the limit named.
        resources = req.resources.apply(self.site.slurm.clamp(spec.resources))
        over = self.site.slurm.over_limits(resources)
        if over:
            raise GatewayError(
                ErrorCode.BAD_REQUEST,
                "resources exceed this site's limits: " + ", ".join(over)
                + "; ask for less or have the HPC admin raise [slurm] max_* in site.toml",
            )
        job = self.job(req.job_key)
        record = {
            "step": req.step,
            "job_key": req.job_key,
            "caller": self.caller,
            "params": params.model_dump(mode="json"),
            "resources": resources.model_dump(mode="json"),
            "site_config": str(self.config_path.resolve()),
        }
        taken = GatewayError(
            ErrorCode.CONFLICT,
            f"job key {req.job_key!r} was already used for a different request; use a new key "
            "(Airflow derives one per task try)",
        )
        with job.locked():
            existing = job.read_job_record()
            if existing is None:
                try:
                    pending = job.read_request()
                except FileNotFoundError:
                    pending = None
                if pending is not None and (
                    JobDir.owner(pending) != self.caller
                    or job.fingerprint(pending) != job.fingerprint(record)
                ):
                    raise taken
                if pending is not None:
                    # A previous submit died (or sbatch timed out) between creating the dir
                    # and recording the job id: reattach if the scheduler knows the job, else
                    # start over.
                    native = self._find(req.job_key)
                    if native is not None:
                        existing = job.write_job_record(record, native, self.site.scheduler)
            if existing is not None:
                if (
                    JobDir.owner(existing) != self.caller
                    or existing["fingerprint"] != job.fingerprint(record)
                ):
                    raise taken
                state = self._status_of([req.job_key])[0].state
                return SubmitReply(
                    job_id=req.job_key, native_id=existing["native_id"], created=False, state=state
                )
            job.create(record, req.secrets, python=self.site.python)
            try:
                native = self.scheduler.submit(
                    JobSpec(
                        job_dir=job.path,
                        script=job.script_path,
                        name=req.job_key,
                        resources=resources,
                        log_path=job.log_path,
                        site=self.site,
                    )
                )
            except SchedulerTimeout as exc:
                # slurmctld may have accepted the job and only the answer was lost: look for it
                # by name before anything else. The job directory stays either way, so a
                # resubmit with the same key reattaches instead of submitting a second job.
                found = self._find(req.job_key, after=str(exc))
                if found is None:
                    raise GatewayError(
                        ErrorCode.RETRY_SAME_KEY,
                        f"submit timed out ({exc}) and the scheduler lists no job named "
                        f"{req.job_key!r}; submit again with the same job key (it reattaches "
                        "if the job shows up, else submits it once)",
                    ) from None
                native = found
            except SchedulerError as exc:
                job.discard()
                raise GatewayError(ErrorCode.SCHEDULER_ERROR, f"submit failed: {exc}") from None
            job.write_job_record(record, native, self.site.scheduler)
            tunnel.on_submit(self.site, self.config_path, native)  # no-op unless reverse_tunnel
        return SubmitReply(
            job_id=req.job_key, native_id=native, created=True, state=JobState.PENDING
        )

    def _find(self, job_key: str, after: str | None = None) -> str | None:
        """The scheduler's id of the job named ``job_key``, or None. A failed look-up is a
        SCHEDULER_ERROR that keeps the job directory (the same key can be resubmitted)."""
        try:
            return self.scheduler.find_by_name(job_key)
        except SchedulerError as exc:
            first = f"submit timed out ({after}) and " if after else ""
            raise GatewayError(
                ErrorCode.RETRY_SAME_KEY,
                f"{first}looking up job {job_key!r} by name failed: {exc}; submit again with "
                "the same job key once the scheduler answers (never with a new key: the first "
                "job may exist)",
            ) from None

    def status(self, req: StatusRequest) -> StatusReply:
        return StatusReply(jobs=self._status_of(req.job_ids))

    def cancel(self, req: CancelRequest) -> CancelReply:
        job = self.job(req.job_id)
        record = self._record(job)
        current = self._status_of([req.job_id])[0]
        if not current.state.terminal:
            if req.by is not None:  # recorded first: a status racing the cancel names them
                job.write_cancelled_by(req.by)
            try:
                self.scheduler.cancel(record["native_id"])
            except SchedulerError as exc:
                raise GatewayError(ErrorCode.SCHEDULER_ERROR, f"cancel failed: {exc}") from None
            current = self._status_of([req.job_id])[0]
            if not current.state.terminal:
                current = current.model_copy(update={"state": JobState.CANCELLED})
            if req.by is not None and current.state is JobState.CANCELLED:
                current = current.model_copy(update={"reason": f"cancelled by {req.by}"})
            self._retire(req.job_id)  # cancelled: its session ends even while it winds down
        return CancelReply(job_id=req.job_id, state=current.state)

    def queue(self, _req: QueueRequest) -> QueueReply:
        """The scheduler's pending and running jobs that belong to this caller (one query;
        jobs of other callers and jobs omeflow did not submit are left out)."""
        try:
            queued = self.scheduler.queue()
        except SchedulerError as exc:
            raise GatewayError(ErrorCode.SCHEDULER_ERROR, f"queue failed: {exc}") from None
        owned: dict[str, bool] = {}
        entries: list[QueueEntry] = []
        for q in queued:
            if q.name not in owned:
                try:
                    owned[q.name] = self._owned_record(self.job(q.name)) is not None
                except (JobDirError, OSError, ValueError):
                    owned[q.name] = False
            if not owned[q.name]:
                continue
            entries.append(
                QueueEntry(
                    job_id=q.name, native_id=q.native_id, state=q.state, reason=q.reason,
                    node=q.node, partition=q.partition, elapsed_s=q.elapsed_s,
                    time_limit_s=q.time_limit_s, submitted_at=q.submitted_at,
                )
            )
        return QueueReply(scheduler=self.site.scheduler, jobs=entries)

    def log(self, req: LogRequest) -> LogReply:
        job = self.job(req.job_id)
        self._record(job)
        size, offset, data = job.read_log(req.offset, req.max_bytes)
        return LogReply(
            job_id=req.job_id,
            offset=offset,
            next_offset=offset + len(data),
            size=size,
            text=data.decode("utf-8", errors="replace"),
        )

    def result(self, req: ResultRequest) -> ResultReply:
        job = self.job(req.job_id)
        self._record(job)
        try:
            raw = job.read_output(req.name, MAX_CHUNK_BYTES)
        except FileNotFoundError:
            spec = job.array_spec()
            if req.name == "summary.json" and spec:
                return self._array_summary(job, spec)
            raise GatewayError(
                ErrorCode.NOT_FOUND,
                f"job {req.job_id} has no output {req.name!r} (did the job finish successfully?)",
            ) from None
        text = raw.decode("utf-8", errors="replace")
        if req.name.endswith(".json"):
            try:
                return ResultReply(job_id=req.job_id, name=req.name, data=json.loads(text))
            except ValueError:
                pass
        return ResultReply(job_id=req.job_id, name=req.name, text=text)

    # -- helpers --------------------------------------------------------------------------
    def _array_summary(self, job: JobDir, spec: str) -> ResultReply:
        """``summary.json`` of an array job: every task's ``summary.<task>.json`` gathered into
        ``{"array_tasks": {"<task>": {...}}}``; NOT_FOUND naming the tasks still missing."""
        tasks: dict[str, Any] = {}
        missing: list[int] = []
        total = 0
        for task in array_indices(spec):
            try:
                raw = job.read_output(f"summary.{task}.json", MAX_CHUNK_BYTES - total)
            except FileNotFoundError:
                missing.append(task)
                continue
            total += len(raw)
            try:
                tasks[str(task)] = json.loads(raw)
            except ValueError:
                tasks[str(task)] = raw.decode("utf-8", errors="replace")
        if missing:
            raise GatewayError(
                ErrorCode.NOT_FOUND,
                f"job {job.job_id} is an array ({spec}) without summary.json, and "
                f"{len(missing)} of {len(array_indices(spec))} tasks wrote no "
                f"summary.<task>.json (tasks {_task_list(missing)}; did they finish "
                "successfully?)",
            )
        return ResultReply(job_id=job.job_id, name="summary.json", data={"array_tasks": tasks})

    def _retire(self, job_id: str) -> None:
        """End the session of a job that is over and remove its ``secrets.json`` (once)."""
        outcome = self.job(job_id).retire_secrets(self.site.store)
        if outcome is not None:
            self.retired[job_id] = outcome

    def _record(self, job: JobDir) -> dict[str, Any]:
        """The job's record if it belongs to this caller; NOT_FOUND (as for a missing job)
        otherwise."""
        record = self._owned_record(job)
        if record is None:
            raise GatewayError(ErrorCode.NOT_FOUND, NO_SUCH_JOB.format(job_id=job.job_id))
        return record

    def _owned_record(self, job: JobDir) -> dict[str, Any] | None:
        record = job.read_job_record()
        if record is None or JobDir.owner(record) != self.caller:
            return None
        return record

    def _status_of(self, job_ids: list[str]) -> list[JobStatus]:
        records: dict[str, dict[str, Any] | None] = {}
        refused: dict[str, str] = {}
        for job_id in job_ids:
            try:
                records[job_id] = self._owned_record(self.job(job_id))
            except JobDirError as exc:
                records[job_id], refused[job_id] = None, str(exc)
        natives = [r["native_id"] for r in records.values() if r]
        try:
            found = self.scheduler.status(natives) if natives else {}
        except SchedulerError as exc:
            raise GatewayError(ErrorCode.SCHEDULER_ERROR, f"status failed: {exc}") from None
        out: list[JobStatus] = []
        for job_id, record in records.items():
            if record is None:
                reason = refused.get(job_id) or NO_SUCH_JOB.format(job_id=job_id)
                out.append(JobStatus(job_id=job_id, state=JobState.UNKNOWN, reason=reason))
                continue
            native_id = record["native_id"]
            ns = found.get(native_id)
            if ns is None:
                # The scheduler forgot the job (accounting off, past MinJobAge): the job's own
                # exit markers are the last word.
                out.append(self._from_exit_markers(self.job(job_id), native_id))
                continue
            out.append(
                JobStatus(
                    job_id=job_id,
                    native_id=native_id,
                    state=ns.state,
                    exit_code=ns.exit_code,
                    reason=ns.reason,
                    elapsed_s=ns.elapsed_s,
                    array_states=ns.array_states,
                    node=ns.node,
                    time_limit_s=ns.time_limit_s,
                    max_rss_mb=ns.max_rss_mb,
                )
            )
        out = [self._with_job_facts(st) if st.native_id is not None else st for st in out]
        for st in out:
            if st.native_id is not None and st.state.terminal:  # this caller's, and over
                self._retire(st.job_id)
        return out

    def _with_job_facts(self, st: JobStatus) -> JobStatus:
        """What the job directory adds to the scheduler's word: the latest progress (per
        array task and summed) and who cancelled it."""
        job = self.job(st.job_id)
        plain, tasks = job.read_progress()
        update: dict[str, Any] = {}
        if tasks:
            update.update(array_progress=tasks, progress=summed(tasks))
        elif plain is not None:
            update["progress"] = plain
        if st.state is JobState.CANCELLED:
            by = job.read_cancelled_by()
            if by is not None:
                update["reason"] = f"cancelled by {by}"
        return st.model_copy(update=update) if update else st

    def _from_exit_markers(self, job: JobDir, native_id: str) -> JobStatus:
        """Status of a job the scheduler no longer knows, from the exit markers the job wrote
        (``exit.json``, or ``exit.<task>.json`` per array task)."""
        forgotten = "the scheduler no longer knows this job"
        spec = job.array_spec()
        if not spec:
            marker = job.read_exit_marker()
            if marker is None:
                return JobStatus(
                    job_id=job.job_id, native_id=native_id, state=JobState.UNKNOWN,
                    reason=f"{forgotten} and it left no exit marker (killed before it ended?)",
                )
            code = _marker_code(marker)
            return JobStatus(
                job_id=job.job_id, native_id=native_id,
                state=JobState.COMPLETED if code == 0 else JobState.FAILED, exit_code=code,
                reason="from the job's exit marker", elapsed_s=marker.get("elapsed_s"),
            )
        tasks = array_indices(spec)
        markers = {t: job.read_exit_marker(t) for t in tasks}
        missing = [t for t, m in markers.items() if m is None]
        if missing:
            return JobStatus(
                job_id=job.job_id, native_id=native_id, state=JobState.UNKNOWN,
                reason=f"{forgotten}; {len(missing)} of {len(tasks)} array tasks left no exit "
                f"marker (tasks {_task_list(missing)})",
            )
        codes = {t: _marker_code(m) for t, m in markers.items() if m is not None}
        failed = [t for t, c in codes.items() if c != 0]
        elapsed = [m["elapsed_s"] for m in markers.values() if m and "elapsed_s" in m]
        return JobStatus(
            job_id=job.job_id,
            native_id=native_id,
            state=JobState.FAILED if failed else JobState.COMPLETED,
            exit_code=max((codes[t] for t in failed), default=0),
            reason="from the array tasks' exit markers"
            + (f"; tasks {_task_list(failed)} failed" if failed else ""),
            elapsed_s=max(elapsed) if elapsed else None,
            array_states={
                k: v
                for k, v in (("COMPLETED", len(codes) - len(failed)), ("FAILED", len(failed)))
                if v
            },
        )


def _marker_code(marker: dict[str, Any]) -> int:
    """Exit code of an exit marker; a marker without a usable one counts as a failure."""
    code = marker.get("exit_code")
    return code if isinstance(code, int) and not isinstance(code, bool) else 1


def _task_list(tasks: list[int], limit: int = 10) -> str:
    """``0, 3, 7`` (at most ``limit`` ids, then ``... (+N more)``)."""
    shown = ", ".join(str(t) for t in tasks[:limit])
    return shown + (f" ... (+{len(tasks) - limit} more)" if len(tasks) > limit else "")


class AuditLog:
    """The gateway's append-only audit log, opened before a call acts.

    :meth:`open` refuses (``GatewayError``, CONFIG_ERROR naming the path and the fix) when the
    log cannot be opened for appending or is not a regular file: the gateway does not act on a
    call it cannot audit. One JSON line per call; never the request body.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def open(cls, site: SiteConfig, config_path: Path) -> AuditLog:
        path = site.audit_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_NONBLOCK: a FIFO without a reader fails instead of hanging the gateway
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            raise cls._refusal(path, config_path, exc.strerror or str(exc)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise cls._refusal(path, config_path, "not a regular file")
        return cls(path, fd)

    @staticmethod
    def _refusal(path: Path, config_path: Path, why: str) -> GatewayError:
        return GatewayError(
            ErrorCode.CONFIG_ERROR,
            f"cannot append to the audit log {path} ({why}); the gateway acts only on calls it "
            f"can audit. The HPC admin must make {path} a file the gateway's account can "
            f"append to, or set audit_log in {config_path} to one",
        )

    def write(self, entry: dict[str, Any]) -> None:
        """Append one line. A failure now (the call already acted) is reported on stderr."""
        try:
            os.write(self._fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        except OSError as exc:
            print(f"omeflow-gateway: cannot write audit log {self.path}: {exc}", file=sys.stderr)
        finally:
            os.close(self._fd)


def handle(
    verb: str | None, body: bytes, config_path: Path, caller: str | None = None
) -> tuple[dict[str, Any], int]:
    """Process one call of ``caller`` (None: :data:`~hpc_jobs.protocol.DEFAULT_CALLER`);
    returns (reply object, exit status). Never raises."""
    started = time.time()
    site: SiteConfig | None = None
    audit: AuditLog | None = None
    gateway: Gateway | None = None
    entry: dict[str, Any] = {
        "time": round(started, 3),
        "verb": verb if verb in VERBS else "?",
        "caller": DEFAULT_CALLER if caller is None else "?",
        "client": (os.environ.get("SSH_CONNECTION") or "local").split(" ")[0],
        "user": os.environ.get("USER") or os.environ.get("LOGNAME") or "",
        "bytes": len(body),
    }
    try:
        site = SiteConfig.load(config_path)
        audit = AuditLog.open(site, config_path)
        if caller is not None:
            try:
                entry["caller"] = validate_caller(caller)
            except ValueError as exc:
                raise GatewayError(
                    ErrorCode.CONFIG_ERROR,
                    f"the forced command's --caller is invalid: {exc}; the HPC admin must fix "
                    "this key's line in authorized_keys (omeflow keys create writes it)",
                ) from None
        if verb is None or verb not in VERBS:
            raise GatewayError(
                ErrorCode.BAD_VERB,
                "this key runs the omeflow gateway only; the command must be exactly one of: "
                + ", ".join(VERBS),
            )
        request = validate_request(verb, parse_body(body))
        for field in ("job_key", "job_id", "step", "by"):
            if getattr(request, field, None) is not None:
                entry[field] = getattr(request, field)
        if isinstance(request, StatusRequest):
            entry["jobs"] = len(request.job_ids)
        gateway = Gateway(site, config_path, caller=entry["caller"])
        reply = getattr(gateway, verb)(request)
        entry.update(ok=True)
        status = 0
        out = reply.model_dump(mode="json")
    except GatewayError as exc:
        entry.update(ok=False, code=exc.code.value)
        out = exc.reply().model_dump(mode="json")
        status = 2
    except JobDirError as exc:
        entry.update(ok=False, code=ErrorCode.NOT_FOUND.value)
        out = GatewayError(ErrorCode.NOT_FOUND, str(exc)).reply().model_dump(mode="json")
        status = 2
    except Exception:  # noqa: BLE001 - the caller gets a JSON error, the admin the traceback
        entry.update(ok=False, code=ErrorCode.INTERNAL.value, trace=traceback.format_exc()[-2000:])
        out = (
            GatewayError(ErrorCode.INTERNAL, "internal gateway error; the HPC admin can find "
                         "the traceback in the gateway audit log")
            .reply()
            .model_dump(mode="json")
        )
        status = 3
    if gateway is not None and gateway.retired:
        entry["secrets_retired"] = gateway.retired  # job id -> session outcome, never a key
    entry["ms"] = round((time.time() - started) * 1000, 1)
    if audit is not None:
        audit.write(entry)
    return out, status


class _ArgvError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage: the forced command's argv is the HPC
    admin's, and even its mistakes get one JSON error on stdout."""

    def error(self, message: str) -> NoReturn:
        raise _ArgvError(message)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (the forced command)."""
    parser = _Parser(prog="omeflow-gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="site configuration (TOML)")
    parser.add_argument(
        "--caller", default=None,
        help=f"OMERO user this key belongs to (default: {DEFAULT_CALLER!r}, the embedded "
        "default); jobs are visible to their caller only",
    )
    try:
        args = parser.parse_args(argv)
    except _ArgvError as exc:
        reply = GatewayError(
            ErrorCode.CONFIG_ERROR,
            f"the forced command line is invalid ({exc}); the HPC admin must fix this key's "
            "line in authorized_keys: omeflow-gateway --config SITE.toml [--caller OMERO_USER]",
        ).reply().model_dump(mode="json")
        sys.stdout.write(json.dumps(reply) + "\n")
        return 2
    body = sys.stdin.buffer.read(MAX_BODY_BYTES + 1) if not sys.stdin.closed else b""
    reply, status = handle(os.environ.get("SSH_ORIGINAL_COMMAND"), body, args.config, args.caller)
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
