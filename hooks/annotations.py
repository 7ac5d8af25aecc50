"""The annotation store: candidate sets, their crops, people's labels, and the model registry.

Lives on the Airflow side; the cluster never gets database credentials. PostgreSQL through
``apache-airflow-providers-postgres`` when the connection ``omeflow_annotations`` exists,
else SQLite in ``$AIRFLOW_HOME/var/annotations.sqlite`` (the embedded default; the choice is
logged). One code path for both: SQLAlchemy Core. Beside this module:
:mod:`hooks.annotation_schema` (the tables), :mod:`hooks.annotation_db` (engines,
migrations), :mod:`hooks.annotation_checks` (input checks, errors, kappa).

Getting a store::

    from hooks.annotations import AnnotationHook, AnnotationStore
    store = AnnotationHook().get_store()          # connection or embedded SQLite
    store = AnnotationStore.from_url("postgresql+psycopg://u:p@127.0.0.1/db")  # tests, CLI

The schema is versioned with Alembic (``hooks/annotation_migrations``). ``omeflow annotations
migrate`` (or :meth:`AnnotationStore.migrate`) brings a database to the newest revision; a
second run does nothing. Every other method refuses an unmigrated database with
:class:`StoreNotMigrated`, whose message names that command.

API (every id is an ``int``; rows come back as plain ``dict``; times are aware UTC
``datetime``; bad input raises :class:`AnnotationInputError` (a ``ValueError``, HTTP 422 on
the page) naming the fix; an unknown id raises :class:`NotFound` (a ``LookupError``)):

Loading (the candidate step / DAG):

- ``add_candidate_set(image_id, run_id, rule, params, thresholds, candidates, dag_id=...)
  -> set_id``: one set and all its candidates in one transaction. Idempotent: the identity is
  (image_id, run_id, rule + params); a second call with the same identity returns the existing
  set's id and changes nothing (a retried task never duplicates). ``thresholds``: per-ROI
  thresholds, e.g. ``{"tissue_1": 812.0}``. ``candidates``: mappings with ``nucleus_id``,
  ``x``, ``y``, ``area`` (level-0 px), optional ``roi`` (str), ``score`` (float), ``stats``
  (dict); every other key (``marker_mean``, ...) goes into ``stats``. Non-finite numbers in
  stats are stored as null.
- ``add_crops(set_id, crops) -> n``: ``crops`` is an iterable of ``(nucleus_id, kind, zoom,
  png_bytes)``; call it once per fetched chunk. Kind: ``[a-z0-9_]{1,32}`` (the step uses
  ``dapi``, ``marker``, ``composite``, ``outline``); zoom: 1..16; PNG bytes (signature checked,
  at most :data:`MAX_CROP_BYTES`). A crop already stored is replaced.
- ``set_scores(set_id, {nucleus_id: uncertainty}) -> n`` (the classifier issue): higher = less
  sure; the "uncertain" queue order serves the highest first.

Reading (the annotation page):

- ``candidate_sets(image_id=None)`` -> list of sets (id, image_id, dag_id, run_id, rule,
  params, thresholds, created_at, n_candidates), newest first.
- ``candidates(set_id)`` -> list of candidates (id, set_id, image_id, nucleus_id, x, y, area,
  roi, stats, score), in queue order (random key).
- ``candidate(candidate_id)`` -> one candidate plus ``dag_id``, ``run_id`` of its set and
  ``crops``: the list of ``{"kind", "zoom"}`` stored for it.
- ``crop(candidate_id, kind, zoom) -> bytes`` (PNG).
- ``next_candidates(set_id, annotator, n=1, order="random"|"uncertain", agreement=False,
  exclude=(), lease_s=LEASE_S)`` -> up to ``n`` candidates to show (``[]``: nothing left);
  ``next_candidate(...)`` -> one or ``None``. It is a queue: candidates this annotator has a
  current label for are never served; unless ``agreement`` is true, neither are candidates
  someone else labelled, nor ones leased to someone else (a lease lasts ``lease_s`` seconds
  or until the annotator labels it or takes other candidates). PostgreSQL takes the lease with
  ``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite with a ``BEGIN IMMEDIATE`` transaction. The
  annotator's own live lease is served first (a reloaded page shows the same candidate);
  ``exclude`` skips candidate ids (the page's "next" without a label). In agreement mode
  nothing is leased and every candidate this annotator has not labelled is served.

Labelling:

- ``label(candidate_id, annotator, label) -> row``: ``label`` in :data:`LABELS`. Every call
  adds a revision; the newest revision per (candidate, annotator) that is not undone is the
  current label (two tabs: the last one wins, the earlier stays as a revision).
- ``undo(candidate_id, annotator) -> {"undone": row | None, "current": row | None}``: marks the
  current revision undone (kept in the history); the previous revision, if any, is current
  again. ``undone`` is None when there was nothing to undo.
- ``labels(set_id=None, image_id=None, candidate_id=None, annotator=None, history=False)`` ->
  current labels (``history=True``: every revision, oldest first, with ``current`` and
  ``undone_at``). Each row: id, candidate_id, set_id, image_id, nucleus_id, annotator, label,
  created_at.
- ``progress(set_id)`` -> ``{"set_id", "total", "labelled", "annotators": {name:
  {"labelled", "positive", "negative", "unsure"}}}`` (current labels; ``labelled``: candidates
  with a label by anyone).
- ``agreement(set_id=None, image_id=None)`` -> one row per pair of annotators who both
  labelled at least one candidate: ``{"a", "b", "n", "agree", "counts": {label_a: {label_b:
  n}}, "kappa"}`` (Cohen's kappa; None when undefined, i.e. both used one and the same label).
- ``export_labels(set_id, fmt="csv"|"parquet", history=False) -> bytes``: current labels (or
  every revision) with the candidate's image_id, nucleus_id, x, y, roi.

Models (the registry): ``add_model(path, params, data_hash, metrics, name=, labels_at=,
git_commit=) -> id`` (not current), ``models()`` -> newest first, ``model(id)``,
``current_model()`` -> the one marked current or None, ``promote_model(id)`` -> marks it the
only current one.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from hooks import annotation_schema as schema
from hooks.annotation_checks import (
    MAX_CROP_BYTES,
    AnnotationInputError,
    AnnotationStoreError,
    NotFound,
    StoreNotMigrated,
    aware,
    candidate_row,
    check_annotator,
    check_crop,
    check_int,
    check_label,
    check_number,
    cohen_kappa,
    json_clean,
    params_hash,
    utcnow,
)
from hooks.annotation_db import (
    MIGRATE_COMMAND,
    current_revision,
    embedded_sqlite_path,
    engine_from_url,
    head_revision,
    migrate,
    sqlite_engine,
    where,
)
from hooks.annotation_schema import (
    LABELS,
    candidate_sets,
    candidates,
    crops,
    labels,
    models,
)

try:  # the hook needs Airflow; the store itself (tests, CLI with --url) does not
    from airflow.sdk.bases.hook import BaseHook
except ImportError:  # pragma: no cover - Airflow is installed wherever the hook is used
    BaseHook = object  # type: ignore[assignment,misc]

__all__ = [
    "DEFAULT_CONN_ID", "LABELS", "LEASE_S", "MAX_CROP_BYTES", "AnnotationHook",
    "AnnotationInputError", "AnnotationStore", "AnnotationStoreError", "NotFound",
    "StoreNotMigrated", "cohen_kappa", "engine_from_url", "head_revision", "migrate",
    "sqlite_engine",
]

DEFAULT_CONN_ID = "omeflow_annotations"
#: Default queue lease: how long a served candidate is kept from other annotators.
LEASE_S = 120
ORDERS = ("random", "uncertain")
EXPORT_FORMATS = ("csv", "parquet")
_INSERT_CHUNK = 1000
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# the store


class AnnotationStore:
    """Candidate sets, crops, labels and models in one SQL database (see the module docs).

    :param engine: a SQLAlchemy engine on PostgreSQL or SQLite (:func:`engine_from_url`,
        :func:`sqlite_engine`, or :meth:`AnnotationHook.get_engine`).
    :param check_schema: refuse to work (:class:`StoreNotMigrated`) unless the database is at
        the newest revision; checked once, on the first use.
    """

    def __init__(self, engine: Engine, *, check_schema: bool = True) -> None:
        self.engine = engine
        self._checked = not check_schema
        self._check_lock = threading.Lock()
        self._rng = random.SystemRandom()

    @classmethod
    def from_url(cls, url: str | sa.URL, **kwargs: Any) -> AnnotationStore:
        """A store on a SQLAlchemy URL."""
        return cls(engine_from_url(url), **kwargs)

    @property
    def where(self) -> str:
        """The database URL, password hidden."""
        return where(self.engine)

    # -- schema ------------------------------------------------------------------------

    def migrate(self) -> tuple[str | None, str]:
        """Upgrade to the newest revision (no-op when there); returns (before, after)."""
        result = migrate(self.engine)
        self._checked = True
        return result

    def revision(self) -> str | None:
        """The database's current schema revision (None: never migrated)."""
        return current_revision(self.engine)

    def _ready(self) -> None:
        if self._checked:
            return
        with self._check_lock:
            if self._checked:
                return
            current, head = self.revision(), head_revision()
            if current != head:
                state = "not migrated" if current is None else f"at revision {current}"
                raise StoreNotMigrated(
                    f"annotation store {self.where} is {state} (the code needs {head}); run "
                    f"`{MIGRATE_COMMAND}`"
                )
            self._checked = True

    def _begin(self) -> Any:
        self._ready()
        return self.engine.begin()

    # -- loading ------------------------------------------------------------------------

    def add_candidate_set(
        self,
        image_id: int,
        run_id: str,
        rule: str,
        params: Mapping[str, Any],
        thresholds: Mapping[str, Any],
        candidates: Iterable[Mapping[str, Any]],
        *,
        dag_id: str = "celldetector_candidates",
    ) -> int:
        """Store a candidate set with its candidates; returns its id (idempotent)."""
        image_id = check_int("image_id", image_id)
        for name, value in (("run_id", run_id), ("rule", rule), ("dag_id", dag_id)):
            if not isinstance(value, str) or not value or len(value) > 250:
                raise AnnotationInputError(f"{name} must be a non-empty string, got {value!r}")
        if len(rule) > 64:
            raise AnnotationInputError(f"rule {rule!r} is longer than 64 characters")
        params = json_clean(dict(params), "params")
        thresholds = json_clean(dict(thresholds), "thresholds")
        digest = params_hash(rule, params)
        identity = sa.and_(
            candidate_sets.c.image_id == image_id,
            candidate_sets.c.run_id == run_id,
            candidate_sets.c.params_hash == digest,
        )
        rows = [candidate_row(0, image_id, c, self._rng) for c in candidates]
        seen: set[int] = set()
        for row in rows:
            if row["nucleus_id"] in seen:
                raise AnnotationInputError(f"nucleus_id {row['nucleus_id']} is listed twice")
            seen.add(row["nucleus_id"])
        try:
            with self._begin() as conn:
                existing = conn.execute(sa.select(candidate_sets.c.id).where(identity)).scalar()
                if existing is not None:
                    log.info("candidate set %s already stored (image %s, run %s)", existing,
                             image_id, run_id)
                    return int(existing)
                set_id = conn.execute(
                    candidate_sets.insert().values(
                        image_id=image_id, dag_id=dag_id, run_id=run_id, rule=rule,
                        params=params, thresholds=thresholds, params_hash=digest,
                        created_at=utcnow(),
                    ).returning(candidate_sets.c.id)
                ).scalar_one()
                for row in rows:
                    row["set_id"] = set_id
                for start in range(0, len(rows), _INSERT_CHUNK):
                    conn.execute(schema.candidates.insert(), rows[start : start + _INSERT_CHUNK])
                return int(set_id)
        except sa.exc.IntegrityError:
            # the same set stored concurrently by another caller: that one is the set
            with self.engine.connect() as conn:
                existing = conn.execute(sa.select(candidate_sets.c.id).where(identity)).scalar()
            if existing is None:
                raise
            return int(existing)

    def add_crops(self, set_id: int, items: Iterable[Any]) -> int:
        """Store (or replace) crops ``(nucleus_id, kind, zoom, png)`` of a set's candidates."""
        checked = [check_crop(item) for item in items]
        if not checked:
            return 0
        with self._begin() as conn:
            ids = self._nucleus_map(conn, set_id)
            unknown = sorted({nid for nid, *_ in checked if nid not in ids})
            if unknown:
                raise AnnotationInputError(
                    f"candidate set {set_id} has no candidate for nucleus ids {unknown[:10]}; "
                    "add crops only for the set's candidates"
                )
            latest = {(ids[nid], kind, zoom): png for nid, kind, zoom, png in checked}
            rows = [
                {"candidate_id": cid, "kind": kind, "zoom": zoom, "png": png}
                for (cid, kind, zoom), png in latest.items()
            ]
            for row in rows:
                conn.execute(
                    crops.delete().where(
                        crops.c.candidate_id == row["candidate_id"],
                        crops.c.kind == row["kind"],
                        crops.c.zoom == row["zoom"],
                    )
                )
            conn.execute(crops.insert(), rows)
        return len(rows)

    def set_scores(self, set_id: int, scores: Mapping[int, float | None]) -> int:
        """Set the classifier's uncertainty of candidates by nucleus id; returns how many."""
        with self._begin() as conn:
            ids = self._nucleus_map(conn, set_id)
            n = 0
            for nid, score in scores.items():
                nid = check_int("nucleus_id", nid)
                if nid not in ids:
                    raise AnnotationInputError(f"candidate set {set_id} has no nucleus {nid}")
                value = None if score is None else check_number(f"score of {nid}", score)
                conn.execute(
                    candidates.update().where(candidates.c.id == ids[nid]).values(score=value)
                )
                n += 1
        return n

    def _nucleus_map(self, conn: Connection, set_id: int) -> dict[int, int]:
        set_id = check_int("set_id", set_id)
        if conn.execute(sa.select(candidate_sets.c.id).where(candidate_sets.c.id == set_id)
                        ).scalar() is None:
            raise NotFound(f"no candidate set {set_id}")
        rows = conn.execute(
            sa.select(candidates.c.nucleus_id, candidates.c.id).where(
                candidates.c.set_id == set_id)
        )
        return {int(nid): int(cid) for nid, cid in rows}

    # -- reading ------------------------------------------------------------------------

    def candidate_sets(self, image_id: int | None = None) -> list[dict[str, Any]]:
        """Candidate sets (of one image), newest first, with ``n_candidates``."""
        count = (
            sa.select(sa.func.count(candidates.c.id))
            .where(candidates.c.set_id == candidate_sets.c.id)
            .scalar_subquery()
        )
        query = sa.select(candidate_sets, count.label("n_candidates")).order_by(
            candidate_sets.c.id.desc()
        )
        if image_id is not None:
            query = query.where(candidate_sets.c.image_id == check_int("image_id", image_id))
        with self._begin() as conn:
            return [_set_dict(row) for row in conn.execute(query).mappings()]

    def candidates(self, set_id: int) -> list[dict[str, Any]]:
        """The candidates of a set, in queue order."""
        with self._begin() as conn:
            self._nucleus_map(conn, set_id)
            rows = conn.execute(
                sa.select(*_CANDIDATE_COLUMNS)
                .where(candidates.c.set_id == set_id)
                .order_by(candidates.c.rand_key, candidates.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    def candidate(self, candidate_id: int) -> dict[str, Any]:
        """One candidate with its set's ``dag_id``/``run_id`` and the ``crops`` it has."""
        candidate_id = check_int("candidate_id", candidate_id)
        with self._begin() as conn:
            row = conn.execute(
                sa.select(*_CANDIDATE_COLUMNS, candidate_sets.c.dag_id, candidate_sets.c.run_id)
                .join(candidate_sets, candidate_sets.c.id == candidates.c.set_id)
                .where(candidates.c.id == candidate_id)
            ).mappings().first()
            if row is None:
                raise NotFound(f"no candidate {candidate_id}")
            kinds = conn.execute(
                sa.select(crops.c.kind, crops.c.zoom)
                .where(crops.c.candidate_id == candidate_id)
                .order_by(crops.c.kind, crops.c.zoom)
            )
            return dict(row, crops=[{"kind": k, "zoom": z} for k, z in kinds])

    def crop(self, candidate_id: int, kind: str, zoom: int) -> bytes:
        """The PNG of one crop."""
        candidate_id = check_int("candidate_id", candidate_id)
        with self._begin() as conn:
            png = conn.execute(
                sa.select(crops.c.png).where(
                    crops.c.candidate_id == candidate_id,
                    crops.c.kind == kind,
                    crops.c.zoom == check_int("zoom", zoom),
                )
            ).scalar()
        if png is None:
            raise NotFound(f"candidate {candidate_id} has no {kind!r} crop at zoom {zoom}")
        return bytes(png)

    # -- the queue ----------------------------------------------------------------------

    def next_candidate(self, set_id: int, annotator: str, **kwargs: Any) -> dict[str, Any] | None:
        """The next candidate to show this annotator, or None when the set is done."""
        found = self.next_candidates(set_id, annotator, n=1, **kwargs)
        return found[0] if found else None

    def next_candidates(
        self,
        set_id: int,
        annotator: str,
        n: int = 1,
        *,
        order: str = "random",
        agreement: bool = False,
        exclude: Sequence[int] = (),
        lease_s: float = LEASE_S,
    ) -> list[dict[str, Any]]:
        """Up to ``n`` candidates to show, leased to this annotator (see the module docs)."""
        annotator = check_annotator(annotator)
        set_id = check_int("set_id", set_id)
        n = check_int("n", n)
        if not 1 <= n <= 100:
            raise AnnotationInputError(f"n={n}: ask for 1..100 candidates")
        if order not in ORDERS:
            raise AnnotationInputError(f"order {order!r}: use one of {', '.join(ORDERS)}")
        exclude = [check_int("exclude", c) for c in exclude]
        lease_s = check_number("lease_s", lease_s)
        if not 0 < lease_s <= 3600:
            raise AnnotationInputError(f"lease_s={lease_s}: use 0 < lease_s <= 3600 seconds")
        now = utcnow()
        mine = sa.and_(candidates.c.leased_by == annotator, candidates.c.leased_until > now)
        labelled = sa.select(labels.c.id).where(
            labels.c.candidate_id == candidates.c.id, labels.c.undone_at.is_(None)
        )
        eligible: list[Any] = [
            candidates.c.set_id == set_id,
            ~labelled.where(labels.c.annotator == annotator).exists(),
        ]
        if not agreement:
            eligible += [
                ~labelled.exists(),
                sa.or_(
                    candidates.c.leased_until.is_(None),
                    candidates.c.leased_until <= now,
                    candidates.c.leased_by == annotator,
                ),
            ]
        keys: list[Any] = [sa.case((mine, 0), else_=1)]
        if order == "uncertain":
            keys.append(candidates.c.score.desc().nulls_last())
        keys += [candidates.c.rand_key, candidates.c.id]
        with self._begin() as conn:
            ids = self._pick(conn, eligible, keys, n, exclude, lock=not agreement)
            if not agreement:
                # leave the annotator's other leases in this set (skipping rows another
                # annotator has just locked to take over: waiting on them could deadlock),
                # then lease these
                others = conn.execute(
                    sa.select(candidates.c.id)
                    .where(candidates.c.set_id == set_id, candidates.c.leased_by == annotator,
                           candidates.c.id.not_in(ids or [-1]))
                    .with_for_update(skip_locked=True)
                ).scalars().all()
                if others:
                    conn.execute(
                        candidates.update()
                        .where(candidates.c.id.in_(others),
                               candidates.c.leased_by == annotator)
                        .values(leased_by=None, leased_until=None)
                    )
                if ids:
                    conn.execute(
                        candidates.update()
                        .where(candidates.c.id.in_(ids))
                        .values(leased_by=annotator,
                                leased_until=now + timedelta(seconds=lease_s))
                    )
            if not ids:
                return []
            rows = conn.execute(
                sa.select(*_CANDIDATE_COLUMNS).where(candidates.c.id.in_(ids))
            ).mappings()
            by_id = {r["id"]: dict(r) for r in rows}
        return [by_id[i] for i in ids]

    @staticmethod
    def _pick(conn: Connection, eligible: list[Any], keys: list[Any], n: int,
              exclude: list[int], lock: bool) -> list[int]:
        """ids of up to ``n`` eligible candidates in queue order, row-locked if ``lock``.

        PostgreSQL (READ COMMITTED): ``FOR UPDATE SKIP LOCKED`` re-checks a row that changed
        meanwhile against the statement's old snapshot for the ``EXISTS(labels)`` part, so a
        candidate labelled a moment ago could slip through. Once locked, the rows are checked
        again by a new statement (a new snapshot); rejected ones are skipped and the pick is
        repeated. SQLite needs none of this: its transaction holds the write lock.
        """
        query = sa.select(candidates.c.id).where(*eligible).order_by(*keys)
        if not lock or conn.dialect.name != "postgresql":
            if exclude:
                query = query.where(candidates.c.id.not_in(exclude))
            return [int(i) for i in conn.execute(query.limit(n)).scalars()]
        picked: list[int] = []
        skip = list(exclude)
        for _ in range(20):
            batch = query.where(candidates.c.id.not_in(skip)) if skip else query
            got = [int(i) for i in conn.execute(
                batch.limit(n - len(picked)).with_for_update(skip_locked=True, of=candidates)
            ).scalars()]
            if not got:
                break
            still = set(conn.execute(
                sa.select(candidates.c.id).where(candidates.c.id.in_(got), *eligible)
            ).scalars())
            picked += [i for i in got if i in still]
            skip += got
            if len(picked) >= n:
                break
        return picked

    # -- labels -------------------------------------------------------------------------

    def label(self, candidate_id: int, annotator: str, label: str) -> dict[str, Any]:
        """Add a label revision; returns it. It becomes this annotator's current label."""
        candidate_id = check_int("candidate_id", candidate_id)
        annotator = check_annotator(annotator)
        label = check_label(label)
        with self._begin() as conn:
            exists = conn.execute(
                sa.select(candidates.c.id).where(candidates.c.id == candidate_id)
            ).scalar()
            if exists is None:
                raise NotFound(f"no candidate {candidate_id}")
            created = utcnow()
            label_id = conn.execute(
                labels.insert()
                .values(candidate_id=candidate_id, annotator=annotator, label=label,
                        created_at=created)
                .returning(labels.c.id)
            ).scalar_one()
            conn.execute(
                candidates.update()
                .where(candidates.c.id == candidate_id, candidates.c.leased_by == annotator)
                .values(leased_by=None, leased_until=None)
            )
        return {"id": int(label_id), "candidate_id": candidate_id, "annotator": annotator,
                "label": label, "created_at": created}

    def undo(self, candidate_id: int, annotator: str) -> dict[str, Any]:
        """Undo this annotator's current label of a candidate (kept as an undone revision)."""
        candidate_id = check_int("candidate_id", candidate_id)
        annotator = check_annotator(annotator)
        live = sa.and_(labels.c.candidate_id == candidate_id, labels.c.annotator == annotator,
                       labels.c.undone_at.is_(None))
        with self._begin() as conn:
            query = sa.select(labels).where(live).order_by(labels.c.id.desc()).limit(1)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            undone = conn.execute(query).mappings().first()
            if undone is not None:
                now = utcnow()
                conn.execute(labels.update().where(labels.c.id == undone["id"])
                             .values(undone_at=now))
                undone = dict(undone, undone_at=now)
            current = conn.execute(
                sa.select(labels).where(live).order_by(labels.c.id.desc()).limit(1)
            ).mappings().first()
        return {"undone": _label_dict(undone), "current": _label_dict(current)}

    def labels(
        self,
        set_id: int | None = None,
        image_id: int | None = None,
        candidate_id: int | None = None,
        annotator: str | None = None,
        history: bool = False,
    ) -> list[dict[str, Any]]:
        """Current labels (or every revision with ``history``), oldest first."""
        filters = []
        if set_id is not None:
            filters.append(candidates.c.set_id == check_int("set_id", set_id))
        if image_id is not None:
            filters.append(candidates.c.image_id == check_int("image_id", image_id))
        if candidate_id is not None:
            filters.append(labels.c.candidate_id == check_int("candidate_id", candidate_id))
        if annotator is not None:
            filters.append(labels.c.annotator == annotator)
        current = _current_ids()
        query = (
            sa.select(
                labels.c.id, labels.c.candidate_id, candidates.c.set_id, candidates.c.image_id,
                candidates.c.nucleus_id, labels.c.annotator, labels.c.label,
                labels.c.created_at,
                *([labels.c.undone_at, labels.c.id.in_(current).label("current")]
                  if history else []),
            )
            .join(candidates, candidates.c.id == labels.c.candidate_id)
            .where(*filters)
            .order_by(labels.c.id)
        )
        if not history:
            query = query.where(labels.c.id.in_(current))
        with self._begin() as conn:
            return [_label_dict(r) for r in conn.execute(query).mappings()]  # type: ignore[misc]

    def progress(self, set_id: int) -> dict[str, Any]:
        """Counts of current labels per annotator in a set."""
        set_id = check_int("set_id", set_id)
        with self._begin() as conn:
            self._nucleus_map(conn, set_id)
            total = conn.execute(
                sa.select(sa.func.count()).where(candidates.c.set_id == set_id)
            ).scalar_one()
            rows = conn.execute(
                sa.select(labels.c.annotator, labels.c.label, labels.c.candidate_id)
                .join(candidates, candidates.c.id == labels.c.candidate_id)
                .where(candidates.c.set_id == set_id, labels.c.id.in_(_current_ids()))
            ).all()
        annotators: dict[str, dict[str, int]] = {}
        for name, value, _cid in rows:
            counts = annotators.setdefault(name, {"labelled": 0, **dict.fromkeys(LABELS, 0)})
            counts["labelled"] += 1
            counts[value] += 1
        return {"set_id": set_id, "total": int(total),
                "labelled": len({cid for *_, cid in rows}), "annotators": annotators}

    def agreement(self, set_id: int | None = None, image_id: int | None = None
                  ) -> list[dict[str, Any]]:
        """Agreement of each pair of annotators on the candidates both labelled."""
        if (set_id is None) == (image_id is None):
            raise AnnotationInputError("agreement: give exactly one of set_id, image_id")
        current = self.labels(set_id=set_id, image_id=image_id)
        by_annotator: dict[str, dict[int, str]] = defaultdict(dict)
        for row in current:
            by_annotator[row["annotator"]][row["candidate_id"]] = row["label"]
        names = sorted(by_annotator)
        result = []
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                both = sorted(set(by_annotator[a]) & set(by_annotator[b]))
                if not both:
                    continue
                pairs = [(by_annotator[a][c], by_annotator[b][c]) for c in both]
                counts = {la: dict.fromkeys(LABELS, 0) for la in LABELS}
                for la, lb in pairs:
                    counts[la][lb] += 1
                result.append({
                    "a": a, "b": b, "n": len(pairs), "agree": sum(x == y for x, y in pairs),
                    "counts": counts, "kappa": cohen_kappa(pairs),
                })
        return result

    def export_labels(self, set_id: int, fmt: str = "csv", history: bool = False) -> bytes:
        """The set's labels as CSV or Parquet bytes, with the candidates' positions."""
        if fmt not in EXPORT_FORMATS:
            raise AnnotationInputError(f"format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
        by_id = {c["id"]: c for c in self.candidates(set_id)}
        columns = ["set_id", "image_id", "nucleus_id", "candidate_id", "x", "y", "roi",
                   "annotator", "label", "created_at"]
        if history:
            columns += ["undone_at", "current"]
        records = []
        for row in self.labels(set_id=set_id, history=history):
            cand = by_id[row["candidate_id"]]
            record = {k: row.get(k, cand.get(k)) for k in columns}
            for k in ("created_at", "undone_at"):
                if record.get(k) is not None:
                    record[k] = record[k].isoformat()
            records.append(record)
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
            return out.getvalue().encode()
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise AnnotationStoreError(
                "Parquet export needs pyarrow: pip install pyarrow (or export fmt='csv')"
            ) from None
        table = pa.Table.from_pylist(records) if records else pa.table(
            {k: pa.array([], pa.string()) for k in columns})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    # -- models -------------------------------------------------------------------------

    def add_model(self, path: str, params: Mapping[str, Any], data_hash: str,
                  metrics: Mapping[str, Any], *, name: str | None = None,
                  labels_at: datetime | None = None, git_commit: str | None = None) -> int:
        """Register a trained model (not current; see :meth:`promote_model`); returns its id."""
        if not isinstance(path, str) or not path:
            raise AnnotationInputError(f"model path must be a non-empty string, got {path!r}")
        if git_commit is not None and len(str(git_commit)) > 40:
            raise AnnotationInputError(f"git_commit {git_commit!r} is longer than a sha1")
        with self._begin() as conn:
            return int(conn.execute(
                models.insert().values(
                    path=path, params=json_clean(dict(params), "params"),
                    data_hash=str(data_hash), metrics=json_clean(dict(metrics), "metrics"),
                    created_at=utcnow(), name=name, labels_at=labels_at,
                    git_commit=git_commit, current=False,
                ).returning(models.c.id)
            ).scalar_one())

    def models(self) -> list[dict[str, Any]]:
        """Registered models, newest first."""
        with self._begin() as conn:
            rows = conn.execute(sa.select(models).order_by(models.c.id.desc())).mappings()
            return [_model_dict(r) for r in rows]

    def model(self, model_id: int) -> dict[str, Any]:
        """One registered model; an unknown id raises :class:`NotFound`."""
        with self._begin() as conn:
            row = conn.execute(sa.select(models).where(
                models.c.id == check_int("model_id", model_id))).mappings().first()
        if row is None:
            raise NotFound(f"model {model_id} is not registered")
        return _model_dict(row)

    def current_model(self) -> dict[str, Any] | None:
        """The model marked current (the one nightly prediction uses), or None."""
        with self._begin() as conn:
            row = conn.execute(sa.select(models).where(models.c.current.is_(True))
                               .order_by(models.c.id.desc()).limit(1)).mappings().first()
        return None if row is None else _model_dict(row)

    def promote_model(self, model_id: int) -> dict[str, Any]:
        """Mark ``model_id`` current and no other (one transaction); returns its row."""
        model_id = check_int("model_id", model_id)
        with self._begin() as conn:
            if conn.execute(sa.select(models.c.id).where(models.c.id == model_id)
                            .with_for_update()).first() is None:
                raise NotFound(f"model {model_id} is not registered")
            conn.execute(models.update().where(models.c.current.is_(True),
                                               models.c.id != model_id).values(current=False))
            conn.execute(models.update().where(models.c.id == model_id).values(current=True))
        return self.model(model_id)


_CANDIDATE_COLUMNS = (
    candidates.c.id, candidates.c.set_id, candidates.c.image_id, candidates.c.nucleus_id,
    candidates.c.x, candidates.c.y, candidates.c.area, candidates.c.roi, candidates.c.stats,
    candidates.c.score,
)


def _current_ids() -> sa.Select:
    """ids of current label revisions: the newest not-undone one per (candidate, annotator)."""
    return (
        sa.select(sa.func.max(labels.c.id))
        .where(labels.c.undone_at.is_(None))
        .group_by(labels.c.candidate_id, labels.c.annotator)
    )


def _model_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row, created_at=aware(row["created_at"]), current=bool(row["current"]))
    out["labels_at"] = aware(out.get("labels_at"))
    return out


def _label_dict(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in ("created_at", "undone_at"):
        if key in out:
            out[key] = aware(out[key])
    if "current" in out:
        out["current"] = bool(out["current"])
    return out


def _set_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out.pop("params_hash", None)
    out["created_at"] = aware(out["created_at"])
    return out


# ---------------------------------------------------------------------------------------
# the Airflow hook

#: One store per database URL in this process (its engine's pool and its schema check are
#: shared by every request of the api-server).
_STORES: dict[str, AnnotationStore] = {}
_STORES_LOCK = threading.Lock()


class AnnotationHook(BaseHook):  # type: ignore[misc,valid-type]
    """Opens the annotation store of an Airflow deployment.

    :param annotations_conn_id: an Airflow connection of type ``postgres`` (host, port,
        schema = database, login, password; read by ``PostgresHook``). When it does not
        exist, the store is the embedded SQLite file ``$AIRFLOW_HOME/var/annotations.sqlite``
        (logged). A connection of another type is refused.
    """

    conn_name_attr = "annotations_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    hook_name = "omeflow annotation store"

    def __init__(self, annotations_conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.annotations_conn_id = annotations_conn_id

    def get_url(self) -> sa.URL:
        """The store's SQLAlchemy URL: the PostgreSQL connection's, or the embedded file."""
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.annotations_conn_id)
        except AirflowNotFoundException:
            path = embedded_sqlite_path()
            log.info("no connection %r: annotation store is the embedded SQLite %s",
                     self.annotations_conn_id, path)
            return sa.URL.create("sqlite", database=str(path))
        if conn.conn_type not in ("postgres", "postgresql"):
            raise AnnotationStoreError(
                f"connection {self.annotations_conn_id!r} has type {conn.conn_type!r}; the "
                "annotation store needs a connection of type 'postgres' (or none: the "
                "embedded SQLite under $AIRFLOW_HOME/var)"
            )
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        url = PostgresHook(postgres_conn_id=self.annotations_conn_id).sqlalchemy_url
        log.info("annotation store: PostgreSQL %s (connection %r)",
                 url.render_as_string(hide_password=True), self.annotations_conn_id)
        return url

    def get_engine(self) -> Engine:
        """The engine of :meth:`get_url`, shared within this process."""
        return self.get_store().engine

    def get_store(self) -> AnnotationStore:
        """The :class:`AnnotationStore` on this hook's database, shared within this process
        (thread-safe; it refuses to work until the database is migrated)."""
        url = self.get_url()
        key = url.render_as_string(hide_password=False)
        with _STORES_LOCK:
            if key not in _STORES:
                _STORES[key] = AnnotationStore(engine_from_url(url))
            return _STORES[key]

    def get_conn(self) -> AnnotationStore:
        """The store (BaseHook's accessor)."""
        return self.get_store()
