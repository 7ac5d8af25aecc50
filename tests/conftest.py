"""Shared fixtures: an isolated AIRFLOW_HOME and a ``run_dag`` helper around ``dag.test()``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.postgres_fixture import (  # noqa: F401  (re-exported fixtures)
    annotation_store,
    postgres_db,
    postgres_url,
    sql_url,
)
from tests.sandbox_fixture import sandbox  # noqa: F401  (re-exported fixture)
from tests.stack_fixture import live_stack, migrated_home  # noqa: F401  (re-exported fixture)

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of a migrated, throw-away AIRFLOW_HOME that loads this repo's DAGs (a
    retried cluster-step task, ``[omeflow] hpc_task_retries``, waits 5 s, not 2 min)."""
    env = migrated_home(tmp_path_factory.mktemp("airflow"))
    env["AIRFLOW__OMEFLOW__HPC_RETRY_DELAY_S"] = "5"
    return env


@pytest.fixture(scope="session")
def run_dag(airflow_env: dict[str, str]) -> Callable[..., tuple[dict[str, Any], str]]:
    """``run_dag(dag_id, conf, env={...})`` → (result dict, full output of the run)."""

    def _run(
        dag_id: str,
        conf: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 900,
    ) -> tuple[dict[str, Any], str]:
        full_env = dict(airflow_env, **(env or {}))
        proc = subprocess.run(
            [PY, str(REPO / "tests" / "airflow_runner.py"), dag_id, json.dumps(conf or {})],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
        )
        output = proc.stdout + proc.stderr
        for line in proc.stdout.splitlines():
            if line.startswith("OMEFLOW_RESULT "):
                return json.loads(line.split(" ", 1)[1]), output
        raise AssertionError(
            f"dag.test() printed no result (exit {proc.returncode}):\n{output[-6000:]}"
        )

    return _run


@pytest.fixture
def embedded_site(airflow_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The embedded default's site of the DAG tests' ``AIRFLOW_HOME``: where the jobs that
    ``run_dag`` starts keep their job dirs, data and local store (for preparing inputs and
    checking outputs)."""
    from hooks.hpc import embedded_site_config
    from hpc_jobs.config import SiteConfig

    monkeypatch.setenv("AIRFLOW_HOME", airflow_env["AIRFLOW_HOME"])
    monkeypatch.delenv("OMEFLOW_SITE_CONFIG", raising=False)
    return SiteConfig.load(embedded_site_config())


@pytest.fixture
def embedded_annotations(airflow_env: dict[str, str]) -> Iterator[Any]:
    """The annotation store that ``run_dag``'s tasks use (the embedded SQLite), new and
    migrated for each test: the Airflow home is shared by the whole session, and a model one
    test made *current* must not decide what another test's DAG does."""
    from hooks.annotations import AnnotationStore, sqlite_engine

    path = Path(airflow_env["AIRFLOW_HOME"]) / "var" / "annotations.sqlite"
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    store = AnnotationStore(sqlite_engine(path), check_schema=False)
    store.migrate()
    yield store
    store.engine.dispose()
