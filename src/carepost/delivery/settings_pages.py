"""The organization's delivery settings in the staff UI (issue 10 item 9): the security mode every
message starts from, the default purpose of a message that names none, the organization's own
relay, and the relay the installation sends through.

Owners and administrators only (``org:manage``, the permission of ``PATCH
/api/v1/delivery-settings``); the same service (``delivery.settings``) validates, so a bad value
is refused with the field named, and nothing is half-written. Every change is audited
(``delivery_settings.update``, the values before and after — setting names, no PHI).

Lowering the mode to ``opportunistic`` lets a message with PHI go in clear text when the
recipient's server offers no TLS: the page asks for an explicit acknowledgement first.

The organization's relay (host, user name, password, "enforces verified TLS onward") takes the
place of the installation's for this organization's mail. Its password is write-only: the field is
always empty ("leave blank to keep"), the page says only whether one is set, and the audit
details never carry it. An empty relay host removes the organization's relay.

The installation's relay (``CAREPOST_SMTP_RELAY``, ``CAREPOST_SMTP_RELAY_USERNAME``,
``CAREPOST_SMTP_RELAY_PASSWORD``, ``CAREPOST_SMTP_RELAY_ENFORCES_TLS``) is shown read-only — the
password never, only whether one is set.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core.config import get_settings
from carepost.core.errors import CarePostError, ValidationFailed
from carepost.core.purposes import PURPOSE_DESCRIPTIONS, PURPOSES
from carepost.delivery import policy
from carepost.delivery import settings as delivery_settings
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

MODE_DESCRIPTIONS = {
    "opportunistic": "TLS when the recipient's server offers it, otherwise clear text — even for messages with "
                     "patient information.",
    "tls_required": "Messages with patient information need verified TLS; without it they go to the secure portal "
                    "(or PGP / S/MIME when a key is on file).",
    "tls_exclusive": "Every message needs verified TLS; without it the message is not sent.",
    "secure": "Every message with patient information goes encrypted end to end: PGP or S/MIME when a key is on "
              "file, the secure portal otherwise.",
}


def relay_view(settings=None) -> dict:
    """The installation's relay as the page shows it: where, who, whether a password is set
    (never the password), and whether the relay promises verified TLS onward."""
    settings = settings or get_settings()
    if not settings.smtp_relay:
        return {"configured": False}
    from carepost.delivery.smtp import parse_relay

    try:
        target = parse_relay(settings.smtp_relay)
        host, port = target.host, target.port
    except (CarePostError, ValueError):
        host, port = settings.smtp_relay, None
    capture = settings.smtp_relay == f"localhost@{settings.capture_host}:{settings.capture_port}"
    return {
        "configured": True, "host": host, "port": port, "username": settings.smtp_relay_username or None,
        "password_set": bool(settings.smtp_relay_password and settings.smtp_relay_password.get_secret_value()),
        "enforces_tls": bool(settings.smtp_relay_enforces_tls), "local_capture": capture,
    }


def _page(request: Request, *, values: dict, error: str | None = None, field: str | None = None,
          saved: bool = False, status_code: int = 200):
    field = field.replace(".", "_") if field else field  # relay.host -> the form's relay_host
    return render(request, "delivery/settings.html", {
        "values": values, "error": error, "field": field, "saved": saved,
        "modes": [(m, m.replace("_", " "), MODE_DESCRIPTIONS[m]) for m in policy.MODES],
        "purposes": [(key, label, PURPOSE_DESCRIPTIONS.get(key, "")) for key, label in PURPOSES.items()],
        "relay": relay_view(),
    }, status_code=status_code)


@router.get("/delivery-settings")
def delivery_settings_page(request: Request, principal: Principal = Depends(require(P.ORG_MANAGE))):
    values = delivery_settings.delivery_settings(request.state.db, principal.org_id)
    return _page(request, values=values, saved=request.query_params.get("saved") == "1")


@router.post("/delivery-settings")
def delivery_settings_save(request: Request, security_mode: str = Form(""), default_purpose: str = Form(""),
                           confirm_opportunistic: str = Form(""), relay_host: str = Form(""),
                           relay_username: str = Form(""), relay_password: str = Form(""),
                           relay_enforces_tls: str = Form(""), engagement_privacy: str = Form(""),
                           principal: Principal = Depends(require(P.ORG_MANAGE))):
    session = request.state.db
    before = delivery_settings.delivery_settings(session, principal.org_id)
    form = {"security_mode": security_mode[:64], "default_purpose": default_purpose[:64] or None,
            "engagement_privacy": bool(engagement_privacy)}
    relay = None
    if relay_host.strip():
        # A blank password keeps the stored one; no user name removes it (no AUTH).
        relay = {"host": relay_host[:300], "username": relay_username[:300] or None,
                 "password": relay_password[:2000] or (None if relay_username.strip() else ""),
                 "enforces_tls": bool(relay_enforces_tls)}
    if relay is not None or before.get("relay") is not None:
        form["relay"] = relay
    try:
        if not form["security_mode"]:
            raise ValidationFailed("Choose a security mode.", field="security_mode")
        if (form["security_mode"] == "opportunistic" and before["security_mode"] != "opportunistic"
                and not confirm_opportunistic):
            raise ValidationFailed("Opportunistic mode lets messages with patient information go in clear text when "
                                   "the recipient's server offers no TLS. Tick the box to confirm.",
                                   field="confirm_opportunistic")
        after = delivery_settings.update_delivery_settings(session, principal.org_id, form)
    except CarePostError as exc:
        session.rollback()
        shown = dict(form, relay=None if relay is None else {
            "host": relay["host"], "username": relay["username"], "enforces_tls": relay["enforces_tls"],
            "password_set": bool((before.get("relay") or {}).get("password_set"))})  # never the password
        return _page(request, values=shown, error=exc.message, field=exc.field, status_code=exc.status_code)
    password_changed = bool(relay and relay["password"] is not None)
    if after != before or password_changed:
        record_for(session, principal, request, "delivery_settings.update", target_type="organization",
                   target_id=principal.org_id, details={"before": before, "after": after, "via": "ui",
                                                        "relay_password_changed": password_changed})
    session.commit()
    return RedirectResponse("/app/delivery-settings?saved=1", status_code=303)
