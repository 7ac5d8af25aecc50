"""Labels per second the annotation store takes, on SQLite and PostgreSQL.

For each backend, on a fresh migrated database with one candidate set (``--candidates``
candidates, one 10 KB PNG crop each), measures:

- ``labels/s(1)``: one annotator labelling ``--labels`` candidates in a row;
- ``labels/s(P)``: ``--annotators`` annotators in parallel threads, ``--labels`` each;
- ``queue/s``: one annotator's ``next_candidate`` + ``label`` cycles (what the page does per
  key press);
- ``crops/s``: ``crop()`` reads (one PNG each);

and prints PostgreSQL / SQLite ratios. PostgreSQL: ``--pg-url`` (a role that may CREATE
DATABASE), else the local cluster through ``tests.postgres_fixture.ensure_postgres`` (root).

    .venv/bin/python benchmarks/annotation_store.py [--labels 2000] [--annotators 4] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hooks.annotation_schema import LABELS  # noqa: E402
from hooks.annotations import AnnotationStore  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(10_000)


def fill(store: AnnotationStore, n: int, run_id: str = "bench") -> list[int]:
    set_id = store.add_candidate_set(
        1, run_id, "fixed", {"threshold": 200}, {"tissue_1": 200.0},
        [{"nucleus_id": i, "x": i, "y": i, "area": 30.0, "roi": "tissue_1",
          "marker_mean": 250.0} for i in range(n)],
    )
    for start in range(0, n, 500):
        store.add_crops(set_id, [(i, "composite", 1, PNG) for i in range(start,
                                                                        min(n, start + 500))])
    return [c["id"] for c in store.candidates(set_id)]


def rate(count: int, fn) -> float:
    t0 = time.perf_counter()
    fn()
    return count / (time.perf_counter() - t0)


def measure(url: str, labels: int, annotators: int) -> dict[str, float]:
    store = AnnotationStore.from_url(url)
    store.migrate()
    ids = fill(store, max(labels, 100))
    rng = random.Random(0)

    def one(name: str) -> None:
        for i in range(labels):
            store.label(ids[i % len(ids)], name, rng.choice(LABELS))

    def parallel() -> None:
        threads = [threading.Thread(target=one, args=(f"p{k}",)) for k in range(annotators)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    queue_ids = fill(store, labels // 2, run_id="bench-queue")
    set_id = store.candidate(queue_ids[0])["set_id"]

    def queue() -> None:
        for _ in range(labels // 2):
            cand = store.next_candidate(set_id, "queue")
            store.label(cand["id"], "queue", "negative")

    def crops() -> None:
        for i in range(labels):
            store.crop(ids[i % len(ids)], "composite", 1)

    result = {
        "one": rate(labels, lambda: one("solo")),
        "parallel": rate(labels * annotators, parallel),
        "queue": rate(labels // 2, queue),
        "crops": rate(labels, crops),
    }
    stored = len(store.labels(history=True))
    assert stored == labels * (annotators + 1) + labels // 2, "labels were lost"
    store.engine.dispose()
    return result


def postgres_database(admin_url: str) -> tuple[str, sa.Engine, str]:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"omeflow_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, admin, name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=2000, help="labels per annotator")
    parser.add_argument("--annotators", type=int, default=4, help="parallel annotators")
    parser.add_argument("--pg-url", help="admin URL of a PostgreSQL (CREATEDB role)")
    parser.add_argument("--quick", action="store_true", help="200 labels, 2 annotators")
    args = parser.parse_args()
    if args.quick:
        args.labels, args.annotators = 200, 2
    if args.pg_url:
        pg_admin = args.pg_url
    else:
        from tests.postgres_fixture import ensure_postgres

        pg_admin = ensure_postgres()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = measure(f"sqlite:///{tmp}/bench.sqlite", args.labels,
                                    args.annotators)
    url, admin, name = postgres_database(pg_admin)
    try:
        results["postgresql"] = measure(url, args.labels, args.annotators)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    p = args.annotators
    print(f"{'backend':<11} {'labels/s(1)':>12} {f'labels/s({p})':>12} {'queue/s':>9} "
          f"{'crops/s':>9}")
    for backend, r in results.items():
        print(f"{backend:<11} {r['one']:>12.1f} {r['parallel']:>12.1f} {r['queue']:>9.1f} "
              f"{r['crops']:>9.1f}")
    sq, pg = results["sqlite"], results["postgresql"]
    print(f"ratio postgresql / sqlite labels/s: {pg['one'] / sq['one']:.2f} (1 annotator), "
          f"{pg['parallel'] / sq['parallel']:.2f} ({p} in parallel); queue "
          f"{pg['queue'] / sq['queue']:.2f}; crops {pg['crops'] / sq['crops']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
