"""Audit of lookups that found nothing in the caller's organization (issue 9 item 25).

Every get-by-id is scoped to the caller's organization by the tenant scope
(core/database.py), so an id of another organization is simply "not found" and the caller gets
the same 404 as for an id that exists nowhere. That answer is right; leaving no trace was not:
probing another organization's ids must show in the audit log. The one place that sees every such
answer is the error handler for :class:`NotFound` (app.py), which calls :func:`record_not_found`
for authenticated callers.

The event says who asked for what, never whether it exists elsewhere (checking would make the
audit log an oracle for anyone who can read it, and costs a query per 404):
``access.denied`` with ``reason = not_found_in_org``, the object type, and the requested id as
given when it is an opaque CarePost id, else its SHA-256 (a free-text path value could be PHI).
"""

from __future__ import annotations

import hashlib
import re

from starlette.requests import Request

from carepost.core.logging import get_logger

log = get_logger("carepost.accounts.denials")

_OPAQUE_ID = re.compile(r"^[0-9a-f]{32}$|^[0-9a-f]{64}$|^cp_[A-Za-z0-9_]{8,64}$")


def requested_reference(value: str) -> str:
    """The requested id as stored in the audit event: as given when opaque, else hashed."""
    if _OPAQUE_ID.match(value):
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _target(request: Request, field: str | None) -> tuple[str, str | None, str | None]:
    """(object type, the path parameter the lookup used, its value)."""
    params = dict(request.path_params or {})
    route = request.scope.get("route")
    template = getattr(route, "path", "") or ""
    name = field if field in params else (list(params)[-1] if params else None)
    value = params.get(name) if name else None
    if name and name not in ("id", "key", "ref") and name.endswith(("_id", "_key")):
        kind = name.rsplit("_", 1)[0]
    else:
        # "/api/v1/webhooks/{endpoint_id}" -> "webhooks"; "/app/domains/{id}" -> "domains"
        segments = [s for s in template.split("/") if s and not s.startswith("{")]
        kind = segments[-1] if segments else (field or "object")
        if name and "{" + name + "}" in template:
            before = template.split("{" + name + "}")[0].rstrip("/").rsplit("/", 1)[-1]
            kind = before or kind
    return kind[:60], name, value


def record_not_found(request: Request, field: str | None) -> None:
    """Append ``access.denied`` (reason ``not_found_in_org``) for the authenticated caller."""
    from carepost.accounts.access import request_context
    from carepost.accounts.ports import record
    from carepost.core.database import system_session

    principal = getattr(request.state, "principal", None)
    if principal is None or not getattr(principal, "org_id", None):
        return
    kind, name, value = _target(request, field)
    route = request.scope.get("route")
    details = {
        "reason": "not_found_in_org",
        "method": request.method,
        "route": getattr(route, "path", None),
        "field": field or name,
    }
    if value is None and field:
        details["parameter"] = field
    try:
        with system_session() as session:
            record(
                session,
                org_id=principal.org_id,
                actor_type=principal.kind,
                actor_id=principal.actor_id,
                on_behalf_of=principal.on_behalf_of,
                action="access.denied",
                outcome="denied",
                target_type=kind,
                target_id=requested_reference(value) if isinstance(value, str) else None,
                details=details,
                **request_context(request),
            )
            session.commit()
    except Exception as exc:  # noqa: BLE001 - the caller still gets its 404; the failure is logged
        log.error("not_found_audit_failed", error_type=type(exc).__name__)
