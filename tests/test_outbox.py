"""The outbox (locator.core.outbox) through the real index, on SQLite and PostgreSQL: a row
per live subscription of the study's patient, now and before, in the transaction of the
change; none when nothing visible changed, none for other patients, none for subscriptions
in error or off; the batch path writes what the one-by-one path writes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from locator.core.index import apply_notices
from locator.core.notice import ReportStatus, StudyRef, StudyStatus
from locator.store.db import transaction
from locator.store.models import subscription_outbox_table, subscription_table
from locator.trusts import TrustRegistry
from tests.index_helpers import apply_all, notice, studies

A, B, C = "9990000018", "9990000026", "9990000034"


def subscribe(factory: sessionmaker[Session], nhs: str, status: str = "active") -> str:
    sub_id = uuid.uuid4().hex
    now = datetime.now(UTC)
    with transaction(factory) as session:
        session.connection().execute(
            insert(subscription_table).values(
                id=sub_id,
                owner="care-record",
                status=status,
                nhs_number=nhs,
                endpoint="https://care.example/hook",
                headers="[]",
                version=1,
                created_at=now,
                updated_at=now,
                attempts=0,
            )
        )
    return sub_id


def owed(factory: sessionmaker[Session]) -> list[tuple[str, str]]:
    out = subscription_outbox_table
    with factory() as session:
        rows = session.execute(select(out.c.subscription_id, out.c.study_id).order_by(out.c.id))
        return [tuple(r) for r in rows]  # type: ignore[misc]


def ref(uid: str, **kw: object) -> StudyRef:
    return StudyRef(study_uid=uid, accession=f"ACC{uid[-3:]}", **kw)  # type: ignore[arg-type]


def test_rows_for_the_patient_now_and_before(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    sub_a, sub_b = subscribe(session_factory, A), subscribe(session_factory, B)
    subscribe(session_factory, A, status="error")
    subscribe(session_factory, A, status="off")
    subscribe(session_factory, C)
    apply_all(session_factory, [notice(ref("1.2.3.101"), nhs=A)])
    (study,) = studies(session_factory)
    assert owed(session_factory) == [(sub_a, study.id)]
    # The same notice again: nothing visible changes, nothing is owed.
    apply_all(session_factory, [notice(ref("1.2.3.101"), nhs=A)])
    assert owed(session_factory) == [(sub_a, study.id)]
    # A report: a change for A.
    apply_all(
        session_factory,
        [
            notice(
                ref("1.2.3.101", status=StudyStatus.AVAILABLE, report_status=ReportStatus.FINAL),
                nhs=A,
            )
        ],
    )
    assert owed(session_factory)[1:] == [(sub_a, study.id)]
    # Sent for the wrong patient (entered-in-error, still A's), then asserted for B by another
    # source: A learns of both changes, B that it arrived.
    before = len(owed(session_factory))
    apply_all(
        session_factory,
        [
            notice(ref("1.2.3.101"), nhs=A, withdrawn=True),
            notice(ref("1.2.3.101"), nhs=B, source="hl7:RIS2"),
        ],
    )
    assert owed(session_factory)[before:] == [(sub_a, study.id)] * 2 + [(sub_b, study.id)]


def test_a_held_study_notifies_when_its_local_id_is_tied(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    sub_a = subscribe(session_factory, A)
    apply_all(session_factory, [notice(ref("1.2.3.201"), local="MRN7")])
    assert owed(session_factory) == []  # held under a local id: nobody's yet
    apply_all(session_factory, [notice(ref("1.2.3.202"), local="MRN7", nhs=A)])
    held, tied = studies(session_factory)
    assert sorted(owed(session_factory)) == sorted([(sub_a, held.id), (sub_a, tied.id)])


def test_a_merge_notifies_the_survivor_and_the_merged_away(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    sub_a = subscribe(session_factory, A)
    apply_all(
        session_factory,
        [
            notice(StudyRef(study_uid="1.2.3.301"), nhs=A),
            notice(StudyRef(accession="ACC301"), nhs=A),
        ],
    )
    first, second = (s.id for s in studies(session_factory))
    apply_all(session_factory, [notice(StudyRef(study_uid="1.2.3.301", accession="ACC301"), nhs=A)])
    rows = owed(session_factory)
    assert sorted(rows[:2]) == sorted([(sub_a, first), (sub_a, second)])
    assert {(sub_a, first), (sub_a, second)} <= set(rows[2:])


def test_the_batch_path_owes_what_one_by_one_owes(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    sub_a, sub_b = subscribe(session_factory, A), subscribe(session_factory, B)
    batch = [
        notice(ref("1.2.3.401"), nhs=A),
        notice(ref("1.2.3.402"), nhs=B),
        notice(ref("1.2.3.403"), nhs=C),
        notice(ref("1.2.3.404"), nhs=A),
    ]
    with transaction(session_factory) as session:
        apply_notices(session, notices=batch)
    by_uid = {s.study_uid: s.id for s in studies(session_factory)}
    assert sorted(owed(session_factory)) == sorted(
        [
            (sub_a, by_uid["1.2.3.401"]),
            (sub_b, by_uid["1.2.3.402"]),
            (sub_a, by_uid["1.2.3.404"]),
        ]
    )


def test_a_rolled_back_change_owes_nothing(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    subscribe(session_factory, A)
    try:
        with transaction(session_factory) as session:
            apply_notices(session, notices=[notice(ref("1.2.3.501"), nhs=A)])
            raise RuntimeError("the edge fails before its commit")
    except RuntimeError:
        pass
    assert owed(session_factory) == [] and studies(session_factory) == []
