"""The contract between the orchestrator (Airflow) and the cluster (the gateway).

This is the only module both sides import. It depends on pydantic alone, so that a login
node can install ``hpc_jobs`` without Airflow and Airflow can install it without torch.

Every request is a JSON object sent on the gateway's stdin; the verb is the whole
``SSH_ORIGINAL_COMMAND``. Every reply is one JSON object on stdout: a verb's reply model on
success, :class:`ErrorReply` (and a non-zero exit status) on refusal.

Models are strict (``extra="forbid"``, no type coercion): the gateway must not guess what a
caller meant.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

PROTOCOL_VERSION = 1

#: The verbs the gateway understands. ``SSH_ORIGINAL_COMMAND`` must be exactly one of them.
VERBS: tuple[str, ...] = ("ping", "submit", "status", "cancel", "log", "result", "queue")

#: Hard cap on the request body (stdin). Larger bodies are refused before parsing.
MAX_BODY_BYTES = 256 * 1024

#: Most job ids one ``status`` call may ask about.
MAX_STATUS_IDS = 2000

#: Most bytes one ``log`` or ``result`` call returns.
MAX_CHUNK_BYTES = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# Identifiers. All ASCII, no path separators, no leading dot or dash: safe as a directory name,
# safe as an argv element, safe in a Slurm job name.
# ---------------------------------------------------------------------------------------------
_SAFE = r"[A-Za-z0-9][A-Za-z0-9_.=-]*"

#: A job key names one attempt of one task: dag / run / task / map index / try, flattened.
#: It doubles as the job id of the protocol (one job directory per key).
JobKey = Annotated[
    str,
    StringConstraints(pattern=rf"^{_SAFE}$", min_length=1, max_length=160, strict=True),
]
#: A registered step name (``cluster_check``, ``export_zarr`` ...).
StepName = Annotated[
    str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$", min_length=1, strict=True)
]
#: A file name inside a job's ``outputs/`` folder (one level, no traversal).
OutputName = Annotated[
    str, StringConstraints(pattern=rf"^{_SAFE}$", min_length=1, max_length=128, strict=True)
]
#: A Slurm partition / account / qos name.
SlurmName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$", strict=True)
]
#: An OMERO session key (a UUID in practice).
SessionKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]{8,128}$", strict=True)]

_ARRAY_RE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?(?:%([0-9]{1,4}))?")


def array_indices(spec: str) -> range:
    """The task indices of an :data:`ArraySpec` (``"0-15%4"`` -> 0..15; the ``%`` part only
    limits how many run at once). Raises ``ValueError`` naming the fix for a reversed range
    (``5-1``) or a zero limit (``0-3%0``)."""
    m = _ARRAY_RE.fullmatch(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(
            f"array spec {spec!r} is not FIRST[-LAST][%LIMIT] (digits only), e.g. 0-15 or 0-63%8"
        )
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo:
        raise ValueError(
            f"array spec {spec!r} counts down: the first index must not exceed the last "
            f"(write {hi}-{lo})"
        )
    if m.group(3) is not None and int(m.group(3)) == 0:
        raise ValueError(
            f"array spec {spec!r} lets no task run at once: the %LIMIT must be at least 1"
        )
    return range(lo, hi + 1)


def _valid_array_spec(spec: str) -> str:
    array_indices(spec)
    return spec


#: A Slurm array spec such as ``0-15`` or ``0-63%8`` (first <= last, limit >= 1).
ArraySpec = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9]{1,5}(-[0-9]{1,5})?(%[0-9]{1,4})?$", strict=True),
    AfterValidator(_valid_array_spec),
]

#: Exit status of a job that failed for a reason that passes by itself (an OMERO pyramid still
#: being built, the image locked by another run): ``EX_TEMPFAIL`` from sysexits.h. The Airflow
#: side turns FAILED with this code into a retryable task failure.
EXIT_RETRY_LATER = 75

#: The same safe-name rule for code outside pydantic (job directories, output files).
SAFE_NAME_RE = re.compile(_SAFE)

#: Who calls the gateway: the OMERO user a key belongs to, put on the forced command line by
#: the HPC admin (``omeflow-gateway --config site.toml --caller alice``; ``omeflow keys``
#: writes it). Jobs belong to their caller: other callers' jobs look like missing ones.
CALLER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

#: The caller of a gateway started without ``--caller``: the embedded default (local
#: transport) and single-tenant sites whose one service key has no ``--caller``. Reserved: no
#: key may name it explicitly, so no per-user key can reach the default caller's jobs. Job
#: records written before callers existed belong to it.
DEFAULT_CALLER = "local"


def validate_caller(name: object) -> str:
    """A ``--caller`` value: an OMERO user name (``CALLER_RE``), never :data:`DEFAULT_CALLER`.

    Raises ``ValueError`` naming the rule.
    """
    if not isinstance(name, str) or CALLER_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid caller {name!r}: use the OMERO user name, 1-64 characters from "
            "A-Z a-z 0-9 _ . @ -, starting with a letter or digit"
        )
    if name == DEFAULT_CALLER:
        raise ValueError(
            f"caller {DEFAULT_CALLER!r} is reserved for gateways started without --caller (the "
            "embedded default, a single service key), so no key can reach their jobs; a key's "
            "--caller must name another user"
        )
    return name


def job_key_for(*parts: object, max_length: int = 160) -> str:
    """Flatten arbitrary parts (dag id, run id, task id, map index, try) into a :data:`JobKey`.

    Characters outside the safe set become ``_``; a short hash of the original parts keeps two
    different inputs from colliding after that flattening.
    """
    import hashlib

    raw = "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(raw.encode()).hexdigest()[:10]
    flat = re.sub(r"[^A-Za-z0-9_.=-]+", "_", ".".join(str(p) for p in parts)).strip("._-=")
    key = f"{flat[: max_length - 12]}.{digest}" if flat else digest
    if not SAFE_NAME_RE.fullmatch(key):  # e.g. empty after stripping
        key = f"k{digest}"
    return key


class _Strict(BaseModel):
    """Unknown fields are refused. The gateway validates requests with ``strict=True`` (no
    coercion); replies are parsed from JSON by the Airflow side, where enums arrive as text."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Job states
# ---------------------------------------------------------------------------------------------
# (str, Enum), not StrEnum: the cluster side also runs on Python 3.10 (OMERO's zeroc-ice)
class JobState(str, enum.Enum):  # noqa: UP042
    """Every Slurm job state, plus UNKNOWN (the scheduler no longer knows the job)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    REQUEUED = "REQUEUED"
    SUSPENDED = "SUSPENDED"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        """True when the job will not change state again by itself."""
        return self in _TERMINAL

    @property
    def retryable(self) -> bool:
        """True for terminal states caused by the cluster, not the job: worth another try."""
        return self in _RETRYABLE

    @classmethod
    def parse(cls, text: str) -> JobState:
        """Map a scheduler's state word to a :class:`JobState`.

        Accepts Slurm's long names (``CANCELLED by 1000``, ``OUT_OF_MEMORY``), its compact
        codes (``PD``, ``R``, ``CD``, ``OOM`` ...) and in-between states (``COMPLETING``,
        ``CONFIGURING``, ``RESIZING``, ``STOPPED`` ...). Unknown words map to UNKNOWN.
        """
        word = (text or "").strip().upper()
        word = word.split()[0] if word else ""
        word = word.rstrip("+")
        if word in cls.__members__:
            return cls[word]
        return _ALIASES.get(word, cls.UNKNOWN)


_TERMINAL = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.TIMEOUT,
        JobState.CANCELLED,
        JobState.OUT_OF_MEMORY,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
    }
)
_RETRYABLE = frozenset({JobState.PREEMPTED, JobState.NODE_FAIL, JobState.BOOT_FAIL})
_ALIASES: dict[str, JobState] = {
    "PD": JobState.PENDING,
    "R": JobState.RUNNING,
    "CG": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "CF": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "RS": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SO": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "SI": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "RD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "RF": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RH": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RQ": JobState.REQUEUED,
    "RV": JobState.PENDING,
    "REVOKED": JobState.CANCELLED,
    "ST": JobState.SUSPENDED,
    "STOPPED": JobState.SUSPENDED,
    "S": JobState.SUSPENDED,
    "CD": JobState.COMPLETED,
    "F": JobState.FAILED,
    "TO": JobState.TIMEOUT,
    "CA": JobState.CANCELLED,
    "OOM": JobState.OUT_OF_MEMORY,
    "NF": JobState.NODE_FAIL,
    "PR": JobState.PREEMPTED,
    "BF": JobState.BOOT_FAIL,
    "DL": JobState.DEADLINE,
    "SE": JobState.REQUEUED,
    "SPECIAL_EXIT": JobState.REQUEUED,
}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class ErrorCode(str, enum.Enum):  # noqa: UP042
    """Why the gateway refused or failed a call."""

    BAD_VERB = "BAD_VERB"  # SSH_ORIGINAL_COMMAND is not exactly one known verb
    BODY_TOO_LARGE = "BODY_TOO_LARGE"
    BAD_JSON = "BAD_JSON"
    BAD_REQUEST = "BAD_REQUEST"  # JSON does not match the verb's request model
    UNKNOWN_STEP = "UNKNOWN_STEP"
    BAD_PARAMS = "BAD_PARAMS"  # the step's own params model refused the params
    NOT_FOUND = "NOT_FOUND"  # no such job / output file
    CONFLICT = "CONFLICT"  # same job key, different request
    SCHEDULER_ERROR = "SCHEDULER_ERROR"
    #: the scheduler did not answer in time and may or may not hold the job: the caller must
    #: submit again with the SAME job key (it reattaches if the job exists, else submits once)
    RETRY_SAME_KEY = "RETRY_SAME_KEY"
    CONFIG_ERROR = "CONFIG_ERROR"  # the site configuration is broken (an admin's fix)
    INTERNAL = "INTERNAL"


class ErrorInfo(_Strict):
    code: ErrorCode
    message: str
    #: Field-level details (pydantic's ``loc``/``msg``), never the offending value itself.
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorReply(_Strict):
    ok: Literal[False] = False
    error: ErrorInfo


class GatewayError(Exception):
    """Raised by gateway code to refuse a call with a clear, JSON-serialisable reason."""

    def __init__(
        self, code: ErrorCode, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []

    def reply(self) -> ErrorReply:
        return ErrorReply(
            error=ErrorInfo(code=self.code, message=self.message, details=self.details)
        )


# ---------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------
class Resources(_Strict):
    """What one job asks the scheduler for. Every field is bounded."""

    cpus: int = Field(default=1, ge=1, le=512)
    mem_mb: int = Field(default=2048, ge=64, le=4_000_000)
    time_min: int = Field(default=60, ge=1, le=10_080)
    gpus: int = Field(default=0, ge=0, le=16)
    partition: SlurmName | None = None
    array: ArraySpec | None = None


class ResourceOverrides(_Strict):
    """Per-call overrides of a step's default :class:`Resources` (``None`` = keep default)."""

    cpus: int | None = Field(default=None, ge=1, le=512)
    mem_mb: int | None = Field(default=None, ge=64, le=4_000_000)
    time_min: int | None = Field(default=None, ge=1, le=10_080)
    gpus: int | None = Field(default=None, ge=0, le=16)
    partition: SlurmName | None = None
    array: ArraySpec | None = None

    def apply(self, base: Resources) -> Resources:
        changes = {k: v for k, v in self.model_dump().items() if v is not None}
        return base.model_copy(update=changes)


class Secrets(_Strict):
    """Secrets a job needs. Written to a 0600 file in the job directory, nowhere else."""

    omero_session_key: SessionKey | None = None


# ---------------------------------------------------------------------------------------------
# Requests and replies, one pair per verb
# ---------------------------------------------------------------------------------------------
class PingRequest(_Strict):
    pass


class PingReply(_Strict):
    ok: Literal[True] = True
    protocol: int = PROTOCOL_VERSION
    version: str
    scheduler: str
    steps: list[str]
    server_time: float


class SubmitRequest(_Strict):
    step: StepName
    job_key: JobKey
    #: Validated by the step's own params model on the cluster side.
    params: dict[str, Any] = Field(default_factory=dict)
    resources: ResourceOverrides = Field(default_factory=ResourceOverrides)
    secrets: Secrets = Field(default_factory=Secrets)


class SubmitReply(_Strict):
    ok: Literal[True] = True
    job_id: JobKey
    #: The scheduler's own id (Slurm job id, or local pid-based id).
    native_id: str
    #: False when the job key already existed: the existing job is returned, nothing resubmitted.
    created: bool
    state: JobState


class StatusRequest(_Strict):
    job_ids: list[JobKey] = Field(min_length=1, max_length=MAX_STATUS_IDS)


#: A short unit name in a progress line ("tiles", "blocks", "epochs", "crops").
ProgressUnit = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_ ]{0,31}$", strict=True)]


class Progress(_Strict):
    """The latest line of a job's progress file (``progress.jsonl``, or
    ``progress.<task>.jsonl`` for an array task), as the gateway read it.

    Steps append one JSON line per change; the gateway reads only the file's last line (by
    byte offset from the end), never the whole file.
    """

    done: int = Field(ge=0)
    #: None while the step does not know the total yet.
    total: int | None = Field(default=None, ge=0)
    unit: ProgressUnit = "items"
    #: What the step is doing now, for people ("segmenting", "merging"); at most 200 chars.
    message: str | None = Field(default=None, max_length=200)
    #: Unix time the line was written (the job's clock).
    time: float | None = None


class JobStatus(_Strict):
    job_id: JobKey
    native_id: str | None = None
    state: JobState
    exit_code: int | None = None
    #: Scheduler's reason / node list / signal, for people.
    reason: str | None = None
    #: Seconds the job ran (for arrays: the longest task).
    elapsed_s: float | None = None
    #: For array jobs: state counts over tasks.
    array_states: dict[str, int] | None = None
    #: Latest progress of the job (for an array: summed over tasks, see ``array_progress``).
    progress: Progress | None = None
    #: For array jobs: the latest progress of each task that reported one, by task index.
    array_progress: dict[str, Progress] | None = None
    #: Node(s) the job ran / runs on (Slurm's NodeList), for people.
    node: str | None = None
    #: The job's time limit in seconds, as the scheduler granted it.
    time_limit_s: float | None = None
    #: Peak resident memory in MiB (Slurm accounting's MaxRSS; for arrays: the largest task).
    max_rss_mb: float | None = None


#: Slurm pending reasons that mean the job will never start as submitted (it asks for more
#: than the partition has, or for an account/QOS it may not use). Waiting on them is pointless.
NEVER_STARTS_REASONS: tuple[str, ...] = (
    "PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit",
    "InvalidAccount", "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed",
    "DependencyNeverSatisfied",
)


def never_starts(status: JobStatus) -> bool:
    """True for a PENDING job that Slurm will never start (see :data:`NEVER_STARTS_REASONS`)."""
    reason = status.reason or ""
    return status.state is JobState.PENDING and any(r in reason for r in NEVER_STARTS_REASONS)


class StatusReply(_Strict):
    ok: Literal[True] = True
    jobs: list[JobStatus]


#: Who asked for a cancel (an Airflow user name), recorded and reported in the job's reason.
CancelledBy = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$", strict=True)
]


class CancelRequest(_Strict):
    job_id: JobKey
    #: The person who cancelled (from the Airflow UI); the status reason then says
    #: "cancelled by <by>". None for cancels by the system (timeouts, task kill).
    by: CancelledBy | None = None


class CancelReply(_Strict):
    ok: Literal[True] = True
    job_id: JobKey
    state: JobState


class LogRequest(_Strict):
    job_id: JobKey
    #: Byte offset to read from. A negative offset reads the last ``-offset`` bytes (a tail).
    offset: int = Field(default=0, ge=-MAX_CHUNK_BYTES, le=2**62)
    max_bytes: int = Field(default=64 * 1024, ge=1, le=MAX_CHUNK_BYTES)


class LogReply(_Strict):
    ok: Literal[True] = True
    job_id: JobKey
    offset: int
    next_offset: int
    size: int
    text: str


class ResultRequest(_Strict):
    """One small file from the job's ``outputs/``.

    For an array job without its own ``summary.json`` (array tasks write
    ``summary.<task>.json``), ``summary.json`` is answered with the task summaries gathered
    into ``{"array_tasks": {"0": {...}, "1": {...}}}`` once every task has written one; while
    some are missing the reply is NOT_FOUND naming them.
    """

    job_id: JobKey
    name: OutputName = "summary.json"


class ResultReply(_Strict):
    ok: Literal[True] = True
    job_id: JobKey
    name: str
    #: Parsed JSON when the file is JSON, else None and ``text`` holds the content.
    data: Any = None
    text: str | None = None


class QueueRequest(_Strict):
    """The scheduler's queue for this caller: its jobs that are pending or running."""


class QueueEntry(_Strict):
    #: The job key (the scheduler's job name); None for a job omeflow did not submit.
    job_id: JobKey | None = None
    native_id: str
    state: JobState
    reason: str | None = None
    node: str | None = None
    partition: str | None = None
    elapsed_s: float | None = None
    time_limit_s: float | None = None
    #: Unix time the job was submitted.
    submitted_at: float | None = None


class QueueReply(_Strict):
    ok: Literal[True] = True
    scheduler: str
    jobs: list[QueueEntry]


REQUEST_MODELS: dict[str, type[_Strict]] = {
    "ping": PingRequest,
    "submit": SubmitRequest,
    "status": StatusRequest,
    "cancel": CancelRequest,
    "log": LogRequest,
    "result": ResultRequest,
    "queue": QueueRequest,
}
REPLY_MODELS: dict[str, type[_Strict]] = {
    "ping": PingReply,
    "submit": SubmitReply,
    "status": StatusReply,
    "cancel": CancelReply,
    "log": LogReply,
    "result": ResultReply,
    "queue": QueueReply,
}
