"""Test helpers for subscriptions: a real HTTP receiver on a free port (http.server in a
thread; it records every request and answers what the test tells it), the whole service in
this process (the listeners `serve` starts, on their own event-loop thread), and waiting on
what the receiver saw (readiness, never sleep)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
FHIR_JSON = "application/fhir+json"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def notification_id(self) -> str | None:
        return self.headers.get("x-locator-notification-id")

    @property
    def is_handshake(self) -> bool:
        return self.headers.get("x-locator-event") == "handshake"


@dataclass
class Receiver:
    """A care record's endpoint. `answer(request) -> status` decides each reply (default
    200); `hold` (an Event) makes notifications wait until it is set."""

    server: http.server.ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    answer: Callable[[Received], int] = lambda _r: 200
    hold: threading.Event | None = None
    arrived: threading.Condition = field(default_factory=threading.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/fhir-hook"

    def record(self, request: Received) -> int:
        with self.arrived:
            self.received.append(request)
            self.arrived.notify_all()
        if self.hold is not None and not request.is_handshake:
            self.hold.wait(timeout=60)
        return self.answer(request)

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 20
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the receiver did not see it: {self.summary()}")
                self.arrived.wait(left)
            return list(self.received)

    def notifications(self) -> list[Received]:
        return [r for r in self.received if not r.is_handshake]

    def summary(self) -> list[tuple[str, str, str | None]]:
        return [(r.method, r.path, r.notification_id) for r in self.received]


@contextmanager
def receiver() -> Iterator[Receiver]:
    box: dict[str, Receiver] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            request = Received(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
            )
            status = box["r"].record(request)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_DELETE = _any

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    box["r"] = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box["r"]
    finally:
        if box["r"].hold is not None:
            box["r"].hold.set()
        server.shutdown()
        server.server_close()


def subscription(
    nhs: str, endpoint: str, *, payload: bool = True, headers: tuple[str, ...] = ()
) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint}
    if payload:
        channel["payload"] = FHIR_JSON
    if headers:
        channel["header"] = list(headers)
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "care record",
        "criteria": f"ImagingStudy?patient.identifier={NHS_SYSTEM}|{nhs}",
        "channel": channel,
    }


def subscribe(base: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(
        f"{base}/fhir/Subscription",
        content=json.dumps(body),
        headers={"Content-Type": FHIR_JSON, **kwargs.pop("headers", {})},
        timeout=20,
        **kwargs,
    )


def wait_status(base: str, sub_id: str, status: str, timeout: float = 20, **kw: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{base}/fhir/Subscription/{sub_id}", timeout=10, **kw).json()
        if body.get("status") == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"subscription stayed {body.get('status')}: {body}")
        time.sleep(0.05)


@dataclass
class Stack:
    """The service's listeners (API, MLLP, DICOM, deliverer) in this process."""

    ports: dict[str, int]
    factory: Any

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"


@contextmanager
def stack(db_url: str, **overrides: Any) -> Iterator[Stack]:
    from locator.cli import prepare_registry, start_listeners
    from locator.config import Settings
    from locator.store.db import create_db_engine, make_session_factory

    values: dict[str, Any] = {
        "database_url": db_url,
        "http_port": 0,
        "mllp_port": 0,
        "dicom_port": 0,
        "cursor_secret": "test",
        "access_log": False,
        "subscription_allowed_networks": "127.0.0.0/8",
        "subscription_poll_seconds": 0.05,
        "subscription_retry_base_seconds": 0.2,
        "subscription_lease_seconds": 3,
        "subscription_timeout_seconds": 5,
    }
    settings = Settings(_env_file=None, **{**values, **overrides})  # type: ignore[call-arg]
    engine = create_db_engine(db_url)
    factory = make_session_factory(engine)
    registry = prepare_registry(settings.model_copy(update={"demo_trusts": True}), factory)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="stack-loop", daemon=True)
    thread.start()
    listeners = asyncio.run_coroutine_threadsafe(
        start_listeners(settings, engine, factory, registry), loop
    ).result(timeout=60)
    try:
        ports = {k: v for li in listeners for k, v in li.ports.items()}
        yield Stack(ports, factory)
    finally:
        for listener in reversed(listeners):
            asyncio.run_coroutine_threadsafe(listener.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        engine.dispose()


def oru(nhs: str, n: int, *, facility: str = "RZZ01", status: str = "F") -> str:
    """A minimal valid ORU^R01 (v2.4) for `nhs`: accession ACC<n>."""
    return (
        "\r".join(
            [
                f"MSH|^~\\&|CRIS|{facility}|LOCATOR|NHSE|20240301101500||ORU^R01^ORU_R01|"
                f"SUB{n:06d}|P|2.4",
                f"PID|1||{nhs}^^^NHS^NH||TEST^PATIENT",
                f"OBR|1||ACC{n:06d}^CRIS|CHEAD^CT Head^NICIP|||20240301093000"
                f"|||||||||||ACC{n:06d}||||20240301101400||CT|{status}",
                "OBX|1|ST|CHEAD^CT Head^NICIP||seen||||||F",
            ]
        )
        + "\r"
    )


def outbox_rows(factory: Any) -> list[Any]:
    from sqlalchemy import select

    from locator.store.models import subscription_outbox_table

    with factory() as session:
        return list(session.execute(select(subscription_outbox_table)))
