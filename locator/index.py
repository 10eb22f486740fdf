"""The index: merge rules that turn StudyNotices into study pointers (design.md).

No HL7, no DICOM, no FHIR here; the session is the caller's and this module never commits.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from locator.notice import StudyNotice


@dataclass(frozen=True, slots=True)
class AppliedNotice:
    study_ids: tuple[str, ...]
    changed: bool


def apply_notice(session: Session, *, notice: StudyNotice) -> AppliedNotice:
    raise NotImplementedError
