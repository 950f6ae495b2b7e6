"""The application shell: landing redirect and dashboard."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse

from carepost.accounts.access import Principal, public, require
from carepost.accounts.permissions import ROLE_LABELS, Permission
from carepost.web.rendering import render

router = APIRouter(include_in_schema=False)


@router.get("/", dependencies=[Depends(public("redirect to the app"))])
def root() -> RedirectResponse:
    return RedirectResponse("/app", status_code=303)


@router.get("/app")
def dashboard(request: Request, principal: Principal = Depends(require())):
    from carepost.accounts.service import organization_stats

    stats = organization_stats(request.state.db, principal.org_id)
    alerts = []
    if principal.can(Permission.ANALYTICS_READ):  # open deliverability alerts as a banner (issue 13 item 7)
        from carepost.tracking import deliverability

        alerts = [deliverability.alert_out(a)
                  for a in deliverability.list_alerts(request.state.db, principal.org_id, active=True, limit=20)]
    return render(request, "web/dashboard.html", {"role_label": ROLE_LABELS.get(principal.role or "", principal.role), "stats": stats,
                                                  "active_alerts": alerts})
