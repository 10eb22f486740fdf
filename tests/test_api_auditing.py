"""Group commit of audit records (locator.api.auditing), on SQLite and PostgreSQL: every
record is committed before commit() returns, concurrent records share transactions, and a
failed batch fails every request in it."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from locator.api.auditing import AuditBatcher
from locator.audit import record_accesses
from locator.store.models import audit_table

Factory = sessionmaker[Session]


def record(n: int) -> dict[str, Any]:
    return {
        "request_id": f"req-{n}",
        "action": "search",
        "resource_type": "ImagingStudy",
        "query": "ImagingStudy?x",
        "nhs_number": None,
        "result_count": 0,
        "outcome": 200,
    }


def stored(factory: Factory, request_id: str | None = None) -> int:
    stmt = select(func.count()).select_from(audit_table)
    if request_id is not None:
        stmt = stmt.where(audit_table.c.request_id == request_id)
    with factory() as session:
        return int(session.execute(stmt).scalar_one())


def test_concurrent_records_are_all_committed_before_commit_returns(
    engine: Engine, session_factory: Factory
) -> None:
    written: list[str] = []

    def counting_write(conn: Connection, records: Any) -> None:
        written.extend(r["request_id"] for r in records)
        record_accesses(conn, records)

    batcher = AuditBatcher(engine, counting_write)
    missing: list[str] = []

    def request(n: int) -> None:
        batcher.commit([record(n)])
        if stored(session_factory, f"req-{n}") != 1:  # visible to another session at once
            missing.append(f"req-{n}")

    threads = [threading.Thread(target=request, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert missing == [] and stored(session_factory) == 40
    assert sorted(written) == sorted(f"req-{n}" for n in range(40))


def test_records_queued_during_a_commit_share_the_next_transaction(
    engine: Engine, session_factory: Factory
) -> None:
    sessions: dict[str, int] = {}
    numbers = itertools.count()
    batcher: AuditBatcher

    def slow_first(conn: Connection, records: Any) -> None:
        tx = next(numbers)  # one call of the writer is one transaction
        sessions.update((r["request_id"], tx) for r in records)
        record_accesses(conn, records)
        if "req-0" in sessions and tx == 0:  # hold the first commit until five more queue
            deadline = time.monotonic() + 10
            while len(batcher._queue) < 5 and time.monotonic() < deadline:
                time.sleep(0.001)

    batcher = AuditBatcher(engine, slow_first)
    first = threading.Thread(target=batcher.commit, args=([record(0)],))
    first.start()
    while "req-0" not in sessions:
        time.sleep(0.001)
    others = [threading.Thread(target=batcher.commit, args=([record(n)],)) for n in range(1, 6)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join()
    assert stored(session_factory) == 6
    shared = {sessions[f"req-{n}"] for n in range(1, 6)}
    assert len(shared) == 1 and shared != {sessions["req-0"]}  # one later transaction


def test_a_failed_batch_fails_its_requests_and_writes_nothing(
    engine: Engine, session_factory: Factory
) -> None:
    def failing(conn: Connection, records: Any) -> None:
        record_accesses(conn, records)
        if any(r["request_id"] == "req-2" for r in records):
            raise RuntimeError("disk full")

    batcher = AuditBatcher(engine, failing)
    batcher.commit([record(1)])
    with pytest.raises(RuntimeError, match="disk full"):
        batcher.commit([record(2), record(3)])
    assert stored(session_factory) == 1
    batcher.commit([record(4)])  # the batcher recovers
    assert stored(session_factory) == 2
