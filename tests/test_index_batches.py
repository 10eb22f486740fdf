"""apply_notices (the HL7 group commit's path) leaves what apply_notice leaves one by one.

Notices that only create new studies are written together; everything else goes one by one.
These tests compare whole rows written both ways, check the patient-safety cases where a
batch must not take the shortcut (a local id holding studies, a study named twice), and
count the statements, so a batch of new studies really is a few statements.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, String, cast, event, insert, select
from sqlalchemy.orm import Session, sessionmaker

from locator.core.index import PatientState, apply_notice, apply_notices
from locator.core.index import batches as batches_module
from locator.core.notice import ReportStatus, StudyNotice, StudyRef
from locator.store.db import Writes, is_conflict, transaction
from locator.store.models import local_link_table
from locator.trusts import store_trusts
from tests.bench.datagen import Generator, make_trusts, notices_of
from tests.index_helpers import NOW, assert_same_index, clear_index, notice, snapshot, studies

pytestmark = pytest.mark.usefixtures("registry")
Factory = sessionmaker[Session]
NHS_A, NHS_B = "9990000018", "9990000026"


def _generated(factory: Factory, count: int, seed: int) -> list[StudyNotice]:
    trusts = make_trusts(3)
    with transaction(factory) as session:
        store_trusts(session, trusts=trusts)
    return [n for s in Generator(trusts, seed=seed).studies(count) for n in notices_of(s)]


def _one_by_one(factory: Factory, notices: Sequence[StudyNotice]) -> None:
    for n in notices:
        with transaction(factory) as session:
            apply_notice(session, notice=n)


def _in_batches(factory: Factory, notices: Sequence[StudyNotice], sizes: Iterator[int]) -> None:
    i = 0
    while i < len(notices):
        size = next(sizes)
        with transaction(factory) as session:
            apply_notices(session, notices=notices[i : i + size])
        i += size


def test_batches_write_what_one_by_one_writes(engine: Engine, session_factory: Factory) -> None:
    # The generator's patients have several studies, each an MPPS and an HL7 notice, with
    # NHS Number and MRN: batches mix new studies, second notices of a study and shared
    # local ids. Some of the notices are applied again, in later batches.
    notices = _generated(session_factory, 200, seed=11)
    rng = random.Random(5)
    notices += rng.sample(notices, 40)
    _one_by_one(session_factory, notices)
    expected = snapshot(engine, ignored={"id"})
    clear_index(engine)

    _in_batches(session_factory, notices, iter(lambda: rng.choice([1, 3, 8, 20]), None))

    batched = snapshot(engine, ignored={"id"})
    assert_same_index(batched, expected)


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_batch_of_new_studies_is_a_few_statements(
    engine: Engine, session_factory: Factory
) -> None:
    hl7 = [n for n in _generated(session_factory, 150, seed=12) if n.source.startswith("hl7")]
    batch = list({n.patient.nhs_number: n for n in hl7}.values())[:20]
    assert len(batch) == 20
    with _statements(engine) as seen, transaction(session_factory) as session:
        apply_notices(session, notices=batch)
    statements = [s for s in seen if not s.startswith(("BEGIN", "SAVEPOINT"))]
    # Keys stored? Local ids holding studies? Then one INSERT per table.
    assert len(statements) <= 6, statements
    assert len(studies(session_factory)) == 20


def test_a_local_id_holding_studies_is_linked_by_a_batch(session_factory: Factory) -> None:
    held = notice(StudyRef(study_uid="1.2.1", accession="A1"), local="M1", source="hl7:CRIS")
    with transaction(session_factory) as session:
        apply_notices(session, notices=[held])
    [row] = studies(session_factory)
    assert row.patient_state == PatientState.HELD

    # A later batch ties M1 to an NHS Number while creating another study: the held study
    # must be derived again (linked), so that notice cannot take the shortcut.
    linking = notice(StudyRef(study_uid="1.2.2", accession="A2"), nhs=NHS_A, local="M1")
    other = notice(StudyRef(study_uid="1.2.3", accession="A3"), nhs=NHS_B, local="M2")
    with transaction(session_factory) as session:
        apply_notices(session, notices=[linking, other])
    rows = {r.study_uid: r for r in studies(session_factory)}
    assert {uid: (r.patient_state, r.nhs_number) for uid, r in rows.items()} == {
        "1.2.1": (PatientState.LINKED, NHS_A),
        "1.2.2": (PatientState.LINKED, NHS_A),
        "1.2.3": (PatientState.LINKED, NHS_B),
    }


def test_a_held_study_and_its_link_in_one_batch(session_factory: Factory) -> None:
    held = notice(StudyRef(study_uid="1.2.1", accession="A1"), local="M1")
    linking = notice(StudyRef(study_uid="1.2.2", accession="A2"), nhs=NHS_A, local="M1")
    conflicting = notice(StudyRef(study_uid="1.2.3", accession="A3"), nhs=NHS_B, local="M1")
    with transaction(session_factory) as session:
        apply_notices(session, notices=[held, linking])
    rows = {r.study_uid: r for r in studies(session_factory)}
    assert rows["1.2.1"].nhs_number == NHS_A
    # The trust then ties M1 to another NHS Number: the held study is quarantined, never
    # given to either patient.
    with transaction(session_factory) as session:
        apply_notices(session, notices=[conflicting])
    rows = {r.study_uid: r for r in studies(session_factory)}
    assert rows["1.2.1"].patient_state == PatientState.QUARANTINED
    assert rows["1.2.1"].nhs_number is None
    assert rows["1.2.3"].nhs_number == NHS_B


def test_a_study_named_twice_in_a_batch_keeps_the_best_report(session_factory: Factory) -> None:
    final = notice(
        StudyRef(
            study_uid="1.2.9",
            accession="A9",
            report_status=ReportStatus.FINAL,
            report_time=NOW,
            report_hash="f",
        ),
        nhs=NHS_A,
    )
    preliminary = notice(
        StudyRef(
            study_uid="1.2.9",
            report_status=ReportStatus.PRELIMINARY,
            report_time=NOW,
            report_hash="p",
        ),
        nhs=NHS_A,
    )
    with transaction(session_factory) as session:
        apply_notices(session, notices=[final, preliminary])
    [row] = studies(session_factory)
    assert (row.report_status, row.accession, row.nhs_number) == ("final", "A9", NHS_A)


def test_a_race_lost_in_a_batch_is_a_conflict_to_retry(
    session_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer stores a key between the batch's look-up and its inserts (here: the
    look-up is made to miss it): the batch fails as a conflict, which the MLLP committer
    retries, and the retry finds the study."""
    first = notice(StudyRef(study_uid="1.2.7", accession="A7"), nhs=NHS_A)
    with transaction(session_factory) as session:
        apply_notices(session, notices=[first])
    again = notice(StudyRef(study_uid="1.2.7", accession="A7"), nhs=NHS_A, source="hl7:RIS2")
    missed = lambda: (set(), set())  # noqa: E731
    monkeypatch.setattr(batches_module, "look_up_stored", lambda reads, notices: missed)
    with pytest.raises(Exception) as raised, transaction(session_factory) as session:
        apply_notices(session, notices=[again])
    assert is_conflict(raised.value), raised.value
    monkeypatch.undo()
    with transaction(session_factory) as session:
        apply_notices(session, notices=[again])
    [row] = studies(session_factory)
    assert row.nhs_number == NHS_A and row.version == 1


@pytest.mark.parametrize("one_by_one", [False, True], ids=["batch", "single"])
@pytest.mark.parametrize("hold_first", [True, False], ids=["hold-first", "link-first"])
def test_a_hold_and_the_link_that_lifts_it_never_miss_each_other(
    session_factory: Factory, one_by_one: bool, hold_first: bool
) -> None:
    """Two writers at once (two MLLP committers, or MLLP and MPPS): one creates a study held
    under a local id, the other records that local id's link to an NHS Number, and the first
    has not committed when the second starts. The second waits for the first and sees its
    rows, so the study ends linked; without the wait each misses the other's rows and the
    study stays held."""
    held = notice(StudyRef(study_uid="1.2.50", accession="H1"), local="L9")
    link = notice(StudyRef(study_uid="1.2.51", accession="H2"), nhs=NHS_A, local="L9")
    early, late = (held, link) if hold_first else (link, held)
    started = threading.Event()

    def first() -> None:
        with transaction(session_factory) as session:
            apply_notices(session, notices=[early])
            started.set()
            time.sleep(0.5)  # the other writer starts now, before this commits

    writer = threading.Thread(target=first)
    writer.start()
    assert started.wait(10)
    with transaction(session_factory) as session:
        if one_by_one:
            apply_notice(session, notice=late)
        else:
            apply_notices(session, notices=[late])
    writer.join()
    rows = {r.accession: r for r in studies(session_factory)}
    assert rows["H1"].nhs_number == NHS_A, rows["H1"].patient_state
    assert rows["H2"].nhs_number == NHS_A


def test_batch_rows_are_stored_as_sqlalchemy_stores_them(engine: Engine) -> None:
    """Writes (the driver's executemany on SQLite, one JSON parameter on PostgreSQL) stores
    what SQLAlchemy's own INSERT stores, down to the text of a time on SQLite, which the
    index compares as text: whole seconds, microseconds, another zone, a summer time."""
    times = [
        datetime(2026, 1, 5, 9, 0, tzinfo=UTC),
        datetime(2026, 3, 29, 0, 30, 0, 1, tzinfo=UTC),
        datetime(2026, 7, 1, 12, 15, 30, 250000, tzinfo=ZoneInfo("Europe/London")),
        datetime(2026, 10, 25, 1, 30, 5, 123, tzinfo=timezone(timedelta(hours=-5))),
    ]
    with engine.begin() as conn:
        for i, t in enumerate(times):
            row = {"trust_ods": "RRK", "nhs_number": NHS_A, "first_seen": t}
            conn.execute(insert(local_link_table), row | {"local_id": f"S{i}"})
            writes = Writes()
            writes.add(local_link_table, [row | {"local_id": f"W{i}"}], skip_existing=True)
            writes.add(local_link_table, [row | {"local_id": f"W{i}"}], skip_existing=True)
            writes.run(conn)
    c = local_link_table.c
    text = cast(c.first_seen, String).label("text")
    with engine.connect() as conn:
        rows = conn.execute(select(c.local_id, text, c.first_seen))
        by_id = {r.local_id: r for r in rows}
    assert len(by_id) == 2 * len(times)  # skip_existing left the second copy out
    for i, t in enumerate(times):
        assert by_id[f"W{i}"].text == by_id[f"S{i}"].text
        assert by_id[f"W{i}"].first_seen == t
