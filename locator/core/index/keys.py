"""Study keys and study merges: which record a notice's Study UID and accession name.

A study is keyed by (trust, Study Instance UID) and, before the UID is known, by (trust,
accession); every key lives in `study_key`. A notice carrying both joins them, and two records
that turn out to be one are merged into the one created first, whose id stays stable (the
other keeps a tombstone naming it: its id answers 404 naming the survivor). An accession that
already names a study with a different UID never joins: two studies sharing an accession stay
two. Core statements, built once and executed with parameters (stack-limits.md: building and
cache-keying a statement per call costs more than running it on SQLite).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from locator.core.index.facts import columns_of_facts, facts_of_row
from locator.core.index.patients import move_assertions
from locator.core.notice import StudyRef
from locator.core.outbox import record_study_changes
from locator.store.models import study_key_table, study_table

log = logging.getLogger("locator.core.index")

STUDY = study_table
KEY = study_key_table

UID, ACCESSION = "uid", "acc"


def keys_of(ref: StudyRef) -> list[tuple[str, str]]:
    keys = []
    if ref.study_uid:
        keys.append((UID, ref.study_uid))
    if ref.accession:
        keys.append((ACCESSION, ref.accession))
    return keys


# Statements are built once and executed with parameters: building and cache-keying a
# statement per call costs more than running it on SQLite.
KEY_MATCH = {
    UID: and_(KEY.c.kind == UID, KEY.c.value == bindparam("uid")),
    ACCESSION: and_(KEY.c.kind == ACCESSION, KEY.c.value == bindparam("acc")),
}
_FIND: dict[tuple[str, ...], Any] = {
    kinds: select(KEY.c.kind, KEY.c.value, STUDY)
    .join(STUDY, STUDY.c.id == KEY.c.study_id)
    .where(KEY.c.trust_ods == bindparam("trust"), or_(*(KEY_MATCH[k] for k in kinds)))
    .with_for_update(of=STUDY)
    for kinds in ((UID,), (ACCESSION,), (UID, ACCESSION))
}
_LOAD = select(STUDY).where(STUDY.c.id == bindparam("study_id")).with_for_update()

INSERT_KEY = insert(KEY).inline()


def find_studies(
    conn: Connection, trust: str, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], Any]:
    """The studies (locked for update) that a reference's keys already name."""
    params = {"trust": trust, **{("uid" if k == UID else "acc"): v for k, v in keys}}
    stmt = _FIND[tuple(k for k, _ in keys)]
    return {(r.kind, r.value): r for r in conn.execute(stmt, params)}


def load_study(conn: Connection, study_id: str) -> Any:
    return conn.execute(_LOAD, {"study_id": study_id}).one()


@dataclass(slots=True)
class Target:
    """The study one reference of a notice lands on: its stored row (None when this notice
    creates it) and the keys the reference adds to it."""

    id: str
    row: Any | None
    new_keys: list[tuple[str, str]]


def resolve_ref(conn: Connection, trust: str, ref: StudyRef) -> Target:
    """Find the study a reference names by any of its keys, merging two records that turn out
    to be one; a new id when no key is known."""
    keys = keys_of(ref)
    found = find_studies(conn, trust, keys)
    by_uid = found.get((UID, ref.study_uid or ""))
    by_acc = found.get((ACCESSION, ref.accession or ""))
    if (
        by_acc is not None
        and ref.study_uid
        and by_acc.study_uid is not None
        and (by_uid is None or by_uid.id != by_acc.id)
    ):
        # The accession names a study with another Study UID: two studies share an accession.
        # They are never joined; this UID keeps (or gets) a record of its own.
        log.warning("trust %s: an accession names studies with different Study UIDs", trust)
        keys, row = [(UID, ref.study_uid)], by_uid
    elif by_uid is not None and by_acc is not None and by_uid.id != by_acc.id:
        row = load_study(conn, merge_studies(conn, ids=(by_uid.id, by_acc.id)))
    else:
        row = by_uid if by_uid is not None else by_acc
    study_id = row.id if row is not None else uuid.uuid4().hex
    return Target(study_id, row, [key for key in keys if key not in found])


def merge_studies(conn: Connection, *, ids: tuple[str, str]) -> str:
    """Merge two records of one study into the one created first; returns its id. The other
    keeps a tombstone naming the survivor (its id answers 404 naming the survivor)."""
    rows = [load_study(conn, study_id) for study_id in sorted(ids)]
    first, second = sorted(rows, key=lambda r: (r.created_at, r.id))
    survivor: str = first.id
    loser: str = second.id
    facts = facts_of_row(first).join(facts_of_row(second))
    last_seen = max(first.last_seen, second.last_seen)
    conn.execute(update(KEY).where(KEY.c.study_id == loser).values(study_id=survivor))
    move_assertions(conn, loser=loser, survivor=survivor)
    conn.execute(update(STUDY).where(STUDY.c.merged_into == loser).values(merged_into=survivor))
    conn.execute(
        update(STUDY)
        .where(STUDY.c.id == survivor)
        .values(
            first_seen=min(first.first_seen, second.first_seen),
            last_seen=last_seen,
            study_uid=least(first.study_uid, second.study_uid),
            accession=least(first.accession, second.accession),
            version=STUDY.c.version + 1,
            updated_at=last_seen,
            **columns_of_facts(facts),
        )
    )
    conn.execute(
        update(STUDY)
        .where(STUDY.c.id == loser)
        .values(
            merged_into=survivor, nhs_number=None, version=STUDY.c.version + 1, updated_at=last_seen
        )
    )
    merged = [(survivor, first.nhs_number, None), (loser, None, second.nhs_number)]
    record_study_changes(conn, changes=merged, at=last_seen)
    log.info("merged study %s into %s", loser, survivor)
    return survivor


def least(*values: str | None) -> str | None:
    present = [v for v in values if v]
    return min(present) if present else None


def insert_keys(conn: Connection, trust: str, study_id: str, keys: list[tuple[str, str]]) -> None:
    if keys:
        conn.execute(INSERT_KEY, key_rows(trust, study_id, keys))


def key_rows(trust: str, study_id: str, keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"trust_ods": trust, "kind": k, "value": v, "study_id": study_id} for k, v in keys]


def study_ids_for(
    session: Session, *, trust_ods: str, study_uid: str | None = None, accession: str | None = None
) -> set[str]:
    """The studies a trust's keys name (for the feeds' tests and the operators' tools)."""
    keys = keys_of(StudyRef(study_uid=study_uid, accession=accession))
    if not keys:
        return set()
    return {row.id for row in find_studies(session.connection(), trust_ods, keys).values()}
