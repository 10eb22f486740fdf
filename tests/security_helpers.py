"""Test helpers for security: signing keys and a JWKS, token minting (honest and forged),
a certificate authority with server and client certificates, an HTTPS server for a JWKS
URL, and the real app served by uvicorn on a port-0 socket."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jose import jwt

ISSUER = "https://auth.locator.test"
AUDIENCE = "https://locator.test/fhir"

# --------------------------------------------------------------------------- keys and tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def private_pem(self) -> bytes:
        return bytes(
            self.private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def jwk(self, **extra: Any) -> dict[str, Any]:
        public = self.private.public_key()
        if self.alg == "RS256":
            nums = public.public_numbers()
            base = {"kty": "RSA", "n": _int_b64(nums.n), "e": _int_b64(nums.e)}
        else:
            nums = public.public_numbers()
            base = {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url(nums.x.to_bytes(32, "big")),
                "y": b64url(nums.y.to_bytes(32, "big")),
            }
        return {**base, "kid": self.kid, "alg": self.alg, "use": "sig", **extra}


def rsa_key(kid: str = "rsa-1") -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str = "ec-1") -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def jwks_document(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.jwk() for k in keys]}


def claims(scope: str = "user/ImagingStudy.read", **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "dr.jones@rzz02",
        "client_id": "ehr-client-7",
        "organisation": "RZZ02",
        "role": "clinician",
        "scope": scope,
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "jti": f"jti-{now}-{id(overrides)}",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: SigningKey, payload: dict[str, Any], *, kid: str | None = "") -> str:
    headers = {"kid": key.kid if kid == "" else kid} if kid is not None else {}
    return str(jwt.encode(payload, key.private_pem.decode(), algorithm=key.alg, headers=headers))


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A JWS compact token from raw parts (for attacks libraries refuse to produce)."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(payload).encode())
    return f"{head}.{body}.{b64url(signature)}"


def forge_hs256_with_public_key(
    key: SigningKey, payload: dict[str, Any], *, secret: bytes | None = None
) -> str:
    """The algorithm-confusion attack: HMAC-SHA256 keyed with the server's public key
    (its PEM by default, or any other public encoding given as `secret`)."""
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(payload).encode())
    mac_key = key.public_pem if secret is None else secret
    signature = hmac.new(mac_key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def tamper(token: str, **changes: Any) -> str:
    """The same signature over a payload with `changes` applied."""
    head, body, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    return f"{head}.{b64url(json.dumps(payload).encode())}.{signature}"


# --------------------------------------------------------------------------- certificates


@dataclass
class Pki:
    """A throwaway CA and the certificates it issued, as PEM files under `folder`."""

    folder: Path
    ca_key: Any = None
    ca_cert: Any = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return self.files["ca"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_pki(folder: Path, name: str = "Test CA") -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    pki = Pki(folder, key, cert)
    pki.files["ca"] = _write(
        folder / f"{name.replace(' ', '_')}.pem", cert.public_bytes(serialization.Encoding.PEM)
    )
    return pki


def issue(pki: Pki, cn: str, *, server: bool, sans: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A certificate for `cn` signed by the CA: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = []
    for san in sans:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            alt.append(x509.DNSName(san))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(pki.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca_key.public_key()), False
        )
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(pki.ca_key, hashes.SHA256())
    stem = pki.folder / cn.replace(" ", "_")
    cert_file = _write(stem.with_suffix(".crt"), cert.public_bytes(serialization.Encoding.PEM))
    key_file = _write(
        stem.with_suffix(".key"),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    pki.files[cn] = cert_file
    return cert_file, key_file


def client_context(
    ca_file: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


# --------------------------------------------------------------------------- HTTPS JWKS


class JwksServer:
    """An HTTPS server on 127.0.0.1:0 serving `document` at /jwks.json; counts fetches."""

    def __init__(self, pki: Pki, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches = 0
        cert, key = issue(pki, "jwks.locator.test", server=True, sans=("127.0.0.1", "localhost"))
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- the app over HTTP


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a real port-0 socket; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --------------------------------------------------------------------------- the app and data


def build_app(db_url: str, **overrides: Any) -> tuple[Any, Any]:
    """The real app over a migrated database holding the example trusts: (app, factory)."""
    from locator.api.app import create_app
    from locator.config import Settings
    from locator.store.db import create_db_engine, make_session_factory
    from locator.trusts import TrustRegistry, example_trusts, load_registry, store_trusts

    engine = create_db_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        registry = load_registry(session)
        if not len(registry):
            store_trusts(session, trusts=example_trusts())
            registry = TrustRegistry(example_trusts())
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=db_url,
        cursor_secret="test-cursor-secret",
        **overrides,
    )
    app = create_app(settings, engine=engine, session_factory=factory, registry=registry)
    return app, factory


def seed_study(factory: Any, *, nhs: str, trust: str = "RZZ01", uid: str = "1.2.826.0.1.1") -> None:
    """One available study for `nhs` at `trust`, through the real index."""
    from locator.core.index import apply_notice
    from locator.core.nhs_number import NhsNumber
    from locator.core.notice import FeedKind, PatientRef, StudyNotice, StudyRef, StudyStatus
    from locator.store.db import transaction

    ref = StudyRef(
        study_uid=uid,
        accession=f"ACC{uid[-4:]}",
        modalities=("CT",),
        status=StudyStatus.AVAILABLE,
        started=dt.datetime(2024, 3, 1, 9, 30, tzinfo=dt.UTC),
    )
    notice = StudyNotice(
        trust,
        FeedKind.HL7,
        "hl7:CRIS",
        PatientRef(nhs_number=NhsNumber(nhs)),
        (ref,),
        dt.datetime.now(dt.UTC),
    )
    with transaction(factory) as session:
        apply_notice(session, notice=notice)


def audit_rows(factory: Any) -> list[Any]:
    from sqlalchemy import select

    from locator.store.models import AuditRecord

    with factory() as session:
        return list(session.execute(select(AuditRecord).order_by(AuditRecord.id)).scalars())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- feed listeners


@contextmanager
def running(start: Any) -> Iterator[Any]:
    """A listener started by the coroutine `start()` on its own event-loop thread (the tests
    and their clients are synchronous); stopped on exit."""
    import asyncio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="listener-loop", daemon=True)
    thread.start()
    try:
        listener = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
        try:
            yield listener
        finally:
            asyncio.run_coroutine_threadsafe(listener.stop(), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"


def mllp_exchange(
    port: int, message: str, *, context: ssl.SSLContext | None = None, timeout: float = 20
) -> str:
    """Send one MLLP-framed message (HL7 v2.5.1 Appendix C) and return the ACK text."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
    with sock:
        sock.sendall(VT + message.encode("utf-8") + FS + CR)
        buffer = b""
        while FS + CR not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed without an ACK")
            buffer += chunk
    return buffer[buffer.index(VT) + 1 : buffer.index(FS + CR)].decode("utf-8")
