"""The HPC jobs page's HTML from real protocol objects: what a user reads in each row (state
badges, node, elapsed / limit, progress bars, array breakdown, MaxRSS, short ids with the full
one on hover), when the cancel button shows, filters and paging, the queue, escaping, and the
cancel token's binding to user and job."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))

from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser  # noqa: E402
from hpc_jobs_data import HpcJobRow, JobFilter, JobPage  # noqa: E402
from hpc_jobs_page import cancel_token, cancelled_by  # noqa: E402
from hpc_jobs_render import page, render_job_view, render_jobs, render_queue  # noqa: E402

from hpc_jobs.protocol import JobStatus, LogReply, Progress, QueueEntry  # noqa: E402

RUN = "manual__2026-11-21T23:25:00.123456+00:00"


def _row(task: str = "segment_nuclei", map_index: int = 2, state: str = "running",
         dag: str = "celldetector_preprocess", run: str = RUN) -> HpcJobRow:
    return HpcJobRow(dag_id=dag, run_id=run, task_id=task, map_index=map_index, try_number=1,
                     operator="SegmentNucleiOperator", state=state, hpc_conn_id="omeflow_hpc",
                     pushed_at=None)


def _tr(html: str, job_id: str) -> str:
    found = re.search(rf"<tr class='job' data-job-id='{re.escape(job_id)}'.*?</tr>", html, re.S)
    assert found, f"no row for {job_id}:\n{html}"
    return found.group(0)


def test_a_running_array_job_shows_state_node_time_progress_breakdown_and_memory() -> None:
    row = _row()
    job = JobStatus(
        job_id=row.job_id, native_id="4711", state="RUNNING", node="node[01-02]",
        elapsed_s=125, time_limit_s=3600, max_rss_mb=1536.0,
        progress=Progress(done=3, total=12, unit="tiles", message="segmenting"),
        array_states={"RUNNING": 2, "COMPLETED": 1, "PENDING": 1},
        array_progress={"0": Progress(done=3, total=3, unit="tiles"),
                        "1": Progress(done=0, total=3, unit="tiles"),
                        "10": Progress(done=2, unit="tiles")},
    )
    html = render_jobs(JobPage([row], 1, 1, 25, [row.dag_id]), JobFilter(), {row.job_id: job},
                       [], "")
    tr = _tr(html, row.job_id)
    assert "class='badge st-running' data-state='RUNNING'" in tr  # cluster: Airflow's cyan
    assert "data-state='running'" in tr  # the Airflow state badge
    assert "node[01-02]" in tr and "4711" in tr
    assert "<td class='elapsed'>2m 05s / 1h 00m</td>" in tr
    assert "data-percent='25'" in tr and "3 / 12 tiles" in tr  # job bar: 3 of 12
    assert "data-task='0'" in tr and "data-percent='100'" in tr  # per array task
    assert "2 tiles" in tr  # a task without a total yet: its count, no bar
    assert "data-total='4'" in tr and "title='RUNNING: 2 task(s)'" in tr
    assert "title='PENDING: 1 task(s)'" in tr and "title='COMPLETED: 1 task(s)'" in tr
    assert "1.5 GiB" in tr
    # the long job key is shortened to its hash, the full key is on hover
    assert f"title='{row.job_id}'>…{row.job_id[-10:]}</span>" in tr
    assert "href='/omeflow/jobs/log?dag_id=celldetector_preprocess&amp;" in tr
    # grouped by run: a header row with the Dag and the run's time, full run id on hover
    assert f"title='{RUN}'>manual 2026-11-21 23:25:00</span>" in html


def test_cancel_button_only_on_live_jobs_the_user_may_cancel() -> None:
    live_row, done_row = _row(map_index=0), _row(map_index=1, state="success")
    live = {
        live_row.job_id: JobStatus(job_id=live_row.job_id, state="RUNNING"),
        done_row.job_id: JobStatus(job_id=done_row.job_id, state="COMPLETED", exit_code=0),
    }
    jp = JobPage([live_row, done_row], 2, 1, 25)
    tokens = {live_row.job_id: "tok-live", done_row.job_id: "tok-done"}
    html = render_jobs(jp, JobFilter(), live, [], "/base", tokens)
    running = _tr(html, live_row.job_id)
    assert "<form method='post' action='/base/omeflow/jobs/cancel?dag_id=" in running
    assert "name='token' value='tok-live'" in running
    assert "<form" not in _tr(html, done_row.job_id), "a finished job has nothing to cancel"
    # no token (the user may not edit the Dag): no button
    assert "<form method='post'" not in render_jobs(jp, JobFilter(), live, [], "/base", {})


def test_failed_and_cancelled_jobs_read_as_such() -> None:
    failed, cancelled = _row(map_index=0, state="failed"), _row(map_index=1, state="failed")
    live = {
        failed.job_id: JobStatus(job_id=failed.job_id, state="OUT_OF_MEMORY", exit_code=137,
                                 reason="OutOfMemory", max_rss_mb=512),
        cancelled.job_id: JobStatus(job_id=cancelled.job_id, state="CANCELLED",
                                    reason="cancelled by admin"),
    }
    html = render_jobs(JobPage([failed, cancelled], 2, 1, 25), JobFilter(), live, [], "")
    oom = _tr(html, failed.job_id)
    assert "st-failed' data-state='OUT_OF_MEMORY'" in oom and ">137<" in oom
    assert "512 MiB" in oom
    gone = _tr(html, cancelled.job_id)
    assert "data-state='CANCELLED'" in gone and "cancelled by admin" in gone


def test_filters_keep_their_values_and_paging_links_keep_the_filters() -> None:
    row = _row()
    flt = JobFilter(dag_id="celldetector_preprocess", state="failed", page=2)
    jp = JobPage([row], 60, 2, 25, ["celldetector_preprocess", "omeflow_cluster_check"])
    html = render_jobs(jp, flt, {}, [], "")
    assert "<option value='celldetector_preprocess' selected>" in html
    assert "<option value='failed' selected>" in html
    assert "26–50 of 60 task instances · page 2 of 3" in html
    assert ("rel='prev' href='/omeflow/jobs?dag_id=celldetector_preprocess&amp;state=failed"
            "&amp;page=1'") in html
    assert "rel='next' href='/omeflow/jobs?dag_id=celldetector_preprocess&amp;state=failed" \
           "&amp;page=3'" in html
    last = render_jobs(JobPage([row], 60, 3, 25, []), flt, {}, [], "")
    assert "rel='next'" not in last and "older ›" in last
    assert "No cluster jobs match these filters." in render_jobs(
        JobPage([], 0, 1, 25), flt, {}, [], "")


def test_queue_lists_the_service_accounts_jobs() -> None:
    entries = [
        QueueEntry(job_id=_row().job_id, native_id="4711", state="RUNNING", node="node01",
                   partition="cpu", elapsed_s=61, time_limit_s=600, submitted_at=0),
        QueueEntry(native_id="4712", state="PENDING", reason="Resources", partition="gpu"),
    ]
    html = render_queue({"omeflow_hpc": entries}, [], "")
    assert "via omeflow_hpc: 2 job(s)" in html
    assert "data-native-id='4711'" in html and "1m 01s / 10m 00s" in html
    assert "1970-01-01 00:00:00 UTC" in html
    assert "data-native-id='4712' data-job-id=''" in html and "not omeflow" in html
    assert "Resources" in html
    assert "Queue unavailable: boom" in render_queue({}, ["boom"], "")


def test_job_view_carries_the_offset_the_script_continues_from() -> None:
    row = _row()
    job = JobStatus(job_id=row.job_id, state="RUNNING", progress=Progress(done=1, total=4))
    reply = LogReply(job_id=row.job_id, offset=100, next_offset=180, size=180, text="x" * 80)
    html = render_job_view(row, None, job, "", reply, "", "", "/omeflow/jobs/log/chunk?a=1",
                           "tok")
    assert "data-next-offset='180'" in html and "data-live='true'" in html
    assert "bytes 100-180 of 180" in html
    assert "name='token' value='tok'" in html and "name='back' value='job'" in html
    ended = JobStatus(job_id=row.job_id, state="COMPLETED")
    html = render_job_view(row, None, ended, "", reply, "", "", "/c", "tok")
    assert "data-live='false'" in html and "<form" not in html


def test_everything_the_cluster_and_the_db_say_is_escaped() -> None:
    evil = "<script>alert(1)</script>"
    row = _row(run="r'><img src=x onerror=alert(1)>", task="t")
    live = {row.job_id: JobStatus(job_id=row.job_id, native_id=evil, state="FAILED",
                                  reason=evil, node=evil)}
    body = render_jobs(JobPage([row], 1, 1, 25, [evil]), JobFilter(), live, [evil], "")
    body += render_queue({"c": [QueueEntry(native_id="1", state="PENDING", reason=evil)]}, [], "")
    html = page("HPC jobs", body, "").body.decode()
    assert "<script>" not in html and "<img" not in html, html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "r&#x27;&gt;&lt;img src=x onerror=alert(1)&gt;" in html


def test_cancel_token_is_bound_to_the_user_and_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__SECRET_KEY", "s3cret")
    admin = SimpleAuthManagerUser(username="admin", role="admin")
    other = SimpleAuthManagerUser(username="eve", role="admin")
    a, b = _row(map_index=0).job_id, _row(map_index=1).job_id
    assert cancel_token(admin, a) == cancel_token(admin, a)
    assert len({cancel_token(admin, a), cancel_token(admin, b), cancel_token(other, a)}) == 3
    monkeypatch.setenv("AIRFLOW__API__SECRET_KEY", "another")
    assert cancel_token(admin, a) != cancel_token(
        admin, b) and len(cancel_token(admin, a)) == 64


def test_cancelled_by_is_a_name_the_gateway_accepts() -> None:
    from pydantic import TypeAdapter

    from hpc_jobs.protocol import CancelledBy

    for name, expected in (("admin", "admin"), ("Jane Doe", "Jane_Doe"),
                           ("_svc", "u_svc"), ("a" * 80, "a" * 64)):
        got = cancelled_by(SimpleAuthManagerUser(username=name, role="admin"))
        assert got == expected
        TypeAdapter(CancelledBy).validate_python(got)
