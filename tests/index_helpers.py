"""Helpers for index tests: build notices tersely, apply them, read studies back."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session, sessionmaker

from locator.core.index import AppliedNotice, apply_notice
from locator.core.nhs_number import NhsNumber
from locator.core.notice import FeedKind, PatientRef, StudyNotice, StudyRef
from locator.store.db import transaction
from locator.store.models import (
    local_link_table,
    patient_assertion_table,
    study_key_table,
    study_table,
)

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def notice(
    *refs: StudyRef,
    trust: str = "RZZ01",
    feed: FeedKind = FeedKind.HL7,
    source: str = "hl7:CRIS",
    nhs: str | None = None,
    local: str | None = None,
    withdrawn: bool = False,
    at: datetime = NOW,
) -> StudyNotice:
    patient = PatientRef(
        nhs_number=NhsNumber(nhs) if nhs else None, local_id=local, withdrawn=withdrawn
    )
    return StudyNotice(trust, feed, source, patient, tuple(refs), at)


def apply_all(
    factory: sessionmaker[Session], notices: Iterable[StudyNotice]
) -> list[AppliedNotice]:
    results = []
    for n in notices:
        with transaction(factory) as session:
            results.append(apply_notice(session, notice=n))
    return results


def studies(factory: sessionmaker[Session], *, include_merged: bool = False) -> list[Any]:
    with factory() as session:
        stmt = select(study_table).order_by(study_table.c.created_at, study_table.c.id)
        if not include_merged:
            stmt = stmt.where(study_table.c.merged_into.is_(None))
        return list(session.execute(stmt).all())


def keys_of(factory: sessionmaker[Session], study_id: str) -> set[tuple[str, str]]:
    with factory() as session:
        rows = session.execute(
            select(study_key_table.c.kind, study_key_table.c.value).where(
                study_key_table.c.study_id == study_id
            )
        )
        return {(r.kind, r.value) for r in rows}


def snapshot(engine: Engine, *, ignored: set[str]) -> dict[str, Any]:
    """Every row the index wrote, keyed by what identifies it apart from the study id (the
    accession: every study of the benchmark generator has one)."""
    with engine.connect() as conn:
        rows = {r.accession: r for r in conn.execute(select(study_table))}
        by_id = {r.id: acc for acc, r in rows.items()}
        keys = {
            (r.trust_ods, r.kind, r.value, by_id[r.study_id])
            for r in conn.execute(select(study_key_table))
        }
        assertions = {
            (by_id[r.study_id], r.source, r.patient_key, r.nhs_number, r.local_id, r.withdrawn)
            for r in conn.execute(select(patient_assertion_table))
        }
        links = {
            (r.trust_ods, r.local_id, r.nhs_number) for r in conn.execute(select(local_link_table))
        }
    columns = [c.name for c in study_table.columns if c.name not in ignored]
    studies = {acc: {c: getattr(r, c) for c in columns} for acc, r in rows.items()}
    return {"studies": studies, "keys": keys, "assertions": assertions, "links": links}


def clear_index(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in (local_link_table, patient_assertion_table, study_key_table, study_table):
            conn.execute(delete(table))


def assert_same_index(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Two snapshots hold the same rows (a study at a time, so a difference names it)."""
    for part in ("keys", "assertions", "links"):
        assert actual[part] == expected[part], part
    assert actual["studies"].keys() == expected["studies"].keys()
    for accession, row in expected["studies"].items():
        assert actual["studies"][accession] == row, accession
