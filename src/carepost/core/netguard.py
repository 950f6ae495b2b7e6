"""The non-public-address guard for every outbound connection CarePost makes on a user's behalf.

Users name hosts CarePost connects to — a webhook URL, a recipient domain whose MX or
``mta-sts`` host they control — while the process runs inside the operator's network. Without a
guard that is server-side request forgery (SSRF): an MX pointed at ``127.0.0.1``, a cloud
metadata address or a database port turns delivery and the security preview into a scanner.

The rule is one: every address a user-chosen name resolves to must be public. Loopback, private
(RFC 1918, ULA), shared (100.64/10), link-local (169.254/16 — cloud metadata — and fe80::/10),
multicast, reserved, unspecified, and the IPv4-mapped, 6to4 and Teredo forms of those are
refused, unless the operator allows them by name or network. The check is made on the address
that is then connected to (never a second DNS answer), so a rebinding name cannot slip through.

Callers (webhooks in ``tracking``, MX and MTA-STS connections in ``delivery``) pass their own
allow-list settings; addresses the operator wrote into configuration (overrides, a relay) are
trusted and not checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class Refused(Exception):
    """The target is not allowed (a non-public address, or a malformed target)."""


def non_public_reason(address: str) -> str | None:
    """Why ``address`` is not a public address ("a loopback address" ...), or None when it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if ip.teredo:
            mapped = ip.teredo[1]
        if mapped is not None:
            ip = mapped
    checks = (
        ("loopback", ip.is_loopback), ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved), ("private", ip.is_private),
    )
    for label, hit in checks:
        if hit:
            return f"a {label} address"
    if not ip.is_global:
        return "a non-public address"
    return None


def parse_allow_list(value: str | None) -> tuple[set[str], list]:
    """``"relay.internal, 10.0.0.0/8, 127.0.0.1"`` -> ({host names}, [networks])."""
    names: set[str] = set()
    networks: list = []
    for item in (value or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            names.add(item.rstrip("."))
    return names, networks


def check_address(host: str, address: str, *, allow_private: bool = False, allowed: str | None = None,
                  hint: str = "") -> None:
    """Raise :class:`Refused` unless ``address`` (what ``host`` resolved to) is public, or allowed
    by ``allow_private`` or the ``allowed`` list (host names, addresses, CIDR networks)."""
    try:
        reason = non_public_reason(address)
    except ValueError:
        raise Refused("not an IP address") from None
    if reason is None or allow_private:
        return
    names, networks = parse_allow_list(allowed)
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if (host or "").lower().rstrip(".") in names or any(ip in net for net in networks if net.version == ip.version):
        return
    raise Refused(f"the host resolves to {reason} ({ip})" + (f"; {hint}" if hint else ""))


def public_addresses(host: str, addresses: Iterable[str], *, allow_private: bool = False,
                     allowed: str | None = None) -> tuple[list[str], str | None]:
    """The allowed ``addresses`` of ``host`` and, when some were dropped, why (for evidence)."""
    kept, reason = [], None
    for address in addresses:
        try:
            check_address(host, address, allow_private=allow_private, allowed=allowed)
            kept.append(address)
        except Refused as err:
            reason = reason or str(err)
    return kept, reason
