"""The facts a message template's merge-field helpers print, loaded set-wise for a chunk.

``content.helpers`` names the helpers and the PHI category each reveals; it sits beside patients
in the layers, so the composition root fills its ``content.load_merge_data`` port with
:func:`load`. One query per needed kind of fact per chunk (never one per contact), and only the
kinds the template uses: a template that prints only ``first_name`` decrypts names and reads
nothing clinical.
"""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.patients.models import Appointment, Condition, Contact, Medication, Observation
from carepost.patients.service import _decrypt

NAME_HELPERS = {"first_name", "last_name", "full_name"}
INACTIVE_APPOINTMENT = ("cancelled", "noshow", "fulfilled", "entered-in-error", "arrived", "checked-in")
ACTIVE_MEDICATION = ("active", "intended", "on-hold")
ACTIVE_CONDITION = ("active", "recurrence", "relapse")


def _split_code(code: str) -> tuple[str, str]:
    system, _, value = code.partition(":")
    return system.lower(), value


def load(session: Session, org_id: str, contact_ids: list[str], needs) -> dict[str, dict]:
    """``{contact_id: facts}`` for the organization's contacts among ``contact_ids``."""
    helpers = set(needs.helpers)
    out: dict[str, dict] = {}
    for c in session.scalars(select(Contact).where(Contact.org_id == org_id, Contact.id.in_(contact_ids))):
        contact = {"preferred_language": c.preferred_language, "time_zone": c.time_zone}
        if helpers & NAME_HELPERS:
            for name in ("given_name", "family_name"):
                contact[name] = _decrypt(session, org_id, "contacts", name, c.id, getattr(c, f"{name}_enc"))
        out[c.id] = {"contact": contact, "care_stage": c.care_stage_override or c.care_stage}
    ids = list(out)
    if not ids:
        return out
    now = clock.now()
    if "next_appointment" in helpers:
        first = (select(Appointment.contact_id, func.min(Appointment.start_at).label("start_at"))
                 .where(Appointment.org_id == org_id, Appointment.contact_id.in_(ids), Appointment.start_at > now,
                        or_(Appointment.status.is_(None), Appointment.status.notin_(INACTIVE_APPOINTMENT)))
                 .group_by(Appointment.contact_id).subquery())
        rows = session.execute(select(Appointment.contact_id, Appointment.start_at, Appointment.display).join(
            first, and_(first.c.contact_id == Appointment.contact_id, first.c.start_at == Appointment.start_at))
            .where(Appointment.org_id == org_id))
        for contact_id, start_at, display in rows:
            out[contact_id].setdefault("next_appointment", {"start_at": clock.aware(start_at), "display": display})
    if helpers & {"active_medications", "refill_due"}:
        rows = session.execute(select(Medication.contact_id, Medication.display, Medication.next_refill_due).where(
            Medication.org_id == org_id, Medication.contact_id.in_(ids),
            or_(Medication.status.is_(None), Medication.status.in_(ACTIVE_MEDICATION))).order_by(Medication.display))
        for contact_id, display, due in rows:
            out[contact_id].setdefault("medications", []).append({"display": display, "next_refill_due": due})
    if "active_conditions" in helpers:
        rows = session.execute(select(Condition.contact_id, Condition.display).where(
            Condition.org_id == org_id, Condition.contact_id.in_(ids),
            or_(Condition.status.is_(None), Condition.status.in_(ACTIVE_CONDITION))).order_by(Condition.display))
        for contact_id, display in rows:
            out[contact_id].setdefault("conditions", []).append({"display": display})
    codes = sorted(getattr(needs, "observation_codes", ()) or ())
    if "last_observation" in helpers and codes:
        wanted = or_(*(and_(func.lower(Observation.code_system) == s, Observation.code == v)
                       for s, v in map(_split_code, codes)))
        rows = session.execute(select(
            Observation.contact_id, Observation.code_system, Observation.code, Observation.effective_at,
            Observation.display, Observation.value_quantity, Observation.value_unit, Observation.value_display,
            Observation.value_code, Observation.interpretation).where(
            Observation.org_id == org_id, Observation.contact_id.in_(ids), wanted,
            or_(Observation.status.is_(None), Observation.status.notin_(("entered-in-error", "cancelled"))))
            .order_by(Observation.effective_at))
        for r in rows:  # ascending: the latest wins
            key = f"{(r.code_system or '').lower()}:{r.code}".lower()
            out[r.contact_id].setdefault("observations", {})[key] = {
                "effective_at": clock.aware(r.effective_at), "display": r.display, "value_quantity": r.value_quantity,
                "value_unit": r.value_unit, "value_display": r.value_display, "value_code": r.value_code,
                "interpretation": r.interpretation}
    return out
