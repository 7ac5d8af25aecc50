"""The label snapshot and the model registry of celldetector_train, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from hooks.annotations import AnnotationStore, NotFound
from hpc_jobs.classifier.snapshot import snapshot_hash
from operators.training import build_snapshot, register_model


def _set(store: AnnotationStore, image_id: int, n: int) -> dict[int, int]:
    set_id = store.add_candidate_set(
        image_id, "r1", "fixed", {"threshold": 200}, {},
        [{"nucleus_id": i, "x": 10.0 * i, "y": 5.0, "area": 50.0} for i in range(1, n + 1)])
    return {c["nucleus_id"]: c["id"] for c in store.candidates(set_id)} | {0: set_id}


def test_snapshot_drops_unsure_and_conflicts_and_names_missing_labels(
        annotation_store: AnnotationStore) -> None:
    store = annotation_store
    cands = _set(store, 7, 8)
    for nid in range(1, 4):
        store.label(cands[nid], "alice", "positive")
    for nid in range(4, 8):
        store.label(cands[nid], "alice", "negative")
    store.label(cands[8], "alice", "unsure")
    store.label(cands[3], "bob", "negative")  # conflict: left out
    store.label(cands[4], "bob", "negative")  # agreement: kept once
    snap = build_snapshot(store, set_ids=[cands[0]], min_per_class=2)
    want = [[7, 1, 1], [7, 2, 1], [7, 4, 0], [7, 5, 0], [7, 6, 0], [7, 7, 0]]
    assert snap["labels"] == want and snap["snapshot_hash"] == snapshot_hash(want)
    assert (snap["unsure_dropped"], snap["conflicts_dropped"]) == (1, 1)
    assert snap["counts"] == {"positive": 2, "negative": 4}
    with pytest.raises(AirflowFailException,
                       match=r"need 5 per class .*: 3 more positive, 1 more negative"):
        build_snapshot(store, image_ids=[7], min_per_class=5)
    with pytest.raises(AirflowFailException, match="give set_ids or image_ids"):
        build_snapshot(store)


def _summary(path: str, roc: float, compare: float | None = None) -> dict[str, Any]:
    metrics: dict[str, Any] = {"model": {"roc_auc": roc, "pr_auc": roc},
                               "baseline_marker_mean": {"roc_auc": 0.6, "pr_auc": 0.5}}
    if compare is not None:
        metrics["compare_with"] = {"name": "old", "roc_auc": compare, "pr_auc": compare}
    return {"path": path, "name": path.rsplit("/", 1)[-1], "snapshot_hash": "a" * 64,
            "params": {"epochs": 3}, "metrics": metrics, "git_commit": "b" * 40,
            "split": {"kind": "by image"}, "training": {"history": [1], "best_epoch": 2}}


def test_new_model_becomes_current_only_when_it_beats_the_current_one(
        annotation_store: AnnotationStore) -> None:
    store = annotation_store
    snap = {"snapshot_hash": "a" * 64, "labels_at": "2026-11-21T10:00:00+00:00",
            "set_ids": [1], "image_ids": [], "counts": {"positive": 20, "negative": 30}}
    assert store.current_model() is None
    first = register_model(store, _summary("/m/a.pt", 0.9), snap)
    assert first["current"] and first["reason"] == "no model was current"
    worse = register_model(store, _summary("/m/b.pt", 0.85, compare=0.9), snap,
                           current_id=first["model_id"])
    assert not worse["current"] and store.current_model()["id"] == first["model_id"]
    better = register_model(store, _summary("/m/c.pt", 0.95, compare=0.9), snap,
                            current_id=first["model_id"])
    assert better["current"] and store.current_model()["id"] == better["model_id"]
    forced = register_model(store, _summary("/m/d.pt", 0.5, compare=0.95), snap,
                            promote=True, current_id=better["model_id"])
    assert forced["current"]
    rows = store.models()
    assert [r["current"] for r in rows] == [True, False, False, False]  # newest first
    row = store.model(better["model_id"])
    assert row["git_commit"] == "b" * 40 and row["data_hash"] == "a" * 64
    assert row["labels_at"].isoformat() == "2026-11-21T10:00:00+00:00"
    assert row["params"]["split"] == {"kind": "by image"} and row["name"] == "c.pt"
    with pytest.raises(NotFound):
        store.promote_model(999)
    with pytest.raises(AirflowFailException, match="not the one this run built"):
        register_model(store, _summary("/m/e.pt", 0.9), {**snap, "snapshot_hash": "c" * 64})
