"""Tables of the annotation store (SQLAlchemy Core), shared by the store and its migrations.

One ``MetaData`` for PostgreSQL and SQLite. The Alembic migrations in
``hooks/annotation_migrations/versions`` create exactly these tables; a change here needs a
new migration (``tests/unit/test_annotation_store.py`` compares the two).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

#: Alembic's version table of this store (not ``alembic_version``: the store may share a
#: database with another Alembic user, such as Airflow's own metadata DB).
VERSION_TABLE = "omeflow_annotations_version"
#: The label values a person can give.
LABELS = ("positive", "negative", "unsure")

#: JSON column: JSONB on PostgreSQL, JSON text on SQLite.
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

metadata = sa.MetaData()

candidate_sets = sa.Table(
    "candidate_sets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("image_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("dag_id", sa.String(250), nullable=False),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("params", Json, nullable=False),
    sa.Column("thresholds", Json, nullable=False),
    # sha256 of the canonical JSON of (rule, params): the set's identity with image and run
    sa.Column("params_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("image_id", "run_id", "params_hash", name="uq_candidate_sets_identity"),
)

candidates = sa.Table(
    "candidates",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "set_id",
        sa.Integer,
        sa.ForeignKey("candidate_sets.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("nucleus_id", sa.BigInteger, nullable=False),
    sa.Column("x", sa.Float, nullable=False),
    sa.Column("y", sa.Float, nullable=False),
    sa.Column("area", sa.Float, nullable=False),
    sa.Column("roi", sa.String(250), nullable=True),
    sa.Column("stats", Json, nullable=False),
    # the classifier's uncertainty (higher = less sure), filled when a model scores the set
    sa.Column("score", sa.Float, nullable=True),
    # a fixed random position: the "random" queue order, stable across requests
    sa.Column("rand_key", sa.Float, nullable=False),
    # queue lease: who is being shown this candidate, until when
    sa.Column("leased_by", sa.String(250), nullable=True),
    sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("set_id", "nucleus_id", name="uq_candidates_set_nucleus"),
    sa.Index("ix_candidates_set_rand", "set_id", "rand_key"),
)

crops = sa.Table(
    "crops",
    metadata,
    sa.Column(
        "candidate_id",
        sa.Integer,
        sa.ForeignKey("candidates.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("zoom", sa.Integer, primary_key=True),
    sa.Column("png", sa.LargeBinary, nullable=False),
)

labels = sa.Table(
    "labels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "candidate_id",
        sa.Integer,
        sa.ForeignKey("candidates.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("annotator", sa.String(250), nullable=False),
    sa.Column("label", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # set by undo: the revision is kept in the history but no longer current
    sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint(
        "label IN ('positive', 'negative', 'unsure')", name="ck_labels_label"
    ),
    sa.Index("ix_labels_candidate_annotator", "candidate_id", "annotator", "id"),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("path", sa.String(1024), nullable=False),
    sa.Column("params", Json, nullable=False),
    sa.Column("data_hash", sa.String(64), nullable=False),
    sa.Column("metrics", Json, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # revision 0002: the registry proper
    sa.Column("name", sa.String(128), nullable=True),
    sa.Column("labels_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("git_commit", sa.String(40), nullable=True),
    sa.Column("current", sa.Boolean, nullable=False, server_default=sa.false()),
)
