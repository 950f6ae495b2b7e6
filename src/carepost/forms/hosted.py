"""The hosted form (``/f/<public id or slug>``) and its confirmation link (``/f/confirm/<token>``).

Public routes: nobody signs in. The form proves itself with a signed render timestamp, the
confirmation link with its signature; both name only ids. The pages carry a stricter CSP than
the app (nothing but this host's own scripts, styles and images; no connections at all) and
load one static script, only where a signature can be drawn.

Order of checks on a submission: size (413), the form exists and is published (404), the
per-IP rate limit (429), the body is a URL-encoded form (415/400), the honeypot (a bot gets the
thank-you page and nothing is stored), the render token (too fast or forged: the form again
with a message), then every field (422 with errors linked to their inputs). A confirmation
link shows a page on GET (link scanners follow links) and acts only on POST.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from carepost.accounts.access import db_session, public, request_context
from carepost.audit.service import record
from carepost.core.config import get_settings
from carepost.core.errors import CarePostError, NotFound, RateLimited
from carepost.core.logging import get_logger
from carepost.forms import service, tasks
from carepost.forms.models import Form, FormSubmission
from carepost.forms.strings import strings
from carepost.web.rendering import templates

log = get_logger("carepost.forms.hosted")
router = APIRouter(include_in_schema=False)

# Stricter than the app's CSP: no connections, no frames, no plugins; form posts to this host only.
HOSTED_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'none'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


class PayloadTooLarge(CarePostError):
    status_code = 413
    code = "payload_too_large"


def _page(name: str, ctx: dict, status_code: int = 200, headers: dict | None = None) -> HTMLResponse:
    body = templates.env.get_template(name).render(**ctx)
    response = HTMLResponse(body, status_code=status_code, headers=headers)
    response.headers["Content-Security-Policy"] = HOSTED_CSP
    return response


def _org_name(session: Session, org_id: str) -> str:
    brand = brand_for(session, org_id)
    return brand["name"] if brand else ""


def brand_for(session: Session, org_id: str) -> dict | None:
    """The organization's name, logo and colours for the hosted pages (issue 10 item 16)."""
    from carepost.accounts.branding import brand_for as _brand_for

    return _brand_for(session, org_id)


def _message(status: int, title_key: str, message: str, language: str = "en", org_name: str = "",
             headers: dict | None = None, brand: dict | None = None) -> HTMLResponse:
    """A status page; with the organization known, in its name, logo and colours (``brand``)."""
    t = strings(language)
    return _page("forms/message.html", {"t": t, "lang": language, "org_name": org_name or (brand or {}).get("name", ""),
                                        "brand": brand, "title": t[title_key], "message": message, "status": status},
                 status, headers)


def auth_texts(session: Session, form: Form) -> dict[str, dict]:
    """The authorization text each authorization block shows (title, plain text, version)."""
    out = {}
    for f in form.fields:
        if f["type"] != "authorization":
            continue
        try:
            text = service.authorization_text(session, form.org_id, f["purpose"], f.get("text_id"), f["key"])
        except CarePostError:
            text = None
        if text is not None:
            language, body = service.text_body(text, form.language)
            # the rendered text starts with its title, shown as the heading
            title = (text.elements.get(language) or {}).get("title") or text.title
            if body.startswith(title):
                body = body[len(title):].lstrip("\n")
            out[f["key"]] = {"id": text.id, "title": title, "version": text.version, "body": body.strip(),
                             "language": language}
    return out


def form_context(session: Session, form: Form, *, values: dict | None = None, errors: dict | None = None,
                 preview: bool = False) -> dict:
    return {
        "form": form,
        "org_name": _org_name(session, form.org_id), "brand": brand_for(session, form.org_id),
        "lang": form.language,
        "t": strings(form.language),
        "values": values or {},
        "errors": errors or {},
        "field_keys": {f["key"] for f in form.fields},
        "labels": {f["key"]: f["label"] for f in form.fields},
        "auth_texts": auth_texts(session, form),
        "render_token": service.render_token(session, form),
        "action": f"/f/{form.slug or form.public_id}",
        "preview": preview,
        "disabled": preview,
        "has_signature_pad": any(f["type"] == "authorization" and f.get("drawn_signature") for f in form.fields),
    }


def render_form(session: Session, form: Form, *, values: dict | None = None, errors: dict | None = None,
                status_code: int = 200, preview: bool = False) -> HTMLResponse:
    return _page("forms/hosted.html", form_context(session, form, values=values, errors=errors, preview=preview), status_code)


# --------------------------------------------------------------------------- the form


@router.get("/f/{key}")
def show_form(key: str, request: Request, session: Session = Depends(db_session),
              _: None = Depends(public("a hosted form is public; it shows no data"))):
    try:
        form = service.find_public_form(session, key)
    except NotFound as exc:
        return _message(404, "not_found_title", exc.message)
    response = render_form(session, form)
    session.commit()  # the first render may create the form's signing key
    return response


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge("too large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge("too large")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/f/{key}")
async def submit_form(key: str, request: Request, session: Session = Depends(db_session),
                      _: None = Depends(public("anyone may fill in a published form; spam checks and confirmation links guard it"))):
    settings = get_settings()
    try:
        body = await _read_body(request, settings.form_max_submission_bytes)
    except PayloadTooLarge:
        return _message(413, "too_large_title", strings("en")["too_large"])
    return await run_in_threadpool(_submit, key, request, session, body)


def _submit(key: str, request: Request, session: Session, body: bytes) -> HTMLResponse | RedirectResponse:
    try:
        form = service.find_public_form(session, key)
    except NotFound as exc:
        return _message(404, "not_found_title", exc.message)
    brand = brand_for(session, form.org_id)
    org_name = brand["name"] if brand else ""
    ctx = request_context(request)
    try:
        service.enforce_rate_limit(ctx["ip"])
    except RateLimited as exc:
        log.info("form_rate_limited", form_id=form.id)
        return _message(429, "rate_title", exc.message, form.language, org_name, {"Retry-After": str(exc.retry_after)},
                        brand=brand)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return _message(415, "bad_request_title", "Send the form from its page (URL-encoded form data, no file uploads).",
                        form.language, org_name, brand=brand)
    try:
        items = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=500)
    except (UnicodeDecodeError, ValueError):
        return _message(400, "bad_request_title", "The form data could not be read. Reload the page and try again.",
                        form.language, org_name, brand=brand)
    values: dict[str, list[str]] = {}
    for name, value in items:
        values.setdefault(name, []).append(value)
    parsed = service.parse_submission(form.fields, items)
    if parsed.honeypot:
        # Looks like a bot: answer like a success, store nothing.
        log.info("form_spam_dropped", form_id=form.id, reason="honeypot")
        session.rollback()
        return RedirectResponse(f"/f/{key}/thanks", status_code=303)
    try:
        service.check_render_token(session, form, parsed.render_token)
    except service.SpamSuspected as exc:
        log.info("form_spam_suspected", form_id=form.id, reason="render_token")
        response = render_form(session, form, values=values, errors={"_form": exc.message, **parsed.errors}, status_code=422)
        session.commit()
        return response
    if parsed.errors:
        response = render_form(session, form, values=values, errors=parsed.errors, status_code=422)
        session.commit()
        return response
    try:
        sub = service.submit(session, form, parsed, ip=ctx["ip"], user_agent=ctx["user_agent"])
    except CarePostError as exc:
        session.rollback()
        service.scope_to(session, form.org_id)
        return render_form(session, form, values=values, errors={exc.field or "_form": exc.message}, status_code=422)
    record(session, org_id=form.org_id, actor_type="anonymous", actor_id=None, action="form.submission.create",
           target_type="form_submission", target_id=sub.id,
           details={"form_id": form.id, "status": sub.status, "contact_id": sub.contact_id,
                    "contact_created": sub.contact_created, "effects": list(sub.effects)}, **ctx)
    service.emit_submitted(session, form, sub)
    service.request_confirmation(session, form, sub)
    session.commit()
    tasks.after_submit(sub)
    return RedirectResponse(f"/f/{key}/thanks", status_code=303)


@router.get("/f/{key}/thanks")
def thanks(key: str, request: Request, session: Session = Depends(db_session),
           _: None = Depends(public("the thank-you page says the same to everyone"))):
    try:
        form = service.find_public_form(session, key)
    except NotFound as exc:
        return _message(404, "not_found_title", exc.message)
    t = strings(form.language)
    confirm_note = form.kind != "survey" and any(f.get("contact_field") == "email" for f in form.fields)
    from carepost.portal.mailer import can_send_notices

    # Never tell a patient an email is on its way when this installation cannot send one (issue 10 item 11).
    no_email = confirm_note and not can_send_notices(session, form.org_id)
    return _page("forms/thanks.html", {"t": t, "lang": form.language, "org_name": _org_name(session, form.org_id), "brand": brand_for(session, form.org_id),
                                       "message": form.settings.get("success_message", ""),
                                       "confirm_note": confirm_note and not no_email, "no_email": no_email})


# --------------------------------------------------------------------------- confirmation


def _confirm_context(session: Session, sub: FormSubmission) -> dict:
    form = session.get(Form, sub.form_id)
    signed, topics = [], []
    texts = auth_texts(session, form)
    answers = service.submission_data(session, sub)["answers"] if sub.status == "pending_confirmation" else {}
    for f in form.fields:
        if f["type"] == "authorization" and (answers.get(f["key"]) or {}).get("signed"):
            signed.append(texts.get(f["key"], {}).get("title", f["label"]))
        if f["type"] == "consent" and answers.get(f["key"]):
            topics.append(service.topic_name(session, sub.org_id, f["topic_id"]) or f["label"])
    return {"t": strings(form.language), "lang": form.language, "org_name": _org_name(session, sub.org_id), "brand": brand_for(session, sub.org_id),
            "form_name": form.name, "effects": list(sub.effects or []), "signed": signed, "topics": topics}


def _link_error(exc: CarePostError) -> HTMLResponse:
    if exc.status_code == 410:
        return _message(410, "expired_title", exc.message)
    return _message(404, "link_title", exc.message)


@router.get("/f/confirm/{token}")
def confirm_page(token: str, request: Request, session: Session = Depends(db_session),
                 _: None = Depends(public("a confirmation link carries its own signed token; GET only shows a page"))):
    try:
        sub = service.resolve_confirmation(session, token)
    except (NotFound, service.LinkExpired) as exc:
        return _link_error(exc)
    ctx = _confirm_context(session, sub)
    return _page("forms/confirm.html", {**ctx, "token": token, "done": sub.status == "confirmed"})


@router.post("/f/confirm/{token}")
def confirm_submit(token: str, request: Request, session: Session = Depends(db_session),
                   _: None = Depends(public("a confirmation link carries its own signed token"))):
    try:
        sub = service.resolve_confirmation(session, token)
    except (NotFound, service.LinkExpired) as exc:
        return _link_error(exc)
    ctx = _confirm_context(session, sub)
    if sub.status != "confirmed":
        rctx = request_context(request)
        try:
            service.confirm(session, sub, ip=rctx["ip"], user_agent=rctx["user_agent"])
        except (NotFound, service.LinkExpired) as exc:
            session.rollback()
            return _link_error(exc)
        except service.ConfirmationFailed as exc:
            session.rollback()
            return _message(exc.status_code, "link_title", exc.message, ctx["lang"], ctx["org_name"], brand=ctx.get("brand"))
        record(session, org_id=sub.org_id, actor_type="contact", actor_id=sub.contact_id, action="form.submission.confirm",
               target_type="form_submission", target_id=sub.id,
               details={"form_id": sub.form_id, "effects": list(sub.effects), "outcome": dict(sub.outcome)}, **rctx)
        service.emit_confirmed(session, sub)
        session.commit()
        service.after_confirm(sub)
    return _page("forms/confirm.html", {**ctx, "token": token, "done": True})
