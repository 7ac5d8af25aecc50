"""``omeflow step run``: one step through the gateway on the embedded default, no Airflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hpc_jobs.config import SiteConfig
from hpc_jobs.embedded import embedded_site_file


def _omeflow(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OMEFLOW_SITE_CONFIG"}
    env["AIRFLOW_HOME"] = str(home)
    code = (
        "import sys; from hpc_jobs.cli import main; rc = main(sys.argv[1:]); "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'); "
        "print('AIRFLOW_MODULES', loaded, file=sys.stderr); raise SystemExit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True, timeout=240, check=False)


def test_step_run_cluster_check_prints_log_and_summary(tmp_path: Path) -> None:
    proc = _omeflow(tmp_path, "step", "run", "cluster_check", "--params", '{"sleep_s": 1}')
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["store"] == "local" and summary["slurm_job_id"] is None
    assert "sleeping 1 s as asked" in proc.stderr, "the job log is shown"
    assert "AIRFLOW_MODULES []" in proc.stderr, "cluster side: no Airflow import"
    site = SiteConfig.load(tmp_path / "var" / "site.toml")  # the embedded default, created
    assert site.scheduler == "local" and site.job_root == tmp_path / "var" / "jobs"
    jobs = [p for p in site.job_root.iterdir() if p.name.startswith("step-run.cluster_check.")]
    assert len(jobs) == 1, "one job, in the embedded job root"


def test_step_run_names_the_state_of_a_failed_job(tmp_path: Path) -> None:
    proc = _omeflow(tmp_path, "step", "run", "cluster_check", "--params", '{"exit_code": 3}')
    assert proc.returncode == 1
    assert "ended FAILED (exit code 3" in proc.stderr, proc.stderr
    assert "exiting with status 3 as asked" in proc.stderr
    assert proc.stdout == ""


def test_step_run_refuses_bad_params_naming_the_field(tmp_path: Path) -> None:
    proc = _omeflow(tmp_path, "step", "run", "cluster_check", "--params", '{"sleep": 1}')
    assert proc.returncode == 2
    assert "refused" in proc.stderr and "sleep" in proc.stderr, proc.stderr
    proc = _omeflow(tmp_path, "step", "run", "cluster_chek")
    assert proc.returncode == 2 and "cluster_check" in proc.stderr  # argparse lists the steps
    proc = _omeflow(tmp_path, "step", "run", "cluster_check", "--params", "sleep_s=1")
    assert proc.returncode == 2 and "not JSON" in proc.stderr


def test_embedded_site_file_is_created_once(tmp_path: Path) -> None:
    path = embedded_site_file(tmp_path / "var")
    site = SiteConfig.load(path)
    assert site.store.kind == "local" and (tmp_path / "var" / "store").is_dir()
    path.write_text(path.read_text().replace('scheduler = "local"', 'scheduler = "local"\n'))
    before = path.read_text()
    assert embedded_site_file(tmp_path / "var") == path and path.read_text() == before
