"""Model registry: name, label snapshot time, git commit and the ``current`` flag.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add name, labels_at, git_commit and current (false for models already registered)."""
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("name", sa.String(128), nullable=True))
        batch.add_column(sa.Column("labels_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("git_commit", sa.String(40), nullable=True))
        batch.add_column(sa.Column("current", sa.Boolean, nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    """Drop the four columns."""
    with op.batch_alter_table("models") as batch:
        for name in ("current", "git_commit", "labels_at", "name"):
            batch.drop_column(name)
