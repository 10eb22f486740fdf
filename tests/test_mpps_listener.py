"""The MPPS SCP over real associations (pynetdicom as the modality) on both database backends:
DIMSE statuses, association checks, state across restarts and listeners, the index effect."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom.pdu_primitives import MaximumLengthNotification
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest.dicom_listener import MAX_ATTRIBUTE_LIST_BYTES, DicomListener
from ingest.mpps import DimseStatus
from ingest.mpps_store import sweep_stale_steps
from locator.config import Settings
from locator.core.index import apply_notice
from locator.core.nhs_number import NhsNumber
from locator.core.notice import (
    Coding,
    FeedKind,
    PatientRef,
    ReportStatus,
    StudyNotice,
    StudyRef,
    StudyStatus,
)
from locator.metrics import MESSAGES, STALE_MPPS_STEPS
from locator.store.db import create_db_engine, make_session_factory, transaction
from locator.store.models import MppsStep, Study, StudyKey
from locator.trusts import TrustRegistry, example_trusts
from tests.dicom_helpers import (
    Modality,
    modality,
    mpps_create,
    mpps_set,
    rejected,
    running_listener,
    series_item,
)

NHS = "9990000018"
SUCCESS = DimseStatus.SUCCESS
A710 = 0xA710
Factory = sessionmaker[Session]


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, dicom_port=0, dicom_host="127.0.0.1")


@pytest.fixture
def listener(
    settings: Settings, session_factory: Factory, registry: TrustRegistry
) -> Iterator[DicomListener]:
    with running_listener(
        settings, session_factory=session_factory, registry=registry, sweep_interval=3600
    ) as running:
        yield running


@pytest.fixture
def port(listener: DicomListener) -> int:
    return listener.ports["dicom"]


@pytest.fixture
def ct(port: int) -> Iterator[Modality]:
    with modality(port, ae_title="RZZ01CT1") as m:
        yield m


def study_by(factory: Factory, kind: str, value: str, trust: str = "RZZ01") -> Study:
    with factory() as session:
        key = session.get(StudyKey, (trust, kind, value))
        assert key is not None, f"no study for {kind} {value}"
        study = session.get(Study, key.study_id)
        assert study is not None
        return study


def step_row(factory: Factory, uid: str) -> MppsStep | None:
    with factory() as session:
        return session.get(MppsStep, uid)


def messages(trust: str, outcome: str) -> float:
    return float(MESSAGES.labels(feed="mpps", trust=trust, outcome=outcome)._value.get())


# --------------------------------------------------------------------------- association


def test_echo(ct: Modality) -> None:
    assert ct.echo().status == SUCCESS


def test_unknown_calling_ae_is_rejected(port: int) -> None:
    assert rejected(port, "STRANGER")
    assert not rejected(port, "RZZ02CT1")


def test_calling_ae_decides_the_trust(port: int, session_factory: Factory) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    with modality(port, ae_title="RZZ02DX1") as dx:
        assert dx.create(mpps_create(studies=[(study_uid, "X1")], modality="DX"), uid).status == 0
    assert study_by(session_factory, "uid", study_uid, trust="RZZ02").trust_ods == "RZZ02"
    # another trust's modality cannot update the step: for it, the instance does not exist
    with modality(port, ae_title="RZZ01CT1") as other:
        assert other.set(mpps_set(), uid).status == DimseStatus.NO_SUCH_SOP_INSTANCE


# --------------------------------------------------------------------------- the happy path


def test_completed_step_makes_the_study_available(ct: Modality, session_factory: Factory) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    accepted = messages("RZZ01", "accepted")
    assert ct.create(mpps_create(studies=[(study_uid, "ACC77")]), uid).status == SUCCESS
    study = study_by(session_factory, "uid", study_uid)
    assert (study.status, study.nhs_number, study.accession) == ("registered", NHS, "ACC77")
    series = [series_item(images=5), series_item(images=3, non_images=1)]
    assert ct.set(mpps_set(series=series), uid).status == SUCCESS
    study = study_by(session_factory, "uid", study_uid)
    assert study.status == "available"
    assert (study.number_of_series, study.number_of_instances) == (2, 9)
    assert study.modalities == "CT" and "mpps" in study.feeds
    assert study.started == datetime(2026, 11, 28, 10, 15, tzinfo=UTC)
    row = step_row(session_factory, uid)
    assert row is not None and (row.status, row.version, row.calling_ae) == (
        "COMPLETED",
        1,
        "RZZ01CT1",
    )
    assert "TEST" not in row.attributes and "19700101" not in row.attributes
    assert messages("RZZ01", "accepted") == accepted + 2


# --------------------------------------------------------------------------- DIMSE statuses


def test_create_not_in_progress(ct: Modality) -> None:
    answer = ct.create(mpps_create(status="COMPLETED"), generate_uid())
    assert answer.status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    assert answer.comment is not None and "(0040,0252)" in answer.comment


def test_create_missing_attribute(ct: Modality) -> None:
    ds = mpps_create()
    del ds.Modality
    answer = ct.create(ds, generate_uid())
    assert answer.status == DimseStatus.MISSING_ATTRIBUTE
    assert answer.comment is not None and "(0008,0060)" in answer.comment


def test_create_without_affected_sop_instance_uid(ct: Modality) -> None:
    assert ct.create(mpps_create(), None).status == DimseStatus.INVALID_ATTRIBUTE_VALUE


def test_create_invalid_nhs_number(ct: Modality, session_factory: Factory) -> None:
    uid = generate_uid()
    answer = ct.create(mpps_create(patient_id="9990000019"), uid)
    assert answer.status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    assert answer.comment is not None and "(0010,0020)" in answer.comment
    assert step_row(session_factory, uid) is None


def test_duplicate_and_identical_resend_of_create(ct: Modality, session_factory: Factory) -> None:
    uid, ds = generate_uid(), mpps_create()
    assert ct.create(ds, uid).status == SUCCESS
    assert ct.create(ds, uid).status == SUCCESS  # a retry after a lost response
    assert ct.create(mpps_create(), uid).status == DimseStatus.DUPLICATE_SOP_INSTANCE
    row = step_row(session_factory, uid)
    assert row is not None and row.version == 0


def test_set_unknown_instance(ct: Modality) -> None:
    assert ct.set(mpps_set(), generate_uid()).status == DimseStatus.NO_SUCH_SOP_INSTANCE


@pytest.mark.parametrize("final", ["COMPLETED", "DISCONTINUED"])
def test_set_after_final_status(ct: Modality, final: str) -> None:
    uid = generate_uid()
    assert ct.create(mpps_create(), uid).status == SUCCESS
    last = mpps_set(status=final)
    assert ct.set(last, uid).status == SUCCESS
    assert ct.set(last, uid).status == SUCCESS  # identical resend of the final N-SET
    answer = ct.set(mpps_set(status=final), uid)
    assert answer.status == DimseStatus.PROCESSING_FAILURE
    assert answer.error_id == A710
    assert answer.comment == "Performed Procedure Step Object may no longer be updated"


def test_in_progress_sets_replace_the_series_list(ct: Modality, session_factory: Factory) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    assert ct.create(mpps_create(studies=[(study_uid, None)]), uid).status == SUCCESS
    first = mpps_set(status="IN PROGRESS", series=[series_item("1.2.826.1.1", images=2)])
    assert ct.set(first, uid).status == SUCCESS
    final = mpps_set(series=[series_item("1.2.826.1.2", images=4)])
    assert ct.set(final, uid).status == SUCCESS
    study = study_by(session_factory, "uid", study_uid)
    assert (study.number_of_series, study.number_of_instances) == (1, 4)
    assert "1.2.826.1.1" not in study.series


@pytest.mark.parametrize(
    ("values", "tag"),
    [
        ({"PatientID": "9990000026"}, "(0010,0020)"),
        ({"StudyInstanceUID": "1.2.826.0.9"}, "(0020,000D)"),
        ({"AccessionNumber": "CHANGED"}, "(0008,0050)"),
    ],
)
def test_set_may_not_change_identifiers(ct: Modality, values: dict[str, str], tag: str) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    assert ct.create(mpps_create(studies=[(study_uid, "ACC5")]), uid).status == SUCCESS
    same = mpps_set(status="IN PROGRESS")
    same.PatientID, same.StudyInstanceUID, same.AccessionNumber = NHS, study_uid, "ACC5"
    assert ct.set(same, uid).status == SUCCESS  # the same values are ignored
    changed = mpps_set()
    for keyword, value in values.items():
        setattr(changed, keyword, value)
    answer = ct.set(changed, uid)
    assert answer.status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    assert answer.comment is not None and tag in answer.comment


def test_discontinued_without_images_is_cancelled(ct: Modality, session_factory: Factory) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    assert ct.create(mpps_create(studies=[(study_uid, None)]), uid).status == SUCCESS
    assert ct.set(mpps_set(status="DISCONTINUED", series=[]), uid).status == SUCCESS
    assert study_by(session_factory, "uid", study_uid).status == "cancelled"


def test_incorrect_worklist_entry_withdraws_the_link(
    ct: Modality, session_factory: Factory
) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    assert ct.create(mpps_create(studies=[(study_uid, None)]), uid).status == SUCCESS
    assert study_by(session_factory, "uid", study_uid).nhs_number == NHS
    reason = mpps_set(status="DISCONTINUED", series=[], reason_code="110514")
    assert ct.set(reason, uid).status == SUCCESS
    study = study_by(session_factory, "uid", study_uid)
    assert study.patient_state == "entered-in-error"


# --------------------------------------------------------------------------- hostile input


def test_undecodable_dataset_gets_a_status_not_a_dropped_association(ct: Modality) -> None:
    # (0040,0270) SQ of undefined length whose first "item" has no item tag: decoding raises
    garbage = b"\x40\x00\x70\x02\xff\xff\xff\xff" + bytes(range(1, 9)) + b"\x00" * 8
    answer = ct.create_raw(garbage, generate_uid())
    assert answer.status == DimseStatus.PROCESSING_FAILURE
    assert ct.alive
    uid = generate_uid()
    assert ct.create(mpps_create(), uid).status == SUCCESS
    answer = ct.set_raw(garbage, uid)
    assert answer.status == DimseStatus.PROCESSING_FAILURE and answer.error_id is None
    assert ct.set(mpps_set(), uid).status == SUCCESS
    # bytes that decode to nonsense get a failure status too
    assert ct.create_raw(bytes(range(256)) * 4, generate_uid()).status != SUCCESS


def test_wrong_vr_and_binary_values(ct: Modality) -> None:
    ds = mpps_create()
    ds[0x00100020] = DataElement(0x00100020, "LO", "99900\x01\x02018")
    assert ct.create(ds, generate_uid()).status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    ds = mpps_create()
    ds[0x00400270] = DataElement(0x00400270, "SQ", DicomSequence([Dataset()]))
    assert ct.create(ds, generate_uid()).status == DimseStatus.MISSING_ATTRIBUTE


def _huge_raw() -> bytes:
    # (0040,0270) SQ of undefined length with a million empty items: past the size cap
    item = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    count = MAX_ATTRIBUTE_LIST_BYTES // len(item) + 1
    return b"\x40\x00\x70\x02\xff\xff\xff\xff" + item * count + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def test_huge_dataset_refused_while_others_are_served(port: int, ct: Modality) -> None:
    answers: list[Any] = []
    with modality(port, ae_title="RZZ01MR2") as hostile:
        thread = threading.Thread(
            target=lambda: answers.append(hostile.create_raw(_huge_raw(), generate_uid()))
        )
        thread.start()
        for _ in range(3):
            uid = generate_uid()
            assert ct.create(mpps_create(), uid).status == SUCCESS
            assert ct.set(mpps_set(), uid).status == SUCCESS
        thread.join(timeout=60)
        assert answers and answers[0].status == DimseStatus.PROCESSING_FAILURE
        assert hostile.alive and hostile.echo().status == SUCCESS


@pytest.mark.parametrize("oversized_pdus", [False, True])
def test_a_flood_closes_that_connection_only(port: int, ct: Modality, oversized_pdus: bool) -> None:
    """Past twice the size cap (or in PDUs over our advertised maximum) a peer is not sending
    MPPS: its connection is closed rather than buffered, and others carry on."""
    flood = _huge_raw() * (2 if not oversized_pdus else 1)
    with modality(port, ae_title="RZZ01MR2") as hostile:
        if oversized_pdus:  # ignore the maximum PDU length the locator advertised
            for item in hostile.assoc.acceptor.user_information:
                if isinstance(item, MaximumLengthNotification):
                    item.maximum_length_received = 4 * 1024 * 1024
            flood = flood[: 3 * 1024 * 1024]
        assert hostile.create_raw(flood, generate_uid()).status == -1  # no answer: closed
    uid = generate_uid()
    assert ct.create(mpps_create(), uid).status == SUCCESS
    assert ct.set(mpps_set(), uid).status == SUCCESS


def test_large_sequence_under_the_cap_is_counted(ct: Modality, session_factory: Factory) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    assert ct.create(mpps_create(studies=[(study_uid, None)]), uid).status == SUCCESS
    assert ct.set(mpps_set(series=[series_item(images=3000)]), uid).status == SUCCESS
    assert study_by(session_factory, "uid", study_uid).number_of_instances == 3000


# --------------------------------------------------------------------------- state


def test_step_survives_a_restart(
    settings: Settings, session_factory: Factory, registry: TrustRegistry
) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    with (
        running_listener(settings, session_factory=session_factory, registry=registry) as first,
        modality(first.ports["dicom"]) as m,
    ):
        assert m.create(mpps_create(studies=[(study_uid, None)]), uid).status == SUCCESS
    engine = create_db_engine(settings.database_url)  # a new process would build its own
    try:
        factory = make_session_factory(engine)
        with (
            running_listener(settings, session_factory=factory, registry=registry) as second,
            modality(second.ports["dicom"]) as m,
        ):
            assert m.set(mpps_set(), uid).status == SUCCESS
        assert study_by(factory, "uid", study_uid).status == "available"
    finally:
        engine.dispose()


def _at_once(ports: list[int], uids: list[str], send: Any) -> list[int]:
    """`send(modality, uid)` for every uid through every port at the same moment (a modality
    retrying after a timeout while its first attempt is still in flight elsewhere)."""
    results: list[int] = []
    barrier = threading.Barrier(len(ports) * len(uids))

    def one(port: int, uid: str) -> None:
        with modality(port) as m:
            barrier.wait(timeout=30)
            results.append(send(m, uid).status)

    workers = [threading.Thread(target=one, args=(p, u)) for u in uids for p in ports]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    return results


def test_two_listeners_share_the_steps(
    settings: Settings, session_factory: Factory, registry: TrustRegistry
) -> None:
    engine = create_db_engine(settings.database_url)
    uids = [generate_uid() for _ in range(4)]
    create = mpps_create(studies=[(generate_uid(), None)])
    final = mpps_set(series=[series_item("1.2.826.7", images=1)])
    try:
        other = make_session_factory(engine)
        with (
            running_listener(settings, session_factory=session_factory, registry=registry) as one,
            running_listener(settings, session_factory=other, registry=registry) as two,
        ):
            ports = [one.ports["dicom"], two.ports["dicom"]]
            # one listener stores each step, the other finds an identical resend (on
            # PostgreSQL possibly through the unique-key race); never a duplicate
            created = _at_once(ports, uids, lambda m, u: m.create(create, u))
            assert sorted(created) == [SUCCESS] * len(created)
            done = _at_once(ports, uids, lambda m, u: m.set(final, u))
            assert sorted(done) == [SUCCESS] * len(done)
        for uid in uids:  # each final N-SET applied once
            row = step_row(session_factory, uid)
            assert row is not None and (row.status, row.version) == ("COMPLETED", 1)
    finally:
        engine.dispose()


def test_grouped_procedure(ct: Modality, session_factory: Factory) -> None:
    uid, uid_a, uid_b = generate_uid(), generate_uid(), generate_uid()
    ds = mpps_create(studies=[(uid_a, "GRP1"), (uid_b, "GRP2")])
    assert ct.create(ds, uid).status == SUCCESS
    assert ct.set(mpps_set(series=[series_item(images=7)]), uid).status == SUCCESS
    a, b = study_by(session_factory, "uid", uid_a), study_by(session_factory, "uid", uid_b)
    assert a.id != b.id
    assert (a.accession, b.accession) == ("GRP1", "GRP2")
    for study in (a, b):  # the step's series are attributed to every study it names
        assert (study.status, study.number_of_instances, study.nhs_number) == ("available", 7, NHS)


def _oru_notice(accession: str) -> StudyNotice:
    return StudyNotice(
        trust_ods="RZZ01",
        feed=FeedKind.HL7,
        source="hl7:RZZ01RIS",
        patient=PatientRef(nhs_number=NhsNumber(NHS), local_id="MRN42"),
        studies=(
            StudyRef(
                accession=accession,
                modalities=("CT",),
                procedure=Coding(system=None, code="CHEAD", display="CT head"),
                status=StudyStatus.AVAILABLE,
                report_status=ReportStatus.FINAL,
                report_time=datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
                report_hash="f" * 64,
            ),
        ),
        received_at=datetime.now(UTC),
    )


@pytest.mark.parametrize("oru_first", [True, False])
def test_mpps_and_oru_end_as_one_study(
    ct: Modality, session_factory: Factory, oru_first: bool
) -> None:
    uid, study_uid = generate_uid(), generate_uid()
    accession = f"ORU{uid[-8:]}"

    def oru() -> None:
        with transaction(session_factory) as session:
            apply_notice(session, notice=_oru_notice(accession))

    if oru_first:
        oru()
    assert ct.create(mpps_create(studies=[(study_uid, accession)]), uid).status == SUCCESS
    assert ct.set(mpps_set(series=[series_item(images=4)]), uid).status == SUCCESS
    if not oru_first:
        oru()
    by_uid = study_by(session_factory, "uid", study_uid)
    by_acc = study_by(session_factory, "acc", accession)
    assert by_uid.id == by_acc.id and by_uid.merged_into is None
    assert (by_uid.study_uid, by_uid.accession) == (study_uid, accession)
    assert set(by_uid.feeds.split(",")) == {"hl7", "mpps"}
    assert (by_uid.report_status, by_uid.status, by_uid.number_of_instances) == (
        "final",
        "available",
        4,
    )
    with session_factory() as session:
        live = (
            session.execute(
                select(Study).where(Study.trust_ods == "RZZ01", Study.merged_into.is_(None))  # type: ignore[union-attr,arg-type]
            )
            .scalars()
            .all()
        )
    assert [s.id for s in live if s.accession == accession] == [by_uid.id]


# --------------------------------------------------------------------------- stale steps


def test_stale_steps_are_reported_once_and_kept(
    ct: Modality, session_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    stale, done = generate_uid(), generate_uid()
    assert ct.create(mpps_create(), stale).status == SUCCESS
    assert ct.create(mpps_create(), done).status == SUCCESS
    assert ct.set(mpps_set(), done).status == SUCCESS
    later = datetime.now(UTC) + timedelta(hours=25)
    assert (
        sweep_stale_steps(session_factory, older_than=timedelta(hours=24), now=datetime.now(UTC))
        == 0
    )
    with caplog.at_level(logging.WARNING, logger="ingest.mpps"):
        assert sweep_stale_steps(session_factory, older_than=timedelta(hours=24), now=later) == 1
        assert sweep_stale_steps(session_factory, older_than=timedelta(hours=24), now=later) == 1
    reports = [r for r in caplog.records if stale in r.getMessage()]
    assert len(reports) == 1 and NHS not in reports[0].getMessage()
    assert STALE_MPPS_STEPS._value.get() == 1
    row = step_row(session_factory, stale)
    assert row is not None and row.stale_reported_at is not None and row.status == "IN PROGRESS"
    assert ct.set(mpps_set(), stale).status == SUCCESS  # still there, still updatable
    assert sweep_stale_steps(session_factory, older_than=timedelta(hours=24), now=later) == 0


# --------------------------------------------------------------------------- database failure


@pytest.mark.parametrize(
    "broken_url",
    ["sqlite:////nonexistent-dir/locator.db", "postgresql://locator@127.0.0.1:1/locator"],
)
def test_database_failure_answers_a_retryable_status(broken_url: str) -> None:
    registry = TrustRegistry(example_trusts())
    engine = create_db_engine(broken_url)
    try:
        settings = Settings(database_url=broken_url, dicom_port=0)
        with (
            running_listener(
                settings,
                session_factory=make_session_factory(engine),
                registry=registry,
                sweep_interval=3600,
            ) as running,
            modality(running.ports["dicom"]) as m,
        ):
            answer = m.create(mpps_create(), generate_uid())
            assert answer.status == DimseStatus.RESOURCE_LIMITATION
            assert answer.error_id is None
            set_answer = m.set(mpps_set(), generate_uid())
            assert set_answer.status == DimseStatus.RESOURCE_LIMITATION
            assert m.alive
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- limits, stop


def test_association_limit(
    settings: Settings, session_factory: Factory, registry: TrustRegistry
) -> None:
    limited = settings.model_copy(update={"dicom_max_associations": 1})
    with (
        running_listener(limited, session_factory=session_factory, registry=registry) as one,
        modality(one.ports["dicom"]) as first,
    ):
        assert first.echo().status == SUCCESS
        assert rejected(one.ports["dicom"], "RZZ01MR2")  # over the limit: A-ASSOCIATE-RJ
        assert first.echo().status == SUCCESS


def test_stop_ends_open_associations(
    settings: Settings, session_factory: Factory, registry: TrustRegistry
) -> None:
    with running_listener(settings, session_factory=session_factory, registry=registry) as one:
        idle = Modality(one.ports["dicom"])
        assert idle.echo().status == SUCCESS
    assert idle.echo().status == -1  # aborted by the locator: no answer
