"""DNS for outbound mail: MX (RFC 5321 5.1, RFC 7505 null MX), addresses, TXT records.

Everything goes through one resolver built from the settings, so ``CAREPOST_DNS_NAMESERVERS``
points every look-up at a given server (a private network, or the local DNS server the tests
run), and ``CAREPOST_MX_OVERRIDES`` routes a recipient domain to a host name, an address and a
port without DNS at all — the certificate is still checked against the host name, so the real
delivery path runs against local servers.

DNSSEC. Queries ask for DNSSEC data (the DO bit) and read the AD bit of the answer: "this
answer was validated". CarePost does not validate signatures itself; it relies on a validating
resolver, and believes the AD bit only from a resolver on the loopback interface (a validating
resolver such as Debian's ``unbound`` on the same host, RFC 7672 section 2.1.1) — an AD bit
that crossed a network could have been set by anyone on the path. :func:`lookup_tlsa` returns
TLSA records (RFC 6698) only when the MX RRset, the host's address records and the TLSA RRset
are all validated: that is when DANE (RFC 7672) applies.

Failures are split the way SMTP needs them: a *permanent* answer (the domain does not exist,
publishes a null MX, or names no reachable host) bounces the message; a *temporary* one
(timeout, SERVFAIL) is retried later.

dnspython (and the HTTP client it loads for DNS over HTTPS) is imported by the first look-up, not
with this module: every process imports the delivery pipeline, most never resolve a name, and the
import costs about 0.1 s of start-up.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from carepost.core.config import Settings, get_settings
from carepost.core.plainwords import describe_error
from carepost.delivery.mime import ascii_domain

if TYPE_CHECKING:
    import dns.asyncresolver


class DnsError(Exception):
    """A look-up failed. ``temporary``: worth retrying later (timeouts, SERVFAIL)."""

    def __init__(self, message: str, *, temporary: bool):
        super().__init__(message)
        self.temporary = temporary


@dataclass(frozen=True)
class MxTarget:
    """One host to try for a domain. ``host`` is what the TLS certificate must name."""

    host: str
    preference: int
    port: int
    address: str | None = None  # fixed by an override; else resolved at connect time
    overridden: bool = False
    dnssec: bool = False  # the MX RRset naming this host was DNSSEC-validated (AD from a trusted resolver)
    tlsa: tuple = ()  # usable DANE TLSA records (Tlsa) found for this host: TLS is then authenticated by them


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698): certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


def _split_host_port(text: str, default_port: int, what: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port
    if text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text.isdigit():
            raise ValueError(f"invalid port in {what}: {text!r}")
        return host, int(port_text)
    return text, default_port


def parse_nameservers(value: str | None) -> list[tuple[str, int]]:
    """``"127.0.0.1:5353, 10.0.0.2"`` -> [("127.0.0.1", 5353), ("10.0.0.2", 53)]."""
    servers = []
    for item in (value or "").split(","):
        if not item.strip():
            continue
        host, port = _split_host_port(item, 53, "CAREPOST_DNS_NAMESERVERS")
        ipaddress.ip_address(host)  # dnspython needs addresses; ValueError names the bad one
        servers.append((host, port))
    return servers


def parse_mx_overrides(value: str | None, default_port: int = 25) -> dict[str, MxTarget]:
    """``example.test=mx.example.test@127.0.0.1:2525`` (host@address[:port], or host[:port])."""
    out: dict[str, MxTarget] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        domain, eq, target = item.partition("=")
        if not eq or not domain.strip() or not target.strip():
            raise ValueError(f"invalid CAREPOST_MX_OVERRIDES entry: {item.strip()!r}")
        host, at, where = target.strip().partition("@")
        address = None
        if at:
            address, port = _split_host_port(where, default_port, "CAREPOST_MX_OVERRIDES")
            ipaddress.ip_address(address)
        else:
            host, port = _split_host_port(host, default_port, "CAREPOST_MX_OVERRIDES")
        out[domain.strip().lower().rstrip(".")] = MxTarget(
            host=host.strip().lower().rstrip("."), preference=0, port=port, address=address, overridden=True
        )
    return out


def parse_address_overrides(value: str | None, default_port: int) -> dict[str, tuple[str, int]]:
    """``example.test=127.0.0.1:8443`` -> {"example.test": ("127.0.0.1", 8443)}."""
    out: dict[str, tuple[str, int]] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        domain, eq, target = item.partition("=")
        if not eq:
            raise ValueError(f"invalid override entry: {item.strip()!r}")
        address, port = _split_host_port(target, default_port, "override")
        ipaddress.ip_address(address)
        out[domain.strip().lower().rstrip(".")] = (address, port)
    return out


def make_resolver(settings: Settings | None = None) -> dns.asyncresolver.Resolver:
    import dns.asyncresolver
    import dns.flags
    import dns.nameserver
    import dns.resolver

    settings = settings or get_settings()
    servers = parse_nameservers(settings.dns_nameservers)
    if servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = settings.dns_timeout
    resolver.timeout = min(settings.dns_timeout, 2.0)
    resolver.use_edns(0, dns.flags.DO, 1232)  # ask for DNSSEC data, so a validating resolver sets AD
    resolver.cache = dns.resolver.Cache()  # honours each answer's TTL
    return resolver


_resolvers: dict[tuple, dns.asyncresolver.Resolver] = {}


def resolver() -> dns.asyncresolver.Resolver:
    """One resolver (and answer cache) per configuration; changed settings make a new one."""
    settings = get_settings()
    key = (settings.dns_nameservers, settings.dns_timeout)
    if key not in _resolvers:
        _resolvers.clear()
        _resolvers[key] = make_resolver(settings)
    return _resolvers[key]


def ad_trusted(res: dns.asyncresolver.Resolver | None = None) -> bool:
    """Is the resolver's AD bit believable? Only when every nameserver is on the loopback interface."""
    res = res or resolver()
    hosts = []
    for ns in res.nameservers:
        hosts.append(getattr(ns, "address", None) or str(ns))
    try:
        return bool(hosts) and all(ipaddress.ip_address(h).is_loopback for h in hosts)
    except ValueError:
        return False


def reset() -> None:
    """Forget resolvers and their answer caches (tests change DNS data between cases)."""
    _resolvers.clear()


async def _query(name: str, rdtype: str):
    """The answer's rdata, [] when the name exists without records of that type.

    NXDOMAIN is permanent; timeouts and SERVFAIL are temporary."""
    return (await _query_secure(name, rdtype))[0]


async def _query_secure(name: str, rdtype: str) -> tuple[list, bool]:
    """(rdata, validated): ``validated`` is the AD bit of a trusted resolver's answer."""
    import dns.exception
    import dns.flags
    import dns.resolver

    try:
        res = resolver()
        answer = await res.resolve(name, rdtype, search=False)
        secure = bool(answer.response.flags & dns.flags.AD) and ad_trusted(res)
        return list(answer), secure
    except dns.resolver.NoAnswer:
        return [], False
    except dns.resolver.NXDOMAIN:
        raise DnsError(f"{name} does not exist", temporary=False) from None
    except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
        raise DnsError(f"DNS look-up of {name} timed out", temporary=True) from None
    except dns.resolver.NoNameservers:
        raise DnsError(f"no DNS server answered for {name}", temporary=True) from None
    except dns.exception.DNSException as err:
        raise DnsError(f"DNS look-up of {name} failed: {describe_error(err)}", temporary=True) from None


async def lookup_txt(name: str) -> list[str]:
    """TXT strings of ``name`` (character-strings of one record joined), [] when none."""
    try:
        records = await _query(name, "TXT")
    except DnsError as err:
        if not err.temporary:
            return []
        raise
    return [b"".join(r.strings).decode("utf-8", "replace") for r in records]


async def resolve_addresses(host: str) -> list[str]:
    """IPv4 then IPv6 addresses of ``host``; [] when it has none."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    addresses: list[str] = []
    temporary: DnsError | None = None
    for rdtype in ("A", "AAAA"):
        try:
            addresses += [r.address for r in await _query(host, rdtype)]
        except DnsError as err:
            if not err.temporary:
                return []
            temporary = err
    if not addresses and temporary:
        raise temporary
    return addresses


async def lookup_mx(domain: str, *, settings: Settings | None = None) -> list[MxTarget]:
    """The hosts to try for ``domain``, most preferred first (equal preferences keep DNS order).

    Raises DnsError(temporary=False) for a domain that receives no mail."""
    settings = settings or get_settings()
    domain = ascii_domain(domain, field_name="domain")
    overrides = parse_mx_overrides(settings.mx_overrides, settings.smtp_port)
    if domain in overrides:
        return [overrides[domain]]
    records, secure = await _query_secure(domain, "MX")
    if not records:
        # RFC 5321 5.1: no MX records -> the domain itself is the implicit MX, if it has an address.
        if await resolve_addresses(domain):
            return [MxTarget(host=domain, preference=0, port=settings.smtp_port)]
        raise DnsError(f"{domain} has no MX and no address", temporary=False)
    targets = sorted(
        ((r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in records), key=lambda t: t[0]
    )
    if len(targets) == 1 and targets[0][1] in ("", "."):
        raise DnsError(f"{domain} publishes a null MX: it accepts no mail (RFC 7505)", temporary=False)
    return [MxTarget(host=host, preference=pref, port=settings.smtp_port, dnssec=secure)
            for pref, host in targets if host not in ("", ".")]


async def lookup_tlsa(target: MxTarget) -> list[Tlsa]:
    """The DANE TLSA records of an MX host (``_<port>._tcp.<host>``), [] unless DANE applies:
    the MX RRset, the host's address records and the TLSA RRset must all be validated
    (RFC 7672 2.2). Records of every usage are returned; the caller keeps the usable ones."""
    if target.overridden or not target.dnssec:
        return []
    try:
        addresses, address_secure = await _query_secure(target.host, "A")
        if not addresses:
            addresses, address_secure = await _query_secure(target.host, "AAAA")
    except DnsError:
        return []
    if not address_secure:
        return []
    try:
        records, secure = await _query_secure(f"_{target.port}._tcp.{target.host}", "TLSA")
    except DnsError as err:
        if err.temporary:
            # A validated host whose TLSA answer fails (SERVFAIL: bogus, or blocked) must not be
            # used: treating it as "no TLSA" would let an attacker downgrade DANE (RFC 7672 2.2).
            raise
        return []  # NXDOMAIN: no TLSA records
    if not secure:
        return []
    return [Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in records]
