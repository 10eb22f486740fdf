"""Migrations: an empty database upgrades to head on both backends, with no autogenerate
diff against the models, and the migrations ship inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, text, update
from sqlalchemy.exc import DBAPIError

from locator.store import migrate
from locator.store.db import create_db_engine
from locator.store.models import audit_table, metadata, utcnow

ROOT = Path(__file__).resolve().parent.parent


def test_empty_database_upgrades_to_head_without_drift(empty_db_url: str) -> None:
    engine = create_db_engine(empty_db_url)
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert set(metadata.tables) <= set(inspect(engine).get_table_names())
    migrate.upgrade(engine)  # idempotent
    engine.dispose()


def test_sqlite_is_tuned_for_a_durable_service(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        pragmas = {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,
        "foreign_keys": 1,
        "busy_timeout": 30000,
    }
    engine.dispose()


def test_audit_rows_are_append_only_in_the_database(db_url: str) -> None:
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            insert(audit_table).values(
                recorded_at=utcnow(),
                request_id="r1",
                action="search",
                resource_type="ImagingStudy",
                query="q",
                outcome=200,
            )
        )
    for statement in (update(audit_table).values(outcome=500), audit_table.delete()):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    if engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("TRUNCATE audit"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit")).scalar() == 1
    engine.dispose()


def test_the_wheel_carries_the_migrations_and_example_trusts(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("locator-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "locator/migrations/env.py" in names
    assert "locator/migrations/script.py.mako" in names
    assert any(n.startswith("locator/migrations/versions/0001") for n in names)
    assert "locator/example_trusts.toml" in names
