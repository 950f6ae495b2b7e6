"""The shipped value-set library: named, versioned code lists for common care-gap programs and
the sensitive categories (HIV/AIDS, substance use disorder, mental health, reproductive and
sexual health, genetic testing).

Each value set is one JSON file under ``segments/library/valuesets/`` (package data), naming the
public source its codes come from::

    {"key": "diabetes", "name": "Type 2 diabetes", "version": "2026-12",
     "source": "ICD-10-CM 2026 tabular list ...; SNOMED CT International browser ...",
     "sensitive_category": null,
     "codes": [{"system": "snomed", "code": "44054006", "display": "..."},
               {"system": "icd10cm", "prefix": "E11", "display": "..."}]}

``system`` is the short code-system name the importer stores in ``code_system``
(:data:`carepost.patients.service.CODE_SYSTEMS`): ``snomed``, ``icd10cm``, ``loinc``,
``rxnorm``, ``cvx``, ``cpt``... An entry holds either one ``code`` (exact match) or a ``prefix``
(every code starting with it, e.g. ICD-10-CM ``E11`` for E11.9, E11.65...). ICD-10-CM codes are
compared without their dot, so ``Z31.43`` matches a stored ``Z31.430`` and a stored ``Z31430``.

A value set with ``sensitive_category`` set makes every segment that uses it sensitive
(ARCHITECTURE.md / issue 12 item 4). The files are meant to be edited: a deployment that needs a
wider or narrower sensitive list edits the JSON; :func:`shipped_value_sets` validates every file
when it is first loaded and refuses a malformed one with a message naming the file and the field.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

VALUESET_DIR = Path(__file__).resolve().parent / "library" / "valuesets"

# category -> human label; the categories a shipped value set may carry
SENSITIVE_CATEGORIES: dict[str, str] = {
    "hiv": "HIV/AIDS",
    "substance_use": "Substance use disorder (42 CFR Part 2)",
    "mental_health": "Mental health",
    "reproductive_sexual_health": "Reproductive and sexual health",
    "genetic_testing": "Genetic testing",
}

# The shapes of a full code per system (what the importer accepts, plus CPT).
CODE_PATTERNS: dict[str, re.Pattern[str]] = {
    "icd10cm": re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$"),
    "loinc": re.compile(r"^(\d{1,7}-\d|LP\d+-\d|LA\d+-\d)$"),
    "snomed": re.compile(r"^\d{6,18}$"),
    "rxnorm": re.compile(r"^\d{1,10}$"),
    "cvx": re.compile(r"^\d{1,3}$"),
    "cpt": re.compile(r"^\d{4}[0-9A-Z]$"),
}
# The start of a code per system, for ``prefix`` entries.
PREFIX_PATTERNS: dict[str, re.Pattern[str]] = {
    "icd10cm": re.compile(r"^[A-Z]([0-9][0-9A-Z]?(\.?[0-9A-Z]{0,4})?)?$"),
    "cpt": re.compile(r"^\d{1,5}$"),
    "snomed": re.compile(r"^\d{1,18}$"),
    "loinc": re.compile(r"^[0-9A-Z-]{1,10}$"),
    "rxnorm": re.compile(r"^\d{1,10}$"),
    "cvx": re.compile(r"^\d{1,3}$"),
}
SYSTEMS = frozenset(CODE_PATTERNS)
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_TOP_FIELDS = {"key", "name", "version", "source", "sensitive_category", "description", "codes"}


class ValueSetError(ValueError):
    """A malformed value-set document; ``field`` names where (``codes.3.prefix``)."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


def normalize_code(system: str | None, code: str | None) -> str:
    """The comparable form of a code: trimmed, upper case; ICD-10-CM without its dot."""
    value = (code or "").strip().upper()
    if system == "icd10cm":
        value = value.replace(".", "")
    return value


def validate_value_set(doc: Any, expected_key: str | None = None) -> dict:
    """Check one value-set document and return a normalized copy (``codes`` entries keep only
    system, code or prefix, display). Raises :class:`ValueSetError` naming the field."""
    if not isinstance(doc, dict):
        raise ValueSetError("must be a JSON object")
    unknown = sorted(set(doc) - _TOP_FIELDS)
    if unknown:
        raise ValueSetError("unknown field", unknown[0])
    key = doc.get("key")
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueSetError("must be lower-case letters, digits and underscores, starting with a letter", "key")
    if expected_key is not None and key != expected_key:
        raise ValueSetError(f"must equal the file name ({expected_key})", "key")
    for field in ("name", "version", "source"):
        value = doc.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueSetError("is required (a non-empty string)", field)
    category = doc.get("sensitive_category")
    if category is not None and category not in SENSITIVE_CATEGORIES:
        raise ValueSetError(f"must be null or one of {', '.join(SENSITIVE_CATEGORIES)}", "sensitive_category")
    codes = doc.get("codes")
    if not isinstance(codes, list) or not codes:
        raise ValueSetError("must be a non-empty list", "codes")
    seen: set[tuple[str, str, str]] = set()
    out_codes = []
    for i, entry in enumerate(codes):
        where = f"codes.{i}"
        if not isinstance(entry, dict):
            raise ValueSetError("must be an object", where)
        extra = sorted(set(entry) - {"system", "code", "prefix", "display"})
        if extra:
            raise ValueSetError("unknown field", f"{where}.{extra[0]}")
        system = entry.get("system")
        if system not in SYSTEMS:
            raise ValueSetError(f"must be one of {', '.join(sorted(SYSTEMS))}", f"{where}.system")
        has_code, has_prefix = "code" in entry, "prefix" in entry
        if has_code == has_prefix:
            raise ValueSetError("needs exactly one of code or prefix", where)
        kind = "code" if has_code else "prefix"
        value = entry[kind]
        if not isinstance(value, str) or not value.strip():
            raise ValueSetError("must be a non-empty string", f"{where}.{kind}")
        value = value.strip()
        pattern = (CODE_PATTERNS if has_code else PREFIX_PATTERNS)[system]
        if not pattern.match(value):
            raise ValueSetError(f"is not a valid {system} {kind}", f"{where}.{kind}")
        ident = (system, kind, normalize_code(system, value))
        if ident in seen:
            raise ValueSetError("duplicate entry", where)
        seen.add(ident)
        display = entry.get("display")
        if display is not None and not isinstance(display, str):
            raise ValueSetError("must be a string", f"{where}.display")
        item = {"system": system, kind: value}
        if display:
            item["display"] = display
        out_codes.append(item)
    out = {"key": key, "name": doc["name"].strip(), "version": doc["version"].strip(), "source": doc["source"].strip(),
           "sensitive_category": category, "codes": out_codes}
    if doc.get("description") is not None:
        if not isinstance(doc["description"], str):
            raise ValueSetError("must be a string", "description")
        out["description"] = doc["description"]
    return out


@lru_cache(maxsize=1)
def _load() -> tuple[dict, ...]:
    sets = []
    for path in sorted(VALUESET_DIR.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueSetError(f"not valid JSON (line {exc.lineno})", path.name) from None
        try:
            sets.append(validate_value_set(doc, expected_key=path.stem))
        except ValueSetError as exc:
            raise ValueSetError(exc.reason, f"{path.name}: {exc.field}" if exc.field else path.name) from None
    return tuple(sets)


def shipped_value_sets() -> list[dict]:
    """Every shipped value set, validated (loaded once per process; copies, safe to modify)."""
    return copy.deepcopy(list(_load()))


def shipped_value_set(key: str) -> dict | None:
    """One shipped value set by key, or None."""
    for vs in _load():
        if vs["key"] == key:
            return copy.deepcopy(vs)
    return None


def sensitive_categories() -> dict[str, list[str]]:
    """category -> keys of the shipped value sets in it (every category listed, even if empty)."""
    out: dict[str, list[str]] = {c: [] for c in SENSITIVE_CATEGORIES}
    for vs in _load():
        if vs["sensitive_category"]:
            out[vs["sensitive_category"]].append(vs["key"])
    return out


def codes_match(system: str | None, code: str | None, entry: dict) -> bool:
    """Whether a stored (code_system, code) falls under one value-set entry."""
    if not system or not code or system != entry.get("system"):
        return False
    value = normalize_code(system, code)
    if "code" in entry:
        return value == normalize_code(system, entry["code"])
    return value.startswith(normalize_code(system, entry["prefix"]))


def value_set_matches(system: str | None, code: str | None, value_set: dict) -> bool:
    """Whether a stored (code_system, code) is in a value set (any entry)."""
    return any(codes_match(system, code, e) for e in value_set["codes"])


def sql_terms(value_set: dict) -> dict[str, dict[str, list[str]]]:
    """The value set grouped for a SQL filter: ``{system: {"codes": [...], "like": [...]}}``.

    ``codes`` are the exact stored spellings to test with ``IN`` (an ICD-10-CM code appears
    with and without its dot), ``like`` are ``LIKE`` patterns for prefixes (likewise both
    spellings; no LIKE wildcard can occur in a validated prefix).
    """
    out: dict[str, dict[str, list[str]]] = {}
    for e in value_set["codes"]:
        system = e["system"]
        slot = out.setdefault(system, {"codes": [], "like": []})
        raw = (e.get("code") or e.get("prefix") or "").strip().upper()
        variants = [raw]
        if system == "icd10cm":
            bare = raw.replace(".", "")
            dotted = bare[:3] + "." + bare[3:] if len(bare) > 3 else bare
            variants = list(dict.fromkeys([dotted, bare]))
        if "code" in e:
            slot["codes"].extend(v for v in variants if v not in slot["codes"])
        else:
            slot["like"].extend(v + "%" for v in variants if v + "%" not in slot["like"])
    return out
