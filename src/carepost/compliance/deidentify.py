"""The Safe Harbor transform (45 CFR 164.514(b)(2)): a contact and its clinical facts in, rows
without any of the 18 identifiers out. Pure functions; :mod:`carepost.compliance.service` runs
them over a segment.

The method is an **allow-list**: only the fields named in :data:`SUBJECT_FIELDS` and
:data:`FACT_FIELDS` can ever reach the output, each transformed as the rule for its identifier
says. Everything else — names, street address, city, email, phone, MRN and every other
identifier (all encrypted ``ContactIdentifier`` rows), custom attributes, the coverage plan and
payor names, the display text of every code, the value text of observations, CarePost ids — is
never read into a row. On top of the allow-list two guards drop a value (counted as
``suppressed``) that still looks like an identifier:

* :func:`looks_like_identifier`: an e-mail address, URL, IP address, a date with day or month,
  a phone, SSN or any run of five or more digits (a free-text enumeration filled with a number);
* the *known-value* guard (``known_values``): the contact's own decrypted identifiers — names,
  address lines, city, e-mail addresses, phone numbers, MRN and other identifiers — searched in
  every output value as text and, for numbers, as digits only ("actual knowledge",
  164.514(b)(2)(ii)).

Per identifier:

* (B) geography: the state and the country stay; the ZIP code becomes its first three digits,
  ``000`` for the ZIP3 areas of 20,000 people or fewer (``data/restricted_zip3.json``, with its
  census source); city, street address and time zone are dropped;
* (C) dates: years only (birth year, the year of every fact date); an age over 89 becomes
  ``"90+"`` and the birth year of that person is dropped;
* (R) unique numbers: every subject gets a random pseudonym (:func:`new_pseudonym`, 64 random
  bits from :mod:`secrets`), made for one export and derived from nothing; facts carry no id.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
AGE_CAP = 89  # ages over 89 fold into "90+" (164.514(b)(2)(i)(C))

# Plain contact columns that are kept (coded demographics); everything else is dropped.
SUBJECT_FIELDS = ("subject_id", "birth_year", "age", "sex", "gender_identity", "preferred_language", "ethnicity",
                  "race", "marital_status", "education", "employment_status", "household_status", "income_band",
                  "coverage_type", "religion", "state", "zip3", "country", "deceased", "care_stage")
_COPIED = ("sex", "gender_identity", "preferred_language", "ethnicity", "race", "marital_status", "education",
           "employment_status", "household_status", "income_band", "coverage_type", "religion", "state",
           "care_stage")

FACT_FIELDS = ("subject_id", "fact_type", "code_system", "code", "status", "category", "year", "end_year",
               "value", "unit", "value_code", "interpretation", "class_code", "hospitalization",
               "discharge_disposition", "intent", "days_supply")

# The date (start) and end of each kind of fact; only their years are kept.
FACT_DATES = {
    "conditions": (("onset_date", "recorded_date"), ("abatement_date",)),
    "medications": (("start_date", "authored_on", "last_fill_date"), ("end_date",)),
    "procedures": (("performed_start",), ("performed_end",)),
    "observations": (("effective_at",), ()),
    "immunizations": (("occurrence_date",), ()),
    "encounters": (("start_at",), ("end_at",)),
    "appointments": (("start_at",), ("end_at",)),
    "care-plans": (("period_start",), ("period_end",)),
    "coverages": (("period_start",), ("period_end",)),
}
# Coded fact columns copied when the kind has them.
_FACT_CODED = {"status": "status", "category": "category", "value_unit": "unit", "value_code": "value_code",
               "interpretation": "interpretation", "class_code": "class_code",
               "discharge_disposition": "discharge_disposition", "intent": "intent"}

# The shapes of codes kept (a verified code of a known system; anything else is dropped).
CODE_SHAPES = {
    "icd10cm": re.compile(r"^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$"),
    "icd10": re.compile(r"^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$"),
    "icd10pcs": re.compile(r"^[0-9A-HJ-NP-Z]{7}$"),
    "loinc": re.compile(r"^[0-9]{1,7}-[0-9]$"),
    "rxnorm": re.compile(r"^[0-9]{1,8}$"),
    "snomed": re.compile(r"^[1-9][0-9]{5,17}$"),
    "cvx": re.compile(r"^[0-9]{1,3}$"),
    "cpt": re.compile(r"^[0-9]{4}[0-9A-Z]$"),
}

_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[A-Za-z]{2,}")
_URL = re.compile(r"(?i)\b(?:https?|ftp)://|\bwww\.|\b[a-z0-9-]+\.(?:com|org|net|edu|gov|io|us|info)\b")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_IPV6 = re.compile(r"(?i)\b(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{0,4}\b")
_DATE = re.compile(r"\b\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b|\b\d{8}\b"
                   r"|(?i:\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+\d{1,2}\b)")
_PHONE = re.compile(r"\(?\b\d{3}\)?[\s.-]*\d{3}[\s.-]*\d{4}\b")
_LONG_NUMBER = re.compile(r"\d[\d\s().-]{3,}\d")  # five or more digits, punctuated or not


@lru_cache(maxsize=1)
def restricted_zip3() -> dict:
    """``{"zip3": frozenset, "source": str, "census": str}`` from ``data/restricted_zip3.json``."""
    data = json.loads((DATA_DIR / "restricted_zip3.json").read_text())
    return {"zip3": frozenset(data["zip3"]), "source": data["source"], "census": data["census"]}


def zip3(postal_code: str | None, country: str | None) -> str | None:
    """The first three digits of a US ZIP code, ``000`` where that area holds 20,000 people or
    fewer; ``None`` for anything else (a foreign postal code is geography smaller than a state)."""
    if not postal_code or (country and country.upper() != "US"):
        return None
    digits = re.sub(r"\D", "", postal_code)
    if len(digits) not in (5, 9):
        return None
    prefix = digits[:3]
    return "000" if prefix in restricted_zip3()["zip3"] else prefix


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def new_pseudonym() -> str:
    """A subject id for one export: random (not derived from any id or PHI, 164.514(c)(1))."""
    return "S" + secrets.token_hex(8)


def looks_like_identifier(value: str) -> bool:
    return bool(_EMAIL.search(value) or _URL.search(value) or _IPV4.search(value) or _IPV6.search(value)
                or _DATE.search(value) or _PHONE.search(value) or sum(c.isdigit() for c in value) >= 5
                and _LONG_NUMBER.search(value))


def _digits(value: str) -> str:
    return re.sub(r"\D", "", value)


def known_values(view: dict) -> tuple[list[str], list[str]]:
    """From a decrypted contact view (``patients.service.contact_dicts``): its identifying texts
    (lower case, three characters or more) and numbers (digits only, four digits or more)."""
    texts: list[str] = []
    for name in ("name_prefix", "given_name", "middle_name", "family_name", "name_suffix", "address_line1",
                 "address_line2", "city", "email", "coverage_plan"):
        if view.get(name):
            texts.append(str(view[name]))
    texts += [e for e in view.get("emails") or []]
    texts += [p["value"] for p in view.get("phones") or [] if p.get("value")]
    texts += [i["value"] for i in view.get("identifiers") or [] if i.get("value")]
    if view.get("postal_code"):
        texts.append(str(view["postal_code"]))
    words = sorted({t.strip().lower() for t in texts if len(t.strip()) >= 3})
    numbers = sorted({d for d in (_digits(t) for t in texts) if len(d) >= 4})
    return words, numbers


class Guard:
    """Drops values that look like identifiers or contain one of the subject's own; counts them."""

    def __init__(self) -> None:
        self.suppressed = 0
        self.words: list[str] = []
        self.numbers: list[str] = []

    def know(self, view: dict | None) -> None:
        self.words, self.numbers = known_values(view) if view else ([], [])

    def _known(self, text: str) -> bool:
        low = text.lower()
        if any(w in low for w in self.words):
            return True
        digits = _digits(text)
        return bool(digits) and any(n in digits for n in self.numbers)

    def text(self, value, *, code: bool = False):
        """A string or number kept only when it passes both guards (codes skip the digit rules,
        their shape was checked against their system)."""
        if value is None or isinstance(value, bool):
            return value
        text = str(value)
        if not text.strip():
            return None
        if (not code and isinstance(value, str) and looks_like_identifier(text)) or self._known(text):
            self.suppressed += 1
            return None
        return value


def subject_row(contact, pseudonym: str, today: date, guard: Guard) -> dict:
    """One contact's kept fields. ``contact`` is a ``patients.models.Contact`` (plain columns only
    are read; the encrypted ones are never decrypted here)."""
    row: dict = {"subject_id": pseudonym}
    birth = contact.birth_date
    if birth is not None:
        age = age_on(birth, today)
        if age > AGE_CAP:
            row["birth_year"], row["age"] = None, "90+"
        else:
            row["birth_year"], row["age"] = birth.year, age
    else:
        row["birth_year"] = row["age"] = None
    for name in _COPIED:
        row[name] = guard.text(getattr(contact, name, None))
    row["zip3"] = zip3(contact.postal_code, contact.country)
    row["country"] = guard.text(contact.country)
    row["deceased"] = bool(contact.deceased)
    return {k: row.get(k) for k in SUBJECT_FIELDS}


def _year(value) -> int | None:
    if isinstance(value, (date, datetime)):
        return value.year
    return None


def fact_row(kind: str, fact, pseudonym: str, guard: Guard) -> dict:
    """One clinical fact's kept fields: coded values and years; no display text, no id."""
    starts, ends = FACT_DATES.get(kind, ((), ()))
    system = fact.code_system
    shape = CODE_SHAPES.get(system or "")
    code = fact.code if (shape is not None and fact.code_verified and fact.code and shape.match(fact.code)) else None
    row: dict = {"subject_id": pseudonym, "fact_type": kind, "code_system": system if system in CODE_SHAPES else None,
                 "code": guard.text(code, code=True)}
    for column, out in _FACT_CODED.items():
        if hasattr(fact, column):
            row[out] = guard.text(getattr(fact, column))
    row["year"] = next((_year(getattr(fact, c)) for c in starts if getattr(fact, c, None) is not None), None)
    row["end_year"] = next((_year(getattr(fact, c)) for c in ends if getattr(fact, c, None) is not None), None)
    if hasattr(fact, "value_quantity"):
        row["value"] = guard.text(fact.value_quantity)
    if hasattr(fact, "is_hospitalization"):
        row["hospitalization"] = bool(fact.is_hospitalization)
    if hasattr(fact, "days_supply"):
        row["days_supply"] = guard.text(fact.days_supply)
    return {k: row.get(k) for k in FACT_FIELDS}
