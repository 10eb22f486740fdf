"""Group commit for the audit trail: every request's record is committed before its response
is sent, and records of concurrent requests share one transaction (design.md, Scale: audit
writes batched).

A commit costs an fsync (SQLite WAL with synchronous=FULL, PostgreSQL synchronous_commit):
one per request caps the API at roughly one request per fsync, and SQLite's busy handler
makes concurrent writers back off in sleeps of up to 100 ms. Here one thread at a time
commits; requests that arrive meanwhile queue their records, and the next committer writes
all queued records in one transaction ("flat combining": no extra thread, no added latency
when idle), as one INSERT on a plain connection; on PostgreSQL BEGIN, INSERT and COMMIT go
in one round trip (pipelined). A failed batch fails every request in it: none of them
returns patient data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine

from locator.store.db import pipelined

Record = dict[str, Any]
Writer = Callable[[Connection, Sequence[Record]], None]


@dataclass(slots=True)
class _Pending:
    records: Sequence[Record]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class AuditBatcher:
    """Writes audit records with `write(connection, records)` in shared transactions."""

    def __init__(self, engine: Engine, write: Writer) -> None:
        self._engine = engine
        self._write = write
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._queue: list[_Pending] = []

    def commit(self, records: Sequence[Record]) -> None:
        """Return once `records` are committed; raise what the commit raised otherwise."""
        mine = _Pending(records)
        with self._queue_lock:
            self._queue.append(mine)
        with self._commit_lock:
            if not mine.done.is_set():
                self._commit_queued()
        if mine.error is not None:
            raise mine.error

    def _commit_queued(self) -> None:
        with self._queue_lock:
            batch, self._queue = self._queue, []
        error: BaseException | None = None
        try:
            with self._engine.connect() as conn, pipelined(conn):
                self._write(conn, [record for pending in batch for record in pending.records])
                conn.commit()
        except Exception as exc:
            error = exc
        for pending in batch:
            pending.error = error
            pending.done.set()
