"""Compliance reports (issue 16 item 6): one report over a period, as JSON, CSV or PDF (fpdf2).

Sections, each computed from CarePost's own records (ids and counts, never PHI values):

* **PHI access by user and by patient**: audit events on contacts (``target_type == "contact"``,
  outcome success) per actor (accesses, distinct patients) and per patient (accesses, distinct
  actors; the top :data:`TOP_PATIENTS`).
* **Unusual volume** — the rule: an actor (user or API key) is flagged on a day of the period
  when the distinct patients it reached that day exceed ``max(UNUSUAL_FLOOR, UNUSUAL_FACTOR x
  its median daily count over the BASELINE_DAYS before the period)``; days without reads count as
  zero in the median, so a new actor's baseline is 0 and the floor (50) applies.
* **Protection of PHI messages**: recipients of PHI messages delivered or handed on in the
  period per secure method, and those *without verified protection* — method ``none``/unset,
  or ``tls`` without verified certificate evidence (should be zero).
* **Consent**: contacts, contacts with an active authorization (per purpose), exclusions at
  campaign planning by reason, recipients excluded at delivery by reason.
* **Accounts**: MFA enrollment of the organization's people; dormant accounts (no sign-in for
  :data:`DORMANT_DAYS`) and dormant API keys (unused for as long); keys near expiry (API keys,
  recipients' PGP/S/MIME certificates, BAAs — within :data:`EXPIRY_DAYS`).
* **Audit chain**: the organization's chain verified now (events checked, ok or the first
  problem).
* **Training**: people not current on the published policies (item 10).
"""

from __future__ import annotations

import csv
import io
import statistics
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from carepost.audit.models import AuditEvent
from carepost.core import clock
from carepost.core.errors import ValidationFailed

TOP_PATIENTS = 50
UNUSUAL_FLOOR = 50
UNUSUAL_FACTOR = 3
BASELINE_DAYS = 30
DORMANT_DAYS = 90
EXPIRY_DAYS = 30
MAX_PERIOD_DAYS = 366
RULE = (f"flagged when the distinct patients an actor reached in one day exceed max({UNUSUAL_FLOOR}, "
        f"{UNUSUAL_FACTOR} x its median daily count over the {BASELINE_DAYS} days before the period)")


def period(start, end) -> tuple[date, date]:
    today = clock.now().date()

    def parse(value, field):
        if value in (None, ""):
            return None
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            raise ValidationFailed("Use a date (YYYY-MM-DD).", field=field) from None

    end_d = parse(end, "end") or today
    start_d = parse(start, "start") or end_d - timedelta(days=29)
    if end_d > today:
        raise ValidationFailed("The period cannot end in the future.", field="end")
    if start_d > end_d:
        raise ValidationFailed("The period must start before it ends.", field="start")
    if (end_d - start_d).days >= MAX_PERIOD_DAYS:
        raise ValidationFailed(f"At most {MAX_PERIOD_DAYS} days.", field="start")
    return start_d, end_d


def _bounds(start: date, end: date) -> tuple[datetime, datetime]:
    return (datetime.combine(start, time.min).replace(tzinfo=UTC),
            datetime.combine(end + timedelta(days=1), time.min).replace(tzinfo=UTC))


def _contact_events(org_id: str, lo: datetime, hi: datetime):
    return and_(AuditEvent.org_id == org_id, AuditEvent.target_type == "contact", AuditEvent.outcome == "success",
                AuditEvent.occurred_at >= lo, AuditEvent.occurred_at < hi)


def phi_access(session: Session, org_id: str, lo: datetime, hi: datetime) -> dict:
    where = _contact_events(org_id, lo, hi)
    by_actor = [{"actor_type": t, "actor_id": a, "accesses": n, "patients": p} for t, a, n, p in session.execute(
        select(AuditEvent.actor_type, AuditEvent.actor_id, func.count(), func.count(func.distinct(AuditEvent.target_id)))
        .where(where).group_by(AuditEvent.actor_type, AuditEvent.actor_id)
        .order_by(func.count().desc(), AuditEvent.actor_id))]
    by_patient = [{"contact_id": c, "accesses": n, "actors": a} for c, n, a in session.execute(
        select(AuditEvent.target_id, func.count(), func.count(func.distinct(AuditEvent.actor_id)))
        .where(where).group_by(AuditEvent.target_id).order_by(func.count().desc(), AuditEvent.target_id)
        .limit(TOP_PATIENTS))]
    return {"by_actor": by_actor, "by_patient": by_patient,
            "total": sum(r["accesses"] for r in by_actor)}


def unusual_volume(session: Session, org_id: str, start: date, end: date) -> dict:
    base_lo, _ = _bounds(start - timedelta(days=BASELINE_DAYS), start)
    _, hi = _bounds(start, end)
    day = func.date(AuditEvent.occurred_at)
    rows = session.execute(
        select(AuditEvent.actor_type, AuditEvent.actor_id, day, func.count(func.distinct(AuditEvent.target_id)))
        .where(_contact_events(org_id, base_lo, hi), AuditEvent.actor_id.is_not(None))
        .group_by(AuditEvent.actor_type, AuditEvent.actor_id, day))
    per_actor: dict[tuple, dict[date, int]] = {}
    for actor_type, actor_id, d, n in rows:
        d = d if isinstance(d, date) else date.fromisoformat(str(d)[:10])
        per_actor.setdefault((actor_type, actor_id), {})[d] = n
    flagged = []
    for (actor_type, actor_id), days in per_actor.items():
        baseline = [days.get(start - timedelta(days=i), 0) for i in range(1, BASELINE_DAYS + 1)]
        median = statistics.median(baseline)
        threshold = max(UNUSUAL_FLOOR, UNUSUAL_FACTOR * median)
        for d, n in sorted(days.items()):
            if start <= d <= end and n > threshold:
                flagged.append({"actor_type": actor_type, "actor_id": actor_id, "day": d.isoformat(), "patients": n,
                                "baseline_median": median, "threshold": threshold})
    return {"rule": RULE, "flagged": flagged}


def protection(session: Session, org_id: str, lo: datetime, hi: datetime) -> dict:
    from carepost.delivery.models import Message, MessageRecipient

    handed = MessageRecipient.status.in_(("delivered", "sent"))
    joined = (select(MessageRecipient.method, func.count())
              .join(Message, Message.id == MessageRecipient.message_id)
              .where(MessageRecipient.org_id == org_id, handed, Message.contains_phi.is_(True),
                     MessageRecipient.updated_at >= lo, MessageRecipient.updated_at < hi)
              .group_by(MessageRecipient.method))
    by_method = {m or "none": n for m, n in session.execute(joined)}
    unverified_tls = 0
    for (evidence,) in session.execute(
            select(MessageRecipient.evidence).join(Message, Message.id == MessageRecipient.message_id)
            .where(MessageRecipient.org_id == org_id, handed, Message.contains_phi.is_(True),
                   MessageRecipient.method == "tls", MessageRecipient.updated_at >= lo, MessageRecipient.updated_at < hi)
            .execution_options(yield_per=2000)):
        if not (evidence or {}).get("cert_verified") and not (evidence or {}).get("relay"):
            unverified_tls += 1
    all_methods = {m or "none": n for m, n in session.execute(
        select(MessageRecipient.method, func.count()).where(MessageRecipient.org_id == org_id, handed,
                                                            MessageRecipient.updated_at >= lo,
                                                            MessageRecipient.updated_at < hi)
        .group_by(MessageRecipient.method))}
    return {"phi_by_method": dict(sorted(by_method.items())), "all_by_method": dict(sorted(all_methods.items())),
            "without_verified_protection": by_method.get("none", 0) + unverified_tls,
            "rule": "a PHI message handed on with no secure method, or over TLS without a verified certificate "
                    "(a relay declared enforcing counts as verified); should be zero"}


def consent(session: Session, org_id: str, lo: datetime, hi: datetime) -> dict:
    from carepost.campaigns.models import CampaignExclusion
    from carepost.consent.models import Authorization
    from carepost.delivery.models import MessageRecipient
    from carepost.patients.models import Contact

    now = clock.now()
    contacts = session.scalar(select(func.count()).select_from(Contact).where(Contact.org_id == org_id)) or 0
    active = and_(Authorization.org_id == org_id, Authorization.status == "active", Authorization.contact_id.is_not(None),
                  or_(Authorization.expires_at.is_(None), Authorization.expires_at > now))
    covered = session.scalar(select(func.count(func.distinct(Authorization.contact_id))).where(active)) or 0
    per_purpose = {p: n for p, n in session.execute(
        select(Authorization.purpose, func.count(func.distinct(Authorization.contact_id))).where(active)
        .group_by(Authorization.purpose))}
    planning = {r: n for r, n in session.execute(
        select(CampaignExclusion.reason, func.count()).where(CampaignExclusion.org_id == org_id,
                                                             CampaignExclusion.created_at >= lo,
                                                             CampaignExclusion.created_at < hi)
        .group_by(CampaignExclusion.reason))}
    delivery = {(r or "unknown").split(":")[0]: n for r, n in session.execute(
        select(MessageRecipient.reason, func.count()).where(MessageRecipient.org_id == org_id,
                                                            MessageRecipient.status == "excluded",
                                                            MessageRecipient.updated_at >= lo,
                                                            MessageRecipient.updated_at < hi)
        .group_by(MessageRecipient.reason))}
    return {"contacts": contacts, "with_active_authorization": covered,
            "coverage": round(covered / contacts, 4) if contacts else None,
            "by_purpose": dict(sorted(per_purpose.items())),
            "excluded_at_planning": dict(sorted(planning.items())),
            "excluded_at_delivery": dict(sorted(delivery.items()))}


def accounts(session: Session, org_id: str) -> dict:
    from carepost.accounts.models import ApiCredential, WebAuthnCredential
    from carepost.accounts.service import list_members
    from carepost.compliance import associates
    from carepost.delivery.models import RecipientKey

    now = clock.now()
    dormant_before = now - timedelta(days=DORMANT_DAYS)
    soon = now + timedelta(days=EXPIRY_DAYS)
    members = list_members(session, org_id)
    webauthn = set(session.scalars(select(WebAuthnCredential.user_id).where(
        WebAuthnCredential.user_id.in_([u.id for u, _m in members])))) if members else set()
    people = []
    for user, m in members:
        mfa = bool(user.totp_confirmed_at) or user.id in webauthn
        last = clock.aware(user.last_login_at) if user.last_login_at else None
        dormant = user.is_active and (last is None or last < dormant_before) and clock.aware(user.created_at) < dormant_before
        people.append({"user_id": user.id, "email": user.email, "role": m.role, "mfa": mfa,
                       "last_login_at": last.isoformat() if last else None, "dormant": dormant})
    keys = list(session.scalars(select(ApiCredential).where(ApiCredential.org_id == org_id,
                                                            ApiCredential.revoked_at.is_(None))))
    dormant_keys, expiring = [], []
    for k in keys:
        used = clock.aware(k.last_used_at) if k.last_used_at else None
        if (used is None or used < dormant_before) and clock.aware(k.created_at) < dormant_before:
            dormant_keys.append({"credential_id": k.id, "name": k.name, "last_used_at": used.isoformat() if used else None})
        if k.expires_at and now <= clock.aware(k.expires_at) <= soon:
            expiring.append({"kind": "api_key", "id": k.id, "name": k.name,
                             "expires_at": clock.aware(k.expires_at).isoformat()})
    for rk in session.scalars(select(RecipientKey).where(RecipientKey.org_id == org_id,
                                                         RecipientKey.expires_at.is_not(None),
                                                         RecipientKey.expires_at <= soon)):
        expiring.append({"kind": f"recipient_{rk.kind}", "id": rk.id, "name": rk.fingerprint[-16:],
                         "expires_at": clock.aware(rk.expires_at).isoformat()})
    for a in associates.list_all(session, org_id):
        if a.baa_expires_on and associates.state(a) in ("renewal_due", "expired"):
            expiring.append({"kind": "baa", "id": a.id, "name": a.name, "expires_at": a.baa_expires_on.isoformat()})
    enrolled = sum(1 for p in people if p["mfa"])
    return {"people": len(people), "mfa_enrolled": enrolled, "mfa_missing": [p for p in people if not p["mfa"]],
            "dormant_accounts": [p for p in people if p["dormant"]], "dormant_keys": dormant_keys,
            "near_expiry": sorted(expiring, key=lambda e: e["expires_at"]),
            "rules": {"dormant": f"no sign-in (person) or use (key) for {DORMANT_DAYS} days",
                      "near_expiry": f"expiring within {EXPIRY_DAYS} days, or expired (recipient keys, BAAs)"}}


def audit_chain(session: Session, org_id: str) -> dict:
    """Verify the chain in a read-only snapshot of its own (``session`` is committed first)."""
    from carepost.audit.verify import verify
    from carepost.core.database import read_only_session

    session.commit()
    with read_only_session() as ro:
        result = verify(ro, org_id=org_id).chains[0]
    out = {"ok": result.ok, "events_checked": result.events, "verified_at": clock.now().isoformat()}
    if result.problem:
        out.update(problem=result.problem.kind, first_bad_seq=result.problem.seq)
    return out


def build(session: Session, org_id: str, start=None, end=None) -> dict:
    from carepost.accounts.service import get_organization
    from carepost.compliance import training

    start_d, end_d = period(start, end)
    lo, hi = _bounds(start_d, end_d)
    report = {
        "organization": get_organization(session, org_id).name, "period_start": start_d.isoformat(),
        "period_end": end_d.isoformat(), "generated_at": clock.now().isoformat(),
        "phi_access": phi_access(session, org_id, lo, hi),
        "unusual_volume": unusual_volume(session, org_id, start_d, end_d),
        "protection": protection(session, org_id, lo, hi),
        "consent": consent(session, org_id, lo, hi),
        "accounts": accounts(session, org_id),
    }
    t = training.report(session, org_id)
    report["training"] = {"gated": t["gated"], "documents": len(t["documents"]), "not_current": t["not_current"],
                          "people": len(t["people"])}
    report["audit_chain"] = audit_chain(session, org_id)
    return report


# --------------------------------------------------------------------------- CSV and PDF


def rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(section, item, value, detail) rows: the CSV, and the PDF's tables."""
    out: list[tuple[str, str, str, str]] = [("period", "start", report["period_start"], ""),
                                            ("period", "end", report["period_end"], "")]
    pa = report["phi_access"]
    out.append(("phi_access", "total accesses", str(pa["total"]), ""))
    for r in pa["by_actor"]:
        out.append(("phi_access_by_actor", f"{r['actor_type']} {r['actor_id']}", str(r["accesses"]),
                    f"{r['patients']} patients"))
    for r in pa["by_patient"]:
        out.append(("phi_access_by_patient", r["contact_id"], str(r["accesses"]), f"{r['actors']} actors"))
    uv = report["unusual_volume"]
    out.append(("unusual_volume", "rule", str(len(uv["flagged"])), uv["rule"]))
    for f in uv["flagged"]:
        out.append(("unusual_volume", f"{f['actor_type']} {f['actor_id']} on {f['day']}", str(f["patients"]),
                    f"threshold {f['threshold']}, baseline median {f['baseline_median']}"))
    pr = report["protection"]
    out.append(("protection", "PHI without verified protection", str(pr["without_verified_protection"]), pr["rule"]))
    for m, n in pr["phi_by_method"].items():
        out.append(("protection_phi_by_method", m, str(n), ""))
    for m, n in pr["all_by_method"].items():
        out.append(("delivery_by_method", m, str(n), ""))
    c = report["consent"]
    out.append(("consent", "contacts", str(c["contacts"]), ""))
    out.append(("consent", "with an active authorization", str(c["with_active_authorization"]),
                f"coverage {c['coverage']}" if c["coverage"] is not None else ""))
    for p, n in c["by_purpose"].items():
        out.append(("consent_by_purpose", p, str(n), ""))
    for r, n in c["excluded_at_planning"].items():
        out.append(("exclusions_at_planning", r, str(n), ""))
    for r, n in c["excluded_at_delivery"].items():
        out.append(("exclusions_at_delivery", r, str(n), ""))
    a = report["accounts"]
    out.append(("mfa", "enrolled", f"{a['mfa_enrolled']}/{a['people']}", ""))
    for p in a["mfa_missing"]:
        out.append(("mfa_missing", p["email"], p["role"], ""))
    for p in a["dormant_accounts"]:
        out.append(("dormant_account", p["email"], p["role"], f"last sign-in {p['last_login_at'] or 'never'}"))
    for k in a["dormant_keys"]:
        out.append(("dormant_key", k["name"], k["credential_id"], f"last used {k['last_used_at'] or 'never'}"))
    for e in a["near_expiry"]:
        out.append(("near_expiry", f"{e['kind']} {e['name']}", e["expires_at"], e["id"]))
    t = report["training"]
    out.append(("training", "people not current", str(t["not_current"]), f"{t['documents']} published documents"))
    ac = report["audit_chain"]
    out.append(("audit_chain", "verified", "ok" if ac["ok"] else "FAILED",
                f"{ac['events_checked']} events" + (f"; {ac.get('problem')} at seq {ac.get('first_bad_seq')}"
                                                     if not ac["ok"] else "")))
    return out


def _csv_cell(value: str) -> str:
    # Spreadsheet formula injection (CWE-1236): a cell starting with = + - @ is read as text.
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def to_csv(report: dict) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "item", "value", "detail"])
    for r in rows(report):
        w.writerow([_csv_cell(str(x)) for x in r])
    return buf.getvalue().encode()


def _latin(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def to_pdf(report: dict) -> bytes:
    """The report as a PDF (fpdf2, core fonts: text outside Latin-1 shows as "?")."""
    from fpdf import FPDF

    pdf = FPDF(format="Letter")
    pdf.set_creator("CarePost")
    pdf.set_title("Compliance report")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 15)
    pdf.cell(0, 9, _latin(f"Compliance report: {report['organization']}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    pdf.cell(0, 6, _latin(f"Period {report['period_start']} to {report['period_end']}; generated "
                          f"{report['generated_at'][:19]} UTC"), new_x="LMARGIN", new_y="NEXT")
    section = None
    for sec, item, value, detail in rows(report):
        if sec != section:
            section = sec
            pdf.ln(2)
            pdf.set_font("Helvetica", "B", 11)
            pdf.cell(0, 7, _latin(sec.replace("_", " ").capitalize()), new_x="LMARGIN", new_y="NEXT")
            pdf.set_font("Helvetica", "", 9)
        pdf.multi_cell(0, 5, _latin(f"{item}: {value}" + (f"  ({detail})" if detail else "")),
                       new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
