"""Alembic environment of the annotation store.

Run only through :func:`hooks.annotations.migrate` (``omeflow annotations migrate``), which
passes an open SQLAlchemy connection in ``config.attributes["connection"]``; there is no
``alembic.ini`` and no URL in a file.
"""

from __future__ import annotations

from alembic import context

from hooks.annotation_schema import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run the annotation store's migrations with `omeflow annotations migrate`, "
        "not with the alembic command"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
