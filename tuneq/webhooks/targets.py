"""Where a webhook may be sent (SSRF): checked when it is registered and again before each
attempt, since what a name resolves to may change.

http or https only; the host in the operator's allowlist when there is one (exact names or
`*.example.com`); and every address the host resolves to public (not loopback, private,
link-local, multicast, reserved, unspecified, nor an IPv6 form wrapping such an IPv4),
unless the operator allows private targets. The attempt then connects to an address that
was checked, so a second lookup cannot swap in another (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from tuneq.errors import ErrorItem, InvalidRequest
from tuneq.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    host: str  # as named in the URL, lowercased: the Host header and the TLS server name
    address: Address  # what the attempt connects to


def refused(reason: str) -> InvalidRequest:
    return InvalidRequest(f"url: {reason}", errors=[ErrorItem(reason, field="url")], param="url")


def check_target(url: str, settings: Settings) -> Target:
    """The host and a checked address to send to; InvalidRequest (field `url`) says why not."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise refused("the scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise refused("credentials in the URL are not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise refused("the URL names no host")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise refused("the port is not a number from 0 to 65535") from None
    allowed = settings.webhook_allowed_hosts
    if allowed and not any(host_matches(host, pattern) for pattern in allowed):
        raise refused(f"host {host!r} is not in the operator's TUNEQ_WEBHOOK_ALLOWED_HOSTS")
    addresses = resolve(host, port)
    if not settings.webhook_allow_private:
        for address in addresses:
            kind = non_public_kind(address)
            if kind is not None:
                raise refused(
                    f"{host} resolves to {address}, a {kind} address "
                    "(the operator allows only public addresses)"
                )
    return Target(host=host, address=addresses[0])


def host_matches(host: str, pattern: str) -> bool:
    """`*.example.com` matches any name below example.com (not example.com itself)."""
    pattern = pattern.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise refused(f"cannot resolve {host}") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))
    if not addresses:
        raise refused(f"cannot resolve {host}")
    return addresses


def non_public_kind(address: Address) -> str | None:
    """Why an address is not a public one, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return non_public_kind(embedded)
    for kind, flagged in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    ):
        if flagged:
            return kind
    return None if address.is_global else "non-public"
