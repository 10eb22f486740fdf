"""Open mode only on loopback: `serve` refuses to expose an API without tokens, or plain
feeds, beyond this machine (interface.md, Security)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from locator.cli import StartupError, check_exposure
from locator.config import Settings

ALL = {"api", "mllp", "dicom"}


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        ({}, False),  # loopback, open mode
        ({"host": "::1"}, False),
        ({"http_host": "0.0.0.0"}, True),  # open API beyond loopback
        ({"http_host": "10.1.2.3", "jwks": "/etc/jwks.json"}, True),  # no iss/aud
        ({"http_host": "10.1.2.3", "jwks": "/etc/jwks.json", "jwt_issuer": "https://i"}, True),
        (
            {
                "http_host": "10.1.2.3",
                "jwks": "/etc/jwks.json",
                "jwt_issuer": "https://i",
                "jwt_audience": "https://a",
            },
            False,
        ),
        ({"mllp_host": "0.0.0.0"}, True),  # plain MLLP beyond loopback
        ({"dicom_host": "0.0.0.0"}, True),  # plain DICOM beyond loopback
        ({"mllp_host": "0.0.0.0", "mllp_tls_cert": Path("/etc/c.pem")}, False),
        ({"mllp_host": "0.0.0.0", "dicom_host": "0.0.0.0", "allow_plain_feeds": True}, False),
    ],
)
def test_check_exposure(overrides: dict[str, Any], refused: bool) -> None:
    if refused:
        with pytest.raises(StartupError):
            check_exposure(settings(**overrides), ALL)
    else:
        check_exposure(settings(**overrides), ALL)


def test_serve_refuses_an_open_api_beyond_loopback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locator",
            "serve",
            "--db",
            f"sqlite:///{tmp_path / 'l.db'}",
            "--http-host",
            "0.0.0.0",
            "--http-port",
            "0",
            "--only",
            "api",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "without --jwks" in result.stderr
    assert not (tmp_path / "l.db").exists()  # refused before touching anything
