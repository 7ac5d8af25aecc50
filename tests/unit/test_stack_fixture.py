"""``live_stack``'s metadata database: PostgreSQL, or SQLite with a visible warning when no
PostgreSQL can be had, and a failure instead when ``OMEFLOW_REQUIRE_POSTGRES=1``."""

from __future__ import annotations

import pytest

from tests import stack_fixture
from tests.postgres_fixture import REQUIRE_ENV, PostgresUnavailable


def _no_postgres() -> str:
    raise PostgresUnavailable("PostgreSQL is not installed; run `python -m tests.postgres_fixture`")


def test_without_postgres_the_stack_warns_and_uses_sqlite(monkeypatch) -> None:
    monkeypatch.setattr(stack_fixture, "ensure_postgres", _no_postgres)
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.warns(UserWarning, match="runs Airflow on SQLite, not PostgreSQL: PostgreSQL is "
                      "not installed"), stack_fixture.postgres_metadata_db() as url:
        assert url is None


def test_without_postgres_but_required_the_stack_fails(monkeypatch) -> None:
    monkeypatch.setattr(stack_fixture, "ensure_postgres", _no_postgres)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV}=1"), \
            stack_fixture.postgres_metadata_db():
        pass


def test_postgres_url_drives_both_airflow_engines() -> None:
    env = stack_fixture.metadata_db_env("postgresql+psycopg://u:p@127.0.0.1:5432/db")
    assert env == {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg://u:p@127.0.0.1:5432/db",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "postgresql+psycopg://u:p@127.0.0.1:5432/db",
    }
    assert stack_fixture.metadata_db_env("sqlite:////tmp/a.db") == {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////tmp/a.db"}


def test_postgres_metadata_db_is_created_and_dropped(postgres_url: str) -> None:
    import sqlalchemy as sa

    with stack_fixture.postgres_metadata_db() as url:
        assert url is not None and url.startswith("postgresql")
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
        engine.dispose()
        name = sa.make_url(url).database
    admin = sa.create_engine(postgres_url)
    with admin.connect() as conn:
        left = conn.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %(n)s",
                                    {"n": name}).first()
    admin.dispose()
    assert left is None, f"{name} was not dropped"
