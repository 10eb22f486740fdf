"""The deliverer's SQL: what is due (handshakes, notifications in order per subscription),
and what came of it (rows delivered and deleted, audit rows, retry state, status changes).

Each function takes the caller's connection; the deliverer owns the transactions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, or_, select, text, update

from locator.audit import record_accesses
from locator.store.models import subscription_outbox_table, subscription_table

SUBSCRIPTION = subscription_table
OUTBOX = subscription_outbox_table
MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Channel:
    """What a delivery needs of its subscription."""

    id: str
    version: int
    owner: str
    nhs_number: str
    endpoint: str
    payload: str | None
    headers: tuple[str, ...]
    attempts: int
    failing_since: datetime | None


@dataclass(frozen=True, slots=True)
class Pending:
    """One notification owed: its outbox id, its subscription, the study it is about."""

    id: int
    channel: Channel
    study_id: str


_CHANNEL_COLUMNS = (
    SUBSCRIPTION.c.id,
    SUBSCRIPTION.c.version,
    SUBSCRIPTION.c.owner,
    SUBSCRIPTION.c.nhs_number,
    SUBSCRIPTION.c.endpoint,
    SUBSCRIPTION.c.payload,
    SUBSCRIPTION.c.headers,
    SUBSCRIPTION.c.attempts,
    SUBSCRIPTION.c.failing_since,
)


def _channel(row: Any) -> Channel:
    return Channel(
        row.id,
        row.version,
        row.owner,
        row.nhs_number,
        row.endpoint,
        row.payload,
        tuple(json.loads(row.headers)),
        row.attempts,
        row.failing_since,
    )


def requested(conn: Connection, *, limit: int) -> list[Channel]:
    """Subscriptions waiting for their handshake."""
    rows = conn.execute(
        select(*_CHANNEL_COLUMNS)
        .where(SUBSCRIPTION.c.status == "requested")
        .order_by(SUBSCRIPTION.c.updated_at)
        .limit(limit)
    )
    return [_channel(row) for row in rows]


def older_transactions_open(conn: Connection, *, since: datetime) -> bool:
    """PostgreSQL: is a transaction that began before `since` still open (as far as
    pg_stat_activity shows this role)? Such a transaction may have looked for subscribers
    before a new subscription was committed and commit its study change after it."""
    if conn.dialect.name != "postgresql":
        return False
    found = conn.execute(
        text(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start < :since LIMIT 1"
        ),
        {"since": since},
    ).first()
    return found is not None


def database_now(conn: Connection) -> datetime | None:
    """PostgreSQL's clock (the one pg_stat_activity's times are on); None elsewhere."""
    if conn.dialect.name != "postgresql":
        return None
    value: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
    return value


def settle_handshake(
    conn: Connection, *, channel: Channel, ok: bool, reason: str | None, now: datetime
) -> bool:
    """`requested` -> `active` after a 2xx handshake, else `error` with the reason; only if
    nobody changed the subscription meanwhile. True when it was settled."""
    done = conn.execute(
        update(SUBSCRIPTION)
        .where(
            SUBSCRIPTION.c.id == channel.id,
            SUBSCRIPTION.c.version == channel.version,
            SUBSCRIPTION.c.status == "requested",
        )
        .values(
            status="active" if ok else "error",
            error=None if ok else f"handshake failed: {reason}",
            version=SUBSCRIPTION.c.version + 1,
            updated_at=now,
            attempts=0,
            failing_since=None,
            next_attempt_at=None,
        )
    )
    return bool(done.rowcount == 1)


def due(
    conn: Connection, *, now: datetime, limit: int, skip: frozenset[str] = frozenset()
) -> list[Pending]:
    """Notifications of active subscriptions not waiting for a retry (and not in `skip`, the
    ones in flight), oldest first: each subscription's in the order they were written."""
    stmt = (
        select(OUTBOX.c.id, OUTBOX.c.study_id, *_CHANNEL_COLUMNS)
        .join(SUBSCRIPTION, SUBSCRIPTION.c.id == OUTBOX.c.subscription_id)
        .where(
            SUBSCRIPTION.c.status == "active",
            or_(SUBSCRIPTION.c.next_attempt_at.is_(None), SUBSCRIPTION.c.next_attempt_at <= now),
        )
        .order_by(OUTBOX.c.id)
        .limit(limit)
    )
    if skip:
        stmt = stmt.where(OUTBOX.c.subscription_id.not_in(sorted(skip)))
    pending = []
    for row in conn.execute(stmt):
        channel = _channel(_ChannelRow(row))
        pending.append(Pending(row[0], channel, row[1]))
    return pending


class _ChannelRow:
    """A due() row seen as a subscription row (its first two columns are the outbox's)."""

    def __init__(self, row: Any) -> None:
        (
            _,
            _,
            self.id,
            self.version,
            self.owner,
            self.nhs_number,
            self.endpoint,
            self.payload,
            self.headers,
            self.attempts,
            self.failing_since,
        ) = tuple(row)


def delivered(conn: Connection, *, ids: Sequence[int]) -> None:
    if ids:
        conn.execute(delete(OUTBOX).where(OUTBOX.c.id.in_(ids)))


def recovered(conn: Connection, *, subscription_ids: Sequence[str]) -> None:
    """Subscriptions whose head notification went through after failures: retry state off."""
    if subscription_ids:
        conn.execute(
            update(SUBSCRIPTION)
            .where(SUBSCRIPTION.c.id.in_(subscription_ids), SUBSCRIPTION.c.attempts > 0)
            .values(attempts=0, failing_since=None, next_attempt_at=None)
        )


def backoff(attempts: int, *, base: float) -> float:
    """Seconds before the next attempt after `attempts` failures: base, 2 base, 4 base ...
    up to an hour."""
    return float(min(base * 2 ** max(0, attempts - 1), MAX_BACKOFF_SECONDS))


def failed(
    conn: Connection,
    *,
    channel: Channel,
    reason: str,
    now: datetime,
    retry_hours: float,
    base: float,
) -> bool:
    """A delivery failed: retry later with backoff, or, once the head notification has failed
    for `retry_hours`, set the subscription to `error`. True when it went to `error`."""
    since = channel.failing_since or now
    attempts = channel.attempts + 1
    if now - since >= timedelta(hours=retry_hours):
        conn.execute(
            update(SUBSCRIPTION)
            .where(SUBSCRIPTION.c.id == channel.id, SUBSCRIPTION.c.status == "active")
            .values(
                status="error",
                error=f"deliveries failed for {retry_hours:g} hours: {reason}",
                version=SUBSCRIPTION.c.version + 1,
                updated_at=now,
                attempts=attempts,
                next_attempt_at=None,
            )
        )
        return True
    conn.execute(
        update(SUBSCRIPTION)
        .where(SUBSCRIPTION.c.id == channel.id)
        .values(
            attempts=attempts,
            failing_since=since,
            next_attempt_at=now + timedelta(seconds=backoff(attempts, base=base)),
        )
    )
    return False


def end_expired(conn: Connection, *, now: datetime) -> int:
    """Subscriptions past their `end` are turned off (R4: the server stops notifying)."""
    done = conn.execute(
        update(SUBSCRIPTION)
        .where(
            SUBSCRIPTION.c.end_at.is_not(None),
            SUBSCRIPTION.c.end_at <= now,
            SUBSCRIPTION.c.status.in_(("requested", "active", "error")),
        )
        .values(status="off", version=SUBSCRIPTION.c.version + 1, updated_at=now)
    )
    return int(done.rowcount or 0)


def pending_count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(OUTBOX)).scalar_one())


def audit(conn: Connection, *, records: Sequence[dict[str, Any]]) -> None:
    if records:
        record_accesses(conn, records)


__all__ = [
    "Channel",
    "Pending",
    "audit",
    "backoff",
    "database_now",
    "delivered",
    "due",
    "end_expired",
    "failed",
    "older_transactions_open",
    "pending_count",
    "recovered",
    "requested",
    "settle_handshake",
]
