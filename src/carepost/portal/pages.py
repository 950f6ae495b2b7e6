"""The secure portal for recipients (``/p``): open the link, prove the address (one-time code or
the sender's question), read the message and its attachments, reply securely.

Every route here is public in the sense of :func:`carepost.accounts.access.public`: the caller is
not a CarePost user. What protects them:

* the link token (unguessable; only its hash is stored) names the message — a wrong token is a
  plain 404 that says nothing about why;
* the second factor opens a short portal session (cookie ``cp_portal``: HttpOnly,
  SameSite=Strict, path ``/p``, separate from staff sessions, idle and absolute timeouts);
* forms carry a CSRF token (double-submit before sign-in, bound to the portal session after);
  a POST from another origin is refused;
* lockout after repeated wrong codes or answers (``service``);
* every step is audited with actor type ``portal_recipient``.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from carepost.accounts.access import db_session, public, request_context
from carepost.core.config import get_settings
from carepost.core.errors import CarePostError
from carepost.core.logging import get_logger
from carepost.portal import service
from carepost.portal.models import PortalMessage, PortalSession
from carepost.web.rendering import render

log = get_logger("carepost.portal")

router = APIRouter(prefix="/p", include_in_schema=False)

COOKIE = "cp_portal"
PRE_COOKIE = "cp_portal_pre"
COOKIE_PATH = "/p"
LINK_PROOF = public("secure portal: the link token names the message; a one-time code or the sender's question opens it")


def _secure() -> bool:
    return get_settings().base_url.startswith("https://")


def _set_cookie(response: Response, name: str, value: str) -> None:
    response.set_cookie(name, value, httponly=True, samesite="strict", secure=_secure(), path=COOKIE_PATH)


def _same_origin(request: Request) -> bool:
    """Refuse form posts from another site. Browsers say where a request comes from in
    ``Sec-Fetch-Site``; ``Origin`` is compared when it is sent (under the portal's
    ``Referrer-Policy: no-referrer`` a browser sends ``Origin: null`` on POST, which says nothing)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return True
    ours = urlsplit(get_settings().base_url)
    theirs = urlsplit(origin)
    return (theirs.scheme, theirs.netloc) == (ours.scheme, ours.netloc)


def _pre_csrf(request: Request) -> tuple[str, bool]:
    existing = request.cookies.get(PRE_COOKIE)
    if existing and len(existing) == 43:
        return existing, False
    return secrets.token_urlsafe(32), True


def _pre_csrf_ok(request: Request, sent: str | None) -> bool:
    cookie = request.cookies.get(PRE_COOKIE)
    return bool(cookie and sent and hmac.compare_digest(cookie, sent))


def _session_csrf(ps: PortalSession) -> str:
    return ps.csrf_secret


def _page(request: Request, name: str, ctx: dict, status_code: int = 200, *, csrf: str | None = None,
          set_pre: bool = False) -> Response:
    request.state.csrf_token = csrf
    response = render(request, name, ctx, status_code=status_code)
    if set_pre and csrf:
        _set_cookie(response, PRE_COOKIE, csrf)
    return response


def brand_for(session, org_id: str) -> dict | None:
    """The organization's name, logo and colours for the portal pages (issue 10 item 16)."""
    from carepost.accounts.branding import brand_for as _brand_for

    return _brand_for(session, org_id)


def _not_found(request: Request) -> Response:
    return _page(request, "portal/closed.html", {"state": "invalid", "org_name": None}, status_code=404)


def _closed(request: Request, session: Session, pm: PortalMessage, st: str) -> Response:
    ctx = {"state": st, "org_name": service.organization_name(session, pm), "brand": brand_for(session, pm.org_id)}
    if st == "locked":
        until = service.locked_until(pm)
        ctx["locked_minutes"] = None if until is None else max(1, int((until - service.clock.now()).total_seconds() // 60) + 1)
        ctx["token"] = None
    return _page(request, "portal/closed.html", ctx, status_code=410 if st in ("expired", "recalled") else 423)


def _load(session: Session, token: str) -> PortalMessage | None:
    pm = service.find_by_token(session, token)
    if pm is not None:
        service.mark_expired_if_due(session, pm)
    return pm


def _signin_page(request: Request, session: Session, pm: PortalMessage, token: str, *, error: str | None = None,
                 notice: str | None = None, status_code: int = 200) -> Response:
    csrf, new = _pre_csrf(request)
    ctx = {
        "token": token,
        "org_name": service.organization_name(session, pm), "brand": brand_for(session, pm.org_id),
        "auth": pm.auth,
        "question": service.question_text(session, pm) if pm.auth == "question" else None,
        "masked_address": service.masked_address(session, pm),
        "code_sent": pm.auth == "code" and service.code_pending(pm),
        "birth_date_check": pm.auth == "code" and bool(pm.birth_date_hash),
        "code_tls_unavailable": pm.auth == "code" and bool(pm.code_tls_unavailable),
        "code_minutes": get_settings().portal_code_minutes,
        "error": error,
        "notice": notice,
    }
    return _page(request, "portal/signin.html", ctx, status_code=status_code, csrf=csrf, set_pre=new)


def _current(request: Request, session: Session, pm: PortalMessage) -> PortalSession | None:
    return service.session_for(session, pm, request.cookies.get(COOKIE))


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.get("/{token}")
def landing(request: Request, token: str, session: Session = Depends(db_session), _=Depends(LINK_PROOF)):
    pm = _load(session, token)
    if pm is None:
        return _not_found(request)
    st = service.state(pm)
    if st == "open" and _current(request, session, pm) is not None:
        session.commit()
        return _see_other(f"/p/{quote(token)}/message")
    service.record_opened(session, pm, request_context(request))
    session.commit()
    if st != "open":
        return _closed(request, session, pm, st)
    notice = "We sent a code. Check your email." if request.query_params.get("sent") == "1" else None
    return _signin_page(request, session, pm, token, notice=notice)


@router.post("/{token}/code")
def request_code(request: Request, token: str, csrf_token: str = Form(""), session: Session = Depends(db_session),
                 _=Depends(LINK_PROOF)):
    from carepost.portal import tasks

    pm = _load(session, token)
    if pm is None:
        return _not_found(request)
    st = service.state(pm)
    if st != "open":
        session.commit()
        return _closed(request, session, pm, st)
    if not _same_origin(request) or not _pre_csrf_ok(request, csrf_token):
        return _signin_page(request, session, pm, token, error="The form expired. Please try again.", status_code=403)
    try:
        service.check_code_request(pm)
    except service.CodeNotSent as exc:
        return _signin_page(request, session, pm, token, error=exc.message, status_code=429)
    service.reserve_code(session, pm, request_context(request))
    pm_id = pm.id
    session.commit()
    # Enqueued after the commit: the task takes the database on its own (one session at a time).
    tasks.send_portal_code(pm_id)
    return _see_other(f"/p/{quote(token)}?sent=1")


def _after_signin(request: Request, session: Session, pm: PortalMessage, token: str) -> Response:
    cookie, _row = service.create_session(session, pm)
    session.commit()
    response = _see_other(f"/p/{quote(token)}/message")
    _set_cookie(response, COOKIE, cookie)
    return response


@router.post("/{token}/verify")
def verify(request: Request, token: str, code: str = Form(""), answer: str = Form(""), birth_date: str = Form(""),
           csrf_token: str = Form(""),
           session: Session = Depends(db_session), _=Depends(LINK_PROOF)):
    pm = _load(session, token)
    if pm is None:
        return _not_found(request)
    st = service.state(pm)
    if st != "open":
        session.commit()
        return _closed(request, session, pm, st)
    if not _same_origin(request) or not _pre_csrf_ok(request, csrf_token):
        return _signin_page(request, session, pm, token, error="The form expired. Please try again.", status_code=403)
    ctx = request_context(request)
    if pm.auth == "code" and birth_date and not code:
        result = service.verify_birth_date(session, pm, birth_date[:40], ctx)
    elif pm.auth == "code":
        result = service.verify_code(session, pm, code[:40], ctx)
    else:
        result = service.verify_answer(session, pm, answer[:1000], ctx)
    if result.ok:
        return _after_signin(request, session, pm, token)
    session.commit()
    if service.state(pm) != "open":
        return _closed(request, session, pm, service.state(pm))
    return _signin_page(request, session, pm, token, error=result.reason, status_code=422)


@router.get("/{token}/message")
def message(request: Request, token: str, session: Session = Depends(db_session), _=Depends(LINK_PROOF)):
    pm = _load(session, token)
    if pm is None:
        return _not_found(request)
    st = service.state(pm)
    if st != "open":
        session.commit()
        return _closed(request, session, pm, st)
    ps = _current(request, session, pm)
    if ps is None:
        session.commit()
        return _see_other(f"/p/{quote(token)}")
    content = service.message_content(session, pm)
    own_replies = [service.reply_dict(session, r) for r in service.replies(session, pm)]
    service.record_view(session, pm, request_context(request))
    ctx = {
        "token": token, "org_name": service.organization_name(session, pm), "brand": brand_for(session, pm.org_id), "m": content, "replies": own_replies,
        "expires_at": service.clock.aware(pm.expires_at), "replied": request.query_params.get("replied") == "1",
        "reply_error": None, "reply_text": "",
    }
    session.commit()
    return _page(request, "portal/message.html", ctx, csrf=_session_csrf(ps))


@router.get("/{token}/attachments/{attachment_id}")
def download(request: Request, token: str, attachment_id: str, session: Session = Depends(db_session),
             _=Depends(LINK_PROOF)):
    pm = _load(session, token)
    if pm is None or service.state(pm) != "open":
        session.commit()
        return _not_found(request)
    if _current(request, session, pm) is None:
        session.commit()
        return _see_other(f"/p/{quote(token)}")
    try:
        filename, ctype, content = service.attachment(session, pm, attachment_id, request_context(request))
    except CarePostError:
        session.commit()
        return _not_found(request)
    session.commit()
    ascii_name = "".join(c if c.isascii() and (c.isalnum() or c in "._- ") else "_" for c in filename) or "attachment"
    disposition = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"
    # Served as a download, never rendered: a file cannot run script in the portal's origin.
    return Response(content, media_type=ctype if "/" in ctype else "application/octet-stream", headers={
        "Content-Disposition": disposition, "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    })


@router.post("/{token}/reply")
def reply(request: Request, token: str, text: str = Form(""), csrf_token: str = Form(""),
          session: Session = Depends(db_session), _=Depends(LINK_PROOF)):
    from carepost.portal import tasks

    pm = _load(session, token)
    if pm is None:
        return _not_found(request)
    st = service.state(pm)
    if st != "open":
        session.commit()
        return _closed(request, session, pm, st)
    ps = _current(request, session, pm)
    if ps is None:
        session.commit()
        return _see_other(f"/p/{quote(token)}")
    if not _same_origin(request) or not hmac.compare_digest(csrf_token or "", _session_csrf(ps)):
        session.commit()
        return _see_other(f"/p/{quote(token)}/message")
    try:
        row = service.add_reply(session, pm, text[: service.MAX_REPLY_CHARS + 1], request_context(request))
    except CarePostError as exc:
        content = service.message_content(session, pm)
        ctx = {
            "token": token, "org_name": service.organization_name(session, pm), "brand": brand_for(session, pm.org_id), "m": content,
            "replies": [service.reply_dict(session, r) for r in service.replies(session, pm)],
            "expires_at": service.clock.aware(pm.expires_at), "replied": False, "reply_error": exc.message,
            "reply_text": text[: service.MAX_REPLY_CHARS],
        }
        session.commit()
        return _page(request, "portal/message.html", ctx, status_code=422, csrf=_session_csrf(ps))
    reply_id = row.id
    session.commit()
    tasks.notify_reply(reply_id)
    return _see_other(f"/p/{quote(token)}/message?replied=1")


@router.post("/{token}/signout")
def signout(request: Request, token: str, csrf_token: str = Form(""), session: Session = Depends(db_session),
            _=Depends(LINK_PROOF)):
    pm = _load(session, token)
    if pm is not None:
        ps = _current(request, session, pm)
        if ps is not None and hmac.compare_digest(csrf_token or "", _session_csrf(ps)):
            service.end_session(session, ps)
        session.commit()
    response = _see_other(f"/p/{quote(token)}")
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure())
    return response
