"""Alembic environment: runs migrations on the connection the locator hands in
(`locator.store.migrate`), or on the URL in alembic.ini / LOCATOR_DATABASE_URL from the CLI."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from locator.store.db import create_db_engine
from locator.store.models import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("LOCATOR_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    engine = create_db_engine(url or "sqlite:///./locator.db")
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


run_migrations_online()
