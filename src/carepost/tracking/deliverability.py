"""Deliverability per receiving provider (issue 13 item 7): delivery, deferral, bounce and
complaint rates over the last 7 or 30 days, judged against the Gmail and Yahoo bulk-sender rules,
and alerts raised when a rate crosses its level and cleared when it is back under.

**Where the figures come from.** The analytics rollups (:mod:`carepost.tracking.rollups`), day
grain, summed over the window per ``receiving_domain`` — never the events. That dimension keeps a
large mailbox provider's domain by name and folds every other domain into ``other`` (a clinic's or
a family's own domain could identify a patient), so nothing here is PHI. Provider domains are
grouped as receivers run them: ``gmail.com`` (with googlemail.com), ``yahoo.com`` (Yahoo and
AOL), ``outlook.com`` (Outlook, Hotmail, Live, MSN), ``icloud.com`` (iCloud, me.com, mac.com);
other named providers stay by their own name.

**Rates and levels** (:data:`THRESHOLDS`):

* complaint rate = complaints / delivered — the "spam rate" of Gmail's Postmaster Tools. Gmail
  and Yahoo require bulk senders to stay under 0.3% and recommend under 0.1% (REFERENCE.md):
  0.1% is the *warning* level, 0.3% the *limit*;
* hard-bounce rate = permanent bounces / sent, and deferral rate = deferrals / sent. Gmail and
  Yahoo publish no number for these; the levels are CarePost's (a list that hard-bounces 2% is
  going stale; 5% is what receivers treat as a purchased or abandoned list) and say so;
* delivery rate and soft bounces are shown, not judged.

A rate is judged only over at least :data:`MIN_VOLUME` messages (its denominator): one complaint
among twenty messages says nothing about a sender.

**Alerts.** :func:`evaluate` (the hourly task ``tracking.tasks.evaluate_deliverability``) judges
each provider's rates over :data:`ALERT_WINDOW_DAYS`. A rate at or over a level opens a
:class:`DeliverabilityAlert` (one open alert per provider and rate; its level follows the rate),
writes the audit event ``deliverability.threshold_crossed`` and emits the webhook event of the
same name; going up from warning to limit does both again. When the rate is back under the
warning level (or too little mail is left to judge), the alert is cleared:
``deliverability.threshold_cleared``. Alerts hold a provider name, a rate name, counts and
levels — no address, no message, no contact.

**Per sending domain.** The rollups also carry the sending domain a copy went out from
(``sending_domain_id``): :func:`by_sending_domain` sums them per sending domain of the
organization, and :func:`evaluate` judges the complaint and hard-bounce rates of each one as well
(:data:`SENDING_DOMAIN_RATES`; deferrals are the receivers' throttling, judged per provider).
Such an alert has ``provider`` ``all`` and names the sending domain (the organization's own
domain, never a recipient's). Rollups written before the dimension existed carry none (``''``):
``carepost analytics rebuild`` recounts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Float, Index, Integer, String, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id
from carepost.core.logging import get_logger
from carepost.tracking import service as tracking
from carepost.tracking.rollups import OTHER_DOMAIN, AnalyticsRollup

log = get_logger("carepost.tracking.deliverability")

WINDOWS = (7, 30)
ALERT_WINDOW_DAYS = 7
MIN_VOLUME = 100
METRICS = ("sent", "delivered", "deferred", "bounced_hard", "bounced_soft", "complained", "failed")
ALL = "all"

# Receiving domains grouped the way the receivers run them (the rollups' provider names).
PROVIDER_GROUPS: dict[str, tuple[str, ...]] = {
    "gmail.com": ("gmail.com", "googlemail.com"),
    "yahoo.com": ("yahoo.com", "yahoo.co.uk", "yahoo.fr", "yahoo.de", "yahoo.es", "yahoo.it", "yahoo.ca",
                  "yahoo.com.au", "yahoo.co.in", "yahoo.co.jp", "ymail.com", "rocketmail.com", "aol.com", "aim.com"),
    "outlook.com": ("outlook.com", "hotmail.com", "hotmail.co.uk", "hotmail.fr", "hotmail.de", "hotmail.it",
                    "hotmail.es", "live.com", "live.co.uk", "live.fr", "msn.com", "passport.com"),
    "icloud.com": ("icloud.com", "me.com", "mac.com"),
}
_GROUP_OF = {domain: group for group, members in PROVIDER_GROUPS.items() for domain in members}
GMAIL_YAHOO = ("gmail.com", "yahoo.com")


def provider_of(receiving_domain: str) -> str:
    return _GROUP_OF.get(receiving_domain, receiving_domain or OTHER_DOMAIN)


@dataclass(frozen=True)
class Threshold:
    rate: str
    label: str
    numerator: str
    denominator: str
    warning: float  # at or over: warning (above what is recommended)
    limit: float  # at or over: over the limit
    source: str


THRESHOLDS: dict[str, Threshold] = {t.rate: t for t in (
    Threshold("complaint_rate", "Complaint (spam) rate", "complained", "delivered", 0.001, 0.003,
              "Gmail and Yahoo bulk-sender rules: spam rate under 0.3%, aim under 0.1%."),
    Threshold("bounce_rate", "Hard-bounce rate", "bounced_hard", "sent", 0.02, 0.05,
              "CarePost's levels (Gmail and Yahoo publish no bounce limit): over 2% the list is going stale, "
              "over 5% receivers treat it as bought or abandoned."),
    Threshold("deferral_rate", "Deferral rate", "deferred", "sent", 0.05, 0.15,
              "CarePost's levels (no published limit): receivers defer mail they are throttling."),
)}

LEVELS = ("warning", "limit")
SENDING_DOMAIN_RATES = ("complaint_rate", "bounce_rate")

# Registered by the composition root (``carepost.assembly``), like every other capability's.
EVENT_TYPES: dict[str, str] = {
    "deliverability.threshold_crossed": "A receiving provider's complaint, hard-bounce or deferral rate, or a sending "
                                        "domain's complaint or hard-bounce rate, crossed its warning level or limit "
                                        "(data: provider, sending_domain when it is about one, rate, level, value, "
                                        "counts, window).",
    "deliverability.threshold_cleared": "A rate that had crossed a level is back under it (or too little mail is left "
                                        "to judge it).",
}


class DeliverabilityAlert(OrgScoped, Base):
    """A rate of one receiving provider at or over a level; open until it is back under. Holds a
    provider name, a rate name, counts and levels — nothing about a recipient."""

    __tablename__ = "deliverability_alerts"
    __table_args__ = (Index("ix_deliverability_alerts_org_open", "org_id", "cleared_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    provider: Mapped[str] = mapped_column(String(64))  # gmail.com | yahoo.com | outlook.com | ... | other
    rate: Mapped[str] = mapped_column(String(32))  # complaint_rate | bounce_rate | deferral_rate
    level: Mapped[str] = mapped_column(String(16))  # warning | limit
    value: Mapped[float] = mapped_column(Float)
    level_value: Mapped[float] = mapped_column(Float)  # the level crossed (0.003 ...)
    numerator: Mapped[int] = mapped_column(Integer)
    denominator: Mapped[int] = mapped_column(Integer)
    window_days: Mapped[int] = mapped_column(Integer)
    raised_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now)
    cleared_at: Mapped[datetime | None]
    cleared_reason: Mapped[str | None] = mapped_column(String(32))  # back_under | too_little_mail
    # '' for a receiving provider's alert; else the organization's sending domain it is about.
    sending_domain_id: Mapped[str] = mapped_column(String(32), default="", server_default="")
    sending_domain: Mapped[str | None] = mapped_column(String(253))


# --------------------------------------------------------------------------- rates


def _window(days: int, now: datetime | None = None) -> tuple[datetime, datetime]:
    if days not in WINDOWS:
        raise ValueError(f"the window is one of {WINDOWS} days")
    now = clock.aware(now or clock.now())
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days - 1), now


def totals(session: Session, org_id: str, days: int, now: datetime | None = None) -> dict[str, dict[str, int]]:
    """{receiving provider: {metric: count}} over the window, from day rollups."""
    since, _ = _window(days, now)
    R = AnalyticsRollup
    rows = session.execute(
        select(R.receiving_domain, R.metric, func.sum(R.n))
        .where(R.org_id == org_id, R.grain == "d", R.period >= since, R.metric.in_(METRICS))
        .group_by(R.receiving_domain, R.metric)
    ).all()
    out: dict[str, dict[str, int]] = {}
    for domain, metric, n in rows:
        for key in ([provider_of(domain)] if domain else []) + [ALL]:
            counts = out.setdefault(key, dict.fromkeys(METRICS, 0))
            counts[metric] += int(n or 0)
    return out


def sending_domain_totals(session: Session, org_id: str, days: int,
                          now: datetime | None = None) -> dict[str, dict[str, int]]:
    """{sending domain id: {metric: count}} over the window, from day rollups (rows without a
    sending domain — written before the dimension, or rebuilt — are left out)."""
    since, _ = _window(days, now)
    R = AnalyticsRollup
    out: dict[str, dict[str, int]] = {}
    for domain_id, metric, n in session.execute(
            select(R.sending_domain_id, R.metric, func.sum(R.n))
            .where(R.org_id == org_id, R.grain == "d", R.period >= since, R.metric.in_(METRICS),
                   R.sending_domain_id != "")
            .group_by(R.sending_domain_id, R.metric)).all():
        out.setdefault(domain_id, dict.fromkeys(METRICS, 0))[metric] += int(n or 0)
    return out


def _domain_names(session: Session) -> dict[str, str]:
    from carepost.delivery.service import list_sending_domains

    return {d.id: d.domain for d in list_sending_domains(session)}


def by_sending_domain(session: Session, org_id: str, days: int = 7, now: datetime | None = None) -> list[dict]:
    """One row per sending domain of the organization with mail in the window: counts, delivery
    and soft-bounce rates, and the complaint and hard-bounce rates judged (the deferral rate too,
    shown as the provider table shows it)."""
    names = _domain_names(session)
    rows = []
    for domain_id, counts in sending_domain_totals(session, org_id, days, now).items():
        row = provider_row(ALL, counts)
        row.pop("provider")
        row.pop("gmail_yahoo_rules")
        rows.append({"sending_domain_id": domain_id, "sending_domain": names.get(domain_id), **row})
    rows.sort(key=lambda r: (r["sending_domain"] is None, r["sending_domain"] or "", r["sending_domain_id"]))
    return rows


def judge(rate: Threshold, counts: dict[str, int]) -> dict:
    num, den = counts.get(rate.numerator, 0), counts.get(rate.denominator, 0)
    value = num / den if den else None
    if den < MIN_VOLUME:
        status = "too_little_mail"
    elif value >= rate.limit:
        status = "limit"
    elif value >= rate.warning:
        status = "warning"
    else:
        status = "ok"
    return {"value": round(value, 6) if value is not None else None, "numerator": num, "denominator": den,
            "status": status, "warning": rate.warning, "limit": rate.limit}


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None


def provider_row(provider: str, counts: dict[str, int]) -> dict:
    return {
        "provider": provider, "gmail_yahoo_rules": provider in GMAIL_YAHOO, **counts,
        "delivery_rate": _ratio(counts["delivered"], counts["sent"]),
        "soft_bounce_rate": _ratio(counts["bounced_soft"], counts["sent"]),
        "rates": {name: judge(t, counts) for name, t in THRESHOLDS.items()},
    }


def _order(provider: str) -> tuple:
    """gmail.com, yahoo.com, outlook.com, icloud.com; other named providers A-Z; then other."""
    groups = list(PROVIDER_GROUPS)
    if provider in groups:
        return (0, groups.index(provider), "")
    return (2, 0, "") if provider == OTHER_DOMAIN else (1, 0, provider)


def by_provider(session: Session, org_id: str, days: int = 7, now: datetime | None = None) -> dict:
    """The deliverability view: one row per receiving provider (and ``all``), with each rate
    judged against its levels."""
    since, until = _window(days, now)
    counts = totals(session, org_id, days, now)
    rows = [provider_row(p, c) for p, c in counts.items()]
    rows.sort(key=lambda r: _order(r["provider"]))
    return {
        "window_days": days, "since": since.isoformat(), "until": until.isoformat(), "min_volume": MIN_VOLUME,
        "thresholds": {name: {"label": t.label, "numerator": t.numerator, "denominator": t.denominator,
                              "warning": t.warning, "limit": t.limit, "source": t.source}
                       for name, t in THRESHOLDS.items()},
        "data": [r for r in rows if r["provider"] != ALL],
        "total": next((r for r in rows if r["provider"] == ALL), provider_row(ALL, dict.fromkeys(METRICS, 0))),
        "sending_domains": by_sending_domain(session, org_id, days, now),
        "sending_domain_rates": list(SENDING_DOMAIN_RATES),
    }


# --------------------------------------------------------------------------- alerts


def alert_out(a: DeliverabilityAlert) -> dict:
    t = THRESHOLDS.get(a.rate)
    return {
        "id": a.id, "provider": a.provider, "rate": a.rate, "label": t.label if t else a.rate, "level": a.level,
        "value": a.value, "level_value": a.level_value, "numerator": a.numerator, "denominator": a.denominator,
        "window_days": a.window_days, "raised_at": clock.aware(a.raised_at).isoformat(),
        "updated_at": clock.aware(a.updated_at).isoformat(),
        "cleared_at": clock.aware(a.cleared_at).isoformat() if a.cleared_at else None,
        "cleared_reason": a.cleared_reason, "active": a.cleared_at is None,
        "sending_domain_id": a.sending_domain_id or None, "sending_domain": a.sending_domain,
    }


def list_alerts(session: Session, org_id: str, *, active: bool | None = None, limit: int = 100) -> list[DeliverabilityAlert]:
    q = select(DeliverabilityAlert).where(DeliverabilityAlert.org_id == org_id)
    if active is True:
        q = q.where(DeliverabilityAlert.cleared_at.is_(None))
    elif active is False:
        q = q.where(DeliverabilityAlert.cleared_at.is_not(None))
    return list(session.scalars(q.order_by(DeliverabilityAlert.raised_at.desc(), DeliverabilityAlert.id)
                                .limit(max(1, min(limit, 500)))))


def _announce(session: Session, alert: DeliverabilityAlert, event: str, state: str) -> None:
    from carepost.audit.service import record

    data = {"alert_id": alert.id, "provider": alert.provider, "rate": alert.rate, "level": alert.level,
            "value": alert.value, "level_value": alert.level_value, "numerator": alert.numerator,
            "denominator": alert.denominator, "window_days": alert.window_days, "state": state}
    if alert.sending_domain_id:
        data.update(sending_domain_id=alert.sending_domain_id, sending_domain=alert.sending_domain)
    if event == "deliverability.threshold_cleared":
        data["cleared_reason"] = alert.cleared_reason
    record(session, org_id=alert.org_id, actor_type="system", actor_id=None, action=event,
           target_type="deliverability_alert", target_id=alert.id, details=data)
    tracking.emit(session, alert.org_id, event, data)


def evaluate(session: Session, org_id: str, now: datetime | None = None) -> dict[str, int]:
    """Raise, update and clear the organization's alerts from the last :data:`ALERT_WINDOW_DAYS`
    days: per receiving provider (every rate), and per sending domain (the complaint and
    hard-bounce rates). The caller commits (audit events, alerts and webhook deliveries together)."""
    now = clock.aware(now or clock.now())
    counts = totals(session, org_id, ALERT_WINDOW_DAYS, now)
    open_alerts = {(a.provider, a.sending_domain_id or "", a.rate): a
                   for a in list_alerts(session, org_id, active=True, limit=500)}
    stats = {"raised": 0, "escalated": 0, "cleared": 0}
    for provider, c in counts.items():
        if provider == ALL:
            continue
        for name in THRESHOLDS:
            _judge_one(session, org_id, now, open_alerts, stats, provider, "", None, name, c)
    names = _domain_names(session)
    for domain_id, c in sending_domain_totals(session, org_id, ALERT_WINDOW_DAYS, now).items():
        for name in SENDING_DOMAIN_RATES:
            _judge_one(session, org_id, now, open_alerts, stats, ALL, domain_id, names.get(domain_id), name, c)
    for alert in open_alerts.values():  # no mail to that provider (from that domain) in the window any more
        _clear(session, alert, now, "too_little_mail", None)
        stats["cleared"] += 1
    if any(stats.values()):
        log.info("deliverability_evaluated", org_id=org_id, **{f"{k}_count": v for k, v in stats.items()})
    return stats


def _judge_one(session: Session, org_id: str, now: datetime, open_alerts: dict, stats: dict, provider: str,
               domain_id: str, domain: str | None, name: str, counts: dict[str, int]) -> None:
    t = THRESHOLDS[name]
    j = judge(t, counts)
    alert = open_alerts.pop((provider, domain_id, name), None)
    if j["status"] in LEVELS:
        level_value = t.limit if j["status"] == "limit" else t.warning
        if alert is None:
            alert = DeliverabilityAlert(id=new_id(), org_id=org_id, provider=provider, rate=name,
                                        level=j["status"], value=j["value"], level_value=level_value,
                                        numerator=j["numerator"], denominator=j["denominator"],
                                        window_days=ALERT_WINDOW_DAYS, raised_at=now, updated_at=now,
                                        sending_domain_id=domain_id, sending_domain=domain)
            session.add(alert)
            session.flush([alert])
            _announce(session, alert, "deliverability.threshold_crossed", "raised")
            stats["raised"] += 1
            return
        went_up = alert.level == "warning" and j["status"] == "limit"
        alert.level, alert.level_value, alert.value = j["status"], level_value, j["value"]
        alert.numerator, alert.denominator, alert.updated_at = j["numerator"], j["denominator"], now
        if went_up:
            _announce(session, alert, "deliverability.threshold_crossed", "escalated")
            stats["escalated"] += 1
    elif alert is not None:
        _clear(session, alert, now, "back_under" if j["status"] == "ok" else "too_little_mail", j)
        stats["cleared"] += 1


def _clear(session: Session, alert: DeliverabilityAlert, now: datetime, reason: str, j: dict | None) -> None:
    if j is not None:
        alert.value, alert.numerator, alert.denominator = j["value"] or 0.0, j["numerator"], j["denominator"]
    alert.cleared_at, alert.cleared_reason, alert.updated_at = now, reason, now
    _announce(session, alert, "deliverability.threshold_cleared", "cleared")


def organizations_to_evaluate(session: Session, now: datetime | None = None) -> list[str]:
    """Organizations with mail in the alert window or an open alert (a system session)."""
    since, _ = _window(ALERT_WINDOW_DAYS, now)
    with_mail = session.scalars(select(AnalyticsRollup.org_id).where(
        AnalyticsRollup.grain == "d", AnalyticsRollup.period >= since, AnalyticsRollup.metric == "sent").distinct())
    with_alerts = session.scalars(select(DeliverabilityAlert.org_id).where(
        DeliverabilityAlert.cleared_at.is_(None)).distinct())
    return sorted(set(with_mail) | set(with_alerts))


def evaluate_all(now: datetime | None = None) -> dict[str, int]:
    """Every organization, each in its own session and transaction (one failing does not stop
    the others)."""
    from carepost.core.database import org_session, system_session

    with system_session() as session:
        org_ids = organizations_to_evaluate(session, now)
    totals_ = {"organizations": 0, "raised": 0, "escalated": 0, "cleared": 0}
    for org_id in org_ids:
        try:
            with org_session(org_id) as session:
                stats = evaluate(session, org_id, now)
                session.commit()
        except Exception as exc:  # noqa: BLE001 - one organization's failure is logged, the rest go on
            log.warning("deliverability_evaluation_failed", org_id=org_id, error_type=type(exc).__name__)
            continue
        totals_["organizations"] += 1
        for k, v in stats.items():
            totals_[k] += v
    return totals_


# --------------------------------------------------------------------------- TLS reports in the window


def tls_summary(session: Session, org_id: str, days: int = 7, now: datetime | None = None) -> dict:
    """SMTP TLS reports (RFC 8460) whose period ends in the window: sessions that succeeded and
    failed, and the failures by result type (``certificate-expired``, ``starttls-not-supported``...)."""
    from carepost.tracking.models import TlsReport

    since, _ = _window(days, now)
    reports = session.scalars(select(TlsReport).where(TlsReport.org_id == org_id, TlsReport.end_at >= since)).all()
    failure_types: dict[str, int] = {}
    for r in reports:
        for policy in r.policies or []:
            for f in policy.get("failures") or []:
                kind = str(f.get("result_type") or "unknown")[:64]
                failure_types[kind] = failure_types.get(kind, 0) + int(f.get("failed_session_count") or 0)
    ok = sum(r.successful_sessions for r in reports)
    failed = sum(r.failed_sessions for r in reports)
    return {"reports": len(reports), "reporters": sorted({r.reporter for r in reports}), "successful_sessions": ok,
            "failed_sessions": failed, "failure_rate": _ratio(failed, ok + failed),
            "failure_types": sorted(failure_types.items(), key=lambda kv: (-kv[1], kv[0]))}
