"""Annotators in parallel against a real PostgreSQL (and the embedded SQLite): the queue never
serves one candidate to two annotators, and no label revision is lost."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hooks.annotation_schema import LABELS
from hooks.annotations import AnnotationStore

ANNOTATORS = ("alice", "bob", "carol")
LABELS_EACH = 200


@pytest.fixture
def store(annotation_store: AnnotationStore) -> AnnotationStore:
    return annotation_store


def add_set(store: AnnotationStore, n: int) -> int:
    return store.add_candidate_set(
        3, "manual__1", "fixed", {"threshold": 200}, {"tissue_1": 200.0},
        [{"nucleus_id": i, "x": i, "y": i, "area": 30.0, "roi": "tissue_1"} for i in range(n)],
    )


def in_parallel(workers: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run the callables in threads released together; re-raise the first error."""
    start = threading.Barrier(len(workers))
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(name: str, fn: Callable[[], Any]) -> None:
        start.wait()
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in workers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    assert len(results) == len(workers), "a worker did not finish"
    return results


def test_queue_splits_a_set_between_annotators(store: AnnotationStore) -> None:
    """3 annotators drain 300 candidates at once (120 each at most, so any two take at most
    240 and the third always gets work, however the threads are scheduled): every candidate
    is labelled exactly once; nobody was served a candidate someone else held or had
    labelled."""
    set_id = add_set(store, 300)
    cap = 120

    def work(name: str) -> list[int]:
        done = []
        while len(done) < cap:
            cand = store.next_candidate(set_id, name)
            if cand is None:
                break
            store.label(cand["id"], name, random.choice(LABELS))
            done.append(cand["id"])
        return done

    done = in_parallel({name: (lambda n=name: work(n)) for name in ANNOTATORS})
    everything = [cid for ids in done.values() for cid in ids]
    assert len(everything) == 300
    assert Counter(everything).most_common(1)[0][1] == 1, "a candidate was served twice"
    assert all(done.values()), "an annotator got no work"
    current = store.labels(set_id=set_id)
    assert len(current) == 300
    assert store.progress(set_id)["labelled"] == 300


def test_parallel_annotators_and_two_tabs_lose_no_revision(store: AnnotationStore) -> None:
    """alice (two tabs) and bob each give 200 labels to the same 50 candidates in parallel:
    all 600 revisions are stored with their values, and each current label is that
    annotator's newest revision."""
    set_id = add_set(store, 50)
    ids = [c["id"] for c in store.candidates(set_id)]

    def work(annotator: str, seed: int) -> list[tuple[int, str]]:
        rng = random.Random(seed)
        given = []
        for i in range(LABELS_EACH):
            cid, value = ids[i % len(ids)], rng.choice(LABELS)
            store.label(cid, annotator, value)
            given.append((cid, value))
        return given

    given = in_parallel({
        "alice-tab1": lambda: work("alice", 1),
        "alice-tab2": lambda: work("alice", 2),
        "bob": lambda: work("bob", 3),
    })
    history = store.labels(set_id=set_id, history=True)
    assert len(history) == 3 * LABELS_EACH
    for annotator, tabs in (("alice", ("alice-tab1", "alice-tab2")), ("bob", ("bob",))):
        stored = Counter((r["candidate_id"], r["label"]) for r in history
                         if r["annotator"] == annotator)
        assert stored == Counter(pair for tab in tabs for pair in given[tab])
        newest: dict[int, dict[str, Any]] = {}
        for r in history:
            if r["annotator"] == annotator:
                newest[r["candidate_id"]] = r  # history is ordered by revision id
        current = {r["candidate_id"]: r for r in store.labels(set_id=set_id,
                                                              annotator=annotator)}
        assert set(current) == set(ids)
        assert {c: r["id"] for c, r in current.items()} == {
            c: r["id"] for c, r in newest.items()}
        assert sum(r["current"] for r in history if r["annotator"] == annotator) == len(ids)


def test_same_annotator_two_tabs_last_label_wins(store: AnnotationStore) -> None:
    set_id = add_set(store, 1)
    cid = store.candidates(set_id)[0]["id"]
    tab1 = AnnotationStore.from_url(store.engine.url)  # a second process's own engine
    tab1.label(cid, "alice", "positive")
    store.label(cid, "alice", "negative")
    (current,) = store.labels(candidate_id=cid)
    assert current["label"] == "negative"
    assert [r["label"] for r in tab1.labels(candidate_id=cid, history=True)] == [
        "positive", "negative"]
    tab1.engine.dispose()


WORKER = """
import random, sys
from hooks.annotations import AnnotationStore
url, annotator, seed, ids = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
store = AnnotationStore.from_url(url)
rng = random.Random(seed)
for i in range(200):
    store.label(int(ids[i % len(ids)]), annotator, rng.choice(["positive", "negative", "unsure"]))
"""


def test_annotators_in_separate_processes_lose_nothing(store: AnnotationStore) -> None:
    """Two api-server workers (processes with their own engines) x 200 labels each: every
    label each process gave is stored."""
    set_id = add_set(store, 40)
    ids = ",".join(str(c["id"]) for c in store.candidates(set_id))
    url = store.engine.url.render_as_string(hide_password=False)
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, url, name, str(seed), ids],
                         cwd=Path(__file__).resolve().parents[2], stderr=subprocess.PIPE,
                         text=True)
        for seed, name in enumerate(("alice", "bob"))
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    history = store.labels(set_id=set_id, history=True)
    id_list = [int(i) for i in ids.split(",")]
    for seed, name in enumerate(("alice", "bob")):
        rng = random.Random(seed)  # the worker's own sequence, replayed
        expected = Counter((id_list[i % len(id_list)], rng.choice(LABELS)) for i in range(200))
        assert Counter((r["candidate_id"], r["label"]) for r in history
                       if r["annotator"] == name) == expected
    assert len(store.labels(set_id=set_id)) == 80  # 40 candidates x 2 annotators


def test_taking_candidates_never_waits_on_a_row_another_annotator_locked(
    postgres_db: str,
) -> None:
    """alice moves on while bob's transaction holds alice's old (expired) candidate, about to
    take it over: alice must not wait for that row lock (two such waits deadlock)."""
    import sqlalchemy as sa

    AnnotationStore.from_url(postgres_db).migrate()
    store = AnnotationStore.from_url(postgres_db)

    @sa.event.listens_for(store.engine, "connect")
    def _no_waiting(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:  # a lock wait becomes an error instead of a hang
            cur.execute("SET lock_timeout = '5s'")
        dbapi_conn.commit()

    set_id = add_set(store, 3)
    old = store.next_candidate(set_id, "alice")
    other = sa.create_engine(postgres_db)
    with other.connect() as bob:
        bob.execute(sa.text("SELECT id FROM candidates WHERE id = :i FOR UPDATE"),
                    {"i": old["id"]})
        new = store.next_candidate(set_id, "alice", exclude=[old["id"]])
        bob.rollback()
    assert new is not None and new["id"] != old["id"]
    other.dispose()
    store.engine.dispose()
