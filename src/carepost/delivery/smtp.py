"""Outbound SMTP with aiosmtplib: pooled connections, enforced TLS, honest outcomes.

One :class:`DeliveryClient` per worker event loop. For each message (one envelope, recipients
of one domain) it finds the MX hosts (or the relay), takes a pooled connection to the first
host that works, runs one SMTP transaction and reports per recipient:

``delivered``        accepted by the receiving server (2xx after the final ".")
``deferred``         4xx, network trouble, DNS timeouts: retry with backoff (``retry_delay``)
``bounced``          5xx, or the domain receives no mail: permanent
``tls_unavailable``  the message needs verified TLS and no MX offered it (STARTTLS missing or
                     refused, certificate invalid, TLS older than 1.2, MTA-STS mismatch). Nothing
                     was sent; the pipeline takes the policy's fallback (portal or not at all).

A protected message is never sent in clear. A connection used for it has completed STARTTLS
with a verified certificate for the MX host name before MAIL FROM is written; connections that
are not verified are never handed out for such messages, and there is no code path that falls
back to plain text when ``require_verified_tls`` is set. ``_transaction`` checks it once more.

When the connection drops (or stalls) after the final "." was written but before the reply,
nobody can know whether the message arrived: the outcome is ``deferred`` with
``possible_duplicate`` set, so the retry is marked as such.

Replies from remote servers can quote the recipient address; results carry them for the
caller to store encrypted, and nothing here logs them.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import random
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import aiosmtplib

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.logging import get_logger
from carepost.core.plainwords import describe_error
from carepost.delivery import dns as cpdns
from carepost.delivery import tlsprobe
from carepost.delivery.tlsprobe import TlsSession

log = get_logger(__name__)

NETWORK_ERRORS = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPConnectError,
                  OSError, asyncio.TimeoutError, EOFError)
IDLE_SECONDS = 30.0  # pooled connections idle longer than this are closed, not reused
SLOT_IDLE_SECONDS = 2.0  # an idle connection holding a shared per-domain place is closed after this


class TlsUnavailable(Exception):
    """Verified TLS could not be established with an MX; the reason is safe to show."""


class DomainBusy(OSError):
    """Every connection the receiving domain allows (across all workers) is open: try later."""


@dataclass(frozen=True)
class Relay:
    """A smarthost and its login: the installation's (``CAREPOST_SMTP_RELAY``) or an
    organization's own (its delivery settings). ``owner`` is "" for the installation, else the
    organization id; pooled connections are kept apart per :attr:`pool_key`, so a connection
    logged in for one organization is never used for another's mail."""

    target: cpdns.MxTarget
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    owner: str = ""
    enforces_tls: bool = False  # delivers onward only over verified TLS (the policy's concern, not the pool's)

    @property
    def pool_key(self) -> tuple:
        login = hashlib.sha256(f"{self.username or ''}\0{self.password or ''}".encode()).hexdigest()[:32]
        return ("relay", self.owner, login)


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: list[str]
    message: bytes  # the final wire form: composed, encrypted if so decided, DKIM-signed
    smtputf8: bool = False
    require_verified_tls: bool = False
    relay: Relay | None = field(default=None, repr=False)  # the organization's relay; None: the installation's, or MX

    @property
    def domain(self) -> str:
        domains = {r.rsplit("@", 1)[1].lower() for r in self.recipients}
        if len(domains) != 1:
            raise ValueError("an envelope holds recipients of exactly one domain")
        return domains.pop()


@dataclass
class Evidence:
    """How a delivery was protected, as kept and shown for every recipient."""

    mx_host: str | None = None
    address: str | None = None
    port: int | None = None
    tls_version: str | None = None
    cipher: str | None = None
    cert_fingerprint: str | None = None
    cert_verified: bool = False
    dane: bool = False  # the certificate was authenticated by DNSSEC-validated TLSA records (RFC 7672)
    mta_sts: str | None = None  # the domain's MTA-STS mode when it publishes a policy (enforce | testing | none)
    mta_sts_id: str | None = None
    mta_sts_source: str | None = None  # fetched | stored | stored_after_failure (RFC 8461 5.1)
    mta_sts_report: str | None = None  # mode testing: what enforce would have refused (reported, not enforced)
    relay: bool = False
    reply_code: int | None = None
    reply: str | None = None
    at: datetime | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["at"] = self.at.isoformat() if self.at else None
        return data


@dataclass
class RecipientResult:
    address: str
    status: str  # delivered | deferred | bounced | tls_unavailable
    reason: str
    reply_code: int | None = None
    possible_duplicate: bool = False
    evidence: Evidence | None = None


@dataclass
class PooledConnection:
    smtp: aiosmtplib.SMTP
    target: cpdns.MxTarget
    address: str
    tls: TlsSession
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    messages: int = 0
    authenticated: bool = False
    route: tuple = ()  # Relay.pool_key for a relay connection, () for an MX
    slot: tuple | None = None  # (limit key, lease token): this connection's place in the shared per-domain count

    @property
    def key(self) -> tuple:
        return (self.target.host, self.address, self.target.port, self.route)


def _describe(err: BaseException) -> str:
    """A short, PHI-free description of a failure (replies are summarised by code only)."""
    if isinstance(err, DomainBusy):
        return str(err)
    if isinstance(err, aiosmtplib.SMTPConnectTimeoutError):
        return "connect timed out"
    if isinstance(err, aiosmtplib.SMTPConnectError):
        cause = err.__cause__ or err.__context__
        return "connection refused" if isinstance(cause, ConnectionRefusedError) else "connection failed"
    if isinstance(err, aiosmtplib.SMTPResponseException) and err.code > 0:
        return f"{err.code} reply"
    if isinstance(err, aiosmtplib.SMTPResponseException):
        return "malformed SMTP reply"
    if isinstance(err, (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(err, aiosmtplib.SMTPServerDisconnected):
        return "connection lost"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    return describe_error(err)


def classify_code(code: int | None) -> str:
    if code is not None and 200 <= code < 300:
        return "delivered"
    if code is not None and 500 <= code < 600:
        return "bounced"
    return "deferred"


def retry_delay(attempt: int, *, base: float = 300.0, cap: float = 4 * 3600.0) -> timedelta:
    """Exponential backoff with ±10 % jitter: 5 min, 10, 20, 40... up to 4 h between tries."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return timedelta(seconds=delay * random.uniform(0.9, 1.1))


def retries_exhausted(first_attempt_at: datetime, settings: Settings | None = None) -> bool:
    """True once deferred delivery has been retried for ``CAREPOST_DELIVERY_RETRY_HOURS``."""
    settings = settings or get_settings()
    return clock.now() - clock.aware(first_attempt_at) >= timedelta(hours=settings.delivery_retry_hours)


async def open_connection(target: cpdns.MxTarget, address: str, *, require_verified: bool,
                          settings: Settings) -> PooledConnection:
    """Connect, EHLO, STARTTLS. With ``require_verified`` anything short of verified TLS 1.2+
    raises TlsUnavailable and the connection is closed before a single mail command."""
    require_verified = require_verified or bool(target.tlsa)  # DANE: authenticated TLS or nothing (RFC 7672)
    smtp = await tlsprobe.connect(target, address, settings)
    if not smtp.supports_extension("starttls"):
        if require_verified:
            await tlsprobe.close_quietly(smtp)
            raise TlsUnavailable("STARTTLS not offered")
        return PooledConnection(smtp, target, address, TlsSession(None, None, None, False))
    try:
        info = await tlsprobe.starttls(smtp, target, verify=True, settings=settings)
        return PooledConnection(smtp, target, address, info)
    except Exception as err:  # noqa: BLE001 - every TLS failure is handled the same way
        reason = tlsprobe.verification_error(err) or f"STARTTLS failed: {_describe(err)}"
        await tlsprobe.close_quietly(smtp)
        if require_verified:
            raise TlsUnavailable(reason) from None
    # Opportunistic (RFC 7435): encrypted without verification, else clear text.
    smtp = await tlsprobe.connect(target, address, settings)
    try:
        info = await tlsprobe.starttls(smtp, target, verify=False, settings=settings)
        return PooledConnection(smtp, target, address, info)
    except Exception:  # noqa: BLE001
        await tlsprobe.close_quietly(smtp)
    smtp = await tlsprobe.connect(target, address, settings)
    return PooledConnection(smtp, target, address, TlsSession(None, None, None, False))


def _peer(conn: PooledConnection) -> tuple | None:
    try:
        peer = conn.smtp.get_transport_info("peername")
    except Exception:  # noqa: BLE001 - a closed transport: fall back to the address dialed
        return None
    return (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None


_POOLS_HOLDING_SLOTS: weakref.WeakSet = weakref.WeakSet()
_POOLS_LOCK = threading.Lock()


@atexit.register
def _release_slots_at_exit() -> None:
    """A worker that exits (SIGTERM, the end of ``carepost run``) gives back the shared per-domain
    places its connections hold, open or idle: the connections end with the process. Without this
    they stayed taken for their whole lease (minutes), and the workers that remained, or the
    restarted one, could open only the domain's few places left (seen in bench/scale_out.py: 17 of
    20 places held after every worker had stopped)."""
    with _POOLS_LOCK:
        pools = list(_POOLS_HOLDING_SLOTS)
    for pool in pools:
        pool.release_every_slot()


class ConnectionPool:
    """Idle connections per destination (MX host, address, port, and for a relay whose relay and
    login), at most ``size`` in use and kept per destination. A connection carries its TLS state; one without verified TLS is never
    handed to a caller that requires it."""

    def __init__(self, settings: Settings, size: int, max_messages: int):
        self.settings = settings
        self.size = max(1, size)
        self.max_messages = max(1, max_messages)
        self._idle: dict[tuple, list[PooledConnection]] = {}
        self._slots: dict[tuple, asyncio.Semaphore] = {}
        self.opened = 0
        # Open connections per receiving domain, across every worker (core.limits; Redis when set).
        self.domain_max = settings.domain_max_connections
        self.lease = 2 * settings.smtp_timeout + IDLE_SECONDS + 30
        self._held: set[tuple] = set()  # the shared places this pool's connections hold

    async def _domain_slot(self, limit_key: str | None) -> tuple | None:
        """A leased place among the receiving domain's open connections, waiting up to the SMTP
        timeout for one to free up; :class:`DomainBusy` (the message is deferred) after that."""
        if not limit_key or not self.domain_max:
            return None
        from carepost.core.limits import LimitsUnavailable, get_limits

        limits = get_limits()
        deadline = time.monotonic() + self.settings.smtp_timeout
        delay = 0.02
        while True:
            try:
                token = limits.acquire_slot("conn:" + limit_key, self.domain_max, self.lease)
            except LimitsUnavailable as exc:
                raise DomainBusy(str(exc)) from None
            if token is not None:
                slot = ("conn:" + limit_key, token)
                self._held.add(slot)
                with _POOLS_LOCK:
                    _POOLS_HOLDING_SLOTS.add(self)
                return slot
            if time.monotonic() >= deadline:
                raise DomainBusy(f"all {self.domain_max} connections the domain allows are in use")
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)

    async def _close(self, conn: PooledConnection) -> None:
        await tlsprobe.close_quietly(conn.smtp)
        self._free_slot(conn)

    def _release_slot(self, slot: tuple | None) -> None:
        if slot is not None:
            from carepost.core.limits import LimitsUnavailable, get_limits

            self._held.discard(slot)
            try:
                get_limits().release_slot(*slot)
            except LimitsUnavailable:
                pass  # the lease runs out on its own

    def _free_slot(self, conn: PooledConnection) -> None:
        slot, conn.slot = conn.slot, None
        self._release_slot(slot)

    def _renew(self, conn: PooledConnection) -> None:
        if conn.slot is not None:
            from carepost.core.limits import LimitsUnavailable, get_limits

            try:
                get_limits().renew_slot(conn.slot[0], conn.slot[1], self.lease)
            except LimitsUnavailable:
                pass

    def _slot(self, key: tuple) -> asyncio.Semaphore:
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(self.size)
        return self._slots[key]

    async def acquire(self, target: cpdns.MxTarget, address: str, *, require_verified: bool,
                      route: tuple = (), limit_key: str | None = None) -> PooledConnection:
        key = (target.host, address, target.port, route)
        await self._slot(key).acquire()
        try:
            # Take what is needed from the idle list before the first await: other senders share
            # it, and a connection they took while this one awaited must not be taken twice.
            idle = self._idle.get(key, [])
            now = time.monotonic()
            stale = [c for c in idle if not c.smtp.is_connected or now - c.last_used > IDLE_SECONDS]
            usable = [c for c in idle if c not in stale and (c.tls.verified or not require_verified)]
            chosen = usable[0] if usable else None
            idle[:] = [c for c in idle if c not in stale and c is not chosen]
            for conn in stale:
                await self._close(conn)
            if chosen is not None:
                self._renew(chosen)
                return chosen
            slot = await self._domain_slot(limit_key)
            try:
                conn = await open_connection(target, address, require_verified=require_verified, settings=self.settings)
            except BaseException:
                self._release_slot(slot)
                raise
            conn.route = route
            conn.slot = slot
            self.opened += 1
            return conn
        except BaseException:
            self._slot(key).release()
            raise

    async def release(self, conn: PooledConnection, *, healthy: bool) -> None:
        conn.last_used = time.monotonic()
        idle = self._idle.setdefault(conn.key, [])
        try:
            if healthy and conn.smtp.is_connected and conn.messages < self.max_messages and len(idle) < self.size:
                self._renew(conn)
                idle.append(conn)
                if conn.slot is not None:
                    # It holds one of the domain's shared places: give it back soon when this
                    # worker has nothing more for the domain, so another worker may connect.
                    asyncio.get_running_loop().call_later(SLOT_IDLE_SECONDS, self._reap_if_idle, conn, conn.last_used)
            else:
                await self._close(conn)
        finally:
            self._slot(conn.key).release()

    def _reap_if_idle(self, conn: PooledConnection, released_at: float) -> None:
        idle = self._idle.get(conn.key, [])
        if conn in idle and conn.last_used == released_at:
            idle.remove(conn)
            asyncio.ensure_future(self._close(conn))

    def release_every_slot(self) -> None:
        """Give back every shared place this pool holds (the process is ending)."""
        for slot in self._held.copy():  # a set's copy is atomic; the loop's thread may still run
            self._release_slot(slot)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                await self._close(conn)
        self._idle.clear()


def parse_relay(value: str) -> cpdns.MxTarget:
    if "@" in value:
        [(_, target)] = cpdns.parse_mx_overrides(f"relay={value}", 587).items()
        return target
    host, port = cpdns._split_host_port(value, 587, "CAREPOST_SMTP_RELAY")
    return cpdns.MxTarget(host=host.lower(), preference=0, port=port, overridden=True)


class DeliveryClient:
    def __init__(self, settings: Settings | None = None, *, pool_size: int | None = None,
                 max_messages_per_connection: int | None = None, per_domain_rate: float | None = None,
                 policy_store: tlsprobe.PolicyStore | None = None):
        self.settings = settings or get_settings()
        self.pool = ConnectionPool(
            self.settings,
            pool_size or self.settings.smtp_pool_size,
            max_messages_per_connection or self.settings.smtp_max_messages_per_connection,
        )
        self.per_domain_rate = per_domain_rate
        self._next_slot: dict[str, float] = {}
        self._sts: dict[str, tuple[float, tlsprobe.PolicyResult]] = {}
        self.relay = parse_relay(self.settings.smtp_relay) if self.settings.smtp_relay else None
        self.installation_relay = Relay(
            self.relay, self.settings.smtp_relay_username or None,
            self.settings.smtp_relay_password.get_secret_value() if self.settings.smtp_relay_password else None,
            enforces_tls=bool(self.settings.smtp_relay_enforces_tls),
        ) if self.relay else None
        self.policy_store = policy_store

    def route(self, envelope: Envelope) -> Relay | None:
        """The relay this envelope goes through: its organization's, else the installation's;
        None: directly to the recipient's MX."""
        return envelope.relay or self.installation_relay

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> DeliveryClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the named steps of one delivery, top to bottom --------------------------------------

    async def deliver(self, envelope: Envelope) -> list[RecipientResult]:
        domain = envelope.domain
        relay = self.route(envelope)
        targets, failure = await self._find_targets(domain, relay)
        if failure:
            return failure(envelope)
        sts = tlsprobe.PolicyResult(None) if relay else await self._mta_sts(domain)
        policy = sts.policy
        enforce = policy is not None and policy.mode == "enforce"
        require = envelope.require_verified_tls or enforce or relay is not None
        tls_failures, network_failures, refusals = [], [], []
        paced = False
        if not relay:
            targets = await self._with_dane(targets, tls_failures)
        if enforce:
            # A host DANE authenticates needs no MTA-STS listing (DANE takes precedence, RFC 8461 2).
            targets = [t for t in targets if policy.matches(t.host) or t.tlsa]
            if not targets:
                return self._all(envelope, "tls_unavailable" if envelope.require_verified_tls else "deferred",
                                 "no MX host matches the domain's enforced MTA-STS policy")
        for target in targets:
            addresses = await self._addresses(target, network_failures, refusals)
            for address in addresses[:2]:
                try:
                    conn = await self.pool.acquire(target, address, require_verified=require,
                                                   route=relay.pool_key if relay else (),
                                                   limit_key=("relay:" + relay.target.host) if relay else domain)
                except TlsUnavailable as err:
                    tls_failures.append(f"{target.host}: {err}")
                    break  # the same host at another address presents the same certificate
                except NETWORK_ERRORS + (aiosmtplib.SMTPException,) as err:
                    network_failures.append(f"{target.host}: {_describe(err)}")
                    continue
                if not paced:
                    # The domain's token is taken with a connection in hand, just before the
                    # transaction: taken earlier, a message that then waits for one of the
                    # domain's few connections would spend it waiting, and the waiting messages
                    # would reach the domain together, faster than its rate.
                    paced = True
                    try:
                        too_fast = await self._respect_rate(domain)
                    except BaseException:
                        await self.pool.release(conn, healthy=True)
                        raise
                    if too_fast:
                        await self.pool.release(conn, healthy=True)
                        return self._all(envelope, "deferred", too_fast)
                results, healthy = await self._send(conn, envelope, sts, relay)
                await self.pool.release(conn, healthy=healthy)
                if results is not None:
                    return results
                network_failures.append(f"{target.host}: connection lost before the transaction")
        if tls_failures and envelope.require_verified_tls:
            return self._all(envelope, "tls_unavailable", "verified TLS unavailable: " + "; ".join(tls_failures))
        if refusals and not (tls_failures or network_failures):
            # Every MX resolves to non-public addresses only (SSRF guard): nothing to retry.
            return self._all(envelope, "bounced", "no MX host with a public address: " + "; ".join(refusals))
        return self._all(envelope, "deferred", "; ".join(tls_failures + network_failures) or "no MX host reachable")

    async def _respect_rate(self, domain: str) -> str | None:
        """Per-domain rate limit. ``CAREPOST_DOMAIN_RATE_PER_MINUTE``: a token bucket shared by
        every worker (core.limits; Redis when set) holding one second of messages; a message
        waits for its token, or is deferred (the reason returned) when the wait would pass the
        SMTP timeout. ``per_domain_rate`` (messages per second, this client only): spaced apart."""
        if not self.per_domain_rate:
            per_minute = self.settings.domain_rate_per_minute
            if not per_minute:
                return None
            from carepost.core.limits import LimitsUnavailable, get_limits

            rate = per_minute / 60.0
            try:
                wait = get_limits().reserve("domain:" + domain, rate, max(1.0, rate), 1,
                                            max_wait=self.settings.smtp_timeout)
            except LimitsUnavailable as exc:
                return f"domain rate limit: {exc}"
            if wait is None:
                return f"domain rate limit: {per_minute} messages per minute reached"
            if wait > 0:
                await asyncio.sleep(wait)
            return None
        now = time.monotonic()
        slot = max(now, self._next_slot.get(domain, now))
        self._next_slot[domain] = slot + 1.0 / self.per_domain_rate
        if slot > now:
            await asyncio.sleep(slot - now)
        return None

    async def _find_targets(self, domain: str, relay: Relay | None = None):
        if relay:
            return [relay.target], None
        try:
            return await cpdns.lookup_mx(domain, settings=self.settings), None
        except cpdns.DnsError as err:
            status, reason = ("deferred" if err.temporary else "bounced"), str(err)
            return [], lambda env: self._all(env, status, reason)

    async def _mta_sts(self, domain: str) -> tlsprobe.PolicyResult:
        """The policy in force (tlsprobe.resolve_mta_sts: stored policies outlive failed refreshes
        until their max_age). Kept in memory briefly; a failure is retried after five minutes."""
        cached = self._sts.get(domain)
        if cached and cached[0] > clock.now().timestamp():
            return cached[1]
        result = await tlsprobe.resolve_mta_sts(domain, self.settings, self.policy_store)
        if result.error:
            ttl = 300
        else:
            ttl = min(self.settings.tls_probe_cache_seconds, result.policy.max_age if result.policy else 3600)
        self._sts[domain] = (clock.now().timestamp() + ttl, result)
        return result

    async def _with_dane(self, targets: list[cpdns.MxTarget], tls_failures: list[str]) -> list[cpdns.MxTarget]:
        """Each target with its usable DANE TLSA records; a validated host whose TLSA look-up
        fails is dropped (a TLS failure: it must not be used without its records)."""
        out = []
        for target in targets:
            found, note = await tlsprobe.with_dane(target)
            if note == "lookup failed":
                tls_failures.append(f"{target.host}: DANE TLSA look-up failed")
                continue
            out.append(found)
        return out

    async def _addresses(self, target: cpdns.MxTarget, failures: list[str], refusals: list[str]) -> list[str]:
        if target.address:
            return [target.address]
        try:
            addresses = await cpdns.resolve_addresses(target.host)
        except cpdns.DnsError as err:
            failures.append(f"{target.host}: {err}")
            return []
        if not addresses:
            failures.append(f"{target.host}: no address")
            return []
        allowed, refused = tlsprobe.guard_addresses(target, addresses, self.settings)
        if refused and not allowed:
            refusals.append(f"{target.host}: refused: {refused}")
        return allowed

    async def _send(self, conn: PooledConnection, envelope: Envelope, sts,
                    relay: Relay | None = None) -> tuple[list[RecipientResult] | None, bool]:
        """One transaction. Returns (results, connection healthy); results None means the
        connection was found dead before anything was sent."""
        reused = conn.messages > 0
        try:
            return await self._transaction(conn, envelope, sts, relay), True
        except _StaleConnection:
            pass
        except _Broken as broken:
            return broken.results, False
        if not reused:
            return None, False
        # A pooled connection the server had closed in the meantime: once more on a fresh one.
        try:
            fresh = await open_connection(conn.target, conn.address, require_verified=conn.tls.verified,
                                          settings=self.settings)
        except (TlsUnavailable, aiosmtplib.SMTPException) + NETWORK_ERRORS:
            return None, False
        fresh.route = conn.route
        try:
            return await self._transaction(fresh, envelope, sts, relay), False
        except _StaleConnection:
            return None, False
        except _Broken as broken:
            return broken.results, False
        finally:
            await tlsprobe.close_quietly(fresh.smtp)

    def _evidence(self, conn: PooledConnection, sts, code: int | None, reply: str | None) -> Evidence:
        policy = sts.policy if sts is not None else None
        peer = _peer(conn)  # the connected socket's peer: the MX address and port it was handed to
        return Evidence(
            mx_host=conn.target.host, address=peer[0] if peer else conn.address,
            port=peer[1] if peer else conn.target.port, tls_version=conn.tls.version,
            cipher=conn.tls.cipher, cert_fingerprint=conn.tls.cert_fingerprint, cert_verified=conn.tls.verified,
            dane=conn.tls.dane, mta_sts=policy.mode if policy else None, mta_sts_id=policy.id if policy else None,
            mta_sts_source=sts.source if policy else None,
            mta_sts_report=tlsprobe.testing_report(policy, conn.target.host, conn.tls.verified),
            relay=bool(conn.route), reply_code=code, reply=reply, at=clock.now(),
        )

    async def _transaction(self, conn: PooledConnection, envelope: Envelope, policy,
                           relay: Relay | None = None) -> list[RecipientResult]:
        smtp = conn.smtp
        if (envelope.require_verified_tls or relay) and not conn.tls.verified:
            # Unreachable by construction (see ConnectionPool.acquire); kept as the last guard.
            raise RuntimeError("refusing to send a protected message without verified TLS")
        if relay is not None and conn.route != relay.pool_key:
            # Unreachable by construction (the pool is keyed by relay and login); the last guard.
            raise RuntimeError("refusing to use a connection of another relay or login")
        if relay and relay.username and not conn.authenticated:
            password = relay.password or ""
            try:
                # One mechanism, no guessing: PLAIN inside verified TLS (RFC 4616), else LOGIN.
                if "plain" in [m.lower() for m in smtp.server_auth_methods] or not smtp.server_auth_methods:
                    await smtp.auth_plain(relay.username, password)
                else:
                    await smtp.auth_login(relay.username, password)
            except aiosmtplib.SMTPException as err:
                raise _Broken(self._all(envelope, "deferred", f"relay login failed: {_describe(err)}")) from None
            conn.authenticated = True
        options, encoding = [], "ascii"
        if envelope.smtputf8:
            if not smtp.supports_extension("smtputf8"):
                return self._all(envelope, "bounced",
                                 "the recipient's server does not accept internationalized addresses (SMTPUTF8)",
                                 evidence=self._evidence(conn, policy, None, None))
            options, encoding = ["SMTPUTF8"], "utf-8"
        try:
            await smtp.mail(envelope.sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPSenderRefused as err:
            await self._rset(smtp)
            return self._all(envelope, classify_code(err.code), f"sender refused: {err.code}",
                             code=err.code, evidence=self._evidence(conn, policy, err.code, err.message))
        except NETWORK_ERRORS + (aiosmtplib.SMTPResponseException,) as err:
            if conn.messages > 0 and isinstance(err, aiosmtplib.SMTPServerDisconnected):
                raise _StaleConnection() from None
            raise _Broken(self._all(envelope, "deferred", f"MAIL FROM failed: {_describe(err)}",
                                    evidence=self._evidence(conn, policy, None, None)))
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        for rcpt in envelope.recipients:
            try:
                await smtp.rcpt(rcpt, encoding=encoding)
                accepted.append(rcpt)
            except aiosmtplib.SMTPRecipientRefused as err:
                results[rcpt] = RecipientResult(rcpt, classify_code(err.code), f"recipient refused: {err.code}",
                                                err.code, evidence=self._evidence(conn, policy, err.code, err.message))
            except NETWORK_ERRORS + (aiosmtplib.SMTPResponseException,) as err:
                raise _Broken(self._all(envelope, "deferred", f"RCPT TO failed: {_describe(err)}",
                                        evidence=self._evidence(conn, policy, None, None)))
        if not accepted:
            await self._rset(smtp)
            return [results[r] for r in envelope.recipients]
        code, reply, status, reason, dup = await self._data(conn, envelope.message)
        conn.messages += 1
        for rcpt in accepted:
            results[rcpt] = RecipientResult(rcpt, status, reason, code, dup, self._evidence(conn, policy, code, reply))
        ordered = [results[r] for r in envelope.recipients]
        if dup or code is None:
            raise _Broken(ordered)
        if status != "delivered":
            await self._rset(smtp)
        return ordered

    async def _data(self, conn: PooledConnection, message: bytes):
        """DATA, watching whether the final "." left this machine: a drop after it is a possible
        duplicate, a drop before it is not. (aiosmtplib writes the DATA command and the payload
        with two ``protocol.write`` calls; the second one carries the final ".".)"""
        smtp = conn.smtp
        protocol = smtp.protocol
        payload_sent = False
        original_write = protocol.write

        def write(data: bytes) -> None:
            nonlocal payload_sent
            original_write(data)  # raises when the connection is already closed
            if data.endswith(b"\r\n.\r\n"):
                payload_sent = True

        protocol.write = write
        try:
            response = await smtp.data(message)
            return response.code, response.message, "delivered", f"accepted: {response.code}", False
        except aiosmtplib.SMTPDataError as err:
            return err.code, err.message, classify_code(err.code), f"message refused: {err.code}", False
        except NETWORK_ERRORS + (aiosmtplib.SMTPResponseException,) as err:
            if payload_sent:
                return None, None, "deferred", f"no reply after the message was sent ({_describe(err)}): possible duplicate", True
            return None, None, "deferred", f"DATA failed: {_describe(err)}", False
        finally:
            if protocol is not None:
                protocol.write = original_write

    async def _rset(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.rset()
        except Exception:  # noqa: BLE001 - the connection will be closed instead of reused
            smtp.close()

    @staticmethod
    def _all(envelope: Envelope, status: str, reason: str, *, code: int | None = None,
             evidence: Evidence | None = None) -> list[RecipientResult]:
        return [RecipientResult(r, status, reason, code, False, evidence) for r in envelope.recipients]


class _StaleConnection(Exception):
    pass


class _Broken(Exception):
    """The transaction ended with results, and the connection must not be reused."""

    def __init__(self, results: list[RecipientResult]):
        super().__init__("connection broken")
        self.results = results
