"""Web sign-in: passwords checked with throttling and lockout, server-side sessions, CSRF tokens.

OWASP ASVS 5.0 V7 and HIPAA 164.312(a)(2)(iii), (d):

* The cookie ``carepost_session`` holds 256 random bits; the database keeps only its SHA-256
  (``WebSession.id``), so a database reader cannot ride a session.
* A new session id is issued at sign-in and again when the second factor is verified; sign-out
  revokes the row. Sessions end after ``CAREPOST_SESSION_IDLE_TIMEOUT`` seconds without a
  request and after ``CAREPOST_SESSION_MAX_LIFETIME`` seconds in any case.
* The cookie is HttpOnly, SameSite=Lax, path ``/`` and Secure whenever the base URL is https.
* Every state-changing cookie request carries a CSRF token derived from the session's own
  secret (``access._csrf_ok`` checks it). Sign-in forms, which run before a session exists, use
  a double-submit cookie (``carepost_precsrf``).
* Failed sign-ins count per account (lockout after ``CAREPOST_LOGIN_MAX_FAILURES`` for
  ``CAREPOST_LOGIN_LOCKOUT_SECONDS``) and per IP address (429 after
  ``CAREPOST_LOGIN_IP_MAX_FAILURES`` within ``CAREPOST_LOGIN_IP_WINDOW_SECONDS``). Unknown
  email, wrong password, locked or deactivated account all get the same message, and every
  attempt is audited (unknown emails on the system chain, without the typed email).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from math import ceil

from sqlalchemy import Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column
from starlette.requests import Request
from starlette.responses import Response

from carepost.accounts.access import Principal, request_context
from carepost.accounts.models import Membership, Organization, User, WebSession
from carepost.accounts.permissions import BREAK_GLASS_GRANTS, ROLES
from carepost.accounts.ports import record
from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.database import ALL_ORGANIZATIONS, Base
from carepost.core.errors import AuthenticationRequired, RateLimited

COOKIE_NAME = "carepost_session"
PRE_CSRF_COOKIE = "carepost_precsrf"
GENERIC_LOGIN_ERROR = "The email or password is not correct, or the account is locked. Try again later or ask an administrator."
# last_seen_at is written at most this often per session (fewer writes, same timeout semantics
# within this margin).
TOUCH_INTERVAL = 30


class LoginThrottle(Base):
    """Failed sign-ins per source address within a window (per-IP throttling)."""

    __tablename__ = "login_throttles"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)  # "ip:<address>"
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_started_at: Mapped[datetime] = mapped_column(default=clock.now)


class LoginFailed(AuthenticationRequired):
    code = "login_failed"


# --------------------------------------------------------------------------- tokens


def hash_session_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token_for(ws: WebSession) -> str:
    return hmac.new(bytes.fromhex(ws.csrf_secret), b"carepost-csrf-v1", hashlib.sha256).hexdigest()


def _secure_cookies() -> bool:
    return get_settings().base_url.startswith("https://")


def set_session_cookie(response: Response, token: str) -> None:
    response.set_cookie(COOKIE_NAME, token, httponly=True, samesite="lax", secure=_secure_cookies(), path="/")


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="lax", secure=_secure_cookies())


def pre_auth_csrf(request: Request) -> tuple[str, bool]:
    """The double-submit token of sign-in forms: (token, whether it must be set as a cookie)."""
    existing = request.cookies.get(PRE_CSRF_COOKIE)
    if existing and len(existing) == 43:
        return existing, False
    return secrets.token_urlsafe(32), True


def set_pre_auth_cookie(response: Response, token: str) -> None:
    response.set_cookie(PRE_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure_cookies(), path="/app")


def pre_auth_csrf_ok(request: Request, sent: str | None) -> bool:
    cookie = request.cookies.get(PRE_CSRF_COOKIE)
    return bool(cookie and sent and hmac.compare_digest(cookie, sent))


# --------------------------------------------------------------------------- sessions


def create_session(session: Session, user: User, org_id: str | None, request: Request | None, *,
                   mfa_verified: bool = False) -> tuple[str, WebSession]:
    """A new server-side session; returns the cookie token (shown to the browser only)."""
    settings = get_settings()
    token = secrets.token_urlsafe(32)
    now = clock.now()
    ctx = request_context(request) if request is not None else {}
    ws = WebSession(
        id=hash_session_token(token),
        user_id=user.id,
        org_id=org_id,
        csrf_secret=secrets.token_hex(32),
        mfa_verified_at=now if mfa_verified else None,
        created_at=now,
        last_seen_at=now,
        expires_at=now + timedelta(seconds=settings.session_max_lifetime),
        ip=ctx.get("ip"),
        user_agent=ctx.get("user_agent"),
        state={},
    )
    session.add(ws)
    session.flush()
    return token, ws


def rotate_session(session: Session, ws: WebSession, *, mfa_verified: bool | None = None) -> tuple[str, WebSession]:
    """Replace the session id (and CSRF secret), keeping its lifetime: ASVS 7.2.4, no fixation."""
    token = secrets.token_urlsafe(32)
    now = clock.now()
    new = WebSession(
        id=hash_session_token(token),
        user_id=ws.user_id,
        org_id=ws.org_id,
        csrf_secret=secrets.token_hex(32),
        mfa_verified_at=now if mfa_verified else ws.mfa_verified_at,
        created_at=ws.created_at,
        last_seen_at=now,
        expires_at=ws.expires_at,
        ip=ws.ip,
        user_agent=ws.user_agent,
        state={},
    )
    ws.revoked_at = now
    session.add(new)
    session.flush()
    return token, new


def _expired(ws: WebSession, now: datetime) -> bool:
    idle = timedelta(seconds=get_settings().session_idle_timeout)
    return (
        ws.revoked_at is not None
        or clock.aware(ws.expires_at) <= now
        or clock.aware(ws.last_seen_at) + idle <= now
    )


def session_from_request(request: Request, session: Session) -> WebSession | None:
    """The live WebSession of the request's cookie (None when missing, revoked or expired)."""
    token = request.cookies.get(COOKIE_NAME)
    if not token or len(token) > 100:
        return None
    ws = session.get(WebSession, hash_session_token(token))
    if ws is None or _expired(ws, clock.now()):
        return None
    return ws


def revoke_session(session: Session, ws: WebSession) -> None:
    if ws.revoked_at is None:
        ws.revoked_at = clock.now()


def active_sessions(session: Session, user_id: str) -> list[WebSession]:
    now = clock.now()
    rows = session.scalars(
        select(WebSession).where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None)).order_by(WebSession.last_seen_at.desc())
    )
    return [ws for ws in rows if not _expired(ws, now)]


def revoke_user_sessions(session: Session, user_id: str, *, org_id: str | None = None) -> int:
    """End a person's sessions (all, or those working in ``org_id``)."""
    query = select(WebSession).where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
    if org_id:
        query = query.where(WebSession.org_id == org_id)
    count = 0
    for ws in session.scalars(query):
        ws.revoked_at = clock.now()
        count += 1
    return count


def memberships_of(session: Session, user_id: str) -> list[tuple[str, str, str]]:
    """(org id, org name, role) of every organization the person belongs to, by name."""
    rows = session.execute(
        select(Organization.id, Organization.name, Membership.role)
        .join(Membership, Membership.org_id == Organization.id)
        .where(Membership.user_id == user_id)
        .order_by(Organization.name)
        .execution_options(**ALL_ORGANIZATIONS)
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def principal_from_cookie(request: Request, session: Session) -> Principal | None:
    """The signed-in person of a cookie request, or None.

    ``session`` is the request's unscoped session: every query here filters explicitly. It
    refreshes ``last_seen_at`` (and closes expired break-glass grants) and commits that itself,
    because a read-only request would otherwise roll the refresh back and idle out an active
    person.
    """
    from carepost.accounts import emergency

    ws = session_from_request(request, session)
    if ws is None:
        return None
    user = session.get(User, ws.user_id)
    if user is None or not user.is_active:
        return None
    orgs = memberships_of(session, user.id)
    if not orgs:
        return None
    current = next((o for o in orgs if o[0] == ws.org_id), None)
    changed = False
    if current is None:  # removed from the organization the session was in: fall back to another
        current = orgs[0]
        ws.org_id = current[0]
        changed = True
    org_id, org_name, role = current
    permissions = set(ROLES.get(role, frozenset()))
    grant_id = None
    grant_expires = None
    # The request's session is unscoped here; writing a grant row needs an explicit scope.
    saved_scope = session.info.get("scope")
    session.info["scope"] = "system"
    try:
        if ws.mfa_verified_at is not None:
            closed = emergency.close_expired(session, org_id, user_id=user.id)
            changed = changed or bool(closed)
            grant = emergency.active_grant(session, org_id, user.id)
            if grant is not None:
                permissions |= set(BREAK_GLASS_GRANTS)
                grant_id = grant.id
                grant_expires = clock.aware(grant.expires_at)
        now = clock.now()
        if (now - clock.aware(ws.last_seen_at)).total_seconds() >= min(TOUCH_INTERVAL, get_settings().session_idle_timeout / 10):
            ws.last_seen_at = now
            changed = True
        if changed:
            session.commit()
    finally:
        if saved_scope is None:
            session.info.pop("scope", None)
        else:
            session.info["scope"] = saved_scope
    return Principal(
        kind="user",
        org_id=org_id,
        actor_id=user.id,
        permissions=frozenset(str(p) for p in permissions),
        user_id=user.id,
        role=role,
        session_id=ws.id,
        mfa_verified=ws.mfa_verified_at is not None,
        break_glass_grant_id=grant_id,
        via_cookie=True,
        csrf_token=csrf_token_for(ws),
        extra={
            "email": user.email,
            "display_name": user.display_name,
            "org_name": org_name,
            "orgs": [{"id": o[0], "name": o[1]} for o in orgs],
            "break_glass_expires_at": grant_expires.isoformat() if grant_expires else None,
            "totp_confirmed": user.totp_confirmed_at is not None,
        },
    )


# --------------------------------------------------------------------------- sign-in checks


def _client_ip(request: Request | None) -> str:
    return (request.client.host if request is not None and request.client else None) or "unknown"


def check_ip_throttle(session: Session, request: Request | None) -> None:
    settings = get_settings()
    row = session.get(LoginThrottle, "ip:" + _client_ip(request))
    if row is None:
        return
    window_end = clock.aware(row.window_started_at) + timedelta(seconds=settings.login_ip_window_seconds)
    if row.failures >= settings.login_ip_max_failures and window_end > clock.now():
        retry = max(1, ceil((window_end - clock.now()).total_seconds()))
        raise RateLimited("Too many failed sign-ins from this address. Try again later.", retry_after=retry)


def count_ip_failure(session: Session, request: Request | None) -> None:
    settings = get_settings()
    key = "ip:" + _client_ip(request)
    now = clock.now()
    row = session.get(LoginThrottle, key)
    if row is None:
        try:
            with session.begin_nested():
                session.add(LoginThrottle(key=key, failures=1, window_started_at=now))
            return
        except IntegrityError:
            row = session.get(LoginThrottle, key, populate_existing=True)
            if row is None:
                return
    if clock.aware(row.window_started_at) + timedelta(seconds=settings.login_ip_window_seconds) <= now:
        row.failures = 1
        row.window_started_at = now
    else:
        row.failures += 1


def primary_org(session: Session, user_id: str) -> str | None:
    orgs = memberships_of(session, user_id)
    return orgs[0][0] if orgs else None


def audit_login(session: Session, request: Request | None, user: User | None, outcome: str, reason: str | None = None,
                action: str = "auth.login") -> None:
    ctx = request_context(request) if request is not None else {}
    details = {"reason": reason} if reason else {}
    if user is None:
        record(session, org_id=None, actor_type="anonymous", actor_id=None, action=action, outcome=outcome,
               target_type="user", details=details, **ctx)
        return
    record(session, org_id=primary_org(session, user.id), actor_type="user", actor_id=user.id, action=action,
           outcome=outcome, target_type="user", target_id=user.id, details=details, **ctx)


def _account_source_key(user: User, request: Request | None) -> str:
    return f"acct:{user.id}:{_client_ip(request)}"[:100]


def register_user_failure(session: Session, user: User, request: Request | None = None) -> bool:
    """Count a failed password or second factor for this account *from this source*; True when
    this failure locked the account for that source.

    Issue 9 item 15: the lock holds per account and source address (the client address as the
    trusted proxies report it, ``CAREPOST_TRUSTED_PROXIES``), so an attacker guessing from one
    place cannot lock the person out everywhere; guessing from many places is bounded by the
    per-address throttle."""
    settings = get_settings()
    key = _account_source_key(user, request)
    now = clock.now()
    row = session.get(LoginThrottle, key)
    if row is None:
        row = LoginThrottle(key=key, failures=0, window_started_at=now)
        session.add(row)
    elif clock.aware(row.window_started_at) + timedelta(seconds=settings.login_lockout_seconds) <= now:
        row.failures, row.window_started_at = 0, now
    row.failures += 1
    user.failed_logins = (user.failed_logins or 0) + 1  # shown to administrators; locks nothing
    session.flush()
    return row.failures == settings.login_max_failures


def is_locked(user: User, request: Request | None = None) -> bool:
    """Locked for this source (see :func:`register_user_failure`), or locked by an administrator
    (``locked_until``)."""
    if user.locked_until is not None and clock.aware(user.locked_until) > clock.now():
        return True
    row = session_of(user).get(LoginThrottle, _account_source_key(user, request))
    if row is None:
        return False
    settings = get_settings()
    return (row.failures >= settings.login_max_failures
            and clock.aware(row.window_started_at) + timedelta(seconds=settings.login_lockout_seconds) > clock.now())


def session_of(user: User) -> Session:
    from sqlalchemy.orm import object_session

    return object_session(user)


def clear_user_failures(session: Session, user: User, request: Request | None) -> None:
    row = session.get(LoginThrottle, _account_source_key(user, request))
    if row is not None:
        session.delete(row)


def check_password_login(session: Session, request: Request | None, email: str, password: str) -> User:
    """The user whose email and password match, or ``LoginFailed`` (one message for every cause).

    Failures are recorded in ``session`` (failure counters, audit events) and the caller must
    commit them before raising the error to the browser.
    """
    from carepost.accounts.passwords import hash_password, needs_rehash, verify_password

    check_ip_throttle(session, request)
    normalized = (email or "").strip().lower()
    user = session.scalar(select(User).where(User.email == normalized)) if 0 < len(normalized) <= 320 else None
    if user is None:
        verify_password(None, password)
        count_ip_failure(session, request)
        audit_login(session, request, None, "failure", "unknown_user")
        raise LoginFailed(GENERIC_LOGIN_ERROR)
    if is_locked(user, request):
        verify_password(None, password)
        count_ip_failure(session, request)
        audit_login(session, request, user, "denied", "locked")
        raise LoginFailed(GENERIC_LOGIN_ERROR)
    if not verify_password(user.password_hash, password):
        count_ip_failure(session, request)
        locked = register_user_failure(session, user, request)
        audit_login(session, request, user, "failure", "bad_password")
        if locked:
            audit_login(session, request, user, "success", "too_many_failures", action="auth.lockout")
        raise LoginFailed(GENERIC_LOGIN_ERROR)
    if not user.is_active or primary_org(session, user.id) is None:
        count_ip_failure(session, request)
        audit_login(session, request, user, "denied", "inactive")
        raise LoginFailed(GENERIC_LOGIN_ERROR)
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.failed_logins = 0
    clear_user_failures(session, user, request)
    return user
