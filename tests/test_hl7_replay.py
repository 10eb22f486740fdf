"""`locator journal` and `locator replay` (click commands) against a journal the listener
wrote over real sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

import ingest.hl7_process as process_module
from ingest.replay import parse_since
from locator.cli import main
from locator.config import Settings
from locator.core.journal import find_previous_many, purge_journal
from locator.store import migrate
from locator.store.db import create_db_engine
from locator.trusts import TrustRegistry, example_trusts, store_trusts
from tests.hl7_messages.helpers import ListenerHarness, oru


@pytest.fixture
def strict(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> Iterator[ListenerHarness]:
    """A listener refusing test-range NHS Numbers."""
    harness = ListenerHarness(
        Settings(mllp_port=0, accept_test_nhs_numbers=False), session_factory, registry
    )
    yield harness
    harness.stop()


def test_journal_lists_and_replay_fixes(
    strict: ListenerHarness, db_url: str, session_factory: sessionmaker[Session]
) -> None:
    assert strict.send(oru(control="J1", facility="NEWRIS")).code == "AR"
    assert strict.send(oru(control="J2", accession="ACC-J2")).code == "AE"
    assert strict.send(oru(control="J3", pid3="9990000019^^^NHS^NH")).code == "AE"
    runner = CliRunner()

    listing = runner.invoke(main, ["journal", "--db", db_url])
    assert listing.exit_code == 0, listing.output
    assert "J1" in listing.output and "rejected" in listing.output and "204" in listing.output
    assert "J2" in listing.output and "error" in listing.output
    assert "9990000018" not in listing.output and "9990000019" not in listing.output
    only = runner.invoke(main, ["journal", "--db", db_url, "--outcome", "rejected"])
    assert "J1" in only.output and "J2" not in only.output
    assert "J1" not in runner.invoke(main, ["journal", "--db", db_url, "--trust", "RZZ01"]).output
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert (
        "no journal entries"
        in runner.invoke(main, ["journal", "--db", db_url, "--since", future]).output
    )
    first_id = strict.journal()[0].id
    shown = runner.invoke(main, ["journal", "--db", db_url, "--show", str(first_id)])
    assert "MSH_4" in shown.output and "NEWRIS" in shown.output
    assert "9990000018" not in shown.output

    # the configuration fix: NEWRIS becomes one of RZZ01's facilities
    trusts = [
        replace(t, hl7_sending_facilities=(*t.hl7_sending_facilities, "NEWRIS"))
        if t.ods_code == "RZZ01"
        else t
        for t in example_trusts()
    ]
    with session_factory() as session, session.begin():
        store_trusts(session, trusts=trusts)
    result = runner.invoke(main, ["replay", "--db", db_url, "--status", "rejected"])
    assert result.exit_code == 0, result.output
    assert "replayed 1 entry: 1 accepted" in result.output
    assert [(e.control_id, e.outcome) for e in strict.journal()] == [
        ("J1", "accepted"),
        ("J2", "error"),
        ("J3", "error"),
    ]
    assert [r.accession for r in strict.studies()] == ["RZZ26000001"]

    # the test-range setting changed: J2 now goes in; J3 (a bad number) stays an error
    result = runner.invoke(main, ["replay", "--db", db_url, "--accept-test-nhs-numbers"])
    assert result.exit_code == 0, result.output
    assert "replayed 2 entries: 1 accepted, 1 error" in result.output
    assert [e.outcome for e in strict.journal()] == ["accepted", "accepted", "error"]
    assert sorted(r.accession for r in strict.studies()) == ["ACC-J2", "RZZ26000001"]
    replayed = strict.rows("SELECT replayed_at FROM journal WHERE control_id = 'J2'")
    assert replayed[0].replayed_at is not None


def test_replay_of_something_since_accepted_is_a_duplicate(
    strict: ListenerHarness, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = oru(control="D1", pid3="K1^^^RZZ^MR")
    real = process_module.apply_notices

    def broken(session: Session, *, notices: Any) -> Any:
        raise ValueError("a bug of ours")

    monkeypatch.setattr(process_module, "apply_notices", broken)
    assert strict.send(message).code == "AE"  # 207: our own failure
    monkeypatch.setattr(process_module, "apply_notices", real)
    assert strict.send(message).code == "AA"  # the sender's resend is processed again
    version = strict.rows("SELECT version FROM study")[0].version
    result = CliRunner().invoke(main, ["replay", "--db", db_url, "--status", "error"])
    assert "1 duplicate" in result.output, result.output
    assert strict.rows("SELECT version FROM study")[0].version == version
    assert [e.outcome for e in strict.journal()] == ["duplicate", "accepted"]


def test_retention_purge(strict: ListenerHarness) -> None:
    strict.send(oru(control="OLD"))
    with strict.factory() as session, session.begin():
        assert purge_journal(session, before=datetime.now(UTC) - timedelta(days=1)) == 0
        assert purge_journal(session, before=datetime.now(UTC) + timedelta(seconds=5)) == 1
    assert strict.journal() == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("30m", timedelta(minutes=30)),
        ("2w", timedelta(weeks=2)),
    ],
)
def test_parse_since_ages(value: str, expected: timedelta) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_since(value, now=now) == now - expected


def test_parse_since_dates() -> None:
    assert parse_since("2026-01-02") == datetime(2026, 1, 2, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_duplicate_lookup_searches_the_index(tmp_path: Path) -> None:
    """The per-batch lookup of earlier (sender, facility, control id) entries must stay an
    index search as the journal grows (SQLite scans on a multi-row row-value IN)."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate.upgrade(engine)
    captured: list[str] = []  # as SQLite ran them, parameters in place
    keys = [("CRIS", "RZZ01", "A"), ("CRIS", "RZZ01", "B"), ("RADIS", "RZZ02", "C")]
    with Session(engine) as session:
        raw = session.connection().connection.driver_connection
        raw.set_trace_callback(captured.append)
        assert find_previous_many(session, feed="hl7", keys=keys) == {}
        raw.set_trace_callback(None)
    [statement] = [s for s in captured if "FROM journal" in s]
    assert "'RADIS'" in statement
    with engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement).all()
    details = " ".join(str(row[-1]) for row in plan)
    assert "SCAN journal" not in details
    assert "ix_journal_sender_app_sender_facility_control_id" in details
    engine.dispose()
