"""Engines and schema migrations of the annotation store (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from hooks.annotation_checks import AnnotationInputError
from hooks.annotation_schema import VERSION_TABLE

#: File name of the embedded default under ``$AIRFLOW_HOME/var``.
SQLITE_NAME = "annotations.sqlite"
#: The folder of the Alembic environment and its revisions.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "annotation_migrations"
MIGRATE_COMMAND = "omeflow annotations migrate"
#: PostgreSQL advisory lock key held while migrating (two migrate runs do not interleave).
_MIGRATE_LOCK = 0x6F6D65666C6F77


def sqlite_engine(path: Path) -> Engine:
    """A SQLite engine on ``path`` (created with its folder): foreign keys on, WAL journal,
    30 s busy timeout, and every transaction ``BEGIN IMMEDIATE`` (writers queue instead of
    failing with "database is locked" halfway through a transaction)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
    _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # pysqlite: let the "begin" hook start transactions
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA busy_timeout = 30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def engine_from_url(url: str | sa.URL) -> Engine:
    """An engine for a SQLAlchemy URL (``sqlite:///path`` or ``postgresql[+driver]://...``)."""
    url = sa.make_url(url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise AnnotationInputError(
                "the annotation store needs a SQLite file (sqlite:////abs/path.sqlite), "
                "not an in-memory database"
            )
        return sqlite_engine(Path(url.database))
    if url.get_backend_name() != "postgresql":
        raise AnnotationInputError(
            f"the annotation store runs on PostgreSQL or SQLite, not {url.get_backend_name()!r}"
        )
    return sa.create_engine(url, pool_pre_ping=True)


def embedded_sqlite_path() -> Path:
    """``$AIRFLOW_HOME/var/annotations.sqlite`` (see :func:`hpc_jobs.embedded.embedded_home`)."""
    from hpc_jobs.embedded import embedded_home

    return embedded_home() / "var" / SQLITE_NAME


def where(engine: Engine) -> str:
    """The engine's URL with the password hidden (for messages and logs)."""
    return engine.url.render_as_string(hide_password=True)


def _alembic_config(connection: Connection | None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision of the store's schema."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(None)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()


def migrate(engine: Engine) -> tuple[str | None, str]:
    """Upgrade the database to the newest revision; returns (before, after). A database
    already at the head is left as it is."""
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
        from alembic.runtime.migration import MigrationContext

        before = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()
        command.upgrade(_alembic_config(conn), "head")
    after = current_revision(engine)
    assert after is not None
    return before, after
