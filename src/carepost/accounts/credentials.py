"""API credentials: API keys, HTTP Basic, OAuth 2.0 client credentials and HMAC-signed requests.

HIPAA 164.312(d) (person or entity authentication) for API clients. One credential, four ways
to present it:

``Authorization: Bearer <key id>.<secret>``
    the API key itself (``cpk_...`` . ``cp_sk_...``).
``Authorization: Basic base64(<key id>:<secret>)``
    the same pair as HTTP Basic (RFC 7617).
``Authorization: Bearer cp_at_...``
    a short-lived access token from ``POST /api/v1/oauth/token`` (RFC 6749 section 4.4,
    client credentials grant; revocation RFC 7009 at ``POST /api/v1/oauth/revoke``).
``Authorization: CarePost-HMAC-SHA256 Credential=<key id>, Timestamp=<unix seconds>, Nonce=<nonce>, Signature=<base64>``
    a signed request; the secret never travels. See :func:`string_to_sign`.

Storage (ARCHITECTURE.md section 5, "secrets stored hashed"):

* the key id is public; the secret is shown once and only its HMAC-SHA256 is stored. Not
  Argon2: the secret is 256 random bits, so a slow hash adds no resistance to guessing, while it
  would cost tens of milliseconds and megabytes on *every* API request;
* the HMAC signing key is derived from the secret (:func:`derive_signing_key`) and stored
  encrypted with the organization's data key, because the verifier has to recompute signatures;
* OAuth access tokens are random and stored as SHA-256.

Failures answer one generic 401 whatever was wrong (unknown key, wrong secret, expired,
revoked, bad signature, stale timestamp, replayed nonce); the reason goes to the audit log only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import parse_qsl, quote, unquote, unquote_plus

from sqlalchemy import delete, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.accounts.access import Principal, request_context
from carepost.accounts.models import ApiCredential, OAuthToken, Organization, RequestNonce
from carepost.accounts.permissions import API_SCOPES, OWNER_ONLY_SCOPES
from carepost.accounts.ratelimit import enforce, limiter_in_process, redis_client
from carepost.accounts.ports import record
from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.crypto import get_keyring
from carepost.core.database import ALL_ORGANIZATIONS, begin_read
from carepost.core.errors import NotFound, PermissionDenied, ValidationFailed
from carepost.core.ids import new_id
from carepost.core.logging import get_logger

log = get_logger("carepost.credentials")

KEY_ID_PREFIX = "cpk_"
SECRET_PREFIX = "cp_sk_"
ACCESS_TOKEN_PREFIX = "cp_at_"
HMAC_SCHEME = "CarePost-HMAC-SHA256"
SIGNING_KEY_LABEL = b"CarePost-HMAC-SHA256 signing key v1"
_SECRET_HASH_LABEL = b"CarePost API secret v1"
_SECRET_HASH_PREFIX = "hs256$"

_KEY_ID_RE = re.compile(r"^cpk_[0-9a-f]{24}$")
_SECRET_RE = re.compile(r"^cp_sk_[A-Za-z0-9_\-]{43}$")
_ACCESS_TOKEN_RE = re.compile(r"^cp_at_[A-Za-z0-9_\-]{43}$")
_NONCE_RE = re.compile(r"^[A-Za-z0-9_\-]{16,128}$")
_TIMESTAMP_RE = re.compile(r"^[0-9]{1,12}$")
_SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 NQCHAR

NAME_MAX = 200
MAX_EXPIRY_DAYS = 3650
LAST_USED_RESOLUTION = timedelta(seconds=60)  # at most one last_used_at write per minute
# A verified API key is remembered this long: revoking, suspending, narrowing or expiring a key
# takes effect at once in the process that made the change and within this bound in every other.
VERIFIED_KEY_SECONDS = 2.0


# --------------------------------------------------------------------------- secrets


def generate_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(12)


def generate_secret() -> str:
    """256 random bits. The ``cp_`` prefix lets the log filter and secret scanners spot it."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(key_id: str, secret: str) -> str:
    """Keyed to the key id, so a stored hash is worthless for any other credential."""
    digest = hmac.new(_SECRET_HASH_LABEL, f"{key_id}\x00{secret}".encode(), hashlib.sha256).hexdigest()
    return _SECRET_HASH_PREFIX + digest


def secret_matches(cred: ApiCredential, secret: str) -> bool:
    return hmac.compare_digest(cred.secret_hash, hash_secret(cred.key_id, secret))


def derive_signing_key(secret: str) -> bytes:
    """The key for HMAC-signed requests: HMAC-SHA256(key=secret, msg=label). Clients derive the
    same; the server keeps it encrypted, never the secret."""
    return hmac.new(secret.encode(), SIGNING_KEY_LABEL, hashlib.sha256).digest()


def hash_access_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --------------------------------------------------------------------------- managing credentials


EXPIRY_WARNING = timedelta(days=30)


def credential_status(cred: ApiCredential, now: datetime | None = None) -> str:
    now = now or clock.now()
    if cred.revoked_at is not None:
        return "revoked"
    if cred.suspended_at is not None:
        return "suspended"
    if cred.expires_at is not None and clock.aware(cred.expires_at) <= now:
        return "expired"
    return "active"


def validate_scopes(scopes, creator_permissions=None, field_name: str = "scopes", creator_role: str | None = None) -> list[str]:
    """Scopes must be API scopes, and never more than the creating person holds; an owner-only
    scope (``org:manage``) only from an owner."""
    if scopes is None:
        return []
    if isinstance(scopes, str) or not all(isinstance(s, str) for s in scopes):
        raise ValidationFailed("Scopes must be a list of scope names.", field=field_name)
    wanted = sorted({s.strip() for s in scopes if s.strip()})
    unknown = [s for s in wanted if s not in API_SCOPES]
    if unknown:
        raise ValidationFailed(
            f"Unknown API scope {unknown[0]!r}; choose from: {', '.join(sorted(API_SCOPES))}.", field=field_name
        )
    if creator_permissions is not None:
        beyond = [s for s in wanted if s not in creator_permissions]
        if beyond:
            raise PermissionDenied(f"You cannot grant the scope {beyond[0]!r}: you do not hold it yourself.", field=field_name)
        owner_only = [s for s in wanted if s in OWNER_ONLY_SCOPES]
        if owner_only and creator_role != "owner":
            raise PermissionDenied(f"Only an owner can grant the scope {owner_only[0]!r}.", field=field_name)
    return wanted


def create_credential(
    session: Session,
    org_id: str,
    *,
    name: str,
    scopes=None,
    creator_permissions=None,
    creator_role: str | None = None,
    created_by: str | None = None,
    expires_in_days: int | None = None,
    sandbox: bool = False,
    rate_limit_per_minute: int | None = None,
) -> tuple[ApiCredential, str]:
    """Create a credential; returns it with its secret, which exists nowhere else afterwards.

    Validates everything before writing, so bad input leaves nothing half-created.
    ``creator_permissions`` (a person's permissions) caps the scopes; None (the CLI, run by the
    operator of the installation) allows any API scope; ``creator_role`` must be ``owner`` for an
    owner-only scope."""
    name = (name or "").strip()
    if not name or len(name) > NAME_MAX or any(ord(c) < 32 for c in name):
        raise ValidationFailed(f"A credential needs a name of 1 to {NAME_MAX} printable characters.", field="name")
    wanted = validate_scopes(scopes, creator_permissions, creator_role=creator_role)
    if expires_in_days is None:
        # Issue 9 item 6: no key lives forever by default (CAREPOST_API_KEY_EXPIRY_DAYS).
        from carepost.core.config import get_settings

        expires_in_days = get_settings().api_key_expiry_days
    if expires_in_days is not None:
        if isinstance(expires_in_days, bool) or not isinstance(expires_in_days, int) or not 1 <= expires_in_days <= MAX_EXPIRY_DAYS:
            raise ValidationFailed(f"Expiry must be 1 to {MAX_EXPIRY_DAYS} days.", field="expires_in_days")
        expires_at = clock.now() + timedelta(days=expires_in_days)
    if rate_limit_per_minute is not None:
        if isinstance(rate_limit_per_minute, bool) or not isinstance(rate_limit_per_minute, int) or not 1 <= rate_limit_per_minute <= 100_000:
            raise ValidationFailed("The rate limit must be 1 to 100000 requests per minute.", field="rate_limit_per_minute")
    key_id = generate_key_id()
    secret = generate_secret()
    cred = ApiCredential(
        id=new_id(),
        org_id=org_id,
        key_id=key_id,
        name=name,
        secret_hash=hash_secret(key_id, secret),
        scopes=wanted,
        sandbox=bool(sandbox),
        rate_limit_per_minute=rate_limit_per_minute,
        created_by=created_by,
        created_at=clock.now(),
        expires_at=expires_at,
    )
    cred.signing_key = get_keyring().encrypt(
        session, org_id, "api_credentials", "signing_key", cred.id, derive_signing_key(secret)
    )
    session.add(cred)
    session.flush()
    return cred, secret


def list_credentials(session: Session, org_id: str) -> list[ApiCredential]:
    return list(
        session.scalars(
            select(ApiCredential).where(ApiCredential.org_id == org_id).order_by(ApiCredential.created_at.desc())
        )
    )


def get_credential(session: Session, org_id: str, credential_id: str) -> ApiCredential:
    cred = session.scalar(
        select(ApiCredential).where(ApiCredential.org_id == org_id, ApiCredential.id == credential_id)
    )
    if cred is None:
        raise NotFound("No such API credential.", field="credential_id")
    return cred


def get_credential_by_key_id(session: Session, org_id: str, key_id: str) -> ApiCredential:
    cred = session.scalar(select(ApiCredential).where(ApiCredential.org_id == org_id, ApiCredential.key_id == key_id))
    if cred is None:
        raise NotFound("No API credential with this key id in the organization.", field="key_id")
    return cred


def revoke_credential(session: Session, cred: ApiCredential) -> int:
    """Revoke a credential and every access token issued to it; returns the tokens revoked.
    Revoking twice is harmless (the first revocation time stays)."""
    now = clock.now()
    if cred.revoked_at is None:
        cred.revoked_at = now
    result = session.execute(
        update(OAuthToken)
        .where(OAuthToken.org_id == cred.org_id, OAuthToken.credential_id == cred.id, OAuthToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    session.flush()
    return result.rowcount or 0


def credential_view(cred: ApiCredential, now: datetime | None = None) -> dict:
    """What the API and UI show of a credential (never a secret or hash)."""
    return {
        "id": cred.id,
        "key_id": cred.key_id,
        "name": cred.name,
        "scopes": list(cred.scopes or []),
        "sandbox": bool(cred.sandbox),
        "rate_limit_per_minute": cred.rate_limit_per_minute,
        "created_by": cred.created_by,
        "created_at": clock.aware(cred.created_at),
        "expires_at": clock.aware(cred.expires_at),
        "revoked_at": clock.aware(cred.revoked_at),
        "last_used_at": clock.aware(cred.last_used_at),
        "status": credential_status(cred, now),
        "suspended_at": clock.aware(cred.suspended_at),
        "expires_soon": expires_soon(cred, now),
    }


def expires_soon(cred: ApiCredential, now: datetime | None = None) -> bool:
    """Active and expiring within :data:`EXPIRY_WARNING` (the warning in doctor, UI and API)."""
    now = now or clock.now()
    return (credential_status(cred, now) == "active" and cred.expires_at is not None
            and clock.aware(cred.expires_at) - now <= EXPIRY_WARNING)


def expiring_credentials(session: Session, now: datetime | None = None) -> list[ApiCredential]:
    """Active credentials of every organization expiring within :data:`EXPIRY_WARNING` (doctor)."""
    from carepost.core.database import ALL_ORGANIZATIONS

    now = now or clock.now()
    rows = session.scalars(select(ApiCredential).where(
        ApiCredential.revoked_at.is_(None), ApiCredential.suspended_at.is_(None),
        ApiCredential.expires_at.is_not(None), ApiCredential.expires_at > now,
        ApiCredential.expires_at <= now + EXPIRY_WARNING).execution_options(**ALL_ORGANIZATIONS))
    return list(rows)


def credentials_created_by(session: Session, org_id: str, user_id: str) -> list[ApiCredential]:
    return list(session.scalars(select(ApiCredential).where(
        ApiCredential.org_id == org_id, ApiCredential.created_by == user_id, ApiCredential.revoked_at.is_(None))))


def follow_creator_role(session: Session, org_id: str, user_id: str, permissions,
                        role: str | None = None) -> tuple[list[str], list[str]]:
    """Issue 9 item 6: a credential never holds more than its creator now may. Suspend the
    creator's credentials whose scopes exceed ``permissions`` (None: the creator left — revoke
    them all); lift a suspension once the role covers the scopes again. Returns (suspended or
    revoked ids, resumed ids). An owner-only scope (``org:manage``) exceeds any role but owner."""
    stopped, resumed = [], []
    now = clock.now()
    for cred in credentials_created_by(session, org_id, user_id):
        if permissions is None:
            revoke_credential(session, cred)
            stopped.append(cred.id)
            continue
        exceeds = any(scope not in permissions or (scope in OWNER_ONLY_SCOPES and role != "owner")
                      for scope in (cred.scopes or []))
        if exceeds and cred.suspended_at is None:
            cred.suspended_at = now
            session.execute(update(OAuthToken).where(OAuthToken.org_id == org_id, OAuthToken.credential_id == cred.id,
                                                     OAuthToken.revoked_at.is_(None)).values(revoked_at=now))
            stopped.append(cred.id)
        elif not exceeds and cred.suspended_at is not None:
            cred.suspended_at = None
            resumed.append(cred.id)
    session.flush()
    return stopped, resumed


# --------------------------------------------------------------------------- scoping helpers


@contextmanager
def acting_for(session: Session, org_id: str) -> Iterator[None]:
    """Scope an (unscoped) authentication session to one organization for a few writes, then
    put the session's scope back as it was."""
    saved = {k: session.info[k] for k in ("org_id", "scope") if k in session.info}
    session.info.pop("scope", None)
    session.info["org_id"] = org_id
    try:
        yield
    finally:
        session.info.pop("org_id", None)
        session.info.pop("scope", None)
        session.info.update(saved)


# --------------------------------------------------------------------------- verified keys
#
# Verifying a key pair reads its row; under load that look-up is a database query per request.
# A key pair verified by the database is remembered for VERIFIED_KEY_SECONDS (a copy of the
# fields a request needs, never the secret: the secret's stored hash, compared in constant time).
# Failures are never remembered (each one is checked, and audited, against the database); a
# change of the row in this process (revoke, suspend, scopes) forgets the copy at once; another
# process's change is seen at most VERIFIED_KEY_SECONDS later.


@dataclass(frozen=True)
class _VerifiedKey:
    id: str
    org_id: str
    key_id: str
    name: str
    secret_hash: str
    scopes: tuple[str, ...]
    sandbox: bool
    rate_limit_per_minute: int | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    suspended_at: datetime | None
    expires_at: datetime | None
    verified_at: datetime


_verified: dict[str, _VerifiedKey] = {}
_verified_lock = threading.Lock()


def _remember_verified(cred: ApiCredential) -> None:
    copy = _VerifiedKey(
        id=cred.id, org_id=cred.org_id, key_id=cred.key_id, name=cred.name, secret_hash=cred.secret_hash,
        scopes=tuple(cred.scopes or ()), sandbox=bool(cred.sandbox), rate_limit_per_minute=cred.rate_limit_per_minute,
        last_used_at=clock.aware(cred.last_used_at), revoked_at=cred.revoked_at, suspended_at=cred.suspended_at,
        expires_at=clock.aware(cred.expires_at), verified_at=clock.now(),
    )
    with _verified_lock:
        _verified[cred.key_id] = copy


def _recall_verified(key_id: str, secret: str) -> _VerifiedKey | None:
    """The remembered copy of a key verified less than VERIFIED_KEY_SECONDS ago, if ``secret`` is
    its secret, it is still active and its last use needs no new write; else None (ask the database)."""
    with _verified_lock:
        copy = _verified.get(key_id)
    if copy is None:
        return None
    now = clock.now()
    age = (now - copy.verified_at).total_seconds()
    if not 0 <= age < VERIFIED_KEY_SECONDS:
        return None
    if credential_status(copy, now) != "active":
        return None
    if copy.last_used_at is None or now - copy.last_used_at >= LAST_USED_RESOLUTION:
        return None
    if not hmac.compare_digest(copy.secret_hash, hash_secret(key_id, secret)):
        return None
    return copy


def forget_verified_keys(key_id: str | None = None) -> None:
    """Forget remembered keys (one, or all)."""
    with _verified_lock:
        if key_id is None:
            _verified.clear()
        else:
            _verified.pop(key_id, None)


@sa_event.listens_for(ApiCredential, "after_update")
@sa_event.listens_for(ApiCredential, "after_delete")
def _forget_changed_key(_mapper, _connection, target: ApiCredential) -> None:
    forget_verified_keys(target.key_id)


def _find_by_key_id(session: Session, key_id: str) -> ApiCredential | None:
    # The caller is not known yet, so this one look-up crosses organizations, by an exact key id.
    return session.scalar(
        select(ApiCredential).where(ApiCredential.key_id == key_id).execution_options(**ALL_ORGANIZATIONS)
    )


def _find_token(session: Session, token: str) -> OAuthToken | None:
    return session.scalar(
        select(OAuthToken).where(OAuthToken.token_hash == hash_access_token(token)).execution_options(**ALL_ORGANIZATIONS)
    )


def _credential_by_id(session: Session, credential_id: str) -> ApiCredential | None:
    return session.scalar(
        select(ApiCredential).where(ApiCredential.id == credential_id).execution_options(**ALL_ORGANIZATIONS)
    )


_DUMMY_HASH = hash_secret("cpk_000000000000000000000000", "x")


def _check_secret(cred: ApiCredential | None, secret: str) -> bool:
    """Compare in constant time, and spend the same work when the key id is unknown."""
    if cred is None:
        hmac.compare_digest(_DUMMY_HASH, hash_secret("cpk_000000000000000000000000", secret))
        return False
    return secret_matches(cred, secret)


# --------------------------------------------------------------------------- request authentication


class _Failure(Exception):
    def __init__(self, reason: str, cred: ApiCredential | None = None):
        super().__init__(reason)
        self.reason = reason
        # Plain values: the session is rolled back before the failure is recorded.
        self.credential_id = cred.id if cred is not None else None
        self.org_id = cred.org_id if cred is not None else None


@dataclass
class _Authenticated:
    cred: ApiCredential
    method: str
    scopes: list[str]
    token_id: str | None = None
    extra: dict = field(default_factory=dict)
    cached: bool = False  # from the verified-key copy: nothing to write, nothing to remember


def principal_from_authorization(request, session: Session, *, count_request: bool = True) -> Principal | None:
    """Authenticate the ``Authorization`` header of an API request; None means 401.

    Called by ``access._authenticate`` with the request's still unscoped session. Commits its
    own bookkeeping (consumed nonce, last use, the audit event of a failure) because it must
    persist even when the route then fails or the caller is refused. Raises
    :class:`RateLimited` when the credential is over its limit. ``count_request=False``: the
    authentication is not a request of its own (SMTP AUTH: the limit counts messages, each one
    at DATA)."""
    header = request.headers.get("authorization", "")
    scheme, _, rest = header.strip().partition(" ")
    method = scheme.lower() or "none"
    try:
        if method == "bearer":
            auth = _authenticate_bearer(session, rest.strip())
        elif method == "basic":
            auth = _authenticate_basic(session, rest.strip())
        elif method == HMAC_SCHEME.lower():
            method = "hmac"
            auth = _authenticate_hmac(session, request, rest)
        else:
            method = "unsupported"
            raise _Failure("unsupported_scheme")
    except _Failure as failure:
        session.rollback()
        _record_failure(session, request, method, failure)
        session.commit()
        return None

    cred = auth.cred
    if not auth.cached:
        now = clock.now()
        session.commit()
        if cred.last_used_at is None or now - clock.aware(cred.last_used_at) >= LAST_USED_RESOLUTION:
            with acting_for(session, cred.org_id):
                cred.last_used_at = now
                session.flush()
            session.commit()
        if auth.method in ("api_key", "basic"):
            _remember_verified(cred)
    return _principal_of(auth, count_request)


def principal_from_memory(request, *, count_request: bool = True) -> Principal | None:
    """:func:`principal_from_authorization` for a Bearer or Basic key pair this process verified
    less than VERIFIED_KEY_SECONDS ago (the remembered copy, see "verified keys" above), decided
    without the database and without blocking: the caller may run it on the event loop instead
    of handing the request to the thread pool (issue 11 item 6).

    None means "ask the database": another scheme, an OAuth token, no usable remembered copy
    (unknown, expired copy, revoked or suspended, last use due), a malformed or wrong secret, or
    a rate limit kept in Redis (a network round trip). Failures are therefore never decided here:
    the caller runs :func:`principal_from_authorization`, which checks and audits them. Raises
    :class:`RateLimited` exactly as it does (the request counted once, here)."""
    header = request.headers.get("authorization", "")
    scheme, _, rest = header.strip().partition(" ")
    method = scheme.lower()
    try:
        if method == "bearer":
            auth = _authenticate_bearer(None, rest.strip(), memory_only=True)
        elif method == "basic":
            auth = _authenticate_basic(None, rest.strip(), memory_only=True)
        else:
            return None
    except (_Failure, _NeedsDatabase):
        return None
    if count_request and not limiter_in_process():
        return None
    return _principal_of(auth, count_request)


def _principal_of(auth: _Authenticated, count_request: bool) -> Principal:
    cred = auth.cred
    settings = get_settings()
    limit = cred.rate_limit_per_minute or settings.rate_limit_per_minute
    principal = Principal(
        kind="api_credential",
        org_id=cred.org_id,
        actor_id=cred.id,
        permissions=frozenset(s for s in auth.scopes if s in API_SCOPES),
        credential_id=cred.id,
        sandbox=bool(cred.sandbox),
        rate_limit_per_minute=limit,
        extra={"auth_method": auth.method, "key_id": cred.key_id, "credential_name": cred.name, **auth.extra},
    )
    if count_request:
        enforce(f"credential:{cred.id}", limit)
    return principal


def _record_failure(session: Session, request, method: str, failure: _Failure) -> None:
    known = failure.credential_id is not None
    log.info(
        "api_auth_failed",
        auth_method=method,
        reason=failure.reason,
        credential_id=failure.credential_id,
        path_template=getattr(request.scope.get("route"), "path", None),
    )
    record(
        session,
        org_id=failure.org_id,
        actor_type="api_credential" if known else "anonymous",
        actor_id=failure.credential_id,
        action="api_credential.auth_failed",
        outcome="failure",
        target_type="api_credential" if known else None,
        target_id=failure.credential_id,
        details={"auth_method": method, "reason": failure.reason, "http_method": request.method},
        **request_context(request),
    )


def _usable(cred: ApiCredential | None, secret_ok: bool) -> ApiCredential:
    if cred is None:
        raise _Failure("unknown_key")
    if not secret_ok:
        raise _Failure("wrong_secret", cred)
    status = credential_status(cred)
    if status != "active":
        raise _Failure(status, cred)
    return cred


class _NeedsDatabase(Exception):
    """Raised with ``memory_only``: the answer is not in this process's memory."""


def _key_pair(session: Session | None, key_id: str, secret: str, *, memory_only: bool = False) -> _Authenticated:
    if not _KEY_ID_RE.match(key_id) or not _SECRET_RE.match(secret):
        raise _Failure("malformed")
    copy = _recall_verified(key_id, secret)
    if copy is not None:
        return _Authenticated(copy, "api_key", list(copy.scopes), cached=True)
    if memory_only:
        raise _NeedsDatabase()
    begin_read(session)  # a look-up: no write lock (the last-use write, when due, is its own transaction)
    cred = _find_by_key_id(session, key_id)
    cred = _usable(cred, _check_secret(cred, secret))
    return _Authenticated(cred, "api_key", list(cred.scopes or []))


def _authenticate_bearer(session: Session | None, token: str, *, memory_only: bool = False) -> _Authenticated:
    if token.startswith(ACCESS_TOKEN_PREFIX):
        if memory_only:
            raise _NeedsDatabase()
        return _authenticate_access_token(session, token)
    key_id, dot, secret = token.partition(".")
    if not dot:
        raise _Failure("malformed")
    return _key_pair(session, key_id, secret, memory_only=memory_only)


def _authenticate_basic(session: Session | None, value: str, *, memory_only: bool = False) -> _Authenticated:
    try:
        decoded = base64.b64decode(value.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise _Failure("malformed") from None
    key_id, colon, secret = decoded.partition(":")
    if not colon:
        raise _Failure("malformed")
    auth = _key_pair(session, key_id, secret, memory_only=memory_only)
    auth.method = "basic"
    return auth


def _authenticate_access_token(session: Session, token: str) -> _Authenticated:
    if not _ACCESS_TOKEN_RE.match(token):
        raise _Failure("malformed")
    row = _find_token(session, token)
    if row is None:
        raise _Failure("unknown_token")
    cred = _credential_by_id(session, row.credential_id)
    if cred is None:
        raise _Failure("unknown_token")
    if row.revoked_at is not None:
        raise _Failure("token_revoked", cred)
    if clock.aware(row.expires_at) <= clock.now():
        raise _Failure("token_expired", cred)
    status = credential_status(cred)
    if status != "active":
        raise _Failure(status, cred)
    # A token never outlives a narrowing of its credential's scopes.
    scopes = [s for s in (row.scopes or []) if s in (cred.scopes or [])]
    return _Authenticated(cred, "oauth_token", scopes, token_id=row.id, extra={"token_id": row.id})


# --------------------------------------------------------------------------- HMAC-signed requests


def canonical_path(path: str) -> str:
    """The percent-decoded path re-encoded with only RFC 3986 unreserved characters and '/'
    left as they are, so client and server agree however the path was escaped on the wire."""
    return quote(unquote(path or "/"), safe="/-_.~")


def canonical_query(query: str) -> str:
    """Every name=value pair percent-encoded (RFC 3986 unreserved kept), sorted by name then
    value, joined with '&'. Empty values keep their '='."""
    pairs = parse_qsl(query or "", keep_blank_values=True)
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def string_to_sign(method: str, path: str, query: str, body: bytes, timestamp: str, nonce: str) -> bytes:
    """The signed text: seven lines joined by newlines (no trailing newline)::

        CarePost-HMAC-SHA256
        <HTTP method, upper case>
        <canonical path>
        <canonical query string>
        <timestamp, unix seconds>
        <nonce>
        <hex SHA-256 of the exact request body bytes (of b"" when there is none)>

    Signature = base64(HMAC-SHA256(signing key, string to sign)), where the signing key is
    HMAC-SHA256(key=secret, msg="CarePost-HMAC-SHA256 signing key v1")."""
    return "\n".join(
        [HMAC_SCHEME, method.upper(), canonical_path(path), canonical_query(query), timestamp, nonce,
         hashlib.sha256(body or b"").hexdigest()]
    ).encode()


def sign_request(
    key_id: str,
    secret: str,
    method: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> str:
    """The ``Authorization`` header value for a signed request (client side; SDKs copy this)."""
    ts = str(int(timestamp if timestamp is not None else clock.now().timestamp()))
    nonce = nonce or secrets.token_urlsafe(18)
    mac = hmac.new(derive_signing_key(secret), string_to_sign(method, path, query, body, ts, nonce), hashlib.sha256)
    signature = base64.b64encode(mac.digest()).decode()
    return f"{HMAC_SCHEME} Credential={key_id}, Timestamp={ts}, Nonce={nonce}, Signature={signature}"


def parse_hmac_header(params: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in params.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in ("Credential", "Timestamp", "Nonce", "Signature") or name in fields:
            raise _Failure("malformed")
        fields[name] = value.strip()
    if len(fields) != 4:
        raise _Failure("malformed")
    if not _KEY_ID_RE.match(fields["Credential"]) or not _TIMESTAMP_RE.match(fields["Timestamp"]):
        raise _Failure("malformed")
    if not _NONCE_RE.match(fields["Nonce"]):
        raise _Failure("malformed")
    return fields


def _request_body(request) -> bytes | None:
    """The raw body. ``access._authenticate`` runs in a worker thread, so the (async) body read
    is handed back to the event loop. A form route's body was already parsed by FastAPI
    without keeping the bytes: then there is nothing to verify against (None, refused)."""
    cached = getattr(request, "_body", None)
    if cached is not None:
        return cached
    if getattr(request, "_stream_consumed", False):
        return None
    import anyio.from_thread

    return anyio.from_thread.run(request.body)


def _authenticate_hmac(session: Session, request, params: str) -> _Authenticated:
    fields = parse_hmac_header(params)
    cred = _find_by_key_id(session, fields["Credential"])
    if cred is None:
        raise _Failure("unknown_key")
    if cred.signing_key is None:
        raise _Failure("no_signing_key", cred)
    try:
        provided = base64.b64decode(fields["Signature"].encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        raise _Failure("malformed", cred) from None
    body = _request_body(request)
    if body is None:
        raise _Failure("body_unavailable", cred)
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else request.url.path
    query = request.scope.get("query_string", b"").decode("latin-1")
    key = get_keyring().decrypt(session, cred.org_id, "api_credentials", "signing_key", cred.id, cred.signing_key)
    expected = hmac.new(
        key, string_to_sign(request.method, path, query, body, fields["Timestamp"], fields["Nonce"]), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(expected, provided):
        raise _Failure("bad_signature", cred)
    skew = get_settings().hmac_max_skew_seconds
    ts = int(fields["Timestamp"])
    now = clock.now().timestamp()
    if abs(now - ts) > skew:
        raise _Failure("stale_timestamp", cred)
    status = credential_status(cred)
    if status != "active":
        raise _Failure(status, cred)
    # The nonce only needs remembering while its timestamp is still acceptable.
    remember_until = datetime.fromtimestamp(ts + skew + 1, tz=clock.now().tzinfo)
    if not consume_nonce(session, cred, fields["Nonce"], remember_until):
        raise _Failure("replayed_nonce", cred)
    return _Authenticated(cred, "hmac", list(cred.scopes or []))


def consume_nonce(session: Session, cred: ApiCredential, nonce: str, remember_until: datetime) -> bool:
    """True the first time a credential presents ``nonce``, False on any repeat.

    Redis (``SET NX`` with expiry) when configured, so servers share what they have seen;
    otherwise the ``request_nonces`` table, whose unique constraint settles races."""
    ttl_ms = max(1000, int((remember_until - clock.now()).total_seconds() * 1000))
    client = redis_client()
    if client is not None:
        import redis

        try:
            return bool(client.set(f"carepost:nonce:{cred.id}:{nonce}", b"1", nx=True, px=ttl_ms))
        except redis.RedisError as exc:
            log.warning("nonce_redis_unavailable", error_type=type(exc).__name__)
    session.execute(
        delete(RequestNonce).where(RequestNonce.credential_id == cred.id, RequestNonce.expires_at < clock.now())
    )
    try:
        with session.begin_nested():
            session.add(RequestNonce(credential_id=cred.id, nonce=nonce, expires_at=remember_until))
    except IntegrityError:
        return False
    return True


# --------------------------------------------------------------------------- OAuth 2.0 (RFC 6749 4.4, RFC 7009)


class OAuthError(Exception):
    """An error response of the token endpoint (RFC 6749 section 5.2)."""

    def __init__(self, error: str, description: str, status: int = 400, headers: dict | None = None):
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": self.error, "error_description": self.description}


def _invalid_client(description: str = "Client authentication failed.") -> OAuthError:
    return OAuthError("invalid_client", description, 401, {"WWW-Authenticate": 'Basic realm="CarePost API"'})


def _single_params(form: Mapping, getlist) -> dict[str, str]:
    """RFC 6749 section 3.2: parameters must not be repeated."""
    params: dict[str, str] = {}
    for name in set(form.keys()):
        values = getlist(name)
        if len(values) != 1:
            raise OAuthError("invalid_request", f"The parameter {name!r} was sent more than once.")
        if not isinstance(values[0], str):
            raise OAuthError("invalid_request", f"The parameter {name!r} must be a plain form field.")
        params[name] = values[0]
    return params


def _client_from_request(session: Session, params: dict[str, str], authorization: str, ctx: dict) -> ApiCredential:
    """Authenticate the client (RFC 6749 section 2.3.1): HTTP Basic, or form fields — not both.
    Returns the credential whose secret matched (its state is checked by the caller)."""
    form_id = params.get("client_id")
    form_secret = params.get("client_secret")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            raise _invalid_client("Use HTTP Basic or form fields to authenticate the client.")
        if form_secret is not None:
            raise OAuthError("invalid_request", "Authenticate the client by one method only.")
        try:
            decoded = base64.b64decode(value.strip().encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            raise _invalid_client() from None
        raw_id, colon, raw_secret = decoded.partition(":")
        if not colon:
            raise _invalid_client()
        client_id, client_secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        if form_id is not None and form_id != client_id:
            raise OAuthError("invalid_request", "client_id differs from the authenticated client.")
    else:
        if form_id is None and form_secret is None:
            raise _invalid_client("Client authentication is required.")
        if not form_id or not form_secret:
            raise _invalid_client()
        client_id, client_secret = form_id, form_secret
    if not _KEY_ID_RE.match(client_id) or not _SECRET_RE.match(client_secret):
        _audit_client_failure(session, None, "malformed", ctx)
        raise _invalid_client()
    cred = _find_by_key_id(session, client_id)
    if not _check_secret(cred, client_secret):
        _audit_client_failure(session, cred, "unknown_key" if cred is None else "wrong_secret", ctx)
        raise _invalid_client()
    return cred


def _audit_client_failure(session: Session, cred: ApiCredential | None, reason: str, ctx: dict) -> None:
    credential_id, org_id = (cred.id, cred.org_id) if cred is not None else (None, None)
    log.info("oauth_client_auth_failed", reason=reason, credential_id=credential_id)
    session.rollback()
    record(
        session,
        org_id=org_id,
        actor_type="api_credential" if credential_id else "anonymous",
        actor_id=credential_id,
        action="oauth.client_auth_failed",
        outcome="failure",
        target_type="api_credential" if credential_id else None,
        target_id=credential_id,
        details={"reason": reason},
        **ctx,
    )
    session.commit()


def issue_token(session: Session, form: Mapping, getlist, authorization: str, ctx: dict) -> dict:
    """The client credentials grant. Returns the RFC 6749 section 5.1 response body; raises
    :class:`OAuthError` (section 5.2) or :class:`RateLimited`. Commits."""
    params = _single_params(form, getlist)
    cred = _client_from_request(session, params, authorization, ctx)
    grant_type = params.get("grant_type")
    if not grant_type:
        raise OAuthError("invalid_request", "The parameter 'grant_type' is required.")
    if grant_type != "client_credentials":
        raise OAuthError("unsupported_grant_type", "Only the client_credentials grant is supported.")
    status = credential_status(cred)
    if status != "active":
        _audit_client_failure(session, cred, status, ctx)
        raise OAuthError("invalid_grant", "The credential has expired or been revoked.")
    granted = list(cred.scopes or [])
    requested_text = params.get("scope", "").strip()
    if requested_text:
        requested = requested_text.split(" ")
        if any(not s or not _SCOPE_TOKEN_RE.match(s) for s in requested):
            raise OAuthError("invalid_scope", "The scope parameter is malformed.")
        beyond = sorted(set(requested) - set(granted))
        if beyond:
            raise OAuthError("invalid_scope", f"The credential does not hold the scope {beyond[0]!r}.")
        granted = sorted(set(requested))
    settings = get_settings()
    enforce(f"credential:{cred.id}", cred.rate_limit_per_minute or settings.rate_limit_per_minute)
    token = ACCESS_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = clock.now()
    with acting_for(session, cred.org_id):
        row = OAuthToken(
            id=new_id(),
            org_id=cred.org_id,
            credential_id=cred.id,
            token_hash=hash_access_token(token),
            scopes=granted,
            created_at=now,
            expires_at=now + timedelta(seconds=settings.access_token_ttl),
        )
        session.add(row)
        cred.last_used_at = now
        session.flush()
        record(
            session,
            org_id=cred.org_id,
            actor_type="api_credential",
            actor_id=cred.id,
            action="oauth.token_issue",
            target_type="oauth_token",
            target_id=row.id,
            details={"scopes": granted, "expires_in": settings.access_token_ttl},
            **ctx,
        )
    session.commit()
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": settings.access_token_ttl,
        "scope": " ".join(granted),
    }


def revoke_token(session: Session, form: Mapping, getlist, authorization: str, ctx: dict) -> None:
    """RFC 7009: revoke an access token issued to the authenticated client. An unknown token, or
    one issued to another client, is answered the same way (200) and changes nothing, so the
    endpoint reveals nothing about other clients' tokens. Commits."""
    params = _single_params(form, getlist)
    cred = _client_from_request(session, params, authorization, ctx)
    token = params.get("token")
    if not token:
        raise OAuthError("invalid_request", "The parameter 'token' is required.")
    # token_type_hint is only a hint: an unknown value is ignored (RFC 7009 section 2.1).
    if token.startswith((SECRET_PREFIX, KEY_ID_PREFIX)):
        raise OAuthError("unsupported_token_type", "API keys are revoked by an administrator, not here.")
    row = _find_token(session, token) if _ACCESS_TOKEN_RE.match(token) else None
    if row is None or row.credential_id != cred.id or row.org_id != cred.org_id:
        return
    with acting_for(session, cred.org_id):
        if row.revoked_at is None:
            row.revoked_at = clock.now()
            session.flush()
        record(
            session,
            org_id=cred.org_id,
            actor_type="api_credential",
            actor_id=cred.id,
            action="oauth.token_revoke",
            target_type="oauth_token",
            target_id=row.id,
            **ctx,
        )
    session.commit()


def organization_of(session: Session, org_id: str) -> Organization | None:
    return session.get(Organization, org_id)
