"""ingest.mpps: N-CREATE / N-SET datasets -> step attributes, errors and StudyNotices (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from ingest.mpps import (
    MAY_NO_LONGER_BE_UPDATED_ID,
    DimseStatus,
    InvalidAttributeValueError,
    MppsError,
    NoLongerUpdatableError,
    apply_update,
    build_notice,
    parse_n_create,
    parse_n_set,
)
from ingest.mpps_step import StepAttributes, StepStatus
from locator.core.notice import FeedKind, StudyStatus
from locator.trusts import TrustConfig
from tests.dicom_helpers import mpps_create, mpps_set, series_item

# The tests write invalid values on purpose; pydicom warns while they are built.
pytestmark = pytest.mark.filterwarnings("ignore:.*Invalid value for VR:UserWarning")

TRUST = TrustConfig(
    ods_code="RZZ01",
    name="T",
    viewer_url="https://v/{study_uid}",
    dicomweb_url="https://d",
    timezone="Europe/London",
)
NHS = "9990000018"
OTHER_NHS = "9990000026"


def create(ds: Dataset, *, accept_test_numbers: bool = True) -> StepAttributes:
    return parse_n_create(ds, trust=TRUST, accept_test_numbers=accept_test_numbers)


def refused(ds: Dataset, **kwargs: bool) -> MppsError:
    with pytest.raises(MppsError) as info:
        create(ds, **kwargs)
    return info.value


# --------------------------------------------------------------------------- patient identity


@pytest.mark.parametrize(
    ("kwargs", "nhs", "local"),
    [
        ({"patient_id": NHS, "issuer": "NHS"}, NHS, None),
        ({"patient_id": "999 000 0018", "issuer": "nhs"}, NHS, None),
        ({"patient_id": "MRN123", "issuer": "RZZ01"}, None, "MRN123"),
        # an untyped ten-digit id is a local id (interface.md, Identity rules)
        ({"patient_id": NHS, "issuer": None}, None, NHS),
        ({"patient_id": "MRN123", "issuer": "RZZ01", "other_ids": [(NHS, "NHS")]}, NHS, "MRN123"),
        ({"patient_id": NHS, "issuer": "NHS", "other_ids": [("MRN9", "RZZ01")]}, NHS, "MRN9"),
    ],
)
def test_patient_identity(kwargs: dict[str, object], nhs: str | None, local: str | None) -> None:
    step = create(mpps_create(**kwargs))  # type: ignore[arg-type]
    assert (step.nhs_number, step.local_id) == (nhs, local)


def test_nhs_number_recognised_by_issuer_qualifier_oid() -> None:
    ds = mpps_create(patient_id=NHS, issuer="NHS England")
    qualifier = Dataset()
    qualifier.UniversalEntityID = "2.16.840.1.113883.2.1.4.1"
    qualifier.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifier])
    assert create(ds).nhs_number == NHS


@pytest.mark.parametrize("value", ["9990000019", "1111111111", "12345"])
def test_invalid_nhs_number_names_patient_id(value: str) -> None:
    error = refused(mpps_create(patient_id=value, issuer="NHS"))
    assert error.status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    assert "(0010,0020)" in error.comment
    assert value not in error.comment


def test_test_range_refused_when_the_setting_says_so() -> None:
    error = refused(mpps_create(), accept_test_numbers=False)
    assert error.status == DimseStatus.INVALID_ATTRIBUTE_VALUE


def test_invalid_nhs_number_in_other_ids_sequence() -> None:
    error = refused(mpps_create(patient_id="MRN1", issuer="X", other_ids=[("9990000019", "NHS")]))
    assert error.status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    assert "(0010,1002)>(0010,0020)" in error.comment


def test_conflicting_nhs_numbers_refused() -> None:
    error = refused(mpps_create(other_ids=[(OTHER_NHS, "NHS")]))
    assert error.status == DimseStatus.INVALID_ATTRIBUTE_VALUE


def test_no_patient_identifier_at_all() -> None:
    error = refused(mpps_create(patient_id="", issuer=None))
    assert error.status == DimseStatus.MISSING_ATTRIBUTE_VALUE


def test_no_demographics_kept() -> None:
    text = create(mpps_create()).to_json()
    assert "TEST" not in text and "19700101" not in text and "PATIENT" not in text


# --------------------------------------------------------------------------- required attributes


@pytest.mark.parametrize(
    ("keyword", "tag"),
    [
        ("PerformedProcedureStepStatus", "(0040,0252)"),
        ("ScheduledStepAttributesSequence", "(0040,0270)"),
        ("Modality", "(0008,0060)"),
        ("PerformedProcedureStepStartDate", "(0040,0244)"),
        ("PerformedProcedureStepStartTime", "(0040,0245)"),
        ("PatientID", "(0010,0020)"),
    ],
)
def test_missing_required_attribute(keyword: str, tag: str) -> None:
    ds = mpps_create()
    delattr(ds, keyword)
    error = refused(ds)
    assert error.status == DimseStatus.MISSING_ATTRIBUTE
    assert tag in error.comment


def test_missing_study_uid_in_scheduled_item() -> None:
    ds = mpps_create()
    del ds.ScheduledStepAttributesSequence[0].StudyInstanceUID
    error = refused(ds)
    assert error.status == DimseStatus.MISSING_ATTRIBUTE
    assert "(0040,0270)>(0020,000D)" in error.comment


@pytest.mark.parametrize("status", ["COMPLETED", "DISCONTINUED", "SCHEDULED", ""])
def test_create_must_be_in_progress(status: str) -> None:
    error = refused(mpps_create(status=status))
    assert error.status in (DimseStatus.INVALID_ATTRIBUTE_VALUE,)
    assert "(0040,0252)" in error.comment


@pytest.mark.parametrize(
    ("keyword", "value", "tag"),
    [
        ("PerformedProcedureStepStartDate", "2026-11-28", "(0040,0244)"),
        ("PerformedProcedureStepStartDate", "20261332", "(0040,0244)"),
        ("PerformedProcedureStepStartTime", "256100", "(0040,0245)"),
        ("Modality", "ct scanner with a long name", "(0008,0060)"),
        ("TimezoneOffsetFromUTC", "+2500", "(0008,0201)"),
    ],
)
def test_invalid_values(keyword: str, value: str, tag: str) -> None:
    ds = mpps_create()
    setattr(ds, keyword, value)
    error = refused(ds)
    assert error.status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    assert tag in error.comment


def test_wrong_vr_is_an_invalid_value() -> None:
    ds = mpps_create()
    ds[0x00100020] = DataElement(0x00100020, "US", 1234)
    error = refused(ds)
    assert error.status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    assert "(0010,0020)" in error.comment


def test_sequence_where_text_expected() -> None:
    ds = mpps_create()
    ds[0x00080060] = DataElement(0x00080060, "SQ", DicomSequence([Dataset()]))
    assert refused(ds).status == DimseStatus.INVALID_ATTRIBUTE_VALUE


def test_invalid_study_uid() -> None:
    ds = mpps_create(studies=[("1.2.abc", "A1")])
    error = refused(ds)
    assert error.status == DimseStatus.INVALID_ATTRIBUTE_VALUE
    assert "(0020,000D)" in error.comment


# --------------------------------------------------------------------------- times


def test_start_in_trust_timezone() -> None:
    # 28 Nov: London is on GMT; 1 July: BST (UTC+1)
    assert create(mpps_create(start_time="101500")).started == datetime(
        2026, 11, 28, 10, 15, tzinfo=UTC
    )
    summer = create(mpps_create(start_date="20260701", start_time="101500.123"))
    assert summer.started == datetime(2026, 7, 1, 9, 15, 0, 123000, tzinfo=UTC)


def test_timezone_offset_attribute_wins() -> None:
    step = create(mpps_create(start_time="1015", timezone_offset="-0500"))
    assert step.started == datetime(2026, 11, 28, 15, 15, tzinfo=UTC)


# --------------------------------------------------------------------------- notices


def test_grouped_procedure_gives_one_study_ref_per_item() -> None:
    ds = mpps_create(studies=[("1.2.3.1", "ACC1"), ("1.2.3.2", "ACC2"), ("1.2.3.1", "ACC3")])
    step = create(ds)
    update = parse_n_set(mpps_set(series=[series_item("1.2.9", images=3)]), trust=TRUST)
    done = apply_update(step, update)
    notice = build_notice(
        done, trust_ods="RZZ01", sop_instance_uid="1.2.77", version=1, received_at=datetime.now(UTC)
    )
    assert [(s.study_uid, s.accession) for s in notice.studies] == [
        ("1.2.3.1", "ACC1"),
        ("1.2.3.2", "ACC2"),
        ("1.2.3.1", "ACC3"),
    ]
    for ref in notice.studies:
        assert ref.series is not None and [s.uid for s in ref.series] == ["1.2.9"]
        assert ref.series_version == 1 and ref.modalities == ("CT",)
    assert notice.source == "mpps:1.2.77" and notice.feed is FeedKind.MPPS


def test_series_counts_images_and_non_images_with_step_modality() -> None:
    step = create(mpps_create(modality="MR"))
    update = parse_n_set(
        mpps_set(
            series=[series_item("1.2.1", images=4, non_images=2), series_item("1.2.2", images=0)]
        ),
        trust=TRUST,
    )
    done = apply_update(step, update)
    assert done.series is not None
    assert [(s.uid, s.modality, s.number_of_instances) for s in done.series] == [
        ("1.2.1", "MR", 6),
        ("1.2.2", "MR", 0),
    ]


@pytest.mark.parametrize(
    ("status", "images", "expected"),
    [
        ("IN PROGRESS", 3, StudyStatus.REGISTERED),
        ("COMPLETED", 3, StudyStatus.AVAILABLE),
        ("DISCONTINUED", 0, StudyStatus.CANCELLED),
        ("DISCONTINUED", 2, StudyStatus.AVAILABLE),
    ],
)
def test_status_mapping(status: str, images: int, expected: StudyStatus) -> None:
    step = create(mpps_create())
    done = apply_update(
        step, parse_n_set(mpps_set(status=status, series=[series_item(images=images)]), trust=TRUST)
    )
    notice = build_notice(
        done, trust_ods="RZZ01", sop_instance_uid="1.2", version=1, received_at=datetime.now(UTC)
    )
    assert {s.status for s in notice.studies} == {expected}


def test_incorrect_worklist_entry_withdraws_the_patient() -> None:
    step = create(mpps_create())
    done = apply_update(
        step,
        parse_n_set(mpps_set(status="DISCONTINUED", series=[], reason_code="110514"), trust=TRUST),
    )
    notice = build_notice(
        done, trust_ods="RZZ01", sop_instance_uid="1.2", version=1, received_at=datetime.now(UTC)
    )
    assert notice.patient.withdrawn and notice.patient.nhs_number == NHS
    other = apply_update(
        step,
        parse_n_set(mpps_set(status="DISCONTINUED", series=[], reason_code="110526"), trust=TRUST),
    )
    assert not build_notice(
        other, trust_ods="RZZ01", sop_instance_uid="1.2", version=1, received_at=datetime.now(UTC)
    ).patient.withdrawn


# --------------------------------------------------------------------------- N-SET rules


def _with(ds: Dataset, **values: object) -> Dataset:
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_n_set_may_repeat_but_not_change_not_allowed_attributes() -> None:
    create_ds = mpps_create(studies=[("1.2.3", "ACC9")])
    step = create(create_ds)
    same = _with(
        mpps_set(),
        PatientID=NHS,
        ScheduledStepAttributesSequence=create_ds.ScheduledStepAttributesSequence,
    )
    assert apply_update(step, parse_n_set(same, trust=TRUST)).status is StepStatus.COMPLETED
    for values, tag in [
        ({"PatientID": OTHER_NHS}, "(0010,0020)"),
        ({"StudyInstanceUID": "1.2.4"}, "(0020,000D)"),
        ({"AccessionNumber": "OTHER"}, "(0008,0050)"),
    ]:
        with pytest.raises(InvalidAttributeValueError) as info:
            apply_update(step, parse_n_set(_with(mpps_set(), **values), trust=TRUST))
        assert tag in info.value.comment


def test_n_set_invalid_status() -> None:
    with pytest.raises(InvalidAttributeValueError):
        parse_n_set(mpps_set(status="FINISHED"), trust=TRUST)


def test_no_longer_updatable_carries_a710() -> None:
    error = NoLongerUpdatableError()
    assert error.status == DimseStatus.PROCESSING_FAILURE
    assert error.error_id == MAY_NO_LONGER_BE_UPDATED_ID == 0xA710
    assert error.comment == "Performed Procedure Step Object may no longer be updated"


def test_step_round_trips_through_json() -> None:
    step = apply_update(create(mpps_create()), parse_n_set(mpps_set(), trust=TRUST))
    again = StepAttributes.from_json(step.to_json())
    assert again == step and again.content_hash == step.content_hash


def test_n_set_hash_identifies_identical_resends() -> None:
    ds = mpps_set()
    assert parse_n_set(ds, trust=TRUST).content_hash == parse_n_set(ds, trust=TRUST).content_hash
    assert (
        parse_n_set(mpps_set(), trust=TRUST).content_hash
        != parse_n_set(ds, trust=TRUST).content_hash
    )


@pytest.mark.parametrize(
    ("scheme", "system"),
    [("NICIP", "https://nicip.nhs.uk"), ("SCT", "http://snomed.info/sct"), ("LOCAL", None)],
)
def test_procedure_code_scheme_is_mapped_like_the_hl7_feed(scheme: str, system: str | None) -> None:
    ds = mpps_create()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CHEAD", scheme, "CT Head"
    ds.ProcedureCodeSequence = DicomSequence([code])
    procedure = create(ds).procedure
    assert procedure is not None
    assert (procedure.system, procedure.code, procedure.display) == (system, "CHEAD", "CT Head")
