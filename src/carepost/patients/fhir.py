"""FHIR R4 import: Bundles (collection, transaction, batch, searchset, as Synthea and EHR exports
write them) and bulk-data NDJSON, streamed — the file is never loaded whole.

The path of a file:

1. **Read patients first.** A first pass over the file takes only ``Patient`` resources, so
   clinical resources can reference a patient that appears later in the file. Each patient is
   saved in its own savepoint: a failure leaves no half-written contact.
2. **Read everything else.** A second pass maps clinical resources in batches: validate with the
   R4 models of ``fhir.resources.R4B``, map to CarePost's tables, resolve the patient reference
   (``urn:uuid:``, ``Patient/id``, absolute URLs, conditional ``Patient?identifier=system|value``),
   upsert by the blind index of the source resource, commit the batch.
3. **Report.** Types CarePost does not map are counted and skipped without validation; a
   resource that fails goes to the import's error report with its type/id and the reason (never
   a value); everything valid is kept.

Narratives (``Resource.text``), notes and attachments are never mapped, so never stored.
"""

from __future__ import annotations

import abc

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import IO, Any

import ijson
from pydantic import ValidationError
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import CarePostError
from carepost.core.ids import new_id
from carepost.core.logging import get_logger, scrub_text
from carepost.patients import service
from carepost.patients.models import (
    Appointment,
    CarePlan,
    ClinicalFact,
    Condition,
    Contact,
    ContactIdentifier,
    Coverage,
    Encounter,
    Immunization,
    Medication,
    Observation,
    Procedure,
)

log = get_logger("carepost.patients.fhir")

MAPPED_TYPES = (
    "Patient", "Condition", "MedicationRequest", "MedicationStatement", "MedicationDispense", "Procedure",
    "Observation", "Immunization", "Encounter", "Appointment", "CarePlan", "Coverage",
)
IMPORTABLE_BUNDLES = ("collection", "transaction", "batch", "searchset", "document", "history")
BATCH_SIZE = 500

# --------------------------------------------------------------------------- reporting


@dataclass
class ImportStats:
    """Counts of one import (kept on the ImportJob as JSON; references and numbers only)."""

    created: int = 0
    updated: int = 0
    failed: int = 0
    skipped: int = 0
    by_type: dict[str, dict[str, int]] = field(default_factory=dict)
    patients: int = 0
    warnings: int = 0  # records kept with a flagged value (not counted in ``failed``)
    identifiers_not_kept: int = 0  # SSN, driver's licence, passport... left out (minimum necessary)
    patients_without_email: int = 0  # of ``patients``: who cannot be emailed until an address is added

    def add(self, rtype: str, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)
        bucket = self.by_type.setdefault(rtype, {})
        bucket[outcome] = bucket.get(outcome, 0) + n

    @property
    def processed(self) -> int:
        return self.created + self.updated + self.failed + self.skipped

    def as_dict(self) -> dict:
        return {"created": self.created, "updated": self.updated, "failed": self.failed, "skipped": self.skipped,
                "warnings": self.warnings, "patients": self.patients, "patients_without_email": self.patients_without_email,
                "identifiers_not_kept": self.identifiers_not_kept,
                "by_type": self.by_type}


class ErrorSink(abc.ABC):
    """Where record errors go (the import's error report). Implemented in ``imports``."""

    @abc.abstractmethod
    def error(self, *, reason: str, line: int | None = None, resource: str | None = None, field: str | None = None) -> None:
        """Record one failed record with its line or resource id and the reason."""

    def warning(self, *, reason: str, line: int | None = None, resource: str | None = None, field: str | None = None) -> None:
        """Record one record kept with a flagged value (an unverified code). Sinks that keep no
        warnings may ignore them."""

    def checkpoint(self, stats: ImportStats) -> None:
        """Called after each committed batch (progress, counts)."""


class FileFailure(CarePostError):
    """The file as a whole cannot be read further (malformed JSON, not a Bundle)."""

    code = "import_failed"


# --------------------------------------------------------------------------- small parsers


def fhir_date(value: Any) -> date | None:
    """FHIR date/dateTime (possibly partial: ``2020``, ``2020-05``) -> date."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) == 4:
            return date(int(value), 1, 1)
        if len(value) == 7:
            return date(int(value[:4]), int(value[5:7]), 1)
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def fhir_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) < 4:
        return None
    if len(value) <= 10:
        d = fhir_date(value)
        return datetime(d.year, d.month, d.day, tzinfo=timezone.utc) if d else None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


_CODE_PATTERNS = {
    "icd10cm": re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$"),
    "loinc": re.compile(r"^(\d{1,7}-\d|LP\d+-\d|LA\d+-\d)$"),
    "snomed": re.compile(r"^\d{6,18}$"),
    "rxnorm": re.compile(r"^\d{1,10}$"),
    "cvx": re.compile(r"^\d{1,3}$"),
}


class MappingError(ValueError):
    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field


def pick_coding(concept: Any, preferred: tuple[str, ...] = service.PREFERRED_SYSTEMS, field: str = "code",
                problems: list[tuple[str, str]] | None = None) -> tuple[str | None, str | None, str | None]:
    """(short system, code, display) of the best coding of a CodeableConcept; codes in a known
    code system must have that system's shape.

    A code that fails the check is still returned when ``problems`` is given, with
    ``(field, reason)`` appended: the record is kept with its code flagged unverified (one bad
    code in a real export must not drop a whole visit) and the import reports a warning.
    Without ``problems`` it raises :class:`MappingError`."""
    if not isinstance(concept, dict):
        return None, None, None
    codings = [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]
    best = None
    for pref in preferred:
        best = next((c for c in codings if service.normalize_code_system(c.get("system")) == pref), None)
        if best:
            break
    best = best or (codings[0] if codings else None)
    if best is None:
        return None, None, _clip(concept.get("text"), 300)
    system = service.normalize_code_system(best.get("system"))
    code = str(best["code"]).strip()
    pattern = _CODE_PATTERNS.get(system or "")
    if pattern and not pattern.match(code):
        reason = f"{field} is not a valid {system} code"
        if problems is None:
            raise MappingError(reason, field)
        problems.append((field, reason + "; the record was kept with the code marked unverified"))
    return system, code[:64], _clip(best.get("display") or concept.get("text"), 300)


def first_code(concept: Any) -> tuple[str | None, str | None]:
    if not isinstance(concept, dict):
        return None, None
    for c in concept.get("coding") or []:
        if isinstance(c, dict) and c.get("code"):
            return str(c["code"]), c.get("display") or concept.get("text")
    return None, concept.get("text")


def _clip(value: Any, n: int) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text[:n] or None


def _period(obj: Any) -> tuple[Any, Any]:
    if isinstance(obj, dict):
        return obj.get("start"), obj.get("end")
    return None, None


# --------------------------------------------------------------------------- references


def patient_ref_key(reference: str | None, base_type: str = "Patient") -> tuple[str, str] | None:
    """Normalize a reference to ``("source", "Patient/id" | "urn:uuid:...")`` or
    ``("conditional", "system|value")``; None when it is not a patient reference."""
    if not reference or not isinstance(reference, str):
        return None
    ref = reference.strip()
    if ref.startswith(("urn:uuid:", "urn:oid:")):
        return "source", ref
    if "?" in ref:
        rtype, _, query = ref.partition("?")
        if rtype.rsplit("/", 1)[-1] != base_type:
            return None
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if key == "identifier" and value:
                from urllib.parse import unquote

                return "conditional", unquote(value)
        return None
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == base_type and parts[-1]:
        return "source", f"{base_type}/{parts[-1]}"
    return None


class PatientResolver:
    """Resolves patient references to contact ids through blind indexes, with a bounded cache."""

    def __init__(self, session: Session, org_id: str, cache_size: int = 20000):
        self.session = session
        self.org_id = org_id
        self.cache: dict[tuple[str, str], str | None] = {}
        self.cache_size = cache_size

    def resolve_many(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        todo = [k for k in keys if k not in self.cache]
        if len(self.cache) + len(todo) > self.cache_size:
            self.cache.clear()
        sources = [k for k in todo if k[0] == "source"]
        if sources:
            idx = {service.source_index(self.session, self.org_id, ref): (kind, ref) for kind, ref in sources}
            found = service.contacts_by_index(self.session, self.org_id, "source", idx.keys())
            for i, key in idx.items():
                self.cache[key] = found.get(i)
        for key in todo:
            if key[0] == "conditional":
                system, sep, value = key[1].partition("|")
                if not sep:
                    system, value = None, key[1]
                ids = service.find_contact_ids(self.session, self.org_id, identifier=value, system=system or None)
                self.cache[key] = ids[0] if len(ids) == 1 else None
        return {k: self.cache.get(k) for k in keys}

    def remember(self, refs: list[str], contact_id: str) -> None:
        for ref in refs:
            key = patient_ref_key(ref)
            if key:
                self.cache[key] = contact_id


# --------------------------------------------------------------------------- Patient -> contact

_MARITAL = {"A": "annulled", "D": "divorced", "I": "interlocutory", "L": "separated", "M": "married", "C": "common_law",
            "P": "polygamous", "T": "domestic_partner", "U": "unmarried", "S": "never_married", "W": "widowed"}
_EXT_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
_EXT_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
_EXT_GENDER_IDENTITY = ("http://hl7.org/fhir/us/core/StructureDefinition/us-core-genderIdentity",
                        "http://hl7.org/fhir/StructureDefinition/individual-genderIdentity",
                        "http://hl7.org/fhir/StructureDefinition/patient-genderIdentity")
_EXT_RELIGION = "http://hl7.org/fhir/StructureDefinition/patient-religion"
_COUNTRIES = {"US": "US", "USA": "US", "UNITED STATES": "US", "UNITED STATES OF AMERICA": "US", "CA": "CA", "CANADA": "CA"}

# Default time zone by US state when the source says none (quiet hours need one).
STATE_TIME_ZONES = {
    **dict.fromkeys(["CT", "DE", "DC", "GA", "ME", "MD", "MA", "MI", "NH", "NJ", "NY", "NC", "OH", "PA", "RI", "SC", "VT",
                     "VA", "WV", "FL", "IN", "KY"], "America/New_York"),
    **dict.fromkeys(["AL", "AR", "IL", "IA", "LA", "MN", "MS", "MO", "OK", "WI", "TX", "KS", "NE", "SD", "ND", "TN"], "America/Chicago"),
    **dict.fromkeys(["CO", "MT", "NM", "UT", "WY", "ID"], "America/Denver"),
    "AZ": "America/Phoenix", "CA": "America/Los_Angeles", "NV": "America/Los_Angeles", "OR": "America/Los_Angeles",
    "WA": "America/Los_Angeles", "AK": "America/Anchorage", "HI": "Pacific/Honolulu", "PR": "America/Puerto_Rico",
}


def _ext(resource: dict, urls: str | tuple[str, ...]) -> dict | None:
    urls = (urls,) if isinstance(urls, str) else urls
    for e in resource.get("extension") or []:
        if isinstance(e, dict) and e.get("url") in urls:
            return e
    return None


def _omb_text(ext: dict | None) -> str | None:
    if not ext:
        return None
    parts = ext.get("extension") or []
    text = next((p.get("valueString") for p in parts if p.get("url") == "text" and p.get("valueString")), None)
    if text:
        return _clip(text, 64)
    displays = [p["valueCoding"].get("display") or p["valueCoding"].get("code") for p in parts
                if p.get("url") == "ombCategory" and isinstance(p.get("valueCoding"), dict)]
    return _clip(", ".join(d for d in displays if d), 64)


def map_patient(resource: dict) -> dict:
    """A Patient as ``save_contact`` input (identifiers as specs; nothing from the narrative)."""
    out: dict[str, Any] = {}
    names = [n for n in resource.get("name") or [] if isinstance(n, dict)]
    name = next((n for n in names if n.get("use") == "official"), None) or next((n for n in names if n.get("use") in (None, "usual")), None) or (names[0] if names else None)
    if name:
        given = [g for g in name.get("given") or [] if g]
        out["given_name"] = _clip(given[0], 200) if given else None
        out["middle_name"] = _clip(" ".join(given[1:]), 200) if len(given) > 1 else None
        out["family_name"] = _clip(name.get("family"), 200)
        out["name_prefix"] = _clip((name.get("prefix") or [None])[0], 40)
        out["name_suffix"] = _clip((name.get("suffix") or [None])[0], 40)
    emails, phones = [], []
    for t in resource.get("telecom") or []:
        if not isinstance(t, dict) or not t.get("value"):
            continue
        if t.get("system") == "email":
            emails.append(str(t["value"]).strip())
        elif t.get("system") in ("phone", "sms"):
            phones.append({"value": str(t["value"]).strip(), "use": t.get("use")})
    if emails:
        out["emails"] = emails
    if phones:
        out["phones"] = phones
    addresses = [a for a in resource.get("address") or [] if isinstance(a, dict)]
    address = next((a for a in addresses if a.get("use") == "home"), None) or (addresses[0] if addresses else None)
    if address:
        lines = [ln for ln in address.get("line") or [] if ln]
        out["address_line1"] = _clip(lines[0], 200) if lines else None
        out["address_line2"] = _clip(", ".join(lines[1:]), 200) if len(lines) > 1 else None
        out["city"] = _clip(address.get("city"), 100)
        out["state"] = _clip(address.get("state"), 50)
        out["postal_code"] = _clip(address.get("postalCode"), 16)
        country = (address.get("country") or "").strip().upper()
        out["country"] = _COUNTRIES.get(country, country if len(country) == 2 else None) if country else None
    if resource.get("birthDate"):
        out["birth_date"] = fhir_date(resource["birthDate"])
    if resource.get("gender") in ("female", "male", "other", "unknown"):
        out["sex"] = resource["gender"]
    if resource.get("deceasedBoolean") is not None or resource.get("deceasedDateTime"):
        out["deceased"] = bool(resource.get("deceasedBoolean") or resource.get("deceasedDateTime"))
    marital = first_code(resource.get("maritalStatus"))[0]
    if marital:
        out["marital_status"] = _MARITAL.get(marital, marital[:32])
    comms = [c for c in resource.get("communication") or [] if isinstance(c, dict)]
    comm = next((c for c in comms if c.get("preferred")), None) or (comms[0] if comms else None)
    if comm:
        lang = first_code(comm.get("language"))[0]
        if lang:
            out["preferred_language"] = lang[:35]
    race = _omb_text(_ext(resource, _EXT_RACE))
    if race:
        out["race"] = race
    ethnicity = _omb_text(_ext(resource, _EXT_ETHNICITY))
    if ethnicity:
        out["ethnicity"] = ethnicity
    gi = _ext(resource, _EXT_GENDER_IDENTITY)
    if gi:
        code, display = first_code(gi.get("valueCodeableConcept"))
        out["gender_identity"] = _clip(display or code, 64)
    rel = _ext(resource, _EXT_RELIGION)
    if rel:
        code, display = first_code(rel.get("valueCodeableConcept"))
        out["religion"] = _clip(display or code, 64)
    state = (out.get("state") or "").upper()
    if state in STATE_TIME_ZONES and (out.get("country") in (None, "US")):
        out["time_zone"] = STATE_TIME_ZONES[state]
    identifiers = []
    seen_systems = set()
    for ident in resource.get("identifier") or []:
        if not isinstance(ident, dict) or not ident.get("value"):
            continue
        system = (ident.get("system") or "urn:carepost:unspecified").strip()[:255]
        if system in seen_systems:
            continue
        seen_systems.add(system)
        type_code = first_code(ident.get("type"))[0]
        identifiers.append({"system": system, "value": str(ident["value"]).strip()[:200], "type": (type_code or None) and type_code[:20]})
    if identifiers:
        out["identifiers"] = identifiers[:20]
    return out


# --------------------------------------------------------------------------- clinical resources


@dataclass
class MappedFact:
    model: type[ClinicalFact]
    values: dict
    patient_refs: list[str]
    source_ref: str
    member_id: tuple[str, str] | None = None  # Coverage.subscriberId -> (system, value)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (field, reason): kept, code unverified

    def __post_init__(self) -> None:
        self.values.setdefault("code_verified", not self.warnings)


def _subject(resource: dict, key: str = "subject") -> list[str]:
    ref = resource.get(key)
    return [ref["reference"]] if isinstance(ref, dict) and ref.get("reference") else []


def map_condition(r: dict) -> list[MappedFact]:
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding(r.get("code"), ("icd10cm", "snomed", "icd10"), problems=problems)
    onset = r.get("onsetDateTime") or _period(r.get("onsetPeriod"))[0]
    abatement = r.get("abatementDateTime") or _period(r.get("abatementPeriod"))[0]
    category = first_code((r.get("category") or [None])[0])[0]
    return [MappedFact(Condition, {
        "code_system": system, "code": code, "display": display,
        "status": first_code(r.get("clinicalStatus"))[0],
        "verification_status": first_code(r.get("verificationStatus"))[0],
        "category": category and category[:64],
        "onset_date": fhir_date(onset), "abatement_date": fhir_date(abatement), "recorded_date": fhir_date(r.get("recordedDate")),
    }, _subject(r), "", warnings=problems)]


_SUPPLY_DAYS = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7, "mo": 30, "month": 30, "months": 30, "a": 365}


def _days(duration: Any) -> int | None:
    if not isinstance(duration, dict) or duration.get("value") is None:
        return None
    unit = (duration.get("code") or duration.get("unit") or "d").lower()
    factor = _SUPPLY_DAYS.get(unit)
    return int(round(float(duration["value"]) * factor)) if factor else None


def map_medication_request(r: dict) -> list[MappedFact]:
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding(r.get("medicationCodeableConcept"), ("rxnorm", "ndc", "snomed"), "medicationCodeableConcept", problems)
    if code is None and isinstance(r.get("medicationReference"), dict):
        display = _clip(r["medicationReference"].get("display"), 300)
    dispense = r.get("dispenseRequest") or {}
    days = _days(dispense.get("expectedSupplyDuration"))
    authored = fhir_date(r.get("authoredOn"))
    start, end = _period(dispense.get("validityPeriod"))
    status = r.get("status")
    return [MappedFact(Medication, {
        "code_system": system, "code": code, "display": display, "status": status,
        "source_type": "MedicationRequest", "intent": r.get("intent"), "authored_on": authored,
        "start_date": fhir_date(start) or authored, "end_date": fhir_date(end), "days_supply": days,
        "refills_allowed": dispense.get("numberOfRepeatsAllowed"),
        "next_refill_due": service.next_refill_due(authored, days) if status == "active" else None,
    }, _subject(r), "", warnings=problems)]


def map_medication_statement(r: dict) -> list[MappedFact]:
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding(r.get("medicationCodeableConcept"), ("rxnorm", "ndc", "snomed"), "medicationCodeableConcept", problems)
    start, end = _period(r.get("effectivePeriod"))
    start = start or r.get("effectiveDateTime")
    return [MappedFact(Medication, {
        "code_system": system, "code": code, "display": display, "status": r.get("status"),
        "source_type": "MedicationStatement", "start_date": fhir_date(start), "end_date": fhir_date(end),
        "authored_on": fhir_date(r.get("dateAsserted")),
    }, _subject(r), "", warnings=problems)]


def map_medication_dispense(r: dict) -> list[MappedFact]:
    """A fill: kept as a medication row of its own (last fill, supply, next refill due)."""
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding(r.get("medicationCodeableConcept"), ("rxnorm", "ndc", "snomed"), "medicationCodeableConcept", problems)
    filled = fhir_date(r.get("whenHandedOver") or r.get("whenPrepared"))
    days = _days(r.get("daysSupply"))
    return [MappedFact(Medication, {
        "code_system": system, "code": code, "display": display, "status": "active" if r.get("status") == "completed" else r.get("status"),
        "source_type": "MedicationDispense", "last_fill_date": filled, "days_supply": days,
        "next_refill_due": service.next_refill_due(filled, days),
    }, _subject(r), "", warnings=problems)]


def map_procedure(r: dict) -> list[MappedFact]:
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding(r.get("code"), ("snomed", "cpt", "icd10pcs"), problems=problems)
    start, end = _period(r.get("performedPeriod"))
    start = start or r.get("performedDateTime")
    return [MappedFact(Procedure, {
        "code_system": system, "code": code, "display": display, "status": r.get("status"),
        "performed_start": fhir_datetime(start), "performed_end": fhir_datetime(end),
    }, _subject(r), "", warnings=problems)]


def _obs_value(holder: dict) -> dict:
    out: dict[str, Any] = {}
    q = holder.get("valueQuantity")
    if isinstance(q, dict) and q.get("value") is not None:
        out["value_quantity"] = float(q["value"])
        out["value_unit"] = _clip(q.get("unit") or q.get("code"), 40)
    cc = holder.get("valueCodeableConcept")
    if isinstance(cc, dict):
        code, display = first_code(cc)
        out["value_code"] = code and code[:64]
        out["value_display"] = _clip(display, 200)
    if holder.get("valueBoolean") is not None:
        out["value_display"] = "true" if holder["valueBoolean"] else "false"
    if holder.get("valueInteger") is not None:
        out["value_quantity"] = float(holder["valueInteger"])
    # valueString is free text and may carry PHI: not stored.
    return out


def map_observation(r: dict) -> list[MappedFact]:
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding(r.get("code"), ("loinc", "snomed"), problems=problems)
    effective = r.get("effectiveDateTime") or r.get("effectiveInstant") or _period(r.get("effectivePeriod"))[0]
    category = None
    for cat in r.get("category") or []:
        category = first_code(cat)[0]
        if category:
            break
    interpretation = first_code((r.get("interpretation") or [None])[0])[0]
    base = {"status": r.get("status"), "category": category and category[:40], "effective_at": fhir_datetime(effective),
            "interpretation": interpretation and interpretation[:20]}
    facts = [MappedFact(Observation, {**base, "code_system": system, "code": code, "display": display, **_obs_value(r)}, _subject(r), "", warnings=problems)]
    for i, comp in enumerate(r.get("component") or []):
        if not isinstance(comp, dict):
            continue
        comp_problems: list[tuple[str, str]] = []
        csys, ccode, cdisp = pick_coding(comp.get("code"), ("loinc", "snomed"), f"component.{i}.code", comp_problems)
        value = _obs_value(comp)
        if ccode and value:
            facts.append(MappedFact(Observation, {**base, "code_system": csys, "code": ccode, "display": cdisp, **value}, _subject(r), f"#component{i}",
                                     warnings=comp_problems))
    return facts


def map_immunization(r: dict) -> list[MappedFact]:
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding(r.get("vaccineCode"), ("cvx", "snomed", "ndc"), "vaccineCode", problems)
    return [MappedFact(Immunization, {
        "code_system": system, "code": code, "display": display, "status": r.get("status"),
        "occurrence_date": fhir_date(r.get("occurrenceDateTime")),
    }, _subject(r, "patient"), "", warnings=problems)]


_INPATIENT = {"IMP", "ACUTE", "NONAC"}


def map_encounter(r: dict) -> list[MappedFact]:
    klass = r.get("class") if isinstance(r.get("class"), dict) else {}
    class_code = (klass.get("code") or "").upper() or None
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding((r.get("type") or [None])[0], ("snomed", "cpt"), "type", problems)
    start, end = _period(r.get("period"))
    hosp = r.get("hospitalization") or {}
    disposition = first_code(hosp.get("dischargeDisposition"))[0]
    return [MappedFact(Encounter, {
        "code_system": system, "code": code, "display": display, "status": r.get("status"),
        "class_code": class_code and class_code[:20], "start_at": fhir_datetime(start), "end_at": fhir_datetime(end),
        "is_hospitalization": class_code in _INPATIENT or bool(hosp.get("admitSource")),
        "discharge_disposition": disposition and disposition[:40],
    }, _subject(r), "", warnings=problems)]


def map_appointment(r: dict) -> list[MappedFact]:
    refs = [p["actor"]["reference"] for p in r.get("participant") or []
            if isinstance(p, dict) and isinstance(p.get("actor"), dict) and p["actor"].get("reference")]
    concept = (r.get("serviceType") or [None])[0] or r.get("appointmentType")
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding(concept, ("snomed", "cpt"), "serviceType", problems)
    return [MappedFact(Appointment, {
        "code_system": system, "code": code, "display": display, "status": r.get("status"),
        "start_at": fhir_datetime(r.get("start")), "end_at": fhir_datetime(r.get("end")),
        "minutes_duration": r.get("minutesDuration"),
    }, refs, "", warnings=problems)]


def map_care_plan(r: dict) -> list[MappedFact]:
    problems: list[tuple[str, str]] = []
    system, code, display = pick_coding((r.get("category") or [None])[0], ("snomed",), "category", problems)
    start, end = _period(r.get("period"))
    return [MappedFact(CarePlan, {
        "code_system": system, "code": code, "display": display, "status": r.get("status"), "intent": r.get("intent"),
        "period_start": fhir_date(start), "period_end": fhir_date(end),
    }, _subject(r), "", warnings=problems)]


def map_coverage(r: dict) -> list[MappedFact]:
    code, display = first_code(r.get("type"))
    plan = next((c.get("name") or c.get("value") for c in r.get("class") or []
                 if isinstance(c, dict) and first_code(c.get("type"))[0] == "plan"), None)
    payor = next((p.get("display") for p in r.get("payor") or [] if isinstance(p, dict) and p.get("display")), None)
    start, end = _period(r.get("period"))
    member = None
    if r.get("subscriberId"):
        member = ("urn:carepost:member-id:" + (payor or "unknown"))[:255], str(r["subscriberId"])[:200]
    return [MappedFact(Coverage, {
        "code_system": None, "code": code and code[:64], "display": _clip(display, 300), "status": r.get("status"),
        "plan_name": _clip(plan, 200), "payor_name": _clip(payor, 200),
        "period_start": fhir_date(start), "period_end": fhir_date(end),
    }, _subject(r, "beneficiary"), "", member)]


MAPPERS: dict[str, Callable[[dict], list[MappedFact]]] = {
    "Condition": map_condition,
    "MedicationRequest": map_medication_request,
    "MedicationStatement": map_medication_statement,
    "MedicationDispense": map_medication_dispense,
    "Procedure": map_procedure,
    "Observation": map_observation,
    "Immunization": map_immunization,
    "Encounter": map_encounter,
    "Appointment": map_appointment,
    "CarePlan": map_care_plan,
    "Coverage": map_coverage,
}


# --------------------------------------------------------------------------- validation


_MODEL_CACHE: dict[str, Any] = {}


def _model_class(rtype: str):
    if rtype not in _MODEL_CACHE:
        from fhir.resources.R4B import get_fhir_model_class

        _MODEL_CACHE[rtype] = get_fhir_model_class(rtype)
    return _MODEL_CACHE[rtype]


def validate_resource(resource: dict) -> None:
    """Validate with the R4 (R4B) model; raises MappingError naming the first bad element."""
    try:
        _model_class(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")) or resource["resourceType"]
        raise MappingError(f"{where}: {scrub_text(str(err.get('msg', 'invalid')))[:300]}", where) from None


def strip_clear_text(resource: dict) -> dict:
    """Drop the narrative and attachments before anything else touches the resource."""
    resource.pop("text", None)
    resource.pop("contained", None)
    if resource.get("resourceType") == "Patient":
        resource.pop("photo", None)
    return resource


# --------------------------------------------------------------------------- the importer

_NEW = object()  # marks a source key inserted earlier in the same batch
_COLUMNS: dict[type, dict[str, Any]] = {}


def _fact_columns(model: type[ClinicalFact]) -> dict[str, Any]:
    """Every column of a fact table with its scalar default (a multi-row INSERT needs the same
    keys in every row)."""
    if model not in _COLUMNS:
        _COLUMNS[model] = {
            c.key: (c.default.arg if c.default is not None and c.default.is_scalar else None) for c in model.__table__.columns
        }
    return _COLUMNS[model]


@dataclass
class _Pending:
    where: dict
    rtype: str
    source_ref: str
    fact: MappedFact


class FhirImporter:
    """Imports FHIR resources for one organization. Commits after every batch (documented: a
    long import must not hold SQLite's write lock for its whole duration, and progress must be
    visible to the status endpoint)."""

    def __init__(self, session: Session, org_id: str, import_id: str, sink: ErrorSink, *, batch_size: int = BATCH_SIZE,
                 validate: bool = True):
        self.session = session
        self.org_id = org_id
        self.import_id = import_id
        self.sink = sink
        self.batch_size = batch_size
        self.validate = validate
        self.stats = ImportStats()
        self.resolver = PatientResolver(session, org_id)
        self._pending: list[_Pending] = []
        self._since_commit = 0
        self._touched_stage: set[str] = set()
        self._coverage_updates: dict[str, tuple[str | None, str | None]] = {}
        self._member_ids: list[tuple[str, str, str]] = []

    # -- entry points

    def import_json(self, opener: Callable[[], IO[bytes]]) -> ImportStats:
        """A JSON document: a Bundle (streamed, two passes) or a single resource."""
        with opener() as f:
            top = _top_level(f)
        if top.get("resourceType") != "Bundle":
            with opener() as f:
                try:
                    resource = json.load(f)
                except (ValueError, UnicodeDecodeError):
                    raise FileFailure("The file is not valid JSON.", field="file") from None
            if not isinstance(resource, dict) or not resource.get("resourceType"):
                raise FileFailure("Expected a FHIR Bundle or resource: the JSON has no resourceType.", field="file")
            self._run_entries([({"entry": 1}, {"resource": resource})], patients=True)
            self._run_entries([({"entry": 1}, {"resource": resource})], patients=False)
            return self.finish()
        if top.get("type") not in IMPORTABLE_BUNDLES:
            raise FileFailure(f"Bundle type {str(top.get('type'))[:30]!r} cannot be imported; expected one of "
                              + ", ".join(IMPORTABLE_BUNDLES) + ".", field="type")
        self.json_failure = False
        for patients in (True, False):
            with opener() as f:
                self._run_entries(_bundle_entries(f), patients=patients)
        self.finish()
        if self.json_failure:
            raise FileFailure(f"The file is not valid JSON after entry {self._last_entry_seen}; every valid entry before that point was imported.", field="file")
        return self.stats

    def import_ndjson(self, opener: Callable[[], IO[bytes]]) -> ImportStats:
        """Bulk-data NDJSON: one resource (or Bundle) per line."""
        for patients in (True, False):
            with opener() as f:
                self._run_entries(_ndjson_entries(f, self.sink if patients else None), patients=patients)
        return self.finish()

    # -- passes

    _last_entry_seen = 0

    def _run_entries(self, entries: Iterator[tuple[dict, dict]], *, patients: bool) -> None:
        try:
            self._consume(entries, patients=patients)
        except ijson.JSONError:
            self.json_failure = True  # what came before the broken spot is kept (flushed below)
        self._flush_facts()
        self._commit()

    json_failure = False

    def _consume(self, entries: Iterator[tuple[dict, dict]], *, patients: bool) -> None:
        for where, entry in entries:
            self._last_entry_seen = where.get("entry") or where.get("line") or 0
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                if not patients:
                    method = ((entry or {}).get("request") or {}).get("method") if isinstance(entry, dict) else None
                    if method == "DELETE":
                        self.stats.add("DELETE", "skipped")
                    else:
                        self._error(where, None, "The entry has no resource with a resourceType.", None)
                continue
            rtype = resource["resourceType"]
            if rtype == "Patient":
                if patients:
                    self._import_patient(where, entry, strip_clear_text(resource))
                continue
            if patients:
                continue
            if rtype not in MAPPERS:
                self.stats.add(rtype[:60], "skipped")
                continue
            self._queue_fact(where, entry, strip_clear_text(resource))
            if len(self._pending) >= self.batch_size:
                self._flush_facts()

    # -- patients

    def _import_patient(self, where: dict, entry: dict, resource: dict) -> None:
        refs = _source_refs(entry, resource)
        label = _label(resource)
        try:
            if self.validate:
                validate_resource(resource)
            data = map_patient(resource)
            with self.session.begin_nested():
                result = service.save_contact(self.session, self.org_id, data, source="fhir", source_refs=refs,
                                              import_id=self.import_id)
                self.session.flush()
        except MappingError as exc:
            return self._error(where, label, exc.reason, exc.field, rtype="Patient")
        except CarePostError as exc:
            return self._error(where, label, exc.message, exc.field, rtype="Patient")
        self.resolver.remember(refs, result.contact.id)
        self.stats.add("Patient", "created" if result.created else "updated")
        self.stats.patients += 1
        self.stats.identifiers_not_kept += result.identifiers_not_kept
        self._touched_stage.add(result.contact.id)
        self._since_commit += 1
        if self._since_commit >= self.batch_size:
            self._commit()

    # -- clinical facts

    def _queue_fact(self, where: dict, entry: dict, resource: dict) -> None:
        rtype = resource["resourceType"]
        label = _label(resource)
        refs = _source_refs(entry, resource)
        source_ref = refs[0] if refs else None
        try:
            if self.validate:
                validate_resource(resource)
            facts = MAPPERS[rtype](resource)
        except MappingError as exc:
            return self._error(where, label, exc.reason, exc.field, rtype=rtype)
        except (TypeError, ValueError, AttributeError, KeyError):
            return self._error(where, label, "The resource has an unexpected shape.", None, rtype=rtype)
        if not facts[0].patient_refs:
            return self._error(where, label, "The resource names no patient.", "subject", rtype=rtype)
        for fact in facts:
            fact.source_ref = (source_ref + fact.source_ref) if source_ref else ""
            self._pending.append(_Pending(where, rtype, label, fact))

    def _flush_facts(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            written = self._write_facts(pending)
            self.session.flush()
        except SQLAlchemyError:
            # Unexpected (validated data should fit); isolate the bad record one by one.
            self.session.rollback()
            log.warning("import_batch_retry", import_id=self.import_id, batch_size=len(pending))
            written = []
            for item in pending:
                try:
                    with self.session.begin_nested():
                        done = self._write_facts([item])
                        self.session.flush()
                    written.extend(done)
                except SQLAlchemyError:
                    self._error(item.where, item.source_ref, "The database refused this record.", None, rtype=item.rtype)
        for item in written:  # kept, with a code flagged unverified: a warning, not a failure
            for field_name, reason in item.fact.warnings:
                self._warning(item.where, item.source_ref, reason, field_name, rtype=item.rtype)
        self._since_commit += len(pending)
        if self._since_commit >= self.batch_size:
            self._commit()

    def _write_facts(self, pending: list[_Pending]) -> list[_Pending]:
        """Write a batch; returns the items stored (created or updated)."""
        session, org_id = self.session, self.org_id
        written: list[_Pending] = []
        keys = {}
        for item in pending:
            for ref in item.fact.patient_refs:
                k = patient_ref_key(ref)
                if k:
                    keys[k] = None
        resolved = self.resolver.resolve_many(set(keys))
        # existing rows by source key, per table
        by_model: dict[type, dict[str, ClinicalFact]] = {}
        skeys: dict[int, str | None] = {}
        for i, item in enumerate(pending):
            skeys[i] = service.source_index(session, org_id, f"{item.rtype}|{item.fact.source_ref}") if item.fact.source_ref else None
        for model in {item.fact.model for item in pending}:
            wanted = [skeys[i] for i, item in enumerate(pending) if item.fact.model is model and skeys[i]]
            rows = session.scalars(select(model).where(model.org_id == org_id, model.source_key.in_(wanted))).all() if wanted else []
            by_model[model] = {r.source_key: r for r in rows}
        failed_sources: set[str] = set()
        new_rows: dict[type, list[dict]] = {}
        component_suffixes = tuple(f"#component{n}" for n in range(50))
        for i, item in enumerate(pending):
            fact = item.fact
            if item.source_ref in failed_sources:
                continue
            contact_id = None
            for ref in fact.patient_refs:
                k = patient_ref_key(ref)
                if k and resolved.get(k):
                    contact_id = resolved[k]
                    break
            if contact_id is None:
                failed_sources.add(item.source_ref)
                self._error(item.where, item.source_ref, "References a patient that is neither in this file nor in CarePost.",
                            "subject", rtype=item.rtype)
                continue
            key = skeys[i]
            row = by_model[fact.model].get(key) if key else None
            if row is _NEW or (row is not None and row.last_import_id == self.import_id):
                failed_sources.add(item.source_ref)
                self._error(item.where, item.source_ref, "The same resource id appears more than once in this file; the first was kept.",
                            "id", rtype=item.rtype)
                continue
            if row is None:
                # New rows go in as one multi-row INSERT per table (the fast path of an import).
                now = clock.now()
                new_rows.setdefault(fact.model, []).append({
                    **_fact_columns(fact.model), **fact.values, "id": new_id(), "org_id": org_id,
                    "contact_id": contact_id, "source_key": key, "last_import_id": self.import_id, "created_at": now, "updated_at": now,
                })
                if key:
                    by_model[fact.model][key] = _NEW
                outcome = "created"
            else:
                row.contact_id = contact_id
                row.last_import_id = self.import_id
                for name, value in fact.values.items():
                    setattr(row, name, value)
                outcome = "updated"
            if fact.member_id:
                self._member_ids.append((contact_id, *fact.member_id))
            if fact.model is Coverage and fact.values.get("status") in (None, "active"):
                self._coverage_updates[contact_id] = (fact.values.get("display"), fact.values.get("plan_name") or fact.values.get("payor_name"))
            if not fact.source_ref.endswith(component_suffixes):
                self.stats.add(item.rtype, outcome)
            if fact.model in (Encounter, Appointment):
                self._touched_stage.add(contact_id)
            written.append(item)
        for model, rows in new_rows.items():
            session.execute(insert(model).execution_options(render_nulls=True), rows)
        return written

    def _write_member_ids(self) -> None:
        """Coverage member ids become encrypted identifiers of the contact (type MB), found by
        blind index; one already held by another contact is left where it is."""
        if not self._member_ids:
            return
        session, org_id = self.session, self.org_id
        wanted = {}
        for contact_id, system, value in self._member_ids:
            wanted[service.identifier_index(session, org_id, "identifier", value, system)] = (contact_id, system, value)
        self._member_ids = []
        held = service.contacts_by_index(session, org_id, "identifier", wanted.keys())
        todo = [(idx, spec) for idx, spec in wanted.items() if idx not in held]
        if not todo:
            return
        # One value per system per contact: a new member id replaces the old one of that payor.
        replaced = session.execute(select(ContactIdentifier.id, ContactIdentifier.contact_id, ContactIdentifier.system).where(
            ContactIdentifier.org_id == org_id, ContactIdentifier.kind == "identifier",
            ContactIdentifier.contact_id.in_({c for _, (c, _s, _v) in todo}))).all()
        pairs = {(c, sy) for _, (c, sy, _v) in todo}
        stale = [rid for rid, c, sy in replaced if (c, sy) in pairs]
        if stale:
            session.execute(delete(ContactIdentifier).where(ContactIdentifier.org_id == org_id, ContactIdentifier.id.in_(stale)))
        service.register_identifier_systems(session, org_id, [(system, "MB") for _, (_c, system, _v) in todo])
        for idx, (contact_id, system, value) in todo:
            row = ContactIdentifier(id=new_id(), org_id=org_id, contact_id=contact_id, kind="identifier", system=system,
                                    type_code="MB", rank=0, blind_index=idx)
            row.value_enc = get_keyring().encrypt(session, org_id, "contact_identifiers", "value", row.id, value)
            session.add(row)

    # -- bookkeeping

    def _error(self, where: dict, label: str | None, reason: str, field: str | None, rtype: str | None = None) -> None:
        self.stats.add(rtype or "unknown", "failed")
        self.sink.error(reason=reason, line=where.get("line"), resource=label or (f"entry {where['entry']}" if where.get("entry") else None), field=field)

    def _warning(self, where: dict, label: str | None, reason: str, field: str | None, rtype: str | None = None) -> None:
        self.stats.warnings += 1
        self.sink.warning(reason=reason, line=where.get("line"), resource=label or (f"entry {where['entry']}" if where.get("entry") else None),
                          field=field)

    def _commit(self) -> None:
        self._write_member_ids()
        if self._coverage_updates:
            # The active coverage names the contact's coverage type and plan (plain, for segments).
            for contact_id, (ctype, plan) in self._coverage_updates.items():
                values = {k: v for k, v in (("coverage_type", ctype and ctype[:64]), ("coverage_plan", plan and plan[:200])) if v}
                if values:
                    self.session.execute(update(Contact).where(Contact.org_id == self.org_id, Contact.id == contact_id).values(**values))
            self._coverage_updates = {}
        if self._touched_stage:
            service.refresh_care_stages(self.session, self.org_id, sorted(self._touched_stage))
            self._touched_stage = set()
        self.sink.checkpoint(self.stats)
        self.session.commit()
        self._since_commit = 0

    def finish(self) -> ImportStats:
        self._flush_facts()
        self._commit()
        return self.stats


def _label(resource: dict) -> str:
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{str(rid)[:64]}" if rid else str(resource.get("resourceType"))[:60]


def _source_refs(entry: dict, resource: dict) -> list[str]:
    """How other resources may name this one: ``Type/id`` and the entry's fullUrl."""
    refs = []
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if rid:
        refs.append(f"{rtype}/{rid}")
    full = entry.get("fullUrl") if isinstance(entry, dict) else None
    if isinstance(full, str) and full:
        if full.startswith(("urn:uuid:", "urn:oid:")):
            refs.append(full)
        else:
            key = patient_ref_key(full, rtype) if rtype else None
            if key and key[1] not in refs:
                refs.append(key[1])
    return refs


# --------------------------------------------------------------------------- streaming readers


def _top_level(f: IO[bytes]) -> dict:
    """``resourceType`` and ``type`` of a JSON document, found without building the entries."""
    found: dict[str, Any] = {}
    try:
        for prefix, event, value in ijson.parse(f):
            if prefix in ("resourceType", "type") and event in ("string", "number"):
                found[prefix] = value
                if len(found) == 2:
                    break
    except ijson.JSONError:
        if not found:
            raise FileFailure("The file is not valid JSON.", field="file") from None
    except UnicodeDecodeError:
        raise FileFailure("The file is not valid UTF-8 JSON.", field="file") from None
    return found


def _bundle_entries(f: IO[bytes]) -> Iterator[tuple[dict, dict]]:
    for n, entry in enumerate(ijson.items(f, "entry.item", use_float=True), start=1):
        yield {"entry": n}, entry


def _ndjson_entries(f: IO[bytes], sink: ErrorSink | None) -> Iterator[tuple[dict, dict]]:
    """Entries of an NDJSON file; a line that is a Bundle yields its entries. Line errors are
    reported once (on the first pass, when ``sink`` is given)."""
    for n, raw in enumerate(f, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            resource = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            if sink is not None:
                sink.error(reason="The line is not valid JSON.", line=n)
            continue
        if not isinstance(resource, dict):
            if sink is not None:
                sink.error(reason="The line is not a FHIR resource (a JSON object).", line=n)
            continue
        if resource.get("resourceType") == "Bundle":
            for entry in resource.get("entry") or []:
                yield {"line": n}, entry
        else:
            yield {"line": n}, {"resource": resource}
