"""HTML of the HPC jobs page and the job view (every dynamic value goes through :func:`e`).

The page reads like Airflow's own: state badges in Airflow 3's state colours (cluster states
take the colour of the Airflow state they mean), short ids with the full one on hover
(``title``), rows grouped by Dag run, newest first. Styles and the live-log script are the
static files ``hpc_jobs_page.css`` / ``hpc_jobs_page.js`` beside this module.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import urlencode

from fastapi.responses import HTMLResponse
from hpc_jobs_data import PAGE_SIZE, URL_PREFIX, HpcJobRow, JobFilter, JobPage, phases

from hpc_jobs.protocol import JobState, JobStatus, LogReply, Progress, QueueEntry

#: Airflow task states a user can filter by (``none``: not scheduled yet).
AIRFLOW_STATES = ("queued", "scheduled", "running", "deferred", "success", "failed",
                  "up_for_retry", "upstream_failed", "skipped", "removed", "none")
#: Cluster state → the Airflow state whose colour it takes.
CLUSTER_COLOURS: dict[JobState, str] = {
    JobState.PENDING: "queued", JobState.RUNNING: "running", JobState.COMPLETED: "success",
    JobState.FAILED: "failed", JobState.TIMEOUT: "failed", JobState.OUT_OF_MEMORY: "failed",
    JobState.NODE_FAIL: "failed", JobState.BOOT_FAIL: "failed", JobState.DEADLINE: "failed",
    JobState.CANCELLED: "upstream_failed", JobState.PREEMPTED: "up_for_retry",
    JobState.REQUEUED: "up_for_retry", JobState.SUSPENDED: "deferred",
    JobState.UNKNOWN: "no_status",
}
#: Array breakdown labels that would not fit a badge as the state's own name.
_SHORT_STATE = {"COMPLETED": "done", "OUT_OF_MEMORY": "oom", "NODE_FAIL": "node fail",
                "BOOT_FAIL": "boot fail"}
#: Characters of a long id shown before the ellipsis (the rest is in the title).
SHORT_ID = 10
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "SAMEORIGIN"}


def e(value: object) -> str:
    """HTML-escaped text (quotes too: safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def short(text: str | None, keep: int = SHORT_ID, css: str = "id") -> str:
    """``text`` cut to its last ``keep`` characters (a job key's hash, the tail of an id), the
    whole of it on hover."""
    if not text:
        return ""
    shown = text if len(text) <= keep + 1 else "…" + text[-keep:]
    return f"<span class='{css}' title='{e(text)}'>{e(shown)}</span>"


def short_run(run_id: str) -> str:
    """A run id as people read it: its kind and its time to the minute (full id on hover)."""
    kind, _, when = run_id.partition("__")
    try:
        at = datetime.fromisoformat(when)
        shown = f"{kind} {at:%Y-%m-%d %H:%M:%S}"
    except ValueError:
        return short(run_id, 28, "run")
    return f"<span class='run' title='{e(run_id)}'>{e(shown)}</span>"


def badge(state: str | None, colour: str | None = None) -> str:
    """A state badge in Airflow's colour of ``colour`` (default: the state itself)."""
    name = state or "no_status"
    return (f"<span class='badge st-{e(colour or name).lower()}' data-state='{e(name)}'>"
            f"{e(name.replace('_', ' '))}</span>")


def cluster_badge(state: JobState) -> str:
    return badge(state.value, CLUSTER_COLOURS.get(state, "no_status"))


def duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 05s``, ``42s``; empty when unknown."""
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def elapsed_of_limit(job: JobStatus | QueueEntry) -> str:
    used, limit = duration(job.elapsed_s), duration(job.time_limit_s)
    if used and limit:
        return f"{used} / {limit}"
    return used or (f"– / {limit}" if limit else "")


def memory(mb: float | None) -> str:
    if mb is None:
        return ""
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def progress_bar(progress: Progress | None, label: str = "") -> str:
    """A bar (``done / total unit``); text only while the total is unknown."""
    if progress is None:
        return ""
    what = f"{progress.done}" + (f" / {progress.total}" if progress.total is not None else "")
    what += f" {progress.unit}"
    tip = what + (f": {progress.message}" if progress.message else "")
    if progress.total:
        pct = min(100.0, 100.0 * progress.done / progress.total)
        fill = f"<span class='fill' style='width:{pct:.1f}%'></span>"
    else:
        pct, fill = None, ""
    value = f" data-percent='{pct:.0f}'" if pct is not None else ""
    return (f"<span class='progress'{value} title='{e(tip)}'>"
            f"{e(label) + ' ' if label else ''}<span class='bar'>{fill}</span>"
            f"<span class='ptext'>{e(what)}</span></span>")


def array_breakdown(job: JobStatus) -> str:
    """Array tasks by state: one small badge per state with its count."""
    if not job.array_states:
        return ""
    parts = []
    for name, count in sorted(job.array_states.items(), key=lambda kv: (-kv[1], kv[0])):
        try:
            colour = CLUSTER_COLOURS.get(JobState(name), "no_status")
        except ValueError:
            colour = "no_status"
        label = _SHORT_STATE.get(name, name.lower())
        parts.append(f"<span class='badge small st-{e(colour)}' data-state='{e(name)}' "
                     f"title='{e(name)}: {count} task(s)'>{e(label)} {count}</span>")
    total = sum(job.array_states.values())
    return f"<span class='array' data-total='{total}'>{''.join(parts)}</span>"


def array_progress(job: JobStatus, limit: int | None = None) -> str:
    """One bar per array task that reported progress, by task index."""
    if not job.array_progress:
        return ""
    items = sorted(job.array_progress.items(), key=lambda kv: (len(kv[0]), kv[0]))
    cut = items if limit is None else items[:limit]
    bars = "".join(f"<li data-task='{e(k)}'>{progress_bar(p, f'#{k}')}</li>" for k, p in cut)
    more = f"<li class='muted'>+{len(items) - len(cut)} more</li>" if len(cut) < len(items) else ""
    return f"<ul class='task-bars'>{bars}{more}</ul>"


def page(title: str, body: str, root: str, status_code: int = 200,
         script: bool = False) -> HTMLResponse:
    """A whole page with the page's stylesheet (and script)."""
    static = f"{root}{URL_PREFIX}/jobs/static"
    js = f"<script src='{e(static)}/hpc_jobs_page.js' defer></script>" if script else ""
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<link rel='stylesheet' href='{e(static)}/hpc_jobs_page.css'>{js}</head>"
        f"<body><header><h1>{e(title)}</h1></header><main>{body}</main></body></html>",
        status_code=status_code, headers=_HEADERS,
    )


def cancel_form(action: str, token: str, back: str, label: str = "Cancel") -> str:
    """A POST form with the page's cancel token (see :mod:`hpc_jobs_page`)."""
    return (f"<form method='post' action='{e(action)}' class='cancel' "
            "onsubmit=\"return confirm('Cancel this cluster job?')\">"
            f"<input type='hidden' name='token' value='{e(token)}'>"
            f"<input type='hidden' name='back' value='{e(back)}'>"
            f"<button type='submit' class='danger'>{e(label)}</button></form>")


def _job_cells(row: HpcJobRow, job: JobStatus | None, root: str) -> str:
    if job is None:
        text = "unavailable" if row.job_id else "not submitted"
        state = f"<span class='badge st-no_status' data-state='{text}'>{text}</span>"
        return (f"<td class='cluster-state'>{state}</td>" + "<td></td>" * 6)
    node = f"<div class='sub' title='{e(job.node)}'>{e(job.node)}</div>" if job.node else ""
    return (
        f"<td class='cluster-state'>{cluster_badge(job.state)}{node}</td>"
        f"<td class='progress-cell'>{progress_bar(job.progress)}{array_progress(job, 4)}</td>"
        f"<td class='elapsed'>{e(elapsed_of_limit(job))}</td>"
        f"<td class='exit-code'>{e(job.exit_code)}</td>"
        f"<td class='reason'><span title='{e(job.reason)}'>{e(job.reason)}</span></td>"
        f"<td class='array-cell'>{array_breakdown(job)}</td>"
        f"<td class='rss'>{e(memory(job.max_rss_mb))}</td>"
    )


def job_row(row: HpcJobRow, live: Mapping[str, JobStatus], root: str,
            cancel: Mapping[str, str]) -> str:
    """One task instance's row: ``data-job-id`` is its job key."""
    job = live.get(row.job_id) if row.job_id else None
    links = [f"<a class='log-link' href='{e(root + row.log_path())}'>log</a>"] if row.job_id else []
    for phase in phases():
        later = live.get(row.phase_job_id(phase) or "")
        if later is not None and later.native_id is not None:  # the phase's job exists
            links.append(f"<a class='log-link' href='{e(root + row.log_path(phase))}'>"
                         f"{e(phase)}</a>")
    token = cancel.get(row.job_id or "")
    if token and job is not None and not job.state.terminal:
        links.append(cancel_form(root + cancel_action(row), token, "jobs"))
    native = ""
    if job and job.native_id and job.native_id != row.job_id:  # the local scheduler's is the key
        native = f"<div class='native-id'>{short(job.native_id, 12, 'native')}</div>"
    return (
        f"<tr class='job' data-job-id='{e(row.job_id or '')}' data-dag-id='{e(row.dag_id)}'>"
        f"<td class='task'><span title='{e(row.operator)}'>{e(row.task_label)}</span>"
        f"<div class='sub'>try {e(row.try_number)}</div></td>"
        f"<td class='airflow-state'>{badge(row.state)}</td>"
        + _job_cells(row, job, root)
        + f"<td class='job-ids'>{native}{short(row.job_id)}</td>"
        f"<td class='actions'>{' '.join(links)}</td></tr>"
    )


def cancel_action(row: HpcJobRow) -> str:
    """The cancel route of a row's task try."""
    query: dict[str, object] = {"dag_id": row.dag_id, "run_id": row.run_id,
                                "task_id": row.task_id, "try_number": row.try_number}
    if row.map_index >= 0:
        query["map_index"] = row.map_index
    return f"{URL_PREFIX}/jobs/cancel?{urlencode(query)}"


def _filters(flt: JobFilter, dag_ids: Sequence[str], root: str) -> str:
    dags = "".join(f"<option value='{e(d)}'{' selected' if d == flt.dag_id else ''}>{e(d)}</option>"
                   for d in dag_ids)
    states = "".join(f"<option value='{s}'{' selected' if s == flt.state else ''}>"
                     f"{s.replace('_', ' ')}</option>" for s in AIRFLOW_STATES)
    return (
        f"<form class='filters' method='get' action='{e(root + URL_PREFIX)}/jobs'>"
        f"<label>Dag <select name='dag_id'><option value=''>all</option>{dags}</select></label>"
        f"<label>Airflow state <select name='state'><option value=''>all</option>{states}"
        "</select></label>"
        + (f"<input type='hidden' name='per_page' value='{flt.per_page}'>"
           if flt.per_page != PAGE_SIZE else "")
        + "<button type='submit'>Filter</button>"
        f"<a href='{e(root + URL_PREFIX)}/jobs'>reset</a></form>"
    )


def _pager(jp: JobPage, flt: JobFilter, root: str) -> str:
    def href(n: int) -> str:
        query: dict[str, object] = {
            k: v for k, v in (("dag_id", flt.dag_id), ("state", flt.state)) if v}
        if flt.per_page != PAGE_SIZE:
            query["per_page"] = flt.per_page
        return e(f"{root}{URL_PREFIX}/jobs?{urlencode({**query, 'page': n})}")

    prev = (f"<a rel='prev' href='{href(jp.page - 1)}'>‹ newer</a>" if jp.page > 1
            else "<span class='muted'>‹ newer</span>")
    nxt = (f"<a rel='next' href='{href(jp.page + 1)}'>older ›</a>" if jp.page < jp.pages
           else "<span class='muted'>older ›</span>")
    first = (jp.page - 1) * jp.page_size + 1 if jp.total else 0
    last = min(jp.total, jp.page * jp.page_size)
    return (f"<nav class='pager' data-page='{jp.page}' data-pages='{jp.pages}'>{prev}"
            f"<span>{first}–{last} of {jp.total} task instances · page {jp.page} of "
            f"{jp.pages}</span>{nxt}</nav>")


def render_jobs(
    jp: JobPage, flt: JobFilter, live: Mapping[str, JobStatus], errors: Sequence[str],
    root: str, cancel: Mapping[str, str] | None = None, notice: str = "",
) -> str:
    """The jobs table: task instances grouped by Dag run, newest first, with filters and
    paging. ``cancel``: job id → cancel token, for the jobs the user may cancel."""
    cancel = cancel or {}
    out = [f"<p class='notice'>{e(notice)}</p>" if notice else ""]
    out += [f"<p class='error'>Live cluster state unavailable: {e(err)}</p>" for err in errors]
    out.append(_filters(flt, jp.dag_ids, root))
    if not jp.rows:
        out.append("<p class='empty'>No cluster jobs"
                   + (" match these filters." if flt.dag_id or flt.state else
                      " yet (or none in Dags you may read).") + "</p>")
        return "".join(out)
    head = ("<tr><th class='c-task'>Task</th><th class='c-af'>Airflow</th>"
            "<th class='c-cl'>Cluster · node</th><th class='c-prog'>Progress</th>"
            "<th class='c-el'>Elapsed / limit</th><th class='c-exit'>Exit</th>"
            "<th class='c-reason'>Reason</th><th class='c-arr'>Array tasks</th>"
            "<th class='c-rss'>MaxRSS</th><th class='c-id'>Job</th><th class='c-act'></th></tr>")
    body, group = [], None
    for row in jp.rows:
        if (row.dag_id, row.run_id) != group:
            group = (row.dag_id, row.run_id)
            run_path = f"/dags/{row.dag_id}/runs/{row.run_id}"
            body.append(
                f"<tr class='run-head' data-dag-id='{e(row.dag_id)}'><th colspan='11'>"
                f"<span class='dag'>{e(row.dag_id)}</span> · "
                f"<a href='{e(root + _quoted(run_path))}' target='_blank' rel='noopener'>"
                f"{short_run(row.run_id)}</a></th></tr>")
        body.append(job_row(row, live, root, cancel))
    out.append(f"<table class='jobs'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")
    out.append(_pager(jp, flt, root))
    return "".join(out)


def _quoted(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def render_queue(queues: Mapping[str, Sequence[QueueEntry]], errors: Sequence[str],
                 root: str) -> str:
    """The scheduler's queue for the service account, per gateway connection."""
    out = ["<section class='queue'><h2>Cluster queue (service account)</h2>"]
    out += [f"<p class='error'>Queue unavailable: {e(err)}</p>" for err in errors]
    for conn_id, entries in queues.items():
        if not entries:
            out.append(f"<p class='muted'>{e(conn_id)}: no pending or running jobs.</p>")
            continue
        rows = "".join(
            f"<tr data-native-id='{e(q.native_id)}' data-job-id='{e(q.job_id or '')}'>"
            f"<td>{short(q.native_id, 12, 'native')}</td>"
            f"<td>{short(q.job_id) or '<i>not omeflow</i>'}</td>"
            f"<td>{cluster_badge(q.state)}</td><td>{e(q.partition)}</td><td>{e(q.node)}</td>"
            f"<td>{e(elapsed_of_limit(q))}</td><td>{e(_when(q.submitted_at))}</td>"
            f"<td class='reason'><span title='{e(q.reason)}'>{e(q.reason)}</span></td></tr>"
            for q in entries
        )
        out.append(
            f"<p class='muted'>via {e(conn_id)}: {len(entries)} job(s)</p><table class='jobs'>"
            "<thead><tr><th>Native id</th><th>Job</th><th>State</th><th>Partition</th>"
            "<th>Node</th><th>Elapsed / limit</th><th>Submitted</th><th>Reason</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
    out.append("</section>")
    return "".join(out)


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_job_view(
    row: HpcJobRow, phase: str | None, job: JobStatus | None, status_error: str,
    reply: LogReply | None, log_error: str, root: str, chunk_url: str,
    cancel_token: str | None, notice: str = "",
) -> str:
    """One job: its status, progress per array task, a cancel button and the live log tail
    (the script asks ``chunk_url`` for the bytes from ``next_offset`` on)."""
    back = f"<p><a href='{e(root + URL_PREFIX)}/jobs'>← All HPC jobs</a></p>"
    job_id = row.phase_job_id(phase) or ""
    facts = [
        ("Dag", e(row.dag_id)), ("Run", short_run(row.run_id)),
        ("Task", e(row.task_label) + f" · try {e(row.try_number)}"
         + (f" · {e(phase)} job" if phase else "")),
        ("Cluster job", f"<span class='job-id'>{e(job_id)}</span>"),
        ("Connection", e(row.hpc_conn_id)),
    ]
    if job is not None:
        facts += [
            ("State", cluster_badge(job.state)),
            ("Native id", e(job.native_id) if job.native_id != job_id else ""),
            ("Node", e(job.node)), ("Elapsed / limit", e(elapsed_of_limit(job))),
            ("Exit code", e(job.exit_code)), ("Reason", e(job.reason)),
            ("MaxRSS", e(memory(job.max_rss_mb))), ("Progress", progress_bar(job.progress)),
            ("Array tasks", array_breakdown(job)),
        ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts if v)
    out = [back, f"<p class='notice'>{e(notice)}</p>" if notice else ""]
    if status_error:
        out.append(f"<p class='error'>{e(status_error)}</p>")
    actions = ""
    if cancel_token and job is not None and not job.state.terminal:
        actions = cancel_form(root + cancel_action(row), cancel_token, "job", "Cancel job")
    out.append(f"<section class='facts' data-job-id='{e(job_id)}'><dl>{dl}</dl>{actions}"
               f"</section>")
    if job is not None and job.array_progress:
        out.append(f"<section><h2>Array tasks</h2>{array_progress(job)}</section>")
    if log_error:
        out.append(f"<p class='error'>{e(log_error)}</p>")
    if reply is not None:
        live = "false" if job is None or job.state.terminal else "true"
        out.append(
            "<section class='log-box'><h2>Log <span class='muted' id='log-range'>"
            f"bytes {reply.offset}-{reply.next_offset} of {reply.size}</span></h2>"
            f"<pre class='log' id='log' data-chunk-url='{e(chunk_url)}' "
            f"data-next-offset='{reply.next_offset}' data-live='{live}'>{e(reply.text)}</pre>"
            "</section>")
    return "".join(out)
