"""MPPS datasets -> step attributes and StudyNotices (pure: a Dataset in, a value or an error out).

DICOM PS3.4 Annex F (Modality Performed Procedure Step SOP Class): an N-CREATE opens a step
IN PROGRESS (F.7.2.1), N-SETs update it until it is COMPLETED or DISCONTINUED (F.7.2.2).
This module reads the attributes the index needs (Table F.7.2-1), refuses what a modality
must fix with the DIMSE status of PS3.7 Annex C, and builds the protocol-free StudyNotice.
It keeps no names, birth dates or other demographics: only identifiers, codes and times.
The stored form of a step is in mpps_step.py. No I/O here: dicom_listener.py and
mpps_store.py own the network and the database.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from enum import IntEnum
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from ingest.mpps_step import UNSET, ScheduledStudy, StepAttributes, StepStatus, StepUpdate
from locator.core.nhs_number import (
    NHS_NUMBER_OID,
    InvalidNhsNumberError,
    NhsNumber,
    parse_nhs_number,
)
from locator.core.notice import (
    Coding,
    FeedKind,
    PatientRef,
    SeriesRef,
    StudyNotice,
    StudyRef,
    StudyStatus,
)
from locator.trusts import TrustConfig


class DimseStatus(IntEnum):
    """DIMSE status codes an MPPS SCP answers (PS3.7 Annex C; PS3.4 F.7.2)."""

    SUCCESS = 0x0000
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    RESOURCE_LIMITATION = 0x0213


# PS3.4 Table F.7.2-2: the Specific Error Comment and Error ID for an N-SET after the step ended.
MAY_NO_LONGER_BE_UPDATED_ID = 0xA710
MAY_NO_LONGER_BE_UPDATED = "Performed Procedure Step Object may no longer be updated"
TEMPORARY_FAILURE = "Temporary failure, retry later"

# PS3.16 CID 9300: "Incorrect worklist entry selected" means the wrong patient or procedure.
INCORRECT_WORKLIST_ENTRY = "110514"

ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO: at most 64 characters

NHS_ISSUER = "NHS"
# DICOM coding scheme designators -> FHIR code systems (PS3.16 Section 8).
CODING_SYSTEMS = {
    "NICIP": "https://nicip.nhs.uk",  # England's imaging procedure codes, as the HL7 feed maps
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "SCT": "http://snomed.info/sct",
    "SRT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
}

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
_TZ_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")
_MAX_UID, _MAX_ACCESSION, _MAX_PATIENT_ID = 64, 64, 64

# Tags (PS3.6). Named once; error comments print them as (gggg,eeee).
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
ACCESSION_NUMBER = Tag(0x0008, 0x0050)
MODALITY = Tag(0x0008, 0x0060)
REFERENCED_IMAGE_SEQUENCE = Tag(0x0008, 0x1140)
PROCEDURE_CODE_SEQUENCE = Tag(0x0008, 0x1032)
TIMEZONE_OFFSET_FROM_UTC = Tag(0x0008, 0x0201)
CODE_VALUE = Tag(0x0008, 0x0100)
CODING_SCHEME_DESIGNATOR = Tag(0x0008, 0x0102)
CODE_MEANING = Tag(0x0008, 0x0104)
PATIENT_ID = Tag(0x0010, 0x0020)
ISSUER_OF_PATIENT_ID = Tag(0x0010, 0x0021)
ISSUER_OF_PATIENT_ID_QUALIFIERS = Tag(0x0010, 0x0024)
OTHER_PATIENT_IDS_SEQUENCE = Tag(0x0010, 0x1002)
STUDY_INSTANCE_UID = Tag(0x0020, 0x000D)
SERIES_INSTANCE_UID = Tag(0x0020, 0x000E)
UNIVERSAL_ENTITY_ID = Tag(0x0040, 0x0032)
REFERENCED_NON_IMAGE_SEQUENCE = Tag(0x0040, 0x0220)
PPS_START_DATE = Tag(0x0040, 0x0244)
PPS_START_TIME = Tag(0x0040, 0x0245)
PPS_END_DATE = Tag(0x0040, 0x0250)
PPS_END_TIME = Tag(0x0040, 0x0251)
PPS_STATUS = Tag(0x0040, 0x0252)
SCHEDULED_STEP_ATTRIBUTES_SEQUENCE = Tag(0x0040, 0x0270)
DISCONTINUATION_REASON_SEQUENCE = Tag(0x0040, 0x0281)
PERFORMED_SERIES_SEQUENCE = Tag(0x0040, 0x0340)


# --------------------------------------------------------------------------- errors


class MppsError(Exception):
    """A request the SCP refuses; carries the DIMSE status and the error comment to send."""

    status: DimseStatus = DimseStatus.PROCESSING_FAILURE
    error_id: int | None = None

    def __init__(self, comment: str) -> None:
        super().__init__(comment)
        self.comment = comment[:ERROR_COMMENT_MAX]


class InvalidAttributeValueError(MppsError):
    status = DimseStatus.INVALID_ATTRIBUTE_VALUE


class MissingAttributeError(MppsError):
    status = DimseStatus.MISSING_ATTRIBUTE


class MissingAttributeValueError(MppsError):
    status = DimseStatus.MISSING_ATTRIBUTE_VALUE


class UndecodableDatasetError(MppsError):
    """The attribute list could not be decoded (PS3.7 C.4.2: processing failure)."""


class DuplicateInstanceError(MppsError):
    status = DimseStatus.DUPLICATE_SOP_INSTANCE


class NoSuchInstanceError(MppsError):
    status = DimseStatus.NO_SUCH_SOP_INSTANCE


class NoLongerUpdatableError(MppsError):
    """PS3.4 F.7.2.2.3 / Table F.7.2-2: an N-SET after COMPLETED or DISCONTINUED."""

    error_id = MAY_NO_LONGER_BE_UPDATED_ID

    def __init__(self) -> None:
        super().__init__(MAY_NO_LONGER_BE_UPDATED)


class TemporaryFailureError(MppsError):
    """Our side failed (database unavailable): a status the modality retries."""

    status = DimseStatus.RESOURCE_LIMITATION

    def __init__(self) -> None:
        super().__init__(TEMPORARY_FAILURE)


def tag_name(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def _invalid(tag: BaseTag, what: str = "Invalid value in") -> InvalidAttributeValueError:
    return InvalidAttributeValueError(f"{what} {tag_name(tag)}")


# --------------------------------------------------------------------------- reading


def _element(ds: Dataset, tag: BaseTag) -> Any:
    """The value of one element, or None when absent; a decoding failure names the tag."""
    try:
        if tag not in ds:
            return None
        return ds[tag].value
    except Exception as exc:  # pydicom raises many types on malformed bytes
        raise UndecodableDatasetError(f"Cannot decode {tag_name(tag)}") from exc


def _text(ds: Dataset, tag: BaseTag, *, max_length: int = 64) -> str | None:
    """A single-valued text element: None when absent or empty, else the stripped string."""
    value = _element(ds, tag)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _invalid(tag)
    value = value.strip(" \0")
    if len(value) > max_length or any(ord(c) < 0x20 for c in value):
        raise _invalid(tag)
    return value or None


def _required_text(ds: Dataset, tag: BaseTag, where: str = "") -> str:
    if tag not in ds:
        raise MissingAttributeError(f"Missing attribute {where}{tag_name(tag)}")
    value = _text(ds, tag)
    if value is None:
        raise MissingAttributeValueError(f"Missing value of {where}{tag_name(tag)}")
    return value


def _items(ds: Dataset, tag: BaseTag) -> list[Dataset] | None:
    """The items of a sequence (None when absent); anything else is an invalid value."""
    value = _element(ds, tag)
    if value is None:
        return None
    try:
        items = list(value)
    except TypeError as exc:
        raise _invalid(tag) from exc
    if not all(isinstance(item, Dataset) for item in items):
        raise _invalid(tag)
    return items


def _uid(ds: Dataset, tag: BaseTag, where: str = "") -> str:
    value = _required_text(ds, tag, where)
    if len(value) > _MAX_UID or not _UID.fullmatch(value):
        raise InvalidAttributeValueError(f"Invalid UID in {where}{tag_name(tag)}")
    return value


def _status(ds: Dataset) -> StepStatus | None:
    value = _text(ds, PPS_STATUS)
    if value is None:
        return None
    try:
        return StepStatus(value)
    except ValueError:
        raise _invalid(PPS_STATUS) from None


# --------------------------------------------------------------------------- times


def _zone(ds: Dataset, trust: TrustConfig) -> tzinfo:
    """Timezone Offset From UTC (0008,0201) when present, else the trust's timezone: DICOM
    dates and times carry no offset (PS3.3 C.12.1.1.8)."""
    offset = _text(ds, TIMEZONE_OFFSET_FROM_UTC)
    if offset is None:
        return trust.zone
    match = _TZ_OFFSET.fullmatch(offset)
    if not match or int(match[3]) >= 60 or int(match[2]) > 14:
        raise _invalid(TIMEZONE_OFFSET_FROM_UTC)
    sign = -1 if match[1] == "-" else 1
    return timezone(sign * timedelta(hours=int(match[2]), minutes=int(match[3])))


def _parse_date(value: str, tag: BaseTag) -> date:
    if len(value) != 8 or not value.isdigit():
        raise _invalid(tag)
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise _invalid(tag) from None


def _parse_time(value: str, tag: BaseTag) -> time:
    """TM: HH[MM[SS[.F{1,6}]]] (PS3.5 6.2); the ACR-NEMA `HH:MM:SS` form is tolerated."""
    main, _, fraction = value.replace(":", "").partition(".")
    if len(main) not in (2, 4, 6) or not main.isdigit() or (fraction and not fraction.isdigit()):
        raise _invalid(tag)
    parts = [int(main[i : i + 2]) for i in range(0, len(main), 2)] + [0, 0]
    micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
    try:
        return time(parts[0], parts[1], min(parts[2], 59), micro)  # 60 = leap second
    except ValueError:
        raise _invalid(tag) from None


def _datetime(
    ds: Dataset, date_tag: BaseTag, time_tag: BaseTag, zone: tzinfo, *, required: bool
) -> datetime | None:
    day = _required_text(ds, date_tag) if required else _text(ds, date_tag)
    clock = _required_text(ds, time_tag) if required else _text(ds, time_tag)
    if day is None:
        return None
    when = time(0) if clock is None else _parse_time(clock, time_tag)
    return datetime.combine(_parse_date(day, date_tag), when, tzinfo=zone).astimezone(UTC)


# --------------------------------------------------------------------------- patient


@dataclass(frozen=True, slots=True)
class _PatientIdentifier:
    value: str
    issuer: str | None
    is_nhs: bool
    where: str


def _qualifier_oids(ds: Dataset) -> set[str]:
    oids = set()
    for item in _items(ds, ISSUER_OF_PATIENT_ID_QUALIFIERS) or ():
        oid = _text(item, UNIVERSAL_ENTITY_ID)
        if oid:
            oids.add(oid)
    return oids


def _identifier(ds: Dataset, where: str) -> _PatientIdentifier | None:
    value = _text(ds, PATIENT_ID, max_length=_MAX_PATIENT_ID)
    if value is None:
        return None
    issuer = _text(ds, ISSUER_OF_PATIENT_ID)
    is_nhs = (issuer or "").upper() == NHS_ISSUER or NHS_NUMBER_OID in _qualifier_oids(ds)
    return _PatientIdentifier(value, issuer, is_nhs, where)


def _patient_identifiers(ds: Dataset) -> Iterator[_PatientIdentifier]:
    primary = _identifier(ds, "")
    if primary is not None:
        yield primary
    for item in _items(ds, OTHER_PATIENT_IDS_SEQUENCE) or ():
        other = _identifier(item, f"{tag_name(OTHER_PATIENT_IDS_SEQUENCE)}>")
        if other is not None:
            yield other


def _read_patient(ds: Dataset, accept_test_numbers: bool) -> dict[str, str | None]:
    """NHS Number only when typed as one (interface.md, Identity rules); else a local id."""
    if PATIENT_ID not in ds:
        raise MissingAttributeError(f"Missing attribute {tag_name(PATIENT_ID)}")
    nhs: str | None = None
    local: _PatientIdentifier | None = None
    for ident in _patient_identifiers(ds):
        if not ident.is_nhs:
            local = local or ident
            continue
        try:
            number = parse_nhs_number(ident.value, accept_test_numbers=accept_test_numbers)
        except InvalidNhsNumberError:
            raise InvalidAttributeValueError(
                f"Invalid NHS Number in {ident.where}{tag_name(PATIENT_ID)}"
            ) from None
        if nhs is not None and number != nhs:
            raise InvalidAttributeValueError(
                f"Conflicting NHS Numbers in {tag_name(OTHER_PATIENT_IDS_SEQUENCE)}"
            )
        nhs = number
    if nhs is None and local is None:
        raise MissingAttributeValueError(f"No patient identifier in {tag_name(PATIENT_ID)}")
    return {
        "patient_id": _text(ds, PATIENT_ID, max_length=_MAX_PATIENT_ID) or "",
        "issuer_of_patient_id": _text(ds, ISSUER_OF_PATIENT_ID),
        "nhs_number": nhs,
        "local_id": local.value if local else None,
        "local_namespace": local.issuer if local else None,
    }


# --------------------------------------------------------------------------- studies, series


def _scheduled_studies(ds: Dataset) -> tuple[ScheduledStudy, ...]:
    """Every item of the Scheduled Step Attributes Sequence: grouped procedures have several
    (PS3.4 F.7.2.1.2 notes 2-3; an unscheduled step has an empty accession)."""
    items = _items(ds, SCHEDULED_STEP_ATTRIBUTES_SEQUENCE)
    seq = tag_name(SCHEDULED_STEP_ATTRIBUTES_SEQUENCE)
    if items is None:
        raise MissingAttributeError(f"Missing attribute {seq}")
    if not items:
        raise MissingAttributeValueError(f"Missing value of {seq}")
    studies: list[ScheduledStudy] = []
    for item in items:
        uid = _uid(item, STUDY_INSTANCE_UID, f"{seq}>")
        accession = _text(item, ACCESSION_NUMBER, max_length=_MAX_ACCESSION)
        study = ScheduledStudy(uid, accession)
        if study not in studies:
            studies.append(study)
    return tuple(studies)


def _count(ds: Dataset, tag: BaseTag) -> int:
    items = _items(ds, tag)
    return len(items) if items else 0


def _performed_series(ds: Dataset, modality: str | None) -> tuple[SeriesRef, ...] | None:
    """Performed Series Sequence (0040,0340): one SeriesRef per item; the step's modality
    (series items carry none); instances = image + non-image references."""
    items = _items(ds, PERFORMED_SERIES_SEQUENCE)
    if items is None:
        return None
    where = f"{tag_name(PERFORMED_SERIES_SEQUENCE)}>"
    series: dict[str, SeriesRef] = {}
    for item in items:
        uid = _uid(item, SERIES_INSTANCE_UID, where)
        count = _count(item, REFERENCED_IMAGE_SEQUENCE) + _count(
            item, REFERENCED_NON_IMAGE_SEQUENCE
        )
        previous = series.get(uid)
        total = count + (previous.number_of_instances if previous else 0)
        series[uid] = SeriesRef(uid=uid, modality=modality, number_of_instances=total)
    return tuple(series.values())


def _first_code(ds: Dataset, tag: BaseTag) -> Coding | None:
    items = _items(ds, tag)
    if not items:
        return None
    code = _text(items[0], CODE_VALUE)
    if code is None:
        return None
    scheme = _text(items[0], CODING_SCHEME_DESIGNATOR)
    return Coding(
        system=CODING_SYSTEMS.get(scheme or ""), code=code, display=_text(items[0], CODE_MEANING)
    )


def _modality(ds: Dataset) -> str:
    value = _required_text(ds, MODALITY)
    if not _CODE_STRING.fullmatch(value):
        raise _invalid(MODALITY)
    return value


# --------------------------------------------------------------------------- N-CREATE / N-SET


def parse_n_create(ds: Dataset, *, trust: TrustConfig, accept_test_numbers: bool) -> StepAttributes:
    """Read an N-CREATE attribute list (PS3.4 F.7.2.1). The status must be IN PROGRESS."""
    if PPS_STATUS not in ds:
        raise MissingAttributeError(f"Missing attribute {tag_name(PPS_STATUS)}")
    status = _status(ds)
    if status is not StepStatus.IN_PROGRESS:
        raise _invalid(PPS_STATUS)
    studies = _scheduled_studies(ds)
    modality = _modality(ds)
    zone = _zone(ds, trust)
    started = _datetime(ds, PPS_START_DATE, PPS_START_TIME, zone, required=True)
    assert started is not None  # required=True
    patient = _read_patient(ds, accept_test_numbers)
    return StepAttributes(
        patient_id=patient["patient_id"] or "",
        issuer_of_patient_id=patient["issuer_of_patient_id"],
        nhs_number=patient["nhs_number"],
        local_id=patient["local_id"],
        local_namespace=patient["local_namespace"],
        studies=studies,
        modality=modality,
        started=started,
        status=status,
        ended=_datetime(ds, PPS_END_DATE, PPS_END_TIME, zone, required=False),
        procedure=_first_code(ds, PROCEDURE_CODE_SEQUENCE),
        series=_performed_series(ds, modality),
    )


def parse_n_set(ds: Dataset, *, trust: TrustConfig) -> StepUpdate:
    """Read an N-SET modification list (PS3.4 F.7.2.2). A sequence replaces the stored one
    whole (F.7.2.2.2: "all items"); its series get the step's modality in apply_update."""
    items = _items(ds, SCHEDULED_STEP_ATTRIBUTES_SEQUENCE)
    study_uids: list[str] = []
    accessions: list[str] = []
    for item in items or ():
        if STUDY_INSTANCE_UID in item:
            study_uids.append(_uid(item, STUDY_INSTANCE_UID))
        accessions.append(_text(item, ACCESSION_NUMBER, max_length=_MAX_ACCESSION) or "")
    if STUDY_INSTANCE_UID in ds:  # not an MPPS attribute, but some modalities send it
        study_uids.append(_uid(ds, STUDY_INSTANCE_UID))
    if ACCESSION_NUMBER in ds:
        accessions.append(_text(ds, ACCESSION_NUMBER, max_length=_MAX_ACCESSION) or "")
    reason = _first_code(ds, DISCONTINUATION_REASON_SEQUENCE)
    procedure = _first_code(ds, PROCEDURE_CODE_SEQUENCE)
    return StepUpdate(
        status=_status(ds),
        ended=_datetime(ds, PPS_END_DATE, PPS_END_TIME, _zone(ds, trust), required=False),
        procedure=procedure if PROCEDURE_CODE_SEQUENCE in ds else UNSET,
        series=_performed_series(ds, None),
        discontinuation_reason=reason.code if reason else None,
        patient_id=(_text(ds, PATIENT_ID, max_length=_MAX_PATIENT_ID) or "")
        if PATIENT_ID in ds
        else None,
        study_uids=tuple(study_uids) if items is not None or STUDY_INSTANCE_UID in ds else None,
        accessions=tuple(accessions) if items is not None or ACCESSION_NUMBER in ds else None,
    )


def apply_update(step: StepAttributes, update: StepUpdate) -> StepAttributes:
    """The step after an N-SET: "Not allowed" attributes may repeat but not change."""
    if update.patient_id is not None and update.patient_id != step.patient_id:
        raise InvalidAttributeValueError(f"N-SET may not change {tag_name(PATIENT_ID)}")
    if update.study_uids is not None and not set(update.study_uids) <= {
        s.study_uid for s in step.studies
    }:
        raise InvalidAttributeValueError(f"N-SET may not change {tag_name(STUDY_INSTANCE_UID)}")
    if update.accessions is not None and not set(update.accessions) <= {
        s.accession or "" for s in step.studies
    }:
        raise InvalidAttributeValueError(f"N-SET may not change {tag_name(ACCESSION_NUMBER)}")
    return replace(
        step,
        status=update.status or step.status,
        ended=update.ended or step.ended,
        procedure=step.procedure if update.procedure is UNSET else update.procedure,
        series=step.series
        if update.series is None
        else tuple(replace(s, modality=step.modality) for s in update.series),
        discontinuation_reason=update.discontinuation_reason or step.discontinuation_reason,
    )


# --------------------------------------------------------------------------- notices


def study_status(step: StepAttributes) -> StudyStatus:
    """design.md: IN PROGRESS -> registered; COMPLETED -> available; DISCONTINUED with no
    images -> cancelled, with images -> available (images exist; nothing cancels them)."""
    if step.status is StepStatus.IN_PROGRESS:
        return StudyStatus.REGISTERED
    if step.status is StepStatus.COMPLETED:
        return StudyStatus.AVAILABLE
    images = sum(s.number_of_instances for s in step.series or ())
    return StudyStatus.AVAILABLE if images else StudyStatus.CANCELLED


def build_notice(
    step: StepAttributes,
    *,
    trust_ods: str,
    sop_instance_uid: str,
    version: int,
    received_at: datetime,
) -> StudyNotice:
    """One StudyRef per scheduled study; a grouped procedure's series go to each of them.
    A discontinuation for "Incorrect worklist entry selected" withdraws the patient link."""
    patient = PatientRef(
        nhs_number=NhsNumber(step.nhs_number) if step.nhs_number else None,
        local_id=step.local_id,
        local_namespace=step.local_namespace,
        withdrawn=step.discontinuation_reason == INCORRECT_WORKLIST_ENTRY,
    )
    status = study_status(step)
    studies = tuple(
        StudyRef(
            study_uid=s.study_uid,
            accession=s.accession,
            modalities=(step.modality,),
            procedure=step.procedure,
            started=step.started,
            status=status,
            series=step.series,
            series_version=version,
        )
        for s in step.studies
    )
    return StudyNotice(
        trust_ods=trust_ods,
        feed=FeedKind.MPPS,
        source=f"mpps:{sop_instance_uid}",
        patient=patient,
        studies=studies,
        received_at=received_at,
    )
