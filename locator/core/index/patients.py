"""A study's patient: assertions per (source, patient), the trust's local-id ties, and the
derived state (design.md, Identity and safety rules).

The patient is derived, never guessed. Each source (one HL7 sending application of the
trust, one MPPS step) asserts a patient for a study; a source withdraws only its own
assertion, and a withdrawal is permanent. Local ids resolve to NHS Numbers only through
links the same trust stated. One NHS Number -> linked; none but local ids -> held; several ->
quarantined (returned for neither, listed for operators); no live assertion ->
entered-in-error. On PostgreSQL two writers concerning one local id go one after the other
(lock_local_ids), so a held study and the link that lifts the hold never miss each other.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from locator.core.index.facts import StudyFacts
from locator.core.nhs_number import mask
from locator.core.notice import PatientRef, StudyNotice, StudyStatus
from locator.store.db import Reads
from locator.store.models import local_link_table, patient_assertion_table, study_table

STUDY = study_table
ASSERTION = patient_assertion_table
LINK = local_link_table


class PatientState:
    LINKED = "linked"
    HELD = "held"
    QUARANTINED = "quarantined"
    ENTERED_IN_ERROR = "entered-in-error"


@dataclass(frozen=True, slots=True)
class Assertion:
    nhs_number: str | None
    local_id: str | None
    withdrawn: bool


@dataclass(frozen=True, slots=True)
class Patient:
    state: str
    nhs_number: str | None


def derive_patient(assertions: Sequence[Assertion], links: dict[str, frozenset[str]]) -> Patient:
    """The study's patient from its assertions and the trust's local-id links."""
    live = [a for a in assertions if not a.withdrawn]
    if not live:
        withdrawn = {a.nhs_number for a in assertions if a.nhs_number}
        only = next(iter(withdrawn)) if len(withdrawn) == 1 else None
        return Patient(PatientState.ENTERED_IN_ERROR, only)
    numbers: set[str] = set()
    for a in live:
        if a.nhs_number:
            numbers.add(a.nhs_number)
        elif a.local_id:
            numbers |= links.get(a.local_id, frozenset())
    if len(numbers) > 1:
        return Patient(PatientState.QUARANTINED, None)
    if numbers:
        return Patient(PatientState.LINKED, next(iter(numbers)))
    return Patient(PatientState.HELD, None)


def fhir_status(facts: StudyFacts, patient: Patient) -> str:
    if patient.state == PatientState.ENTERED_IN_ERROR:
        return StudyStatus.ENTERED_IN_ERROR.value
    return (facts.evidence or StudyStatus.REGISTERED).value


INSERT_ASSERTION = insert(ASSERTION).inline()

_STORED_ASSERTIONS = select(
    ASSERTION.c.nhs_number, ASSERTION.c.local_id, ASSERTION.c.withdrawn
).where(ASSERTION.c.study_id == bindparam("study_id"))
_LINKS = select(LINK.c.local_id, LINK.c.nhs_number).where(
    LINK.c.trust_ods == bindparam("trust"),
    LINK.c.local_id.in_(bindparam("local_ids", expanding=True)),
)

HELD_UNDER = select(ASSERTION.c.study_id).where(
    ASSERTION.c.trust_ods == bindparam("trust"), ASSERTION.c.local_id == bindparam("local_id")
)


@functools.cache
def upserts(dialect: str) -> tuple[Any, Any]:
    """The two ON CONFLICT statements, per backend: assertions (a withdrawal is permanent:
    withdrawn = old OR new) and local-id links (kept once)."""
    dialect_insert = pg_insert if dialect == "postgresql" else sqlite_insert
    assertion = dialect_insert(ASSERTION)
    assertion = assertion.on_conflict_do_update(
        index_elements=["study_id", "source", "patient_key"],
        set_={"withdrawn": ASSERTION.c.withdrawn | assertion.excluded.withdrawn},
    )
    link = dialect_insert(LINK).inline().on_conflict_do_nothing()
    return assertion, link


def move_assertions(conn: Connection, *, loser: str, survivor: str) -> None:
    kept = {
        (r.source, r.patient_key): r
        for r in conn.execute(select(ASSERTION).where(ASSERTION.c.study_id == survivor))
    }
    for row in conn.execute(select(ASSERTION).where(ASSERTION.c.study_id == loser)).all():
        known = kept.get((row.source, row.patient_key))
        if known is None:
            conn.execute(
                update(ASSERTION).where(ASSERTION.c.id == row.id).values(study_id=survivor)
            )
            continue
        if row.withdrawn and not known.withdrawn:
            conn.execute(update(ASSERTION).where(ASSERTION.c.id == known.id).values(withdrawn=True))
        conn.execute(ASSERTION.delete().where(ASSERTION.c.id == row.id))


def patient_claims(patient: PatientRef) -> list[tuple[str, str | None, str | None]]:
    """(patient_key, nhs_number, local_id) a notice asserts or withdraws. With an NHS Number
    the claim is the NHS Number (the local id becomes a link); a withdrawal withdraws both."""
    claims: list[tuple[str, str | None, str | None]] = []
    if patient.nhs_number:
        claims.append((f"nhs:{patient.nhs_number}", patient.nhs_number, None))
    if patient.local_id and (patient.withdrawn or not patient.nhs_number):
        claims.append((f"local:{patient.local_id}", None, patient.local_id))
    return claims


def assertion_rows(notice: StudyNotice, study_id: str, now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "study_id": study_id,
            "source": notice.source,
            "patient_key": key,
            "trust_ods": notice.trust_ods,
            "nhs_number": nhs,
            "local_id": local,
            "withdrawn": notice.patient.withdrawn,
            "first_seen": now,
        }
        for key, nhs, local in patient_claims(notice.patient)
    ]


def record_assertions(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert this notice's claims; a withdrawal is permanent (withdrawn = old OR new)."""
    if rows:
        conn.execute(upserts(conn.dialect.name)[0], rows)


def record_link(conn: Connection, notice: StudyNotice, now: datetime) -> bool:
    """Record that the trust ties a local id to an NHS Number; True when the link is new."""
    patient = notice.patient
    if not (patient.nhs_number and patient.local_id):
        return False
    row = {
        "trust_ods": notice.trust_ods,
        "local_id": patient.local_id,
        "nhs_number": patient.nhs_number,
        "first_seen": now,
    }
    return bool(conn.execute(upserts(conn.dialect.name)[1], row).rowcount)


def links_of(
    conn: Connection, trust: str, assertions: Sequence[Assertion]
) -> dict[str, frozenset[str]]:
    local_ids = sorted({a.local_id for a in assertions if a.local_id and not a.withdrawn})
    if not local_ids:
        return {}
    grouped: dict[str, set[str]] = {}
    for r in conn.execute(_LINKS, {"trust": trust, "local_ids": local_ids}):
        grouped.setdefault(r.local_id, set()).add(r.nhs_number)
    return {k: frozenset(v) for k, v in grouped.items()}


def stored_assertions(conn: Connection, study_id: str) -> list[Assertion]:
    rows = conn.execute(_STORED_ASSERTIONS, {"study_id": study_id})
    return [Assertion(r.nhs_number, r.local_id, bool(r.withdrawn)) for r in rows]


def lock_local_ids(reads: Reads, *, notices: Sequence[StudyNotice]) -> None:
    """PostgreSQL: a transaction-scoped lock per (trust, local id) the notices name, taken in
    one order before the index is read (the first of `reads`). Two writers concerning one
    local id (one creating a study held under it, the other recording the link that lifts the
    hold) then go one after the other, and the later one sees what the earlier one committed:
    without it each could miss the other's uncommitted rows and the study would stay held.
    SQLite has one writer at a time already (BEGIN IMMEDIATE)."""
    if not reads.postgres:
        return
    keys = sorted({f"{n.trust_ods}/{local}" for n in notices if (local := n.patient.local_id)})
    if keys:  # unnest keeps the array's order, so every writer locks in the same order
        reads.add(
            (
                "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) "
                "FROM unnest(CAST(? AS text[])) k",
                [keys],
            )
        )


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A study whose live patient assertions conflict, with who asserted what."""

    study_id: str
    trust_ods: str
    study_uid: str | None
    accession: str | None
    claims: tuple[tuple[str, str], ...]  # (source, patient key with NHS Numbers masked)


def list_quarantined(session: Session) -> list[Quarantined]:
    """Studies held back from every patient until an operator resolves the conflict."""
    studies = session.execute(
        select(STUDY.c.id, STUDY.c.trust_ods, STUDY.c.study_uid, STUDY.c.accession)
        .where(STUDY.c.patient_state == PatientState.QUARANTINED, STUDY.c.merged_into.is_(None))
        .order_by(STUDY.c.trust_ods, STUDY.c.id)
    ).all()
    result = []
    for s in studies:
        claims = session.execute(
            select(ASSERTION.c.source, ASSERTION.c.nhs_number, ASSERTION.c.local_id)
            .where(ASSERTION.c.study_id == s.id, ASSERTION.c.withdrawn.is_(False))
            .order_by(ASSERTION.c.source)
        ).all()
        shown = tuple(
            (c.source, f"nhs:{mask(c.nhs_number)}" if c.nhs_number else f"local:{c.local_id}")
            for c in claims
        )
        result.append(Quarantined(s.id, s.trust_ods, s.study_uid, s.accession, shown))
    return result
