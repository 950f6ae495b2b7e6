"""UI routes of accounts: setup, sign-in, MFA, organization switch, people, API credentials."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/app", include_in_schema=False)

# --------------------------------------------------------------------------- setup, sign-in, MFA, people
# (owned by the accounts/authentication work)
# Imports of this section sit here so the two sections of this file can change independently.
from fastapi import Body, Depends, Form, Request  # noqa: E402
from fastapi.responses import JSONResponse, RedirectResponse  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from carepost.accounts import emergency, mfa  # noqa: E402
from carepost.accounts import service as accounts_service  # noqa: E402
from carepost.accounts import sessions as web_sessions  # noqa: E402
from carepost.accounts.access import Principal, authenticated, db_session, public, request_context, require  # noqa: E402
from carepost.accounts.models import User, WebAuthnCredential  # noqa: E402
from carepost.accounts.permissions import BREAK_GLASS_ROLES, ROLE_LABELS, ROLES, Permission  # noqa: E402
from carepost.accounts.ports import record  # noqa: E402
from carepost.core import clock  # noqa: E402
from carepost.core.config import get_settings  # noqa: E402
from carepost.core.errors import CarePostError, NotFound, PermissionDenied, RateLimited  # noqa: E402
from carepost.web.rendering import render  # noqa: E402


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _audit_kw(principal: Principal, request: Request) -> dict:
    return {"actor_type": principal.kind, "actor_id": principal.actor_id, "on_behalf_of": principal.on_behalf_of,
            **request_context(request)}


def _public_page(request: Request, name: str, ctx: dict, status_code: int = 200):
    """A page shown before sign-in, with the double-submit CSRF token of its form."""
    token, new = web_sessions.pre_auth_csrf(request)
    response = render(request, name, {"csrf_token": token, **ctx}, status_code=status_code)
    if new:
        web_sessions.set_pre_auth_cookie(response, token)
    return response


def _pre_mfa_page(request: Request, name: str, ctx: dict, status_code: int = 200):
    """Second-factor pages use the signed-out layout: nothing behind MFA is offered yet."""
    principal = getattr(request.state, "principal", None)
    base = {"principal": None, "nav": [], "csrf_token": getattr(principal, "csrf_token", None)}
    return render(request, name, {**base, **ctx}, status_code=status_code)


def _errors(exc: CarePostError) -> dict:
    return {exc.field or "form": exc.message}


def _current_ws(request: Request, session: Session):
    ws = web_sessions.session_from_request(request, session)
    if ws is None:
        raise NotFound("Your session has ended. Sign in again.")
    return ws


def _after_password(session: Session, user: User, request: Request) -> RedirectResponse:
    """Password (or setup/enrollment) done: a fresh session that still needs its second factor."""
    old = web_sessions.session_from_request(request, session)
    if old is not None:
        web_sessions.revoke_session(session, old)
    token, _ws = web_sessions.create_session(session, user, web_sessions.primary_org(session, user.id), request)
    session.commit()
    response = _see_other("/app/mfa" if user.totp_confirmed_at else "/app/mfa/enroll")
    web_sessions.set_session_cookie(response, token)
    response.delete_cookie(web_sessions.PRE_CSRF_COOKIE, path="/app")
    return response


def _finish_mfa(session: Session, request: Request, principal: Principal, user: User, method: str):
    """Second factor verified: new session id, counters reset, audited."""
    ws = _current_ws(request, session)
    token, new = web_sessions.rotate_session(session, ws, mfa_verified=True)
    user.failed_logins = 0
    user.last_login_at = clock.now()
    record(session, org_id=principal.org_id, actor_type="user", actor_id=user.id, action="auth.mfa", outcome="success",
           target_type="user", target_id=user.id, details={"method": method}, **request_context(request))
    session.commit()
    return token, new


def _mfa_failure(session: Session, request: Request, principal: Principal, user: User, method: str) -> bool:
    """Count a wrong second factor like a wrong password; True when the account got locked."""
    locked = web_sessions.register_user_failure(session, user, request)
    record(session, org_id=principal.org_id, actor_type="user", actor_id=user.id, action="auth.mfa", outcome="failure",
           target_type="user", target_id=user.id, details={"method": method}, **request_context(request))
    if locked:
        web_sessions.revoke_session(session, _current_ws(request, session))
        record(session, org_id=principal.org_id, actor_type="user", actor_id=user.id, action="auth.lockout",
               target_type="user", target_id=user.id, details={"reason": "too_many_failures"}, **request_context(request))
    session.commit()
    return locked


def _signed_out(url: str = "/app/login") -> RedirectResponse:
    response = _see_other(url)
    web_sessions.clear_session_cookie(response)
    return response


# ----- sign-in


@router.get("/login")
def login_page(request: Request, session: Session = Depends(db_session),
               _=Depends(public("sign-in form"))):
    ws = web_sessions.session_from_request(request, session)
    if ws is not None and ws.mfa_verified_at is not None:
        return _see_other("/app")
    notice = {"locked": "Too many failed attempts. Sign in again later.", "ended": "You have been signed out."}.get(
        request.query_params.get("m", ""))
    return _public_page(request, "accounts/login.html", {"notice": notice, "email": ""})


@router.post("/login")
def login_submit(request: Request, email: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
                 session: Session = Depends(db_session), _=Depends(public("sign-in: checks the password itself"))):
    session.info["scope"] = "system"
    if not web_sessions.pre_auth_csrf_ok(request, csrf_token):
        return _public_page(request, "accounts/login.html",
                            {"error": "The form expired. Please try again.", "email": email[:320]}, status_code=403)
    try:
        user = web_sessions.check_password_login(session, request, email, password)
    except RateLimited as exc:
        session.rollback()
        web_sessions.audit_login(session, request, None, "denied", "ip_throttled")
        session.commit()
        response = _public_page(request, "accounts/login.html", {"error": exc.message, "email": ""}, status_code=429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web_sessions.LoginFailed as exc:
        session.commit()  # failure counters and audit events stay
        return _public_page(request, "accounts/login.html", {"error": exc.message, "email": email[:320]}, status_code=401)
    web_sessions.audit_login(session, request, user, "success", None, action="auth.password")
    return _after_password(session, user, request)


@router.post("/logout")
def logout(request: Request, principal: Principal = Depends(authenticated())):
    session = request.state.db
    ws = web_sessions.session_from_request(request, session)
    if ws is not None:
        web_sessions.revoke_session(session, ws)
    record(session, org_id=principal.org_id, action="auth.logout", target_type="user", target_id=principal.user_id,
           **_audit_kw(principal, request))
    session.commit()
    return _signed_out("/app/login?m=ended")


# ----- second factor


@router.get("/mfa")
def mfa_page(request: Request, principal: Principal = Depends(authenticated())):
    if principal.mfa_verified:
        return _see_other("/app")
    session = request.state.db
    user = session.get(User, principal.user_id)
    if user.totp_confirmed_at is None:
        return _see_other("/app/mfa/enroll")
    has_keys = bool(mfa.webauthn_credentials(session, user.id))
    return _pre_mfa_page(request, "accounts/mfa_challenge.html", {"has_keys": has_keys})


@router.post("/mfa")
def mfa_submit(request: Request, code: str = Form(""), principal: Principal = Depends(authenticated())):
    if principal.mfa_verified:
        return _see_other("/app")
    session = request.state.db
    user = session.get(User, principal.user_id)
    if user.totp_confirmed_at is None:
        return _see_other("/app/mfa/enroll")
    if web_sessions.is_locked(user, request):
        web_sessions.revoke_session(session, _current_ws(request, session))
        session.commit()
        return _signed_out("/app/login?m=locked")
    cleaned = code.replace(" ", "").replace("-", "")
    method = "recovery_code" if len(cleaned) == 16 else "totp"
    ok = mfa.use_recovery_code(session, user, code) if method == "recovery_code" else mfa.verify_totp(session, user, code)
    if not ok:
        if _mfa_failure(session, request, principal, user, method):
            return _signed_out("/app/login?m=locked")
        has_keys = bool(mfa.webauthn_credentials(session, user.id))
        return _pre_mfa_page(request, "accounts/mfa_challenge.html",
                      {"has_keys": has_keys, "error": "That code is not valid. Codes change every 30 seconds and work once."},
                      status_code=401)
    token, _ws = _finish_mfa(session, request, principal, user, method)
    response = _see_other("/app")
    web_sessions.set_session_cookie(response, token)
    return response


@router.get("/mfa/enroll")
def mfa_enroll_page(request: Request, principal: Principal = Depends(authenticated())):
    session = request.state.db
    user = session.get(User, principal.user_id)
    if user.totp_confirmed_at is not None:
        # A confirmed factor is replaced only from the security page, after MFA.
        return _see_other("/app" if principal.mfa_verified else "/app/mfa")
    secret = mfa.totp_secret_of(session, user) if user.totp_secret else None
    if secret is None:
        secret = mfa.new_totp_secret()
        mfa.store_totp_secret(session, user, secret)
        session.commit()
    return _enroll_page(request, user, secret)


def _enroll_page(request: Request, user: User, secret: str, error: str | None = None, status_code: int = 200):
    uri = mfa.provisioning_uri(secret, user.email)
    grouped = " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))
    return _pre_mfa_page(request, "accounts/mfa_enroll.html",
                  {"secret": secret, "secret_grouped": grouped, "otpauth_uri": uri, "qr": mfa.qr_data_uri(uri), "error": error},
                  status_code=status_code)


@router.post("/mfa/enroll")
def mfa_enroll_submit(request: Request, code: str = Form(""), principal: Principal = Depends(authenticated())):
    session = request.state.db
    user = session.get(User, principal.user_id)
    if user.totp_confirmed_at is not None or user.totp_secret is None:
        return _see_other("/app/mfa/enroll")
    if not mfa.confirm_totp(session, user, code):
        if _mfa_failure(session, request, principal, user, "totp_enroll"):
            return _signed_out("/app/login?m=locked")
        return _enroll_page(request, user, mfa.totp_secret_of(session, user),
                            "That code is not valid. Enter the 6 digits your app shows now.", status_code=422)
    codes = mfa.new_recovery_codes(session, user)
    record(session, org_id=principal.org_id, actor_type="user", actor_id=user.id, action="auth.mfa_enroll",
           target_type="user", target_id=user.id, details={"method": "totp"}, **request_context(request))
    token, new_ws = _finish_mfa(session, request, principal, user, "totp_enroll")
    response = _pre_mfa_page(request, "accounts/recovery_codes.html",
                      {"codes": codes, "next_url": "/app", "csrf_token": web_sessions.csrf_token_for(new_ws)})
    web_sessions.set_session_cookie(response, token)
    return response


@router.post("/mfa/webauthn/options")
def mfa_webauthn_options(request: Request, principal: Principal = Depends(authenticated())):
    session = request.state.db
    user = session.get(User, principal.user_id)
    ws = _current_ws(request, session)
    options = mfa.authentication_options(session, ws, user)
    session.commit()
    return JSONResponse(options)


@router.post("/mfa/webauthn")
def mfa_webauthn_verify(request: Request, credential: dict = Body(..., embed=True),
                        principal: Principal = Depends(authenticated())):
    session = request.state.db
    user = session.get(User, principal.user_id)
    if principal.mfa_verified:
        return JSONResponse({"redirect": "/app"})
    if web_sessions.is_locked(user, request):
        web_sessions.revoke_session(session, _current_ws(request, session))
        session.commit()
        response = JSONResponse({"error": {"code": "locked", "message": "Sign in again later."}, "redirect": "/app/login?m=locked"}, status_code=401)
        web_sessions.clear_session_cookie(response)
        return response
    ws = _current_ws(request, session)
    row = mfa.verify_assertion(session, ws, user, credential)
    if row is None:
        locked = _mfa_failure(session, request, principal, user, "webauthn")
        response = JSONResponse({"error": {"code": "mfa_failed", "message": "The security key was not accepted."},
                                 "redirect": "/app/login?m=locked" if locked else None}, status_code=401)
        if locked:
            web_sessions.clear_session_cookie(response)
        return response
    token, _ws = _finish_mfa(session, request, principal, user, "webauthn")
    response = JSONResponse({"redirect": "/app"})
    web_sessions.set_session_cookie(response, token)
    return response


# ----- first start and enrollment links


def _link_error_page(request: Request, session: Session, exc: CarePostError, purpose: str):
    session.rollback()
    session.info["scope"] = "system"
    record(session, org_id=None, actor_type="anonymous", actor_id=None, action=f"link.{purpose}", outcome="failure",
           target_type="one_time_link", details={"reason": exc.code}, **request_context(request))
    session.commit()
    return render(request, "accounts/link_invalid.html", {"message": exc.message, "status": exc.status_code},
                  status_code=exc.status_code)


@router.get("/setup/{token}")
def setup_page(token: str, request: Request, session: Session = Depends(db_session),
               _=Depends(public("first-owner setup: the one-time link is the credential"))):
    session.info["scope"] = "system"
    try:
        accounts_service.find_link(session, token, "setup")
    except CarePostError as exc:
        return _link_error_page(request, session, exc, "setup")
    return _public_page(request, "accounts/setup.html", {"form": {}, "errors": {}, "token": token})


@router.post("/setup/{token}")
def setup_submit(token: str, request: Request, org_name: str = Form(""), email: str = Form(""),
                 display_name: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
                 session: Session = Depends(db_session),
                 _=Depends(public("first-owner setup: the one-time link is the credential"))):
    session.info["scope"] = "system"
    form = {"org_name": org_name[:200], "email": email[:320], "display_name": display_name[:200]}
    try:
        link = accounts_service.find_link(session, token, "setup")
    except CarePostError as exc:
        return _link_error_page(request, session, exc, "setup")
    if not web_sessions.pre_auth_csrf_ok(request, csrf_token):
        return _public_page(request, "accounts/setup.html",
                            {"form": form, "errors": {"form": "The form expired. Please try again."}, "token": token}, 403)
    audit = {"actor_type": "anonymous", "actor_id": None, **request_context(request)}
    try:
        _org, user = accounts_service.setup_first_owner(session, link, org_name=org_name, email=email,
                                                        display_name=display_name, password=password, audit=audit)
    except CarePostError as exc:
        session.rollback()
        return _public_page(request, "accounts/setup.html", {"form": form, "errors": _errors(exc), "token": token},
                            exc.status_code)
    return _after_password(session, user, request)


@router.get("/enroll/{token}")
def enroll_page(token: str, request: Request, session: Session = Depends(db_session),
                _=Depends(public("new person's enrollment: the one-time link is the credential"))):
    session.info["scope"] = "system"
    try:
        link = accounts_service.find_link(session, token, "enrollment")
    except CarePostError as exc:
        return _link_error_page(request, session, exc, "enrollment")
    user = session.get(User, link.user_id)
    return _public_page(request, "accounts/enroll.html",
                        {"errors": {}, "token": token, "email": user.email, "display_name": user.display_name})


@router.post("/enroll/{token}")
def enroll_submit(token: str, request: Request, display_name: str = Form(""), password: str = Form(""),
                  csrf_token: str = Form(""), session: Session = Depends(db_session),
                  _=Depends(public("new person's enrollment: the one-time link is the credential"))):
    session.info["scope"] = "system"
    try:
        link = accounts_service.find_link(session, token, "enrollment")
    except CarePostError as exc:
        return _link_error_page(request, session, exc, "enrollment")
    user = session.get(User, link.user_id)
    ctx = {"token": token, "email": user.email, "display_name": display_name[:200]}
    if not web_sessions.pre_auth_csrf_ok(request, csrf_token):
        return _public_page(request, "accounts/enroll.html", {**ctx, "errors": {"form": "The form expired. Please try again."}}, 403)
    try:
        user = accounts_service.complete_enrollment(session, link, password=password, display_name=display_name,
                                                    audit=request_context(request))
    except CarePostError as exc:
        session.rollback()
        return _public_page(request, "accounts/enroll.html", {**ctx, "errors": _errors(exc)}, exc.status_code)
    return _after_password(session, user, request)


# ----- invitations and password reset (issue 9 item 1)


def _invitation_ctx(session: Session, link, token: str) -> dict:
    from carepost.accounts.models import Organization

    org = session.get(Organization, link.org_id)
    user = session.get(User, link.user_id)
    return {"token": token, "org_name": org.name if org else "", "email": user.email if user else "",
            "role_label": ROLE_LABELS.get(link.role or "", link.role or ""), "errors": {}}


def _invitation_view(request: Request, session: Session, token: str, link, *, errors: dict | None = None,
                     status_code: int = 200):
    """A new person chooses a password; an existing account holder accepts while signed in as
    themselves (second factor done); anyone else is told to sign in or sign out."""
    user = session.get(User, link.user_id)
    if user is not None and user.password_hash is None:
        return _public_page(request, "accounts/enroll.html", {
            "errors": errors or {}, "token": token, "email": user.email, "display_name": user.display_name,
            "action": f"/app/invite/{token}"}, status_code)
    ctx = _invitation_ctx(session, link, token)
    ws = web_sessions.session_from_request(request, session)
    if ws is None or ws.mfa_verified_at is None:
        state = "sign_in"
    elif ws.user_id != link.user_id:
        state, status_code = "other_account", 403
    else:
        state = "accept"
    return _public_page(request, "accounts/invitation.html", {**ctx, "state": state, "errors": errors or {}}, status_code)


@router.get("/invite/{token}")
def invitation_page(token: str, request: Request, session: Session = Depends(db_session),
                    _=Depends(public("invitation: the one-time link sent to the invitee's mailbox"))):
    session.info["scope"] = "system"
    try:
        link = accounts_service.find_link(session, token, "invitation")
    except CarePostError as exc:
        return _link_error_page(request, session, exc, "invitation")
    return _invitation_view(request, session, token, link)


@router.post("/invite/{token}")
def invitation_accept(token: str, request: Request, display_name: str = Form(""), password: str | None = Form(None),
                      csrf_token: str = Form(""), session: Session = Depends(db_session),
                      _=Depends(public("invitation: the one-time link sent to the invitee's mailbox"))):
    session.info["scope"] = "system"
    try:
        link = accounts_service.find_link(session, token, "invitation")
    except CarePostError as exc:
        return _link_error_page(request, session, exc, "invitation")
    if not web_sessions.pre_auth_csrf_ok(request, csrf_token):
        return _invitation_view(request, session, token, link, errors={"form": "The form expired. Please try again."},
                                status_code=403)
    user = session.get(User, link.user_id)
    new_person = user is not None and user.password_hash is None
    ws = web_sessions.session_from_request(request, session)
    if new_person:
        signed_in_as = user.id  # the link itself, from the person's own mailbox, proves who they are
    else:
        signed_in_as = ws.user_id if ws is not None and ws.mfa_verified_at is not None else None
    try:
        membership = accounts_service.accept_invitation(
            session, link, user_id=signed_in_as or "", password=password if new_person else None,
            display_name=display_name, audit=request_context(request))
    except CarePostError as exc:
        session.rollback()
        return _invitation_view(request, session, token, link, errors=_errors(exc), status_code=exc.status_code)
    if new_person:
        return _after_password(session, user, request)
    ws.org_id = membership.org_id
    ws.state = {}
    session.commit()
    return _see_other("/app")


@router.get("/password-reset")
def password_reset_page(request: Request, _=Depends(public("password reset request form"))):
    return _public_page(request, "accounts/password_reset.html", {"errors": {}, "email": "", "token": None})


@router.post("/password-reset")
def password_reset_request(request: Request, email: str = Form(""), csrf_token: str = Form(""),
                           session: Session = Depends(db_session), _=Depends(public("password reset request"))):
    session.info["scope"] = "system"
    ctx = {"errors": {}, "email": email[:320], "token": None}
    if not web_sessions.pre_auth_csrf_ok(request, csrf_token):
        return _public_page(request, "accounts/password_reset.html",
                            {**ctx, "errors": {"form": "The form expired. Please try again."}}, 403)
    try:
        web_sessions.check_ip_throttle(session, request)
        web_sessions.count_ip_failure(session, request)  # each request counts: no mail bombing
        accounts_service.request_password_reset(session, email, get_settings().base_url,
                                                audit={"actor_type": "anonymous", "actor_id": None,
                                                       **request_context(request)})
    except RateLimited as exc:
        session.rollback()
        return _public_page(request, "accounts/password_reset.html", {**ctx, "errors": {"form": exc.message}}, 429)
    except CarePostError as exc:
        session.rollback()
        return _public_page(request, "accounts/password_reset.html", {**ctx, "errors": _errors(exc)}, exc.status_code)
    session.commit()
    return _public_page(request, "accounts/password_reset.html", {**ctx, "sent": True})


@router.get("/password-reset/{token}")
def password_reset_form(token: str, request: Request, session: Session = Depends(db_session),
                        _=Depends(public("password reset: the one-time link sent to the person's mailbox"))):
    session.info["scope"] = "system"
    try:
        accounts_service.find_link(session, token, "password_reset")
    except CarePostError as exc:
        return _link_error_page(request, session, exc, "password_reset")
    return _public_page(request, "accounts/password_reset.html", {"errors": {}, "email": "", "token": token})


@router.post("/password-reset/{token}")
def password_reset_submit(token: str, request: Request, password: str = Form(""), csrf_token: str = Form(""),
                          session: Session = Depends(db_session),
                          _=Depends(public("password reset: the one-time link sent to the person's mailbox"))):
    session.info["scope"] = "system"
    try:
        link = accounts_service.find_link(session, token, "password_reset")
    except CarePostError as exc:
        return _link_error_page(request, session, exc, "password_reset")
    ctx = {"errors": {}, "email": "", "token": token}
    if not web_sessions.pre_auth_csrf_ok(request, csrf_token):
        return _public_page(request, "accounts/password_reset.html", {**ctx, "errors": {"form": "The form expired."}}, 403)
    try:
        user = accounts_service.complete_password_reset(session, link, password, audit=request_context(request))
    except CarePostError as exc:
        session.rollback()
        return _public_page(request, "accounts/password_reset.html", {**ctx, "errors": _errors(exc)}, exc.status_code)
    # A fresh session that still needs the second factor (or its enrollment if it was reset).
    return _after_password(session, user, request)


# ----- organization switch


@router.post("/switch-org")
def switch_org(request: Request, org_id: str = Form(""), principal: Principal = Depends(require())):
    session = request.state.db
    target = next((o for o in principal.extra.get("orgs", []) if o["id"] == org_id), None)
    if target is None:
        record(session, org_id=principal.org_id, action="session.switch_org", outcome="denied", target_type="organization",
               target_id=org_id[:32] or None, details={"reason": "not_a_member"}, **_audit_kw(principal, request))
        session.commit()
        raise PermissionDenied("You do not belong to that organization.", field="org_id")
    ws = _current_ws(request, session)
    old_org = ws.org_id
    ws.org_id = target["id"]
    ws.state = {}
    # The real person is the actor in both organizations' chains.
    record(session, org_id=old_org, action="session.switch_org", target_type="organization", target_id=target["id"],
           details={"direction": "out"}, **_audit_kw(principal, request))
    record(session, org_id=target["id"], action="session.switch_org", target_type="organization", target_id=target["id"],
           details={"direction": "in", "from": old_org}, **_audit_kw(principal, request))
    session.commit()
    return _see_other("/app")


# ----- the person's own security page


def _security_page(request: Request, principal: Principal, *, codes: list[str] | None = None, error: str | None = None,
                   status_code: int = 200):
    session = request.state.db
    current = principal.session_id
    sessions_ = [
        {"ref": ws.id[:16], "current": ws.id == current, "created_at": clock.aware(ws.created_at),
         "last_seen_at": clock.aware(ws.last_seen_at), "ip": ws.ip, "user_agent": ws.user_agent,
         "mfa": ws.mfa_verified_at is not None}
        for ws in web_sessions.active_sessions(session, principal.user_id)
    ]
    return render(request, "accounts/security.html", {
        "sessions": sessions_,
        "keys": mfa.webauthn_credentials(session, principal.user_id),
        "recovery_left": mfa.recovery_codes_left(session, principal.user_id),
        "new_codes": codes,
        "error": error,
        "rp_id": mfa.rp_id(),
        "idle_minutes": max(1, get_settings().session_idle_timeout // 60),
    }, status_code=status_code)


@router.get("/account/security")
def security_page(request: Request, principal: Principal = Depends(require())):
    return _security_page(request, principal)


@router.post("/account/sessions/{ref}/revoke")
def revoke_own_session(ref: str, request: Request, principal: Principal = Depends(require())):
    session = request.state.db
    target = next((ws for ws in web_sessions.active_sessions(session, principal.user_id) if ws.id[:16] == ref), None)
    if target is None or len(ref) != 16:
        raise NotFound("No such session.", field="session")
    web_sessions.revoke_session(session, target)
    record(session, org_id=principal.org_id, action="session.revoke", target_type="web_session", target_id=ref,
           **_audit_kw(principal, request))
    session.commit()
    if target.id == principal.session_id:
        return _signed_out("/app/login?m=ended")
    return _see_other("/app/account/security")


@router.post("/account/recovery-codes")
def regenerate_recovery_codes(request: Request, principal: Principal = Depends(require())):
    session = request.state.db
    user = session.get(User, principal.user_id)
    codes = mfa.new_recovery_codes(session, user)
    record(session, org_id=principal.org_id, action="auth.recovery_codes", target_type="user", target_id=user.id,
           **_audit_kw(principal, request))
    session.commit()
    return _security_page(request, principal, codes=codes)


@router.post("/account/webauthn/options")
def webauthn_register_options(request: Request, principal: Principal = Depends(require())):
    session = request.state.db
    user = session.get(User, principal.user_id)
    options = mfa.registration_options(session, _current_ws(request, session), user)
    session.commit()
    return JSONResponse(options)


@router.post("/account/webauthn")
def webauthn_register(request: Request, credential: dict = Body(...), name: str = Body(""),
                      principal: Principal = Depends(require())):
    session = request.state.db
    user = session.get(User, principal.user_id)
    try:
        row = mfa.register_credential(session, _current_ws(request, session), user, credential, name)
    except CarePostError as exc:
        session.rollback()
        record(session, org_id=principal.org_id, action="auth.webauthn_register", outcome="failure", target_type="user",
               target_id=user.id, details={"reason": exc.code}, **_audit_kw(principal, request))
        session.commit()
        raise
    record(session, org_id=principal.org_id, action="auth.webauthn_register", target_type="webauthn_credential",
           target_id=row.id, **_audit_kw(principal, request))
    session.commit()
    return JSONResponse({"id": row.id, "name": row.name, "redirect": "/app/account/security"}, status_code=201)


@router.post("/account/webauthn/{key_id}/delete")
def webauthn_delete(key_id: str, request: Request, principal: Principal = Depends(require())):
    session = request.state.db
    row = session.get(WebAuthnCredential, key_id)
    if row is None or row.user_id != principal.user_id:
        raise NotFound("No such security key.", field="key_id")
    session.delete(row)
    record(session, org_id=principal.org_id, action="auth.webauthn_delete", target_type="webauthn_credential",
           target_id=key_id, **_audit_kw(principal, request))
    session.commit()
    return _see_other("/app/account/security")


# ----- people


def _users_page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
                new_link: str | None = None, notice: str | None = None, status_code: int = 200):
    session = request.state.db
    members = [
        {"id": u.id, "email": u.email, "display_name": u.display_name, "role": m.role,
         "role_label": ROLE_LABELS.get(m.role, m.role), "mfa": u.totp_confirmed_at is not None,
         "enrolled": u.password_hash is not None, "last_login_at": clock.aware(u.last_login_at),
         "is_self": u.id == principal.user_id}
        for u, m in accounts_service.list_members(session, principal.org_id)
    ]
    return render(request, "accounts/users.html", {
        "members": members, "roles": [(r, ROLE_LABELS.get(r, r)) for r in ROLES],
        "can_manage": principal.can(Permission.USERS_MANAGE), "errors": errors or {}, "form": form or {},
        "new_link": new_link, "notice": notice, "link_hours": get_settings().enrollment_link_hours,
        "invitations": [{"email": u.email, "role_label": ROLE_LABELS.get(link.role or "", link.role),
                         "expires_at": clock.aware(link.expires_at)}
                        for u, link in accounts_service.pending_invitations(session, principal.org_id)],
    }, status_code=status_code)


@router.get("/users")
def users_page(request: Request, principal: Principal = Depends(require(Permission.USERS_READ))):
    return _users_page(request, principal)


@router.post("/users")
def users_create(request: Request, email: str = Form(""), role: str = Form(""), display_name: str = Form(""),
                 principal: Principal = Depends(require(Permission.USERS_MANAGE))):
    session = request.state.db
    form = {"email": email[:320], "role": role[:40], "display_name": display_name[:200]}
    try:
        # Issue 9 item 1: the invitation goes to the person's own mailbox; the admin never sees
        # the link, and the person joins only by accepting it.
        user = accounts_service.invite_member(
            session, principal.org_id, email=email, role=role, display_name=display_name,
            base_url=get_settings().base_url, actor_role=principal.role, audit=_audit_kw(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _users_page(request, principal, errors=_errors(exc), form=form, status_code=exc.status_code)
    session.commit()
    return _users_page(request, principal, notice=f"Invitation emailed to {user.email}. They join once they accept it.")


@router.post("/users/{user_id}/role")
def users_change_role(user_id: str, request: Request, role: str = Form(""),
                      principal: Principal = Depends(require(Permission.USERS_MANAGE))):
    session = request.state.db
    try:
        accounts_service.change_role(session, principal.org_id, user_id, role, actor_role=principal.role,
                                     audit=_audit_kw(principal, request))
    except (CarePostError) as exc:
        session.rollback()
        if exc.status_code == 404:
            raise
        return _users_page(request, principal, errors={"members": exc.message}, status_code=exc.status_code)
    session.commit()
    return _see_other("/app/users")


@router.post("/users/{user_id}/remove")
def users_remove(user_id: str, request: Request, principal: Principal = Depends(require(Permission.USERS_MANAGE))):
    session = request.state.db
    try:
        accounts_service.remove_member(session, principal.org_id, user_id, actor_role=principal.role,
                                       audit=_audit_kw(principal, request))
    except CarePostError as exc:
        session.rollback()
        if exc.status_code == 404:
            raise
        return _users_page(request, principal, errors={"members": exc.message}, status_code=exc.status_code)
    session.commit()
    return _see_other("/app/users")


# ----- break-glass


def _break_glass_page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
                      status_code: int = 200):
    session = request.state.db
    emergency.close_expired(session, principal.org_id)
    session.commit()
    now = clock.now()
    mine = emergency.grants_of_user(session, principal.org_id, principal.user_id)
    active = next((g for g in mine if g.ended_at is None and clock.aware(g.expires_at) > now), None)
    review = []
    alerts = []
    if principal.can(Permission.BREAKGLASS_REVIEW):
        uses = emergency.uses_by_person(session, principal.org_id)
        notices = emergency.unread_notices(session, principal.org_id, principal.user_id)
        alerts = [n.target_id for n in notices if n.kind == "break_glass"]
        for n in notices:  # seen now
            n.read_at = now
        session.commit()
        for g, email in emergency.grants_for_review(session, principal.org_id):
            review.append({"grant": g, "email": email, "active": g.ended_at is None and clock.aware(g.expires_at) > now,
                           "reason": emergency.reason_of(session, g), "uses_30d": uses.get(g.user_id, 0),
                           "new": g.id in alerts,
                           "started_at": clock.aware(g.started_at), "expires_at": clock.aware(g.expires_at),
                           "ended_at": clock.aware(g.ended_at), "reviewed_at": clock.aware(g.reviewed_at),
                           "is_self": g.user_id == principal.user_id})
    return render(request, "accounts/break_glass.html", {
        "can_use": principal.can(Permission.BREAKGLASS_USE) and principal.role in BREAK_GLASS_ROLES,
        "can_review": principal.can(Permission.BREAKGLASS_REVIEW), "alerts": len(alerts),
        "active": active, "active_expires": clock.aware(active.expires_at) if active else None,
        "mine": [{"grant": g, "started_at": clock.aware(g.started_at), "ended_at": clock.aware(g.ended_at),
                  "expires_at": clock.aware(g.expires_at), "reason": emergency.reason_of(session, g)} for g in mine],
        "review": review, "max_minutes": get_settings().break_glass_max_minutes,
        "min_reason": get_settings().break_glass_min_reason, "errors": errors or {}, "form": form or {},
    }, status_code=status_code)


@router.get("/break-glass")
def break_glass_page(request: Request, principal: Principal = Depends(require())):
    return _break_glass_page(request, principal)


@router.post("/break-glass")
def break_glass_start(request: Request, reason: str = Form(""), minutes: str = Form(""),
                      principal: Principal = Depends(require(Permission.BREAKGLASS_USE))):
    session = request.state.db
    try:
        emergency.start(session, principal, reason, minutes, request_context(request))
    except CarePostError as exc:
        session.rollback()
        return _break_glass_page(request, principal, errors=_errors(exc), form={"reason": reason[:2000], "minutes": minutes[:6]},
                                 status_code=exc.status_code)
    session.commit()
    return _see_other("/app/break-glass")


@router.post("/break-glass/{grant_id}/end")
def break_glass_end(grant_id: str, request: Request, principal: Principal = Depends(require())):
    session = request.state.db
    emergency.end(session, principal, grant_id, request_context(request))
    session.commit()
    return _see_other("/app/break-glass")


@router.post("/break-glass/{grant_id}/review")
def break_glass_review(grant_id: str, request: Request,
                       principal: Principal = Depends(require(Permission.BREAKGLASS_REVIEW))):
    session = request.state.db
    try:
        emergency.review(session, principal, grant_id, request_context(request))
    except CarePostError as exc:
        session.rollback()
        if exc.status_code == 404:
            raise
        return _break_glass_page(request, principal, errors={"review": exc.message}, status_code=exc.status_code)
    session.commit()
    return _see_other("/app/break-glass")



# --------------------------------------------------------------------------- API credentials
# (owned by the API credentials work)
from carepost.accounts import credentials as api_creds  # noqa: E402
from carepost.accounts.permissions import API_SCOPES, OWNER_ONLY_SCOPES, may_grant_scope  # noqa: E402
from carepost.core.errors import ValidationFailed  # noqa: E402

# No "never" (issue 9 item 6): empty means the installation default (CAREPOST_API_KEY_EXPIRY_DAYS).
_EXPIRY_CHOICES = [("30", "in 30 days"), ("90", "in 90 days"), ("365", "in a year"), ("", "installation default")]


def _api_credentials_page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
                          created=None, created_secret: str | None = None, notice: str | None = None,
                          status_code: int = 200):
    session = request.state.db
    now = clock.now()
    return render(request, "accounts/api_credentials.html", {
        "credentials": [api_creds.credential_view(c, now) for c in api_creds.list_credentials(session, principal.org_id)],
        "scopes": [{"name": s, "allowed": may_grant_scope(s, principal.permissions, principal.role),
                    "owner_only": s in OWNER_ONLY_SCOPES} for s in sorted(API_SCOPES)],
        "expiry_choices": _EXPIRY_CHOICES, "errors": errors or {}, "form": form or {},
        "created": created, "created_secret": created_secret, "notice": notice,
    }, status_code=status_code)


@router.get("/api-credentials")
def api_credentials_page(request: Request, principal: Principal = Depends(require(Permission.APIKEYS_MANAGE))):
    return _api_credentials_page(request, principal)


@router.post("/api-credentials")
def api_credentials_create(request: Request, name: str = Form(""), scopes: list[str] = Form([]),
                           expires_in_days: str = Form(""), sandbox: str = Form(""),
                           principal: Principal = Depends(require(Permission.APIKEYS_MANAGE))):
    form = {"name": name[:300], "scopes": scopes, "expires_in_days": expires_in_days[:5], "sandbox": bool(sandbox)}
    return _api_credentials_create(request, principal, form)


def _api_credentials_create(request: Request, principal: Principal, form: dict):
    session = request.state.db
    try:
        days = None
        if form["expires_in_days"]:
            if not form["expires_in_days"].isdigit():
                raise ValidationFailed("Choose an expiry from the list.", field="expires_in_days")
            days = int(form["expires_in_days"])
        cred, secret = api_creds.create_credential(
            session, principal.org_id, name=form["name"], scopes=form["scopes"],
            creator_permissions=principal.permissions, creator_role=principal.role,
            created_by=principal.user_id or principal.actor_id, expires_in_days=days, sandbox=form["sandbox"],
        )
        record(session, org_id=principal.org_id, action="api_credential.create", target_type="api_credential",
               target_id=cred.id, details={"key_id": cred.key_id, "scopes": list(cred.scopes), "sandbox": cred.sandbox},
               **_audit_kw(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _api_credentials_page(request, principal, errors=_errors(exc), form=form, status_code=exc.status_code)
    session.commit()
    # The secret is rendered into this response only (Cache-Control: no-store), never into a URL.
    return _api_credentials_page(request, principal, created=cred, created_secret=secret)


@router.post("/api-credentials/{credential_id}/revoke")
def api_credentials_revoke(credential_id: str, request: Request,
                           principal: Principal = Depends(require(Permission.APIKEYS_MANAGE))):
    session = request.state.db
    cred = api_creds.get_credential(session, principal.org_id, credential_id)
    tokens = api_creds.revoke_credential(session, cred)
    record(session, org_id=principal.org_id, action="api_credential.revoke", target_type="api_credential",
           target_id=cred.id, details={"key_id": cred.key_id, "tokens_revoked": tokens}, **_audit_kw(principal, request))
    session.commit()
    return _see_other("/app/api-credentials")
