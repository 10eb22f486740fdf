"""The MLLP listener: asyncio server, one acknowledgement per message, after its commit.

Persistent connections, pipelined frames (answered in order), a frame size cap, an idle
timeout (at least an hour by default), caps on concurrent connections overall and per source
address, optional TLS with client certificates bound to trusts. A shared port takes any
registered facility (subject to trusts' source_addresses); each trust's `mllp_port` gets a
dedicated listener that takes only that trust's facilities.

Group commit: a single committer drains every message waiting across connections into one
transaction (journal rows + apply_notice), commits, then releases each ACK. On a transient
database failure the ACKs are withheld while the commit is retried with backoff for
`mllp_commit_retry_seconds`; then the connections close without an ACK (the messages stay
the senders' to resend). A conflict with a concurrent writer (another listener on the same
PostgreSQL) retries the unit; any other failure answers AE 207 for the message that caused
it, never for the others in its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from ingest.hl7_process import (
    Binding,
    Decision,
    as_internal_error,
    commit_decisions,
    count_outcomes,
    decide_message,
)
from ingest.mllp import Frame, FrameReader, frame_message
from locator.config import Settings
from locator.core.journal import purge_journal
from locator.metrics import ACK_LATENCY, DB_ERRORS
from locator.store.db import is_conflict, is_sqlite, is_transient, transaction
from locator.tls import peer_names, server_ssl_context
from locator.trusts import TrustRegistry

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
MAX_BATCH = 500
GATHER_YIELDS = 3
POSTGRES_COMMITTERS = 2  # two batches in flight: one commits while the other is read
CONFLICT_RETRIES = 5
RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 2.0
PURGE_INTERVAL_SECONDS = 3600.0
SHARED_LABEL = "mllp"


class CommitQueue:
    """Group commit across connections: one database thread, batches of waiting messages."""

    def __init__(
        self, factory: sessionmaker[Session], retry_seconds: float, *, workers: int = 1
    ) -> None:
        self.factory = factory
        self.retry_seconds = retry_seconds
        self.workers = workers
        self._queue: asyncio.Queue[tuple[Decision, asyncio.Future[str | None]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(
            max_workers=workers + 1, thread_name_prefix="mllp-commit"
        )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"mllp-commit-{i}") for i in range(self.workers)
        ]

    async def submit(self, decision: Decision) -> str | None:
        """The ACK to send once the message is committed; None: close without an ACK."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        await self._queue.put((decision, future))
        return await future

    async def run_in_db_thread(self, func: object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)  # type: ignore[arg-type]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            # Let connections whose next message already sits in a socket buffer read and
            # decide it, so it joins this commit instead of waiting for the next one.
            for _ in range(GATHER_YIELDS):
                await asyncio.sleep(0)
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            decisions = [d for d, _ in batch]
            try:
                acks = await loop.run_in_executor(self._executor, self.commit, decisions)
            except Exception:  # never lose the loop; these messages go unanswered
                log.exception("commit thread failed")
                acks = [None] * len(batch)
            for (_, future), ack in zip(batch, acks, strict=True):
                if not future.done():
                    future.set_result(ack)

    def commit(self, decisions: list[Decision]) -> list[str | None]:
        """Commit a batch (in the database thread) with the retry policy of the module."""
        deadline = time.monotonic() + self.retry_seconds
        result = self._attempt(decisions, deadline)
        if result is not None:
            if any(ack is not None for ack in result):
                count_outcomes(decisions)
            return list(result)
        if len(decisions) > 1:  # one message broke the batch: find it, spare the others
            return [self.commit([d])[0] for d in decisions]
        return [self._commit_internal_error(decisions[0], deadline)]

    def _attempt(self, decisions: list[Decision], deadline: float) -> Sequence[str | None] | None:
        """The ACKs after a commit; [None, ...] after the retry window; None on a failure
        that is not the database's (a bug, bad data for one message)."""
        delay, conflicts = RETRY_FIRST_DELAY, 0
        while True:
            try:
                with transaction(self.factory) as session:
                    return commit_decisions(session, decisions)
            except Exception as exc:
                if is_conflict(exc) and conflicts < CONFLICT_RETRIES:
                    conflicts += 1
                    continue
                if not is_transient(exc):
                    if len(decisions) == 1:
                        log.exception("applying a message failed (answered AE 207)")
                    return None
                DB_ERRORS.labels(where="mllp").inc()
                if time.monotonic() + delay > deadline:
                    log.error(
                        "database unavailable for %.0f s: %d message(s) left unacknowledged",
                        self.retry_seconds,
                        len(decisions),
                    )
                    return [None] * len(decisions)
                log.warning(
                    "database unavailable (%s); retrying the commit in %.2f s",
                    type(exc).__name__,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)

    def _commit_internal_error(self, decision: Decision, deadline: float) -> str | None:
        refused = as_internal_error(decision, "the message could not be applied")
        result = self._attempt([refused], deadline)
        if result is None:  # not even the refusal could be journaled as it was: keep less
            refused = as_internal_error(
                decision, "the message could not be stored", unstorable=True
            )
            result = self._attempt([refused], deadline)
        if result is None:
            return None
        if result[0] is not None:
            count_outcomes([refused])
        return result[0]

    async def stop(self) -> None:
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executor.shutdown(wait=True)


@dataclass(eq=False)
class _Connection:
    peer: str
    task: asyncio.Task[None] | None = None
    busy: bool = False


@dataclass
class MllpListener:
    """The running listener: `ports` by label, `stop()` for a clean shutdown."""

    settings: Settings
    registry: TrustRegistry
    committer: CommitQueue
    ports: dict[str, int] = field(default_factory=dict)
    servers: list[asyncio.Server] = field(default_factory=list)
    connections: set[_Connection] = field(default_factory=set)
    stopping: bool = False
    tls: bool = False
    purge_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ connections

    def _admit(self, peer: str) -> bool:
        if len(self.connections) >= self.settings.mllp_max_connections:
            log.warning(
                "MLLP connection from %s refused: %d connections open", peer, len(self.connections)
            )
            return False
        same = sum(1 for c in self.connections if c.peer == peer)
        if same >= self.settings.mllp_max_connections_per_source:
            log.warning("MLLP connection from %s refused: %d open from that address", peer, same)
            return False
        return True

    def _binding(
        self, label: str, trust_ods: str | None, peer: str, writer: asyncio.StreamWriter
    ) -> Binding | None:
        names = tuple(peer_names(writer.get_extra_info("peercert"))) if self.tls else ()
        bound = {t.ods_code for n in names if (t := self.registry.by_tls_name(n))}
        if len(bound) > 1 or (trust_ods and bound and bound != {trust_ods}):
            log.warning(
                "MLLP connection from %s: certificate names %s bind several trusts", peer, names
            )
            return None
        return Binding(
            label=label,
            trust_ods=trust_ods or next(iter(bound), None),
            peer_address=peer,
            tls=self.tls,
            tls_names=names,
        )

    async def handle_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        label: str,
        trust_ods: str | None,
    ) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else "?"
        if self.stopping or not self._admit(peer):
            writer.close()
            return
        binding = self._binding(label, trust_ods, peer, writer)
        conn = _Connection(peer, asyncio.current_task())
        self.connections.add(conn)
        try:
            if binding is not None:
                await self._serve(reader, writer, conn, binding)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("MLLP connection from %s ended: %s", peer, type(exc).__name__)
        except asyncio.CancelledError:
            pass
        except Exception:  # the listener never dies with one connection
            log.exception("MLLP connection from %s failed", peer)
        finally:
            self.connections.discard(conn)
            writer.close()

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: _Connection,
        binding: Binding,
    ) -> None:
        frames = FrameReader(self.settings.mllp_max_message_bytes)
        idle = self.settings.mllp_idle_timeout_seconds
        while not self.stopping:
            try:
                async with asyncio.timeout(idle):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError:
                log.info("MLLP connection from %s idle for %.0f s: closed", conn.peer, idle)
                return
            if not data:
                return
            conn.busy = True
            for frame in frames.feed(data):
                if not await self._answer(frame, binding, writer):
                    return
            await writer.drain()
            conn.busy = False
            if frames.error is not None:
                log.warning("MLLP connection from %s: %s; closed", conn.peer, frames.error)
                return

    async def _answer(self, frame: Frame, binding: Binding, writer: asyncio.StreamWriter) -> bool:
        """Decide, commit, acknowledge one frame; False: close the connection, no ACK."""
        started = time.perf_counter()
        decision = decide_message(
            frame.payload,
            sha256=frame.sha256,
            size=frame.size,
            oversize=frame.oversize,
            registry=self.registry,
            binding=binding,
            accept_test_numbers=self.settings.accept_test_nhs_numbers,
            received_at=datetime.now(UTC),
        )
        ack = await self.committer.submit(decision)
        if ack is None:
            log.error(
                "MLLP connection from %s closed without an ACK (database unavailable)",
                binding.peer_address,
            )
            return False
        ACK_LATENCY.labels(feed="hl7").observe(time.perf_counter() - started)
        writer.write(frame_message(ack.encode(decision.codec, errors="replace")))
        return True

    # ------------------------------------------------------------------ lifecycle

    async def stop(self) -> None:
        """Stop accepting; in-flight messages finish and are acknowledged; then close."""
        self.stopping = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        pending = [c.task for c in self.connections if c.task is not None]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.mllp_commit_retry_seconds + 5)
        if self.purge_task is not None:
            self.purge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.purge_task
        await self.committer.stop()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _purge_loop(self) -> None:
        while True:
            cutoff = datetime.now(UTC) - timedelta(days=self.settings.journal_retention_days)
            try:
                removed = await self.committer.run_in_db_thread(self._purge, cutoff)
                if removed:
                    log.info(
                        "journal retention: %s entries older than %s removed",
                        removed,
                        cutoff.date(),
                    )
            except Exception as exc:
                DB_ERRORS.labels(where="journal_purge").inc()
                log.warning("journal retention purge failed: %s", type(exc).__name__)
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)

    def _purge(self, cutoff: datetime) -> int:
        with transaction(self.committer.factory) as session:
            return purge_journal(session, before=cutoff)


async def start_mllp(
    settings: Settings, *, session_factory: sessionmaker[Session], registry: TrustRegistry
) -> MllpListener:
    """Start the shared listener and one per trust with `mllp_port`; ports in `.ports`."""
    # SQLite has one writer at a time; PostgreSQL overlaps one batch's commit with the next.
    bind = session_factory.kw.get("bind")
    workers = POSTGRES_COMMITTERS if bind is not None and not is_sqlite(bind) else 1
    committer = CommitQueue(session_factory, settings.mllp_commit_retry_seconds, workers=workers)
    ssl_context = server_ssl_context(
        settings.mllp_tls_cert, settings.mllp_tls_key, settings.mllp_tls_client_ca
    )
    listener = MllpListener(settings, registry, committer, tls=ssl_context is not None)
    committer.start()
    host = settings.listener_host("mllp")
    endpoints: list[tuple[str, str | None, int]] = [(SHARED_LABEL, None, settings.mllp_port)]
    endpoints += [
        (f"{SHARED_LABEL}.{t.ods_code}", t.ods_code, t.mllp_port)
        for t in registry
        if t.mllp_port is not None
    ]
    for label, trust_ods, port in endpoints:

        async def handle(
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
            label: str = label,
            trust_ods: str | None = trust_ods,
        ) -> None:
            await listener.handle_connection(reader, writer, label, trust_ods)

        server = await asyncio.start_server(
            handle, host, port, ssl=ssl_context, limit=READ_CHUNK, backlog=1024
        )
        listener.servers.append(server)
        listener.ports[label] = server.sockets[0].getsockname()[1]
    listener.purge_task = asyncio.create_task(listener._purge_loop(), name="journal-purge")
    log.info("MLLP listening on %s: %s", host, listener.ports)
    return listener
