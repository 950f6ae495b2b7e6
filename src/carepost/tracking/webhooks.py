"""Outbound webhooks on the wire: Standard Webhooks signing, the retry schedule, and an HTTP POST
that cannot be turned against the network it runs in (SSRF).

Signing (https://www.standardwebhooks.com): every request carries ``webhook-id`` (the event id,
the same on every retry so receivers can de-duplicate), ``webhook-timestamp`` (seconds since the
epoch, at the attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``
keyed with the base64-decoded part of the endpoint secret ``whsec_<base64 of 32 random bytes>``.
Receivers should refuse timestamps more than five minutes away from their clock.

SSRF protection. A webhook URL is typed by an organization's user, and the worker that posts to
it sits inside the operator's network, so:

* only ``http`` and ``https``; no credentials in the URL;
* the host is resolved, and every address it resolves to must be public: loopback, private
  (RFC 1918, ULA), shared (100.64/10), link-local (169.254/16 — cloud metadata — and fe80::/10),
  multicast, reserved, unspecified and IPv4-mapped forms of those are refused — unless the
  operator allows them (``CAREPOST_WEBHOOK_ALLOW_PRIVATE=true``, or the host in
  ``CAREPOST_WEBHOOK_ALLOWED_HOSTS``);
* the check runs when an endpoint is saved and again at every attempt, and the connection is
  made to the very address that was checked (the name is never resolved twice), and the peer
  address of the open socket is checked once more: a DNS answer that changes between check and
  connect (rebinding) cannot reach an internal address;
* redirects are never followed (a 3xx is a failed attempt), and at most 64 KiB of the answer is
  read and thrown away.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from carepost import __version__
from carepost.core import netguard
from carepost.core.config import Settings, get_settings
from carepost.core.errors import ValidationFailed
from carepost.core.plainwords import describe_error

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
TIMESTAMP_TOLERANCE = 300  # seconds; what receivers should accept (the spec's recommendation)
MAX_URL_CHARS = 2000
MAX_RESPONSE_BYTES = 64 * 1024

# After attempt n fails, wait RETRY_SCHEDULE[n - 1]; the first attempt is immediate. Ten attempts
# over about three days (the schedule Svix publishes for Standard Webhooks).
RETRY_SCHEDULE = (
    timedelta(seconds=5), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2), timedelta(hours=5),
    timedelta(hours=10), timedelta(hours=14), timedelta(hours=20), timedelta(hours=24),
)
MAX_ATTEMPTS = len(RETRY_SCHEDULE) + 1


def retry_delay(attempts_made: int) -> timedelta | None:
    """How long to wait after ``attempts_made`` failed attempts; None when the schedule is over."""
    if 1 <= attempts_made <= len(RETRY_SCHEDULE):
        return RETRY_SCHEDULE[attempts_made - 1]
    return None


# --------------------------------------------------------------------------- signing


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>``."""
    mac = hmac.new(_secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict, body: bytes, *, now: float | None = None,
           tolerance: int = TIMESTAMP_TOLERANCE) -> bool:
    """A receiver's check (documented in docs/webhooks.md; also used by ``test-event`` tooling)."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = lower.get("webhook-id"), lower.get("webhook-timestamp"), lower.get("webhook-signature")
    if not (msg_id and stamp and signatures and stamp.isdigit()):
        return False
    if abs((now if now is not None else time.time()) - int(stamp)) > tolerance:
        return False
    expected = sign(secret, msg_id, int(stamp), body)
    return any(hmac.compare_digest(expected, s) for s in signatures.split() if s.startswith("v1,"))


def body_of(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- SSRF guard


# The guard itself lives in core/netguard.py: delivery (MX hosts, MTA-STS) uses the same one.
Refused = netguard.Refused
non_public_reason = netguard.non_public_reason


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # path and query


def parse_url(url: str, *, field: str = "url") -> Target:
    """Check the shape of a webhook URL (no network)."""
    if not isinstance(url, str) or not url.strip():
        raise ValidationFailed("Enter the endpoint URL.", field=field)
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise ValidationFailed(f"The URL is longer than {MAX_URL_CHARS} characters.", field=field)
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValidationFailed("The URL may not contain spaces or control characters.", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValidationFailed("The URL is not valid.", field=field) from None
    if parts.scheme not in ("http", "https"):
        raise ValidationFailed("The URL must start with https:// (or http://).", field=field)
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("The URL may not contain a user name or password; the signature authenticates CarePost.",
                               field=field)
    if parts.fragment:
        raise ValidationFailed("The URL may not contain a #fragment.", field=field)
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValidationFailed("The URL has no host.", field=field)
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode()
        except UnicodeError:
            raise ValidationFailed("The URL's host name is not valid.", field=field) from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


def resolve(target: Target, settings: Settings | None = None) -> list[str]:
    """The addresses to connect to, all of them allowed; raises :class:`Refused` otherwise."""
    settings = settings or get_settings()
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as err:
        raise Refused(f"the host does not resolve ({describe_error(err)})") from None
    addresses = []
    for info in infos:
        address = info[4][0]
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise Refused("the host does not resolve")
    for address in addresses:
        check_address(target.host, address, settings)
    return addresses


def check_address(host: str, address: str, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    netguard.check_address(host, address, allow_private=settings.webhook_allow_private,
                           allowed=settings.webhook_allowed_hosts,
                           hint="an administrator can allow it with CAREPOST_WEBHOOK_ALLOWED_HOSTS or "
                           "CAREPOST_WEBHOOK_ALLOW_PRIVATE")


def check_url(url: str, *, field: str = "url", settings: Settings | None = None) -> Target:
    """Shape and address checks for saving an endpoint: a 422 naming the field on refusal."""
    target = parse_url(url, field=field)
    try:
        resolve(target, settings)
    except Refused as err:
        raise ValidationFailed(f"This URL is not allowed: {err}.", field=field) from None
    return target


# --------------------------------------------------------------------------- the POST


@dataclass(frozen=True)
class PostResult:
    status_code: int | None
    duration_ms: int
    outcome: str  # succeeded | failed | gone | refused
    error: str | None = None


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand, never to a fresh DNS answer."""

    def __init__(self, target: Target, address: str, timeout: float, settings: Settings):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address
        self._settings = settings
        self._target = target

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self._address, self._target.port), timeout=self.timeout)
        try:
            # The peer we actually reached, checked again (defence in depth against rebinding).
            check_address(self._target.host, sock.getpeername()[0], self._settings)
        except Refused:
            sock.close()
            raise
        return sock

    def connect(self) -> None:
        self.sock = self._open()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    def connect(self) -> None:
        sock = self._open()
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self._settings.extra_ca_file:
            context.load_verify_locations(cafile=str(self._settings.extra_ca_file))
        self.sock = context.wrap_socket(sock, server_hostname=self._target.host)


def post(url: str, body: bytes, headers: dict[str, str], settings: Settings | None = None) -> PostResult:
    """POST ``body`` once. 2xx succeeds, 410 is ``gone``, a refused target is ``refused``, anything
    else (other codes, redirects, timeouts, TLS or connection errors) is ``failed``."""
    settings = settings or get_settings()
    started = time.monotonic()

    def done(outcome: str, code: int | None = None, error: str | None = None) -> PostResult:
        return PostResult(code, int((time.monotonic() - started) * 1000), outcome, error)

    try:
        target = parse_url(url)
        addresses = resolve(target, settings)
    except ValidationFailed as err:
        return done("refused", error=f"refused: {err.message}")
    except Refused as err:
        return done("refused", error=f"refused: {err}")
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    last_error = "no address could be reached"
    for address in addresses:
        conn = cls(target, address, settings.webhook_timeout, settings)
        try:
            conn.putrequest("POST", target.path, skip_accept_encoding=True)
            all_headers = {"Content-Type": "application/json", "User-Agent": f"CarePost-Webhooks/{__version__}",
                           "Content-Length": str(len(body)), **headers}
            for name, value in all_headers.items():
                conn.putheader(name, value)
            conn.endheaders(body)
            response = conn.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            code = response.status
        except Refused as err:
            return done("refused", error=f"refused: {err}")
        except ssl.SSLCertVerificationError as err:
            last_error = f"tls: certificate not verified ({err.verify_message or 'unknown reason'})"
            continue
        except ssl.SSLError as err:
            last_error = f"tls: {err.reason or 'handshake failed'}"
            continue
        except TimeoutError:
            last_error = "timeout: no answer in time"
            continue
        except ConnectionRefusedError:
            last_error = "connection refused"
            continue
        except (OSError, http.client.HTTPException) as err:
            last_error = f"network: {describe_error(err)}"
            continue
        finally:
            conn.close()
        if 200 <= code < 300:
            return done("succeeded", code)
        if code == 410:
            return done("gone", code, "410 Gone: the endpoint is disabled")
        if 300 <= code < 400:
            return done("failed", code, f"HTTP {code}: redirects are not followed")
        return done("failed", code, f"HTTP {code}")
    return done("failed", error=last_error)
