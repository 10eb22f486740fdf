"""The index: merge rules that turn StudyNotices into study pointers (design.md).

A study is keyed by (trust, Study Instance UID) and, before the UID is known, by (trust,
accession); every key lives in `study_key`. A notice carrying both joins them, and two records
that turn out to be one are merged into the one created first, whose id stays stable.

Every fact a study holds is a join over what its notices said, so any order and any repetition
of the same notices end in the same state (up to ids and timestamps):
- status: the highest evidence seen, registered < cancelled < available;
- report: the best (rank, OBR-22 time, content hash): a late preliminary never downgrades a
  final or corrected report;
- started: the earliest time seen; modalities, procedures, feeds and keys: unions;
- series: per source (an MPPS step) the list with the highest version, then their union.

The patient is derived, never guessed: a set of assertions, one per (source, patient), each
withdrawable only by its own source (a withdrawal is permanent). Local ids resolve to NHS Numbers
through links the same trust stated. One NHS Number -> linked; none but local ids -> held;
several -> quarantined (returned for neither); no live assertion -> entered-in-error.

No HL7, no DICOM, no FHIR here; the session is the caller's and this module never commits.

The rules, by concern: keys.py (study keys and merges), facts.py (the join of a study's
facts), patients.py (assertions, local-id ties, the derived patient, quarantine), studies.py
(applying one notice), batches.py (a batch in one transaction).
"""

from locator.core.index.batches import Stored, apply_notices, look_up_stored
from locator.core.index.facts import (
    ReportKey,
    StudyFacts,
    columns_of_facts,
    facts_of_ref,
    facts_of_row,
)
from locator.core.index.keys import ACCESSION, UID, merge_studies, study_ids_for
from locator.core.index.patients import (
    Assertion,
    Patient,
    PatientState,
    Quarantined,
    derive_patient,
    fhir_status,
    list_quarantined,
    lock_local_ids,
    patient_claims,
)
from locator.core.index.studies import AppliedNotice, apply_notice

__all__ = [
    "ACCESSION",
    "UID",
    "AppliedNotice",
    "Assertion",
    "Patient",
    "PatientState",
    "Quarantined",
    "ReportKey",
    "Stored",
    "StudyFacts",
    "apply_notice",
    "apply_notices",
    "columns_of_facts",
    "derive_patient",
    "facts_of_ref",
    "facts_of_row",
    "fhir_status",
    "list_quarantined",
    "lock_local_ids",
    "look_up_stored",
    "merge_studies",
    "patient_claims",
    "study_ids_for",
]
