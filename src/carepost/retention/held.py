"""What a legal hold covers beyond its own record, resolved in SQL (issue 16 item 2).

A hold names one record — a patient, a campaign, a message — but the litigation it serves is
about everything that record is part of. So:

* a **patient hold** covers the contact and every record about them: the messages addressed to
  them (with those messages' recipients and portal messages) and every row of any table that
  names them in a ``contact_id`` (form submissions, authorizations, accounting requests, EHR
  messages, disclosures, journey runs, ...);
* a **campaign hold** covers the campaign and its messages (with their recipients and portal
  messages);
* a **message hold** covers the message, its recipients and its portal message.

An **audit event** is about a held record when its ``target_id``, or a reference in its
``details`` (``contact_id``, ``message_id``, ``recipient_id``, ``campaign_id``,
``portal_message_id``, or one element of the lists ``contact_ids`` and ``message_ids`` that list
views and exports write), names one; or when a held patient is its actor (``actor_type
'patient'``: an unsubscribe, a portal view). :func:`audit_condition` is that test as one SQL
condition on ``audit_events``, so the purge finds the first held event of a chain with one
statement (:mod:`carepost.audit.pruning` cuts only the chain's start and stops there).

Set-based, and independent of the hold's size: the condition looks up *each event's* references
by primary key (correlated ``EXISTS``) instead of listing the held records — a campaign hold over
a million messages costs an event no more than a message hold. The purge evaluates it for at
most one chunk of events at a time.

Known limit: a record deleted *before* the hold was placed (an earlier purge, a deletion by
hand) can no longer be traced from an event that names only its id; events that name the patient
themselves (``contact_id`` in the target or the details) are still kept.

This module reads other capabilities' tables by name through the metadata (a set-based read that
needs their joins, as the purge's deletes do).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, case, exists, func, or_, select

from carepost.core.database import Base

# Audit target types whose table is not "<target_type>s".
_TARGET_TABLES = {"import": "import_jobs"}
# Tables that name a contact but whose rows are not records about the patient.
_NOT_ABOUT_PATIENT = frozenset({"legal_holds"})


def _t(name: str):
    return Base.metadata.tables.get(name)


@dataclass(frozen=True)
class Held:
    """The records protecting holds name directly: patients, messages, campaigns."""

    org_id: str
    contacts: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    campaigns: tuple[str, ...] = ()

    @classmethod
    def of(cls, org_id: str, holds) -> Held:
        def ids(scope, attr):
            return tuple(sorted({getattr(h, attr) for h in holds if h.scope == scope and getattr(h, attr)}))

        return cls(org_id, ids("patient", "contact_id"), ids("message", "message_id"), ids("campaign", "campaign_id"))

    def __bool__(self) -> bool:
        return bool(self.contacts or self.messages or self.campaigns)


def _any(*conds):
    conds = [c for c in conds if c is not None]
    return or_(*conds) if conds else None


def message_held(held: Held, ref):
    """``ref`` (an expression holding a message id) names a held message: a message hold on it,
    a message of a held campaign, or a message addressed to a held patient. None: no such hold."""
    conds = []
    if held.messages:
        conds.append(ref.in_(held.messages))
    if held.campaigns:
        m = _t("messages").alias("held_message")
        conds.append(exists().where(m.c.id == ref, m.c.org_id == held.org_id, m.c.campaign_id.in_(held.campaigns)))
    if held.contacts:
        r = _t("message_recipients").alias("held_message_recipient")
        conds.append(exists().where(r.c.message_id == ref, r.c.org_id == held.org_id, r.c.contact_id.in_(held.contacts)))
    return _any(*conds)


def recipient_held(held: Held, ref):
    """``ref`` names a held message's recipient (a copy of a held message, or a held patient's)."""
    if not held:
        return None
    r = _t("message_recipients").alias("held_recipient")
    own = r.c.contact_id.in_(held.contacts) if held.contacts else None
    return exists().where(r.c.id == ref, r.c.org_id == held.org_id, _any(own, message_held(held, r.c.message_id)))


def portal_held(held: Held, ref):
    """``ref`` names the portal message of a held message."""
    p = _t("portal_messages").alias("held_portal")
    cond = message_held(held, p.c.message_id)
    if cond is None:
        return None
    return exists().where(p.c.id == ref, p.c.org_id == held.org_id, cond)


def _patient_record_tables() -> list[tuple[str, object]]:
    """``[(audit target_type, table)]``: tables whose rows name a patient (``contact_id``)."""
    out = []
    for name, t in sorted(Base.metadata.tables.items()):
        if name in _NOT_ABOUT_PATIENT or name == "contacts" or "contact_id" not in t.c or "id" not in t.c:
            continue
        target_type = next((k for k, v in _TARGET_TABLES.items() if v == name), name.removesuffix("s"))
        out.append((target_type, t))
    return out


def _json_list_has(dialect: str, column, key: str | None, pred):
    """Some element of the JSON list ``column[key]`` (``column`` itself when ``key`` is None)
    satisfies ``pred(element as text)``; false when it is absent or not a list."""
    if dialect == "postgresql":
        arr = column[key] if key else column  # ->, a json value (NULL when absent)
        elements = func.json_array_elements_text(case((func.json_typeof(arr) == "array", arr))).table_valued("value")
    else:
        elements = (func.json_each(column, f"$.{key}") if key else func.json_each(column)).table_valued("value")
    return exists(select(1).select_from(elements).where(pred(elements.c.value)))


def _breach_held(held: Held, ref, dialect: str):
    """``ref`` names a breach incident that names a held patient (affected or added by hand) or a
    held message."""
    b = _t("breach_incidents")
    if b is None:
        return None
    b = b.alias("held_breach")
    conds = []
    if held.contacts:
        conds += [_json_list_has(dialect, b.c[column], None, lambda v: v.in_(held.contacts))
                  for column in ("affected_contact_ids", "extra_contact_ids")]
    conds.append(_json_list_has(dialect, b.c.message_ids, None, lambda v: message_held(held, v)))
    return exists().where(b.c.id == ref, b.c.org_id == held.org_id, or_(*conds))


def audit_condition(held: Held, events, dialect: str):
    """The SQL condition on ``events`` (the ``audit_events`` table) true for every event about a
    held record (see the module docstring). None when ``held`` names nothing."""
    if not held:
        return None
    target, details = events.c.target_id, events.c.details
    conds = []

    def ref(key):
        return details[key].as_string()

    if held.contacts:
        conds += [target.in_(held.contacts), ref("contact_id").in_(held.contacts),
                  and_(events.c.actor_type == "patient", events.c.actor_id.in_(held.contacts)),
                  _json_list_has(dialect, details, "contact_ids", lambda v: v.in_(held.contacts))]
        for target_type, t in _patient_record_tables():
            conds.append(and_(events.c.target_type == target_type,
                              exists().where(t.c.id == target, t.c.org_id == held.org_id,
                                             t.c.contact_id.in_(held.contacts))))
    if held.campaigns:
        conds += [target.in_(held.campaigns), ref("campaign_id").in_(held.campaigns)]
    # Messages, their copies and portal messages: by any target type (the archive names a message
    # it opened as its target), and by the details' references.
    conds += [message_held(held, target), recipient_held(held, target), portal_held(held, target),
              message_held(held, ref("message_id")), recipient_held(held, ref("recipient_id")),
              portal_held(held, ref("portal_message_id"))]
    if message_held(held, target) is not None:
        conds.append(_json_list_has(dialect, details, "message_ids", lambda v: message_held(held, v)))
    breach = _breach_held(held, target, dialect)
    if breach is not None:
        conds.append(and_(events.c.target_type == "breach_incident", breach))
    return _any(*conds)


# Where audit_condition finds what an event's target is about: these target types by their table
# (or the held ids themselves), every other one only through the details and the actor.
RESOLVED_TARGET_TYPES = frozenset({"contact", "campaign", "message", "message_recipient", "portal_message",
                                   "archive", "breach_incident"})
# Target types that are not a record about a patient, campaign or message (configuration, people,
# keys, the audit log itself, aggregate or de-identified output, an import job of many patients):
# their events are held through the details' references, a held patient as actor, a date range
# or an organization hold. tests/test_retention_records.py checks that every target type the code
# writes is resolved or listed here, so a new one is classified when it is added.
NOT_ABOUT_ONE_PATIENT = frozenset({
    "analytics", "api_credential", "audit_chain", "audit_event", "audit_log",
    "authorization_text", "backup", "break_glass_grant", "business_associate", "contact_attribute",
    "contact_list", "csv_mapping", "data_key", "database", "deidentified_export", "deliverability_alert",
    "ehr_fhir_server", "form", "goal", "import", "index_key", "journey", "legal_hold", "location", "master_key",
    "message_batch", "message_list", "message_template", "mllp_connection", "oauth_token", "one_time_link",
    "organization",
    "policy_document", "purge_run", "recipient_key", "recipient_key_list", "retention_schedule", "route",
    "secret", "security_preview", "segment", "sending_domain", "smtp_submission", "suppression",
    "suppression_list", "topic", "user", "value_set", "web_session", "webauthn_credential",
    "webhook_endpoint", "address_list",
})


def classified(target_type: str) -> bool:
    """Is ``target_type`` resolved by :func:`audit_condition` (or declared not about a patient)?"""
    return (target_type in RESOLVED_TARGET_TYPES or target_type in NOT_ABOUT_ONE_PATIENT
            or any(t == target_type for t, _table in _patient_record_tables()))
