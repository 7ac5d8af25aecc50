"""``omeflow-gateway``: the one program the orchestrator's SSH key may run.

Installed in ``authorized_keys`` as::

    command="/opt/omeflow/venv/bin/omeflow-gateway --config /etc/omeflow/site.toml",restrict,
        from="10.0.0.5",expiry-time="20270101" ssh-ed25519 AAAA... omeflow:alice

sshd runs it for every connection with the client's command line in ``SSH_ORIGINAL_COMMAND``.
That command line must be exactly one verb (:data:`hpc_jobs.protocol.VERBS`); the request is a
JSON object on stdin (at most :data:`~hpc_jobs.protocol.MAX_BODY_BYTES`), validated strictly
against the verb's model and, for ``submit``, the step's own params model. The reply is one JSON
object on stdout; a refusal exits non-zero with an :class:`~hpc_jobs.protocol.ErrorReply`.

Nothing received is ever given to a shell, evaluated, or used as a path without validation:
job ids are restricted identifiers mapped to ``<job_root>/<job_id>``, output names are single
path components opened without following links. Secrets (OMERO session keys) go to a 0600 file
in the job directory and nowhere else. Every call appends one line to the audit log.

For the embedded default (no SSH), the Airflow side runs this same program as a subprocess
with ``SSH_ORIGINAL_COMMAND`` set, so both transports exercise identical code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from hpc_jobs import __version__
from hpc_jobs.config import SiteConfig
from hpc_jobs.jobdir import JobDir, JobDirError
from hpc_jobs.protocol import (
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
    ResultReply,
    ResultRequest,
    StatusReply,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
)
from hpc_jobs.registry import STEPS, get_step
from hpc_jobs.schedulers.base import JobSpec, Scheduler, SchedulerError, get_scheduler


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
    """Carries out one validated request against the site's scheduler and job root."""

    def __init__(self, site: SiteConfig, config_path: Path, scheduler: Scheduler | None = None):
        self.site = site
        self.config_path = config_path
        self._scheduler = scheduler

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
            "params": params.model_dump(mode="json"),
            "resources": resources.model_dump(mode="json"),
            "site_config": str(self.config_path.resolve()),
        }
        with job.locked():
            existing = job.read_job_record()
            if existing is None and job.request_path.exists():
                # A previous submit died between creating the dir and recording the job id:
                # reattach if the scheduler knows the job, else start over.
                native = self.scheduler.find_by_name(req.job_key)
                if native is not None:
                    existing = job.write_job_record(record, native, self.site.scheduler)
            if existing is not None:
                if existing["fingerprint"] != job.fingerprint(record):
                    raise GatewayError(
                        ErrorCode.CONFLICT,
                        f"job key {req.job_key!r} was already used for a different request; "
                        "use a new key (Airflow derives one per task try)",
                    )
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
            except SchedulerError as exc:
                job.discard()
                raise GatewayError(ErrorCode.SCHEDULER_ERROR, f"submit failed: {exc}") from None
            job.write_job_record(record, native, self.site.scheduler)
        return SubmitReply(
            job_id=req.job_key, native_id=native, created=True, state=JobState.PENDING
        )

    def status(self, req: StatusRequest) -> StatusReply:
        return StatusReply(jobs=self._status_of(req.job_ids))

    def cancel(self, req: CancelRequest) -> CancelReply:
        job = self.job(req.job_id)
        record = self._record(job)
        current = self._status_of([req.job_id])[0]
        if not current.state.terminal:
            try:
                self.scheduler.cancel(record["native_id"])
            except SchedulerError as exc:
                raise GatewayError(ErrorCode.SCHEDULER_ERROR, f"cancel failed: {exc}") from None
            current = self._status_of([req.job_id])[0]
            if not current.state.terminal:
                current = current.model_copy(update={"state": JobState.CANCELLED})
        return CancelReply(job_id=req.job_id, state=current.state)

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
    def _record(self, job: JobDir) -> dict[str, Any]:
        record = job.read_job_record()
        if record is None:
            raise GatewayError(ErrorCode.NOT_FOUND, f"no job with id {job.job_id!r}")
        return record

    def _status_of(self, job_ids: list[str]) -> list[JobStatus]:
        records: dict[str, dict[str, Any] | None] = {}
        for job_id in job_ids:
            records[job_id] = self.job(job_id).read_job_record()
        natives = [r["native_id"] for r in records.values() if r]
        try:
            found = self.scheduler.status(natives) if natives else {}
        except SchedulerError as exc:
            raise GatewayError(ErrorCode.SCHEDULER_ERROR, f"status failed: {exc}") from None
        out: list[JobStatus] = []
        for job_id, record in records.items():
            if record is None:
                out.append(JobStatus(job_id=job_id, state=JobState.UNKNOWN, reason="no such job"))
                continue
            native_id = record["native_id"]
            ns = found.get(native_id)
            if ns is None:
                # The scheduler forgot the job (accounting off, past MinJobAge): the job's own
                # exit marker is the last word.
                marker = self.job(job_id).read_exit_marker()
                if marker is not None:
                    code = int(marker.get("exit_code", 1))
                    state = JobState.COMPLETED if code == 0 else JobState.FAILED
                    out.append(
                        JobStatus(
                            job_id=job_id, native_id=native_id, state=state, exit_code=code,
                            reason="from the job's exit marker", elapsed_s=marker.get("elapsed_s"),
                        )
                    )
                else:
                    out.append(
                        JobStatus(
                            job_id=job_id, native_id=native_id, state=JobState.UNKNOWN,
                            reason="the scheduler no longer knows this job",
                        )
                    )
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
                )
            )
        return out


def _audit(site: SiteConfig | None, entry: dict[str, Any]) -> None:
    """Append one JSON line per call. Never the request body."""
    if site is None:
        return
    try:
        path = site.audit_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    except OSError as exc:  # auditing must not turn a good call into a failure
        print(f"omeflow-gateway: cannot write audit log: {exc}", file=sys.stderr)


def handle(verb: str | None, body: bytes, config_path: Path) -> tuple[dict[str, Any], int]:
    """Process one call; returns (reply object, exit status). Never raises."""
    started = time.time()
    site: SiteConfig | None = None
    entry: dict[str, Any] = {
        "time": round(started, 3),
        "verb": verb if verb in VERBS else "?",
        "client": (os.environ.get("SSH_CONNECTION") or "local").split(" ")[0],
        "user": os.environ.get("USER") or os.environ.get("LOGNAME") or "",
        "bytes": len(body),
    }
    site_error: GatewayError | None = None
    try:
        site = SiteConfig.load(config_path)
    except GatewayError as exc:
        site_error = exc
    try:
        if verb is None or verb not in VERBS:
            raise GatewayError(
                ErrorCode.BAD_VERB,
                "this key runs the omeflow gateway only; the command must be exactly one of: "
                + ", ".join(VERBS),
            )
        if site_error is not None:
            raise site_error
        request = validate_request(verb, parse_body(body))
        for field in ("job_key", "job_id", "step"):
            if hasattr(request, field):
                entry[field] = getattr(request, field)
        if isinstance(request, StatusRequest):
            entry["jobs"] = len(request.job_ids)
        gateway = Gateway(site, config_path)
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
    entry["ms"] = round((time.time() - started) * 1000, 1)
    _audit(site, entry)
    return out, status


def main(argv: list[str] | None = None) -> int:
    """Console entry point (the forced command)."""
    parser = argparse.ArgumentParser(prog="omeflow-gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="site configuration (TOML)")
    args = parser.parse_args(argv)
    body = sys.stdin.buffer.read(MAX_BODY_BYTES + 1) if not sys.stdin.closed else b""
    reply, status = handle(os.environ.get("SSH_ORIGINAL_COMMAND"), body, args.config)
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
