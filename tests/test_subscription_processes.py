"""Subscriptions across processes, on SQLite and PostgreSQL, with `locator serve` as
subprocesses and a real receiver: a notification committed but not delivered when the service
is killed (kill -9) arrives after the restart, with the same notification id; two API
processes over one database deliver each notification once."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from locator.store.db import create_db_engine, make_session_factory
from locator.store.models import audit_table
from tests.notify_helpers import oru, outbox_rows, receiver, subscribe, subscription, wait_status
from tests.security_helpers import mllp_exchange
from tests.serve_helpers import start_serve

PATIENT = "9990000018"
ENV = {
    "LOCATOR_SUBSCRIPTION_ALLOWED_NETWORKS": "127.0.0.0/8",
    "LOCATOR_SUBSCRIPTION_POLL_SECONDS": "0.05",
    "LOCATOR_SUBSCRIPTION_LEASE_SECONDS": "2",
    "LOCATOR_SUBSCRIPTION_RETRY_BASE_SECONDS": "0.2",
    "LOCATOR_ACCESS_LOG": "false",
}


def serve(db_url: str, cwd: Path) -> Any:
    return start_serve(["--db", db_url, "--demo-trusts"], cwd=cwd, env=ENV)


def test_a_notification_survives_kill_9_between_commit_and_delivery(
    db_url: str, tmp_path: Path
) -> None:
    factory = make_session_factory(create_db_engine(db_url))
    with receiver() as rcv:
        first = serve(db_url, tmp_path)
        try:
            base = first.base_url
            sub = subscribe(base, subscription(PATIENT, rcv.url)).json()
            wait_status(base, sub["id"], "active")
            rcv.hold = threading.Event()  # the receiver takes the request and never answers
            assert "MSA|AA" in mllp_exchange(first.ports["mllp"], oru(PATIENT, 1))
            held = rcv.wait_for(lambda rs: any(not r.is_handshake for r in rs))
            sent = next(r for r in held if not r.is_handshake)
            first.process.kill()  # kill -9: committed, sent, never recorded as delivered
            first.process.wait(timeout=20)
        finally:
            first.stop()
        assert [row.id for row in outbox_rows(factory)] == [int(sent.notification_id or 0)]
        rcv.hold.set()
        rcv.hold = None
        second = serve(db_url, tmp_path)
        try:
            got = rcv.wait_for(
                lambda rs: len([r for r in rs if r.notification_id == sent.notification_id]) == 2
            )
            again = [r for r in got if r.notification_id == sent.notification_id][-1]
            assert again.method == "PUT" and again.json["id"] == sent.json["id"]
            deadline = time.monotonic() + 20
            while outbox_rows(factory):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            assert second.stop() == 0
    with factory() as session:
        audited = list(
            session.execute(
                select(audit_table.c.outcome).where(
                    audit_table.c.request_id == f"notification-{sent.notification_id}"
                )
            ).scalars()
        )
    assert audited == [200]


def test_two_api_processes_deliver_each_notification_once(db_url: str, tmp_path: Path) -> None:
    count = 30
    with receiver() as rcv:
        one = serve(db_url, tmp_path)
        two = serve(db_url, tmp_path)
        try:
            sub = subscribe(one.base_url, subscription(PATIENT, rcv.url)).json()
            wait_status(two.base_url, sub["id"], "active")
            for n in range(count):
                port = (one if n % 2 else two).ports["mllp"]
                assert "MSA|AA" in mllp_exchange(port, oru(PATIENT, 100 + n))
            rcv.wait_for(lambda rs: len({r.notification_id for r in rs if r.body}) >= count)
        finally:
            assert one.stop() == 0
            assert two.stop() == 0
        notes = rcv.notifications()
        handshakes = [r for r in rcv.received if r.is_handshake]
    assert len(handshakes) == 1
    assert len(notes) == count
    assert len({r.notification_id for r in notes}) == count
    assert len({r.json["id"] for r in notes}) == count
