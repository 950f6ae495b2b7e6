"""What protection a recipient domain can receive: MX hosts, STARTTLS, TLS version and cipher,
certificate validity for the MX host name, and the domain's MTA-STS policy (RFC 8461).

The findings feed two things: the pre-send security preview (which method each recipient would
get, and why) and the evidence kept for every delivery. They are cached per domain for
``CAREPOST_TLS_PROBE_CACHE_SECONDS`` (an MTA-STS policy no longer than its ``max_age``).

Every address a user-chosen name (an MX host, ``mta-sts.<domain>``) resolves to passes the
non-public-address guard (core/netguard.py, the one webhooks use) before CarePost connects:
a recipient domain pointed at loopback, private or link-local addresses cannot make delivery or
the security preview reach into the operator's network. Hosts and addresses the operator wrote
(``CAREPOST_MX_OVERRIDES``, ``CAREPOST_MTA_STS_OVERRIDES``, the relay) are trusted as written;
``CAREPOST_DELIVERY_ALLOWED_HOSTS`` allows more.

"Verified TLS" means, here and in the delivery client: STARTTLS offered, TLS 1.2 or newer, a
certificate chain to a trusted anchor (system store plus ``CAREPOST_EXTRA_CA_FILE``) and a
certificate naming the MX host (the host name from DNS or from an ``CAREPOST_MX_OVERRIDES``
entry — never the IP address). When a certificate fails verification the probe connects once
more without verification, to record what the server offers and why it failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime

import aiosmtplib

from carepost.core import clock, netguard
from carepost.core.config import Settings, get_settings
from carepost.core.logging import get_logger
from carepost.delivery import dns as cpdns

log = get_logger(__name__)

MIN_TLS = ssl.TLSVersion.TLSv1_2
MTA_STS_MAX_BYTES = 64 * 1024  # RFC 8461 3.3: policies are small; refuse anything large
MTA_STS_MAX_AGE = 31557600
_POLICY_LINE = re.compile(r"^([A-Za-z0-9_]+)\s*:\s*(.*?)\s*$")


# --- TLS contexts ------------------------------------------------------------------------------

_contexts: dict[tuple[str | None, bool], ssl.SSLContext] = {}


def tls_context(verify: bool, settings: Settings | None = None) -> ssl.SSLContext:
    """A client context. ``verify``: trusted chain, host name checked, TLS 1.2+."""
    settings = settings or get_settings()
    key = (str(settings.extra_ca_file) if settings.extra_ca_file else None, verify)
    ctx = _contexts.get(key)
    if ctx is None:
        if verify:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if settings.extra_ca_file:
                ctx.load_verify_locations(cafile=str(settings.extra_ca_file))
            ctx.minimum_version = MIN_TLS
        else:
            # Opportunistic TLS (RFC 7435): encrypt even when the certificate proves nothing.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if len(_contexts) > 8:
            _contexts.clear()
        _contexts[key] = ctx
    return ctx


@dataclass(frozen=True)
class TlsSession:
    """What one TLS session to an MX looked like: the evidence kept for a delivery."""

    version: str | None
    cipher: str | None
    cert_fingerprint: str | None  # SHA-256 of the leaf certificate (DER), hex
    verified: bool


def session_info(smtp: aiosmtplib.SMTP, verified: bool) -> TlsSession:
    ssl_object = smtp.get_transport_info("ssl_object")
    if ssl_object is None:
        return TlsSession(None, None, None, False)
    der = ssl_object.getpeercert(binary_form=True)
    cipher = ssl_object.cipher()
    return TlsSession(
        version=ssl_object.version(),
        cipher=cipher[0] if cipher else None,
        cert_fingerprint=hashlib.sha256(der).hexdigest() if der else None,
        verified=verified,
    )


def verification_error(err: BaseException) -> str | None:
    """The certificate verification message in an exception chain (e.g. "certificate has
    expired"), or None when the failure was something else."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, ssl.SSLCertVerificationError):
            return err.verify_message or "certificate verification failed"
        err = err.__cause__ or err.__context__
        seen += 1
    return None


class NonPublicAddress(OSError):
    """A connection to a non-public address of a user-chosen host was refused (SSRF guard).
    An OSError, so every caller's network-failure path handles it; nothing is ever sent."""


def guard_addresses(target: cpdns.MxTarget, addresses: list[str], settings: Settings) -> tuple[list[str], str | None]:
    """The addresses of ``target`` CarePost may connect to, and why others were dropped.
    Overridden targets (written by the operator) are trusted as written."""
    if target.overridden:
        return list(addresses), None
    return netguard.public_addresses(target.host, addresses, allowed=settings.delivery_allowed_hosts)


def _guard(host: str, address: str, *, trusted: bool, settings: Settings) -> None:
    if trusted:
        return
    try:
        netguard.check_address(host, address, allowed=settings.delivery_allowed_hosts)
    except netguard.Refused as err:
        raise NonPublicAddress(f"refused: {err}") from None


def helo_name(settings: Settings) -> str | None:
    return settings.smtp_helo_name


async def connect(target: cpdns.MxTarget, address: str, settings: Settings) -> aiosmtplib.SMTP:
    """An open SMTP connection to one address of an MX, EHLO done, no TLS yet. The address is
    checked by the SSRF guard here too, the last place before a socket opens."""
    _guard(target.host, address, trusted=target.overridden, settings=settings)
    smtp = aiosmtplib.SMTP(
        hostname=address, port=target.port, local_hostname=helo_name(settings), timeout=settings.smtp_timeout,
        start_tls=False, use_tls=False,
    )
    await smtp.connect()
    await smtp.ehlo()
    return smtp


async def starttls(smtp: aiosmtplib.SMTP, target: cpdns.MxTarget, *, verify: bool, settings: Settings) -> TlsSession:
    """Upgrade to TLS, checking the certificate against the MX host name when ``verify``.
    Re-issues EHLO afterwards (RFC 3207 4.2). Raises on failure; the connection is then unusable."""
    await smtp.starttls(server_hostname=target.host, tls_context=tls_context(verify, settings))
    await smtp.ehlo()
    return session_info(smtp, verify)


async def close_quietly(smtp: aiosmtplib.SMTP | None) -> None:
    if smtp is None:
        return
    try:
        if smtp.is_connected:
            await asyncio.wait_for(smtp.quit(), timeout=2)
    except Exception:  # closing is best effort; the server may already be gone
        smtp.close()


# --- MTA-STS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MtaStsPolicy:
    id: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int

    def matches(self, host: str) -> bool:
        """RFC 8461 4.1: exact match, or "*.example.com" matching exactly one extra label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                suffix = pattern[1:]
                if host.endswith(suffix) and "." not in host[: -len(suffix)] and host[: -len(suffix)]:
                    return True
            elif host == pattern:
                return True
        return False


class MtaStsError(Exception):
    pass


def parse_sts_txt(records: list[str]) -> str | None:
    """The policy id from ``_mta-sts`` TXT records, None when no (single valid) record exists."""
    sts = [r for r in records if r.startswith("v=STSv1")]
    if len(sts) != 1:
        return None
    fields = dict(
        part.strip().split("=", 1) for part in sts[0].split(";") if "=" in part
    )
    ident = fields.get("id", "")
    return ident if re.fullmatch(r"[A-Za-z0-9]{1,32}", ident) else None


def parse_policy(text: str, ident: str) -> MtaStsPolicy:
    values: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        m = _POLICY_LINE.match(line)
        if not m:
            raise MtaStsError("malformed policy line")
        values.setdefault(m.group(1).lower(), []).append(m.group(2))
    if values.get("version") != ["STSv1"]:
        raise MtaStsError("policy version is not STSv1")
    mode = (values.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise MtaStsError("policy mode is missing or invalid")
    try:
        max_age = int((values.get("max_age") or [""])[0])
    except ValueError:
        raise MtaStsError("policy max_age is missing or invalid") from None
    if not 0 <= max_age <= MTA_STS_MAX_AGE:
        raise MtaStsError("policy max_age is out of range")
    mx = tuple(values.get("mx", []))
    if mode != "none" and not mx:
        raise MtaStsError("policy lists no mx")
    return MtaStsPolicy(id=ident, mode=mode, mx=mx, max_age=max_age)


async def _https_get(address: str, port: int, host: str, path: str, settings: Settings) -> tuple[int, dict, bytes]:
    """A single HTTPS GET with the certificate checked against ``host`` while connecting to
    ``address`` (so overrides keep host-name verification). No redirects are followed
    (RFC 8461 3.3)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(address, port, ssl=tls_context(True, settings), server_hostname=host),
        timeout=settings.dns_timeout * 2,
    )
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: CarePost-MTA-STS\r\nAccept: text/plain\r\n"
            "Connection: close\r\n\r\n".encode("ascii")
        )
        await writer.drain()
        data = b""
        while len(data) <= MTA_STS_MAX_BYTES + 4096:
            chunk = await asyncio.wait_for(reader.read(16384), timeout=settings.dns_timeout * 2)
            if not chunk:
                break
            data += chunk
    finally:
        writer.close()
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise MtaStsError("malformed HTTP response")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise MtaStsError("malformed HTTP status line")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers and headers["content-length"].isdigit():
        body = body[: int(headers["content-length"])]
    return int(parts[1]), headers, body


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


async def fetch_mta_sts(domain: str, settings: Settings | None = None) -> MtaStsPolicy | None:
    """The domain's MTA-STS policy, None when it publishes none. MtaStsError when it publishes
    a TXT record but the policy cannot be fetched or parsed."""
    settings = settings or get_settings()
    ident = parse_sts_txt(await cpdns.lookup_txt(f"_mta-sts.{domain}"))
    if ident is None:
        return None
    host = f"mta-sts.{domain}"
    overrides = cpdns.parse_address_overrides(settings.mta_sts_overrides, 443)
    if domain in overrides:
        address, port = overrides[domain]
    else:
        addresses = await cpdns.resolve_addresses(host)
        if not addresses:
            raise MtaStsError("policy host has no address")
        allowed, refused = netguard.public_addresses(host, addresses, allowed=settings.delivery_allowed_hosts)
        if not allowed:
            raise MtaStsError(f"policy host refused: {refused}")
        address, port = allowed[0], 443
    try:
        status, headers, body = await _https_get(address, port, host, "/.well-known/mta-sts.txt", settings)
    except ssl.SSLCertVerificationError as err:
        raise MtaStsError(f"policy host certificate: {err.verify_message}") from None
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as err:
        raise MtaStsError(f"policy fetch failed: {type(err).__name__}") from None
    if status != 200:
        raise MtaStsError(f"policy fetch answered HTTP {status}")
    if not headers.get("content-type", "").lower().startswith("text/plain"):
        raise MtaStsError("policy is not text/plain")
    if len(body) > MTA_STS_MAX_BYTES:
        raise MtaStsError("policy is too large")
    return parse_policy(body.decode("utf-8", "replace"), ident)


# --- probe -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MxFinding:
    host: str
    port: int
    address: str | None
    reachable: bool
    starttls: bool = False
    smtputf8: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    cert_fingerprint: str | None = None
    cert_verified: bool = False
    cert_error: str | None = None
    error: str | None = None
    mta_sts_match: bool | None = None  # None: no policy to match against

    @property
    def verified_tls(self) -> bool:
        return self.reachable and self.starttls and self.cert_verified and self.tls_version in ("TLSv1.2", "TLSv1.3")


@dataclass
class DomainTls:
    domain: str
    mx: list[MxFinding]
    mta_sts: MtaStsPolicy | None
    mta_sts_error: str | None
    checked_at: datetime
    dns_error: str | None = None
    dns_temporary: bool = False
    mx_overridden: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def verified_tls(self) -> bool:
        """At least one reachable MX offers verified TLS 1.2+ (and, under an enforced MTA-STS
        policy, is listed in it). Delivery that requires TLS uses only such hosts."""
        return any(self.usable_for_verified_tls(m) for m in self.mx)

    def usable_for_verified_tls(self, finding: MxFinding) -> bool:
        if not finding.verified_tls:
            return False
        if self.mta_sts and self.mta_sts.mode == "enforce":
            return self.mta_sts.matches(finding.host)
        return True

    @property
    def reason(self) -> str:
        """One sentence for the security preview."""
        if self.dns_error:
            return f"MX look-up failed: {self.dns_error}"
        if self.verified_tls:
            best = next(m for m in self.mx if self.usable_for_verified_tls(m))
            sts = f"; MTA-STS {self.mta_sts.mode}" if self.mta_sts else ""
            return f"{best.host} offers verified {best.tls_version}{sts}"
        reachable = [m for m in self.mx if m.reachable]
        if not reachable:
            refused = next((m for m in self.mx if (m.error or "").startswith("refused")), None)
            if refused is not None:
                return f"{refused.host}: {refused.error}"
            return "no MX host could be reached"
        m = reachable[0]
        if not m.starttls:
            return f"{m.host} does not offer STARTTLS"
        if m.cert_error:
            return f"{m.host} certificate not valid: {m.cert_error}"
        if m.tls_version and m.tls_version not in ("TLSv1.2", "TLSv1.3"):
            return f"{m.host} offers only {m.tls_version}"
        if self.mta_sts and self.mta_sts.mode == "enforce" and not any(self.mta_sts.matches(x.host) for x in self.mx):
            return "no MX host matches the domain's enforced MTA-STS policy"
        return f"{m.host} TLS could not be verified"


async def probe_mx(target: cpdns.MxTarget, settings: Settings, policy: MtaStsPolicy | None = None) -> MxFinding:
    match = policy.matches(target.host) if policy else None
    try:
        addresses = [target.address] if target.address else await cpdns.resolve_addresses(target.host)
    except cpdns.DnsError as err:
        return MxFinding(target.host, target.port, None, False, error=str(err), mta_sts_match=match)
    if not addresses:
        return MxFinding(target.host, target.port, None, False, error="host has no address", mta_sts_match=match)
    addresses, refused = guard_addresses(target, addresses, settings)
    if not addresses:
        return MxFinding(target.host, target.port, None, False, error=f"refused: {refused}", mta_sts_match=match)
    last_error = "unreachable"
    for address in addresses[:2]:
        smtp = None
        try:
            smtp = await connect(target, address, settings)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as err:
            last_error = f"connect failed: {type(err).__name__}"
            continue
        try:
            offers = smtp.supports_extension("starttls")
            utf8 = smtp.supports_extension("smtputf8")
            if not offers:
                return MxFinding(target.host, target.port, address, True, False, utf8, mta_sts_match=match)
            try:
                info = await starttls(smtp, target, verify=True, settings=settings)
                return MxFinding(target.host, target.port, address, True, True, utf8, info.version, info.cipher,
                                 info.cert_fingerprint, True, mta_sts_match=match)
            except Exception as err:  # noqa: BLE001 - any TLS failure is a finding, not a crash
                reason = verification_error(err) or (
                    "TLS version too old" if "VERSION" in str(err).upper() else f"TLS failed: {type(err).__name__}"
                )
            # Look again without verification, to record what the server does offer.
            await close_quietly(smtp)
            smtp = await connect(target, address, settings)
            try:
                info = await starttls(smtp, target, verify=False, settings=settings)
                return MxFinding(target.host, target.port, address, True, True, utf8, info.version, info.cipher,
                                 info.cert_fingerprint, False, reason, mta_sts_match=match)
            except Exception:  # noqa: BLE001
                return MxFinding(target.host, target.port, address, True, True, utf8, cert_error=reason,
                                 mta_sts_match=match)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as err:
            last_error = f"SMTP failed: {type(err).__name__}"
        finally:
            await close_quietly(smtp)
    return MxFinding(target.host, target.port, None, False, error=last_error, mta_sts_match=match)


class ProbeCache:
    """Per-process findings by domain, expiring on the application clock."""

    def __init__(self):
        self._items: dict[str, tuple[float, DomainTls]] = {}

    def get(self, domain: str) -> DomainTls | None:
        item = self._items.get(domain)
        if item and item[0] > clock.now().timestamp():
            return item[1]
        self._items.pop(domain, None)
        return None

    def put(self, domain: str, result: DomainTls, ttl: float) -> None:
        self._items[domain] = (clock.now().timestamp() + ttl, result)

    def clear(self) -> None:
        self._items.clear()


cache = ProbeCache()


async def probe_domain(domain: str, *, use_cache: bool = True, settings: Settings | None = None) -> DomainTls:
    """MX, STARTTLS/TLS findings for each MX (up to three), and MTA-STS for ``domain``."""
    settings = settings or get_settings()
    domain = domain.lower().rstrip(".")
    if use_cache and (hit := cache.get(domain)):
        return hit
    started = time.monotonic()
    try:
        targets = await cpdns.lookup_mx(domain, settings=settings)
    except cpdns.DnsError as err:
        result = DomainTls(domain, [], None, None, clock.now(), dns_error=str(err), dns_temporary=err.temporary)
        # Temporary failures are not worth remembering for long.
        cache.put(domain, result, 60 if err.temporary else settings.tls_probe_cache_seconds)
        return result
    policy, policy_error = None, None
    try:
        policy = await fetch_mta_sts(domain, settings)
    except (MtaStsError, cpdns.DnsError) as err:
        policy_error = str(err)
    findings = await asyncio.gather(*(probe_mx(t, settings, policy) for t in targets[:3]))
    result = DomainTls(
        domain=domain, mx=list(findings), mta_sts=policy, mta_sts_error=policy_error, checked_at=clock.now(),
        mx_overridden=any(t.overridden for t in targets),
    )
    ttl = settings.tls_probe_cache_seconds
    if policy:
        ttl = min(ttl, policy.max_age)
    cache.put(domain, result, ttl)
    # The recipient domain is not logged: a personal domain can identify a patient.
    log.info("tls_probe", verified_tls=result.verified_tls, mx_count=len(findings),
             mta_sts=policy.mode if policy else None, seconds=round(time.monotonic() - started, 3))
    return result
