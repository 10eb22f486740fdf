"""MPPS step state in the database: N-CREATE and N-SET as one transaction each, and the sweep
that reports steps left IN PROGRESS.

A step lives in the mpps_step table (not in a listener's memory), so it survives a restart
between N-CREATE and N-SET and any listener over the same PostgreSQL can take the N-SET: the
row is locked with SELECT ... FOR UPDATE (SQLite: writers take the lock at BEGIN IMMEDIATE).
The step write and apply_notice commit together, before the DIMSE success is sent
(issue 4, point 6). Transient database errors are retried briefly, then answered with
TemporaryFailureError, a status the modality retries.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import CursorResult, Table, and_, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from ingest.mpps import (
    DuplicateInstanceError,
    NoLongerUpdatableError,
    NoSuchInstanceError,
    TemporaryFailureError,
    apply_update,
    build_notice,
)
from ingest.mpps_step import StepAttributes, StepStatus, StepUpdate
from locator.core.index import apply_notice
from locator.core.nhs_number import mask
from locator.metrics import DB_ERRORS, STALE_MPPS_STEPS
from locator.store.db import is_sqlite, transaction
from locator.store.models import MppsStep

log = logging.getLogger("ingest.mpps")

# Backoff before each retry of a unit of work that met a transient database error. The
# modality's DIMSE timeout (typically 30 s or more) bounds how long it may take in total.
RETRY_DELAYS = (0.05, 0.2, 0.5)
DB_WHERE = "mpps"
# Core statements on the per-request path (conventions.md: Core on the hot paths).
STEP: Table = MppsStep.__table__  # type: ignore[attr-defined]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What a create or set did: `resend` when it was an identical repeat answered again."""

    resend: bool
    version: int
    study_ids: tuple[str, ...] = ()


def _is_transient(exc: DBAPIError) -> bool:
    return isinstance(exc, OperationalError) or exc.connection_invalidated


_sqlite_locks: dict[int, threading.Lock] = {}
_sqlite_locks_guard = threading.Lock()


def writer_lock(factory: sessionmaker[Session]) -> contextlib.AbstractContextManager[object]:
    """SQLite has one writer at a time, and a writer that finds the database locked sleeps in
    SQLite's busy handler with growing back-off (seconds under eight associations). Queueing
    this process's writers on a lock instead keeps each wait to one commit's length.
    PostgreSQL locks rows, not the database: no lock there."""
    engine = factory.kw.get("bind")
    if engine is None or not is_sqlite(engine):
        return contextlib.nullcontext()
    with _sqlite_locks_guard:
        return _sqlite_locks.setdefault(id(engine), threading.Lock())


def run_unit(
    factory: sessionmaker[Session],
    work: Callable[[], T],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run one unit of work; retry it after an IntegrityError (a concurrent writer won the
    race: the retry sees its row) or a transient database error, then give up with
    TemporaryFailureError."""
    lock = writer_lock(factory)
    for delay in (*RETRY_DELAYS, None):
        try:
            with lock:
                return work()
        except IntegrityError:  # a race, not a fault: not counted in DB_ERRORS
            if delay is None:
                raise TemporaryFailureError() from None
        except DBAPIError as exc:
            DB_ERRORS.labels(where=DB_WHERE).inc()
            if not _is_transient(exc) or delay is None:
                log.warning("MPPS database error, answered as temporary: %s", type(exc).__name__)
                raise TemporaryFailureError() from None
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def create_step(
    factory: sessionmaker[Session],
    *,
    sop_instance_uid: str,
    calling_ae: str,
    trust_ods: str,
    attributes: StepAttributes,
    received_at: datetime,
) -> StepOutcome:
    """N-CREATE (PS3.4 F.7.2.1): store the step and apply its notice in one transaction.
    An existing instance is an identical resend (success again) or a duplicate (0x0111)."""

    def work() -> StepOutcome:
        with transaction(factory) as session:
            row = session.execute(
                select(STEP.c.trust_ods, STEP.c.create_hash, STEP.c.version).where(
                    STEP.c.sop_instance_uid == sop_instance_uid
                )
            ).first()
            if row is not None:
                if row.trust_ods == trust_ods and row.create_hash == attributes.content_hash:
                    return StepOutcome(resend=True, version=row.version)
                raise DuplicateInstanceError("Duplicate SOP Instance")
            session.execute(
                insert(STEP).values(
                    sop_instance_uid=sop_instance_uid,
                    trust_ods=trust_ods,
                    calling_ae=calling_ae[:16],
                    status=attributes.status.value,
                    version=0,
                    attributes=attributes.to_json(),
                    create_hash=attributes.content_hash,
                    created_at=received_at,
                    updated_at=received_at,
                )
            )
            notice = build_notice(
                attributes,
                trust_ods=trust_ods,
                sop_instance_uid=sop_instance_uid,
                version=0,
                received_at=received_at,
            )
            applied = apply_notice(session, notice=notice)
            return StepOutcome(resend=False, version=0, study_ids=applied.study_ids)

    return run_unit(factory, work)


def set_step(
    factory: sessionmaker[Session],
    *,
    sop_instance_uid: str,
    trust_ods: str,
    update_: StepUpdate,
    received_at: datetime,
) -> StepOutcome:
    """N-SET (PS3.4 F.7.2.2): update a step IN PROGRESS under a row lock. After COMPLETED or
    DISCONTINUED only an identical resend of the final N-SET succeeds (else A710)."""
    set_hash = update_.content_hash

    def work() -> StepOutcome:
        with transaction(factory) as session:
            query = select(
                STEP.c.trust_ods, STEP.c.attributes, STEP.c.last_set_hash, STEP.c.version
            ).where(STEP.c.sop_instance_uid == sop_instance_uid)
            row = session.execute(query.with_for_update()).first()
            if row is None or row.trust_ods != trust_ods:
                raise NoSuchInstanceError("No such Performed Procedure Step")
            if row.last_set_hash == set_hash:
                return StepOutcome(resend=True, version=row.version)
            step = StepAttributes.from_json(row.attributes)
            if step.status.is_final:
                raise NoLongerUpdatableError()
            new, version = apply_update(step, update_), row.version + 1
            session.execute(
                update(STEP)
                .where(STEP.c.sop_instance_uid == sop_instance_uid)
                .values(
                    version=version,
                    status=new.status.value,
                    attributes=new.to_json(),
                    last_set_hash=set_hash,
                    updated_at=received_at,
                )
            )
            notice = build_notice(
                new,
                trust_ods=trust_ods,
                sop_instance_uid=sop_instance_uid,
                version=version,
                received_at=received_at,
            )
            applied = apply_notice(session, notice=notice)
            return StepOutcome(resend=False, version=version, study_ids=applied.study_ids)

    return run_unit(factory, work)


def sweep_stale_steps(
    factory: sessionmaker[Session], *, older_than: timedelta, now: datetime | None = None
) -> int:
    """Report steps left IN PROGRESS longer than `older_than` (a modality crashed or never
    sent its final N-SET): log each once, mark it, set the gauge. Never deletes a step.
    Returns how many stale steps there are."""
    now = now or datetime.now(UTC)
    cutoff = now - older_than
    stale = and_(
        col(MppsStep.status) == StepStatus.IN_PROGRESS.value, col(MppsStep.created_at) < cutoff
    )
    with transaction(factory) as session:
        fresh = (
            session.execute(
                select(MppsStep).where(stale, col(MppsStep.stale_reported_at).is_(None))
            )
            .scalars()
            .all()
        )
        for row in fresh:
            claimed: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(MppsStep)
                .where(col(MppsStep.sop_instance_uid) == row.sop_instance_uid)
                .where(col(MppsStep.stale_reported_at).is_(None))
                .values(stale_reported_at=now)
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount == 1:  # another listener may have reported it first
                _log_stale(row)
        count = session.execute(
            select(func.count()).select_from(MppsStep).where(stale)
        ).scalar_one()
    STALE_MPPS_STEPS.set(count)
    return int(count)


def _log_stale(row: MppsStep) -> None:
    step = StepAttributes.from_json(row.attributes)
    log.warning(
        "MPPS step %s from %s (trust %s, patient %s) IN PROGRESS since %s: stale, "
        "no final N-SET received",
        row.sop_instance_uid,
        row.calling_ae,
        row.trust_ods,
        mask(step.nhs_number) if step.nhs_number else "local id only",
        row.created_at.isoformat(),
    )
