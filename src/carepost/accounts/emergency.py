"""Break-glass emergency access (45 CFR 164.312(a)(2)(ii)).

A person holding ``breakglass:use`` may grant themselves ``BREAK_GLASS_GRANTS`` (reading PHI,
masked and unmasked) for a limited time. The reason is required, the duration is capped by
``CAREPOST_BREAK_GLASS_MAX_MINUTES``, start and end are audited and logged as alerts, every page
shows a banner while the grant is active, and compliance officers (``breakglass:review``) see
every grant and mark it reviewed.

These functions take a session and never commit: the route (or the sign-in check that notices
an expired grant) commits.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.accounts.models import BreakGlassGrant, User
from carepost.accounts.ports import record
from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.database import ALL_ORGANIZATIONS
from carepost.core.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from carepost.core.logging import get_logger

log = get_logger("carepost.breakglass")


def active_grant(session: Session, org_id: str, user_id: str) -> BreakGlassGrant | None:
    """The person's running grant in ``org_id``. Explicit filters, so it works on the unscoped
    session of the sign-in check as well as on a scoped one."""
    return session.scalar(
        select(BreakGlassGrant)
        .where(
            BreakGlassGrant.org_id == org_id,
            BreakGlassGrant.user_id == user_id,
            BreakGlassGrant.ended_at.is_(None),
            BreakGlassGrant.expires_at > clock.now(),
        )
        .order_by(BreakGlassGrant.started_at.desc())
        .execution_options(**ALL_ORGANIZATIONS)
    )


def close_expired(session: Session, org_id: str, *, user_id: str | None = None) -> int:
    """End grants whose time ran out and audit each end once (``breakglass.expire``)."""
    query = select(BreakGlassGrant).where(
        BreakGlassGrant.org_id == org_id,
        BreakGlassGrant.ended_at.is_(None),
        BreakGlassGrant.expires_at <= clock.now(),
    )
    if user_id:
        query = query.where(BreakGlassGrant.user_id == user_id)
    closed = 0
    for grant in session.scalars(query.execution_options(**ALL_ORGANIZATIONS)):
        grant.ended_at = grant.expires_at
        record(session, org_id=org_id, actor_type="system", actor_id="breakglass", on_behalf_of=grant.user_id,
               action="breakglass.expire", target_type="break_glass_grant", target_id=grant.id)
        log.warning("break_glass_expired", org_id=org_id, grant_id=grant.id)
        closed += 1
    return closed


def start(session: Session, principal, reason: str, minutes: int | str | None, ctx: dict) -> BreakGlassGrant:
    settings = get_settings()
    reason = " ".join((reason or "").split())
    if len(reason) < settings.break_glass_min_reason:
        raise ValidationFailed(
            f"Describe the emergency in at least {settings.break_glass_min_reason} characters.", field="reason"
        )
    if len(reason) > 2000:
        raise ValidationFailed("Keep the reason under 2,000 characters.", field="reason")
    try:
        minutes = int(minutes) if minutes not in (None, "") else settings.break_glass_max_minutes
    except (TypeError, ValueError):
        raise ValidationFailed("Enter the duration as a whole number of minutes.", field="minutes") from None
    if not 1 <= minutes <= settings.break_glass_max_minutes:
        raise ValidationFailed(
            f"Choose a duration between 1 and {settings.break_glass_max_minutes} minutes.", field="minutes"
        )
    if active_grant(session, principal.org_id, principal.user_id):
        raise Conflict("Emergency access is already active for you.", field="reason")
    now = clock.now()
    grant = BreakGlassGrant(org_id=principal.org_id, user_id=principal.user_id, reason=reason, started_at=now,
                            expires_at=now + timedelta(minutes=minutes))
    session.add(grant)
    session.flush()
    # The reason is free text and may name a patient: the audit event references the grant row.
    record(session, org_id=principal.org_id, actor_type="user", actor_id=principal.user_id, action="breakglass.start",
           target_type="break_glass_grant", target_id=grant.id, details={"minutes": minutes}, **ctx)
    log.warning("break_glass_started", org_id=principal.org_id, grant_id=grant.id, actor_id=principal.user_id, minutes=minutes)
    return grant


def end(session: Session, principal, grant_id: str, ctx: dict) -> BreakGlassGrant:
    grant = session.get(BreakGlassGrant, grant_id)
    if grant is None or grant.user_id != principal.user_id:
        raise NotFound("No such emergency access grant.", field="grant")
    if grant.ended_at is not None:
        raise Conflict("This emergency access has already ended.", field="grant")
    grant.ended_at = min(clock.now(), clock.aware(grant.expires_at))
    record(session, org_id=principal.org_id, actor_type="user", actor_id=principal.user_id, action="breakglass.end",
           target_type="break_glass_grant", target_id=grant.id, **ctx)
    log.warning("break_glass_ended", org_id=principal.org_id, grant_id=grant.id)
    return grant


def review(session: Session, principal, grant_id: str, ctx: dict) -> BreakGlassGrant:
    grant = session.get(BreakGlassGrant, grant_id)
    if grant is None:
        raise NotFound("No such emergency access grant.", field="grant")
    if grant.user_id == principal.user_id:
        raise PermissionDenied("Someone else must review your own emergency access.")
    if grant.ended_at is None and clock.aware(grant.expires_at) > clock.now():
        raise Conflict("Emergency access is still active; review it after it ends.", field="grant")
    if grant.reviewed_at is not None:
        raise Conflict("This emergency access was already reviewed.", field="grant")
    grant.reviewed_by = principal.user_id
    grant.reviewed_at = clock.now()
    record(session, org_id=principal.org_id, actor_type="user", actor_id=principal.user_id, action="breakglass.review",
           target_type="break_glass_grant", target_id=grant.id, **ctx)
    return grant


def grants_for_review(session: Session, org_id: str) -> list[tuple[BreakGlassGrant, str]]:
    """Every grant of the organization (newest first) with the email of the person who used it."""
    rows = session.execute(
        select(BreakGlassGrant, User.email)
        .join(User, User.id == BreakGlassGrant.user_id)
        .where(BreakGlassGrant.org_id == org_id)
        .order_by(BreakGlassGrant.started_at.desc())
        .limit(500)
    ).all()
    return [(g, email) for g, email in rows]


def grants_of_user(session: Session, org_id: str, user_id: str) -> list[BreakGlassGrant]:
    return list(
        session.scalars(
            select(BreakGlassGrant)
            .where(BreakGlassGrant.org_id == org_id, BreakGlassGrant.user_id == user_id)
            .order_by(BreakGlassGrant.started_at.desc())
            .limit(50)
        )
    )
