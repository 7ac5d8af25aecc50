"""The HPC jobs page against a running Airflow (``live_stack``: api-server, scheduler,
dag-processor, triggerer; embedded local gateway), as a user checks it:

- a running ``omeflow_cluster_check`` job (a long sleep that counts its seconds as progress) is
  on the page with its state, node, elapsed / limit and a moving progress bar;
- the job view's log grows by offset: the chunk route returns exactly the bytes after the
  ``next_offset`` the page has;
- a cancel that is cross-site, lacks the page's token, or comes from a user without edit
  permission on the Dag is refused and cancels nothing;
- the cancel button ends the job (the gateway says CANCELLED, "cancelled by admin") and the
  Airflow task ends failed with "cancelled by admin" in its log;
- filters by Dag and state, and paging, newest first;
- in Debian's chromium at 1500 x 900 the page needs no horizontal scroll (screenshots under
  ``$OMEFLOW_ARTIFACTS``, default ``var/artifacts/``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest

from tests.browser import chromium
from tests.sandbox_fixture import sandbox  # noqa: F401, F811
from tests.stack_fixture import Stack

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "omeflow_cluster_check"
TASK_ID = "cluster_check"
#: Long enough to outlast the tests before the cancel on a loaded machine; the cancel ends it.
SLEEP_S = 600
ARTIFACTS = Path(os.environ.get("OMEFLOW_ARTIFACTS") or REPO / "var" / "artifacts") / "jobs_page"


def _trigger(stack: Stack, conf: dict[str, Any]) -> str:
    reply = stack.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                      json={"logical_date": None, "conf": conf})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["dag_run_id"])


def _ti_path(run_id: str) -> str:
    return f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{TASK_ID}"


def _ti(stack: Stack, run_id: str) -> dict[str, Any]:
    return dict(stack.api("GET", _ti_path(run_id)).json())


def _job_key(stack: Stack, run_id: str) -> str | None:
    reply = stack.api("GET", f"{_ti_path(run_id)}/xcomEntries/hpc_job",
                      params={"deserialize": True})
    if reply.status_code != 200:
        return None
    value = reply.json()["value"]
    value = json.loads(value) if isinstance(value, str) else value
    return str(value["job_id"])


def _row(page: str, job_id: str) -> str | None:
    found = re.search(rf"<tr class='job' data-job-id='{re.escape(job_id)}'.*?</tr>", page, re.S)
    return found.group(0) if found else None


def _page(stack: Stack, **params: Any) -> str:
    reply = stack.api("GET", "/omeflow/jobs", params=params)
    assert reply.status_code == 200, reply.text[:3000]
    return reply.text


@pytest.fixture(scope="module")
def jobs(live_stack: Stack) -> dict[str, str]:
    """A finished quick run, then a long one whose job runs and reports progress."""
    stack = live_stack
    stack.unpause(DAG_ID)
    quick = _trigger(stack, {"sleep_s": 0, "exit_code": 0, "time_min": 5})
    stack.wait_for("the quick run to succeed",
                   lambda: _ti(stack, quick).get("state") == "success", 240)
    slow = _trigger(stack, {"sleep_s": SLEEP_S, "exit_code": 0, "time_min": 15})
    key = stack.wait_for("the long run's job", lambda: _job_key(stack, slow), 120)

    def progressing() -> bool:
        row = _row(_page(stack), key)
        return bool(row and "data-state='RUNNING'" in row and "data-percent=" in row)

    stack.wait_for("the long job to run with progress", progressing, 120)
    return {"quick_run": quick, "quick_key": str(_job_key(stack, quick)), "run": slow,
            "key": key}


def _seconds_done(row: str) -> int:
    found = re.search(rf"(\d+) / {SLEEP_S} seconds", row)
    return int(found.group(1)) if found else -1


def test_page_shows_the_running_jobs_state_node_time_and_progress(
    live_stack: Stack, jobs: dict[str, str]
) -> None:
    row = _row(_page(live_stack), jobs["key"])
    assert row is not None
    assert "class='badge st-running' data-state='RUNNING'" in row, row
    assert re.search(r"data-state='(running|deferred)'", row), "the Airflow state badge"
    assert re.search(r"<td class='elapsed'>(\d+m )?\d+s / 15m 00s</td>", row), row
    done_s = _seconds_done(row)
    assert f"/ {SLEEP_S} seconds" in row and "data-percent=" in row, row
    assert f"title='{jobs['key']}'" in row, "the full job key on hover"
    assert "<form method='post'" in row, "admin may cancel a running job"
    live_stack.wait_for("the bar to move", lambda: _seconds_done(
        _row(_page(live_stack), jobs["key"]) or "") > done_s, 60)
    done = _row(_page(live_stack), jobs["quick_key"])
    assert done is not None and "data-state='COMPLETED'" in done and "<form" not in done


# -- in a real browser --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium at a 1500 px wide screen (the issue's yardstick)."""
    with chromium(window=(1500, 900)) as driver:
        yield driver


def _shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def _no_horizontal_scroll(driver: Any) -> bool:
    return bool(driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"))


def test_page_fits_1500px_in_chromium(
    live_stack: Stack, jobs: dict[str, str], browser: Any
) -> None:
    """The real page and the job view in chromium, logged in with the UI's cookie."""
    browser.get(live_stack.base_url + "/omeflow/jobs/static/hpc_jobs_page.css")  # the origin
    browser.add_cookie({"name": "_token", "value": live_stack.token, "path": "/"})
    browser.get(live_stack.base_url + "/omeflow/jobs")
    time.sleep(0.5)
    assert browser.find_elements("css selector", f"tr[data-job-id='{jobs['key']}']")
    assert _no_horizontal_scroll(browser)
    _shot(browser, "jobs_page_live.png")
    browser.find_element("css selector", f"tr[data-job-id='{jobs['key']}'] a.log-link").click()
    assert "step cluster_check" in browser.find_element("id", "log").text
    assert _no_horizontal_scroll(browser)
    _shot(browser, "job_view_live.png")


def _token(row: str) -> str:
    found = re.search(r"name='token' value='([0-9a-f]{64})'", row)
    assert found, row
    return found.group(1)


def _cancel_url(row: str) -> str:
    found = re.search(r"<form method='post' action='([^']+)'", row)
    assert found, row
    return html.unescape(found.group(1))


def _viewer_token(stack: Stack) -> str:
    """A real JWT of a VIEWER user of the stack's SimpleAuthManager (signed with the stack's
    shared secret, as its /auth/token would sign it)."""
    secrets = json.loads((stack.home / "var" / "ui_secrets.json").read_text())
    env = dict(stack.env, AIRFLOW__API_AUTH__JWT_SECRET=secrets["jwt_secret"],
               AIRFLOW__API__SECRET_KEY=secrets["api_secret_key"])
    code = (
        "from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import "
        "SimpleAuthManager\nfrom airflow.api_fastapi.auth.managers.simple.user import "
        "SimpleAuthManagerUser\n"
        "print(SimpleAuthManager().generate_jwt(SimpleAuthManagerUser(username='viewer', "
        "role='VIEWER')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_refused_cancels_cancel_nothing(live_stack: Stack, jobs: dict[str, str]) -> None:
    stack = live_stack
    row = _row(_page(stack), jobs["key"])
    assert row is not None
    url, token = _cancel_url(row), _token(row)
    own = {"Origin": stack.base_url, "Content-Type": "application/x-www-form-urlencoded"}
    refused = {
        "no token": stack.api("POST", url, headers=own, content="back=jobs"),
        "wrong token": stack.api("POST", url, headers=own, content="token=" + "0" * 64),
        "other site": stack.api("POST", url, content=f"token={token}", headers={
            **own, "Origin": "https://evil.example"}),
        "cross-site fetch": stack.api("POST", url, content=f"token={token}", headers={
            **own, "Sec-Fetch-Site": "cross-site"}),
        "anonymous": stack.api("POST", url, auth=False, content=f"token={token}", headers=own),
    }
    viewer = _viewer_token(stack)
    as_viewer = stack.api("GET", "/omeflow/jobs", auth=False,
                          headers={"Authorization": f"Bearer {viewer}"})
    assert as_viewer.status_code == 200 and jobs["key"] in as_viewer.text, as_viewer.text[:2000]
    assert "<form method='post'" not in as_viewer.text, "a viewer gets no cancel button"
    refused["viewer"] = stack.api("POST", url, auth=False, content=f"token={token}",
                                  headers={**own, "Authorization": f"Bearer {viewer}"})
    codes = {what: r.status_code for what, r in refused.items()}
    assert codes == {"no token": 403, "wrong token": 403, "other site": 403,
                     "cross-site fetch": 403, "anonymous": 401, "viewer": 403}, codes
    assert "cancel token" in refused["no token"].text
    assert "cross-origin" in refused["other site"].text
    after = _row(_page(stack), jobs["key"])
    assert after is not None and "data-state='RUNNING'" in after, after


def _chunk(stack: Stack, chunk_url: str, **query: int) -> dict[str, Any]:
    """What the job view's script fetches: the chunk URL the page gave it, plus the offset."""
    reply = stack.api("GET", f"{chunk_url}&{urlencode(query)}")
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def test_log_grows_by_offset_and_cancel_from_the_page_fails_the_task(
    live_stack: Stack, jobs: dict[str, str]
) -> None:
    stack = live_stack
    view = stack.api("GET", "/omeflow/jobs/log",
                     params={"dag_id": DAG_ID, "run_id": jobs["run"], "task_id": TASK_ID})
    assert view.status_code == 200, view.text[:2000]
    first = re.search(r"data-chunk-url='([^']+)' data-next-offset='(\d+)' data-live='true'>"
                      r"(.*?)</pre>", view.text, re.S)
    assert first, view.text[:3000]
    chunk_url, offset = html.unescape(first.group(1)), int(first.group(2))
    shown = html.unescape(first.group(3))
    assert f"sleeping {SLEEP_S} s as asked" in shown
    empty = _chunk(stack, chunk_url, offset=offset)
    assert empty["offset"] == offset and empty["text"] == "" and empty["state"] == "RUNNING"

    row = _row(_page(stack), jobs["key"])
    assert row is not None
    reply = stack.api("POST", _cancel_url(row), content=f"token={_token(row)}&back=jobs",
                      headers={"Origin": stack.base_url, "Sec-Fetch-Site": "same-origin",
                               "Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 303, reply.text
    back = urlsplit(reply.headers["location"])
    assert back.path == "/omeflow/jobs"
    assert parse_qs(back.query) == {"cancelled": [jobs["key"]]}, back
    assert f"Cancel sent for cluster job {jobs['key']}" in _page(stack, cancelled=jobs["key"])
    assert stack.api("GET", "/omeflow/jobs", params={"cancelled": "<b>"}).status_code == 422

    def cancelled() -> str | None:
        found = _row(_page(stack), jobs["key"])
        return found if found and "data-state='CANCELLED'" in found else None

    row = stack.wait_for("the page to show the job cancelled", cancelled, 60)
    assert "cancelled by admin" in row and "<form" not in row, row
    ti = stack.wait_for("the task to fail", lambda: (t := _ti(stack, jobs["run"]))
                        .get("state") in ("failed", "success") and t, 120)
    assert ti["state"] == "failed", ti
    task_log = stack.api("GET", f"{_ti_path(jobs['run'])}/logs/{ti['try_number']}",
                         params={"full_content": True}, headers={"Accept": "application/json"})
    assert task_log.status_code == 200, task_log.text[:2000]
    assert "cancelled by admin" in task_log.text, task_log.text[-3000:]

    # the log view's script continues from the offset it had: the bytes after it only (the
    # local scheduler adds none on a cancel; Slurm's line: the sandbox test below), which
    # together with what it showed are the whole log
    grown = _chunk(stack, chunk_url, offset=offset)
    assert grown["offset"] == offset and grown["terminal"] is True
    whole = _chunk(stack, chunk_url, offset=0, max_bytes=1_000_000)
    assert whole["text"].endswith(shown + grown["text"]), (shown[-300:], grown, whole)
    assert grown["next_offset"] == whole["next_offset"] == whole["size"]


def test_filters_and_paging_newest_first(live_stack: Stack, jobs: dict[str, str]) -> None:
    stack = live_stack
    page1 = _page(stack, dag_id=DAG_ID, per_page=1)
    page2 = _page(stack, dag_id=DAG_ID, per_page=1, page=2)
    assert _row(page1, jobs["key"]) and not _row(page1, jobs["quick_key"]), "newest first"
    assert _row(page2, jobs["quick_key"]) and not _row(page2, jobs["key"])
    assert "rel='next'" in page1 and "rel='prev'" in page2
    ok = _page(stack, dag_id=DAG_ID, state="success")
    assert _row(ok, jobs["quick_key"]) and not _row(ok, jobs["key"])
    other = _page(stack, dag_id="celldetector_preprocess")
    assert "data-job-id" not in other.split("Cluster queue")[0]
    assert stack.api("GET", "/omeflow/jobs", params={"state": "bogus"}).status_code == 422


def _gallery() -> str:
    """The page's HTML for a run with every kind of job a user meets (rendered by the page's
    own code from protocol objects): a running array with per-task progress, a pending one,
    a failed (out of memory) one, a completed one, a cancelled one, and the queue."""
    sys.path.insert(0, str(REPO / "plugins"))
    from hpc_jobs_data import HpcJobRow, JobFilter, JobPage
    from hpc_jobs_render import render_jobs, render_queue

    from hpc_jobs.protocol import JobStatus, Progress, QueueEntry

    run = "manual__2026-11-21T23:25:00.123456+00:00"
    other = "scheduled__2026-11-21T02:00:00+00:00"

    def row(dag: str, run_id: str, task: str, index: int, state: str) -> HpcJobRow:
        return HpcJobRow(dag, run_id, task, index, 1, "HpcStepOperator", state, "omeflow_hpc",
                         None)

    rows, live = [], {}
    specs = [
        ("celldetector_preprocess", run, "segment_nuclei", 0, "deferred", dict(
            native_id="48213", state="RUNNING", node="node[01-04]", elapsed_s=734,
            time_limit_s=7200, progress=Progress(done=37, total=64, unit="blocks"),
            array_states={"RUNNING": 4, "COMPLETED": 3, "PENDING": 1},
            array_progress={str(i): Progress(done=d, total=8, unit="blocks")
                            for i, d in enumerate((8, 8, 8, 5, 4, 2, 2, 0))})),
        ("celldetector_preprocess", run, "segment_nuclei", 1, "deferred", dict(
            native_id="48214", state="PENDING", reason="Resources", time_limit_s=7200,
            array_states={"PENDING": 8})),
        ("celldetector_preprocess", run, "export_zarr", 0, "success", dict(
            native_id="48201", state="COMPLETED", exit_code=0, node="node02", elapsed_s=95,
            time_limit_s=3600, max_rss_mb=2310, progress=Progress(done=12, total=12,
                                                                   unit="tiles"))),
        ("celldetector_preprocess", run, "export_zarr", 1, "failed", dict(
            native_id="48202", state="OUT_OF_MEMORY", exit_code=137, node="node03",
            elapsed_s=41, time_limit_s=3600, max_rss_mb=16384, reason="OutOfMemory",
            progress=Progress(done=5, total=12, unit="tiles"))),
        ("omeflow_cluster_check", other, "cluster_check", -1, "failed", dict(
            native_id="48190", state="CANCELLED", node="node01", elapsed_s=62,
            time_limit_s=600, reason="cancelled by admin",
            progress=Progress(done=61, total=300, unit="seconds", message="sleeping"))),
        ("omeflow_cluster_check", other, "cluster_check_gpu", -1, "failed", dict(
            native_id="48191", state="TIMEOUT", node="gpu01", elapsed_s=600,
            time_limit_s=600, exit_code=0, reason="DUE TO TIME LIMIT")),
    ]
    tokens = {}
    for dag, run_id, task, index, state, status in specs:
        r = row(dag, run_id, task, index, state)
        rows.append(r)
        live[r.job_id] = JobStatus(job_id=r.job_id, **status)
        tokens[r.job_id] = "0" * 64
    queue = [QueueEntry(job_id=rows[0].job_id, native_id="48213", state="RUNNING",
                        partition="cpu", node="node[01-04]", elapsed_s=734, time_limit_s=7200,
                        submitted_at=1_795_000_000),
             QueueEntry(job_id=rows[1].job_id, native_id="48214", state="PENDING",
                        partition="cpu", reason="Resources", time_limit_s=7200,
                        submitted_at=1_795_000_100)]
    page = JobPage(rows, 31, 1, 25, ["celldetector_preprocess", "omeflow_cluster_check"])
    return (render_jobs(page, JobFilter(), live, [], "", tokens)
            + render_queue({"omeflow_hpc": queue}, [], ""))


def test_every_kind_of_job_reads_well_at_1500px(browser: Any) -> None:
    """The page's own HTML and stylesheet with a running array (progress per task), a pending,
    an out-of-memory, a completed, a cancelled and a timed-out job: no horizontal scroll,
    every row has its job id and a link to its log view (screenshot ``jobs_page_kinds.png``)."""
    sys.path.insert(0, str(REPO / "plugins"))
    from hpc_jobs_render import page

    where = ARTIFACTS / "kinds"
    static = where / "omeflow" / "jobs" / "static"
    static.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "plugins" / "hpc_jobs_page.css", static / "hpc_jobs_page.css")
    doc = page("HPC jobs", _gallery(), where.as_uri()).body.decode()
    (where / "jobs.html").write_text(doc)
    browser.get((where / "jobs.html").as_uri())
    rows = browser.find_elements("css selector", "tr[data-job-id]")
    assert len(rows) == 8, "6 task rows and 2 queue rows"
    for tr in rows[:6]:
        assert tr.find_elements("css selector", "a.log-link"), tr.get_attribute("outerHTML")
    assert _no_horizontal_scroll(browser)
    bars = browser.execute_script(
        "return [...document.querySelectorAll('.progress .fill')].map(e => e.offsetWidth)")
    assert len(bars) == 8 and max(bars) > 0, bars  # 4 job bars, 4 array-task bars
    _shot(browser, "jobs_page_kinds.png")


# -- the Slurm path of the page's cancel (the sandbox: sbatch / squeue / sacct / scancel) -------
@pytest.mark.sandbox
def test_page_cancel_on_slurm_ends_the_job_in_squeue_and_sacct(
    sandbox: dict[str, Any], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """What the cancel route does (``cancel_task_try(row, by=<user>)``) through the SSH gateway
    of the Slurm sandbox: the running job leaves squeue, sacct records it CANCELLED, and the
    gateway's status says "cancelled by admin"."""
    sys.path.insert(0, str(REPO / "plugins"))
    from hpc_jobs_data import HpcJobRow, cancel_task_try

    from hooks.hpc import HpcGatewayHook

    conn = {"conn_type": "ssh", "host": sandbox["host"], "port": sandbox["port"],
            "login": sandbox["user"],
            "extra": {"key_file": sandbox["key_file"],
                      "host_key": f"{sandbox['host_key_type']} {sandbox['host_key']}"}}
    monkeypatch.setenv("AIRFLOW_CONN_OMEFLOW_JOBS_PAGE_SANDBOX", json.dumps(conn))
    row = HpcJobRow(DAG_ID, f"manual__jobs_page_{os.getpid()}_{time.time_ns()}", TASK_ID, -1, 1,
                    "ClusterCheckOperator", "deferred", "omeflow_jobs_page_sandbox", None)
    assert row.job_id is not None
    hook = HpcGatewayHook(row.hpc_conn_id, timeout=60)
    native = hook.submit("cluster_check", row.job_id, params={"sleep_s": 300},
                         resources={"time_min": 10}).native_id

    def state() -> str:
        return hook.status([row.job_id])[0].state.value

    deadline = time.monotonic() + 120
    while state() != "RUNNING":
        assert time.monotonic() < deadline, f"job {native} did not start: {state()}"
        time.sleep(1)
    before = hook.log(row.job_id, offset=0, max_bytes=1 << 20).next_offset
    reply = cancel_task_try(row, "admin")
    assert reply.job_id == row.job_id
    deadline = time.monotonic() + 60
    while (status := hook.status([row.job_id])[0]).state.value != "CANCELLED":
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status.reason is not None and "cancelled by admin" in status.reason, status
    # the log grew by Slurm's cancel line; reading on from the old offset gets only that
    deadline = time.monotonic() + 30
    while not (grown := hook.log(row.job_id, offset=before)).text:
        assert time.monotonic() < deadline, "Slurm wrote no cancel line"
        time.sleep(1)
    assert grown.offset == before and "CANCELLED" in grown.text, grown
    squeue = subprocess.run(["squeue", "-h", "-j", native, "-o", "%T"], capture_output=True,
                            text=True, timeout=30, check=False)
    assert squeue.stdout.strip() in ("", "CANCELLED"), squeue.stdout
    deadline = time.monotonic() + 60
    while True:
        sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", native, "-o", "State"],
                               capture_output=True, text=True, timeout=30, check=False)
        if sacct.stdout.strip().startswith("CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert sacct.stdout.strip().startswith("CANCELLED"), sacct.stdout + sacct.stderr


def test_log_is_read_piece_by_piece_by_offset(live_stack: Stack, jobs: dict[str, str]) -> None:
    """The job view shows a tail (``tail_bytes``) and its script reads on from ``next_offset``:
    pieces that start where the last ended and add up to the log, nothing sent twice."""
    view = live_stack.api("GET", "/omeflow/jobs/log", params={
        "dag_id": DAG_ID, "run_id": jobs["quick_run"], "task_id": TASK_ID, "tail_bytes": 100})
    found = re.search(r"data-chunk-url='([^']+)' data-next-offset='(\d+)' data-live='false'>"
                      r"(.*?)</pre>", view.text, re.S)
    assert view.status_code == 200 and found, view.text[:3000]
    chunk_url, end = html.unescape(found.group(1)), int(found.group(2))
    assert len(html.unescape(found.group(3)).encode()) == 100, "the tail asked for"
    pieces, offset = [], 0
    while offset < end:
        piece = _chunk(live_stack, chunk_url, offset=offset, max_bytes=256)
        assert piece["offset"] == offset and 0 < piece["next_offset"] - offset <= 256, piece
        pieces.append(piece["text"])
        offset = piece["next_offset"]
    whole = "".join(pieces)
    assert "step cluster_check finished" in whole and len(whole.encode()) == end
    assert whole.endswith(html.unescape(found.group(3)))
    after = _chunk(live_stack, chunk_url, offset=end)
    assert after["text"] == "" and after["next_offset"] == end, "nothing is sent twice"
