"""The deliverer's lease: one process per database delivers at a time.

Each API process runs a deliverer; only the holder of the `subscription-deliverer` row
delivers. The holder renews it every third of `LOCATOR_SUBSCRIPTION_LEASE_SECONDS`; when a
holder dies (kill -9 included) its lease runs out and another process takes it. Times are
the processes' clocks (UTC), so the hosts of one deployment keep their clocks in step (NTP).
A process that stalls past its lease may overlap with the next holder for a moment: delivery
is at least once, and each notification carries its id so a receiver drops repeats.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, or_, update
from sqlalchemy.dialects import postgresql, sqlite

from locator.store.models import service_lease_table

LEASE = service_lease_table
DELIVERER = "subscription-deliverer"


def hold_lease(conn: Connection, *, name: str, holder: str, seconds: float, now: datetime) -> bool:
    """Take or renew the lease `name` for `holder` until now + seconds; True when held."""
    expires = now + timedelta(seconds=seconds)
    taken = conn.execute(
        update(LEASE)
        .where(
            LEASE.c.name == name,
            or_(LEASE.c.holder == holder, LEASE.c.expires_at < now),
        )
        .values(holder=holder, expires_at=expires)
    )
    if taken.rowcount == 1:
        return True
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    inserted = conn.execute(
        dialect.insert(LEASE)
        .values(name=name, holder=holder, expires_at=expires)
        .on_conflict_do_nothing()
    )
    return bool(inserted.rowcount == 1)


def release_lease(conn: Connection, *, name: str, holder: str, now: datetime) -> None:
    """Give the lease up at once (a clean stop), so another process takes it without waiting."""
    conn.execute(
        update(LEASE)
        .where(and_(LEASE.c.name == name, LEASE.c.holder == holder))
        .values(expires_at=now - timedelta(seconds=1))
    )
