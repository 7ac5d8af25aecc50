"""Initial schema: candidate_sets, candidates, crops, labels, models.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Create the five tables."""
    op.create_table(
        "candidate_sets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("image_id", sa.BigInteger, nullable=False),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("params", Json, nullable=False),
        sa.Column("thresholds", Json, nullable=False),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint(
            "image_id", "run_id", "params_hash", name="uq_candidate_sets_identity"
        ),
    )
    op.create_index("ix_candidate_sets_image_id", "candidate_sets", ["image_id"])
    op.create_table(
        "candidates",
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
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("rand_key", sa.Float, nullable=False),
        sa.Column("leased_by", sa.String(250), nullable=True),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("set_id", "nucleus_id", name="uq_candidates_set_nucleus"),
    )
    op.create_index("ix_candidates_set_rand", "candidates", ["set_id", "rand_key"])
    op.create_table(
        "crops",
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
    op.create_table(
        "labels",
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
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "label IN ('positive', 'negative', 'unsure')", name="ck_labels_label"
        ),
    )
    op.create_index(
        "ix_labels_candidate_annotator", "labels", ["candidate_id", "annotator", "id"]
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("params", Json, nullable=False),
        sa.Column("data_hash", sa.String(64), nullable=False),
        sa.Column("metrics", Json, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Drop the five tables."""
    for table in ("models", "labels", "crops", "candidates", "candidate_sets"):
        op.drop_table(table)
