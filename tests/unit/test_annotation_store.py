"""The annotation store, run against SQLite and a real PostgreSQL (the ``sql_url`` fixture)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from hooks.annotation_schema import VERSION_TABLE, metadata
from hooks.annotations import (
    AnnotationHook,
    AnnotationInputError,
    AnnotationStore,
    AnnotationStoreError,
    NotFound,
    StoreNotMigrated,
    cohen_kappa,
    head_revision,
)

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def nuclei(n: int, roi: str = "tissue_1") -> list[dict[str, Any]]:
    return [
        {"nucleus_id": 100 + i, "x": 10.0 * i, "y": 5.0 * i, "area": 40.0 + i, "roi": roi,
         "marker_mean": 300.0 + i, "marker_skew": float("nan")}
        for i in range(n)
    ]


@pytest.fixture
def store(annotation_store: AnnotationStore) -> AnnotationStore:
    return annotation_store


def add_set(store: AnnotationStore, n: int = 6, run_id: str = "run1", image_id: int = 7) -> int:
    return store.add_candidate_set(
        image_id, run_id, "ecdf_quantile", {"q": 0.95, "statistic": "marker_mean"},
        {"tissue_1": 812.5}, nuclei(n),
    )


# -- schema and migrations -----------------------------------------------------------------


def test_unmigrated_database_is_refused_naming_the_command(sql_url: str) -> None:
    store = AnnotationStore.from_url(sql_url)
    with pytest.raises(StoreNotMigrated, match="omeflow annotations migrate"):
        store.candidate_sets()
    with pytest.raises(StoreNotMigrated, match="not migrated"):
        store.label(1, "alice", "positive")
    store.engine.dispose()


def test_migrate_twice_is_a_no_op_and_matches_the_schema(sql_url: str) -> None:
    """The CLI migrates, a second run changes nothing (data kept), and the migrated tables are
    exactly what hooks/annotation_schema.py declares (a schema change needs a migration)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN")}
    cmd = [sys.executable, "-m", "hpc_jobs.cli", "annotations", "migrate", "--url", sql_url]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"migrated empty -> revision {head_revision()}" in first.stdout
    store = AnnotationStore.from_url(sql_url)
    set_id = add_set(store)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"already at revision {head_revision()}" in second.stdout
    assert [s["id"] for s in store.candidate_sets()] == [set_id]
    assert store.revision() == head_revision()

    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(ctx, metadata) == []
    store.engine.dispose()


def test_status_cli_exit_code_says_whether_migrated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    cmd = [sys.executable, "-m", "hpc_jobs.cli", "annotations", "status", "--url", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 1
    assert "needs `omeflow annotations migrate`" in proc.stdout


# -- loading ------------------------------------------------------------------------------


def test_candidate_set_is_stored_once_per_image_run_and_rule(store: AnnotationStore) -> None:
    set_id = add_set(store)
    assert add_set(store) == set_id  # a retried task: same set, nothing duplicated
    other = store.add_candidate_set(7, "run1", "ecdf_quantile", {"q": 0.9}, {}, nuclei(2))
    assert other != set_id
    (row,) = [s for s in store.candidate_sets(image_id=7) if s["id"] == set_id]
    assert row["n_candidates"] == 6
    assert row["thresholds"] == {"tissue_1": 812.5}
    assert row["params"] == {"q": 0.95, "statistic": "marker_mean"}
    assert row["dag_id"] == "celldetector_candidates"
    assert store.candidate_sets(image_id=8) == []
    cands = store.candidates(set_id)
    assert sorted(c["nucleus_id"] for c in cands) == list(range(100, 106))
    first = store.candidate(cands[0]["id"])
    assert first["stats"]["marker_mean"] == 300.0 + first["nucleus_id"] - 100
    assert first["stats"]["marker_skew"] is None  # NaN stored as null
    assert first["run_id"] == "run1" and first["score"] is None


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({"x": 1, "y": 2, "area": 3}, "lacks nucleus_id"),
        ({"nucleus_id": 1, "x": float("inf"), "y": 2, "area": 3}, "x must be a finite number"),
        ({"nucleus_id": "a", "x": 1, "y": 2, "area": 3}, "nucleus_id must be an integer"),
    ],
)
def test_bad_candidates_are_refused(store: AnnotationStore, candidate: dict, message: str
                                    ) -> None:
    with pytest.raises(AnnotationInputError, match=message):
        store.add_candidate_set(1, "r", "fixed", {"threshold": 200}, {}, [candidate])
    assert store.candidate_sets() == []


def test_crops_round_trip_and_are_replaced(store: AnnotationStore) -> None:
    set_id = add_set(store, n=2)
    other = PNG + b"second"
    assert store.add_crops(set_id, [(100, "dapi", 1, PNG), (100, "composite", 2, PNG)]) == 2
    store.add_crops(set_id, [(100, "dapi", 1, other)])  # a re-fetched chunk replaces
    cid = {c["nucleus_id"]: c["id"] for c in store.candidates(set_id)}[100]
    assert store.crop(cid, "dapi", 1) == other
    assert store.crop(cid, "composite", 2) == PNG
    assert store.candidate(cid)["crops"] == [{"kind": "composite", "zoom": 2},
                                             {"kind": "dapi", "zoom": 1}]
    with pytest.raises(NotFound, match="no 'marker' crop at zoom 1"):
        store.crop(cid, "marker", 1)
    with pytest.raises(AnnotationInputError, match="is not a PNG"):
        store.add_crops(set_id, [(100, "dapi", 1, b"GIF89a")])
    with pytest.raises(AnnotationInputError, match="crop kind"):
        store.add_crops(set_id, [(100, "../x", 1, PNG)])
    with pytest.raises(AnnotationInputError, match=r"no candidate for nucleus ids \[999\]"):
        store.add_crops(set_id, [(999, "dapi", 1, PNG)])


# -- labels --------------------------------------------------------------------------------


def test_every_revision_is_kept_and_undo_steps_back(store: AnnotationStore) -> None:
    set_id = add_set(store, n=2)
    cid = store.candidates(set_id)[0]["id"]
    store.label(cid, "alice", "positive")
    store.label(cid, "alice", "negative")  # a second tab: the last label wins
    store.label(cid, "bob", "unsure")
    current = {r["annotator"]: r["label"] for r in store.labels(set_id=set_id)}
    assert current == {"alice": "negative", "bob": "unsure"}
    history = store.labels(candidate_id=cid, annotator="alice", history=True)
    assert [(r["label"], r["current"]) for r in history] == [("positive", False),
                                                            ("negative", True)]

    result = store.undo(cid, "alice")
    assert result["undone"]["label"] == "negative"
    assert result["current"]["label"] == "positive"
    assert store.undo(cid, "alice")["current"] is None
    assert store.undo(cid, "alice") == {"undone": None, "current": None}
    assert [r["annotator"] for r in store.labels(set_id=set_id)] == ["bob"]
    history = store.labels(candidate_id=cid, annotator="alice", history=True)
    assert len(history) == 2 and all(r["undone_at"] is not None for r in history)

    with pytest.raises(AnnotationInputError, match="use one of positive, negative, unsure"):
        store.label(cid, "alice", "maybe")
    with pytest.raises(NotFound, match="no candidate 424242"):
        store.label(424242, "alice", "positive")


def test_progress_agreement_and_kappa(store: AnnotationStore) -> None:
    set_id = add_set(store, n=6)
    ids = [c["id"] for c in store.candidates(set_id)]
    a = ["positive", "positive", "negative", "negative", "unsure"]
    b = ["positive", "negative", "negative", "negative", "unsure"]
    for cid, la, lb in zip(ids, a, b, strict=False):
        store.label(cid, "alice", la)
        store.label(cid, "bob", lb)
    store.label(ids[5], "carol", "positive")
    progress = store.progress(set_id)
    assert progress["total"] == 6 and progress["labelled"] == 6
    assert progress["annotators"]["alice"] == {"labelled": 5, "positive": 2, "negative": 2,
                                               "unsure": 1}
    (pair,) = store.agreement(set_id=set_id)
    assert (pair["a"], pair["b"], pair["n"], pair["agree"]) == ("alice", "bob", 5, 4)
    assert pair["counts"]["positive"]["negative"] == 1
    # by hand: po = 4/5; pe = (2*1 + 2*3 + 1*1) / 25 = 9/25; kappa = (0.8-0.36)/(0.64)
    assert pair["kappa"] == pytest.approx((0.8 - 0.36) / 0.64)
    assert store.agreement(image_id=7) == [pair]
    assert cohen_kappa([("positive", "positive")] * 3) is None


def test_export_csv_and_parquet(store: AnnotationStore) -> None:
    set_id = add_set(store, n=3)
    c0, c1, _ = store.candidates(set_id)
    store.label(c0["id"], "alice", "positive")
    store.label(c1["id"], "alice", "unsure")
    store.label(c1["id"], "alice", "negative")
    rows = list(csv.DictReader(io.StringIO(store.export_labels(set_id, "csv").decode())))
    assert {(int(r["nucleus_id"]), r["label"]) for r in rows} == {
        (c0["nucleus_id"], "positive"), (c1["nucleus_id"], "negative")}
    assert rows[0]["image_id"] == "7" and float(rows[0]["x"]) == c0["x"]

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.export_labels(set_id, "parquet", history=True)))
    assert table.num_rows == 3
    assert sorted(table.column("label").to_pylist()) == ["negative", "positive", "unsure"]
    assert sum(table.column("current").to_pylist()) == 2
    with pytest.raises(AnnotationInputError, match="use one of csv, parquet"):
        store.export_labels(set_id, "xlsx")


# -- the queue ------------------------------------------------------------------------------


def test_queue_serves_different_candidates_to_two_annotators(store: AnnotationStore) -> None:
    set_id = add_set(store, n=3)
    a = store.next_candidate(set_id, "alice")
    assert store.next_candidate(set_id, "alice")["id"] == a["id"]  # a reload: same one
    b = store.next_candidate(set_id, "bob")
    assert b["id"] != a["id"]
    store.label(a["id"], "alice", "positive")
    a2 = store.next_candidate(set_id, "alice")
    assert a2["id"] not in (a["id"], b["id"])
    # bob skips his candidate: it goes back to the pool, and a2 is leased to alice
    assert store.next_candidate(set_id, "bob", exclude=[b["id"]]) is None
    store.label(a2["id"], "alice", "negative")
    assert store.next_candidate(set_id, "alice")["id"] == b["id"]
    store.label(b["id"], "alice", "negative")
    assert store.next_candidate(set_id, "alice") is None
    assert store.next_candidate(set_id, "bob") is None  # everything labelled by someone
    # agreement mode: bob is served what alice labelled, nothing is leased
    served = {c["id"] for c in store.next_candidates(set_id, "bob", n=10, agreement=True)}
    assert served == {a["id"], a2["id"], b["id"]}


def test_lease_expires(store: AnnotationStore) -> None:
    set_id = add_set(store, n=1)
    a = store.next_candidate(set_id, "alice", lease_s=0.5)
    assert store.next_candidate(set_id, "bob") is None
    time.sleep(0.6)
    assert store.next_candidate(set_id, "bob")["id"] == a["id"]


def test_uncertain_order_serves_highest_score_first(store: AnnotationStore) -> None:
    set_id = add_set(store, n=4)
    store.set_scores(set_id, {100: 0.1, 101: 0.9, 102: 0.5})
    grid = store.next_candidates(set_id, "alice", n=4, order="uncertain")
    assert [c["nucleus_id"] for c in grid] == [101, 102, 100, 103]  # unscored last
    with pytest.raises(AnnotationInputError, match="use one of random, uncertain"):
        store.next_candidates(set_id, "alice", order="oldest")


# -- the hook --------------------------------------------------------------------------------


def test_hook_without_connection_uses_embedded_sqlite(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_OMEFLOW_ANNOTATIONS", raising=False)
    hook = AnnotationHook()
    assert hook.get_url().database == str(tmp_path / "var" / "annotations.sqlite")
    store = hook.get_store()
    with pytest.raises(StoreNotMigrated):
        store.models()
    store.migrate()
    model_id = store.add_model("/models/m1.pt", {"lr": 0.001}, "ab" * 32, {"f1": 0.8})
    assert store.models()[0]["id"] == model_id
    assert (tmp_path / "var" / "annotations.sqlite").is_file()


def test_hook_refuses_a_connection_that_is_not_postgres(monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_OMEFLOW_ANNOTATIONS", "mysql://u:p@h/db")
    with pytest.raises(AnnotationStoreError, match="needs a connection of type 'postgres'"):
        AnnotationHook().get_url()


def test_hook_opens_postgres_through_the_connection(postgres_db: str, monkeypatch) -> None:
    url = sa.make_url(postgres_db)
    monkeypatch.setenv(
        "AIRFLOW_CONN_OMEFLOW_ANNOTATIONS",
        f"postgres://{url.username}:{url.password}@{url.host}:{url.port}/{url.database}",
    )
    store = AnnotationHook().get_store()
    assert store.engine.dialect.name == "postgresql"
    store.migrate()
    set_id = add_set(store, n=1)
    assert AnnotationStore.from_url(postgres_db).candidate_sets()[0]["id"] == set_id
    store.engine.dispose()
