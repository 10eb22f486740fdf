"""StudyNotice: the one protocol-free value both feeds produce and the index consumes.

A notice says who sent it (trust, feed, source), which patient it is about (an NHS Number,
a trust-local id, or both), which studies it is about (Study Instance UID and/or accession)
and what happened to them. It holds no names, no dates of birth and no report text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from locator.core.nhs_number import NhsNumber


class FeedKind(StrEnum):
    HL7 = "hl7"
    MPPS = "mpps"


class StudyStatus(StrEnum):
    """FHIR ImagingStudy.status values the index produces."""

    REGISTERED = "registered"
    CANCELLED = "cancelled"
    AVAILABLE = "available"
    ENTERED_IN_ERROR = "entered-in-error"


# design.md: status is the highest evidence seen, registered < cancelled < available.
# entered-in-error is not on this scale: it comes only from the identity rules.
STATUS_RANK: dict[StudyStatus, int] = {
    StudyStatus.REGISTERED: 1,
    StudyStatus.CANCELLED: 2,
    StudyStatus.AVAILABLE: 3,
}


class ReportStatus(StrEnum):
    """The best report seen, as FHIR DiagnosticReport.status codes."""

    PRELIMINARY = "preliminary"
    FINAL = "final"
    CORRECTED = "corrected"


# design.md: none < preliminary (A, P, R) < final (F) < corrected (C).
REPORT_RANK: dict[ReportStatus, int] = {
    ReportStatus.PRELIMINARY: 1,
    ReportStatus.FINAL: 2,
    ReportStatus.CORRECTED: 3,
}


@dataclass(frozen=True, slots=True)
class PatientRef:
    """The patient a notice asserts. At least one of the two identifiers is present.

    `withdrawn` marks a notice that withdraws its source's assertion (HL7 OBX-11 `W`:
    "post original as wrong, e.g. transmitted for wrong patient").
    """

    nhs_number: NhsNumber | None = None
    local_id: str | None = None
    local_namespace: str | None = None
    withdrawn: bool = False


@dataclass(frozen=True, slots=True)
class SeriesRef:
    uid: str
    modality: str | None = None
    number_of_instances: int = 0


@dataclass(frozen=True, slots=True)
class Coding:
    system: str | None
    code: str
    display: str | None = None


@dataclass(frozen=True, slots=True)
class StudyRef:
    """One study a notice is about; at least one of study_uid and accession is present.

    `series` is None when the notice says nothing about series, and a tuple (possibly empty)
    when it states the source's complete list; `series_version` orders a source's successive
    lists (an MPPS N-SET replaces the N-CREATE's list).
    """

    study_uid: str | None = None
    accession: str | None = None
    modalities: tuple[str, ...] = ()
    procedure: Coding | None = None
    started: datetime | None = None
    status: StudyStatus | None = None
    report_status: ReportStatus | None = None
    report_time: datetime | None = None
    report_hash: str | None = None
    series: tuple[SeriesRef, ...] | None = None
    series_version: int = 0


@dataclass(frozen=True, slots=True)
class StudyNotice:
    """What one feed message says. `source` names the asserting source: one sending
    application of the trust (`hl7:<MSH-3>`) or one MPPS step (`mpps:<SOP Instance UID>`)."""

    trust_ods: str
    feed: FeedKind
    source: str
    patient: PatientRef
    studies: tuple[StudyRef, ...]
    received_at: datetime
