"""The DICOM MPPS listener: a pynetdicom SCP for Modality Performed Procedure Step (N-CREATE,
N-SET; PS3.4 Annex F) and Verification (C-ECHO; PS3.4 Annex A).

The calling AE title decides the trust (interface.md, Feeds): an association from a title no
trust owns, from an address outside the trust's `source_addresses`, or (with TLS) with a
client certificate that is not the trust's, is rejected at association time (A-ASSOCIATE-RJ,
PS3.8 9.3.4). Each DIMSE request is answered only after its effect is committed
(mpps_store); every refusal maps to one DIMSE status in `status_dataset`, the only place
where errors become wire values.

pynetdicom runs each association in its own thread and leaves Nagle's algorithm on; the
server below sets TCP_NODELAY (and re-arms TCP_QUICKACK after each read, so a modality
whose socket keeps Nagle on is not held up by our delayed ACKs) on every accepted socket,
and moves the TLS handshake off the accept loop into the connection's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pydicom.config
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from ingest.mpps import (
    DimseStatus,
    InvalidAttributeValueError,
    MppsError,
    TemporaryFailureError,
    UndecodableDatasetError,
    parse_n_create,
    parse_n_set,
)
from ingest.mpps_store import StepOutcome, create_step, set_step, sweep_stale_steps
from locator.config import Settings
from locator.metrics import ACK_LATENCY, MESSAGES
from locator.tls import peer_names, server_ssl_context
from locator.trusts import TrustConfig, TrustRegistry

log = logging.getLogger("ingest.dicom")

FEED = "mpps"

# SOP classes served (PS3.4 Annex F and Annex A).
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# A-ASSOCIATE-RJ parameters (PS3.8 Table 9-21).
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03

# An MPPS attribute list is a few kB; a step with thousands of image references stays well
# under this. Larger lists are refused before they are decoded.
MAX_ATTRIBUTE_LIST_BYTES = 8 * 1024 * 1024
# Past these a peer is not sending MPPS: the connection is closed (see _FeedSocket).
MAX_PDU_RECEIVE_BYTES = 1024 * 1024
MAX_UNANSWERED_BYTES = 2 * MAX_ATTRIBUTE_LIST_BYTES
TLS_HANDSHAKE_TIMEOUT = 30.0
STOP_GRACE_SECONDS = 10.0
SERVER_POLL_SECONDS = 0.1
INTERNAL_ERROR = "Internal error"


# --------------------------------------------------------------------------- transport


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY: pynetdicom writes a DIMSE command and its dataset as separate PDUs, and
    Nagle plus the peer's delayed ACK stalls each exchange for ~40 ms (stack-limits.md 6)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _quickack(sock)


def _quickack(sock: socket.socket) -> None:
    # Linux only, and not sticky: the kernel may fall back to delayed ACKs, hence re-armed
    # after every read (_FeedSocket).
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


class _FeedSocket(AssociationSocket):
    """pynetdicom's socket wrapper with two additions:

    - TCP_QUICKACK re-armed after each read, so the ACK of a modality's command PDU leaves at
      once and its Nagle-held dataset PDU follows (measured: 115 ms -> 25 ms per pair);
    - bounded reads: pynetdicom reads whatever PDU length a peer declares and joins the
      fragments of a DIMSE message without limit. A PDU over our advertised maximum (PS3.8
      D.1: the peer shall not exceed it), or a request far past MAX_ATTRIBUTE_LIST_BYTES
      before we answer, closes the connection instead of filling memory.
    """

    max_pdu_bytes = MAX_PDU_RECEIVE_BYTES
    _unanswered = 0

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_pdu_bytes:
            raise OSError(f"PDU of {nr_bytes} bytes exceeds our maximum")
        data: bytearray = super().recv(nr_bytes)
        self._unanswered += len(data)
        if self._unanswered > MAX_UNANSWERED_BYTES:
            raise OSError("request too large")
        if self.socket is not None:
            _quickack(self.socket)
        return data

    def send(self, bytestream: bytes) -> None:
        self._unanswered = 0
        super().send(bytestream)


class _RequestHandler(RequestHandler):
    def handle(self) -> None:
        # The TLS handshake runs here, in the connection's thread, with a deadline: in
        # pynetdicom's get_request one silent client would block every other connection.
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(TLS_HANDSHAKE_TIMEOUT)
                self.request.do_handshake()
                self.request.settimeout(None)
            except (OSError, ValueError) as exc:
                log.info("DICOM TLS handshake from %s failed: %s", self.client_address[0], exc)
                self.server.shutdown_request(self.request)
                return
        super().handle()

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # Swap in the subclass before the reactor starts (same state, two methods wrapped).
        sock = assoc.dul.socket
        sock.__class__ = _FeedSocket
        assert isinstance(sock, _FeedSocket)
        sock.max_pdu_bytes = max(MAX_PDU_RECEIVE_BYTES, 2 * self.ae.maximum_pdu_size)
        return assoc


class _Server(ThreadedAssociationServer):
    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None  # bound in __init__
        client, address = self.socket.accept()
        tune_socket(client)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


# --------------------------------------------------------------------------- state


@dataclass
class _Context:
    """What the handlers share: configuration, the database, and in-flight tracking so that
    stop() lets running requests finish."""

    settings: Settings
    session_factory: sessionmaker[Session]
    registry: TrustRegistry
    tls: bool
    lock: threading.Condition = field(default_factory=threading.Condition)
    busy: int = 0
    stopping: bool = False

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        with self.lock:
            if self.stopping:
                raise TemporaryFailureError()
            self.busy += 1
        try:
            yield
        finally:
            with self.lock:
                self.busy -= 1
                self.lock.notify_all()


def status_dataset(
    status: DimseStatus, comment: str | None = None, error_id: int | None = None
) -> Dataset:
    """The one place where an outcome becomes a DIMSE status (PS3.7 Annex C)."""
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        ds.ErrorComment = comment
    if error_id is not None:
        ds.ErrorID = error_id
    return ds


def _error_status(exc: MppsError) -> Dataset:
    return status_dataset(exc.status, exc.comment, exc.error_id)


# --------------------------------------------------------------------------- handlers


def _decide_trust(event: Any, ctx: _Context) -> tuple[TrustConfig | None, str]:
    calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
    trust = ctx.registry.by_ae_title(calling)
    if trust is None:
        return None, f"calling AE title {calling!r} belongs to no trust"
    address = str(event.assoc.requestor.address)
    if not trust.allows_address(address):
        return None, f"{calling!r} ({trust.ods_code}) may not call from {address}"
    if ctx.tls:
        names = set(peer_names(event.assoc.dul.socket.socket.getpeercert()))
        owners = {ctx.registry.by_tls_name(n) for n in names} - {None}
        if trust.tls_client_names and not names & set(trust.tls_client_names):
            return None, f"{calling!r}: TLS client name is not one of {trust.ods_code}'s"
        if any(owner is not trust for owner in owners):
            return None, f"{calling!r}: TLS client certificate belongs to another trust"
    return trust, calling


def handle_requested(event: Any, ctx: _Context) -> None:
    """A-ASSOCIATE-RQ received: accept only callers that a trust owns (EVT_REQUESTED may
    reject, per pynetdicom's association reactor)."""
    trust, why = _decide_trust(event, ctx)
    if trust is not None:
        event.assoc.locator_trust = trust
        return
    log.warning("DICOM association rejected: %s", why)
    MESSAGES.labels(feed=FEED, trust="unknown", outcome="rejected").inc()
    event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
    event.assoc.kill()


def handle_echo(event: Any, ctx: _Context) -> int:
    """C-ECHO: every modality's connection test (PS3.4 A.4)."""
    return int(DimseStatus.SUCCESS)


def _dataset(event: Any, parameter: str, keyword: str) -> Dataset:
    """Decode an attribute or modification list, refusing oversized or undecodable ones
    with a status (never an exception that would cost the association)."""
    raw = getattr(event.request, parameter)
    size = raw.getbuffer().nbytes if raw is not None else 0
    if size > MAX_ATTRIBUTE_LIST_BYTES:
        raise UndecodableDatasetError("Attribute list too large")
    try:
        ds: Dataset = getattr(event, keyword)
    except Exception:
        raise UndecodableDatasetError("Cannot decode the attribute list") from None
    return ds


def _answer(event: Any, ctx: _Context, work: Callable[[TrustConfig], StepOutcome]) -> Any:
    started = time.perf_counter()
    trust: TrustConfig = event.assoc.locator_trust
    try:
        with ctx.in_flight():
            outcome = work(trust)
        result, status = (
            ("duplicate" if outcome.resend else "accepted"),
            status_dataset(DimseStatus.SUCCESS),
        )
    except MppsError as exc:
        log.info(
            "MPPS %s from %s refused: 0x%04X %s",
            event.event.name,
            trust.ods_code,
            exc.status,
            exc.comment,
        )
        result, status = "error", _error_status(exc)
    except Exception:
        log.exception("MPPS %s from %s: internal error", event.event.name, trust.ods_code)
        result, status = "error", status_dataset(DimseStatus.PROCESSING_FAILURE, INTERNAL_ERROR)
    MESSAGES.labels(feed=FEED, trust=trust.ods_code, outcome=result).inc()
    ACK_LATENCY.labels(feed=FEED).observe(time.perf_counter() - started)
    return status, Dataset()


def handle_n_create(event: Any, ctx: _Context) -> Any:
    """N-CREATE (PS3.4 F.7.2.1). Without an Affected SOP Instance UID: 0x0106 (our policy;
    we do not assign instance UIDs, so the modality's N-SETs could not find the step)."""

    def work(trust: TrustConfig) -> StepOutcome:
        uid = event.request.AffectedSOPInstanceUID
        if not uid:
            raise InvalidAttributeValueError("Missing Affected SOP Instance UID (0000,1000)")
        ds = _dataset(event, "AttributeList", "attribute_list")
        attributes = parse_n_create(
            ds, trust=trust, accept_test_numbers=ctx.settings.accept_test_nhs_numbers
        )
        return create_step(
            ctx.session_factory,
            sop_instance_uid=str(uid),
            calling_ae=str(event.assoc.requestor.ae_title).strip(),
            trust_ods=trust.ods_code,
            attributes=attributes,
            received_at=datetime.now(UTC),
        )

    return _answer(event, ctx, work)


def handle_n_set(event: Any, ctx: _Context) -> Any:
    """N-SET (PS3.4 F.7.2.2)."""

    def work(trust: TrustConfig) -> StepOutcome:
        uid = str(event.request.RequestedSOPInstanceUID or "")
        ds = _dataset(event, "ModificationList", "modification_list")
        update = parse_n_set(ds, trust=trust)
        return set_step(
            ctx.session_factory,
            sop_instance_uid=uid,
            trust_ods=trust.ods_code,
            update_=update,
            received_at=datetime.now(UTC),
        )

    return _answer(event, ctx, work)


# --------------------------------------------------------------------------- listener


class DicomListener:
    """A running MPPS SCP: `ports == {"dicom": port}`; `stop()` ends it."""

    def __init__(self, ae: Any, server: Any, ctx: _Context, sweep: asyncio.Task[None]) -> None:
        self.ae, self.server, self.ctx, self.sweep = ae, server, ctx, sweep
        self.ports = {"dicom": int(server.server_address[1])}

    async def stop(self) -> None:
        """No new associations; running requests finish (new ones get a retry status);
        then the remaining associations are aborted."""
        self.sweep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sweep
        with self.ctx.lock:
            self.ctx.stopping = True
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self.server.shutdown()
        with self.ctx.lock:
            self.ctx.lock.wait_for(lambda: self.ctx.busy == 0, timeout=STOP_GRACE_SECONDS)
        for assoc in self.ae.active_associations:
            assoc.abort()


def _make_ae(settings: Settings) -> Any:
    ae = AE(ae_title=settings.dicom_ae)
    ae.add_supported_context(MPPS_SOP_CLASS)
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    ae.maximum_associations = settings.dicom_max_associations
    ae.maximum_pdu_size = settings.dicom_max_pdu
    ae.require_called_aet = False  # modalities are often configured with a stale title
    return ae


async def _sweep_forever(ctx: _Context, interval: float) -> None:
    older_than = timedelta(hours=ctx.settings.mpps_stale_after_hours)
    while True:
        try:
            await asyncio.to_thread(sweep_stale_steps, ctx.session_factory, older_than=older_than)
        except Exception:
            log.exception("MPPS stale sweep failed; retrying at the next interval")
        await asyncio.sleep(interval)


async def start_dicom(
    settings: Settings,
    *,
    session_factory: sessionmaker[Session],
    registry: TrustRegistry,
    sweep_interval: float | None = None,
) -> DicomListener:
    """Start the SCP at settings.dicom_ae on listener_host("dicom"):dicom_port (0: any), and
    the stale-step sweep every settings.mpps_stale_sweep_seconds (or `sweep_interval`)."""
    # Our own checks are stricter; pydicom's value warnings could print identifiers.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    ssl_context = server_ssl_context(
        settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_client_ca
    )
    ctx = _Context(settings, session_factory, registry, tls=ssl_context is not None)
    ae = _make_ae(settings)
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_C_ECHO, handle_echo, [ctx]),
        (evt.EVT_N_CREATE, handle_n_create, [ctx]),
        (evt.EVT_N_SET, handle_n_set, [ctx]),
    ]
    address = (settings.listener_host("dicom"), settings.dicom_port)
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=handlers,
        server_class=_Server,
        request_handler=_RequestHandler,
    )
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": SERVER_POLL_SECONDS},
        name="dicom-accept",
        daemon=True,
    )
    thread.start()
    ae._servers.append(server)
    interval = settings.mpps_stale_sweep_seconds if sweep_interval is None else sweep_interval
    sweep = asyncio.create_task(_sweep_forever(ctx, interval))
    listener = DicomListener(ae, server, ctx, sweep)
    log.info(
        "DICOM MPPS SCP %s on %s:%d%s",
        settings.dicom_ae,
        address[0],
        listener.ports["dicom"],
        " (TLS)" if ssl_context else "",
    )
    return listener
