"""The token service's public keys: a JWKS from a file or an HTTPS URL, each key bound to
one algorithm.

Only keys a JWKS publishes as JWK are ever used to verify a token (RFC 7517), and each is
bound to exactly one algorithm when it is loaded: an RSA key to RS256 only, an EC P-256 key
to ES256 only (RFC 7518 §3.3, §3.4). A key with another type, curve, algorithm or `use`, or
with private parameters, is skipped. A token can therefore never choose how its key is
interpreted (no `none`, no HMAC, no public-key-as-HMAC-secret confusion, no PEM/DER/OpenSSH
key encodings).

A URL is fetched with httpx (HTTPS; plain HTTP only to loopback), cached for
`jwks_cache_seconds`, and refetched when a token names an unknown `kid`, at most once per
`jwks_refresh_min_seconds` so unknown kids cannot turn the locator into a request amplifier.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from jose.backends.cryptography_backend import CryptographyECKey, CryptographyRSAKey

from locator.config import Settings, is_loopback

log = logging.getLogger(__name__)

RS256 = "RS256"
ES256 = "ES256"
ALLOWED_ALGORITHMS = (RS256, ES256)
KTY_ALGORITHM = {"RSA": RS256, "EC": ES256}
EC_CURVE_FOR = {ES256: "P-256"}
PRIVATE_PARAMS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
SIGNATURE_USE = "sig"
FETCH_TIMEOUT_SECONDS = 5.0
MAX_JWKS_BYTES = 256 * 1024


class JwksError(Exception):
    """The JWKS cannot be read (missing file, unreachable URL, not a JWK Set)."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key and the one algorithm it may verify."""

    kid: str | None
    alg: str
    key: Any  # a python-jose cryptography-backend Key, constructed for `alg`


def bind_key(jwk: Mapping[str, Any]) -> VerificationKey | None:
    """The key bound to its algorithm, or None when the JWK is not one we accept."""
    kty = jwk.get("kty")
    alg = KTY_ALGORITHM.get(kty) if isinstance(kty, str) else None
    if alg is None:
        return None
    if jwk.get("alg", alg) != alg or jwk.get("use", SIGNATURE_USE) != SIGNATURE_USE:
        return None
    if PRIVATE_PARAMS & set(jwk):
        return None
    if alg in EC_CURVE_FOR and jwk.get("crv") != EC_CURVE_FOR[alg]:
        return None
    key_ops = jwk.get("key_ops")
    if key_ops is not None and "verify" not in key_ops:
        return None
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        key = (
            CryptographyRSAKey(dict(jwk), alg)
            if alg == RS256
            else CryptographyECKey(dict(jwk), alg)
        )
    except Exception:  # a malformed JWK: skipped, like any other key we cannot use
        return None
    return VerificationKey(kid=kid, alg=alg, key=key)


def parse_jwks(document: bytes) -> list[VerificationKey]:
    """The usable keys of a JWK Set document (RFC 7517 §5)."""
    try:
        data = json.loads(document)
    except ValueError as exc:
        raise JwksError("the JWKS is not JSON") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("the JWKS has no `keys` list")
    keys = [k for k in (bind_key(j) for j in data["keys"] if isinstance(j, dict)) if k]
    skipped = len(data["keys"]) - len(keys)
    if skipped:
        log.warning("JWKS: skipped %d key(s) that are not RS256 RSA or ES256 P-256", skipped)
    return keys


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def check_url(url: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" and not is_loopback(parsed.hostname or ""):
        raise JwksError("a JWKS URL must be HTTPS (plain HTTP only to loopback)")


def url_fetcher(url: str, settings: Settings) -> Callable[[], bytes]:
    check_url(url)
    verify: ssl.SSLContext | bool = True
    if settings.jwks_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.jwks_ca_file))

    def fetch() -> bytes:
        try:
            with httpx.Client(verify=verify, timeout=FETCH_TIMEOUT_SECONDS) as client:
                response = client.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise JwksError(f"cannot fetch the JWKS: {type(exc).__name__}") from exc
        if response.status_code != httpx.codes.OK:
            raise JwksError(f"cannot fetch the JWKS: HTTP {response.status_code}")
        if len(response.content) > MAX_JWKS_BYTES:
            raise JwksError("the JWKS is too large")
        return response.content

    return fetch


def file_fetcher(path: Path) -> Callable[[], bytes]:
    def fetch() -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise JwksError(f"cannot read the JWKS file {path}") from exc

    return fetch


class JwksCache:
    """The current keys by kid; refetched when stale or on an unknown kid (rate limited)."""

    def __init__(
        self,
        fetch: Callable[[], bytes],
        *,
        max_age: float,
        min_refresh_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._max_age = max_age
        self._min_interval = min_refresh_interval
        self._clock = clock
        self._keys: list[VerificationKey] = []
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = threading.Lock()
        self.fetch_count = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> JwksCache:
        source = settings.jwks
        if not source:
            raise JwksError("no JWKS configured")
        fetch = url_fetcher(source, settings) if is_url(source) else file_fetcher(Path(source))
        return cls(
            fetch,
            max_age=settings.jwks_cache_seconds,
            min_refresh_interval=settings.jwks_refresh_min_seconds,
        )

    def find(self, kid: str | None, alg: str) -> VerificationKey | None:
        """The key for (kid, alg); refreshes the set once if the kid is unknown."""
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at > self._max_age
        if stale:
            self._refresh(force=self._attempted_at is None)
            if self._fetched_at is None:
                raise JwksError("the token service's keys are not available")
        key = self._match(kid, alg)
        if key is None and not stale:
            self._refresh(force=False)
            key = self._match(kid, alg)
        return key

    def _match(self, kid: str | None, alg: str) -> VerificationKey | None:
        if kid is None:
            # Without a kid, only an unambiguous set (one key for this algorithm) is usable.
            candidates = [k for k in self._keys if k.alg == alg]
            return candidates[0] if len(candidates) == 1 else None
        return next((k for k in self._keys if k.kid == kid and k.alg == alg), None)

    def _refresh(self, *, force: bool) -> None:
        with self._lock:
            now = self._clock()
            if (
                not force
                and self._attempted_at is not None
                and now - self._attempted_at < self._min_interval
            ):
                return
            self._attempted_at = now
            self.fetch_count += 1
            try:
                keys = parse_jwks(self._fetch())
            except JwksError:
                if not self._keys:
                    raise
                log.exception("JWKS refresh failed; keeping the %d cached key(s)", len(self._keys))
                return
            self._keys, self._fetched_at = keys, now
            log.info("JWKS loaded: %d usable key(s)", len(keys))
