"""Where a subscription may point: the server-side request forgery rules.

An endpoint is an absolute `https` URL (plain `http` only to a loopback host while the API
runs in open mode, for local testing). Its host is resolved, and every address it resolves
to must be a global one unless `LOCATOR_SUBSCRIPTION_ALLOWED_NETWORKS` lists it: loopback,
link-local (cloud metadata services live there), private, shared, reserved and multicast
addresses are refused. The check is made when a subscription is created or updated, and
again at each delivery, whose connection then goes to the address that was checked (a name
that resolves elsewhere a second time cannot turn a delivery inwards).
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from locator.config import is_loopback

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EndpointRefusedError(ValueError):
    """An endpoint the locator will not send to; the message says why (no secrets in it)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A checked endpoint: its URL's parts and the address to connect to."""

    scheme: str
    host: str
    port: int
    address: IpAddress


def parse_networks(text: str) -> tuple[IpNetwork, ...]:
    """`LOCATOR_SUBSCRIPTION_ALLOWED_NETWORKS`: comma-separated CIDRs (or single addresses)."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError as exc:
                raise ValueError(f"not a network: {part!r}") from exc
    return tuple(networks)


def check_url(url: str, *, open_mode: bool) -> urllib.parse.SplitResult:
    """The endpoint's form: absolute https (http only to loopback in open mode), no userinfo,
    no fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EndpointRefusedError("channel.endpoint is not a valid URL") from exc
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise EndpointRefusedError("channel.endpoint must be an absolute https URL")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise EndpointRefusedError("channel.endpoint must not carry credentials or a fragment")
    if port == 0:
        raise EndpointRefusedError("channel.endpoint has no usable port")
    if parts.scheme == "http" and not (open_mode and is_loopback(parts.hostname)):
        raise EndpointRefusedError(
            "channel.endpoint must be https (http only to loopback while the API is open)"
        )
    return parts


def allowed(address: IpAddress, networks: Sequence[IpNetwork]) -> bool:
    if any(address in net for net in networks if net.version == address.version):
        return True
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        return allowed(mapped, networks)
    return address.is_global and not address.is_multicast


def resolve(url: str, *, networks: Sequence[IpNetwork], open_mode: bool) -> Target:
    """Check an endpoint and resolve it to one address every rule allows (all the addresses
    its name resolves to must be allowed, so a name cannot mix an outside and an inside
    address). Raises EndpointRefusedError."""
    parts = check_url(url, open_mode=open_mode)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise EndpointRefusedError("channel.endpoint's host does not resolve") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise EndpointRefusedError("channel.endpoint's host does not resolve")
    for address in addresses:
        if not allowed(address, networks):
            raise EndpointRefusedError(
                "channel.endpoint resolves to a loopback, link-local or private address "
                "(not in LOCATOR_SUBSCRIPTION_ALLOWED_NETWORKS)"
            )
    return Target(parts.scheme, host, port, addresses[0])
