"""Shared fixtures: a real database on both backends (an SQLite file and PostgreSQL).

PostgreSQL comes from LOCATOR_TEST_POSTGRES_URL (`.ci/run` starts a throwaway server). Without
it the PostgreSQL half of each test is skipped, except when LOCATOR_REQUIRE_POSTGRES=1 (set by
CI), where a missing PostgreSQL fails the run instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from locator.store import migrate
from locator.store.db import create_db_engine, make_session_factory, normalise_url
from locator.trusts import TrustRegistry, example_trusts, store_trusts

PG_URL = os.environ.get("LOCATOR_TEST_POSTGRES_URL")
REQUIRE_PG = os.environ.get("LOCATOR_REQUIRE_POSTGRES") == "1"
BACKENDS = ["sqlite", "postgres"]
_TEMPLATE = f"locator_tpl_{os.getpid()}"


def need_postgres() -> str:
    if PG_URL:
        return PG_URL
    if REQUIRE_PG:
        pytest.fail("LOCATOR_REQUIRE_POSTGRES=1 but LOCATOR_TEST_POSTGRES_URL is not set")
    pytest.skip("no PostgreSQL (set LOCATOR_TEST_POSTGRES_URL)")


def _admin_engine(url: str) -> Engine:
    return create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A PostgreSQL database migrated to head, cloned for each test."""
    url = need_postgres()
    admin = _admin_engine(url)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{_TEMPLATE}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{_TEMPLATE}"'))
    tpl_url = make_url(normalise_url(url)).set(database=_TEMPLATE).render_as_string(False)
    engine = create_db_engine(tpl_url)
    migrate.upgrade(engine)
    engine.dispose()
    yield _TEMPLATE
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{_TEMPLATE}" WITH (FORCE)'))
    admin.dispose()


def fresh_postgres_url(template: str | None = None) -> Iterator[str]:
    """Create a new PostgreSQL database (from the migrated template, or empty)."""
    url = need_postgres()
    name = f"locator_t_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine(url)
    with admin.connect() as conn:
        suffix = f' TEMPLATE "{template}"' if template else ""
        conn.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
    try:
        yield make_url(normalise_url(url)).set(database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema) on the backend under test."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'locator.db'}"
    else:
        yield from fresh_postgres_url()


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A database migrated to head on the backend under test."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'locator.db'}"
        engine = create_db_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
    else:
        template = request.getfixturevalue("pg_template")
        yield from fresh_postgres_url(template)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_db_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def registry(session_factory: sessionmaker[Session]) -> TrustRegistry:
    """The example trusts, stored in the database under test."""
    trusts = example_trusts()
    with session_factory() as session, session.begin():
        store_trusts(session, trusts=trusts)
    return TrustRegistry(trusts)
