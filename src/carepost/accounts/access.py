"""Who is calling, and may they? One place for authentication, authorization and scoping.

Every route declares exactly one of:

* ``Depends(require(Permission.X, ...))`` — authenticate (session cookie, API key, Basic,
  OAuth token or HMAC signature), check the permissions, scope the request's database session
  to the caller's organization, audit a denial;
* ``Depends(public("why"))`` — no caller identity; the route carries its own proof (a signed
  token in the path or body) or shows nothing private.

``app.assemble`` refuses routes that declare neither (deny by default, ARCHITECTURE.md section 5).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Literal

# Starlette's Request is fastapi.Request itself (FastAPI resolves the dependencies' annotations
# below by this name); FastAPI is imported where a dependency is made, so a process without
# routes (the worker, CLI commands) does not import it (docs/performance.md, "Process start-up").
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from carepost.accounts.permissions import Permission
from carepost.core.database import session_factory
from carepost.core.errors import AuthenticationRequired, PermissionDenied

ACCESS_ATTR = "__carepost_access__"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass
class Principal:
    """The authenticated caller. ``actor_id`` is what audit events record as "who"."""

    kind: Literal["user", "api_credential", "system"]
    org_id: str
    actor_id: str
    permissions: frozenset[str]
    user_id: str | None = None
    credential_id: str | None = None
    role: str | None = None
    session_id: str | None = None
    mfa_verified: bool = False
    on_behalf_of: str | None = None
    break_glass_grant_id: str | None = None
    sandbox: bool = False
    via_cookie: bool = False
    csrf_token: str | None = None
    rate_limit_per_minute: int | None = None
    extra: dict = field(default_factory=dict)

    def can(self, permission: str) -> bool:
        return permission in self.permissions


async def db_session(request: Request) -> AsyncIterator[Session]:
    """The request's database session. Unscoped until an access dependency scopes it;
    an unscoped session refuses to read organization tables.

    Opened and closed on the event loop, not in the thread pool: a new session holds no
    connection, and one whose transaction has ended (committed or rolled back) has returned its
    connection to the pool, so neither does any I/O — two thread hand-offs fewer per request
    (issue 11 item 6). A session still in a transaction is closed in the thread pool (its
    rollback is a database round trip)."""
    session = session_factory()()
    request.state.db = session
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


def request_context(request: Request) -> dict:
    """Where a request came from, for audit events (never PHI)."""
    return {
        "ip": request.client.host if request.client else None,
        "user_agent": (request.headers.get("user-agent") or "")[:300],
        "request_id": getattr(request.state, "request_id", None),
    }


def _from_memory(request: Request) -> tuple[Principal | None, bool, str | None]:
    """``(principal, gate known, acknowledgement)`` decided on the event loop, without the
    database: an API key pair this process verified moments ago (``credentials.principal_from_memory``)
    and, when it holds ``phi:read_unmasked``, its cached training gate. ``(None, False, None)``:
    authenticate in the thread pool as usual. Two thread hand-offs fewer per API request
    (issue 11 item 6); every failure and every look-up still goes through :func:`_authenticate`."""
    path = request.url.path  # as _authenticate reads it: API keys never sign in to the web UI
    if path == "/app" or path.startswith("/app/") or not request.headers.get("authorization"):
        return None, False, None
    from carepost.accounts.credentials import principal_from_memory

    principal = principal_from_memory(request)  # raises RateLimited, counted once
    if principal is None or not principal.can(Permission.PHI_READ_UNMASKED):
        return principal, True, None
    from carepost.accounts.ports import phi_gate

    try:
        return principal, True, phi_gate(None, principal)
    except LookupError:
        return principal, False, None


def _gate(session: Session, principal: Principal) -> str | None:
    """The training gate (``ports.phi_gate``) read in the caller's organization."""
    from carepost.accounts.ports import phi_gate

    session.info.pop("scope", None)
    session.info["org_id"] = principal.org_id  # the caller's organization (as in require, once allowed)
    return phi_gate(session, principal)


def _authenticate_and_gate(request: Request, session: Session) -> tuple[Principal | None, str | None]:
    """:func:`_authenticate`, then the training gate of a caller holding ``phi:read_unmasked``,
    in one thread hand-off."""
    principal = _authenticate(request, session)
    if principal is None or not principal.can(Permission.PHI_READ_UNMASKED):
        return principal, None
    return principal, _gate(session, principal)


def _authenticate(request: Request, session: Session) -> Principal | None:
    # Imported here: both modules import this one for Principal.
    from carepost.accounts.credentials import principal_from_authorization
    from carepost.accounts.sessions import principal_from_cookie

    # The web UI (/app) is for people: only a session cookie signs in there. API credentials
    # work on the REST API.
    path = request.url.path
    if path == "/app" or path.startswith("/app/"):
        return principal_from_cookie(request, session)
    if request.headers.get("authorization"):
        return principal_from_authorization(request, session)
    return principal_from_cookie(request, session)


async def _csrf_ok(request: Request, principal: Principal) -> bool:
    if not principal.via_cookie or request.method in SAFE_METHODS:
        return True
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get("csrf_token")
        sent = value if isinstance(value, str) else None
    return bool(sent and principal.csrf_token and hmac.compare_digest(sent, principal.csrf_token))


def _audit_denial(session: Session, request: Request, principal: Principal | None, reason: str, needed: tuple) -> None:
    from carepost.accounts.ports import record

    session.rollback()
    session.info.pop("org_id", None)
    session.info["scope"] = "system"
    record(
        session,
        org_id=principal.org_id if principal else None,
        actor_type=principal.kind if principal else "anonymous",
        actor_id=principal.actor_id if principal else None,
        on_behalf_of=principal.on_behalf_of if principal else None,
        action="access.denied",
        target_type="route",
        target_id=request.scope.get("route").path if request.scope.get("route") else None,
        outcome="denied",
        details={"reason": reason, "needed": list(needed), "method": request.method},
        **request_context(request),
    )
    session.commit()


def require(*permissions: Permission | str):
    """Dependency: an authenticated caller holding every one of ``permissions``."""
    from fastapi import Depends

    needed = tuple(str(p) for p in permissions)

    async def dependency(request: Request, session: Session = Depends(db_session)) -> Principal:
        # The training gate (164.308(a)(5), issue 16 item 10): unmasked PHI only for a caller who
        # acknowledged the current policies; otherwise this request sees PHI masked, and a route
        # that needs it unmasked is refused. Cached per person (compliance.training). Decided with
        # the authentication: from memory on the event loop when it can be, else in one hand-off.
        principal, gate_known, acknowledgement = _from_memory(request)
        if principal is None:
            principal, acknowledgement = await run_in_threadpool(_authenticate_and_gate, request, session)
        elif not gate_known:
            acknowledgement = await run_in_threadpool(_gate, session, principal)
        if principal is None:
            await run_in_threadpool(_audit_denial, session, request, None, "unauthenticated", needed)
            raise AuthenticationRequired("Sign in or send API credentials.")
        if not await _csrf_ok(request, principal):
            await run_in_threadpool(_audit_denial, session, request, principal, "csrf", needed)
            raise PermissionDenied("Missing or wrong CSRF token.", code="csrf_failed")
        if acknowledgement:  # only ever set for a caller holding phi:read_unmasked
            principal = replace(principal, permissions=principal.permissions - {Permission.PHI_READ_UNMASKED},
                                extra={**principal.extra, "acknowledgement_required": acknowledgement})
        missing = [p for p in needed if not principal.can(p)]
        if principal.kind == "user" and not principal.mfa_verified:
            # MFA is mandatory for every person before any permissioned route (HIPAA NPRM 2025).
            missing = missing or ["mfa"]
        if missing:
            await run_in_threadpool(_audit_denial, session, request, principal, "missing:" + ",".join(missing), needed)
            if missing == ["mfa"]:
                raise PermissionDenied("Multi-factor authentication is required.", code="mfa_required")
            if acknowledgement and missing == [Permission.PHI_READ_UNMASKED.value]:
                raise PermissionDenied(acknowledgement, code="acknowledgement_required")
            raise PermissionDenied("You do not have permission to do this.")
        session.info.pop("scope", None)
        session.info["org_id"] = principal.org_id
        request.state.principal = principal
        return principal

    setattr(dependency, ACCESS_ATTR, ("permission", needed))
    return dependency


def authenticated():
    """Dependency: any signed-in caller, MFA not yet required (MFA enrollment, logout)."""
    from fastapi import Depends

    async def dependency(request: Request, session: Session = Depends(db_session)) -> Principal:
        principal = await run_in_threadpool(_authenticate, request, session)
        if principal is None:
            raise AuthenticationRequired("Sign in first.")
        if not await _csrf_ok(request, principal):
            raise PermissionDenied("Missing or wrong CSRF token.", code="csrf_failed")
        session.info.pop("scope", None)
        session.info["org_id"] = principal.org_id
        request.state.principal = principal
        return principal

    setattr(dependency, ACCESS_ATTR, ("authenticated", ()))
    return dependency


def public(why: str):
    """Dependency: a route open to anyone; ``why`` documents the reason in code review."""

    def dependency() -> None:
        return None

    setattr(dependency, ACCESS_ATTR, ("public", (why,)))
    return dependency


def declared_access(route) -> tuple | None:
    """The access declaration of a FastAPI route, searched through its dependency tree."""
    stack = list(getattr(route, "dependant", None).dependencies) if getattr(route, "dependant", None) else []
    while stack:
        dep = stack.pop()
        marker = getattr(dep.call, ACCESS_ATTR, None) if dep.call else None
        if marker:
            return marker
        stack.extend(dep.dependencies)
    return None
