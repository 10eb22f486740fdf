"""Applying one notice: resolve each study it names, join its facts, record its patient
assertions and derive the study again.

`update_study` is the one place where a stored study's FHIR-visible columns are derived
again; its version (FHIR versionId) and updated_at (meta.lastUpdated) move exactly when one of
them changes. The hot path uses Core statements on the session's connection: a new study
costs about five statements, an update of a known one about five too (stack-limits.md: ORM
objects cost 5x). The session is the caller's; nothing here commits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, update
from sqlalchemy.orm import Session

from locator.core.index.facts import StudyFacts, columns_of_facts, facts_of_ref, facts_of_row
from locator.core.index.keys import (
    ACCESSION,
    UID,
    Target,
    insert_keys,
    least,
    load_study,
    resolve_ref,
)
from locator.core.index.patients import (
    HELD_UNDER,
    INSERT_ASSERTION,
    Assertion,
    Patient,
    PatientState,
    assertion_rows,
    derive_patient,
    fhir_status,
    links_of,
    lock_local_ids,
    record_assertions,
    record_link,
    stored_assertions,
)
from locator.core.nhs_number import mask
from locator.core.notice import StudyNotice, StudyRef
from locator.core.outbox import record_study_changes
from locator.store.db import Reads
from locator.store.models import study_table

log = logging.getLogger("locator.core.index")

STUDY = study_table


@dataclass(frozen=True, slots=True)
class AppliedNotice:
    """The surviving ids of the studies a notice touched, and whether any of them changed."""

    study_ids: tuple[str, ...]
    changed: bool


_INSERT_STUDY = insert(STUDY).inline()
_UPDATE_STUDY = update(STUDY).where(STUDY.c.id == bindparam("_study_id"))


def derived_columns(
    facts: StudyFacts, patient: Patient, assertions: Sequence[Assertion], first_seen: datetime
) -> dict[str, Any]:
    return {
        **columns_of_facts(facts),
        "nhs_number": patient.nhs_number,
        "patient_state": patient.state,
        "local_id": least(*(a.local_id for a in assertions)),
        "status": fhir_status(facts, patient),
        "sort_time": facts.started or first_seen,
    }


_VISIBLE = (
    "study_uid",
    "accession",
    "nhs_number",
    "patient_state",
    "local_id",
    "status",
    "evidence_status",
    "report_status",
    "report_time",
    "report_hash",
    "started",
    "sort_time",
    "modalities",
    "procedures",
    "series",
    "number_of_series",
    "number_of_instances",
    "feeds",
)


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, datetime) and isinstance(new, datetime):
        return old.astimezone(UTC) != new.astimezone(UTC)
    return bool(old != new)


def new_study(
    notice: StudyNotice,
    target: Target,
    facts: StudyFacts,
    assertions: Sequence[Assertion],
    links: dict[str, frozenset[str]],
) -> dict[str, Any]:
    """The row of a study a notice creates: every column computed before the one INSERT."""
    now = notice.received_at
    uids = [v for k, v in target.new_keys if k == UID]
    accessions = [v for k, v in target.new_keys if k == ACCESSION]
    return {
        "id": target.id,
        "trust_ods": notice.trust_ods,
        "study_uid": least(*uids),
        "accession": least(*accessions),
        "created_at": now,
        "first_seen": now,
        "last_seen": now,
        "updated_at": now,
        "version": 1,
        "merged_into": None,
        **derived_columns(facts, derive_patient(assertions, links), assertions, now),
    }


def as_assertions(rows: list[dict[str, Any]]) -> list[Assertion]:
    return [Assertion(r["nhs_number"], r["local_id"], r["withdrawn"]) for r in rows]


def create_study(conn: Connection, notice: StudyNotice, target: Target, facts: StudyFacts) -> None:
    """A study this notice creates."""
    rows = assertion_rows(notice, target.id, notice.received_at)
    assertions = as_assertions(rows)
    links = links_of(conn, notice.trust_ods, assertions)
    row = new_study(notice, target, facts, assertions, links)
    conn.execute(_INSERT_STUDY, row)
    record_study_changes(conn, changes=[(target.id, row["nhs_number"], None)], at=row["updated_at"])
    insert_keys(conn, notice.trust_ods, target.id, target.new_keys)
    conn.execute(INSERT_ASSERTION, rows)


def update_study(
    conn: Connection,
    study_id: str,
    row: Any,
    now: datetime,
    facts: StudyFacts | None,
    new_keys: list[tuple[str, str]],
) -> bool:
    """Derive a stored study again after this notice; bump its version only on a change."""
    assertions = stored_assertions(conn, study_id)
    patient = derive_patient(assertions, links_of(conn, row.trust_ods, assertions))
    joined = facts_of_row(row) if facts is None else facts_of_row(row).join(facts)
    values = derived_columns(joined, patient, assertions, row.first_seen)
    values["study_uid"] = least(row.study_uid, *(v for k, v in new_keys if k == UID))
    values["accession"] = least(row.accession, *(v for k, v in new_keys if k == ACCESSION))
    changed = any(_differs(getattr(row, name), values[name]) for name in _VISIBLE)
    if changed:
        values |= {"version": row.version + 1, "updated_at": now}
        if patient.state == PatientState.QUARANTINED != row.patient_state:
            log.warning("study %s quarantined: its patient assertions conflict", study_id)
    if facts is not None:
        values["last_seen"] = max(row.last_seen, now)
    if changed or facts is not None:
        conn.execute(_UPDATE_STUDY, {"_study_id": study_id, **values})
    if changed:  # subscribers of its patient, now and before (locator.core.outbox)
        changes = [(study_id, values["nhs_number"], row.nhs_number)]
        record_study_changes(conn, changes=changes, at=now)
    return changed


def _apply_ref(conn: Connection, notice: StudyNotice, ref: StudyRef) -> tuple[str, bool]:
    target = resolve_ref(conn, notice.trust_ods, ref)
    facts = facts_of_ref(notice, ref)
    if target.row is None:
        create_study(conn, notice, target, facts)
        return target.id, True
    insert_keys(conn, notice.trust_ods, target.id, target.new_keys)
    record_assertions(conn, assertion_rows(notice, target.id, notice.received_at))
    changed = update_study(conn, target.id, target.row, notice.received_at, facts, target.new_keys)
    return target.id, changed


def _relink(conn: Connection, notice: StudyNotice, skip: set[str]) -> bool:
    """A new local-id link: every study held under that local id is derived again."""
    params = {"trust": notice.trust_ods, "local_id": notice.patient.local_id}
    changed = False
    for study_id in sorted(set(conn.execute(HELD_UNDER, params).scalars()) - skip):
        row = load_study(conn, study_id)
        changed |= update_study(conn, study_id, row, notice.received_at, None, [])
    return changed


def apply_notice(session: Session, *, notice: StudyNotice) -> AppliedNotice:
    """Apply one notice: record the local-id link it states, resolve (and merge) each study it
    names, join their facts, record its patient assertions, and derive each touched study's
    patient again."""
    conn = session.connection()
    reads = Reads(conn)
    lock_local_ids(reads, notices=[notice])
    reads.run()
    return apply_one(conn, notice)


def apply_one(conn: Connection, notice: StudyNotice) -> AppliedNotice:
    new_link = record_link(conn, notice, notice.received_at)
    touched: dict[str, None] = {}
    changed = False
    for ref in notice.studies:
        if not (ref.study_uid or ref.accession):
            raise ValueError("a study reference needs a Study UID or an accession")
        study_id, ref_changed = _apply_ref(conn, notice, ref)
        touched[study_id] = None
        changed |= ref_changed
    if new_link:
        changed |= _relink(conn, notice, set(touched))
    if changed and notice.patient.nhs_number:
        log.debug("applied a notice for %s", mask(notice.patient.nhs_number))
    return AppliedNotice(tuple(touched), changed)
