"""The database engine: one per process, built from Settings, never at import time.

SQLite is tuned for a service without giving up durability: WAL journal with
synchronous=FULL (a commit survives power loss), foreign keys on, and a busy timeout so
concurrent writers wait instead of failing. PostgreSQL goes through psycopg 3.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    Table,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeEngine

from locator.store.models import UTCDateTime

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(url: str) -> str:
    """Accept `postgresql://` and `postgres://` and route them to psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _tune_sqlite(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Autocommit off at the driver; SQLAlchemy issues BEGIN itself (see below).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


READONLY = "locator_readonly"


def _begin(conn: Any) -> None:
    # Writers take the write lock at BEGIN so two of them never deadlock upgrading read
    # locks; readers (execution option READONLY) begin deferred and never block a writer.
    if conn.get_execution_options().get(READONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_db_engine(url: str, *, pool_size: int = 10) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=pool_size
        )
        event.listen(engine, "connect", _tune_sqlite)
        event.listen(engine, "begin", _begin)
        return engine
    # No pool_pre_ping: it costs a round trip per checkout on the hot read path. A connection
    # broken by a database restart fails one unit of work, which the edges treat as transient
    # (MLLP withholds the ACK and retries, MPPS answers "retry", the API answers 503).
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work at an edge: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


def in_groups(prefix: Sequence[str], value: str, rows: Iterable[tuple[Any, ...]]) -> Query:
    """`(prefix = ? AND ... AND value IN (?, ...)) OR ...`, one term per distinct prefix of
    `rows` (`(prefix..., value)`), for Reads: an index search on SQLite and PostgreSQL alike,
    where a row-value IN of several rows makes SQLite scan the table."""
    groups: dict[tuple[Any, ...], set[Any]] = {}
    for *prefix_values, item in rows:
        groups.setdefault(tuple(prefix_values), set()).add(item)
    terms, params = [], []
    for group, items in sorted(groups.items()):
        equal = "".join(f"{column} = ? AND " for column in prefix)
        terms.append(f"({equal}{value} IN ({', '.join('?' * len(items))}))")
        params += [*group, *sorted(items)]
    return " OR ".join(terms), params


Query = tuple[str, list[Any]]  # SQL for the driver, `?` marking each parameter; parameters


class Reads:
    """The statements a unit of work sends before it writes (its locks and look-ups), sent
    together: on PostgreSQL one round trip for all of them and the transaction's BEGIN
    (psycopg's pipeline, each statement unprepared so it is planned for its values); on
    SQLite each in turn. They run on the driver's connection, skipping SQLAlchemy's
    statement machinery (its cost per statement was more than the statement's); errors are
    raised as SQLAlchemy's."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.postgres = conn.dialect.name == "postgresql"
        self._queries: list[Query] = []
        self._rows: list[list[tuple[Any, ...]]] = []

    def add(self, query: Query) -> Callable[[], list[tuple[Any, ...]]]:
        """Queue a statement; the function returned gives its rows once `run` has run."""
        sql, params = query
        assert "%" not in sql, "no literal % in a Reads statement (psycopg's marker)"
        self._queries.append((sql.replace("?", "%s") if self.postgres else sql, params))
        index = len(self._queries) - 1
        return lambda: self._rows[index]

    def run(self) -> None:
        if not self._queries:
            return
        raw = self.conn.connection.driver_connection
        assert raw is not None, "a live connection"
        if self.postgres:
            with pipelined(self.conn):
                cursors = [raw.cursor() for _ in self._queries]
                for cursor, (sql, params) in zip(cursors, self._queries, strict=True):
                    cursor.execute(sql, params, prepare=False)
            self._rows = [cursor.fetchall() for cursor in cursors]  # all in, once synced
            return
        with driver_errors(self.conn):
            cursor = raw.cursor()
            self._rows = [cursor.execute(sql, params).fetchall() for sql, params in self._queries]


@contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """Statements whose results nobody reads, sent together: on PostgreSQL one round trip
    for all of them (psycopg's pipeline mode; an error surfaces at the end of the block, or
    at a commit inside it, as SQLAlchemy's exception for it); elsewhere each runs as usual.

    On an error the transaction, aborted on the server anyway, is rolled back at once: a
    failed commit inside the block leaves SQLAlchemy believing it ended, and the pool would
    otherwise take the connection back still in the failed transaction."""
    if conn.dialect.name != "postgresql":
        yield
        return
    raw = conn.connection.driver_connection
    assert raw is not None, "a live connection"
    try:
        with raw.pipeline():
            yield
    except BaseException as exc:
        with suppress(Exception):  # a broken connection: the pool discards it anyway
            raw.rollback()
        if isinstance(exc, conn.dialect.loaded_dbapi.Error):
            raise DBAPIError.instance(None, None, exc, conn.dialect.loaded_dbapi.Error) from exc
        raise


@dataclass
class Writes:
    """New rows gathered through a unit of work and inserted together at its end (a group
    commit's new studies and its journal rows).

    PostgreSQL: one statement for all of them, every table's rows in one JSON parameter
    (`jsonb_populate_recordset`, one INSERT per table in a WITH): one round trip and one
    statement per batch, where an executemany costs a protocol exchange and tens of
    microseconds of driver work per row, and each statement a fixed cost in SQLAlchemy and
    psycopg. SQLite (in-process, no round trips): the driver's executemany per table, values
    converted as SQLAlchemy would (its per-row parameter processing cost more than the
    inserts)."""

    items: list[tuple[Table, list[dict[str, Any]], bool]] = field(default_factory=list)

    def add(self, table: Table, rows: list[dict[str, Any]], *, skip_existing: bool = False) -> None:
        """`rows` (column name -> value, the same columns in every row) for `table`;
        `skip_existing`: a row whose key is stored already is left out (ON CONFLICT DO
        NOTHING)."""
        if rows:
            self.items.append((table, rows, skip_existing))

    def run(self, conn: Connection) -> None:
        if not self.items:
            return
        if conn.dialect.name == "postgresql":
            shape = tuple((table, tuple(rows[0]), skip) for table, rows, skip in self.items)
            data = json.dumps([rows for _, rows, _ in self.items], default=_json_value)
            conn.execute(_insert_json(shape), {"rows": data})
        else:
            with driver_errors(conn):
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                for table, rows, skip in self.items:
                    sql, columns = _sqlite_insert(conn.dialect, table, tuple(rows[0]), skip)
                    cursor.executemany(sql, [[f(r[c]) for c, f in columns] for r in rows])
        self.items.clear()


@functools.lru_cache(maxsize=64)
def _sqlite_insert(
    dialect: Dialect, table: Table, columns: tuple[str, ...], skip_existing: bool
) -> tuple[str, list[tuple[str, Callable[[Any], Any]]]]:
    """The driver's INSERT for these columns of `table`, and each column with its conversion
    to what SQLAlchemy would store (its own bind processor; a faster one for UTCDateTime)."""
    verb = "INSERT OR IGNORE" if skip_existing else "INSERT"
    names = ", ".join(table.c[name].name for name in columns)
    marks = ", ".join("?" * len(columns))
    converters = [(name, _sqlite_converter(table.c[name].type, dialect)) for name in columns]
    return f"{verb} INTO {table.name} ({names}) VALUES ({marks})", converters


@functools.lru_cache(maxsize=64)
def _insert_json(shape: tuple[tuple[Table, tuple[str, ...], bool], ...]) -> Executable:
    """`WITH data AS (the JSON), w0 AS (INSERT INTO t0 ...), ... INSERT INTO tn ...`, table i
    taking its rows from element i of the JSON array (parsed once, as jsonb); the server turns
    each value into the column's type as it would a text parameter. Foreign keys are checked
    at the end of the statement, so a study and its keys may come in together."""
    inserts = []
    for i, (table, columns, skip_existing) in enumerate(shape):
        names = ", ".join(table.c[name].name for name in columns)  # our own columns only
        inserts.append(
            f"INSERT INTO {table.name} ({names}) SELECT {names} FROM "
            f"jsonb_populate_recordset(NULL::{table.name}, (SELECT rows -> {i} FROM data))"
            + (" ON CONFLICT DO NOTHING" if skip_existing else "")
        )
    ctes = ["data AS (SELECT CAST(:rows AS jsonb) AS rows)"]
    ctes += [f"w{i} AS ({sql})" for i, sql in enumerate(inserts[:-1])]
    return text(f"WITH {', '.join(ctes)} {inserts[-1]}")


def _sqlite_converter(type_: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any]:
    if isinstance(type_, UTCDateTime):
        return _sqlite_datetime
    process = type_.bind_processor(dialect)
    return process if process is not None else _same


def _same(value: Any) -> Any:
    return value


def _sqlite_datetime(value: datetime | None) -> str | None:
    """UTCDateTime's value as SQLAlchemy's SQLite DATETIME stores it (UTC without its
    offset, microseconds always written)."""
    if value is None:
        return None
    if value.tzinfo is None:  # as UTCDateTime refuses it
        raise ValueError("naive datetime given to a timezone-aware column")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without "+00:00"


@contextmanager
def driver_errors(conn: Connection) -> Iterator[None]:
    """Statements run on the driver's connection raise SQLAlchemy's exception for the
    driver's, as statements run through SQLAlchemy do (is_conflict, is_transient read them)."""
    error = conn.dialect.loaded_dbapi.Error
    try:
        yield
    except error as exc:
        raise DBAPIError.instance(None, None, exc, error) from exc


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # as UTCDateTime refuses it
            raise ValueError("naive datetime given to a timezone-aware column")
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} has no JSON form for a row")


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection for the hot read path (Core selects, plain rows, no ORM)."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{READONLY: True})
        try:
            yield conn
        finally:
            conn.rollback()


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def is_conflict(exc: BaseException) -> bool:
    """A concurrent writer got there first (unique key, deadlock, serialisation failure):
    the whole unit of work can simply be run again."""
    if isinstance(exc, IntegrityError):
        return True
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return code in ("40001", "40P01")


def is_transient(exc: BaseException) -> bool:
    """The database is unavailable or busy (not the message's fault): retry later, never
    answer the sender with an error it would treat as final."""
    if is_conflict(exc):
        return False
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )
