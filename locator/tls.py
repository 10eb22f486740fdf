"""TLS for the feed listeners: server contexts and the client names a certificate carries."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def server_ssl_context(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> ssl.SSLContext | None:
    """A server context, or None when no certificate is configured. With a client CA,
    client certificates are required (interface.md: LOCATOR_*_TLS_CLIENT_CA)."""
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert), keyfile=str(key) if key else None)
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_names(peercert: dict[str, Any] | None) -> list[str]:
    """Subject CN and DNS subjectAltNames of a verified client certificate."""
    if not peercert:
        return []
    names = [
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    names += [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    return names
