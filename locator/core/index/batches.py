"""Batches: many notices applied in one transaction, to the state one by one would leave.

The MLLP group commit hands a batch of messages' notices here. Those that can only create new
studies are written together (a few statements for the whole batch); every other notice goes,
in order, through the one-notice path (studies.apply_one). tests/test_index_batches.py checks
that both ways leave the same rows.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from locator.core.index.facts import facts_of_ref
from locator.core.index.keys import KEY, Target, key_rows, keys_of
from locator.core.index.patients import ASSERTION, LINK, assertion_rows, lock_local_ids
from locator.core.index.studies import STUDY, apply_one, as_assertions, new_study
from locator.core.notice import StudyNotice
from locator.core.outbox import record_study_changes
from locator.store.db import Reads, Writes, in_groups

_TrustKey = tuple[str, str, str]  # (trust, kind, value)
HELD = "held"  # not a key kind: look_up_stored's mark for a local id that holds stored studies


def apply_notices(
    session: Session,
    *,
    notices: Sequence[StudyNotice],
    writes: Writes | None = None,
    stored: Callable[[], Stored] | None = None,
) -> None:
    """Apply notices in order, to the state apply_notice leaves applying them one by one.

    Notices that can only create new studies are written together, a few statements for the
    whole batch instead of a few per notice. Such a notice states an NHS Number and withdraws
    nothing (so its claims name no local id and no link bears on its study), its keys are
    stored nowhere and named by no other notice of the batch, and its local id holds no stored
    study and is named by no notice that goes the other way. It shares no key, study or local
    id with the rest of the batch, so the order between it and the others changes nothing;
    every other notice goes, in order, through apply_notice.

    First, on PostgreSQL, the batch's local ids are locked (lock_local_ids), so a concurrent
    writer concerning one of them goes before or after the whole batch, and what is stored
    of the batch's keys is looked up (look_up_stored). `stored`: the caller has done both in
    this transaction, for these notices or more, and this gives the look-up's answer.

    `writes`: the new studies' rows are left there for the caller to send with its own
    (they are the last statements of the batch); without it they are written here."""
    conn = session.connection()
    if stored is None:
        reads = Reads(conn)
        lock_local_ids(reads, notices=notices)
        stored = look_up_stored(reads, notices=notices)
        reads.run()
    fresh = _creating_only(notices, stored())
    for i, notice in enumerate(notices):
        if i not in fresh:
            apply_one(conn, notice)
    if fresh:
        pending = Writes() if writes is None else writes
        _create_all(conn, [notices[i] for i in sorted(fresh)], pending)
        if writes is None:
            pending.run(conn)


def _trust_keys(notice: StudyNotice) -> list[_TrustKey]:
    return [(notice.trust_ods, k, v) for ref in notice.studies for k, v in keys_of(ref)]


def _local(notice: StudyNotice) -> tuple[str, str] | None:
    local = notice.patient.local_id
    return (notice.trust_ods, local) if local else None


def _may_create(n: StudyNotice) -> bool:
    """What a notice needs, on its own, to be written with the new studies of its batch."""
    return bool(
        n.patient.nhs_number
        and not n.patient.withdrawn
        and n.studies
        and all(ref.study_uid or ref.accession for ref in n.studies)
    )


Stored = tuple[set[_TrustKey], set[tuple[str, str]]]  # stored keys; local ids holding studies


def look_up_stored(reads: Reads, *, notices: Sequence[StudyNotice]) -> Callable[[], Stored]:
    """Which keys of the notices that may only create studies are stored already, and which
    of their local ids hold stored patient assertions (as `(trust, HELD, local id)`): one
    statement added to `reads`, one term per trust and kind; the function returned reads its
    answer once they have run."""
    creating = [n for n in notices if _may_create(n)]
    keys = [key for n in creating for key in _trust_keys(n)]
    local_ids = [local for n in creating if (local := _local(n))]
    if not keys:
        return lambda: (set(), set())
    match, params = in_groups(("trust_ods", "kind"), "value", keys)
    sql = f"SELECT trust_ods, kind, value FROM {KEY.name} WHERE {match}"
    if local_ids:
        held, held_params = in_groups(("trust_ods",), "local_id", local_ids)
        sql += (
            f" UNION ALL SELECT DISTINCT trust_ods, '{HELD}', local_id "
            f"FROM {ASSERTION.name} WHERE {held}"
        )
        params += held_params
    rows = reads.add((sql, params))

    def found() -> Stored:
        stored: set[_TrustKey] = set()
        holding: set[tuple[str, str]] = set()
        for trust, kind, value in rows():
            if kind == HELD:
                holding.add((trust, value))
            else:
                stored.add((trust, kind, value))
        return stored, holding

    return found


def _creating_only(notices: Sequence[StudyNotice], known: Stored) -> set[int]:
    """The notices of the batch that create new studies and touch nothing else (`known`:
    look_up_stored's answer for these notices or more)."""
    keys = [_trust_keys(n) for n in notices]
    locals_ = [_local(n) for n in notices]
    named = Counter(key for ks in keys for key in ks)
    candidates = {
        i
        for i, n in enumerate(notices)
        if _may_create(n) and all(named[key] == 1 for key in keys[i])
    }
    others = {locals_[i] for i in range(len(notices)) if i not in candidates} - {None}
    stored, holding = known
    return {
        i
        for i in candidates
        if locals_[i] not in others and stored.isdisjoint(keys[i]) and locals_[i] not in holding
    }


def _create_all(conn: Connection, notices: Sequence[StudyNotice], writes: Writes) -> None:
    """Every study of notices that only create: the rows of record_link and _create, left in
    `writes` (on PostgreSQL one statement for all of them, with the journal's rows)."""
    links: dict[tuple[str, str, str], dict[str, Any]] = {}
    studies, keys, assertions = [], [], []
    for notice in notices:
        patient = notice.patient
        if patient.local_id and patient.nhs_number:
            link = (notice.trust_ods, patient.local_id, patient.nhs_number)
            links.setdefault(
                link,
                {
                    "trust_ods": notice.trust_ods,
                    "local_id": patient.local_id,
                    "nhs_number": patient.nhs_number,
                    "first_seen": notice.received_at,
                },
            )
        for ref in notice.studies:
            target = Target(uuid.uuid4().hex, None, keys_of(ref))
            rows = assertion_rows(notice, target.id, notice.received_at)
            # An NHS Number and no withdrawal: the claims name no local id, so no links apply.
            facts = facts_of_ref(notice, ref)
            studies.append(new_study(notice, target, facts, as_assertions(rows), {}))
            keys += key_rows(notice.trust_ods, target.id, target.new_keys)
            assertions += rows
    # Links are kept once, the first notice's time, as record_link keeps them.
    writes.add(LINK, list(links.values()), skip_existing=True)
    writes.add(STUDY, studies)
    writes.add(KEY, keys)
    writes.add(ASSERTION, assertions)
    changes = [(study["id"], study["nhs_number"], None) for study in studies]
    if changes:
        record_study_changes(conn, changes=changes, at=studies[0]["updated_at"])
