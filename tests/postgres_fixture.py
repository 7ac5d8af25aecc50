"""PostgreSQL for tests: the ``postgres_url`` and ``postgres_db`` fixtures.

``ensure_postgres()`` makes a local PostgreSQL usable (as root on Debian): starts the
installed cluster (``pg_ctlcluster``; creates one if none exists) and creates the login role
``omeflow_test`` (CREATEDB, a test-only password, loopback only). ``python -m
tests.postgres_fixture`` does the same and first installs the ``postgresql`` package when it
is missing (``scripts/test.sh`` runs it). ``$OMEFLOW_TEST_PG_URL`` (a URL to a database
where the role may ``CREATE DATABASE``) replaces all of that.

Tests skip (naming the fix) when PostgreSQL cannot be had, and fail instead when
``OMEFLOW_REQUIRE_POSTGRES=1`` (CI: a skip would hide breakage).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from hooks.annotations import AnnotationStore

URL_ENV = "OMEFLOW_TEST_PG_URL"
REQUIRE_ENV = "OMEFLOW_REQUIRE_POSTGRES"
ROLE = "omeflow_test"
PASSWORD = "omeflow_test"  # noqa: S105 - a throw-away role on 127.0.0.1, test only
PG_ROOT = Path("/usr/lib/postgresql")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL can be used here; the message names the fix."""


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise PostgresUnavailable(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout)[-800:]}")
    return proc.stdout


def _cluster() -> tuple[str, str, int, str]:
    """(version, name, port, status) of the first cluster ``pg_lsclusters`` lists."""
    for line in _run(["pg_lsclusters", "--no-header"]).splitlines():
        fields = line.split()
        if len(fields) >= 4:
            return fields[0], fields[1], int(fields[2]), fields[3]
    raise LookupError("no cluster")


def ensure_postgres(install: bool = False) -> str:
    """URL of the ``postgres`` database as the test role (see the module docs)."""
    url = os.environ.get(URL_ENV)
    if url:
        return url
    if not PG_ROOT.is_dir() or not shutil.which("pg_lsclusters"):
        if not install:
            raise PostgresUnavailable(
                "PostgreSQL is not installed; run `python -m tests.postgres_fixture` as root "
                f"(apt-get install postgresql), or set {URL_ENV}"
            )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
            if subprocess.run(argv, env=env, timeout=1200, check=False).returncode:
                raise PostgresUnavailable(f"{' '.join(argv)} failed (see above)")
    if os.geteuid() != 0:
        raise PostgresUnavailable(
            f"starting PostgreSQL and creating the test role needs root; or set {URL_ENV}"
        )
    try:
        version, name, port, status = _cluster()
    except LookupError:
        version = sorted(p.name for p in PG_ROOT.iterdir())[-1]
        _run(["pg_createcluster", version, "main"])
        version, name, port, status = _cluster()
    if status != "online":
        _run(["pg_ctlcluster", version, name, "start"])
    sql = (
        "DO $$ BEGIN "
        f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN "
        f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{PASSWORD}'; END IF; END $$;"
    )
    _run(["runuser", "-u", "postgres", "--", "psql", "-p", str(port), "-v",
          "ON_ERROR_STOP=1", "-qc", sql])
    return f"postgresql+psycopg://{ROLE}:{PASSWORD}@127.0.0.1:{port}/postgres"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """Admin URL (a role with CREATEDB) of a running PostgreSQL; skip/fail when none."""
    try:
        return ensure_postgres()
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@contextlib.contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """URL of a new empty database ``<prefix><random>`` on ``admin_url``'s server, dropped
    (connections forced off) on exit."""
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """URL of a new empty database, dropped after the test."""
    with scratch_database(postgres_url, "omeflow_t_") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new empty database, once SQLite (a file in tmp_path), once PostgreSQL: a test
    using it runs against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'annotations.sqlite'}"
    return str(request.getfixturevalue("postgres_db"))


@pytest.fixture
def annotation_store(sql_url: str) -> Iterator[AnnotationStore]:
    """A migrated annotation store on each backend of :func:`sql_url`."""
    from hooks.annotations import AnnotationStore

    store = AnnotationStore.from_url(sql_url)
    store.migrate()
    yield store
    store.engine.dispose()


if __name__ == "__main__":
    print(ensure_postgres(install=True).replace(PASSWORD, "***"))
