"""The MPPS SCP over TLS: client certificates required, and a certificate's name bound to a
trust must match the trust of the calling AE title (interface.md, trusts file
`tls_client_names`)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from ingest.dicom_listener import DicomListener
from locator.config import Settings
from locator.trusts import TrustRegistry, example_trusts
from tests.dicom_helpers import running_listener

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    key: Key,
    issuer: tuple[x509.Name, Key] | None,
    *,
    ca: bool = False,
    san: x509.GeneralName | None = None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    issuer_name, issuer_key = issuer or (_name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: Key) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A CA, the locator's server certificate and three modality certificates."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Test CA", ca_key, None, ca=True)
    files = {"ca": _write(folder / "ca", ca, ca_key)}
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        "localhost",
        server_key,
        (ca.subject, ca_key),
        san=x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    )
    files["server"] = _write(folder / "server", server, server_key)
    for cn in ("rzz01-modalities", "rzz02-modalities", "unbound-modality"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[cn] = _write(folder / cn, _cert(cn, key, (ca.subject, ca_key)), key)
    return files


@pytest.fixture
def tls_listener(
    pki: dict[str, tuple[Path, Path]], db_url: str, session_factory: sessionmaker[Session]
) -> Iterator[DicomListener]:
    trusts = example_trusts()
    bound = {"RZZ01": ("rzz01-modalities",), "RZZ02": ("rzz02-modalities",)}
    registry = TrustRegistry(replace(t, tls_client_names=bound.get(t.ods_code, ())) for t in trusts)
    settings = Settings(
        database_url=db_url,
        dicom_port=0,
        dicom_host="127.0.0.1",
        dicom_tls_cert=pki["server"][0],
        dicom_tls_key=pki["server"][1],
        dicom_tls_client_ca=pki["ca"][0],
    )
    with running_listener(
        settings, session_factory=session_factory, registry=registry, sweep_interval=3600
    ) as running:
        yield running


def _associate(
    port: int, ae_title: str, pki: dict[str, tuple[Path, Path]], client: str | None
) -> bool:
    """True when a TLS association from `ae_title` with `client`'s certificate is accepted
    and answers C-ECHO."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"][0]))
    if client is not None:
        context.load_cert_chain(str(pki[client][0]), str(pki[client][1]))
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="LOCATOR", tls_args=(context, "127.0.0.1"))
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


@pytest.mark.parametrize(
    ("ae_title", "client", "accepted"),
    [
        ("RZZ01CT1", "rzz01-modalities", True),
        ("RZZ01CT1", "rzz02-modalities", False),  # another trust's certificate
        ("RZZ01CT1", "unbound-modality", False),  # RZZ01 binds its names
        ("RZZ03US1", "unbound-modality", True),  # RZZ03 binds none: the CA decides
        ("RZZ03US1", "rzz02-modalities", False),  # a certificate that speaks for RZZ02
        ("RZZ01CT1", None, False),  # no client certificate
    ],
)
def test_tls_client_names_bind_the_trust(
    tls_listener: DicomListener,
    pki: dict[str, tuple[Path, Path]],
    ae_title: str,
    client: str | None,
    accepted: bool,
) -> None:
    assert _associate(tls_listener.ports["dicom"], ae_title, pki, client) is accepted


def test_a_silent_tls_client_does_not_block_others(
    tls_listener: DicomListener, pki: dict[str, tuple[Path, Path]]
) -> None:
    port = tls_listener.ports["dicom"]
    with socket.create_connection(("127.0.0.1", port)):  # connects, never says hello
        assert _associate(port, "RZZ01CT1", pki, "rzz01-modalities")
