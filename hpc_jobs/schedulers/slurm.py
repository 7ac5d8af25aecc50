"""Slurm through its command-line tools: sbatch, squeue, sacct or scontrol, scancel.

Every call is an argv list with a timeout and an explicit, minimal environment
(:func:`~hpc_jobs.schedulers.base.scheduler_env`; never a shell). ``status`` for any number of jobs
costs one ``squeue`` call (the caller's own live jobs: state, node, elapsed, time limit) plus,
for jobs squeue no longer lists (or arrays, to count finished tasks), one ``sacct`` call when
accounting is on (final state, exit code, elapsed, node, time limit and MaxRSS from the batch
step), else one ``scontrol show job -o``. ``queue`` is one ``squeue`` call. Parsing lives in
pure functions so it is tested on real output captured from the sandbox (tests/data/slurm/).
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import JobState, Resources
from hpc_jobs.schedulers.base import (
    JobSpec,
    NativeStatus,
    QueuedJob,
    SchedulerError,
    SchedulerTimeout,
    scheduler_env,
)

#: squeue output: one line per job / array task (``-r``), ``|``-separated; name last.
#: id, array job id, array task id, state, reason, elapsed, time limit, nodes, name.
SQUEUE_FORMAT = "%i|%F|%K|%T|%r|%M|%l|%N|%j"
#: ``queue``: id (``123_[4-7]`` for pending array tasks), state, reason, nodes, partition,
#: elapsed, time limit, submit time, name (last: the only free-text field).
QUEUE_FORMAT = "%i|%T|%r|%N|%P|%M|%l|%V|%j"
#: sacct fields (``--parsable2`` = ``|``-separated, no trailing ``|``). Allocation lines carry
#: state, exit code, elapsed, nodes and time limit; MaxRSS is only on step lines (``.batch``).
SACCT_FIELDS = "JobID,JobName,State,ExitCode,Elapsed,NodeList,Reason,Timelimit,MaxRSS"
#: What Slurm's controller gives as the reason of these final states; sacct keeps no reason
#: for finished jobs ("None"), so the same words are filled in from the state.
_FINAL_REASONS = {
    JobState.FAILED: "NonZeroExitCode",
    JobState.TIMEOUT: "TimeLimit",
    JobState.OUT_OF_MEMORY: "OutOfMemory",
}

Runner = Callable[..., subprocess.CompletedProcess]

#: Order of "worst" terminal state when an array's tasks ended differently: failures caused
#: by the job itself first (retrying will not help), then cancellation, then cluster faults.
_SEVERITY = (
    JobState.FAILED,
    JobState.OUT_OF_MEMORY,
    JobState.TIMEOUT,
    JobState.DEADLINE,
    JobState.CANCELLED,
    JobState.NODE_FAIL,
    JobState.BOOT_FAIL,
    JobState.PREEMPTED,
)
#: Order of live states: the aggregate of an array with any running task is RUNNING.
_LIVE_ORDER = (JobState.RUNNING, JobState.SUSPENDED, JobState.REQUEUED, JobState.PENDING)


# ---------------------------------------------------------------------------------------------
# Pure parsing
# ---------------------------------------------------------------------------------------------
@dataclass
class TaskRecord:
    """One job, one array task, or one still-pending range of array tasks."""

    job_id: str  # the id callers know: the array job id for array tasks
    state: JobState
    raw_state: str = ""
    task_id: str | None = None  # "3", or a range "4-7%2" for pending tasks
    exit_code: int | None = None
    signal: int | None = None
    elapsed_s: float | None = None
    reason: str | None = None
    nodes: str | None = None
    name: str | None = None
    count: int = 1  # tasks this record stands for
    time_limit_s: float | None = None
    max_rss_mb: float | None = None  # from the job's steps (sacct only)

    @property
    def is_array(self) -> bool:
        return self.task_id is not None


def parse_duration(text: str) -> float | None:
    """``[D-][HH:]MM:SS`` (squeue/sacct/scontrol) -> seconds; None for empty/INVALID/N/A."""
    text = (text or "").strip()
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)(?:\.\d+)?", text)
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def parse_memory_mb(text: str) -> float | None:
    """sacct's ``212960K`` / ``1.50G`` / ``0`` (units of 1024; bare = bytes) -> MiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]?)", (text or "").strip())
    if not m:
        return None
    power = {"": -2, "K": -1, "M": 0, "G": 1, "T": 2, "P": 3}[m.group(2)]
    return float(m.group(1)) * 1024.0**power


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """``"1:0"`` -> (1, 0): (exit status, signal)."""
    m = re.fullmatch(r"(\d+):(\d+)", (text or "").strip())
    if not m:
        return None, None
    return int(m.group(1)), int(m.group(2))


def count_tasks(spec: str) -> int:
    """Number of tasks in an array index spec: ``"3"``, ``"2-7"``, ``"1,4-6%2"`` -> 1, 6, 4."""
    spec = spec.strip().strip("[]").split("%")[0]
    total = 0
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?(?::(\d+))?", part)
        if not m:
            return 1
        lo, hi, step = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3) or 1)
        total += len(range(lo, hi + 1, step))
    return max(total, 1)


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return None if value in ("", "None", "(null)", "N/A", "n/a") else value


def _squeue_rows(text: str) -> list[list[str]]:
    """The 9 ``|``-separated fields of each non-empty line of squeue output (both formats end
    with the job name, which may itself contain ``|``)."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", 8)
        if len(parts) != 9:
            raise SchedulerError(f"unexpected squeue line (format changed?): {line!r}")
        rows.append(parts)
    return rows


def parse_squeue(text: str) -> list[TaskRecord]:
    """Parse ``squeue -h -r -o SQUEUE_FORMAT`` output."""
    records = []
    for jobid, array_job, task, state, reason, used, limit, nodes, name in _squeue_rows(text):
        is_array = _clean(task) is not None
        records.append(
            TaskRecord(
                job_id=array_job if is_array else jobid.split("_")[0],
                state=JobState.parse(state),
                raw_state=state,
                task_id=task if is_array else None,
                elapsed_s=parse_duration(used),
                reason=_clean(reason),
                nodes=_clean(nodes),
                name=name,
                count=count_tasks(task) if is_array else 1,
                time_limit_s=parse_duration(limit),
            )
        )
    return records


def parse_sacct(text: str) -> list[TaskRecord]:
    """Parse ``sacct --parsable2 --noheader -o SACCT_FIELDS`` output.

    Job ids look like ``123``, ``123_4`` (an array task) or ``123_[5-7]`` (pending tasks);
    step lines (``123.batch``, ``123_4.batch``) are not jobs: their MaxRSS becomes the
    job's (the largest step's), and the batch step's exit code or signal becomes the job's
    when the job ended badly but its own line says ``0:0`` (slurmdbd records a job killed at
    its time limit as ``TIMEOUT 0:0``, its batch step as ``CANCELLED 0:15``).
    """
    records: dict[str, TaskRecord] = {}
    step_rss: dict[str, float] = {}
    batch_exit: dict[str, tuple[int | None, int | None]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 9:
            raise SchedulerError(f"unexpected sacct line (format changed?): {line!r}")
        jobid, name, state_text, exit_code, elapsed, nodes, reason, limit, rss = parts
        if "." in jobid:
            owner = jobid.split(".", 1)[0]
            mb = parse_memory_mb(rss)
            if mb is not None:
                step_rss[owner] = max(mb, step_rss.get(owner, 0.0))
            if jobid.endswith(".batch"):
                batch_exit[owner] = parse_exit_code(exit_code)
            continue
        base, _, task = jobid.partition("_")
        code, sig = parse_exit_code(exit_code)
        state = JobState.parse(state_text)
        records[jobid] = TaskRecord(
            job_id=base,
            state=state,
            raw_state=state_text,
            task_id=task.strip("[]") or None,
            exit_code=code,
            signal=sig,
            elapsed_s=parse_duration(elapsed),
            reason=_clean(reason) or _FINAL_REASONS.get(state),
            nodes=_clean(nodes) if _clean(nodes) != "None assigned" else None,
            name=name,
            count=count_tasks(task) if task else 1,
            time_limit_s=parse_duration(limit),
        )
    for jobid, mb in step_rss.items():
        if jobid in records:
            records[jobid].max_rss_mb = mb
    for jobid, (code, sig) in batch_exit.items():
        rec = records.get(jobid)
        if (
            rec is not None and rec.state.terminal and rec.state != JobState.COMPLETED
            and (rec.exit_code, rec.signal) == (0, 0) and (code or sig)
        ):
            rec.exit_code, rec.signal = code, sig
    return list(records.values())


def _scontrol_fields(line: str) -> dict[str, str]:
    """``Key=value Key2=value with spaces`` -> dict (a token without ``=`` extends the value)."""
    fields: dict[str, str] = {}
    key = None
    for token in line.split(" "):
        if not token:
            continue
        k, eq, v = token.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9_/:]*", k):
            key = k
            fields[key] = v
        elif key is not None:
            fields[key] += " " + token
    return fields


def parse_scontrol(text: str) -> list[TaskRecord]:
    """Parse ``scontrol show job -o`` output (one job or array-task record per line)."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("JobId="):
            continue  # "No jobs in the system" and the like
        f = _scontrol_fields(line)
        task = _clean(f.get("ArrayTaskId"))
        code, sig = parse_exit_code(f.get("ExitCode", ""))
        records.append(
            TaskRecord(
                job_id=f.get("ArrayJobId") if task else f["JobId"],
                state=JobState.parse(f.get("JobState", "")),
                raw_state=f.get("JobState", ""),
                task_id=task,
                exit_code=code,
                signal=sig,
                elapsed_s=parse_duration(f.get("RunTime", "")),
                reason=_clean(f.get("Reason")),
                nodes=_clean(f.get("NodeList")),
                name=f.get("JobName"),
                count=count_tasks(task) if task else 1,
                time_limit_s=parse_duration(f.get("TimeLimit", "")),
            )
        )
    return records


def _exit_code(rec: TaskRecord) -> int | None:
    if rec.signal:
        return 128 + rec.signal
    return rec.exit_code


def _reason(rec: TaskRecord) -> str | None:
    bits = []
    if rec.reason:
        bits.append(rec.reason)
    if rec.signal:
        bits.append(f"signal {rec.signal}")
    return ", ".join(bits) or None


def _nodes(recs: Iterable[TaskRecord]) -> str | None:
    """The distinct node lists of some records, in order, comma-joined."""
    seen = dict.fromkeys(r.nodes for r in recs if r.nodes)
    return ",".join(seen) or None


def _largest(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def aggregate(records: Iterable[TaskRecord]) -> dict[str, NativeStatus]:
    """Fold task records into one :class:`NativeStatus` per job id.

    Plain jobs map directly. Arrays: any live task -> the most active live state; else all
    COMPLETED -> COMPLETED; else the worst failure (see ``_SEVERITY``). ``array_states``
    counts tasks per state; ``elapsed_s``, ``time_limit_s`` and ``max_rss_mb`` are the largest
    over tasks; ``node`` lists every node a task ran on; ``exit_code`` comes from the task that
    decided the state.
    """
    by_id: dict[str, list[TaskRecord]] = {}
    for rec in records:
        by_id.setdefault(rec.job_id, []).append(rec)
    out: dict[str, NativeStatus] = {}
    for job_id, recs in by_id.items():
        if not any(r.is_array for r in recs):
            rec = recs[-1]
            out[job_id] = NativeStatus(
                state=rec.state,
                exit_code=_exit_code(rec) if rec.state.terminal else None,
                reason=_reason(rec),
                elapsed_s=rec.elapsed_s,
                node=rec.nodes,
                time_limit_s=rec.time_limit_s,
                max_rss_mb=rec.max_rss_mb,
            )
            continue
        counts: dict[str, int] = {}
        for r in recs:
            counts[r.state.value] = counts.get(r.state.value, 0) + r.count
        states = {r.state for r in recs}
        live = [s for s in _LIVE_ORDER if s in states]
        if live:
            state = live[0]
        elif states <= {JobState.COMPLETED}:
            state = JobState.COMPLETED
        else:
            state = next((s for s in _SEVERITY if s in states), JobState.UNKNOWN)
        decider = next((r for r in recs if r.state == state), recs[0])
        elapsed = [r.elapsed_s for r in recs if r.elapsed_s is not None]
        terminal_codes = [_exit_code(r) for r in recs if r.state.terminal]
        if state == JobState.COMPLETED:
            exit_code: int | None = 0
        elif state.terminal:
            exit_code = _exit_code(decider)
        else:
            exit_code = None
        if exit_code is None and state.terminal:
            exit_code = max((c for c in terminal_codes if c is not None), default=None)
        out[job_id] = NativeStatus(
            state=state,
            exit_code=exit_code,
            reason=_reason(decider),
            elapsed_s=max(elapsed) if elapsed else None,
            array_states=counts,
            node=_nodes(recs),
            time_limit_s=_largest(r.time_limit_s for r in recs),
            max_rss_mb=_largest(r.max_rss_mb for r in recs),
        )
    return out


def parse_queue(text: str) -> list[QueuedJob]:
    """Parse ``squeue -h -o QUEUE_FORMAT`` output into :class:`QueuedJob` (one per line:
    a job, a running array task, or a range of pending array tasks)."""
    jobs = []
    for jobid, state, reason, nodes, partition, used, limit, submitted, name in _squeue_rows(
        text
    ):
        jobs.append(
            QueuedJob(
                native_id=jobid.strip(),
                name=name,
                state=JobState.parse(state),
                reason=_clean(reason),
                node=_clean(nodes),
                partition=_clean(partition),
                elapsed_s=parse_duration(used),
                time_limit_s=parse_duration(limit),
                submitted_at=parse_timestamp(submitted),
            )
        )
    return jobs


def parse_timestamp(text: str) -> float | None:
    """Slurm's ``2026-11-21T23:25:31`` (the cluster's local time) -> Unix time."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_sbatch(text: str) -> str:
    """``sbatch --parsable`` prints ``jobid`` or ``jobid;cluster``."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    job_id = first.split(";")[0].strip()
    if not re.fullmatch(r"\d+", job_id):
        raise SchedulerError(f"sbatch printed no job id: {text.strip()!r}")
    return job_id


# ---------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------
@dataclass
class SlurmScheduler:
    """:class:`~hpc_jobs.schedulers.base.Scheduler` on Slurm's command-line tools."""

    site: SiteConfig
    #: ``subprocess.run``-compatible callable (tests wrap it to count calls).
    runner: Runner = field(default=subprocess.run, repr=False)
    timeout_s: float = 60.0
    name: str = "slurm"
    _accounting: bool | None = field(default=None, init=False, repr=False)

    # -- plumbing -------------------------------------------------------------------------
    def _run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        try:
            proc = self.runner(
                list(argv), capture_output=True, text=True, timeout=self.timeout_s,
                stdin=subprocess.DEVNULL, env=scheduler_env(self.site),
            )
        except subprocess.TimeoutExpired:
            raise SchedulerTimeout(
                f"{argv[0]} did not answer within {self.timeout_s:.0f}s; is slurmctld up?"
            ) from None
        except FileNotFoundError:
            raise SchedulerError(
                f"{argv[0]} not found on PATH; install the Slurm client tools on this host"
            ) from None
        if check and proc.returncode != 0:
            raise SchedulerError(
                f"{argv[0]} failed (exit {proc.returncode}): {(proc.stderr or '').strip()}"
            )
        return proc

    @staticmethod
    def _user() -> str:
        return pwd.getpwuid(os.getuid()).pw_name

    def accounting_enabled(self) -> bool:
        """Whether sacct can answer (AccountingStorageType is not ``none``); asked once."""
        if self._accounting is None:
            proc = self._run(["scontrol", "show", "config"], check=False)
            m = re.search(r"^AccountingStorageType\s*=\s*(\S+)", proc.stdout, re.M)
            self._accounting = bool(m) and m.group(1) != "accounting_storage/none"
        return self._accounting

    # -- Scheduler ------------------------------------------------------------------------
    def sbatch_argv(self, spec: JobSpec) -> list[str]:
        """The sbatch argv for ``spec`` (public so tests and the gateway's dry runs see it)."""
        res: Resources = spec.resources
        slurm = self.site.slurm
        over = slurm.over_limits(res)
        if over:
            raise SchedulerError(
                "resources exceed this site's limits: " + ", ".join(over)
                + " (site.toml [slurm] max_*)"
            )
        home = pwd.getpwuid(os.getuid()).pw_dir
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name={spec.name}",
            f"--output={spec.log_path}",
            f"--chdir={spec.job_dir}",
            "--ntasks=1",
            f"--cpus-per-task={res.cpus}",
            f"--mem={res.mem_mb}M",
            f"--time={res.time_min}",
            # Only these variables (plus SLURM_*): nothing from the gateway's environment.
            f"--export=HOME={home},PATH=/usr/local/bin:/usr/bin:/bin,LANG=C.UTF-8",
        ]
        if res.gpus:
            argv.append(f"--gres=gpu:{res.gpus}")
        partition = res.partition or (slurm.gpu_partition if res.gpus else None) or slurm.partition
        if partition:
            argv.append(f"--partition={partition}")
        if slurm.account:
            argv.append(f"--account={slurm.account}")
        if slurm.qos:
            argv.append(f"--qos={slurm.qos}")
        if res.array:
            # Tasks share the log file: append instead of each task truncating it.
            argv += [f"--array={res.array}", "--open-mode=append"]
        argv.append(str(spec.script))
        return argv

    def submit(self, spec: JobSpec) -> str:
        """sbatch the job script; returns the Slurm job id."""
        if not os.access(spec.script, os.X_OK):
            raise SchedulerError(f"job script {spec.script} is not executable")
        return parse_sbatch(self._run(self.sbatch_argv(spec)).stdout)

    def status(self, native_ids: Sequence[str]) -> dict[str, NativeStatus]:
        """States of many jobs: one squeue call, plus one sacct (accounting on) or scontrol
        call for jobs squeue no longer lists; a second one (scontrol) only when slurmdbd has
        not caught up with a job that left squeue (see :meth:`_finished`)."""
        wanted = {str(i).split("_")[0] for i in native_ids}
        if not wanted:
            return {}
        live = [
            r for r in parse_squeue(
                self._run(["squeue", "-h", "-r", "-u", self._user(), "-o", SQUEUE_FORMAT]).stdout
            )
            if r.job_id in wanted
        ]
        live_ids = {r.job_id for r in live}
        # Finished jobs, and arrays (their finished tasks are no longer in squeue).
        need = {i for i in wanted if i not in live_ids}
        need |= {r.job_id for r in live if r.is_array}
        finished: list[TaskRecord] = []
        if need:
            finished = self._finished(sorted(need, key=int), gone=need - live_ids)
        merged = _merge(live, finished)
        return aggregate(merged)

    def _finished(self, ids: list[str], gone: set[str]) -> list[TaskRecord]:
        """Records of ``ids`` from sacct (accounting on) or ``scontrol show job``.

        slurmctld sends its records to slurmdbd asynchronously: a job that already left
        squeue (``gone``) may still be pending/running in sacct for a moment. Those are taken
        from slurmctld (scontrol, one more call) when it still knows them. Jobs neither
        knows are left out (the caller falls back on the job's own exit markers).
        """
        if not self.accounting_enabled():
            return [r for r in self._scontrol_jobs() if r.job_id in ids]
        # no -X: the .batch step lines carry MaxRSS
        proc = self._run(
            ["sacct", "--parsable2", "--noheader", f"--jobs={','.join(ids)}",
             f"--format={SACCT_FIELDS}"]
        )
        records = [r for r in parse_sacct(proc.stdout) if r.job_id in ids]
        lagging = gone & {r.job_id for r in records if not r.state.terminal}
        if not lagging:
            return records
        fresh = [r for r in self._scontrol_jobs() if r.job_id in lagging]
        replaced = {r.job_id for r in fresh}
        return [r for r in records if r.job_id not in replaced] + fresh

    def _scontrol_jobs(self) -> list[TaskRecord]:
        """Every job slurmctld still knows (``scontrol show job -o``: one call)."""
        proc = self._run(["scontrol", "show", "job", "-o"], check=False)
        if proc.returncode != 0 and "No jobs" not in (proc.stdout + proc.stderr):
            raise SchedulerError(f"scontrol show job failed: {proc.stderr.strip()}")
        return parse_scontrol(proc.stdout)

    def cancel(self, native_id: str) -> None:
        """scancel (finished or unknown jobs are not an error)."""
        if not re.fullmatch(r"\d+(_\d+)?", str(native_id)):
            raise SchedulerError(f"not a Slurm job id: {native_id!r}")
        proc = self._run(["scancel", str(native_id)], check=False)
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            raise SchedulerError(f"scancel failed (exit {proc.returncode}): {proc.stderr.strip()}")

    def queue(self) -> list[QueuedJob]:
        """This account's pending and running jobs (squeue's default states), one call."""
        proc = self._run(["squeue", "-h", "-u", self._user(), "-o", QUEUE_FORMAT])
        return parse_queue(proc.stdout)

    def find_by_name(self, name: str) -> str | None:
        """Newest job of this user with this name still known to slurmctld (any state)."""
        proc = self._run(
            ["squeue", "-h", "-u", self._user(), "--states=all", f"--name={name}", "-o", "%F"]
        )
        ids = {line.strip() for line in proc.stdout.splitlines() if line.strip().isdigit()}
        return max(ids, key=int) if ids else None


def _merge(live: list[TaskRecord], finished: list[TaskRecord]) -> list[TaskRecord]:
    """Combine squeue's live records with sacct/scontrol records.

    squeue (``-r``: one line per task) wins for every job and task it lists; from the other
    source only finished tasks of arrays squeue still shows, and whole jobs it does not show,
    are added.
    """
    live_keys = {(r.job_id, r.task_id) for r in live}
    live_jobs = {r.job_id for r in live}
    out = list(live)
    for r in finished:
        if r.job_id in live_jobs and (
            not r.is_array or not r.state.terminal or (r.job_id, r.task_id) in live_keys
        ):
            continue
        out.append(r)
    return out
