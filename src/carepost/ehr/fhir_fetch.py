"""Reading resources back from the organization's FHIR server (issue 15 item 3): what an
``id-only`` Subscription notification names but does not carry.

* **The server and the registration.** Per organization one :class:`~carepost.ehr.models.FhirServer`:
  the FHIR base URL and SMART Backend Services token endpoint (https; ``http://`` only to a
  loopback address and only with ``CAREPOST_EHR_FHIR_ALLOW_LOOPBACK_HTTP``, for a peer on the
  same machine in tests), the client id the EHR gave CarePost, and CarePost's signing key —
  generated here (ES384 on P-384, or RS384 with RSA 3072), the private key encrypted under the
  organization's data key like every other secret, the public key shown as a JWKS that the
  administrator registers with the EHR.
* **The fetch** (SMART Backend Services, `client_credentials` with `private_key_jwt`): a client
  assertion JWT (``iss``/``sub`` the client id, ``aud`` the token endpoint, ``exp`` 5 minutes,
  a fresh ``jti``; header ``alg``, ``kid``, ``typ``) signed with that key, exchanged for an
  access token, then ``GET <base>/<type>/<id>[/_history/<version>]``. The resource is validated
  with ``fhir.resources`` and recorded exactly as a full-resource notification
  (:func:`carepost.ehr.fhir.ingest`).
* **Where.** Never in the request that brought the notification: the notification route keeps
  the reference as a ``queued`` row of ``ehr_messages`` and, once that commits, queues
  :func:`carepost.ehr.tasks.fetch_id_only` with the organization's and the row's ids (no PHI in
  the payload). A fetch that fails for good (401/403 from the token endpoint or the server, 404,
  a resource that does not validate) puts the row in the error queue with a reason naming the
  step; a retry from the queue queues the fetch again.
* **Transient failures are retried by themselves.** The server unreachable, a timeout, HTTP
  408, 429 or 5xx (from the token endpoint or the FHIR server): the row stays ``queued`` with
  that reason, the attempt number and ``next_attempt_at`` (shown in the API and the error queue
  page), each failed attempt is audited, and the task is scheduled again with exponential
  backoff (:func:`retry_delay`) up to :data:`FETCH_ATTEMPTS` attempts, then the error queue. A
  task lost on the way (the queue restarted empty, a worker killed mid-fetch) is queued again
  by the minutely sweep :func:`carepost.ehr.tasks.fetch_due`; ``next_attempt_at`` doubles as the
  lease of the worker fetching it, so a reference is fetched by one worker at a time.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import NotFound, ValidationFailed
from carepost.core.ids import new_id
from carepost.ehr.models import EhrMessage, FhirServer

ALGORITHMS = ("ES384", "RS384")
DEFAULT_SCOPE = "system/Appointment.read system/Encounter.read"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TIMEOUT_SECONDS = 20.0
MAX_RESOURCE_BYTES = 256 * 1024
_CONTROL = re.compile(r"^id-only:([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]{1,64}))?(?:@|$)")


# --------------------------------------------------------------------------- the server and its key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(value: int, length: int | None = None) -> str:
    return _b64(value.to_bytes(length or (value.bit_length() + 7) // 8, "big"))


def check_url(value, field: str) -> str:
    """An https URL (no credentials, query or fragment); ``http://`` only to a loopback address
    with ``CAREPOST_EHR_FHIR_ALLOW_LOOPBACK_HTTP``."""
    from carepost.core.config import get_settings

    if not isinstance(value, str) or not value.strip() or len(value.strip()) > 500:
        raise ValidationFailed(f"{field} is an https URL of at most 500 characters.", field=field)
    text = value.strip().rstrip("/")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise ValidationFailed(f"{field} is not a valid URL.", field=field) from None
    if parts.username or parts.password or parts.query or parts.fragment or not parts.hostname:
        raise ValidationFailed(f"{field} is an https URL with a host and no credentials, query or fragment.",
                               field=field)
    if parts.scheme == "https":
        return text
    loopback = parts.hostname == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        pass
    if parts.scheme == "http" and loopback and get_settings().ehr_fhir_allow_loopback_http:
        return text
    raise ValidationFailed(f"{field} must use https (http only to a loopback address when "
                           "CAREPOST_EHR_FHIR_ALLOW_LOOPBACK_HTTP is set).", field=field)


def _new_key(algorithm: str):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if algorithm == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def public_jwk(private_key, algorithm: str) -> dict:
    """The public key as a JWK, its ``kid`` the RFC 7638 thumbprint."""
    if algorithm == "ES384":
        numbers = private_key.public_key().public_numbers()
        core = {"crv": "P-384", "kty": "EC", "x": _int_b64(numbers.x, 48), "y": _int_b64(numbers.y, 48)}
    else:
        numbers = private_key.public_key().public_numbers()
        core = {"e": _int_b64(numbers.e), "kty": "RSA", "n": _int_b64(numbers.n)}
    kid = _b64(hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).digest())
    return {**core, "kid": kid, "alg": algorithm, "use": "sig", "key_ops": ["verify"]}


def get_server(session: Session, org_id: str) -> FhirServer | None:
    return session.scalar(select(FhirServer).where(FhirServer.org_id == org_id))


def configure(session: Session, org_id: str, *, base_url: str, token_url: str, client_id: str,
              algorithm: str = "ES384", scope: str | None = None, new_key: bool = False,
              created_by: str | None = None) -> FhirServer:
    """Set the organization's FHIR server and SMART registration. A key pair is made the first
    time, when the algorithm changes, or with ``new_key`` (the EHR must then be given the new
    JWKS). The caller commits."""
    base = check_url(base_url, "base_url")
    token = check_url(token_url, "token_url")
    if not isinstance(client_id, str) or not client_id.strip() or len(client_id.strip()) > 255:
        raise ValidationFailed("client_id is the client id the EHR registered for CarePost (1 to 255 characters).",
                               field="client_id")
    if algorithm not in ALGORITHMS:
        raise ValidationFailed("algorithm is ES384 or RS384 (SMART Backend Services).", field="algorithm")
    scope = (scope or DEFAULT_SCOPE).strip()
    if len(scope) > 500 or any(c in scope for c in "\r\n\"\\"):
        raise ValidationFailed("scope is a space-separated list of SMART scopes (at most 500 characters).",
                               field="scope")
    row = get_server(session, org_id)
    if row is None:
        row = FhirServer(id=new_id(), org_id=org_id, created_by=created_by)
        session.add(row)
        new_key = True
    elif row.algorithm != algorithm:
        new_key = True
    row.base_url, row.token_url, row.client_id, row.scope = base, token, client_id.strip(), scope
    if new_key:
        from cryptography.hazmat.primitives import serialization

        key = _new_key(algorithm)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        row.algorithm = algorithm
        row.public_jwk = public_jwk(key, algorithm)
        row.key_id = row.public_jwk["kid"]
        row.private_key_enc = get_keyring().encrypt(session, org_id, FhirServer.__tablename__, "private_key", row.id,
                                                    pem)
    row.updated_at = clock.now()
    session.flush()
    _tokens.pop(org_id, None)
    return row


def remove(session: Session, org_id: str) -> None:
    row = get_server(session, org_id)
    if row is None:
        raise NotFound("No FHIR server is set for this organization.", field="fhir_server")
    session.delete(row)
    session.flush()
    _tokens.pop(org_id, None)


def server_out(row: FhirServer) -> dict:
    """What an administrator sees: never the private key; the public key as a JWKS."""
    return {"base_url": row.base_url, "token_url": row.token_url, "client_id": row.client_id, "scope": row.scope,
            "algorithm": row.algorithm, "key_id": row.key_id, "jwks": {"keys": [row.public_jwk]},
            "updated_at": row.updated_at.isoformat() if row.updated_at else None}


def _private_key(session: Session, row: FhirServer):
    from cryptography.hazmat.primitives import serialization

    pem = get_keyring().decrypt_text(session, row.org_id, FhirServer.__tablename__, "private_key", row.id,
                                     row.private_key_enc)
    return serialization.load_pem_private_key(pem.encode(), password=None)


def client_assertion(session: Session, row: FhirServer, now: float | None = None) -> str:
    """The signed JWT that authenticates CarePost at the token endpoint (``private_key_jwt``)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    now = int(now if now is not None else time.time())
    header = {"alg": row.algorithm, "kid": row.key_id, "typ": "JWT"}
    claims = {"iss": row.client_id, "sub": row.client_id, "aud": row.token_url, "exp": now + 300, "iat": now,
              "jti": secrets.token_urlsafe(24)}
    signing_input = (_b64(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64(json.dumps(claims, separators=(",", ":")).encode())).encode()
    key = _private_key(session, row)
    if row.algorithm == "ES384":
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    else:
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA384())
    return signing_input.decode() + "." + _b64(signature)


# --------------------------------------------------------------------------- fetching


class FetchFailed(Exception):
    """Why a resource could not be read back; ``text`` names the step, never a value.
    ``transient``: the server is down, overloaded or slow (unreachable, a timeout, HTTP 408, 429
    or 5xx) — the same request may well succeed later, so the fetch is tried again by itself;
    ``retry_after``: the server's Retry-After, in seconds, when it gave one."""

    def __init__(self, reason_code: str, text: str, field: str, *, transient: bool = False,
                 retry_after: float | None = None):
        super().__init__(text)
        self.reason_code, self.text, self.field = reason_code, text, field
        self.transient, self.retry_after = transient, retry_after


def _transient(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _retry_after(answer) -> float | None:
    """Retry-After in seconds (delta-seconds only; an HTTP date is ignored)."""
    value = (answer.headers.get("retry-after") or "").strip()
    return float(value) if value.isdigit() else None


_tokens: dict[str, tuple[str, float, str]] = {}  # org id -> (access token, expires at, token url)


def _token(session: Session, row: FhirServer, client) -> str:
    cached = _tokens.get(row.org_id)
    if cached and cached[1] > time.monotonic() + 30 and cached[2] == row.token_url:
        return cached[0]
    try:
        answer = client.post(row.token_url, data={
            "grant_type": "client_credentials", "scope": row.scope, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(session, row)}, headers={"Accept": "application/json"})
    except Exception:  # noqa: BLE001 - httpx raises many transport errors
        raise FetchFailed("fhir_token_unreachable", "The SMART token endpoint could not be reached.",
                          "token_url", transient=True) from None
    if answer.status_code in (400, 401, 403):
        raise FetchFailed("fhir_token_refused", f"The SMART token endpoint refused CarePost's client assertion "
                          f"(HTTP {answer.status_code}): check client_id and that the EHR holds CarePost's JWKS.",
                          "client_id")
    try:
        body = answer.json()
        token = body["access_token"]
        assert isinstance(token, str) and token and answer.status_code == 200
        expires = float(body.get("expires_in") or 300)
    except Exception:  # noqa: BLE001
        raise FetchFailed("fhir_token_failed", f"The SMART token endpoint gave no access token (HTTP "
                          f"{answer.status_code}).", "token_url", transient=_transient(answer.status_code),
                          retry_after=_retry_after(answer)) from None
    _tokens[row.org_id] = (token, time.monotonic() + min(expires, 3600), row.token_url)
    return token


def fetch(session: Session, row: FhirServer, rtype: str, rid: str, version: str | None) -> dict:
    """``GET <base>/<type>/<id>[/_history/<version>]`` with a SMART backend token: the resource (a
    dict, not yet validated) or :class:`FetchFailed`."""
    import httpx

    path = f"{rtype}/{rid}" + (f"/_history/{version}" if version else "")
    with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False, trust_env=False) as client:
        for attempt in (1, 2):
            token = _token(session, row, client)
            try:
                answer = client.get(f"{row.base_url}/{path}", headers={
                    "Authorization": f"Bearer {token}", "Accept": "application/fhir+json"})
            except Exception:  # noqa: BLE001
                raise FetchFailed("fhir_fetch_unreachable", "The FHIR server could not be reached.",
                                  "base_url", transient=True) from None
            if answer.status_code == 401 and attempt == 1:
                _tokens.pop(row.org_id, None)  # an expired or revoked token: one new one
                continue
            break
    if answer.status_code in (401, 403):
        raise FetchFailed("fhir_fetch_unauthorized", f"The FHIR server refused CarePost's access token (HTTP "
                          f"{answer.status_code}) reading {rtype}: check the scopes granted to client_id.", "scope")
    if answer.status_code in (404, 410):
        raise FetchFailed("fhir_fetch_not_found", f"The FHIR server has no such {rtype} (HTTP {answer.status_code}).",
                          f"{rtype}.id")
    if answer.status_code != 200:
        raise FetchFailed("fhir_fetch_failed", f"The FHIR server answered HTTP {answer.status_code} reading {rtype}.",
                          "base_url", transient=_transient(answer.status_code), retry_after=_retry_after(answer))
    if len(answer.content) > MAX_RESOURCE_BYTES:
        raise FetchFailed("fhir_fetch_invalid", f"The {rtype} read is larger than {MAX_RESOURCE_BYTES} bytes.", rtype)
    try:
        resource = answer.json()
    except ValueError:
        raise FetchFailed("fhir_fetch_invalid", f"The FHIR server's answer reading {rtype} is not JSON.",
                          rtype) from None
    if not isinstance(resource, dict) or resource.get("resourceType") != rtype or resource.get("id") != rid:
        raise FetchFailed("fhir_fetch_invalid", f"The FHIR server answered another resource than the {rtype} "
                          "the notification named.", f"{rtype}.id")
    return resource


# --------------------------------------------------------------------------- the queued fetch


def reference_of(row: EhrMessage) -> tuple[str, str, str | None]:
    """(type, id, version) of a queued id-only row, from its control id."""
    match = _CONTROL.match(row.control_id or "")
    if not match:
        raise ValueError("not an id-only control id")
    return match.group(1), match.group(2), match.group(3)


def fetch_after_commit(session: Session, org_id: str, message_id: str, delay: float = 0.0) -> None:
    """Queue the fetch of ``message_id`` once the session commits (ids only in the payload),
    ``delay`` seconds later."""
    from sqlalchemy import event as sa_event

    pending = session.info.setdefault("carepost_ehr_fetches", [])
    first = not pending
    pending.append((org_id, message_id, delay))
    if first:
        sa_event.listen(session, "after_commit", _queue_pending, once=True)
        sa_event.listen(session, "after_rollback", _forget_pending, once=True)


def _forget_pending(session: Session) -> None:
    session.info.pop("carepost_ehr_fetches", None)


def _queue_pending(session: Session) -> None:
    from carepost.ehr.tasks import fetch_id_only

    for org_id, message_id, delay in session.info.pop("carepost_ehr_fetches", []):
        try:
            if delay > 0:
                fetch_id_only.schedule((org_id, message_id), delay=delay)
            else:
                fetch_id_only(org_id, message_id)
        except Exception as exc:  # noqa: BLE001 - the queue is down: the sweep (fetch_due) queues it later
            import structlog

            structlog.get_logger("carepost.ehr").warning("ehr_fetch_queue_failed", message_id=message_id,
                                                         error_type=type(exc).__name__)


FETCH_ATTEMPTS = 8  # automatic attempts of one fetch before it waits in the error queue
RETRY_BASE_SECONDS = 30.0
RETRY_CAP_SECONDS = 3600.0
LEASE_SECONDS = TIMEOUT_SECONDS * 3 + 30  # a token request, a read and a second token: then it is free again
DUE_GRACE_SECONDS = 2.0


def retry_delay(attempt: int, retry_after: float | None = None) -> timedelta:
    """How long after failed attempt ``attempt`` (1, 2, ...) the next one is due: 30 s doubling
    up to an hour, ±10 % jitter so the fetches of an outage do not return together; at least the
    server's Retry-After (at most an hour)."""
    base = min(RETRY_BASE_SECONDS * 2 ** max(attempt - 1, 0), RETRY_CAP_SECONDS)
    seconds = base * (0.9 + 0.2 * secrets.randbelow(1001) / 1000)
    if retry_after is not None:
        seconds = max(seconds, min(retry_after, RETRY_CAP_SECONDS))
    return timedelta(seconds=seconds)


def _claim(org_id: str, message_id: str) -> tuple[str, str, str | None, int] | str:
    """Take a queued reference that is due: its ``next_attempt_at`` becomes the lease, so a second
    task (the sweep's, a duplicate) leaves it alone while this one fetches. Returns (type, id,
    version, attempt) or, when there is nothing to do, the row's status."""
    from carepost.core.database import org_session

    with org_session(org_id) as session:
        q = select(EhrMessage).where(EhrMessage.id == message_id, EhrMessage.org_id == org_id)
        if session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        row = session.scalars(q).first()
        if row is None or row.status != "queued":
            return row.status if row is not None else "missing"  # done already, locked, or retried elsewhere
        now = clock.now()
        if row.next_attempt_at is not None and clock.aware(row.next_attempt_at) > now + timedelta(
                seconds=DUE_GRACE_SECONDS):
            return "queued"  # not due, or another worker is fetching it: its task or the sweep comes back
        rtype, rid, version = reference_of(row)
        row.next_attempt_at = now + timedelta(seconds=LEASE_SECONDS)
        attempt = row.attempts or 1
        session.commit()
        return rtype, rid, version, attempt


def run_fetch(org_id: str, message_id: str) -> str:
    """The worker's part: fetch the resource a queued id-only row names and record it as a
    full-resource notification would; the row ends ``recorded``/``ignored`` (the fetched
    resource has a row of its own, in the error queue if it could not be recorded) or, when the
    fetch failed, in the error queue with the reason. A transient failure (the server down or
    overloaded, a timeout) keeps the row ``queued`` with the reason and the time of its next
    attempt, on :func:`retry_delay`'s schedule, up to :data:`FETCH_ATTEMPTS` attempts; each failed
    attempt is audited (``ehr_message.fetch_failed``). No transaction is open during the HTTP
    requests. Returns the row's status."""
    from carepost.audit.service import record_many
    from carepost.core.database import org_session, read_only_session
    from carepost.ehr import fhir as ehr_fhir
    from carepost.ehr import service

    claimed = _claim(org_id, message_id)
    if isinstance(claimed, str):
        return claimed
    rtype, rid, version, attempt = claimed
    resource = failed = None
    with read_only_session(org_id) as reading:
        server = get_server(reading, org_id)
        try:
            if server is None:
                raise FetchFailed("fhir_server_missing", "No FHIR server is set for this organization any more.",
                                  "fhir_server")
            resource = fetch(reading, server, rtype, rid, version)
        except FetchFailed as problem:
            failed = problem
    retry_in: timedelta | None = None
    with org_session(org_id) as session:
        row = session.get(EhrMessage, message_id, with_for_update=True, populate_existing=True)
        if row is None or row.status != "queued" or (row.attempts or 1) != attempt:
            return row.status if row is not None else "missing"  # discarded or retried by hand meanwhile
        audit = []
        try:
            if failed is not None:
                raise failed
            with session.begin_nested():
                outcome = ehr_fhir.ingest(session, org_id, resource, expected=rtype, actor_id=row.connection_id)
        except FetchFailed as failed_now:
            if failed_now.transient and attempt < FETCH_ATTEMPTS:
                retry_in = retry_delay(attempt, failed_now.retry_after)
                due = clock.now() + retry_in
                row.attempts, row.next_attempt_at = attempt + 1, due
                row.reason_code, row.error_field = failed_now.reason_code, failed_now.field[:60]
                row.reason = (f"{failed_now.text} Attempt {attempt} of {FETCH_ATTEMPTS} failed; the next is due at "
                              f"{due.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC.")[:300]
                row.updated_at = clock.now()
                audit.append({"org_id": org_id, "actor_type": "system", "actor_id": None,
                              "action": "ehr_message.fetch_failed", "target_type": "ehr_message",
                              "target_id": row.id, "outcome": "failure",
                              "details": {"source": service.SOURCE_FHIR, "reason": failed_now.reason_code,
                                          "field": failed_now.field, "attempt": attempt,
                                          "next_attempt_at": due.astimezone(UTC).isoformat()}})
                fetch_after_commit(session, org_id, row.id, delay=retry_in.total_seconds())
                outcome = None
            else:
                text = failed_now.text
                if failed_now.transient:
                    text = f"{text} Gave up after {attempt} attempts; retry it when the server is back."
                _mark(session, row, "error", failed_now.reason_code, text, failed_now.field)
                outcome = service.Outcome("AE", "error", org_id, row.id, reason_code=failed_now.reason_code,
                                          text=text, field=failed_now.field)
        except ehr_fhir.FhirProblem as problem:
            text = "The resource read from the FHIR server is not valid: " + problem.text
            _mark(session, row, "error", "fhir_fetch_invalid", text, problem.expression)
            outcome = service.Outcome("AE", "error", org_id, row.id, reason_code="fhir_fetch_invalid", text=text,
                                      field=problem.expression)
        else:
            if outcome.status in ("recorded", "replayed") and outcome.event_id:
                _mark(session, row, "recorded", "id_only_fetched", f"Read from the FHIR server and recorded as "
                      f"message {outcome.message_id}.", None)
                row.event_id, row.contact_id, row.event_name = outcome.event_id, outcome.contact_id, outcome.event_name
            else:
                where = "kept in the error queue" if outcome.status == "error" else "nothing to record"
                _mark(session, row, "ignored", "id_only_fetched", f"Read from the FHIR server as message "
                      f"{outcome.message_id} ({where}).", None)
        if outcome is not None and outcome.status in ("recorded", "error"):
            audit.append(service._audit_item(org_id, "system", None, outcome, service.SOURCE_FHIR))
        if audit:
            record_many(session, audit)
        session.commit()
        return row.status


def due_fetches(session: Session, *, now: datetime | None = None, grace: timedelta = timedelta(seconds=120),
                limit: int = 500) -> list[tuple[str, str]]:
    """(organization, message) of queued id-only references whose fetch is overdue by ``grace``
    — its task was lost (the queue restarted empty, the worker died mid-fetch, the queue was down
    at the commit) — for the sweep (:func:`carepost.ehr.tasks.fetch_due`), across organizations."""
    now = now or clock.now()
    t = EhrMessage.__table__.c
    rows = session.execute(select(t.org_id, t.id).where(
        t.status == "queued", t.source == "fhir", t.next_attempt_at <= now - grace)
        .order_by(t.next_attempt_at).limit(limit)).all()
    return [(org_id, message_id) for org_id, message_id in rows]


def _mark(session: Session, row: EhrMessage, status: str, reason_code: str, reason: str, field: str | None) -> None:
    row.status, row.reason_code, row.reason = status, reason_code, reason[:300]
    row.error_field = (field or None) and field[:60]
    row.ack_code = "AA" if status != "error" else "AE"
    row.updated_at, row.next_attempt_at = clock.now(), None
    if status == "error":
        # a retry queues the fetch again; what is kept is the reference (ids only), encrypted as any queued message
        row.raw_enc = get_keyring().encrypt(session, row.org_id, EhrMessage.__tablename__, "raw", row.id,
                                            json.dumps({"id_only": row.control_id}))
    else:
        row.raw_enc = None
    session.flush()


def requeue(session: Session, row: EhrMessage) -> None:
    """A retry from the error queue: fetch again (after the transaction commits)."""
    row.status, row.reason_code, row.attempts = "queued", "id_only_queued", 1  # a new round of attempts
    row.reason = "Queued to be read from the organization's FHIR server."
    row.error_field, row.raw_enc, row.ack_code, row.updated_at = None, None, "AA", clock.now()
    row.next_attempt_at = clock.now()
    session.flush()
    fetch_after_commit(session, row.org_id, row.id)
