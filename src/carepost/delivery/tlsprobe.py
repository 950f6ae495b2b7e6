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

MTA-STS policies (RFC 8461) are kept in the database (``mta_sts_policies``) with their
``max_age``: an unchanged policy id is not fetched again, and when a refresh fails (the policy
host unreachable or blocked) the stored policy stays in force until it expires (RFC 8461 5.1),
instead of degrading to "no policy". Whether a policy was fetched now, reused from the store or
used because the refresh failed is part of the evidence; under ``mode: testing`` what ``enforce``
would have refused is reported in the evidence too, and delivery goes on (RFC 8461 5).

DANE (RFC 7672). When the MX RRset, the host's addresses and its TLSA records are validated by a
trusted (loopback) validating resolver (see dns.py), the host's certificate is authenticated by
its usable TLSA records — DANE-EE(3) with selector 0 (certificate) or 1 (public key) and
matching type 0, 1 (SHA-256) or 2 (SHA-512) — instead of by the Web PKI; TLS is then mandatory
for that host, PHI or not, and a mismatch means nothing is sent to it. DANE-TA(2) records are
not usable here (verifying them needs the peer's chain, which Python's ssl does not expose
before 3.13): the host is then checked by the Web PKI as before, and the evidence says so.

"Verified TLS" means, here and in the delivery client: STARTTLS offered, TLS 1.2 or newer, a
certificate chain to a trusted anchor (system store plus ``CAREPOST_EXTRA_CA_FILE``) and a
certificate naming the MX host (the host name from DNS or from an ``CAREPOST_MX_OVERRIDES``
entry — never the IP address). When a certificate fails verification the probe connects once
more without verification, to record what the server offers and why it failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import ssl
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import aiosmtplib

from carepost.core import clock, netguard
from carepost.core.config import Settings, get_settings
from carepost.core.logging import get_logger
from carepost.core.plainwords import describe_error
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
    dane: bool = False  # verified by the host's DNSSEC-validated TLSA records (RFC 7672), not the Web PKI


def session_info(smtp: aiosmtplib.SMTP, verified: bool, dane: bool = False) -> TlsSession:
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
        dane=dane,
    )


# --- DANE (RFC 7672) ---------------------------------------------------------------------------


class DaneMismatch(ssl.SSLError):
    """The server's certificate matches none of the host's usable TLSA records."""


def usable_tlsa(records) -> tuple:
    """The records CarePost can check: DANE-EE(3), selector 0/1, matching type 0/1/2."""
    return tuple(r for r in records if r.usage == 3 and r.selector in (0, 1) and r.mtype in (0, 1, 2))


def dane_matches(der: bytes, records) -> bool:
    """Does the leaf certificate (DER) match one of the DANE-EE records? Names and dates are not
    checked for DANE-EE (RFC 7672 3.1.1): the DNSSEC-signed record is the authority."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for record in usable_tlsa(records):
        content = der if record.selector == 0 else spki
        digest = {0: content, 1: hashlib.sha256(content).digest(), 2: hashlib.sha512(content).digest()}[record.mtype]
        if hmac.compare_digest(digest, record.data):
            return True
    return False


def verification_error(err: BaseException) -> str | None:
    """The certificate verification message in an exception chain (e.g. "certificate has
    expired"), or None when the failure was something else."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, DaneMismatch):
            return f"DANE: {err.args[0] if err.args else 'no TLSA match'}"
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
    if target.tlsa:
        # DANE: the TLSA records authenticate the certificate; the Web PKI is not consulted.
        await smtp.starttls(server_hostname=target.host, tls_context=tls_context(False, settings))
        ssl_object = smtp.get_transport_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        version = ssl_object.version() if ssl_object else None
        if not der or not dane_matches(der, target.tlsa):
            raise DaneMismatch("certificate matches no DANE TLSA record of the MX host")
        if version not in ("TLSv1.2", "TLSv1.3"):
            raise DaneMismatch("TLS version too old")
        await smtp.ehlo()
        return session_info(smtp, True, dane=True)
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
    return await fetch_policy(domain, ident, settings)


async def fetch_policy(domain: str, ident: str, settings: Settings) -> MtaStsPolicy:
    """GET ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (no redirects, certificate checked,
    SSRF guard on the address); MtaStsError says why it failed."""
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
        raise MtaStsError(f"policy fetch failed: {describe_error(err)}") from None
    if status != 200:
        raise MtaStsError(f"policy fetch answered HTTP {status}")
    if not headers.get("content-type", "").lower().startswith("text/plain"):
        raise MtaStsError("policy is not text/plain")
    if len(body) > MTA_STS_MAX_BYTES:
        raise MtaStsError("policy is too large")
    return parse_policy(body.decode("utf-8", "replace"), ident)


# --- MTA-STS policies kept with their max_age (RFC 8461 5.1) ----------------------------------


class PolicyStore:
    """Where fetched policies are kept across processes and restarts. This base keeps nothing
    (tests of the fetch itself, and callers without a database)."""

    def load(self, domain: str) -> tuple[MtaStsPolicy, datetime] | None:
        return None

    def save(self, domain: str, policy: MtaStsPolicy) -> None:
        return None


class DatabasePolicyStore(PolicyStore):
    """``mta_sts_policies``: the domain as an HMAC under the installation's ``mtasts`` key, the
    policy encrypted (AES-256-GCM) under a key derived from it. One short transaction per call,
    never one held across the network."""

    OWNER = "installation"

    def _keys(self, session) -> tuple[bytes, bytes]:
        from carepost.core.crypto import get_keyring

        secret = get_keyring().named_key(session, self.OWNER, "mtasts")
        return (hmac.new(secret, b"index", hashlib.sha256).digest(), hmac.new(secret, b"encrypt", hashlib.sha256).digest())

    @staticmethod
    def _index(key: bytes, domain: str) -> str:
        return hmac.new(key, domain.lower().rstrip(".").encode(), hashlib.sha256).hexdigest()

    def load(self, domain: str) -> tuple[MtaStsPolicy, datetime] | None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from sqlalchemy import select

        from carepost.core.database import system_session
        from carepost.delivery.models import StoredMtaStsPolicy

        with system_session() as session:
            index_key, enc_key = self._keys(session)
            row = session.scalars(select(StoredMtaStsPolicy).where(
                StoredMtaStsPolicy.domain_index == self._index(index_key, domain))).first()
            session.commit()  # the key may have been created
            if row is None:
                return None
            body = json.loads(AESGCM(enc_key).decrypt(row.policy_enc[:12], row.policy_enc[12:], row.domain_index.encode()))
            policy = MtaStsPolicy(id=row.policy_id, mode=row.mode, mx=tuple(body["mx"]), max_age=int(body["max_age"]))
            return policy, clock.aware(row.expires_at)

    def save(self, domain: str, policy: MtaStsPolicy) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from sqlalchemy import select

        from carepost.core.database import system_session
        from carepost.delivery.models import StoredMtaStsPolicy

        now = clock.now()
        with system_session() as session:
            index_key, enc_key = self._keys(session)
            index = self._index(index_key, domain)
            nonce = secrets.token_bytes(12)
            sealed = nonce + AESGCM(enc_key).encrypt(
                nonce, json.dumps({"mx": list(policy.mx), "max_age": policy.max_age}).encode(), index.encode())
            row = session.scalars(select(StoredMtaStsPolicy).where(StoredMtaStsPolicy.domain_index == index)).first()
            if row is None:
                row = StoredMtaStsPolicy(domain_index=index)
                session.add(row)
            row.policy_id, row.mode, row.policy_enc = policy.id, policy.mode, sealed
            row.fetched_at, row.expires_at = now, now + timedelta(seconds=policy.max_age)
            session.commit()


@dataclass(frozen=True)
class PolicyResult:
    """The policy in force for a domain now, where it came from, and any refresh error."""

    policy: MtaStsPolicy | None
    source: str | None = None  # fetched | stored | stored_after_failure | None (no policy)
    error: str | None = None


async def resolve_mta_sts(domain: str, settings: Settings | None = None,
                          store: PolicyStore | None = None) -> PolicyResult:
    """RFC 8461 3.3 and 5.1 with a persistent cache: the TXT id decides whether to fetch; a
    stored policy whose id is unchanged is used as is; a failed TXT look-up or fetch falls back to
    the stored policy until its max_age runs out (never to "no policy" while one is in force)."""
    settings = settings or get_settings()
    store = store or PolicyStore()
    stored = await asyncio.to_thread(_load_quietly, store, domain)
    now = clock.now()
    if stored and stored[1] <= now:
        stored = None  # expired: as if never seen
    try:
        ident = parse_sts_txt(await cpdns.lookup_txt(f"_mta-sts.{domain}"))
    except cpdns.DnsError as err:
        if stored:
            return PolicyResult(stored[0], "stored_after_failure", f"TXT look-up failed: {err}")
        return PolicyResult(None, None, str(err))
    if ident is None:
        # No TXT record: RFC 8461 5.1 keeps an unexpired policy (the record may have been stripped).
        return PolicyResult(stored[0], "stored") if stored else PolicyResult(None)
    if stored and stored[0].id == ident:
        return PolicyResult(stored[0], "stored")
    try:
        policy = await fetch_policy(domain, ident, settings)
    except (MtaStsError, cpdns.DnsError) as err:
        if stored:
            return PolicyResult(stored[0], "stored_after_failure", str(err))
        return PolicyResult(None, None, str(err))
    await asyncio.to_thread(_save_quietly, store, domain, policy)
    return PolicyResult(policy, "fetched")


def _load_quietly(store: PolicyStore, domain: str):
    try:
        return store.load(domain)
    except Exception as err:  # noqa: BLE001 - a store failure must not stop delivery; it is logged
        log.warning("mta_sts_store_failed", operation="load", error=type(err).__name__)
        return None


def _save_quietly(store: PolicyStore, domain: str, policy: MtaStsPolicy) -> None:
    try:
        store.save(domain, policy)
    except Exception as err:  # noqa: BLE001
        log.warning("mta_sts_store_failed", operation="save", error=type(err).__name__)


def testing_report(policy: MtaStsPolicy | None, host: str, verified: bool) -> str | None:
    """Under ``mode: testing``, what ``enforce`` would have refused (RFC 8461 5: reported, not
    enforced); None when nothing would have been refused or the mode is not testing."""
    if policy is None or policy.mode != "testing":
        return None
    problems = []
    if not policy.matches(host):
        problems.append(f"{host} is not listed in the policy")
    if not verified:
        problems.append("TLS not verified")
    return "; ".join(problems) or None


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
    dane: str | None = None  # verified | mismatch | unusable records | lookup failed; None: DANE does not apply

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
    mta_sts_source: str | None = None  # fetched | stored | stored_after_failure

    @property
    def verified_tls(self) -> bool:
        """At least one reachable MX offers verified TLS 1.2+ (and, under an enforced MTA-STS
        policy, is listed in it). Delivery that requires TLS uses only such hosts."""
        return any(self.usable_for_verified_tls(m) for m in self.mx)

    def usable_for_verified_tls(self, finding: MxFinding) -> bool:
        if not finding.verified_tls:
            return False
        if finding.dane == "verified":
            return True  # DANE takes precedence over MTA-STS (RFC 8461 2)
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
            dane = "; DANE" if best.dane == "verified" else ""
            return f"{best.host} offers verified {best.tls_version}{dane}{sts}"
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


async def with_dane(target: cpdns.MxTarget) -> tuple[cpdns.MxTarget, str | None]:
    """The target with its usable TLSA records (when DANE applies), and a note for evidence."""
    try:
        records = await cpdns.lookup_tlsa(target)
    except cpdns.DnsError:
        return target, "lookup failed"
    if not records:
        return target, None
    usable = usable_tlsa(records)
    if not usable:
        return target, "unusable records"
    return replace(target, tlsa=usable), "pending"


async def probe_mx(target: cpdns.MxTarget, settings: Settings, policy: MtaStsPolicy | None = None,
                   dane: str | None = None) -> MxFinding:
    match = policy.matches(target.host) if policy else None
    if dane == "lookup failed":
        return MxFinding(target.host, target.port, None, False, error="DANE TLSA look-up failed", mta_sts_match=match,
                         dane=dane)
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
            last_error = f"connect failed: {describe_error(err)}"
            continue
        try:
            offers = smtp.supports_extension("starttls")
            utf8 = smtp.supports_extension("smtputf8")
            if not offers:
                return MxFinding(target.host, target.port, address, True, False, utf8, mta_sts_match=match)
            try:
                info = await starttls(smtp, target, verify=True, settings=settings)
                return MxFinding(target.host, target.port, address, True, True, utf8, info.version, info.cipher,
                                 info.cert_fingerprint, True, mta_sts_match=match,
                                 dane="verified" if info.dane else (dane if dane != "pending" else None))
            except Exception as err:  # noqa: BLE001 - any TLS failure is a finding, not a crash
                reason = verification_error(err) or (
                    "TLS version too old" if "VERSION" in str(err).upper() else f"TLS failed: {describe_error(err)}"
                )
            # Look again without verification, to record what the server does offer.
            await close_quietly(smtp)
            smtp = await connect(target, address, settings)
            note = "mismatch" if target.tlsa else dane
            try:
                info = await starttls(smtp, replace(target, tlsa=()), verify=False, settings=settings)
                return MxFinding(target.host, target.port, address, True, True, utf8, info.version, info.cipher,
                                 info.cert_fingerprint, False, reason, mta_sts_match=match, dane=note)
            except Exception:  # noqa: BLE001
                return MxFinding(target.host, target.port, address, True, True, utf8, cert_error=reason,
                                 mta_sts_match=match, dane=note)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as err:
            last_error = f"SMTP failed: {describe_error(err)}"
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


async def probe_domain(domain: str, *, use_cache: bool = True, settings: Settings | None = None,
                       store: PolicyStore | None = None) -> DomainTls:
    """MX, STARTTLS/TLS findings for each MX (up to three, DANE where it applies), and the
    MTA-STS policy in force for ``domain`` (from ``store`` when a refresh fails)."""
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
    sts = await resolve_mta_sts(domain, settings, store)
    policy, policy_error = sts.policy, sts.error
    daned = await asyncio.gather(*(with_dane(t) for t in targets[:3]))
    findings = await asyncio.gather(*(probe_mx(t, settings, policy, note) for t, note in daned))
    result = DomainTls(
        domain=domain, mx=list(findings), mta_sts=policy, mta_sts_error=policy_error, checked_at=clock.now(),
        mx_overridden=any(t.overridden for t in targets), mta_sts_source=sts.source,
    )
    ttl = settings.tls_probe_cache_seconds
    if policy:
        ttl = min(ttl, policy.max_age)
    cache.put(domain, result, ttl)
    # The recipient domain is not logged: a personal domain can identify a patient.
    log.info("tls_probe", verified_tls=result.verified_tls, mx_count=len(findings),
             mta_sts=policy.mode if policy else None, seconds=round(time.monotonic() - started, 3))
    return result
