"""FHIR R4 Appointment and Encounter resources (posted, or in a Subscription rest-hook
notification Bundle) mapped to contact events.

Each resource is validated with the R4 models of ``fhir.resources`` through the patients
capability's FHIR import (:func:`carepost.patients.fhir.validate_resource`, narratives and
contained resources dropped first), so an error names the element (``Appointment.status``).
The patient is the participant (Appointment) or subject (Encounter) reference: a reference to a
Patient imported before (``Patient/123``: its source id's blind index), a conditional reference
``Patient?identifier=system|value``, or a logical reference (``Reference.identifier``) with an
MRN. A resource is recorded once per ``<type>/<id>/_history/<meta.versionId>`` (without a
versionId, the SHA-256 of its content stands in).

Events:

* Appointment ``booked`` -> ``appointment.booked``, or ``appointment.rescheduled`` when an
  earlier version of the same Appointment was recorded with another start, or
  ``appointment.modified`` with the same start; ``cancelled`` -> ``appointment.cancelled``;
  ``noshow`` -> ``appointment.noshow``; ``arrived``/``checked-in``/``fulfilled`` ->
  ``appointment.attended``; ``proposed``/``pending``/``waitlist``/``entered-in-error``: nothing
  (accepted, ``ignored``).
* Encounter of an inpatient, emergency or observation class (IMP, ACUTE, NONAC, OBSENC, SS,
  EMER): ``arrived``/``triaged``/``in-progress`` -> ``patient.admitted``, ``finished`` ->
  ``patient.discharged``; of any other class (AMB, VR, HH...): ``arrived``/``triaged``/
  ``in-progress`` -> ``patient.registered``, ``finished`` -> ``visit.completed``; ``planned``,
  ``onleave``, ``cancelled``, ``entered-in-error``, ``unknown``: nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.ehr import service
from carepost.ehr.models import EhrMessage
from carepost.ehr.service import SOURCE_FHIR, EventRefused, Outcome, PatientNotMatched

RESOURCE_TYPES = ("Appointment", "Encounter")
INPATIENT_CLASSES = {"IMP", "ACUTE", "NONAC", "OBSENC", "SS", "EMER"}
APPOINTMENT_EVENTS = {"booked": "appointment.booked", "cancelled": "appointment.cancelled",
                      "noshow": "appointment.noshow", "arrived": "appointment.attended",
                      "checked-in": "appointment.attended", "fulfilled": "appointment.attended"}
ACTIVE_ENCOUNTER = {"arrived", "triaged", "in-progress"}
# Required bindings the R4 models do not enforce (AppointmentStatus, EncounterStatus).
STATUSES = {
    "Appointment": ("proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow",
                    "entered-in-error", "checked-in", "waitlist"),
    "Encounter": ("planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
                  "entered-in-error", "unknown"),
}
MAX_RESOURCE_BYTES = 256 * 1024


class FhirProblem(Exception):
    """An OperationOutcome issue: ``code`` from the FHIR issue-type value set, ``expression`` the
    element (``Appointment.participant``), ``text`` without any value from the resource."""

    def __init__(self, status: int, code: str, text: str, expression: str | None, reason_code: str = "invalid"):
        super().__init__(text)
        self.status, self.code, self.text, self.expression, self.reason_code = status, code, text, expression, reason_code


def operation_outcome(issues: list[dict]) -> dict:
    return {"resourceType": "OperationOutcome", "issue": issues}


def issue(severity: str, code: str, text: str, expression: str | None = None) -> dict:
    out = {"severity": severity, "code": code, "diagnostics": text}
    if expression:
        out["expression"] = [expression]
    return out


# --------------------------------------------------------------------------- reading


def check_resource(resource, expected: str | None = None, where: str = "") -> dict:
    """Shape, type, id and R4 validation; the resource with its narrative dropped."""
    from carepost.patients import fhir as patients_fhir

    prefix = where or (expected or "resource")
    if not isinstance(resource, dict):
        raise FhirProblem(422, "structure", "The body is a FHIR resource (a JSON object).", where or None)
    rtype = resource.get("resourceType")
    if expected and rtype != expected:
        raise FhirProblem(422, "structure", f"resourceType must be {expected}.", f"{prefix}.resourceType")
    if rtype not in RESOURCE_TYPES:
        raise FhirProblem(422, "not-supported", "resourceType is Appointment or Encounter.", f"{prefix}.resourceType")
    prefix = where or rtype
    resource = patients_fhir.strip_clear_text(dict(resource))
    try:
        patients_fhir.validate_resource(resource)
    except patients_fhir.MappingError as exc:
        path = (getattr(exc, "field", None) or str(exc).split(":", 1)[0]).strip()
        raise FhirProblem(422, "invalid", str(exc), f"{prefix}.{path}" if path and path != rtype else prefix,
                          reason_code="validation_failed") from None
    if resource.get("status") not in STATUSES[rtype]:
        raise FhirProblem(422, "code-invalid", f"{rtype}.status is one of {', '.join(STATUSES[rtype])}.",
                          f"{prefix}.status", reason_code="validation_failed")
    rid = resource.get("id")
    if not isinstance(rid, str) or not rid:
        raise FhirProblem(422, "required", f"{rtype}.id is required: resources are recorded once per id and "
                          "meta.versionId.", f"{prefix}.id")
    return resource


def control_id(resource: dict, content_hash: str) -> str:
    version = (resource.get("meta") or {}).get("versionId") or f"sha256-{content_hash[:32]}"
    return f"{resource['resourceType']}/{resource['id']}/_history/{version}"[:199]


def _patient_refs(resource: dict) -> tuple[list[dict], str]:
    if resource["resourceType"] == "Appointment":
        refs = []
        for participant in resource.get("participant") or []:
            actor = participant.get("actor") or {}
            ref = actor.get("reference") or ""
            if ref.split("?")[0].rsplit("/", 1)[-1] == "Patient" or "Patient/" in ref or actor.get("type") == "Patient" or not ref and actor.get("identifier"):
                refs.append(actor)
        return refs, "Appointment.participant.actor"
    subject = resource.get("subject")
    return ([subject] if subject else []), "Encounter.subject"


def match_patient(session: Session, org_id: str, resource: dict) -> str:
    """The contact a resource is about, or :class:`PatientNotMatched` naming the element."""
    from carepost.patients import fhir as patients_fhir
    from carepost.patients import service as patients

    refs, where = _patient_refs(resource)
    if not refs:
        raise PatientNotMatched("no_patient", f"{where} names no Patient.", where)
    found: set[str] = set()
    for ref in refs:
        key = patients_fhir.patient_ref_key(ref.get("reference"))
        if key and key[0] == "source":
            cid = patients.contact_for_sources(session, org_id, [key[1]])
            if cid:
                found.add(cid)
                continue
        if key and key[0] == "conditional":
            system, sep, value = key[1].partition("|")
            ids = patients.find_contact_ids(session, org_id, identifier=value if sep else key[1],
                                            system=(system or None) if sep else None)
            found.update(ids[:2])
            continue
        ident = ref.get("identifier") or {}
        if ident.get("value"):
            ids = patients.find_contact_ids(session, org_id, mrn=str(ident["value"])[:128],
                                            system=ident.get("system") or None)
            found.update(ids[:2])
    if len(found) > 1:
        raise PatientNotMatched("ambiguous_patient", f"{where} matches more than one patient.", where)
    if not found:
        raise PatientNotMatched("patient_not_found", f"{where}: no patient of this organization matches the "
                                "reference (a Patient imported before, or an MRN identifier).", where)
    return found.pop()


def _ref_ids(refs, kind: str) -> list[str]:
    out = []
    for ref in refs:
        text = (ref or {}).get("reference") or ""
        if text.startswith(f"{kind}/"):
            out.append(text[len(kind) + 1:][:64])
    return list(dict.fromkeys(out))[:20]


def _first_code(concept) -> str | None:
    for coding in (concept or {}).get("coding") or []:
        if coding.get("code"):
            return str(coding["code"])[:64]
    return None


def _time(value) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


@dataclass
class Mapped:
    name: str | None  # None: nothing to record for this status
    occurred_at: datetime | None
    properties: dict
    resource_key: str
    state_hash: str | None = None


def map_resource(session: Session, org_id: str, resource: dict) -> Mapped:
    rtype, rid = resource["resourceType"], resource["id"]
    status = resource.get("status")
    key = f"{rtype}/{rid}"
    props: dict = {"source": "fhir", "resource_type": rtype, "status": status}
    updated = _time((resource.get("meta") or {}).get("lastUpdated"))
    if rtype == "Appointment":
        props["appointment_id"] = rid[:64]
        start, end = _time(resource.get("start")), _time(resource.get("end"))
        if start:
            props["start"] = _iso(start)
        if end:
            props["end"] = _iso(end)
        if resource.get("minutesDuration"):
            props["duration"], props["duration_units"] = resource["minutesDuration"], "min"
        atype = _first_code(resource.get("appointmentType"))
        if atype:
            props["appointment_type"] = atype
        services = [c for c in (_first_code(s) for s in resource.get("serviceType") or []) if c]
        if services:
            props["service_codes"] = services[:20]
        reasons = [c for c in (_first_code(s) for s in resource.get("reasonCode") or []) if c]
        if reasons:
            props["reason_code"] = reasons[0]
        actors = [p.get("actor") for p in resource.get("participant") or []]
        providers = _ref_ids(actors, "Practitioner") + _ref_ids(actors, "PractitionerRole")
        if providers:
            props["provider_ids"] = providers
        locations = _ref_ids(actors, "Location")
        if locations:
            props["location_ids"] = locations
        state = hashlib.sha256((props.get("start") or "").encode()).hexdigest()
        name = APPOINTMENT_EVENTS.get(status)
        if name == "appointment.booked":
            earlier = session.scalar(select(EhrMessage.state_hash).where(
                EhrMessage.org_id == org_id, EhrMessage.source == SOURCE_FHIR, EhrMessage.resource_key == key,
                EhrMessage.status == "recorded", EhrMessage.event_name.in_(
                    ("appointment.booked", "appointment.rescheduled", "appointment.modified")))
                .order_by(EhrMessage.received_at.desc()).limit(1))
            if earlier is not None:
                name = "appointment.rescheduled" if earlier != state else "appointment.modified"
        if name == "appointment.booked" and not start:
            raise FhirProblem(422, "required", "A booked Appointment needs its start.", "Appointment.start")
        return Mapped(name, updated, props, key, state)
    # Encounter
    props["encounter_id"] = rid[:64]
    klass = (resource.get("class") or {}).get("code")
    if klass:
        props["encounter_class"] = str(klass)[:16]
    start, end = _period(resource.get("period"))
    if start:
        props["start"] = _iso(start)
    if end:
        props["end"] = _iso(end)
    etype = next((c for c in (_first_code(t) for t in resource.get("type") or []) if c), None)
    if etype:
        props["encounter_type"] = etype
    service_type = _first_code(resource.get("serviceType"))
    if service_type:
        props["service_type"] = service_type
    providers = _ref_ids([p.get("individual") for p in resource.get("participant") or []], "Practitioner")
    if providers:
        props["provider_ids"] = providers
    locations = _ref_ids([loc.get("location") for loc in resource.get("location") or []], "Location")
    if locations:
        props["location_ids"] = locations
    inpatient = klass in INPATIENT_CLASSES
    name = None
    occurred = updated
    if status in ACTIVE_ENCOUNTER:
        name = "patient.admitted" if inpatient else "patient.registered"
        occurred = start or updated
    elif status == "finished":
        name = "patient.discharged" if inpatient else "visit.completed"
        occurred = end or updated
    return Mapped(name, occurred, props, key)


def _period(period) -> tuple[datetime | None, datetime | None]:
    period = period or {}
    return _time(period.get("start")), _time(period.get("end"))


# --------------------------------------------------------------------------- processing


def ingest(session: Session, org_id: str, resource, *, expected: str | None, actor_id: str | None,
           where: str = "") -> Outcome:
    """Validate, match and record one resource in the caller's transaction. Validation failures
    raise :class:`FhirProblem` (nothing stored: the caller has the resource); a resource that is
    valid but cannot be recorded (no such patient, another organization's) is kept in the error
    queue and answered 422 naming the element."""
    raw = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False) \
        if isinstance(resource, dict) else ""
    if len(raw.encode()) > MAX_RESOURCE_BYTES:
        raise FhirProblem(413, "too-costly", f"A resource is at most {MAX_RESOURCE_BYTES} bytes.", where or None)
    resource = check_resource(resource, expected, where)
    content_hash = hashlib.sha256(raw.encode()).hexdigest()
    cid = control_id(resource, content_hash)
    row = service.find_message(session, org_id, SOURCE_FHIR, cid)
    if row is not None and row.status in ("recorded", "ignored"):
        if row.content_hash == content_hash:
            return Outcome("AA", "replayed", org_id, row.id, row.event_id, row.event_name, row.contact_id)
        raise FhirProblem(409, "duplicate", f"{resource['resourceType']} {resource['id']} version "
                          "was already received with other content; give it a new meta.versionId.",
                          f"{where or resource['resourceType']}.meta.versionId", reason_code="duplicate_version")
    return process(session, org_id, resource, raw, content_hash, cid, row, actor_id=actor_id)


def process(session: Session, org_id: str, resource: dict, raw: str, content_hash: str, cid: str,
            row: EhrMessage | None, *, actor_id: str | None) -> Outcome:
    rtype = resource["resourceType"]
    try:
        mapped = map_resource(session, org_id, resource)
    except FhirProblem as problem:
        kept = service._store(session, org_id, row, source=SOURCE_FHIR, connection_id=actor_id, control_id=cid,
                              content_hash=content_hash, message_type=rtype, status="error", ack_code="AE", raw=raw,
                              reason_code=problem.reason_code, reason=problem.text, error_field=problem.expression)
        return Outcome("AE", "error", org_id, kept.id, reason_code=problem.reason_code, text=problem.text,
                       field=problem.expression)
    if mapped.name is None:
        kept = service._store(session, org_id, row, source=SOURCE_FHIR, connection_id=actor_id, control_id=cid,
                              content_hash=content_hash, message_type=rtype, status="ignored", ack_code="AA",
                              resource_key=mapped.resource_key, state_hash=mapped.state_hash)
        return Outcome("AA", "ignored", org_id, kept.id, text=f"Nothing to record for status {resource.get('status')}.")
    try:
        contact_id = match_patient(session, org_id, resource)
        message_id = row.id if row is not None else service.new_id()
        event_id, _ = service.record(session, org_id, name=mapped.name, contact_id=contact_id,
                                     occurred_at=mapped.occurred_at,
                                     properties={**mapped.properties, "ehr_message_id": message_id},
                                     idempotency_key=f"{SOURCE_FHIR}:{cid}", request_hash=content_hash,
                                     created_by=actor_id, field=f"{rtype}.meta")
    except (PatientNotMatched, EventRefused) as miss:
        kept = service._store(session, org_id, row, source=SOURCE_FHIR, connection_id=actor_id, control_id=cid,
                              content_hash=content_hash, message_type=rtype, status="error", ack_code="AE", raw=raw,
                              reason_code=miss.reason_code, reason=miss.text, error_field=miss.field,
                              event_name=mapped.name)
        return Outcome("AE", "error", org_id, kept.id, event_name=mapped.name, reason_code=miss.reason_code,
                       text=miss.text, field=miss.field)
    if row is None:
        row = EhrMessage(id=message_id, org_id=org_id, source=SOURCE_FHIR, control_id=cid, attempts=0)
        session.add(row)
    kept = service._store(session, org_id, row, source=SOURCE_FHIR, connection_id=actor_id, control_id=cid,
                          content_hash=content_hash, message_type=rtype, status="recorded", ack_code="AA",
                          event_name=mapped.name, contact_id=contact_id, event_id=event_id,
                          resource_key=mapped.resource_key, state_hash=mapped.state_hash)
    return Outcome("AA", "recorded", org_id, kept.id, event_id, mapped.name, contact_id, created=True)


def retry(session: Session, org_id: str, row: EhrMessage, raw: str) -> Outcome:
    resource = json.loads(raw)
    if isinstance(resource, dict) and "id_only" in resource and "resourceType" not in resource:
        from carepost.ehr import fhir_fetch

        fhir_fetch.requeue(session, row)  # a failed read-back: read it again, in the worker
        return Outcome("AA", "queued", org_id, row.id, reason_code="id_only_queued", text=row.reason)
    return process(session, org_id, resource, raw, row.content_hash, row.control_id, row, actor_id=row.connection_id)


# --------------------------------------------------------------------------- notifications


NOTIFICATION_SKIP = {"SubscriptionStatus", "Parameters", "Patient", "Practitioner", "Location", "PractitionerRole"}
BUNDLE_TYPES = ("history", "subscription-notification", "collection", "batch", "transaction", "message", "searchset")
NOTIFICATION_TYPES = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")
NOTHING_TO_RECORD = ("handshake", "heartbeat", "query-status")
ID_ONLY_REASON = ("An id-only notification: the EHR sent the resource's id, not the resource. CarePost does not "
                  "fetch it: no FHIR server is set for this organization, so no event was recorded; set one (PUT "
                  "/api/v1/ehr/fhir-server), set the Subscription's payload content to full-resource, or post the "
                  "resource to /api/v1/fhir/{type}.")
ID_ONLY_QUEUED = "Queued to be read from the organization's FHIR server."
_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})"
                        r"(?:/_history/([A-Za-z0-9\-.]{1,64}))?/?$")


@dataclass
class Notification:
    """A Subscription notification Bundle as CarePost reads it.

    ``type`` is the status entry's notification type (``event-notification`` when the Bundle
    holds no status entry: a plain collection of resources); ``full`` the entries that carry a
    resource; ``ids`` the references of an ``id-only`` notification (entries with a ``fullUrl``
    or ``request.url`` but no resource, and focus references of notification events whose
    resource is not in the Bundle) as ``(expression, type, id, version, event number)``."""

    type: str
    subscription: str | None
    full: list[tuple[int, dict]]
    ids: list[tuple[str, str, str, str | None, str | None]]
    events_in_status: int


def _parameters(resource: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for param in resource.get("parameter") or []:
        if isinstance(param, dict) and isinstance(param.get("name"), str):
            out.setdefault(param["name"], []).append(param)
    return out


def _value(param: dict):
    return next((v for k, v in param.items() if k.startswith("value")), None)


def _status_of(resource: dict, where: str) -> tuple[str, str | None, list[tuple[str | None, str | None, str]]]:
    """(notification type, subscription reference, [(event number, focus reference, expression)])
    of an R4B/R5 ``SubscriptionStatus`` or an R4 backport ``Parameters`` status."""
    if resource["resourceType"] == "SubscriptionStatus":
        ntype = resource.get("type") or resource.get("notificationType")
        type_at = f"{where}.type"
        subscription = (resource.get("subscription") or {}).get("reference")
        events = []
        for k, event in enumerate(resource.get("notificationEvent") or []):
            if not isinstance(event, dict):
                raise FhirProblem(422, "structure", "notificationEvent is a list of objects.",
                                  f"{where}.notificationEvent[{k}]")
            focus = (event.get("focus") or {}).get("reference")
            events.append((str(event.get("eventNumber") or "") or None, focus,
                           f"{where}.notificationEvent[{k}].focus"))
    else:
        params = _parameters(resource)
        ntype = _value(params["type"][0]) if params.get("type") else None
        type_at = f"{where}.parameter.where(name='type').value"
        subscription = (_value(params["subscription"][0]) or {}).get("reference") if params.get("subscription") else None
        events = []
        for k, event in enumerate(params.get("notification-event") or []):
            parts = {p.get("name"): _value(p) for p in event.get("part") or [] if isinstance(p, dict)}
            focus = (parts.get("focus") or {}).get("reference") if isinstance(parts.get("focus"), dict) else None
            events.append((str(parts.get("event-number") or "") or None, focus,
                           f"{where}.parameter.where(name='notification-event')[{k}].part.where(name='focus')"))
    if ntype not in NOTIFICATION_TYPES:
        raise FhirProblem(422, "code-invalid", f"The notification type is one of {', '.join(NOTIFICATION_TYPES)}.",
                          type_at)
    return ntype, subscription if isinstance(subscription, str) else None, events


def _split_reference(text: str) -> tuple[str, str, str | None] | None:
    match = _REFERENCE.search(text.split("?", 1)[0]) if isinstance(text, str) else None
    return (match.group(1), match.group(2), match.group(3)) if match else None


def read_notification(bundle) -> Notification:
    """Read a Subscription rest-hook notification (R4 backport: Bundle ``history`` whose first
    entry is a ``Parameters`` status; R4B: a ``SubscriptionStatus``; R5: Bundle
    ``subscription-notification``) or any Bundle of full resources. Raises :class:`FhirProblem`
    naming the element."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirProblem(422, "structure", "A notification is a FHIR Bundle.", "Bundle.resourceType")
    if bundle.get("type") not in BUNDLE_TYPES:
        raise FhirProblem(422, "value", "Bundle.type is history (a Subscription notification), "
                          "subscription-notification, collection, batch or transaction.", "Bundle.type")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise FhirProblem(422, "structure", "Bundle.entry is a list.", "Bundle.entry")
    ntype, subscription, events = "event-notification", None, []
    full: list[tuple[int, dict]] = []
    bare: list[tuple[int, str]] = []
    status_seen = False
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FhirProblem(422, "structure", "Each Bundle.entry is an object.", f"Bundle.entry[{i}]")
        resource = entry.get("resource")
        if resource is not None and not isinstance(resource, dict):
            raise FhirProblem(422, "structure", "Bundle.entry.resource is a FHIR resource (an object).",
                              f"Bundle.entry[{i}].resource")
        if resource is None:
            request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
            urls = [u for u in (entry.get("fullUrl"), request.get("url")) if isinstance(u, str) and u]
            if urls:
                bare.append((i, next((u for u in urls if _split_reference(u)), urls[0])))
            continue
        rtype = resource.get("resourceType")
        is_status = rtype == "SubscriptionStatus" or (rtype == "Parameters" and "type" in _parameters(resource)
                                                       and i == 0)
        if is_status and not status_seen:
            status_seen = True
            ntype, subscription, events = _status_of(resource, f"Bundle.entry[{i}].resource")
            continue
        if rtype in NOTIFICATION_SKIP:
            continue
        full.append((i, resource))
    ids: list[tuple[str, str, str, str | None, str | None]] = []
    seen: set[tuple[str, str]] = {(r.get("resourceType"), r.get("id")) for _, r in full}
    numbers = {}
    for number, focus, _ in events:
        parts = _split_reference(focus or "")
        if parts and number:
            numbers.setdefault(parts[:2], number)
    for i, url in bare:
        parts = _split_reference(url)
        if parts is None:
            raise FhirProblem(422, "value", "An entry without a resource names one by its fullUrl or request.url "
                              "(<type>/<id>).", f"Bundle.entry[{i}].fullUrl")
        if parts[:2] not in seen:
            seen.add(parts[:2])
            ids.append((f"Bundle.entry[{i}].fullUrl", *parts, numbers.get(parts[:2])))
    for number, focus, where in events:
        parts = _split_reference(focus or "")
        if focus and parts is None:
            raise FhirProblem(422, "value", "A notification event's focus is a reference <type>/<id>.", where)
        if parts and parts[:2] not in seen:
            seen.add(parts[:2])
            ids.append((where, *parts, number))
    return Notification(ntype, subscription, full, ids, len(events))


def _subscription_key(subscription: str | None) -> str:
    parts = _split_reference(subscription or "")
    return parts[1] if parts else hashlib.sha256((subscription or "").encode()).hexdigest()[:16]


def record_id_only(session: Session, org_id: str, note: Notification, item, *, actor_id: str | None) -> Outcome:
    """Keep the arrival of an id-only reference (status ``ignored``, reason ``id_only``), once per
    resource version or notification event number: ids only, nothing to retry, no event."""
    _where, rtype, rid, version, number = item
    if rtype not in RESOURCE_TYPES:
        return Outcome("AA", "ignored", org_id, None, text=f"{rtype} is not Appointment or Encounter: nothing to "
                       "record.")
    key = f"{rtype}/{rid}" + (f"/_history/{version}" if version else "")
    cid = f"id-only:{key}" + (f"@{_subscription_key(note.subscription)}#{number}" if number else "")
    cid = cid[:199]
    content_hash = hashlib.sha256(cid.encode()).hexdigest()
    row = service.find_message(session, org_id, SOURCE_FHIR, cid)
    if row is not None:
        return Outcome("AA", "replayed", org_id, row.id, text="id_only")
    from carepost.ehr import fhir_fetch

    if fhir_fetch.get_server(session, org_id) is not None:
        kept = service._store(session, org_id, None, source=SOURCE_FHIR, connection_id=actor_id, control_id=cid,
                              content_hash=content_hash, message_type=rtype, status="queued", ack_code="AA",
                              reason_code="id_only_queued", reason=ID_ONLY_QUEUED, resource_key=f"{rtype}/{rid}"[:200])
        kept.next_attempt_at = clock.now()
        fhir_fetch.fetch_after_commit(session, org_id, kept.id)
        return Outcome("AA", "queued", org_id, kept.id, reason_code="id_only_queued", text=ID_ONLY_QUEUED)
    kept = service._store(session, org_id, None, source=SOURCE_FHIR, connection_id=actor_id, control_id=cid,
                          content_hash=content_hash, message_type=rtype, status="ignored", ack_code="AA",
                          reason_code="id_only", reason=ID_ONLY_REASON.format(type=rtype),
                          resource_key=f"{rtype}/{rid}"[:200])
    return Outcome("AA", "ignored", org_id, kept.id, reason_code="id_only",
                   text=ID_ONLY_REASON.format(type=rtype))


def as_problem(exc: ValidationFailed) -> FhirProblem:
    return FhirProblem(422, "invalid", exc.message, exc.field)
