"""Settings: every knob of the service, from flags and `LOCATOR_` environment variables.

One Settings object is built at the edge (the CLI) and passed in explicitly; nothing reads
the environment at import time.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./locator.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOCATOR_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    trusts_file: Path | None = None
    demo_trusts: bool = False

    host: str = "127.0.0.1"
    http_host: str | None = None
    mllp_host: str | None = None
    dicom_host: str | None = None
    http_port: int = 8080
    mllp_port: int = 2575
    dicom_port: int = 11112
    dicom_ae: str = "LOCATOR"
    only: Literal["api", "mllp", "dicom"] | None = None

    accept_test_nhs_numbers: bool = True

    # Security (issue: security and audit)
    jwks: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: int = 30
    oidc_client_id: str | None = None
    cursor_secret: str | None = None
    cursor_ttl_seconds: int = 3600
    patient_lookups_per_minute: int = 600
    jwks_ca_file: Path | None = None  # CA bundle for an HTTPS JWKS URL (default: system CAs)
    jwks_cache_seconds: float = 3600.0
    jwks_refresh_min_seconds: float = 30.0  # rate limit on refetching for an unknown kid
    token_endpoint: str | None = None  # advertised in smart-configuration and metadata
    allow_plain_feeds: bool = False

    # MLLP feed
    mllp_max_message_bytes: int = 1024 * 1024
    mllp_idle_timeout_seconds: float = 3600.0
    mllp_max_connections: int = 256
    mllp_max_connections_per_source: int = 32
    mllp_commit_retry_seconds: float = 30.0
    mllp_tls_cert: Path | None = None
    mllp_tls_key: Path | None = None
    mllp_tls_client_ca: Path | None = None
    journal_retention_days: int = 90

    # DICOM feed
    dicom_max_associations: int = 32
    dicom_max_pdu: int = 65536
    dicom_tls_cert: Path | None = None
    dicom_tls_key: Path | None = None
    dicom_tls_client_ca: Path | None = None
    mpps_stale_after_hours: float = 24.0
    mpps_stale_sweep_seconds: float = 60.0

    # Subscriptions (FHIR R4 rest-hook; docs/subscriptions.md)
    subscription_allowed_networks: str = ""  # CIDRs an endpoint may resolve to beyond global
    subscription_retry_hours: float = Field(default=24.0, gt=0)
    subscription_retry_base_seconds: float = Field(default=5.0, gt=0)  # first retry; doubles
    subscription_timeout_seconds: float = Field(default=10.0, gt=0)
    subscription_poll_seconds: float = Field(default=0.05, gt=0)
    subscription_lease_seconds: float = Field(default=15.0, gt=0)
    subscription_concurrency: int = Field(default=32, ge=1)
    subscription_ca_file: Path | None = None  # CA bundle for https endpoints (default: system)

    log_level: str = "INFO"
    access_log: bool = True
    db_pool_size: int = Field(default=10, ge=1)

    def listener_host(self, role: Literal["http", "mllp", "dicom"]) -> str:
        specific = {"http": self.http_host, "mllp": self.mllp_host, "dicom": self.dicom_host}[role]
        return specific or self.host

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def is_loopback(host: str) -> bool:
    """True for hosts that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
