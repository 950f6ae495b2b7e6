"""Business associates and the shared-responsibility line (issue 16 item 9; 164.502(e), 164.504(e)).

A register of every party PHI may flow to — the organization's SMTP relay, webhook endpoints set
to receive PHI, a key service, backup storage — each with its BAA date, scope and renewal.

Enforcement: the delivery pipeline and the webhook sender call :func:`relay_refusal` and
:func:`webhook_refusal` through their ports (``delivery.relay_baa``, ``tracking.webhook_baa``,
filled by the composition root). A BAA is *on record* for a relay or endpoint when a row of the
matching kind names it in ``ref`` (the relay host, case-insensitive; the endpoint id), is signed
(``baa_signed_on`` not after today), not expired (``baa_expires_on`` absent or not before today)
and not terminated. One indexed query per organization per delivery batch (the pipeline caches
the answer for the batch) and per PHI webhook attempt.

:func:`responsibility_matrix` is the line between what CarePost does, what the organization
does and what each associate does, for the evidence pack.
"""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from carepost.audit.service import record
from carepost.compliance.models import BusinessAssociate
from carepost.core import clock
from carepost.core.errors import NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id

KINDS = {
    "smtp_relay": "SMTP relay",
    "webhook": "Webhook endpoint receiving PHI",
    "key_service": "Key service",
    "backup_storage": "Backup storage",
    "other": "Other",
}
RENEWAL_WARNING_DAYS = 60


def _text(value, field: str, *, max_len: int, required: bool = False) -> str:
    value = (value or "").strip() if isinstance(value, str) or value is None else None
    if value is None:
        raise ValidationFailed("Must be text.", field=field)
    if required and not value:
        raise ValidationFailed("Required.", field=field)
    if len(value) > max_len:
        raise ValidationFailed(f"At most {max_len} characters.", field=field)
    return value


def _date(value, field: str) -> date | None:
    if value in (None, ""):
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValidationFailed("Use a date (YYYY-MM-DD).", field=field) from None


def _validate(data: dict) -> dict:
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValidationFailed("Choose one of " + ", ".join(KINDS) + ".", field="kind")
    out = {
        "name": _text(data.get("name"), "name", max_len=200, required=True),
        "kind": kind,
        "ref": _text(data.get("ref"), "ref", max_len=300) or None,
        "scope": _text(data.get("scope"), "scope", max_len=4000, required=True),
        "contact": _text(data.get("contact"), "contact", max_len=320),
        "baa_signed_on": _date(data.get("baa_signed_on"), "baa_signed_on"),
        "baa_expires_on": _date(data.get("baa_expires_on"), "baa_expires_on"),
        "terminated_on": _date(data.get("terminated_on"), "terminated_on"),
    }
    if kind in ("smtp_relay", "webhook") and not out["ref"]:
        raise ValidationFailed("Name the relay host or the webhook endpoint id this agreement covers.", field="ref")
    if kind == "smtp_relay":
        out["ref"] = out["ref"].lower()
    today = clock.now().date()
    if out["baa_signed_on"] and out["baa_signed_on"] > today:
        raise ValidationFailed("A BAA cannot be signed in the future.", field="baa_signed_on")
    if out["baa_expires_on"] and out["baa_signed_on"] and out["baa_expires_on"] <= out["baa_signed_on"]:
        raise ValidationFailed("The renewal date must come after the signing date.", field="baa_expires_on")
    return out


def _audit(session: Session, org_id: str, actor: dict, action: str, row: BusinessAssociate, details: dict) -> None:
    record(session, org_id=org_id, action=action, target_type="business_associate", target_id=row.id,
           details=details, **actor)


def _public(row: BusinessAssociate) -> dict:
    return {"name": row.name, "kind": row.kind, "ref": row.ref,
            "baa_signed_on": row.baa_signed_on.isoformat() if row.baa_signed_on else None,
            "baa_expires_on": row.baa_expires_on.isoformat() if row.baa_expires_on else None,
            "terminated_on": row.terminated_on.isoformat() if row.terminated_on else None}


def create(session: Session, org_id: str, data: dict, actor: dict) -> BusinessAssociate:
    values = _validate(data)
    row = BusinessAssociate(id=new_id(), org_id=org_id, created_by=actor.get("actor_id"), **values)
    session.add(row)
    session.flush([row])
    _audit(session, org_id, actor, "compliance.business_associate.created", row, _public(row))
    return row


def update(session: Session, org_id: str, row: BusinessAssociate, data: dict, actor: dict) -> BusinessAssociate:
    merged = {**as_dict(row), **data}
    values = _validate(merged)
    before = _public(row)
    for k, v in values.items():
        setattr(row, k, v)
    row.updated_at = clock.now()
    _audit(session, org_id, actor, "compliance.business_associate.updated", row, {"before": before, "after": _public(row)})
    return row


def get(session: Session, org_id: str, associate_id: str) -> BusinessAssociate:
    row = session.scalar(select(BusinessAssociate).where(BusinessAssociate.org_id == org_id,
                                                         BusinessAssociate.id == associate_id)) if is_id(associate_id) else None
    if row is None:
        raise NotFound("No such business associate.", field="associate_id")
    return row


def list_all(session: Session, org_id: str) -> list[BusinessAssociate]:
    return list(session.scalars(select(BusinessAssociate).where(BusinessAssociate.org_id == org_id)
                                .order_by(BusinessAssociate.kind, BusinessAssociate.name, BusinessAssociate.id)))


def state(row: BusinessAssociate, today: date | None = None) -> str:
    """``active``, ``renewal_due`` (within 60 days), ``expired``, ``terminated`` or ``no_baa``."""
    today = today or clock.now().date()
    if row.terminated_on and row.terminated_on <= today:
        return "terminated"
    if row.baa_signed_on is None or row.baa_signed_on > today:
        return "no_baa"
    if row.baa_expires_on and row.baa_expires_on < today:
        return "expired"
    if row.baa_expires_on and row.baa_expires_on <= today + timedelta(days=RENEWAL_WARNING_DAYS):
        return "renewal_due"
    return "active"


def as_dict(row: BusinessAssociate) -> dict:
    return {"id": row.id, "name": row.name, "kind": row.kind, "kind_label": KINDS.get(row.kind, row.kind),
            "ref": row.ref, "scope": row.scope, "contact": row.contact,
            "baa_signed_on": row.baa_signed_on.isoformat() if row.baa_signed_on else None,
            "baa_expires_on": row.baa_expires_on.isoformat() if row.baa_expires_on else None,
            "terminated_on": row.terminated_on.isoformat() if row.terminated_on else None,
            "state": state(row), "created_at": clock.aware(row.created_at).isoformat() if row.created_at else None}


# --------------------------------------------------------------------------- enforcement


def _on_record(session: Session, org_id: str, kind: str, ref: str) -> bool:
    today = clock.now().date()
    ref_col = func.lower(BusinessAssociate.ref) if kind == "smtp_relay" else BusinessAssociate.ref
    return session.scalar(
        select(BusinessAssociate.id).where(
            BusinessAssociate.org_id == org_id, BusinessAssociate.kind == kind,
            ref_col == (ref.lower() if kind == "smtp_relay" else ref),
            BusinessAssociate.baa_signed_on.is_not(None), BusinessAssociate.baa_signed_on <= today,
            or_(BusinessAssociate.baa_expires_on.is_(None), BusinessAssociate.baa_expires_on >= today),
            or_(BusinessAssociate.terminated_on.is_(None), BusinessAssociate.terminated_on > today),
        ).limit(1)) is not None


def relay_refusal(session: Session, org_id: str, host: str) -> str | None:
    """Why PHI may not go through the organization's relay ``host`` (None: a BAA covers it).
    The delivery pipeline asks once per organization per batch (port ``delivery.relay_baa``)."""
    host = (host or "").strip()
    if _on_record(session, org_id, "smtp_relay", host):
        return None
    return (f"no_baa: no business associate agreement on record for the organization relay {host}; "
            "record it under Compliance > Business associates (kind smtp_relay, ref the relay host)")


def webhook_refusal(session: Session, org_id: str, endpoint_id: str) -> str | None:
    """Why PHI may not be posted to webhook endpoint ``endpoint_id`` (port ``tracking.webhook_baa``)."""
    if _on_record(session, org_id, "webhook", endpoint_id):
        return None
    return (f"no_baa: no business associate agreement on record for webhook endpoint {endpoint_id}; "
            "record it under Compliance > Business associates (kind webhook, ref the endpoint id)")


def phi_flows(session: Session, org_id: str) -> list[dict]:
    """Where PHI can flow today (the relay, PHI webhooks) and whether a BAA covers each: the
    register's gaps, shown on the page and in the reports."""
    from carepost.delivery.settings import delivery_settings
    from carepost.tracking.service import list_endpoints

    flows = []
    relay = delivery_settings(session, org_id).get("relay")
    if relay:
        from carepost.delivery.settings import parse_org_relay

        host = parse_org_relay(relay.get("host") or "")[1].host
        flows.append({"kind": "smtp_relay", "ref": host, "label": f"Organization relay {host}",
                      "covered": relay_refusal(session, org_id, host) is None})
    for ep in list_endpoints(session, org_id):
        if ep.include_phi:
            flows.append({"kind": "webhook", "ref": ep.id, "label": f"Webhook {ep.description or ep.id}",
                          "covered": webhook_refusal(session, org_id, ep.id) is None, "enabled": ep.enabled})
    return flows


# --------------------------------------------------------------------------- the responsibility line

_CAREPOST = [
    ("Encryption of PHI at rest (envelope encryption, per-organization data keys)", "164.312(a)(2)(iv)"),
    ("Transmission security: verified TLS, OpenPGP, S/MIME or the secure portal per recipient", "164.312(e)(1)"),
    ("Audit controls: the hash-chained audit log and its checkpoints", "164.312(b)"),
    ("Access control: roles, unmasked-PHI permission, MFA, break-glass, automatic logoff", "164.312(a)(1), (d)"),
    ("Refusing PHI to a relay or PHI webhook without a BAA on record", "164.502(e)"),
    ("Training gate: no unmasked PHI before the current policies are acknowledged", "164.308(a)(5)"),
    ("Breach register: affected patients, four-factor assessment, 60-day clock, notice drafts", "164.402-414"),
    ("Accounting of disclosures and de-identified exports", "164.528, 164.514(b)"),
]
_ORGANIZATION = [
    ("Security risk analysis and risk management", "164.308(a)(1)"),
    ("Writing the policies and training content; sanctions policy", "164.308(a)(1)(ii)(C), (a)(5)"),
    ("Signing, renewing and keeping BAAs with every business associate", "164.308(b), 164.504(e)"),
    ("Granting roles (minimum necessary) and removing access when people leave", "164.308(a)(3), (a)(4)"),
    ("Host, disk and backup encryption; physical safeguards of the servers", "164.310"),
    ("Protecting the master key (CAREPOST key service / KEK) and its backups", "164.312(a)(2)(iv)"),
    ("Sending the breach notices, reporting to HHS and media", "164.404-408"),
    ("Contingency plan: backups, restore tests, emergency mode", "164.308(a)(7)"),
]
_BY_KIND = {
    "smtp_relay": "Carries messages onward; verified TLS onward if declared enforcing; safeguards queued mail; reports incidents",
    "webhook": "Receives PHI in webhook events; safeguards and limits its use to the BAA's scope; reports incidents",
    "key_service": "Holds the key-encryption key; availability, access control and audit of key use",
    "backup_storage": "Stores encrypted backups; availability and deletion on request; reports incidents",
    "other": "As stated in the BAA's scope",
}


def responsibility_matrix(session: Session, org_id: str) -> dict:
    """Who is responsible for what (the evidence pack lists it): CarePost's controls with the rule
    each serves, what stays with the organization, and each business associate with its BAA state
    and duties. Also the PHI flows not covered by a BAA (``gaps``)."""
    associates = [{**as_dict(r), "responsibility": _BY_KIND.get(r.kind, "")} for r in list_all(session, org_id)]
    return {
        "carepost": [{"control": c, "rule": rule} for c, rule in _CAREPOST],
        "organization": [{"duty": d, "rule": rule} for d, rule in _ORGANIZATION],
        "business_associates": associates,
        "gaps": [f for f in phi_flows(session, org_id) if not f["covered"]],
    }
