"""MLLP over TLS with client certificates bound to trusts (python-hl7's asyncio client), and
two listeners on one database taking messages about the same studies at once."""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hl7.mllp import open_hl7_connection
from sqlalchemy.orm import Session, sessionmaker

from locator.config import Settings
from locator.trusts import TrustRegistry, example_trusts, store_trusts
from tests.hl7_messages.helpers import ListenerHarness, oru
from tests.security_helpers import client_context, issue, make_pki


async def _exchange(port: int, context: ssl.SSLContext, message: str) -> Any:
    reader, writer = await open_hl7_connection("127.0.0.1", port, ssl=context, encoding="utf-8")
    try:
        writer.writemessage(message)
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), 30)
    finally:
        writer.close()


def test_tls_client_names_bind_trusts(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    pki = make_pki(tmp_path)
    server_cert, server_key = issue(pki, "mllp.locator.test", server=True, sans=("127.0.0.1",))
    ris_cert, ris_key = issue(pki, "ris.rzz01.test", server=False)
    trusts = [
        replace(t, tls_client_names=("ris.rzz01.test",)) if t.ods_code == "RZZ01" else t
        for t in example_trusts()
    ]
    with session_factory() as session, session.begin():
        store_trusts(session, trusts=trusts)
    settings = Settings(
        mllp_port=0,
        mllp_tls_cert=server_cert,
        mllp_tls_key=server_key,
        mllp_tls_client_ca=pki.ca_file,
    )
    harness = ListenerHarness(settings, session_factory, TrustRegistry(trusts))
    try:
        context = client_context(pki.ca_file, ris_cert, ris_key)
        ack = asyncio.run(_exchange(harness.port, context, oru(control="T1")))
        assert (str(ack.segment("MSA")(1)), str(ack.segment("MSA")(2))) == ("AA", "T1")
        # the RZZ01 certificate cannot speak for RZZ02
        ack = asyncio.run(_exchange(harness.port, context, oru(control="T2", facility="RZZ02")))
        assert str(ack.segment("MSA")(1)) == "AR"
        assert str(ack.segment("ERR")(1)).startswith("MSH^1^4^204&")
        # a certificate without RZZ01's name cannot speak for RZZ01
        other_cert, other_key = issue(pki, "someone.else.test", server=False)
        other = client_context(pki.ca_file, other_cert, other_key)
        ack = asyncio.run(_exchange(harness.port, other, oru(control="T3")))
        assert str(ack.segment("MSA")(1)) == "AR"
        # no client certificate: the handshake fails (a client CA is configured)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            asyncio.run(_exchange(harness.port, client_context(pki.ca_file), oru(control="T4")))
        assert [r.accession for r in harness.studies()] == ["RZZ26000001"]
    finally:
        harness.stop()


def test_two_listeners_one_database(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    """Any listener may take any message: concurrent writers about the same studies all get
    AA (a conflict retries the unit) and the index holds each study once."""
    listeners = [
        ListenerHarness(Settings(mllp_port=0), session_factory, registry) for _ in range(2)
    ]
    codes: list[str] = []
    lock = threading.Lock()

    def send(worker: int) -> None:
        for i in range(6):
            harness = listeners[(worker + i) % 2]
            status = "PF"[i % 2]
            ack = harness.send(
                oru(control=f"W{worker}-{i}", accession=f"SAME-{i % 3}", status=status)
            )
            with lock:
                codes.append(ack.code)

    try:
        threads = [threading.Thread(target=send, args=(w,)) for w in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert codes == ["AA"] * 36
        rows = listeners[0].studies()
        assert sorted(r.accession for r in rows) == ["SAME-0", "SAME-1", "SAME-2"]
        assert {r.report_status for r in rows} == {"final"}
    finally:
        for harness in listeners:
            harness.stop()
