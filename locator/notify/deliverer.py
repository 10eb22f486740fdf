"""The deliverer: reads the outbox and tells each subscription's endpoint, at least once, in
order per subscription, one deliverer per database (the lease).

Every API process runs one; the lease holder delivers. Each poll (every
`LOCATOR_SUBSCRIPTION_POLL_SECONDS`, at once again when there was work) it:
- sends the handshake of `requested` subscriptions (-> `active` on a 2xx, `error` otherwise);
- takes the due notifications of every active subscription that has none in flight, oldest
  first, and delivers each subscription's in order on a task of its own (at most
  `LOCATOR_SUBSCRIPTION_CONCURRENCY` at once), stopping a subscription's run at its first
  failure: a slow or failing receiver holds only its own queue, never longer than the
  request timeout per request;
- records the results in one transaction per batch: delivered rows deleted, an audit row per
  delivery attempt (who: the subscriber; which NHS Number and study; when; the receiver's HTTP
  status), and the retry state (exponential backoff; after `LOCATOR_SUBSCRIPTION_RETRY_HOURS`
  of failures the subscription goes to `error`). A subscription leaves "in flight" only once
  its results are committed, so a row is never sent twice by one deliverer in normal running.

A crash after a send and before that commit sends the notification again after the restart
(same notification id); its audit row is written with that delivery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Connection, Engine

from locator.config import Settings
from locator.core.nhs_number import mask
from locator.metrics import SUBSCRIPTION_DELIVERIES
from locator.notify import queue
from locator.notify.addresses import parse_networks
from locator.notify.lease import DELIVERER, hold_lease, release_lease
from locator.notify.queue import Channel, Pending
from locator.notify.sender import (
    EVENT_HEADER,
    NOTIFICATION_ID_HEADER,
    SUBSCRIPTION_ID_HEADER,
    Outcome,
    header_pairs,
    make_client,
    send,
)
from locator.store.db import read_connection

log = logging.getLogger("locator.notify")

FHIR_JSON = "application/fhir+json"
BATCH = 500
SETTLE_LIMIT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class NotifiedStudy:
    """A study as a delivery sees it now: whose it is, and its ImagingStudy."""

    nhs_number: str | None
    trust_ods: str
    merged_into: str | None
    resource: dict[str, Any] | None


# Reads the studies (by id) a run of notifications is about, on the deliverer's connection.
StudyReader = Callable[[Connection, Sequence[str]], dict[str, NotifiedStudy]]


@dataclass(slots=True)
class _Result:
    channel: Channel
    delivered: list[int] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None
    done: asyncio.Future[None] | None = None


def now_utc() -> datetime:
    return datetime.now(UTC)


class Deliverer:
    """The deliverer of one process (a Listener to `serve`: no ports, `stop()`)."""

    ports: dict[str, int]

    def __init__(self, settings: Settings, *, engine: Engine, read_studies: StudyReader) -> None:
        self.settings = settings
        self.engine = engine
        self.read_studies = read_studies
        self.ports = {}
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.networks = parse_networks(settings.subscription_allowed_networks)
        self.open_mode = not settings.jwks
        self.leader = False
        self._stopping = asyncio.Event()
        self._in_flight: set[str] = set()
        self._seen: dict[str, tuple[datetime, float]] = {}
        self._results: asyncio.Queue[_Result] = asyncio.Queue()
        self._limit = asyncio.Semaphore(settings.subscription_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._main: list[asyncio.Task[None]] = []

    # ----------------------------------------------------------------- life

    async def start(self) -> None:
        self._client = make_client(
            timeout=self.settings.subscription_timeout_seconds,
            ca_file=str(self.settings.subscription_ca_file)
            if self.settings.subscription_ca_file
            else None,
            connections=self.settings.subscription_concurrency,
        )
        self._main = [
            asyncio.create_task(self._hold_lease(), name="notify-lease"),
            asyncio.create_task(self._poll(), name="notify-poll"),
            asyncio.create_task(self._write_results(), name="notify-results"),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.subscription_timeout_seconds + 5)
        for task in self._main:
            task.cancel()
        await asyncio.gather(*self._main, return_exceptions=True)
        await self._drain_results()
        if self.leader:
            try:
                await asyncio.to_thread(self._release)
            except Exception as exc:
                log.warning("could not release the deliverer's lease: %s", type(exc).__name__)
        if self._client is not None:
            await self._client.aclose()

    def _release(self) -> None:
        with self.engine.begin() as conn:
            release_lease(conn, name=DELIVERER, holder=self.holder, now=now_utc())

    async def _hold_lease(self) -> None:
        seconds = self.settings.subscription_lease_seconds
        while True:
            try:
                held = await asyncio.to_thread(self._renew, seconds)
            except Exception as exc:
                held = False
                log.warning("deliverer lease not renewed: %s", type(exc).__name__)
            if held != self.leader:
                log.info("subscription deliverer %s", "started" if held else "stood down")
            self.leader = held
            await asyncio.sleep(seconds / 3)

    def _renew(self, seconds: float) -> bool:
        now = now_utc()
        with self.engine.begin() as conn:
            held = hold_lease(conn, name=DELIVERER, holder=self.holder, seconds=seconds, now=now)
            if held:
                queue.end_expired(conn, now=now)
            return held

    # ----------------------------------------------------------------- polling

    async def _poll(self) -> None:
        poll = self.settings.subscription_poll_seconds
        while not self._stopping.is_set():
            worked = False
            if self.leader:
                try:
                    worked = await self._cycle()
                except Exception as exc:  # the database is away: try again next poll
                    log.warning("subscription delivery poll failed: %s", type(exc).__name__)
            if not worked:
                await asyncio.sleep(poll)
            else:
                await asyncio.sleep(0)

    async def _cycle(self) -> bool:
        due = await asyncio.to_thread(self._due, frozenset(self._in_flight))
        handshakes, pending, studies = due
        started = False
        for channel in handshakes:
            if channel.id not in self._in_flight:
                self._spawn(channel.id, self._handshake(channel))
                started = True
        runs: dict[str, list[Pending]] = {}
        for item in pending:
            runs.setdefault(item.channel.id, []).append(item)
        for sub_id, run in runs.items():
            if sub_id not in self._in_flight:
                self._spawn(sub_id, self._deliver_run(run, studies))
                started = True
        return started

    def _due(
        self, in_flight: frozenset[str]
    ) -> tuple[list[Channel], list[Pending], dict[str, NotifiedStudy]]:
        """What is due, and the studies the due notifications are about (read together)."""
        with read_connection(self.engine) as conn:
            requested = [c for c in queue.requested(conn, limit=50) if c.id not in in_flight]
            ready = [c for c in requested if self._settled(conn, c)]
            pending = queue.due(conn, now=now_utc(), limit=BATCH, skip=in_flight)
            studies = self.read_studies(conn, [p.study_id for p in pending]) if pending else {}
        return ready, pending, studies

    def _settled(self, conn: Connection, channel: Channel) -> bool:
        """May this subscription's handshake go now? On PostgreSQL, not while a transaction
        older than our first sight of it is open: it may have looked for subscribers before
        this one was committed, and a subscriber that searches once it is `active` must see
        that transaction's change (bounded wait: SETTLE_LIMIT_SECONDS)."""
        first = self._seen.get(channel.id)
        if first is None:
            at = queue.database_now(conn)
            if at is None:
                return True
            self._seen[channel.id] = first = (at, time.monotonic())
        if time.monotonic() - first[1] > SETTLE_LIMIT_SECONDS:
            log.warning("subscription %s: activating past a long-open transaction", channel.id)
            return True
        return not queue.older_transactions_open(conn, since=first[0])

    def _spawn(self, sub_id: str, work: Any) -> None:
        self._in_flight.add(sub_id)

        async def guarded() -> None:
            try:
                async with self._limit:
                    await work
            except Exception:
                log.exception("subscription %s: delivery task failed", sub_id)
            finally:
                self._in_flight.discard(sub_id)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------- sending

    def _headers(self, channel: Channel, **extra: str) -> list[tuple[str, str]]:
        pairs = header_pairs(channel.headers)
        pairs.append((SUBSCRIPTION_ID_HEADER, channel.id))
        pairs += [(name, value) for name, value in extra.items()]
        return pairs

    async def _request(
        self, channel: Channel, method: str, path: str, headers: list[tuple[str, str]], body: Any
    ) -> Outcome:
        assert self._client is not None
        return await send(
            self._client,
            method=method,
            endpoint=channel.endpoint,
            path=path,
            headers=headers,
            body=body,
            networks=self.networks,
            open_mode=self.open_mode,
        )

    async def _handshake(self, channel: Channel) -> None:
        headers = self._headers(channel, **{EVENT_HEADER: "handshake"})
        outcome = await self._request(channel, "POST", "", headers, None)
        settled = await asyncio.to_thread(self._settle, channel, outcome)
        self._seen.pop(channel.id, None)
        if settled:
            log.info(
                "subscription %s %s after its handshake",
                channel.id,
                "active" if outcome.ok else f"in error ({outcome.reason})",
            )

    def _settle(self, channel: Channel, outcome: Outcome) -> bool:
        with self.engine.begin() as conn:
            return queue.settle_handshake(
                conn, channel=channel, ok=outcome.ok, reason=outcome.reason, now=now_utc()
            )

    async def _deliver_run(self, run: list[Pending], studies: dict[str, NotifiedStudy]) -> None:
        channel = run[0].channel
        result = _Result(channel)
        for item in run:
            study = studies.get(item.study_id)
            method, path, body = self._what(channel, item.study_id, study)
            headers = self._headers(
                channel, **{EVENT_HEADER: "notification", NOTIFICATION_ID_HEADER: str(item.id)}
            )
            outcome = await self._request(channel, method, path, headers, body)
            result.audit.append(_audit_record(item, study, method, outcome))
            SUBSCRIPTION_DELIVERIES.labels(outcome="delivered" if outcome.ok else "failed").inc()
            if not outcome.ok:
                result.failure = outcome.reason or f"HTTP {outcome.status}"
                break
            result.delivered.append(item.id)
        result.done = asyncio.get_running_loop().create_future()
        await self._results.put(result)
        await result.done

    def _what(
        self, channel: Channel, study_id: str, study: NotifiedStudy | None
    ) -> tuple[str, str, dict[str, Any] | None]:
        """The request for one notification: POST with no body (no payload), else PUT of
        the study as it is now when it is still this patient's, DELETE when it is not."""
        if channel.payload is None:
            return "POST", "", None
        path = f"/ImagingStudy/{study_id}"
        if (
            study is not None
            and study.merged_into is None
            and study.nhs_number == channel.nhs_number
            and study.resource is not None
        ):
            return "PUT", path, study.resource
        return "DELETE", path, None

    # ----------------------------------------------------------------- results

    async def _write_results(self) -> None:
        while True:
            batch = [await self._results.get()]
            while not self._results.empty():
                batch.append(self._results.get_nowait())
            await self._commit(batch)

    async def _drain_results(self) -> None:
        batch = []
        while not self._results.empty():
            batch.append(self._results.get_nowait())
        if batch:
            await self._commit(batch)

    async def _commit(self, batch: list[_Result]) -> None:
        try:
            await asyncio.to_thread(self._record, batch)
        except Exception as exc:  # not recorded: those rows will be sent again
            log.warning("delivery results not recorded: %s", type(exc).__name__)
        for result in batch:
            if result.done is not None and not result.done.done():
                result.done.set_result(None)

    def _record(self, batch: list[_Result]) -> None:
        now = now_utc()
        settings = self.settings
        with self.engine.begin() as conn:
            queue.delivered(conn, ids=[i for r in batch for i in r.delivered])
            queue.audit(conn, records=[a for r in batch for a in r.audit])
            queue.recovered(
                conn,
                subscription_ids=[r.channel.id for r in batch if r.failure is None],
            )
            for r in batch:
                if r.failure is None:
                    continue
                if queue.failed(
                    conn,
                    channel=r.channel,
                    reason=r.failure,
                    now=now,
                    retry_hours=settings.subscription_retry_hours,
                    base=settings.subscription_retry_base_seconds,
                ):
                    log.warning(
                        "subscription %s (patient %s) in error: deliveries failed for %g hours",
                        r.channel.id,
                        mask(r.channel.nhs_number),
                        settings.subscription_retry_hours,
                    )


def _audit_record(
    item: Pending, study: NotifiedStudy | None, method: str, outcome: Outcome
) -> dict[str, Any]:
    """A delivery, audited like a read: the subscriber, the NHS Number, the study, the
    receiver's answer (locator.audit.audit_row's fields)."""
    channel = item.channel
    return {
        "request_id": f"notification-{item.id}",
        "action": "read",
        "resource_type": "ImagingStudy",
        "query": (
            f"ImagingStudy/{item.study_id} (notification {item.id} of "
            f"Subscription/{channel.id}, {method})"
        ),
        "nhs_number": channel.nhs_number,
        "trust_ods": study.trust_ods if study is not None else None,
        "result_count": 1 if method == "PUT" else 0,
        "outcome": outcome.status,
        "subject": channel.owner,
        "client_id": channel.owner,
        "remote_addr": outcome.address,
    }
