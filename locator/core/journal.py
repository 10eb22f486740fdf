"""The inbound-message journal: every feed message, its outcome, and lookups over it.

One row per message received (interface.md, Feeds: Journal): sender, control id, received
time, the SHA-256 of the raw bytes, outcome (`accepted`, `duplicate`, `error`, `rejected`),
reason, the acknowledgement sent, and a copy of the message already stripped of report text
and demographics by the feed adapter (this module knows no protocol). Lookups serve
idempotency (a previous message with the same sender, facility and control id), the
`locator journal` listing, `locator replay`, and the retention purge. Core statements only
(this is on the ingest hot path); the session is the caller's and is never committed here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.orm import Session

from locator.store.db import Reads, Writes, in_groups
from locator.store.models import journal_table

JOURNAL: Table = journal_table
PREVIOUS_LOOKUP_LIMIT = 50


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    ERROR = "error"  # AE / CE: a content error
    REJECTED = "rejected"  # AR / CR: refused at the header


REPLAYABLE = (Outcome.ERROR, Outcome.REJECTED)


@dataclass(frozen=True, slots=True)
class NewEntry:
    received_at: datetime
    feed: str
    sha256: str
    size: int
    outcome: Outcome
    message: str
    trust_ods: str | None = None
    peer: str | None = None
    sender_app: str | None = None
    sender_facility: str | None = None
    control_id: str | None = None
    truncated: bool = False
    reason: str | None = None
    ack: str | None = None


@dataclass(frozen=True, slots=True)
class PreviousEntry:
    id: int
    sha256: str
    outcome: Outcome
    ack: str | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class JournalView:
    """One entry as `locator journal` and `locator replay` see it."""

    id: int
    received_at: datetime
    feed: str
    trust_ods: str | None
    peer: str | None
    sender_app: str | None
    sender_facility: str | None
    control_id: str | None
    sha256: str
    size: int
    truncated: bool
    outcome: Outcome
    reason: str | None
    replayed_at: datetime | None
    message: str = ""


_FIELD_LIMITS = {
    "sender_app": 200,
    "sender_facility": 200,
    "control_id": 200,
    "peer": 100,
    "trust_ods": 16,
}


def _row(entry: NewEntry) -> dict[str, Any]:
    row: dict[str, Any] = {
        "received_at": entry.received_at,
        "feed": entry.feed,
        "trust_ods": entry.trust_ods,
        "peer": entry.peer,
        "sender_app": entry.sender_app,
        "sender_facility": entry.sender_facility,
        "control_id": entry.control_id,
        "sha256": entry.sha256,
        "size": entry.size,
        "truncated": entry.truncated,
        "outcome": entry.outcome.value,
        "reason": entry.reason,
        "ack": entry.ack,
        "message": entry.message,
    }
    for key, value in row.items():
        if isinstance(value, str) and "\x00" in value:  # PostgreSQL text holds no NUL
            row[key] = value.replace("\x00", "\ufffd")
    for key, limit in _FIELD_LIMITS.items():
        if isinstance(row[key], str):
            row[key] = row[key][:limit]
    return row


def add_entries(writes: Writes, *, entries: Sequence[NewEntry]) -> None:
    """A group commit's journal rows, sent with its other writes."""
    writes.add(JOURNAL, [_row(e) for e in entries])


MessageKey = tuple[str, str, str]  # (sender application, sender facility, control id)


def look_up_previous(
    reads: Reads, *, feed: str, keys: Sequence[MessageKey]
) -> Callable[[], dict[MessageKey, list[PreviousEntry]]]:
    """Earlier entries for each (sender, facility, control id), newest first: one statement
    added to `reads`; the function returned reads its answer once they have run."""
    if not keys:
        return dict  # nothing to look up: no entries
    match, params = in_groups(
        ("sender_app", "sender_facility"),
        "control_id",
        ((a[:200], f[:200], c[:200]) for a, f, c in keys),
    )
    rows = reads.add(
        (
            "SELECT id, sender_app, sender_facility, control_id, sha256, outcome, ack, reason "
            f"FROM {JOURNAL.name} WHERE ({match}) AND feed = ? ORDER BY id DESC",
            [*params, feed],
        )
    )

    def found() -> dict[MessageKey, list[PreviousEntry]]:
        entries: dict[MessageKey, list[PreviousEntry]] = {}
        for id_, app, facility, control, sha256, outcome, ack, reason in rows():
            entries.setdefault((app, facility, control), []).append(
                PreviousEntry(id_, sha256, Outcome(outcome), ack, reason)
            )
        return entries

    return found


def find_previous_many(
    session: Session, *, feed: str, keys: Sequence[MessageKey]
) -> dict[MessageKey, list[PreviousEntry]]:
    """Earlier entries for each (sender, facility, control id), newest first; one query."""
    reads = Reads(session.connection())
    found = look_up_previous(reads, feed=feed, keys=keys)
    reads.run()
    return found()


def find_previous(
    session: Session, *, feed: str, sender_app: str, sender_facility: str, control_id: str
) -> list[PreviousEntry]:
    """Earlier entries with the same (sender, facility, control id), newest first."""
    c = JOURNAL.c
    rows = session.execute(
        select(c.id, c.sha256, c.outcome, c.ack, c.reason)
        .where(
            c.sender_app == sender_app[:200],
            c.sender_facility == sender_facility[:200],
            c.control_id == control_id[:200],
            c.feed == feed,
        )
        .order_by(c.id.desc())
        .limit(PREVIOUS_LOOKUP_LIMIT)
    ).all()
    return [PreviousEntry(r.id, r.sha256, Outcome(r.outcome), r.ack, r.reason) for r in rows]


def update_entry(
    session: Session,
    *,
    entry_id: int,
    outcome: Outcome,
    reason: str | None,
    ack: str | None,
    trust_ods: str | None,
    replayed_at: datetime,
) -> None:
    """Record a replay's new outcome on the entry it re-processed."""
    session.execute(
        update(JOURNAL)
        .where(JOURNAL.c.id == entry_id)
        .values(
            outcome=outcome.value,
            reason=reason,
            ack=ack,
            trust_ods=trust_ods,
            replayed_at=replayed_at,
        )
    )


def purge_journal(session: Session, *, before: datetime) -> int:
    """Delete entries received before `before` (the retention setting); returns the count."""
    result = session.execute(delete(JOURNAL).where(JOURNAL.c.received_at < before))
    return int(getattr(result, "rowcount", 0) or 0)


def list_entries(
    session: Session,
    *,
    trust_ods: str | None = None,
    outcomes: Sequence[Outcome] = (),
    since: datetime | None = None,
    limit: int | None = 100,
    with_message: bool = False,
    oldest_first: bool = False,
) -> list[JournalView]:
    """Entries by trust, outcome and time (newest first unless `oldest_first`)."""
    c = JOURNAL.c
    columns = [
        c.id,
        c.received_at,
        c.feed,
        c.trust_ods,
        c.peer,
        c.sender_app,
        c.sender_facility,
        c.control_id,
        c.sha256,
        c.size,
        c.truncated,
        c.outcome,
        c.reason,
        c.replayed_at,
    ]
    if with_message:
        columns.append(c.message)
    query = select(*columns)
    if trust_ods:
        query = query.where(c.trust_ods == trust_ods)
    if outcomes:
        query = query.where(c.outcome.in_([o.value for o in outcomes]))
    if since is not None:
        query = query.where(c.received_at >= since)
    query = query.order_by(c.id.asc() if oldest_first else c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    return [_view(r, with_message=with_message) for r in session.execute(query).all()]


def get_entry(session: Session, *, entry_id: int) -> JournalView | None:
    """One entry with its stored copy."""
    c = JOURNAL.c
    r = session.execute(select(JOURNAL).where(c.id == entry_id)).first()
    if r is None:
        return None
    return _view(r, with_message=True)


def _view(r: Any, *, with_message: bool) -> JournalView:
    return JournalView(
        r.id,
        r.received_at,
        r.feed,
        r.trust_ods,
        r.peer,
        r.sender_app,
        r.sender_facility,
        r.control_id,
        r.sha256,
        r.size,
        bool(r.truncated),
        Outcome(r.outcome),
        r.reason,
        r.replayed_at,
        r.message if with_message else "",
    )


def count_entries(session: Session, *, feed: str | None = None) -> int:
    query = select(func.count()).select_from(JOURNAL)
    if feed:
        query = query.where(JOURNAL.c.feed == feed)
    return int(session.execute(query).scalar_one())
