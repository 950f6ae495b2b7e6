"""Merge-field helpers: the named, documented ways a template reads a contact's data.

A template never queries anything. It names helpers (``{{ first_name }}``,
``{{ next_appointment.when }}``, ``{{ last_observation("loinc:4548-4").value }}``); rendering for
a contact binds each helper to that contact's data, loaded set-wise for a chunk of contacts by
the patients capability through the :data:`load_merge_data` port (content sits beside patients
in the layers, so the composition root wires the loader).

Each helper declares the **PHI category** it reveals. A template's purpose allows some
categories and not others (minimum necessary, 45 CFR 164.502(b)): a marketing message may greet
the patient by name but may not print a diagnosis, a medication or a lab result
(:data:`PURPOSE_CATEGORIES`, enforced by ``phi_lint.check_helpers`` at save time).

Dates are formatted in the patient's language (Babel's CLDR data) and time zone (the contact's,
else the organization's, else UTC).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_time

from carepost.core.ports import Port

# PHI categories, from the least to the most revealing.
CATEGORIES: dict[str, str] = {
    "demographics": "Name and other demographics of the recipient",
    "appointment": "Scheduled care: that a visit exists, when and with whom",
    "care_stage": "Where the patient is in their care (new, active, lapsed...)",
    "medication": "Prescribed drugs and refill dates",
    "diagnosis": "Conditions and diagnoses",
    "lab_result": "Laboratory results and other observations",
    "consent": "The contact's communication choices (topics subscribed to)",
}


@dataclass(frozen=True)
class Helper:
    name: str
    category: str
    doc: str
    example: str
    callable: bool = False


HELPERS: dict[str, Helper] = {h.name: h for h in (
    Helper("first_name", "demographics", "The contact's given name.", "{{ first_name }}"),
    Helper("last_name", "demographics", "The contact's family name.", "{{ last_name }}"),
    Helper("full_name", "demographics", "Given and family name.", "{{ full_name }}"),
    Helper("next_appointment", "appointment",
           "The next booked appointment, or none: .when (date and time), .date, .time, .description.",
           "{% if next_appointment %}{{ next_appointment.when }}{% endif %}"),
    Helper("care_stage", "care_stage", "The contact's care stage (new, active, lapsed, ...).", "{{ care_stage }}"),
    Helper("active_medications", "medication",
           "Active medications: a list of objects with .name and .refill_due (a formatted date or none).",
           "{% for m in active_medications %}{{ m.name }}{% endfor %}"),
    Helper("refill_due", "medication",
           "The earliest upcoming refill, or none: .name and .date.",
           "{% if refill_due %}{{ refill_due.name }} on {{ refill_due.date }}{% endif %}"),
    Helper("active_conditions", "diagnosis", "Active conditions: a list of objects with .name.",
           "{% for c in active_conditions %}{{ c.name }}{% endfor %}"),
    Helper("subscribed_topics", "consent", "Topics the contact subscribes to: a list of objects with .name.",
           "{% for t in subscribed_topics %}{{ t.name }}{% endfor %}"),
    Helper("last_observation", "lab_result",
           'The latest observation with a code ("system:code"), or none: .value, .unit, .date, .name, '
           ".interpretation. The code must be a literal string.",
           '{{ last_observation("loinc:4548-4").value }}', callable=True),
)}

# Minimum necessary: the categories each purpose may print (core.purposes.PURPOSES).
_CLINICAL = ("demographics", "consent", "appointment", "care_stage", "medication", "diagnosis", "lab_result")
PURPOSE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "treatment": _CLINICAL,
    "care_coordination": _CLINICAL,
    "treatment_alternatives": ("demographics", "consent", "appointment", "care_stage", "medication", "diagnosis"),
    "refill_reminder": ("demographics", "consent", "medication"),
    "payment": ("demographics", "consent", "appointment"),
    "health_care_operations": ("demographics", "consent", "appointment"),
    "transactional": ("demographics", "consent", "appointment"),
    "own_products": ("demographics", "consent"),
    "marketing": ("demographics", "consent"),
    "marketing_remunerated": ("demographics", "consent"),
}
# A template without a purpose is held to the strictest rule until one is declared.
DEFAULT_CATEGORIES = ("demographics", "consent")
CONSENT_HELPERS = frozenset({"subscribed_topics"})

# --------------------------------------------------------------------------- languages

SUPPORTED_LANGUAGES = ("en", "es")


def check_language(code: str, field: str) -> str:
    """A BCP 47 tag Babel knows and CarePost has texts for; else 422 naming ``field``."""
    from carepost.core.errors import ValidationFailed

    try:
        locale = Locale.parse((code or "").replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        raise ValidationFailed(f"Unknown language {code!r}; use a language tag such as en or es.", field=field) from None
    if locale.language not in SUPPORTED_LANGUAGES:
        raise ValidationFailed(f"Language {code!r} is not supported yet; supported: {', '.join(SUPPORTED_LANGUAGES)}.",
                               field=field)
    return str(locale).replace("_", "-")


def choose_language(preferred: str | None, default: str, available) -> str:
    """The variant for a contact: exact tag, then its primary language, then the default."""
    available = set(available)
    if preferred:
        tag = preferred.strip().replace("_", "-")
        for candidate in (tag, tag.split("-")[0].lower()):
            for have in available:
                if have.lower() == candidate.lower():
                    return have
    return default


@functools.lru_cache(maxsize=64)
def _locale(language: str | None) -> Locale:
    try:
        return Locale.parse((language or "en").replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        return Locale.parse("en")


@functools.lru_cache(maxsize=512)
def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


class Formatter:
    """Dates and times in one patient's language and time zone."""

    def __init__(self, language: str | None, time_zone: str | None):
        self.locale = _locale(language)
        self.zone = _zone(time_zone)

    def _local(self, value: datetime) -> datetime:
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(self.zone)

    def date(self, value) -> str | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = date.fromisoformat(value[:10]) if len(value) <= 10 else datetime.fromisoformat(value)
        if isinstance(value, datetime):
            value = self._local(value).date()
        return format_date(value, format="long", locale=self.locale)

    def time(self, value: datetime | None) -> str | None:
        return None if value is None else format_time(self._local(value), format="short", locale=self.locale)

    def when(self, value: datetime | None) -> str | None:
        if value is None:
            return None
        local = self._local(value)
        return f"{format_date(local.date(), format='full', locale=self.locale)} {format_time(local, format='short', locale=self.locale)}"

# --------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class Needs:
    """What a template's helpers need loaded: helper names and observation codes."""

    helpers: frozenset[str]
    observation_codes: frozenset[str] = frozenset()


load_consent_data = Port(
    "content.load_consent_data",
    "load(session, org_id, contact_ids) -> {contact_id: {subscribed_topics: [...]}}; consent.merge.load.",
)
load_merge_data = Port(
    "content.load_merge_data",
    "load(session, org_id, contact_ids, needs: Needs) -> {contact_id: facts dict}; the patients capability's "
    "set-wise loader (patients.merge.load).",
)


def bind(facts: dict, needs: Needs) -> dict:
    """The render data of one contact: each needed helper bound to its value.

    ``facts`` is what :data:`load_merge_data` returned for the contact: ``contact`` (names,
    language, time zone), ``appointments``, ``medications``, ``conditions``, ``observations``
    (by code), ``care_stage`` — datetimes in UTC, dates as dates.
    """
    contact = facts.get("contact") or {}
    fmt = Formatter(contact.get("preferred_language"), contact.get("time_zone"))
    data: dict = {}
    for name in needs.helpers:
        if name == "first_name":
            data[name] = contact.get("given_name") or ""
        elif name == "last_name":
            data[name] = contact.get("family_name") or ""
        elif name == "full_name":
            data[name] = " ".join(p for p in (contact.get("given_name"), contact.get("family_name")) if p)
        elif name == "care_stage":
            data[name] = facts.get("care_stage") or ""
        elif name == "next_appointment":
            appt = facts.get("next_appointment")
            data[name] = None if not appt else {
                "when": fmt.when(appt["start_at"]), "date": fmt.date(appt["start_at"]),
                "time": fmt.time(appt["start_at"]), "description": appt.get("display") or ""}
        elif name == "active_medications":
            data[name] = [{"name": m.get("display") or "", "refill_due": fmt.date(m.get("next_refill_due"))}
                          for m in facts.get("medications") or []]
        elif name == "refill_due":
            due = [m for m in facts.get("medications") or [] if m.get("next_refill_due")]
            due.sort(key=lambda m: m["next_refill_due"])
            data[name] = {"name": due[0].get("display") or "", "date": fmt.date(due[0]["next_refill_due"])} if due else None
        elif name == "subscribed_topics":
            data[name] = [{"name": t.get("name") or ""} for t in facts.get("subscribed_topics") or []]
        elif name == "active_conditions":
            data[name] = [{"name": c.get("display") or ""} for c in facts.get("conditions") or []]
        elif name == "last_observation":
            observations = {}
            for code, obs in (facts.get("observations") or {}).items():
                value = obs.get("value_quantity")
                if value is None:
                    value = obs.get("value_display") or obs.get("value_code")
                elif float(value).is_integer():
                    value = int(value)
                observations[code] = {"value": value, "unit": obs.get("value_unit") or "",
                                      "date": fmt.date(obs.get("effective_at")), "name": obs.get("display") or "",
                                      "interpretation": obs.get("interpretation") or ""}
            data[name] = _observation_lookup(observations)
    return data


def _observation_lookup(observations: dict):
    def last_observation(code):
        return observations.get(str(code).lower())
    return last_observation


def masked(data: dict) -> dict:
    """The same shape with every value masked (a preview for a viewer without phi:read_unmasked)."""
    def mask(value):
        if isinstance(value, dict):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        if callable(value):
            return lambda *a, **k: mask(value(*a, **k))
        if value is None or value == "":
            return value
        return "***"
    return {k: mask(v) for k, v in data.items()}


def placeholders(needs: Needs) -> dict:
    """Render data with every helper shown by its name in brackets (previews and test sends without
    a patient's data)."""
    data: dict = {}
    for name in needs.helpers:
        if name == "last_observation":
            data[name] = lambda code: {"value": "[value]", "unit": "[unit]", "date": "[date]", "name": f"[{code}]",
                                       "interpretation": ""}
        elif name in ("active_medications", "active_conditions", "subscribed_topics"):
            data[name] = [{"name": f"[{name}]", "refill_due": "[date]"}]
        elif name in ("next_appointment", "refill_due"):
            data[name] = {"when": "[date and time]", "date": "[date]", "time": "[time]", "description": f"[{name}]",
                          "name": f"[{name}]"}
        else:
            data[name] = f"[{name}]"
    return data


def catalog() -> list[dict]:
    return [{"name": h.name, "category": h.category, "doc": h.doc, "example": h.example} for h in HELPERS.values()]
