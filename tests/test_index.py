"""The merge rules of design.md, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from locator.core.index import PatientState
from locator.core.notice import Coding, FeedKind, ReportStatus, SeriesRef, StudyRef, StudyStatus
from locator.trusts import TrustRegistry
from tests.index_helpers import NOW, apply_all, keys_of, notice, studies

pytestmark = pytest.mark.usefixtures("registry")
Factory = sessionmaker[Session]

ALICE, BOB = "9990000018", "9990000026"
UID = "1.2.826.0.1.3680043.10.999.1.1"


def test_a_notice_creates_a_linked_study(session_factory: Factory) -> None:
    ref = StudyRef(
        study_uid=UID,
        accession="A1",
        modalities=("CT",),
        procedure=Coding("https://nicip.nhs.uk", "CHEAD", "CT Head"),
        started=NOW,
        status=StudyStatus.AVAILABLE,
        report_status=ReportStatus.FINAL,
    )
    [result] = apply_all(session_factory, [notice(ref, nhs=ALICE)])
    assert result.changed
    [study] = studies(session_factory)
    assert study.id == result.study_ids[0]
    assert (study.nhs_number, study.patient_state, study.status) == (ALICE, "linked", "available")
    assert (study.study_uid, study.accession, study.modalities) == (UID, "A1", "CT")
    assert study.report_status == "final" and study.version == 1
    assert json.loads(study.procedures) == [["https://nicip.nhs.uk", "CHEAD", "CT Head"]]
    assert keys_of(session_factory, study.id) == {("uid", UID), ("acc", "A1")}


def test_reapplying_a_notice_changes_nothing(session_factory: Factory) -> None:
    n = notice(StudyRef(accession="A1", status=StudyStatus.AVAILABLE), nhs=ALICE)
    first, again = apply_all(session_factory, [n, n])
    assert first.changed and not again.changed
    [study] = studies(session_factory)
    assert study.version == 1


def test_accession_then_uid_join_and_the_first_created_survives(session_factory: Factory) -> None:
    by_acc = notice(
        StudyRef(accession="A1", report_status=ReportStatus.FINAL, status=StudyStatus.AVAILABLE),
        nhs=ALICE,
    )
    by_uid = notice(
        StudyRef(
            study_uid=UID, status=StudyStatus.REGISTERED, series=(SeriesRef("1.2.3.1", "CT", 12),)
        ),
        feed=FeedKind.MPPS,
        source="mpps:9.9",
        nhs=ALICE,
        at=NOW + timedelta(1),
    )
    both = notice(StudyRef(study_uid=UID, accession="A1"), nhs=ALICE, at=NOW + timedelta(2))
    [first], [second], [joined] = (
        r.study_ids for r in apply_all(session_factory, [by_acc, by_uid, both])
    )
    assert first != second and joined == first
    rows = studies(session_factory, include_merged=True)
    survivor = next(r for r in rows if r.id == first)
    loser = next(r for r in rows if r.id == second)
    assert loser.merged_into == first and loser.nhs_number is None
    assert survivor.feeds == "hl7,mpps" and survivor.number_of_instances == 12
    assert survivor.status == "available" and survivor.report_status == "final"
    assert keys_of(session_factory, first) == {("uid", UID), ("acc", "A1")}
    assert survivor.first_seen == NOW


def test_status_never_moves_backwards(session_factory: Factory) -> None:
    done = notice(StudyRef(study_uid=UID, status=StudyStatus.AVAILABLE), nhs=ALICE)
    late = notice(
        StudyRef(study_uid=UID, status=StudyStatus.REGISTERED),
        nhs=ALICE,
        at=NOW + timedelta(hours=1),
    )
    cancel = notice(StudyRef(study_uid=UID, status=StudyStatus.CANCELLED), nhs=ALICE)
    apply_all(session_factory, [done, late, cancel])
    [study] = studies(session_factory)
    assert study.status == "available"


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        ([("final", 2), ("preliminary", 3)], ("final", 2)),
        ([("corrected", 1), ("final", 5)], ("corrected", 1)),
        ([("final", 1), ("final", 4), ("final", 2)], ("final", 4)),
        ([("preliminary", 1), ("corrected", 2), ("preliminary", 9)], ("corrected", 2)),
    ],
)
def test_report_status_precedence(
    session_factory: Factory, reports: list[tuple[str, int]], expected: tuple[str, int]
) -> None:
    ns = [
        notice(
            StudyRef(
                accession="A1",
                report_status=ReportStatus(status),
                report_time=NOW + timedelta(hours=h),
                report_hash=f"h{h}",
            ),
            nhs=ALICE,
        )
        for status, h in reports
    ]
    apply_all(session_factory, ns)
    [study] = studies(session_factory)
    assert (study.report_status, study.report_time) == (
        expected[0],
        NOW + timedelta(hours=expected[1]),
    )


def test_mrn_only_is_held_then_linked_by_a_later_notice_of_that_trust(
    session_factory: Factory,
) -> None:
    held = notice(StudyRef(accession="A1"), local="K1234567")
    other = notice(StudyRef(accession="A2"), local="K1234567")
    apply_all(session_factory, [held, other])
    assert {s.patient_state for s in studies(session_factory)} == {"held"}
    assert all(s.nhs_number is None for s in studies(session_factory))
    tie = notice(StudyRef(accession="A3"), local="K1234567", nhs=ALICE)
    apply_all(session_factory, [tie])
    rows = studies(session_factory)
    assert sorted((s.accession, s.patient_state, s.nhs_number) for s in rows) == [
        ("A1", "linked", ALICE),
        ("A2", "linked", ALICE),
        ("A3", "linked", ALICE),
    ]


def test_the_same_mrn_at_two_trusts_is_never_joined(session_factory: Factory) -> None:
    apply_all(
        session_factory,
        [
            notice(StudyRef(accession="A1"), trust="RZZ02", local="K1"),
            notice(StudyRef(accession="A1"), trust="RZZ01", local="K1", nhs=ALICE),
        ],
    )
    by_trust = {s.trust_ods: s for s in studies(session_factory)}
    assert by_trust["RZZ01"].nhs_number == ALICE
    assert by_trust["RZZ02"].patient_state == "held" and by_trust["RZZ02"].nhs_number is None


def test_conflicting_assertions_quarantine_and_a_withdrawal_resolves(
    session_factory: Factory,
) -> None:
    ref = StudyRef(accession="A1", status=StudyStatus.AVAILABLE)
    apply_all(
        session_factory,
        [
            notice(ref, nhs=ALICE, source="hl7:CRIS"),
            notice(ref, nhs=BOB, feed=FeedKind.MPPS, source="mpps:1.2.3"),
        ],
    )
    [study] = studies(session_factory)
    assert (study.patient_state, study.nhs_number) == (PatientState.QUARANTINED, None)
    apply_all(
        session_factory,
        [notice(ref, nhs=BOB, feed=FeedKind.MPPS, source="mpps:1.2.3", withdrawn=True)],
    )
    [study] = studies(session_factory)
    assert (study.patient_state, study.nhs_number) == (PatientState.LINKED, ALICE)


def test_a_source_can_only_withdraw_its_own_assertion(session_factory: Factory) -> None:
    ref = StudyRef(accession="A1", status=StudyStatus.AVAILABLE)
    apply_all(
        session_factory,
        [
            notice(ref, nhs=ALICE, source="hl7:CRIS"),
            notice(ref, nhs=ALICE, source="hl7:OTHER", withdrawn=True),
        ],
    )
    [study] = studies(session_factory)
    assert (study.patient_state, study.nhs_number) == ("linked", ALICE)


def test_withdrawing_the_only_assertion_is_entered_in_error(session_factory: Factory) -> None:
    ref = StudyRef(accession="A1", status=StudyStatus.AVAILABLE)
    apply_all(session_factory, [notice(ref, nhs=ALICE), notice(ref, nhs=ALICE, withdrawn=True)])
    [study] = studies(session_factory)
    assert (study.status, study.patient_state) == ("entered-in-error", "entered-in-error")
    # the withdrawal is permanent: the same assertion again does not revive it
    apply_all(session_factory, [notice(ref, nhs=ALICE)])
    assert studies(session_factory)[0].status == "entered-in-error"


def test_grouped_procedure_several_studies_in_one_notice(session_factory: Factory) -> None:
    series = (SeriesRef("1.2.3.9", "CT", 40),)
    n = notice(
        StudyRef(study_uid="1.2.3.1", accession="A1", series=series, modalities=("CT",)),
        StudyRef(study_uid="1.2.3.2", accession="A2", series=series, modalities=("CT",)),
        feed=FeedKind.MPPS,
        source="mpps:1.2.3",
        nhs=ALICE,
    )
    [result] = apply_all(session_factory, [n])
    assert len(result.study_ids) == 2
    assert sorted(s.accession for s in studies(session_factory)) == ["A1", "A2"]


def test_grouped_procedure_two_accessions_one_uid_is_one_study(session_factory: Factory) -> None:
    n = notice(
        StudyRef(study_uid=UID, accession="A1"),
        StudyRef(study_uid=UID, accession="A2"),
        feed=FeedKind.MPPS,
        source="mpps:1.2.3",
        nhs=ALICE,
    )
    [result] = apply_all(session_factory, [n])
    [study] = studies(session_factory)
    assert result.study_ids == (study.id,)
    assert keys_of(session_factory, study.id) == {("uid", UID), ("acc", "A1"), ("acc", "A2")}


@pytest.mark.parametrize("uid_first", [True, False])
def test_an_accession_shared_by_two_uids_is_not_merged(
    session_factory: Factory, uid_first: bool
) -> None:
    second = [notice(StudyRef(study_uid="1.2"), nhs=ALICE)] if uid_first else []
    apply_all(
        session_factory,
        [
            notice(StudyRef(study_uid="1.1", accession="A1"), nhs=ALICE),
            *second,
            notice(StudyRef(study_uid="1.2", accession="A1"), nhs=ALICE),
        ],
    )
    rows = studies(session_factory)
    assert sorted(s.study_uid for s in rows) == ["1.1", "1.2"]
    assert {s.study_uid: keys_of(session_factory, s.id) for s in rows} == {
        "1.1": {("uid", "1.1"), ("acc", "A1")},
        "1.2": {("uid", "1.2")},
    }


def test_an_mpps_step_series_list_is_replaced_by_a_newer_version(session_factory: Factory) -> None:
    create = notice(
        StudyRef(study_uid=UID, series=(SeriesRef("s1", "MR", 1),), series_version=0),
        feed=FeedKind.MPPS,
        source="mpps:7",
        nhs=ALICE,
    )
    final = notice(
        StudyRef(
            study_uid=UID,
            series=(SeriesRef("s2", "MR", 30),),
            series_version=1,
            status=StudyStatus.AVAILABLE,
        ),
        feed=FeedKind.MPPS,
        source="mpps:7",
        nhs=ALICE,
    )
    apply_all(session_factory, [final, create])  # out of order: the N-SET's list still wins
    [study] = studies(session_factory)
    assert json.loads(study.series) == [{"uid": "s2", "modality": "MR", "number_of_instances": 30}]
    assert (study.number_of_series, study.number_of_instances) == (1, 30)


def test_provenance_first_and_last_seen(session_factory: Factory) -> None:
    later = NOW + timedelta(days=3)
    apply_all(
        session_factory,
        [
            notice(StudyRef(accession="A1"), nhs=ALICE),
            notice(
                StudyRef(accession="A1", status=StudyStatus.AVAILABLE),
                nhs=ALICE,
                feed=FeedKind.MPPS,
                source="mpps:1",
                at=later,
            ),
        ],
    )
    [study] = studies(session_factory)
    assert (study.first_seen, study.last_seen, study.feeds) == (NOW, later, "hl7,mpps")


def test_a_pointer_holds_no_names_or_report_text(registry: TrustRegistry) -> None:
    from locator.store.models import study_table

    columns = {c.name for c in study_table.columns}
    assert not columns & {"name", "patient_name", "birth_date", "dob", "report", "text"}


def test_quarantined_studies_are_listed_for_operators_with_masked_numbers(
    session_factory: Factory, tmp_path: object
) -> None:
    from locator.core.index import list_quarantined

    ref = StudyRef(accession="A1", status=StudyStatus.AVAILABLE)
    apply_all(
        session_factory,
        [
            notice(ref, nhs=ALICE, source="hl7:CRIS"),
            notice(ref, nhs=BOB, feed=FeedKind.MPPS, source="mpps:1.2.3"),
        ],
    )
    with session_factory() as session:
        [entry] = list_quarantined(session)
    assert entry.accession == "A1" and entry.trust_ods == "RZZ01"
    assert entry.claims == (("hl7:CRIS", "nhs:******0018"), ("mpps:1.2.3", "nhs:******0026"))
