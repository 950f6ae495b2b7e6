"""The breach incident register (issue 16 item 5; 45 CFR 164.400-414).

An incident is opened for what happened — a message to the wrong address, unauthorized access
found in the audit trail, a lost device — naming the messages involved and/or whose reads over
which window. :func:`compute` derives who is affected and which kinds of PHI:

* from the **message log**: each message's recipients that are patients (``contact_id``) — the
  person the message was about — plus attachments and whether the message carried PHI;
* from the **audit trail**: the contacts the named user or key read, exported or changed in the
  window (``target_type == "contact"``), and the kind of access;
* plus patients added by hand.

The **four-factor risk assessment** (164.402(2)) is a guided form, one factor per step: the nature
and extent of the PHI, the unauthorized person, whether it was actually acquired or viewed, and the
mitigation. A breach is presumed; the conclusion is ``low_probability`` (no notification needed,
the assessment is the documentation) only when every factor is rated low, else ``notifiable``.

**The clock**: individuals within 60 days of discovery (164.404(b)); HHS at the same time when 500
or more are affected, else in the yearly log within 60 days after the end of the calendar year
(164.408(c)); the media when **more than** 500 residents of one state or jurisdiction are
affected (164.406) — states come from the contacts' ``state`` (``unknown`` when empty).

**Notices** (164.404(c)) are drafted per patient in the patient's language (English and Spanish;
others fall back to English and say so), with the required elements. Drafting reads names and
addresses: it needs ``phi:read_unmasked`` and is audited; drafts are not stored.

Every step (opened, computed, each factor, notices drafted, notifications recorded, closed) is an
audit event holding ids and counts, never PHI. Free text (description, factor notes) is encrypted.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.audit.models import AuditEvent
from carepost.audit.service import record
from carepost.compliance.models import BreachIncident
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id

TABLE = BreachIncident.__tablename__
KINDS = {
    "misdirected_message": "Message sent to the wrong address",
    "unauthorized_access": "Unauthorized access or use",
    "lost_device": "Lost or stolen device or media",
    "hacking": "Hacking or IT incident",
    "other": "Other",
}
NOTIFY_WINDOW = timedelta(days=60)
HHS_IMMEDIATE = 500  # 164.408(b): 500 or more individuals
MEDIA_MORE_THAN = 500  # 164.406: more than 500 residents of a state or jurisdiction

# The four factors of 164.402(2), in the order the guided form asks them.
FACTORS = [
    {"key": "nature_extent", "title": "1. The nature and extent of the PHI involved",
     "question": "Which identifiers and how sensitive is the information? How likely is re-identification?",
     "choices": {"low": "Limited identifiers, nothing sensitive (e.g. a first name and an appointment time)",
                 "medium": "Direct identifiers with some clinical or financial detail",
                 "high": "Sensitive information (diagnoses, mental health, substance use, SSN, financial)"}},
    {"key": "unauthorized_person", "title": "2. The unauthorized person who used or received the PHI",
     "question": "Who received or used it, and are they bound to protect it?",
     "choices": {"low": "Another covered entity or business associate, obliged by HIPAA to protect it",
                 "medium": "A known person with no HIPAA obligation",
                 "high": "Unknown, or someone likely to misuse it"}},
    {"key": "acquired_viewed", "title": "3. Whether the PHI was actually acquired or viewed",
     "question": "Was it opened, read or copied?",
     "choices": {"low": "Not opened: returned unread, or logs show no access",
                 "medium": "Unknown",
                 "high": "Opened, viewed or copied"}},
    {"key": "mitigation", "title": "4. The extent to which the risk has been mitigated",
     "question": "What was done to reduce the harm?",
     "choices": {"low": "Recovered, or the recipient gave a written assurance it was deleted and not kept",
                 "medium": "Partly mitigated (asked to delete, no assurance yet)",
                 "high": "Not mitigated"}},
]
FACTOR_KEYS = [f["key"] for f in FACTORS]
RATINGS = ("low", "medium", "high")

# What an audit action on a contact says about the data reached.
_AUDIT_CATEGORIES = {
    "contact.read": "demographics and contact details",
    "contact.exported": "the whole patient record (export)",
    "contact.updated": "demographics and contact details",
    "contact.facts": "clinical facts",
}


def _audit(session: Session, org_id: str, actor: dict, action: str, inc: BreachIncident, details: dict) -> None:
    record(session, org_id=org_id, action=action, target_type="breach_incident", target_id=inc.id, details=details,
           **actor)


def _enc(session: Session, org_id: str, inc_id: str, column: str, value: str | None) -> bytes | None:
    return get_keyring().encrypt(session, org_id, TABLE, column, inc_id, value.encode()) if value else None


def _dec(session: Session, inc: BreachIncident, column: str, blob: bytes | None) -> str | None:
    return get_keyring().decrypt(session, inc.org_id, TABLE, column, inc.id, blob).decode() if blob else None


def _date(value, field: str, *, required: bool = False) -> date | None:
    if value in (None, ""):
        if required:
            raise ValidationFailed("Required.", field=field)
        return None
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValidationFailed("Use a date (YYYY-MM-DD).", field=field) from None


def _datetime(value, field: str) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return clock.aware(value)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ValidationFailed("Use a date and time (ISO 8601).", field=field) from None
    return clock.aware(parsed)


def _ids(value, field: str) -> list[str]:
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationFailed("A list of ids.", field=field)
    if len(value) > 10_000:
        raise ValidationFailed("At most 10,000 ids.", field=field)
    for v in value:
        if not is_id(v):
            raise ValidationFailed("Not an id.", field=field)
    return list(dict.fromkeys(value))


# --------------------------------------------------------------------------- open and compute


def open_incident(session: Session, org_id: str, data: dict, actor: dict) -> BreachIncident:
    """A new incident; the affected patients are computed at once. Refused naming the field:
    no title, an unknown kind, a discovery date in the future or before the occurrence, a message
    or patient of no record here, an audit window without an actor (or the reverse)."""
    from carepost.delivery.models import Message
    from carepost.patients.models import Contact

    title = (data.get("title") or "").strip() if isinstance(data.get("title") or "", str) else ""
    if not title or len(title) > 200:
        raise ValidationFailed("A short label without patient details, up to 200 characters.", field="title")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValidationFailed("Choose one of " + ", ".join(KINDS) + ".", field="kind")
    today = clock.now().date()
    discovered = _date(data.get("discovered_on"), "discovered_on", required=True)
    if discovered > today:
        raise ValidationFailed("Discovery cannot be in the future.", field="discovered_on")
    occurred = _date(data.get("occurred_on"), "occurred_on")
    if occurred and occurred > discovered:
        raise ValidationFailed("It cannot have happened after it was discovered.", field="occurred_on")
    message_ids = _ids(data.get("message_ids"), "message_ids")
    contact_ids = _ids(data.get("contact_ids"), "contact_ids")
    if message_ids:
        found = set(session.scalars(select(Message.id).where(Message.org_id == org_id, Message.id.in_(message_ids))))
        if len(found) != len(message_ids):
            raise ValidationFailed("A message of no record in this organization.", field="message_ids")
    if contact_ids:
        found = set(session.scalars(select(Contact.id).where(Contact.org_id == org_id, Contact.id.in_(contact_ids))))
        if len(found) != len(contact_ids):
            raise ValidationFailed("A patient of no record in this organization.", field="contact_ids")
    audit_actor = (data.get("audit_actor_id") or "").strip() or None
    audit_from = _datetime(data.get("audit_from"), "audit_from")
    audit_to = _datetime(data.get("audit_to"), "audit_to")
    if audit_actor and not (audit_from and audit_to):
        raise ValidationFailed("Give the window of the access (from and to).", field="audit_from")
    if (audit_from or audit_to) and not audit_actor:
        raise ValidationFailed("Name the user or key whose access to look up.", field="audit_actor_id")
    if audit_from and audit_to and audit_to <= audit_from:
        raise ValidationFailed("The window must end after it starts.", field="audit_to")
    if not (message_ids or contact_ids or audit_actor):
        raise ValidationFailed("Name the messages involved, the patients, or whose access to look up.",
                               field="message_ids")
    notice_contact = (data.get("notice_contact") or "").strip()
    if len(notice_contact) > 300:
        raise ValidationFailed("At most 300 characters.", field="notice_contact")
    description = (data.get("description") or "").strip()
    if len(description) > 10_000:
        raise ValidationFailed("At most 10,000 characters.", field="description")
    inc = BreachIncident(id=new_id(), org_id=org_id, title=title, kind=kind, discovered_on=discovered,
                         occurred_on=occurred, status="open", message_ids=message_ids, extra_contact_ids=contact_ids,
                         audit_actor_id=audit_actor, audit_from=audit_from, audit_to=audit_to,
                         notice_contact=notice_contact, created_by=actor.get("actor_id"), created_at=clock.now())
    inc.description_enc = _enc(session, org_id, inc.id, "description", description)
    session.add(inc)
    session.flush([inc])
    _audit(session, org_id, actor, "compliance.breach.opened", inc,
           {"kind": kind, "discovered_on": discovered.isoformat(), "messages": len(message_ids),
            "patients_named": len(contact_ids), "audit_window": bool(audit_actor)})
    compute(session, org_id, inc, actor)
    return inc


def compute(session: Session, org_id: str, inc: BreachIncident, actor: dict) -> BreachIncident:
    """(Re)compute the affected patients, the categories of PHI and the count per state."""
    from carepost.delivery.models import Message, MessageAttachment, MessageRecipient
    from carepost.patients.models import Contact

    affected: set[str] = set(inc.extra_contact_ids or [])
    categories: set[str] = set()
    unknown_recipients = 0
    if inc.message_ids:
        messages = list(session.scalars(select(Message).where(Message.org_id == org_id, Message.id.in_(inc.message_ids))))
        for m in messages:
            categories.add("name and email address")
            if m.contains_phi:
                categories.add("health information in the message" + (f" ({m.purpose})" if m.purpose else ""))
        for contact_id, in session.execute(select(MessageRecipient.contact_id).where(
                MessageRecipient.org_id == org_id, MessageRecipient.message_id.in_(inc.message_ids))):
            if contact_id:
                affected.add(contact_id)
            else:
                unknown_recipients += 1
        if session.scalar(select(MessageAttachment.id).where(MessageAttachment.org_id == org_id,
                                                             MessageAttachment.message_id.in_(inc.message_ids)).limit(1)):
            categories.add("attachments")
    if inc.audit_actor_id and inc.audit_from and inc.audit_to:
        q = (select(AuditEvent.target_id, AuditEvent.action).where(
            AuditEvent.org_id == org_id, AuditEvent.actor_id == inc.audit_actor_id,
            AuditEvent.target_type == "contact", AuditEvent.outcome == "success",
            AuditEvent.occurred_at >= clock.aware(inc.audit_from), AuditEvent.occurred_at <= clock.aware(inc.audit_to)))
        for target_id, action in session.execute(q):
            if target_id and is_id(target_id):
                affected.add(target_id)
                categories.add(_AUDIT_CATEGORIES.get(action, "patient record (" + action + ")"))
    if inc.extra_contact_ids:
        categories.add("as recorded by hand")
    # Keep only patients still on record here (a deleted one cannot be notified from CarePost).
    ids = sorted(affected)
    states: dict[str, int] = {}
    present: list[str] = []
    for i in range(0, len(ids), 500):
        for cid, state in session.execute(select(Contact.id, Contact.state).where(Contact.org_id == org_id,
                                                                                  Contact.id.in_(ids[i:i + 500]))):
            present.append(cid)
            key = (state or "").strip().upper()[:2] or "unknown"
            states[key] = states.get(key, 0) + 1
    inc.affected_contact_ids = sorted(present)
    inc.affected_count = len(present)
    inc.categories = sorted(categories)
    inc.by_state = dict(sorted(states.items()))
    inc.computed_at = clock.now()
    _audit(session, org_id, actor, "compliance.breach.computed", inc,
           {"affected": inc.affected_count, "recipients_not_patients": unknown_recipients,
            "states": inc.by_state, "categories": inc.categories})
    return inc


def get(session: Session, org_id: str, incident_id: str) -> BreachIncident:
    inc = session.scalar(select(BreachIncident).where(BreachIncident.org_id == org_id,
                                                      BreachIncident.id == incident_id)) if is_id(incident_id) else None
    if inc is None:
        raise NotFound("No such breach incident.", field="incident_id")
    return inc


def list_incidents(session: Session, org_id: str) -> list[BreachIncident]:
    return list(session.scalars(select(BreachIncident).where(BreachIncident.org_id == org_id)
                                .order_by(BreachIncident.discovered_on.desc(), BreachIncident.id)))


# --------------------------------------------------------------------------- the four factors


def assessment(session: Session, inc: BreachIncident) -> dict:
    raw = _dec(session, inc, "assessment", inc.assessment_enc)
    return json.loads(raw) if raw else {}


def answer_factor(session: Session, org_id: str, inc: BreachIncident, factor: str, rating, notes, actor: dict) -> dict:
    """Record one factor of the guided assessment. Factors are answered in order (a later one
    only after the earlier ones); any answered factor may be revised. After the fourth, the
    conclusion is set."""
    if inc.status == "closed":
        raise Conflict("The incident is closed.", field="factor")
    if factor not in FACTOR_KEYS:
        raise ValidationFailed("Not one of the four factors.", field="factor")
    position = FACTOR_KEYS.index(factor)
    if position > inc.assessment_step:
        raise ValidationFailed(f"Answer factor {inc.assessment_step + 1} first.", field="factor")
    if rating not in RATINGS:
        raise ValidationFailed("Rate it low, medium or high.", field="rating")
    notes = (notes or "").strip() if isinstance(notes, str) or notes is None else ""
    if len(notes) > 4000:
        raise ValidationFailed("At most 4,000 characters.", field="notes")
    if rating == "low" and not notes:
        raise ValidationFailed("Say why the risk is low: a low rating must be documented.", field="notes")
    data = assessment(session, inc)
    data[factor] = {"rating": rating, "notes": notes, "by": actor.get("actor_id"), "at": clock.now().isoformat()}
    inc.assessment_enc = _enc(session, org_id, inc.id, "assessment", json.dumps(data))
    inc.assessment_step = max(inc.assessment_step, position + 1)
    details = {"factor": factor, "rating": rating, "step": position + 1}
    if all(k in data for k in FACTOR_KEYS):
        inc.conclusion = "low_probability" if all(data[k]["rating"] == "low" for k in FACTOR_KEYS) else "notifiable"
        inc.assessed_by, inc.assessed_at = actor.get("actor_id"), clock.now()
        if inc.status == "open":
            inc.status = "assessed"
        details["conclusion"] = inc.conclusion
    _audit(session, org_id, actor, "compliance.breach.factor_assessed", inc, details)
    return data


# --------------------------------------------------------------------------- clock and thresholds


def deadlines(inc: BreachIncident, today: date | None = None) -> dict:
    today = today or clock.now().date()
    individuals_due = inc.discovered_on + NOTIFY_WINDOW
    immediate = inc.affected_count >= HHS_IMMEDIATE
    hhs_due = individuals_due if immediate else date(inc.discovered_on.year, 12, 31) + NOTIFY_WINDOW
    media_states = sorted(s for s, n in (inc.by_state or {}).items() if s != "unknown" and n > MEDIA_MORE_THAN)
    notifiable = inc.conclusion != "low_probability"
    return {
        "individuals_due": individuals_due.isoformat(),
        "days_left": (individuals_due - today).days,
        "overdue": notifiable and inc.individuals_notified_on is None and today > individuals_due,
        "hhs": {"immediate": immediate, "due": hhs_due.isoformat(),
                "rule": ("500 or more affected: notify HHS within 60 days of discovery (164.408(b))" if immediate
                         else "fewer than 500: log it for HHS within 60 days after the end of the year (164.408(c))")},
        "media": {"required": bool(media_states), "states": media_states,
                  "due": individuals_due.isoformat() if media_states else None,
                  "rule": "more than 500 residents of a state or jurisdiction: prominent media outlets (164.406)"},
        "unknown_state": (inc.by_state or {}).get("unknown", 0),
    }


def incident_dict(session: Session, inc: BreachIncident, *, with_assessment: bool = True) -> dict:
    out = {
        "id": inc.id, "title": inc.title, "kind": inc.kind, "kind_label": KINDS.get(inc.kind, inc.kind),
        "status": inc.status, "occurred_on": inc.occurred_on.isoformat() if inc.occurred_on else None,
        "discovered_on": inc.discovered_on.isoformat(), "message_ids": inc.message_ids or [],
        "contact_ids_added": inc.extra_contact_ids or [], "audit_actor_id": inc.audit_actor_id,
        "audit_from": clock.aware(inc.audit_from).isoformat() if inc.audit_from else None,
        "audit_to": clock.aware(inc.audit_to).isoformat() if inc.audit_to else None,
        "affected_count": inc.affected_count, "categories": inc.categories or [], "by_state": inc.by_state or {},
        "assessment_step": inc.assessment_step, "conclusion": inc.conclusion,
        "notice_contact": inc.notice_contact,
        "individuals_notified_on": inc.individuals_notified_on.isoformat() if inc.individuals_notified_on else None,
        "hhs_notified_on": inc.hhs_notified_on.isoformat() if inc.hhs_notified_on else None,
        "media_notified_on": inc.media_notified_on.isoformat() if inc.media_notified_on else None,
        "closed_on": inc.closed_on.isoformat() if inc.closed_on else None,
        "deadlines": deadlines(inc),
    }
    if with_assessment:
        a = assessment(session, inc)
        out["assessment"] = {k: {"rating": v["rating"], "notes": v["notes"]} for k, v in a.items()}
    return out


def record_notifications(session: Session, org_id: str, inc: BreachIncident, data: dict, actor: dict) -> BreachIncident:
    """Record when individuals, HHS and the media were notified, and close the incident."""
    today = clock.now().date()
    changed = {}
    for name in ("individuals_notified_on", "hhs_notified_on", "media_notified_on", "closed_on"):
        if name in data and data[name] not in (None, ""):
            value = _date(data[name], name)
            if value > today:
                raise ValidationFailed("Cannot be in the future.", field=name)
            if value < inc.discovered_on:
                raise ValidationFailed("Cannot be before the discovery.", field=name)
            setattr(inc, name, value)
            changed[name] = value.isoformat()
    if not changed:
        raise ValidationFailed("Give at least one date.", field="individuals_notified_on")
    if inc.closed_on:
        if inc.conclusion is None:
            raise ValidationFailed("Finish the risk assessment before closing.", field="closed_on")
        if inc.conclusion == "notifiable" and inc.individuals_notified_on is None:
            raise ValidationFailed("Record when the individuals were notified before closing.", field="closed_on")
        inc.status = "closed"
    elif inc.individuals_notified_on:
        inc.status = "notifying"
    _audit(session, org_id, actor, "compliance.breach.notifications_recorded", inc, changed)
    return inc


# --------------------------------------------------------------------------- notices

_TEXTS = {
    "en": {
        "subject": "Notice of a privacy incident involving your health information",
        "greeting": "Dear {name},",
        "what": ("What happened: on {discovered} we discovered that {what}.{occurred} "
                 "We are writing to tell you about it and what we are doing."),
        "involved": "What information was involved: {categories}.",
        "doing": ("What we are doing: we investigated the incident, took steps to limit it{mitigation}, and are "
                  "reviewing our safeguards and training to prevent it from happening again."),
        "you": ("What you can do: watch for any unexpected messages or statements about care you did not receive, "
                "and tell us if you see anything unusual. You may also file a complaint with the U.S. Department "
                "of Health and Human Services, Office for Civil Rights."),
        "contact": "For more information, contact us: {contact}.",
        "closing": "Sincerely,\n{org}",
        "kinds": {"misdirected_message": "a message containing your information was sent to the wrong address",
                  "unauthorized_access": "your record was accessed by someone who was not authorized to do so",
                  "lost_device": "a device or media holding your information was lost or stolen",
                  "hacking": "an unauthorized party gained access to our systems",
                  "other": "your information may have been disclosed without authorization"},
        "occurred": " The incident took place on {date}.",
        "mitigated": " (the recipient was asked to delete it)",
    },
    "es": {
        "subject": "Aviso de un incidente de privacidad relacionado con su información de salud",
        "greeting": "Estimado/a {name}:",
        "what": ("Qué sucedió: el {discovered} descubrimos que {what}.{occurred} "
                 "Le escribimos para informarle y contarle lo que estamos haciendo."),
        "involved": "Qué información estuvo involucrada: {categories}.",
        "doing": ("Qué estamos haciendo: investigamos el incidente, tomamos medidas para limitarlo{mitigation} y "
                  "estamos revisando nuestras medidas de protección y capacitación para evitar que vuelva a ocurrir."),
        "you": ("Qué puede hacer usted: esté atento/a a mensajes o estados de cuenta inesperados sobre atención que "
                "no recibió, y avísenos si nota algo inusual. También puede presentar una queja ante la Oficina de "
                "Derechos Civiles del Departamento de Salud y Servicios Humanos de EE. UU."),
        "contact": "Para más información, comuníquese con nosotros: {contact}.",
        "closing": "Atentamente,\n{org}",
        "kinds": {"misdirected_message": "un mensaje con su información fue enviado a una dirección equivocada",
                  "unauthorized_access": "una persona no autorizada accedió a su expediente",
                  "lost_device": "se perdió o fue robado un dispositivo o medio con su información",
                  "hacking": "un tercero no autorizado obtuvo acceso a nuestros sistemas",
                  "other": "su información pudo haber sido divulgada sin autorización"},
        "occurred": " El incidente ocurrió el {date}.",
        "mitigated": " (se pidió al destinatario que la eliminara)",
        "categories": {"name and email address": "nombre y dirección de correo electrónico",
                       "attachments": "archivos adjuntos",
                       "demographics and contact details": "datos demográficos y de contacto",
                       "the whole patient record (export)": "el expediente completo del paciente",
                       "clinical facts": "datos clínicos",
                       "as recorded by hand": "según lo registrado por el personal"},
    },
}
LANGUAGES = tuple(_TEXTS)


def _language(preferred: str | None) -> tuple[str, bool]:
    base = (preferred or "en").split("-")[0].lower()
    return (base, False) if base in _TEXTS else ("en", bool(preferred))


def _category_text(lang: str, categories: list[str]) -> str:
    table = _TEXTS[lang].get("categories", {})
    out = []
    for c in categories:
        if c.startswith("health information in the message"):
            out.append("información de salud en el mensaje" if lang == "es" else c)
        else:
            out.append(table.get(c, c))
    return "; ".join(out) or ("information about your care" if lang == "en" else "información sobre su atención")


def draft_notices(session: Session, org_id: str, inc: BreachIncident, actor: dict) -> list[dict]:
    """One notice per affected patient, in their language (audited; not stored)."""
    from carepost.accounts.service import get_organization
    from carepost.patients.models import Contact
    from carepost.patients.service import contact_dicts

    if inc.conclusion == "low_probability":
        raise Conflict("The assessment found a low probability of compromise: no notice is required.",
                       field="incident_id")
    org = get_organization(session, org_id).name
    mitigated = (assessment(session, inc).get("mitigation") or {}).get("rating") in ("low", "medium")
    notices = []
    ids = inc.affected_contact_ids or []
    for i in range(0, len(ids), 500):
        contacts = list(session.scalars(select(Contact).where(Contact.org_id == org_id, Contact.id.in_(ids[i:i + 500]))
                                        .order_by(Contact.id)))
        for view in contact_dicts(session, contacts):
            lang, fell_back = _language(view.get("preferred_language"))
            t = _TEXTS[lang]
            name = " ".join(p for p in (view.get("given_name"), view.get("family_name")) if p) or (
                "patient" if lang == "en" else "paciente")
            occurred = t["occurred"].format(date=inc.occurred_on.isoformat()) if inc.occurred_on else ""
            body = "\n\n".join([
                t["greeting"].format(name=name),
                t["what"].format(discovered=inc.discovered_on.isoformat(), what=t["kinds"][inc.kind], occurred=occurred),
                t["involved"].format(categories=_category_text(lang, inc.categories or [])),
                t["doing"].format(mitigation=t["mitigated"] if mitigated else ""),
                t["you"],
                t["contact"].format(contact=inc.notice_contact or "[toll-free number, email or postal address]"),
                t["closing"].format(org=org),
            ])
            address = ", ".join(p for p in (view.get("address_line1"), view.get("address_line2"), view.get("city"),
                                            view.get("state"), view.get("postal_code")) if p)
            notices.append({"contact_id": view["id"], "language": lang, "language_fallback": fell_back,
                            "name": name, "email": view.get("email"), "postal_address": address or None,
                            "subject": t["subject"], "text": body})
    _audit(session, org_id, actor, "compliance.breach.notices_drafted", inc,
           {"notices": len(notices), "languages": sorted({n["language"] for n in notices})})
    return notices
