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

from carepost.accounts.models import BreakGlassGrant, Membership, User
from carepost.accounts.permissions import BREAK_GLASS_ROLES, ROLES, Permission
from carepost.accounts.ports import record
from carepost.core.crypto import get_keyring
from carepost.core.ids import new_id
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
    check_role(principal)
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
    grant = BreakGlassGrant(id=new_id(), org_id=principal.org_id, user_id=principal.user_id, started_at=now,
                            expires_at=now + timedelta(minutes=minutes))
    # The reason is free text and may name a patient: encrypted, and the audit event only
    # references the grant row.
    grant.reason_enc = get_keyring().encrypt(session, principal.org_id, BreakGlassGrant.__tablename__, "reason",
                                             grant.id, reason)
    session.add(grant)
    session.flush()
    record(session, org_id=principal.org_id, actor_type="user", actor_id=principal.user_id, action="breakglass.start",
           target_type="break_glass_grant", target_id=grant.id, details={"minutes": minutes}, **ctx)
    log.warning("break_glass_started", org_id=principal.org_id, grant_id=grant.id, actor_id=principal.user_id, minutes=minutes)
    alert_compliance(session, principal.org_id, grant, minutes)
    return grant


def check_role(principal) -> None:
    """Issue 9 item 8: only a role with a care or compliance duty may break the glass — an API
    credential or any other role never, whatever permissions it was given."""
    if principal.user_id is None or principal.role not in BREAK_GLASS_ROLES:
        raise PermissionDenied("Emergency access is for people with a care or compliance duty.",
                               code="breakglass_role")


def reason_of(session: Session, grant: BreakGlassGrant) -> str:
    return get_keyring().decrypt_text(session, grant.org_id, BreakGlassGrant.__tablename__, "reason", grant.id,
                                      grant.reason_enc) or ""


def compliance_users(session: Session, org_id: str) -> list[str]:
    """The people who review emergency access in the organization (``breakglass:review``)."""
    reviewers = [role for role, perms in ROLES.items() if Permission.BREAKGLASS_REVIEW in perms]
    return list(session.scalars(select(Membership.user_id).where(Membership.org_id == org_id,
                                                                 Membership.role.in_(reviewers))
                                .execution_options(**ALL_ORGANIZATIONS)))


def alert_compliance(session: Session, org_id: str, grant: BreakGlassGrant, minutes: int) -> int:
    """At once, every compliance user of the organization gets an in-app notice and an email
    (``account.notice`` of kind ``break_glass``: ids only — no reason, no patient). Returns the
    number of people alerted."""
    from carepost.accounts.models import InAppNotice
    from carepost.core import events

    link = f"{get_settings().base_url}/app/break-glass"
    alerted = 0
    for user_id in compliance_users(session, org_id):
        if user_id == grant.user_id:
            continue
        session.add(InAppNotice(org_id=org_id, user_id=user_id, kind="break_glass", target_type="break_glass_grant",
                                target_id=grant.id))
        events.publish("account.notice", session, "break_glass", org_id=org_id, user_id=user_id, link=link,
                       minutes=minutes)
        alerted += 1
    session.flush()
    return alerted


def unread_notices(session: Session, org_id: str, user_id: str) -> list:
    from carepost.accounts.models import InAppNotice

    return list(session.scalars(select(InAppNotice).where(InAppNotice.org_id == org_id, InAppNotice.user_id == user_id,
                                                          InAppNotice.read_at.is_(None))
                                .order_by(InAppNotice.created_at.desc()).limit(100)))


def uses_by_person(session: Session, org_id: str, days: int = 30) -> dict[str, int]:
    """Grants per person in the last ``days`` days: repeated use stands out in the review."""
    from sqlalchemy import func

    since = clock.now() - timedelta(days=days)
    return dict(session.execute(select(BreakGlassGrant.user_id, func.count()).where(
        BreakGlassGrant.org_id == org_id, BreakGlassGrant.started_at >= since).group_by(BreakGlassGrant.user_id)).all())


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
