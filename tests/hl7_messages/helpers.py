"""Test support for the HL7 feed: fixture messages, a message builder, a listener harness.

The listener runs on its own event loop in a thread; tests talk to it over real sockets with
python-hl7's MLLPClient (an independent client), and read the database directly.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
from hl7.client import MLLPClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from ingest.hl7_listener import MllpListener, start_mllp
from locator.config import Settings
from locator.trusts import TrustRegistry

FIXTURES = Path(__file__).parent
SB, EB, CR = b"\x0b", b"\x1c", b"\r"


def fixture_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.hl7"))


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def oru(
    *,
    control: str = "T-0001",
    facility: str = "RZZ01",
    app: str = "CRIS",
    version: str = "2.4",
    msg_type: str = "ORU^R01^ORU_R01",
    processing: str = "P",
    ack_modes: tuple[str, str] = ("", ""),
    pid2: str = "",
    pid3: str = "9990000018^^^NHS^NH~K1234567^^^RZZ^MR",
    accession: str = "RZZ26000001",
    obr3: str | None = None,
    obr7: str = "20240601093000",
    obr22: str = "20240601101400",
    modality: str = "CT",
    status: str = "F",
    body: tuple[str, ...] = ("OBX|1|TX|CHEAD^CT Head^NICIP||Normal study.||||||F",),
    sep: str = "\r",
) -> str:
    """A small ORU^R01 with every field a test may want to vary."""
    filler = accession if obr3 is None else obr3
    segments = [
        f"MSH|^~\\&|{app}|{facility}|FINDIT|NHSE|20240601101500||{msg_type}|{control}|"
        f"{processing}|{version}|||{ack_modes[0]}|{ack_modes[1]}|GBR",
        f"PID|1|{pid2}|{pid3}||TESTPATIENT^ALICE||19700101|F",
        f"ORC|RE|OC-1|{filler}||CM",
        f"OBR|1|OC-1|{filler}|CHEAD^CT Head^NICIP|||{obr7}|||||||||||{accession}|RP1|||{obr22}"
        f"||{modality}|{status}",
        *body,
    ]
    return sep.join(segments)


@dataclass(frozen=True)
class Ack:
    raw: bytes
    message: Any  # hl7.Message

    @property
    def code(self) -> str:
        return str(self.message.segment("MSA")(1))

    @property
    def control_id(self) -> str:
        return str(self.message.segment("MSA")(2))

    @property
    def text(self) -> str:
        return str(self.message.segment("MSA")(3))

    def err(self) -> Any:
        return self.message.segment("ERR")

    @property
    def version(self) -> str:
        return str(self.message.segment("MSH")(12))


def parse_acks(data: bytes) -> list[Ack]:
    """Every framed ACK in `data`, parsed by python-hl7."""
    acks = []
    for chunk in data.split(EB + CR):
        if chunk.strip():
            assert chunk.startswith(SB), chunk
            body = chunk[1:]
            acks.append(Ack(body, hl7.parse(body.decode("utf-8"))))
    return acks


class ListenerHarness:
    """`start_mllp` on a private event loop thread, as `locator serve` runs it."""

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], registry: TrustRegistry
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listener: MllpListener = self.run(
            start_mllp(settings, session_factory=factory, registry=registry)
        )
        self.factory = factory

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return self.listener.ports["mllp"]

    def send(self, message: str | bytes, port: int | None = None) -> Ack:
        with MLLPClient("127.0.0.1", port or self.port) as client:
            client.socket.settimeout(30)
            data = client.send_message(message)
            while not data.endswith(EB + CR):
                more = client.socket.recv(65536)
                if not more:
                    break
                data += more
        acks = parse_acks(data)
        assert len(acks) == 1, data
        return acks[0]

    def stop(self) -> None:
        self.run(self.listener.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.factory() as session:
            return list(session.execute(text(sql), params).all())

    def studies(self) -> list[Any]:
        return self.rows(
            "SELECT trust_ods, study_uid, accession, nhs_number, local_id, "
            "patient_state, status, report_status, modalities, started "
            "FROM study WHERE merged_into IS NULL ORDER BY accession, study_uid"
        )

    def journal(self) -> list[Any]:
        return self.rows(
            "SELECT id, trust_ods, sender_app, sender_facility, control_id, "
            "outcome, reason, sha256, size, truncated, message, ack "
            "FROM journal ORDER BY id"
        )


def read_until_closed(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


def iter_frames(messages: list[bytes]) -> Iterator[bytes]:
    for message in messages:
        yield SB + message + EB + CR
