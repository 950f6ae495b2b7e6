"""Consent reports (issue item 11): contacts holding a valid authorization per purpose and topic,
authorizations expiring in the next 30 days, revocations this month. Aggregates only (counts of
distinct contacts), computed in SQL; exportable as CSV. Plus the list of backdated authorizations
(references and dates) for review."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from carepost.consent.models import BACKDATE_WINDOW_DAYS, Authorization
from carepost.core.purposes import PURPOSES
from carepost.consent.service import list_topics
from carepost.core import clock

EXPIRING_DAYS = 30
BACKDATED_LISTED = 100


def consent_report(session: Session, org_id: str, at: datetime | None = None) -> dict:
    at = clock.aware(at) if at else clock.now()
    month_start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    soon = at + timedelta(days=EXPIRING_DAYS)
    not_revoked = or_(Authorization.status != "revoked", Authorization.revoked_at > at)
    not_expired = or_(Authorization.expires_at.is_(None), Authorization.expires_at > at)
    valid = and_(not_revoked, not_expired, Authorization.signed_at <= at)
    group = (Authorization.purpose, Authorization.topic_id)
    base = select(*group).where(Authorization.org_id == org_id, Authorization.contact_id.is_not(None))

    def counts(condition) -> dict[tuple, int]:
        q = base.add_columns(func.count(func.distinct(Authorization.contact_id))).where(condition).group_by(*group)
        return {(p, t): n for p, t, n in session.execute(q)}

    valid_n = counts(valid)
    expiring_n = counts(and_(valid, Authorization.expires_at.is_not(None), Authorization.expires_at <= soon))
    revoked_n = counts(and_(Authorization.status == "revoked", Authorization.revoked_at >= month_start,
                            Authorization.revoked_at <= at))
    topics = {t.id: t.name for t in list_topics(session, org_id, include_archived=True)}
    keys = sorted(set(valid_n) | set(expiring_n) | set(revoked_n), key=lambda k: (k[0], topics.get(k[1], "")))
    rows = [{
        "purpose": p, "purpose_label": PURPOSES.get(p, p), "topic_id": t, "topic": topics.get(t, "All topics") if t else "All topics",
        "valid": valid_n.get((p, t), 0), "expiring_30_days": expiring_n.get((p, t), 0),
        "revoked_this_month": revoked_n.get((p, t), 0),
    } for p, t in keys]
    totals = {k: sum(r[k] for r in rows) for k in ("valid", "expiring_30_days", "revoked_this_month")}
    from carepost.patients.service import count_contacts

    # Contacts every send excludes whatever their consent (eligibility reason ``deceased``).
    excluded = {"deceased": count_contacts(session, org_id, deceased=True)}
    return {"generated_at": at.isoformat(), "month_start": month_start.isoformat(), "rows": rows, "totals": totals,
            "excluded_contacts": excluded, "backdated": backdated_authorizations(session, org_id)}


def backdated_authorizations(session: Session, org_id: str, limit: int = BACKDATED_LISTED) -> dict:
    """Authorizations flagged ``backdated`` (recorded by staff or the API with a signing date more
    than ``BACKDATE_WINDOW_DAYS`` back, issue 9 item 12), newest recorded first, for the
    compliance officer to review: references and dates only (the reason is evidence)."""
    flagged = and_(Authorization.org_id == org_id, Authorization.backdated.is_(True))
    count = session.scalar(select(func.count(Authorization.id)).where(flagged)) or 0
    rows = session.scalars(select(Authorization).where(flagged).order_by(Authorization.created_at.desc()).limit(limit))
    items = [{"id": a.id, "contact_id": a.contact_id, "purpose": a.purpose, "method": a.method,
              "signed_at": clock.aware(a.signed_at).isoformat(), "recorded_at": clock.aware(a.created_at).isoformat(),
              "recorded_by": a.created_by} for a in rows]
    return {"count": count, "window_days": BACKDATE_WINDOW_DAYS, "items": items}


def report_csv(report: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["purpose", "topic", "valid", "expiring_30_days", "revoked_this_month"])
    for r in report["rows"]:
        topic = r["topic"]
        topic = "'" + topic if topic[:1] in ("=", "+", "-", "@") else topic
        writer.writerow([r["purpose"], topic, r["valid"], r["expiring_30_days"], r["revoked_this_month"]])
    return out.getvalue()
