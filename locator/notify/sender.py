"""The HTTP requests of a rest-hook subscription (FHIR R4 Subscription, channel type
rest-hook; the shapes HAPI FHIR sends):

- handshake: `POST {endpoint}` with no body, `X-Locator-Event: handshake`;
- a notification without payload: `POST {endpoint}` with no body;
- with payload `application/fhir+json`: `PUT {endpoint}/ImagingStudy/{id}` with the study as
  it is now, or `DELETE {endpoint}/ImagingStudy/{id}` when the study no longer belongs to the
  subscription's patient (it moved to another patient, was quarantined, withdrawn or merged
  into another study).

Every request carries the subscription's channel.header lines, `X-Locator-Subscription-Id`,
and (notifications) `X-Locator-Notification-Id`, the same on every attempt, so a receiver can
drop repeats. The connection goes to the address the SSRF check allowed (addresses.py), with
the endpoint's name as Host and TLS server name; redirects are not followed (a 3xx is a
failure); each request has a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from locator.notify.addresses import EndpointRefusedError, IpNetwork, resolve

EVENT_HEADER = "X-Locator-Event"
NOTIFICATION_ID_HEADER = "X-Locator-Notification-Id"
SUBSCRIPTION_ID_HEADER = "X-Locator-Subscription-Id"
FHIR_JSON = "application/fhir+json"
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "expect",
        "keep-alive",
        "proxy-connection",
    }
)
GATEWAY_ERROR = 502  # audited outcome when no answer came (connection refused, reset)
TIMEOUT = 504  # audited outcome when the receiver did not answer in time
REFUSED = 403  # audited outcome when the endpoint failed the address check at delivery


@dataclass(frozen=True, slots=True)
class Outcome:
    """What came of one request: the receiver's status (or ours, above), and why it failed."""

    status: int
    reason: str | None
    address: str | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def is_literal(endpoint: str) -> bool:
    """An endpoint whose host is an IP address (resolving it needs no DNS)."""
    try:
        ipaddress.ip_address(urllib.parse.urlsplit(endpoint).hostname or "")
    except ValueError:
        return False
    return True


def header_pairs(lines: Sequence[str]) -> list[tuple[str, str]]:
    """channel.header lines (`Name: value`) as pairs (validated when the subscription was
    stored)."""
    pairs = []
    for line in lines:
        name, _, value = line.partition(":")
        pairs.append((name.strip(), value.strip()))
    return pairs


async def send(
    client: httpx.AsyncClient,
    *,
    method: str,
    endpoint: str,
    path: str = "",
    headers: Sequence[tuple[str, str]],
    body: dict[str, Any] | None = None,
    networks: Sequence[IpNetwork],
    open_mode: bool,
) -> Outcome:
    """One request to a subscription's endpoint, to the address just checked."""
    try:
        if is_literal(endpoint):  # nothing to look up: no thread hop
            target = resolve(endpoint, networks=networks, open_mode=open_mode)
        else:
            target = await asyncio.to_thread(
                resolve, endpoint, networks=networks, open_mode=open_mode
            )
    except EndpointRefusedError as exc:
        return Outcome(REFUSED, str(exc), None)
    parts = urllib.parse.urlsplit(endpoint)
    address = str(target.address)
    literal = f"[{address}]" if target.address.version == 6 else address
    url = parts._replace(
        netloc=f"{literal}:{target.port}", path=parts.path.rstrip("/") + path
    ).geturl()
    host = parts.netloc.rpartition("@")[2]
    all_headers = [*headers, ("Host", host)]
    content = b""
    if body is not None:
        content = orjson.dumps(body, option=orjson.OPT_UTC_Z)
        all_headers.append(("Content-Type", FHIR_JSON))
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        response = await client.request(
            method, url, headers=all_headers, content=content, extensions=extensions
        )
    except httpx.TimeoutException:
        return Outcome(TIMEOUT, "the endpoint did not answer in time", address)
    except httpx.HTTPError as exc:
        return Outcome(
            GATEWAY_ERROR, f"no answer from the endpoint ({type(exc).__name__})", address
        )
    await response.aclose()
    reason = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return Outcome(response.status_code, reason, address)


def make_client(*, timeout: float, ca_file: str | None, connections: int) -> httpx.AsyncClient:
    """One client per deliverer: no redirects, a timeout per request, bounded connections,
    no proxy from the environment (a proxy would defeat the address check)."""
    return httpx.AsyncClient(
        follow_redirects=False,
        timeout=httpx.Timeout(timeout),
        verify=ssl.create_default_context(cafile=ca_file) if ca_file else True,
        trust_env=False,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )
