"""``scripts/airflow_rest.py`` (the README's REST automation) against ``live_stack``: a real
api-server, scheduler, dag-processor and triggerer on 127.0.0.1, with Airflow's metadata in
PostgreSQL. The script runs as a nightly system would run it (a subprocess, the password in
``$AIRFLOW_PASSWORD``); the cluster side is the stack's embedded default (local scheduler,
local store), where the test puts a small synthetic slide.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.postgres_fixture import REQUIRE_ENV, PostgresUnavailable, ensure_postgres
from tests.stack_fixture import Stack

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "airflow_rest.py"
DAG_ID = "celldetector_preprocess"
RUN_TIMEOUT_S = 240


def rest(stack: Stack, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """The script with the stack's URL and admin login, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["AIRFLOW_PASSWORD"] = stack.password if password is None else password
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--url", stack.base_url, "--user", "admin", *args],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60, check=False,
    )


@pytest.fixture(scope="module")
def stack(live_stack: Stack) -> Stack:
    """``live_stack`` once ``celldetector_preprocess`` is parsed."""
    live_stack.wait_for(f"{DAG_ID} to be parsed",
                        lambda: live_stack.api("GET", f"/api/v2/dags/{DAG_ID}").status_code == 200,
                        300)
    return live_stack


@pytest.fixture(scope="module")
def slide(stack: Stack) -> dict[str, Any]:
    """A small synthetic slide in the stack's embedded local store; its data root."""
    from hpc_jobs.config import SiteConfig
    from hpc_jobs.embedded import embedded_site_file
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import SynthSpec, generate

    site = SiteConfig.load(embedded_site_file(stack.home / "var"))
    synth = generate(SynthSpec(width=400, height=300, seed=3), LocalStore(site.store.path),
                     out_truth=site.data_root / "truth" / "rest-script")
    return {"image_id": synth["image_id"], "data_root": site.data_root}


def runs_of(stack: Stack) -> list[str]:
    reply = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100})
    assert reply.status_code == 200, reply.text
    return [r["dag_run_id"] for r in reply.json()["dag_runs"]]


def test_run_preprocess_end_to_end(stack: Stack, slide: dict[str, Any]) -> None:
    """Paused DAG → the script unpauses, triggers with the conf, waits, lists the tasks and
    prints the export task's log; the Zarr is on disk and the run is in the metadata DB."""
    reply = stack.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": True})
    assert reply.status_code == 200 and reply.json()["is_paused"] is True, reply.text
    image_id = slide["image_id"]
    conf = {"image_ids": [image_id], "steps": ["export_zarr"]}

    proc = rest(stack, "run", DAG_ID, "--conf", json.dumps(conf), "--interval", "2",
                "--timeout", str(RUN_TIMEOUT_S), "--log", "image.export_zarr[0]")

    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}\n{stack.diagnostics()}"
    assert f"unpaused {DAG_ID}" in out
    assert stack.api("GET", f"/api/v2/dags/{DAG_ID}").json()["is_paused"] is False
    run_id = re.search(rf"triggered {DAG_ID} run (\S+)", out).group(1)  # type: ignore[union-attr]
    assert f"run {run_id}: success" in out
    # the task table: one row per task instance, the mapped export with its map index
    assert re.search(r"^check_images\s+success\s+1$", out, re.M), out
    assert re.search(r"^image\.export_zarr\[0\]\s+success\s+1$", out, re.M), out
    assert re.search(r"^image\.segment_nuclei\[0\]\s+skipped", out, re.M), out
    # the log fetched through the API is the export task's own
    log = out.split("---- log of image.export_zarr[0], try 1 ----", 1)[1]
    assert "export_zarr" in log and "COMPLETED" in log, log[-3000:]
    # what the user checks afterwards: the conf reached the run, the Zarr exists
    run = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()
    assert run["conf"] == conf and run["state"] == "success"
    assert (Path(slide["data_root"]) / "images" / str(image_id) / "image.zarr").is_dir()
    assert_run_kept_in_postgres(stack, run_id)

    tasks = rest(stack, "tasks", DAG_ID, run_id)
    assert tasks.returncode == 0 and f"run {run_id}: success" in tasks.stdout, tasks.stderr


def assert_run_kept_in_postgres(stack: Stack, run_id: str) -> None:
    """Where PostgreSQL can be had, ``live_stack``'s components keep Airflow's metadata
    there: the run the script triggered is a row of its ``dag_run`` table."""
    import sqlalchemy as sa

    try:
        ensure_postgres()
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(str(exc))
        return  # live_stack fell back to SQLite and warned
    assert stack.metadata_db.startswith("postgresql"), stack.metadata_db
    engine = sa.create_engine(stack.metadata_db)
    try:
        with engine.connect() as conn:
            state = conn.execute(sa.text("SELECT state FROM dag_run WHERE run_id = :r"),
                                 {"r": run_id}).scalar_one()
    finally:
        engine.dispose()
    assert state == "success"


def test_failed_run_exits_1_and_prints_the_failed_tasks_log(stack: Stack) -> None:
    """An image id that does not exist: the run fails in check_images; the script says so
    (exit 1) and prints that task's log, which names the image."""
    proc = rest(stack, "run", DAG_ID, "--conf", json.dumps({"image_ids": [987654]}),
                "--interval", "2", "--timeout", str(RUN_TIMEOUT_S))
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    assert re.search(r"^check_images\s+failed", proc.stdout, re.M), proc.stdout
    log = proc.stdout.split("---- log of check_images, try 1 ----", 1)[1]
    assert "987654" in log, log[-3000:]


def test_wrong_password_is_refused_with_the_fix(stack: Stack) -> None:
    proc = rest(stack, "run", DAG_ID, "--conf", "{}", password="not-the-password")
    assert proc.returncode == 2
    assert "login as 'admin' refused: HTTP 401" in proc.stderr, proc.stderr
    assert "AIRFLOW_PASSWORD" in proc.stderr


def test_unknown_dag_names_the_dags_that_exist(stack: Stack) -> None:
    proc = rest(stack, "run", "celldetector_preproces", "--conf", "{}")
    assert proc.returncode == 2
    assert "DAG 'celldetector_preproces' not found" in proc.stderr, proc.stderr
    assert DAG_ID in proc.stderr.split("fix:", 1)[1]


def test_conf_refused_by_the_params_prints_the_api_message(stack: Stack) -> None:
    """A conf the DAG's params reject: the API's message and the fix; no run is created."""
    before = runs_of(stack)
    proc = rest(stack, "run", DAG_ID, "--conf", json.dumps({"image_ids": "seven"}))
    assert proc.returncode == 2, proc.stdout
    assert f"the conf for '{DAG_ID}' was refused: HTTP 400" in proc.stderr, proc.stderr
    assert "image_ids" in proc.stderr and "params" in proc.stderr.split("fix:", 1)[1]
    assert runs_of(stack) == before


def test_conf_that_is_not_json_is_refused_before_anything_is_sent(stack: Stack) -> None:
    proc = rest(stack, "run", DAG_ID, "--conf", "{image_ids: [1]}", password="wrong")
    assert proc.returncode == 2
    assert "--conf is not JSON" in proc.stderr and "login" not in proc.stderr, proc.stderr
