"""Which tasks get an OMERO session key, when, and for how long (Airflow side).

The site's OMERO connection comes from ``[omeflow] omero_conn_id`` (every DAG's store-opening
tasks get it without passing it), a key is minted only when a job is created (never on a
reattach), lives as long as the task may wait for its job, and a key no job took is ended.
A fake gateway (which job keys exist) and a fake ``OmeroSessionHook`` stand in for the cluster
and the OMERO server.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

import hooks.omero
from hooks.hpc import HpcGatewayError
from hpc_jobs.protocol import JobState, JobStatus, LogReply, SubmitReply
from hpc_jobs.registry import CLUSTER_CHECK, EXPORT_ZARR, get_step
from operators.celldetector import SegmentNucleiOperator
from operators.hpc_step import HpcStepOperator, task_job_key

REPO = Path(__file__).resolve().parents[2]
SITE_CONN = "omero_site"
SETTING = "AIRFLOW__OMEFLOW__OMERO_CONN_ID"


class Cluster:
    """The gateway as the operator sees it: which job keys exist, what each submit carried."""

    transport = "local"

    def __init__(self, existing: tuple[str, ...] = (), refuse: str | None = None) -> None:
        self.jobs = {key: str(100 + i) for i, key in enumerate(existing)}
        self.submits: list[tuple[str, dict[str, str]]] = []
        self.refuse = refuse

    def status(self, job_ids: list[str]) -> list[JobStatus]:
        return [
            JobStatus(job_id=j, native_id=self.jobs.get(j),
                      state=JobState.RUNNING if j in self.jobs else JobState.UNKNOWN)
            for j in job_ids
        ]

    def submit(self, step: str, job_key: str, params: Any = None, resources: Any = None,
               secrets: dict[str, str] | None = None) -> SubmitReply:
        self.submits.append((job_key, dict(secrets or {})))
        if self.refuse:
            raise HpcGatewayError(self.refuse, "refused")
        created = job_key not in self.jobs
        self.jobs.setdefault(job_key, str(200 + len(self.jobs)))
        return SubmitReply(job_id=job_key, native_id=self.jobs[job_key], created=created,
                           state=JobState.PENDING)

    def log(self, job_id: str, offset: int = 0, max_bytes: int = 0) -> LogReply:
        return LogReply(job_id=job_id, offset=0, next_offset=0, size=0, text="")


class Minter:
    """``OmeroSessionHook`` without a server: records what was minted and ended."""

    minted: list[tuple[str, int, int | None]] = []
    closed: list[str] = []

    def __init__(self, omero_conn_id: str) -> None:
        self.conn_id = omero_conn_id

    def mint_session_key(self, ttl_s: int = 24 * 3600, idle_s: int | None = None,
                         user: str | None = None, group: str | None = None) -> str:
        Minter.minted.append((self.conn_id, ttl_s, idle_s))
        return f"session-{len(Minter.minted)}-0000"

    def close_session(self, key: str) -> bool:
        Minter.closed.append(key)
        return True


class TI:
    dag_id, run_id, task_id, map_index, try_number = "dag", "manual__1", "t", -1, 1

    def xcom_push(self, key: str, value: Any) -> None:
        pass


KEY = task_job_key("dag", "manual__1", "t", -1, 1)


@pytest.fixture(autouse=True)
def minter(monkeypatch: pytest.MonkeyPatch) -> type[Minter]:
    Minter.minted, Minter.closed = [], []
    monkeypatch.setattr(hooks.omero, "OmeroSessionHook", Minter)
    monkeypatch.delenv(SETTING, raising=False)
    return Minter


def _run(op: HpcStepOperator, cluster: Cluster) -> None:
    op.__dict__["hook"] = cluster  # the cached hook property
    with pytest.raises(TaskDeferred):
        op.execute({"ti": TI()})


def _export(**kwargs: Any) -> HpcStepOperator:
    return HpcStepOperator(task_id="t", step=EXPORT_ZARR, step_params={"image_id": 1}, **kwargs)


def test_the_site_setting_gives_store_steps_a_key_and_others_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SETTING, SITE_CONN)
    image, check = Cluster(), Cluster()
    _run(_export(), image)
    _run(HpcStepOperator(task_id="t", step=CLUSTER_CHECK), check)
    assert [m[0] for m in Minter.minted] == [SITE_CONN]  # the image step only
    assert image.submits == [(KEY, {"omero_session_key": "session-1-0000"})]
    assert check.submits == [(KEY, {})]


def test_without_the_setting_nothing_mints_and_an_explicit_connection_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = Cluster()
    _run(_export(), cluster)
    assert Minter.minted == [] and cluster.submits == [(KEY, {})]

    monkeypatch.setenv(SETTING, SITE_CONN)
    _run(_export(omero_conn_id="omero_lab2"), Cluster())
    _run(_export(omero_conn_id=""), Cluster())  # explicitly none
    assert [m[0] for m in Minter.minted] == ["omero_lab2"]


def test_a_reattach_mints_nothing_a_new_job_mints_once() -> None:
    existing = Cluster(existing=(KEY,))
    _run(_export(omero_conn_id=SITE_CONN), existing)
    assert Minter.minted == []
    assert existing.submits == [(KEY, {})], "a reattach sends no secrets"

    fresh = Cluster()
    _run(_export(omero_conn_id=SITE_CONN), fresh)
    assert len(Minter.minted) == 1
    assert fresh.submits == [(KEY, {"omero_session_key": "session-1-0000"})]
    assert Minter.closed == []


def test_the_key_lives_as_long_as_the_task_waits_for_its_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SETTING, SITE_CONN)
    _run(_export(), Cluster())  # export_zarr: 120 min time limit + 1 day in the queue
    # a throttled array: 10 tasks, 2 at a time = 5 waves of 30 min, plus 2 h in the queue
    _run(_export(hpc_resources={"time_min": 30, "array": "0-9%2"},
                 queue_allowance=timedelta(hours=2)), Cluster())
    assert get_step(EXPORT_ZARR).resources.time_min == 120
    assert Minter.minted == [
        (SITE_CONN, 120 * 60 + 86400, 120 * 60 + 86400),
        (SITE_CONN, 5 * 30 * 60 + 7200, 5 * 30 * 60 + 7200),
    ]


def test_a_wait_longer_than_a_session_may_live_is_refused_before_any_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SETTING, SITE_CONN)
    cluster = Cluster()
    op = _export(hpc_resources={"time_min": 1440}, queue_allowance=timedelta(days=8))
    op.__dict__["hook"] = cluster
    with pytest.raises(AirflowFailException, match="lower hpc_resources time_min.*queue_allowance"):
        op.execute({"ti": TI()})
    assert Minter.minted == [] and cluster.submits == []


def test_a_key_no_job_took_is_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SETTING, SITE_CONN)

    class Racing(Cluster):
        """Another submit of the same key created the job between status and submit."""

        def status(self, job_ids: list[str]) -> list[JobStatus]:
            answer = super().status(job_ids)
            self.jobs.setdefault(job_ids[0], "300")
            return answer

    _run(_export(), Racing())
    assert Minter.closed == ["session-1-0000"]

    op = _export()
    op.__dict__["hook"] = Cluster(refuse="CONFLICT")
    with pytest.raises(HpcGatewayError):
        op.execute({"ti": TI()})
    assert Minter.closed == ["session-1-0000", "session-2-0000"]

    op = _export()  # sbatch timed out: the job directory keeps the key for a resubmit
    op.__dict__["hook"] = Cluster(refuse="RETRY_SAME_KEY")
    with pytest.raises(HpcGatewayError):
        op.execute({"ti": TI()})
    assert Minter.closed == ["session-1-0000", "session-2-0000"]


def test_the_segmentation_merge_job_gets_its_own_key_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SETTING, SITE_CONN)
    op = SegmentNucleiOperator(task_id="t", image_id=1, array_tasks=2)
    tiles = {"job_id": KEY, "native_id": "100", "state": "COMPLETED", "exit_code": 0}
    merge_key = task_job_key("dag", "manual__1", "t", -1, 1, "merge")
    for cluster in (Cluster(existing=(KEY,)), Cluster(existing=(KEY, merge_key))):
        op.__dict__["hook"] = cluster
        with pytest.raises(TaskDeferred):
            op.execute_complete({"ti": TI()}, tiles)
        assert [s[0] for s in cluster.submits] == [merge_key]
    ttl = int(op.deferral_timeout().total_seconds())
    assert Minter.minted == [(SITE_CONN, ttl, ttl)], "new merge job: one key; reattach: none"


def test_every_dag_gives_its_store_steps_the_site_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SETTING, SITE_CONN)
    dagbag = DagBag(str(REPO / "dags"))
    assert not dagbag.import_errors, dagbag.import_errors
    store_tasks = 0
    for dag in dagbag.dags.values():
        for task in dag.tasks:
            if not isinstance(task, HpcStepOperator):
                continue
            needs_store = get_step(task.step).needs_store
            if needs_store:
                store_tasks += 1
                assert task.omero_conn_id == SITE_CONN, (dag.dag_id, task.task_id)
            assert task.needs_session() is needs_store, (dag.dag_id, task.task_id)
    assert store_tasks >= 4  # check_images, export_zarr, segment_nuclei, ecdf
