"""Durability: `locator serve --only mllp` killed with SIGKILL while eight connections send.
After a restart every message that was acknowledged is in the index, and resending the
unacknowledged ones recovers them. SQLite (a file) and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hl7.client import MLLPClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from locator.trusts import TrustRegistry
from tests.hl7_messages.helpers import CR, EB, oru, parse_acks

CONNECTIONS = 8
ACKS_BEFORE_KILL = 40


@contextmanager
def serve(db_url: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "locator",
            "serve",
            "--only",
            "mllp",
            "--db",
            db_url,
            "--mllp-port",
            "0",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = None
        for line in proc.stdout:  # readiness: the printed port line
            if line.startswith("mllp="):
                port = int(line.strip().split("=", 1)[1])
                break
        assert port, "serve printed no mllp= line"
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _send(port: int, message: str) -> str | None:
    """The ACK code, or None when the connection died first."""
    try:
        with MLLPClient("127.0.0.1", port) as client:
            client.socket.settimeout(30)
            data = client.send_message(message)
            while data and not data.endswith(EB + CR):
                more = client.socket.recv(65536)
                if not more:
                    return None
                data += more
    except OSError:
        return None
    return parse_acks(data)[0].code if data else None


def _sender(
    port: int,
    worker: int,
    acked: list[str],
    unacked: list[str],
    enough: threading.Event,
    lock: threading.Lock,
) -> None:
    try:
        client = MLLPClient("127.0.0.1", port)
        client.socket.settimeout(30)
    except OSError:
        return
    with client:
        for i in range(10_000):
            key = f"K{worker}-{i}"
            try:
                data = client.send_message(oru(control=key, accession=key))
                while data and not data.endswith(EB + CR):
                    data += client.socket.recv(65536)
            except OSError:
                data = b""
            if not data:
                unacked.append(key)
                return
            assert parse_acks(data)[0].code == "AA"
            with lock:
                acked.append(key)
                if len(acked) >= ACKS_BEFORE_KILL:
                    enough.set()


def _indexed(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.execute(text("SELECT accession FROM study")).scalars())


def test_sigkill_loses_no_acknowledged_message(
    db_url: str, registry: TrustRegistry, session_factory: sessionmaker[Session]
) -> None:
    acked: list[str] = []
    unacked: list[str] = []
    enough, lock = threading.Event(), threading.Lock()
    with serve(db_url) as (proc, port):
        threads = [
            threading.Thread(target=_sender, args=(port, w, acked, unacked, enough, lock))
            for w in range(CONNECTIONS)
        ]
        for thread in threads:
            thread.start()
        assert enough.wait(120), "the listener acknowledged too few messages"
        os.kill(proc.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(60)
    assert len(acked) >= ACKS_BEFORE_KILL
    assert unacked, "no message was in flight at the kill"
    with serve(db_url) as (_proc, port):
        indexed = _indexed(session_factory)
        assert set(acked) <= indexed  # every AA'd message survived the kill
        for key in unacked:  # the sender resends what it never saw acknowledged
            assert _send(port, oru(control=key, accession=key)) == "AA"
        assert set(acked) | set(unacked) <= _indexed(session_factory)
