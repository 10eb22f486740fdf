"""The SSRF rules of locator.notify.addresses, table-driven (pure: IP literals need no DNS),
and the retry backoff."""

from __future__ import annotations

import ipaddress

import pytest

from locator.notify.addresses import (
    EndpointRefusedError,
    allowed,
    check_url,
    parse_networks,
    resolve,
)
from locator.notify.queue import MAX_BACKOFF_SECONDS, backoff


@pytest.mark.parametrize(
    ("address", "networks", "ok"),
    [
        ("8.8.8.8", "", True),
        ("2001:4860:4860::8888", "", True),
        ("127.0.0.1", "", False),
        ("10.0.0.1", "", False),
        ("172.16.5.4", "", False),
        ("192.168.1.1", "", False),
        ("169.254.169.254", "", False),
        ("100.64.0.1", "", False),  # shared address space (carrier-grade NAT)
        ("0.0.0.0", "", False),
        ("224.0.0.1", "", False),
        ("::1", "", False),
        ("fc00::1", "", False),  # unique local
        ("fe80::1", "", False),  # link-local
        ("::ffff:10.0.0.1", "", False),  # IPv4-mapped private
        ("10.20.1.2", "10.20.0.0/16", True),
        ("10.21.1.2", "10.20.0.0/16", False),
        ("127.0.0.1", "127.0.0.1, 10.0.0.0/8", True),
        ("::ffff:127.0.0.1", "127.0.0.0/8", True),
    ],
)
def test_which_addresses_an_endpoint_may_resolve_to(address: str, networks: str, ok: bool) -> None:
    assert allowed(ipaddress.ip_address(address), parse_networks(networks)) is ok


@pytest.mark.parametrize(
    ("url", "open_mode", "ok"),
    [
        ("https://care.example/hook", False, True),
        ("http://care.example/hook", True, False),  # http only to loopback
        ("http://127.0.0.1:8000/hook", True, True),
        ("http://127.0.0.1:8000/hook", False, False),  # never with tokens
        ("http://localhost/hook", True, True),
        ("https://u:p@care.example/hook", False, False),
        ("https://care.example/hook#x", False, False),
        ("care.example/hook", False, False),
        ("https://care.example:0/hook", False, False),
        ("https://care.example:99999/hook", False, False),
    ],
)
def test_the_form_of_an_endpoint(url: str, open_mode: bool, ok: bool) -> None:
    if ok:
        check_url(url, open_mode=open_mode)
    else:
        with pytest.raises(EndpointRefusedError):
            check_url(url, open_mode=open_mode)


def test_a_literal_address_is_resolved_to_itself_and_checked() -> None:
    target = resolve(
        "https://[2001:db8::1]:8443/x", networks=parse_networks("2001:db8::/32"), open_mode=False
    )
    assert (target.host, target.port, str(target.address)) == ("2001:db8::1", 8443, "2001:db8::1")
    with pytest.raises(EndpointRefusedError, match="private"):
        resolve("https://[2001:db8::1]/x", networks=(), open_mode=False)


def test_bad_networks_setting_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a network"):
        parse_networks("10.0.0.0/8, nonsense")


def test_backoff_doubles_up_to_an_hour() -> None:
    assert [backoff(n, base=5) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff(40, base=5) == MAX_BACKOFF_SECONDS
