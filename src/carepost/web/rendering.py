"""Server-rendered pages: one Jinja2 environment over every capability's ``templates/`` folder."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape

from carepost import __version__

PACKAGE_DIR = Path(__file__).resolve().parent.parent
STATIC_DIR = Path(__file__).resolve().parent / "static"

# Navigation, filled by the capabilities: (section, label, path, permission, a tuple of which any
# one suffices, or None).
NAV: list[tuple[str, str, str, str | tuple[str, ...] | None]] = [
    ("Overview", "Dashboard", "/app", None),
    ("Patients", "Contacts", "/app/contacts", "phi:read_masked"),
    ("Patients", "Import", "/app/imports", "contacts:import"),
    ("Patients", "Forms and surveys", "/app/forms", "forms:manage"),
    ("Patients", "Segments", "/app/segments", "segments:read"),
    ("Patients", "EHR messages", "/app/ehr/messages", "phi:read_masked"),  # the EHR error queue (issue 15)
    ("Delivery", "Campaigns", "/app/campaigns", "campaigns:read"),
    ("Delivery", "Journeys", "/app/journeys", "journeys:read"),  # issue 15 item 6
    ("Delivery", "Compose", "/app/compose", ("messages:send", "campaigns:send")),  # any of them (issue 10 item 5)
    ("Delivery", "Templates", "/app/templates", "templates:manage"),
    ("Delivery", "Sending domains", "/app/domains", "domains:manage"),
    ("Delivery", "Delivery log", "/app/deliveries", "messages:read"),
    ("Delivery", "Deliverability", "/app/deliverability", "analytics:read"),
    ("Delivery", "Analytics", "/app/analytics", "analytics:read"),
    ("Delivery", "Security preview", "/app/security-preview", "messages:send"),
    ("Delivery", "Recipient keys", "/app/recipient-keys", "messages:read"),
    ("Delivery", "Delivery settings", "/app/delivery-settings", "org:manage"),
    ("Delivery", "Portal notification", "/app/portal-settings", "org:manage"),
    ("Compliance", "Campaign approvals", "/app/campaigns/approvals", "campaigns:approve"),
    ("Compliance", "Audit log", "/app/audit", "audit:read"),
    ("Compliance", "Compliance center", "/app/compliance", "compliance:manage"),
    ("Compliance", "Message archive", "/app/archive", "compliance:manage"),  # search, productions (issue 16 item 8)
    ("Compliance", "Retention and holds", "/app/compliance/retention", "compliance:manage"),  # schedules, legal holds, purges (issue 16 items 1-3)
    ("Compliance", "Authorization texts", "/app/consent/texts", "consent:manage"),
    ("Compliance", "Suppressions", "/app/consent/suppressions", "consent:manage"),
    ("Compliance", "Consent reports", "/app/consent/reports", "consent:manage"),
    ("Compliance", "Emergency access", "/app/break-glass", None),
    ("Settings", "Users", "/app/users", "users:read"),
    ("Settings", "API credentials", "/app/api-credentials", "apikeys:manage"),
    ("Settings", "Webhooks", "/app/webhooks", "webhooks:manage"),
    ("Settings", "Topics", "/app/consent/topics", "consent:manage"),
    ("Settings", "Consent settings", "/app/consent/settings", "consent:manage"),
    ("Settings", "Branding", "/app/branding", "org:manage"),  # patient pages in the organization's name and colours
    ("Settings", "Security", "/app/account/security", None),
    ("Settings", "API documentation", "/api/docs", None),  # the interactive OpenAPI reference (issue 10 item 16)
]


def _template_dirs() -> list[str]:
    return [str(p) for p in sorted(PACKAGE_DIR.glob("*/templates")) if p.is_dir()]


_env = Environment(
    loader=ChoiceLoader([FileSystemLoader(d) for d in _template_dirs()]),
    autoescape=select_autoescape(["html", "xml"], default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates = Jinja2Templates(env=_env)


def nav_for(principal) -> list[tuple[str, list[tuple[str, str]]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    for section, label, path, permission in NAV:
        if principal is None:
            continue
        wanted = permission if isinstance(permission, tuple) else (permission,) if permission else ()
        if wanted and not any(principal.can(p) for p in wanted):
            continue
        sections.setdefault(section, []).append((label, path))
    return list(sections.items())


def render(request: Request, name: str, context: dict | None = None, status_code: int = 200, headers: dict | None = None) -> HTMLResponse:
    principal = getattr(request.state, "principal", None)
    ctx = {
        "request": request,
        "principal": principal,
        "csrf_token": getattr(principal, "csrf_token", None) or getattr(request.state, "csrf_token", None),
        "nav": nav_for(principal),
        "version": __version__,
        "current_path": request.url.path,
    }
    ctx.update(context or {})
    return templates.TemplateResponse(request, name, ctx, status_code=status_code, headers=headers)


def render_error(request: Request, status: int, body: dict, headers: dict | None = None) -> HTMLResponse:
    return render(request, "web/error.html", {"status": status, "error": body}, status_code=status, headers=headers)
