"""Masked views of a contact for people who may see PHI only masked (minimum necessary,
45 CFR 164.502(b)): ``J*** D***``, ``j***@example.org``, birth year only.

Masking is applied to the decrypted dict just before it leaves the server; fields that segments
query in plain (city, state, ZIP, demographics, codes) are shown as they are.
"""

from __future__ import annotations

import re
from typing import Any

from carepost.accounts.permissions import Permission

MASK = "***"


def mask_name(value: str | None) -> str | None:
    if not value:
        return value
    return " ".join(part[:1] + MASK for part in value.split())


def mask_email(value: str | None) -> str | None:
    if not value or "@" not in value:
        return value and MASK
    local, _, domain = value.partition("@")
    return f"{local[:1]}{MASK}@{domain}"


def mask_phone(value: str | None) -> str | None:
    if not value:
        return value
    digits = re.sub(r"\D", "", value)
    return f"{MASK}-{MASK}-{digits[-2:]}" if len(digits) >= 4 else MASK


def mask_identifier(value: str | None) -> str | None:
    if not value:
        return value
    return MASK + value[-2:] if len(value) > 4 else MASK


def mask_birth_date(value: str | None) -> str | None:
    return value[:4] if value else value


# Safe Harbor (164.514(b)(2)(i)(B)): ZIP3 areas of 20,000 people or fewer become 000 (HHS 2012
# guidance, 2000 census). The same list as segments.geo.RESTRICTED_ZIP3 (segments sits above us).
RESTRICTED_ZIP3 = frozenset({"036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831",
                             "878", "879", "884", "890", "893"})


def mask_postal_code(value: str | None) -> str | None:
    if not value:
        return value
    digits = re.sub(r"\D", "", value)[:3]
    if len(digits) < 3:
        return None
    return "000" if digits in RESTRICTED_ZIP3 else digits


def _year(value) -> str | None:
    """An ISO date or timestamp cut to its year (no exact dates in the masked view)."""
    return str(value)[:4] if value else None


def mask_contact(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a contact dict (see ``service.contact_dicts``) for viewers without the unmasked
    right (issue 9 item 7): no direct identifier at all — not even an initial, an email domain
    or the last digits of a phone or MRN, which together re-identify a patient —, no exact date
    (the year at most), no free text, geography no finer than ZIP3 (Safe Harbor) and state."""
    out = dict(data)
    for name in ("given_name", "middle_name", "family_name"):
        out[name] = MASK if out.get(name) else None
    for name in ("name_prefix", "name_suffix"):
        out[name] = None
    for name in ("address_line1", "address_line2", "city"):
        out[name] = MASK if out.get(name) else None
    out["postal_code"] = mask_postal_code(out.get("postal_code"))
    out["email"] = MASK if out.get("email") else None
    out["emails"] = [MASK for _ in out.get("emails") or []]
    out["phone"] = MASK if out.get("phone") else None
    out["phones"] = [{**p, "value": MASK} for p in out.get("phones") or []]
    out["identifiers"] = [{**i, "value": MASK} for i in out.get("identifiers") or []]
    out["mrn"] = MASK if out.get("mrn") else None
    out["external_id"] = MASK if out.get("external_id") else None
    out["birth_date"] = mask_birth_date(out.get("birth_date"))
    for name in ("created_at", "updated_at"):
        if name in out:
            out[name] = _year(out[name])
    if isinstance(out.get("deceased"), str) and len(out["deceased"]) >= 10:
        out["deceased"] = _year(out["deceased"])
    # Free text about coverage (a plan's name can be an employer's): not in the masked view.
    if out.get("coverage_plan"):
        out["coverage_plan"] = MASK
    # Custom attributes may be free text: only yes/no and numbers stay.
    out["attributes"] = {key: (value if isinstance(value, (bool, int, float)) or value is None else MASK)
                         for key, value in (out.get("attributes") or {}).items()}
    out["masked"] = True
    return out


def mask_facts(kind: str, facts: list[dict[str, Any]]) -> dict[str, Any]:
    """Clinical facts for a masked viewer: a count per category (the coding system and status),
    never a code's text, a date or a note."""
    categories: dict[str, int] = {}
    for fact in facts:
        label = "/".join(str(fact[k]) for k in ("code_system", "status") if fact.get(k)) or kind
        categories[label] = categories.get(label, 0) + 1
    return {"data": [], "masked": True, "count": len(facts), "categories": categories}


_DATE = re.compile(r"\b(\d{4})-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2})?(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)?\b")
_LONG_CODE = re.compile(r"\b[0-9A-Fa-f]{8,}\b|\b\d{5,}\b")


def mask_summary(text: str | None) -> str | None:
    """A line another capability puts on the contact page (message history, consent, keys), for
    a masked viewer: an exact date becomes its year, a long number or key fingerprint ``***``."""
    if not text:
        return text
    return _LONG_CODE.sub(MASK, _DATE.sub(lambda m: m.group(1), text))


def mask_government_identifiers(data: dict[str, Any]) -> dict[str, Any]:
    """The unmasked view still shows government identifiers (SSN, driver's licence, passport)
    only to their last four characters: each is revealed one by one, audited."""
    from carepost.patients.service import GOVERNMENT_CLASS, mask_last_four

    idents = data.get("identifiers") or []
    if not any(i.get("class") == GOVERNMENT_CLASS for i in idents):
        return data
    return {**data, "identifiers": [{**i, "value": mask_last_four(i.get("value")), "revealed": False}
                                    if i.get("class") == GOVERNMENT_CLASS else i for i in idents]}


def present(data: dict[str, Any], unmasked: bool) -> dict[str, Any]:
    return {**mask_government_identifiers(data), "masked": False} if unmasked else mask_contact(data)


def may_unmask(principal) -> bool:
    return principal is not None and principal.can(Permission.PHI_READ_UNMASKED)


def wants_unmasked(principal, masked_requested: bool = False) -> bool:
    """Holders of ``phi:read_unmasked`` see clear values unless they ask for the masked view."""
    return may_unmask(principal) and not masked_requested
