"""Feed identity, the hostile cases: a trust speaks only for itself (interface.md, Trusts file;
design.md, Identity). Runs the real listeners (ingest.hl7_listener.start_mllp,
ingest.dicom_listener.start_dicom) on port-0 sockets, against both databases, with an
independent MLLP client and pynetdicom as the modality; TLS with a throwaway CA."""

from __future__ import annotations

import itertools
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session, sessionmaker

from locator.config import Settings
from locator.trusts import TrustConfig, TrustRegistry, store_trusts
from tests.security_helpers import Pki, client_context, issue, make_pki, mllp_exchange, running

_ids = itertools.count(1)


def _trust(ods: str, **extra: Any) -> TrustConfig:
    return TrustConfig(
        ods_code=ods,
        name=f"Trust {ods}",
        viewer_url=f"https://pacs.{ods.lower()}.test/iid?studyUID={{study_uid}}",
        dicomweb_url=f"https://pacs.{ods.lower()}.test/dicom-web",
        accession_system=f"urn:locator:accession:{ods}",
        **extra,
    )


TRUSTS = [
    _trust(
        "RZZ01",
        hl7_sending_facilities=("RZZ01",),
        dicom_ae_titles=("RZZ01CT1",),
        mllp_port=0,
        tls_client_names=("ris.rzz01.test",),
    ),
    _trust(
        "RZZ02",
        hl7_sending_facilities=("RZZ02",),
        dicom_ae_titles=("RZZ02CT1",),
        tls_client_names=("ris.rzz02.test",),
        source_addresses=("127.0.0.0/8",),
    ),
    _trust(
        "RZZ03",
        hl7_sending_facilities=("RZZ03",),
        dicom_ae_titles=("RZZ03US1",),
        source_addresses=("10.99.0.0/16",),
    ),
]


def oru(facility: str, nhs: str = "9990000018") -> str:
    """A minimal valid ORU^R01 (v2.4) from `facility` with a fresh control id."""
    n = next(_ids)
    return (
        "\r".join(
            [
                f"MSH|^~\\&|CRIS|{facility}|LOCATOR|NHSE|20240301101500||ORU^R01^ORU_R01|SEC{n:06d}|P|2.4",
                f"PID|1||{nhs}^^^NHS^NH||TEST^PATIENT",
                f"OBR|1||ACC{n:06d}^CRIS|CHEAD^CT Head^NICIP|||20240301093000"
                f"|||||||||||ACC{n:06d}||||20240301101400||CT|F",
                "OBX|1|ST|CHEAD^CT Head^NICIP||seen||||||F",
            ]
        )
        + "\r"
    )


@dataclass
class Ack:
    code: str
    text: str

    @property
    def err_codes(self) -> str:
        return "\n".join(str(s) for s in hl7.parse(self.text) if str(s[0]) == "ERR")


def send(port: int, message: str, context: ssl.SSLContext | None = None) -> Ack:
    text = mllp_exchange(port, message, context=context)
    parsed = hl7.parse(text)
    return Ack(str(parsed.segment("MSA")[1]), text)


@pytest.fixture
def registry(session_factory: sessionmaker[Session]) -> TrustRegistry:
    with session_factory() as session, session.begin():
        store_trusts(session, trusts=TRUSTS)
    return TrustRegistry(TRUSTS)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"), "Feeds CA")
    issue(pki, "locator.test", server=True, sans=("localhost", "127.0.0.1"))
    return pki


@pytest.fixture(scope="module")
def certs(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    stranger_ca = make_pki(tmp_path_factory.mktemp("stranger"), "Stranger CA")
    return {
        "server": issue(pki, "locator.test", server=True, sans=("localhost", "127.0.0.1")),
        "rzz01": issue(pki, "ris.rzz01.test", server=False),
        "rzz02": issue(pki, "ris.rzz02.test", server=False),
        "nobody": issue(pki, "ris.nobody.test", server=False),
        "forged-rzz01": issue(stranger_ca, "ris.rzz01.test", server=False),
    }


def settings(**overrides: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        host="127.0.0.1",
        mllp_port=0,
        dicom_port=0,
        **overrides,
    )


def tls_settings(pki: Pki, certs: dict[str, tuple[Path, Path]], feed: str) -> Settings:
    cert, key = certs["server"]
    return settings(
        **{f"{feed}_tls_cert": cert, f"{feed}_tls_key": key, f"{feed}_tls_client_ca": pki.ca_file}
    )


@pytest.fixture
def mllp(session_factory: sessionmaker[Session], registry: TrustRegistry) -> Iterator[Any]:
    from ingest.hl7_listener import start_mllp

    async def start() -> Any:
        return await start_mllp(settings(), session_factory=session_factory, registry=registry)

    with running(start) as listener:
        yield listener


# --------------------------------------------------------------------------- MLLP, plain


def test_dedicated_port_refuses_another_trusts_facility(mllp: Any) -> None:
    dedicated = mllp.ports["mllp.RZZ01"]
    assert dedicated != mllp.ports["mllp"]
    foreign = send(dedicated, oru("RZZ02"))
    assert foreign.code == "AR" and "204" in foreign.err_codes
    assert send(dedicated, oru("RZZ01")).code == "AA"


def test_shared_port_enforces_source_addresses_and_known_facilities(mllp: Any) -> None:
    shared = mllp.ports["mllp"]
    assert send(shared, oru("RZZ02")).code == "AA"  # 127.0.0.1 is inside RZZ02's list
    outside = send(shared, oru("RZZ03"))  # RZZ03 speaks only from 10.99.0.0/16
    assert outside.code == "AR" and "204" in outside.err_codes
    unknown = send(shared, oru("RZZ99"))
    assert unknown.code == "AR" and "204" in unknown.err_codes


# --------------------------------------------------------------------------- MLLP, TLS


@pytest.fixture
def mllp_tls(
    session_factory: sessionmaker[Session],
    registry: TrustRegistry,
    pki: Pki,
    certs: dict[str, tuple[Path, Path]],
) -> Iterator[Any]:
    from ingest.hl7_listener import start_mllp

    async def start() -> Any:
        return await start_mllp(
            tls_settings(pki, certs, "mllp"), session_factory=session_factory, registry=registry
        )

    with running(start) as listener:
        yield listener


def test_mllp_tls_client_certificate_binds_the_trust(
    mllp_tls: Any, pki: Pki, certs: dict[str, tuple[Path, Path]]
) -> None:
    port = mllp_tls.ports["mllp"]
    rzz01 = client_context(pki.ca_file, *certs["rzz01"])
    assert send(port, oru("RZZ01"), rzz01).code == "AA"
    foreign = send(port, oru("RZZ02"), rzz01)  # RZZ01's certificate claiming RZZ02
    assert foreign.code == "AR" and "204" in foreign.err_codes
    assert send(port, oru("RZZ02"), client_context(pki.ca_file, *certs["rzz02"])).code == "AA"
    # a certificate that names no trust cannot speak for a trust that has TLS names
    nobody = send(port, oru("RZZ02"), client_context(pki.ca_file, *certs["nobody"]))
    assert nobody.code == "AR"


@pytest.mark.parametrize("client", [None, "forged-rzz01"], ids=["no certificate", "other CA"])
def test_mllp_tls_without_a_valid_client_certificate_is_refused(
    mllp_tls: Any, pki: Pki, certs: dict[str, tuple[Path, Path]], client: str | None
) -> None:
    context = client_context(pki.ca_file, *(certs[client] if client else (None, None)))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        send(mllp_tls.ports["mllp"], oru("RZZ01"), context)


def test_mllp_tls_refuses_plain_clients(mllp_tls: Any) -> None:
    with pytest.raises((ConnectionError, OSError)):
        send(mllp_tls.ports["mllp"], oru("RZZ01"))


# --------------------------------------------------------------------------- DICOM


def associate(port: int, calling: str, tls: tuple[ssl.SSLContext, str] | None = None) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="LOCATOR", tls_args=tls)


def echo_ok(assoc: Any) -> bool:
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status and status.Status == 0x0000)
    finally:
        assoc.release()


@pytest.fixture
def dicom(session_factory: sessionmaker[Session], registry: TrustRegistry) -> Iterator[Any]:
    from ingest.dicom_listener import start_dicom

    async def start() -> Any:
        return await start_dicom(settings(), session_factory=session_factory, registry=registry)

    with running(start) as listener:
        yield listener


def test_dicom_association_from_an_ae_title_of_no_trust_is_rejected(dicom: Any) -> None:
    port = dicom.ports["dicom"]
    stranger = associate(port, "NOBODY")
    assert stranger.is_rejected and not stranger.is_established
    assert echo_ok(associate(port, "RZZ01CT1"))


def test_dicom_source_addresses_are_enforced(dicom: Any) -> None:
    outside = associate(dicom.ports["dicom"], "RZZ03US1")  # RZZ03: 10.99.0.0/16 only
    assert outside.is_rejected
    assert echo_ok(associate(dicom.ports["dicom"], "RZZ02CT1"))  # RZZ02: 127.0.0.0/8


@pytest.fixture
def dicom_tls(
    session_factory: sessionmaker[Session],
    registry: TrustRegistry,
    pki: Pki,
    certs: dict[str, tuple[Path, Path]],
) -> Iterator[Any]:
    from ingest.dicom_listener import start_dicom

    async def start() -> Any:
        return await start_dicom(
            tls_settings(pki, certs, "dicom"), session_factory=session_factory, registry=registry
        )

    with running(start) as listener:
        yield listener


def test_dicom_tls_client_certificates(
    dicom_tls: Any, pki: Pki, certs: dict[str, tuple[Path, Path]]
) -> None:
    port = dicom_tls.ports["dicom"]

    def tls(name: str | None) -> tuple[ssl.SSLContext, str]:
        return client_context(pki.ca_file, *(certs[name] if name else (None, None))), "localhost"

    assert echo_ok(associate(port, "RZZ01CT1", tls("rzz01")))
    assert not associate(port, "RZZ01CT1", tls(None)).is_established  # no certificate
    assert not associate(port, "RZZ01CT1", tls("forged-rzz01")).is_established  # other CA
    wrong_trust = associate(port, "RZZ01CT1", tls("rzz02"))  # RZZ02's certificate as RZZ01
    assert wrong_trust.is_rejected
    assert not associate(port, "RZZ01CT1").is_established  # plain TCP to a TLS listener


def test_mllp_connections_per_source_are_limited(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    from ingest.hl7_listener import start_mllp

    async def start() -> Any:
        return await start_mllp(
            settings(mllp_max_connections_per_source=2),
            session_factory=session_factory,
            registry=registry,
        )

    with running(start) as listener:
        port = listener.ports["mllp"]
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            for sock in held:  # both admitted: each answers a message
                sock.sendall(b"\x0b" + oru("RZZ02").encode() + b"\x1c\x0d")
                assert b"MSA|AA" in sock.recv(65536)
            with pytest.raises((ConnectionError, OSError)):
                send(port, oru("RZZ02"))  # a third from the same address is closed unanswered
        finally:
            for sock in held:
                sock.close()
