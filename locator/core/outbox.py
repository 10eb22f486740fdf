"""The subscriptions' outbox: notifications written in the same transaction as the study
change that causes them, so a crash between the commit and the delivery loses nothing.

The index calls `record_study_changes` wherever a study's FHIR-visible state (and its
versionId) moves: for each changed study, one row per live subscription of the patient it
belongs to now and, when its patient changed, of the patient it belonged to before (that
subscriber must learn the study is no longer its patient's). A row names only the
subscription and the study: the deliverer (locator.notify) renders the study as it is when it
delivers, and decides there whether it still belongs to the subscription's patient.

Live subscriptions are `requested` (rows wait for the handshake) and `active`; `error` and
`off` ones get no rows. One statement per call, whether or not anyone subscribes; no HTTP here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection

from locator.store.models import subscription_outbox_table, subscription_table

OUTBOX = subscription_outbox_table
SUBSCRIPTION = subscription_table

LIVE_STATUSES = ("requested", "active")

# (study id, its NHS Number now, its NHS Number before the change)
StudyChange = tuple[str, str | None, str | None]


def record_study_changes(conn: Connection, *, changes: Sequence[StudyChange], at: datetime) -> None:
    """Queue a notification for every live subscription of each changed study's patient
    (now and before), in the caller's transaction."""
    pairs = sorted({(sid, nhs) for sid, now, before in changes for nhs in (now, before) if nhs})
    if not pairs:
        return
    postgres = conn.dialect.name == "postgresql"
    sql = _insert_sql(len(pairs), postgres)
    params: list[object] = [_bind_time(at, postgres)]
    for study_id, nhs in pairs:
        params += [study_id, nhs]
    conn.exec_driver_sql(sql, tuple(params))


@functools.lru_cache(maxsize=32)
def _insert_sql(count: int, postgres: bool) -> str:
    """`INSERT ... SELECT` joining the live subscriptions with `count` (study, NHS Number)
    pairs given inline (a UNION ALL of one-row SELECTs: both databases plan it as an index
    look-up per pair)."""
    mark = "%s" if postgres else "?"
    cast = f"CAST({mark} AS timestamptz)" if postgres else mark
    rows = " UNION ALL ".join(
        [f"SELECT {mark} AS study_id, {mark} AS nhs_number"]
        + [f"SELECT {mark}, {mark}"] * (count - 1)
    )
    live = ", ".join(f"'{status}'" for status in LIVE_STATUSES)
    return (
        f"INSERT INTO {OUTBOX.name} (subscription_id, study_id, created_at) "
        f"SELECT s.id, c.study_id, {cast} FROM ({rows}) AS c "
        f"JOIN {SUBSCRIPTION.name} AS s ON s.nhs_number = c.nhs_number "
        f"WHERE s.status IN ({live})"
    )


def _bind_time(at: datetime, postgres: bool) -> object:
    # As UTCDateTime stores it: timezone-aware on PostgreSQL, naive UTC text on SQLite.
    if postgres:
        return at
    return at.astimezone(UTC).isoformat(" ", "microseconds")[:26]


__all__ = ["LIVE_STATUSES", "StudyChange", "record_study_changes"]
