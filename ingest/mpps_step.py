"""The stored form of an MPPS step: what the locator keeps between N-CREATE and N-SET
(mpps_step.attributes, JSON) and what one N-SET says. Identifiers, codes and times only: no
names, birth dates or other demographics (design.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from locator.core.notice import Coding, SeriesRef


class StepStatus(StrEnum):
    """Performed Procedure Step Status (0040,0252) defined terms (PS3.3 C.4.14)."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"

    @property
    def is_final(self) -> bool:
        return self is not StepStatus.IN_PROGRESS


@dataclass(frozen=True, slots=True)
class ScheduledStudy:
    """One item of the Scheduled Step Attributes Sequence (0040,0270)."""

    study_uid: str
    accession: str | None


@dataclass(frozen=True, slots=True)
class StepAttributes:
    """What the locator keeps of a step (mpps_step.attributes): identifiers, codes, times."""

    patient_id: str
    issuer_of_patient_id: str | None
    nhs_number: str | None
    local_id: str | None
    local_namespace: str | None
    studies: tuple[ScheduledStudy, ...]
    modality: str
    started: datetime
    status: StepStatus
    ended: datetime | None = None
    procedure: Coding | None = None
    series: tuple[SeriesRef, ...] | None = None
    discontinuation_reason: str | None = None

    def to_json(self) -> str:
        return json.dumps(_step_dict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StepAttributes:
        return _step_from_dict(json.loads(text))

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class StepUpdate:
    """The attributes of one N-SET that the locator reads (PS3.4 Table F.7.2-1, N-SET column).

    `patient_id`, `study_uids` and `accessions` are the "Not allowed" values the N-SET carried
    anyway; they are compared with the step's and refused when different.
    """

    status: StepStatus | None = None
    ended: datetime | None = None
    procedure: Coding | None = UNSET
    series: tuple[SeriesRef, ...] | None = None
    discontinuation_reason: str | None = None
    patient_id: str | None = None
    study_uids: tuple[str, ...] | None = None
    accessions: tuple[str, ...] | None = None

    @property
    def content_hash(self) -> str:
        data = {
            "status": self.status,
            "ended": _iso(self.ended),
            "procedure": None if self.procedure is UNSET else _coding_dict(self.procedure),
            "procedure_set": self.procedure is not UNSET,
            "series": _series_list(self.series),
            "reason": self.discontinuation_reason,
            "patient_id": self.patient_id,
            "study_uids": self.study_uids,
            "accessions": self.accessions,
        }
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- JSON


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _coding_dict(coding: Coding | None) -> dict[str, str | None] | None:
    if coding is None:
        return None
    return {"system": coding.system, "code": coding.code, "display": coding.display}


def _series_list(series: tuple[SeriesRef, ...] | None) -> list[dict[str, Any]] | None:
    if series is None:
        return None
    return [
        {"uid": s.uid, "modality": s.modality, "number_of_instances": s.number_of_instances}
        for s in series
    ]


def _step_dict(step: StepAttributes) -> dict[str, Any]:
    return {
        "patient_id": step.patient_id,
        "issuer_of_patient_id": step.issuer_of_patient_id,
        "nhs_number": step.nhs_number,
        "local_id": step.local_id,
        "local_namespace": step.local_namespace,
        "studies": [{"study_uid": s.study_uid, "accession": s.accession} for s in step.studies],
        "modality": step.modality,
        "started": _iso(step.started),
        "status": step.status.value,
        "ended": _iso(step.ended),
        "procedure": _coding_dict(step.procedure),
        "series": _series_list(step.series),
        "discontinuation_reason": step.discontinuation_reason,
    }


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _step_from_dict(data: dict[str, Any]) -> StepAttributes:
    procedure = data.get("procedure")
    series = data.get("series")
    started = _when(data["started"])
    assert started is not None
    return StepAttributes(
        patient_id=data["patient_id"],
        issuer_of_patient_id=data.get("issuer_of_patient_id"),
        nhs_number=data.get("nhs_number"),
        local_id=data.get("local_id"),
        local_namespace=data.get("local_namespace"),
        studies=tuple(ScheduledStudy(s["study_uid"], s.get("accession")) for s in data["studies"]),
        modality=data["modality"],
        started=started,
        status=StepStatus(data["status"]),
        ended=_when(data.get("ended")),
        procedure=Coding(**procedure) if procedure else None,
        series=None if series is None else tuple(SeriesRef(**s) for s in series),
        discontinuation_reason=data.get("discontinuation_reason"),
    )
