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


def mask_contact(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a contact dict (see ``service.contact_dicts``) with direct identifiers masked."""
    out = dict(data)
    for name in ("given_name", "middle_name", "family_name"):
        out[name] = mask_name(out.get(name))
    for name in ("name_prefix", "name_suffix"):
        out[name] = None
    for name in ("address_line1", "address_line2"):
        out[name] = MASK if out.get(name) else None
    out["email"] = mask_email(out.get("email"))
    out["emails"] = [mask_email(e) for e in out.get("emails") or []]
    out["phone"] = mask_phone(out.get("phone"))
    out["phones"] = [{**p, "value": mask_phone(p.get("value"))} for p in out.get("phones") or []]
    out["identifiers"] = [{**i, "value": mask_identifier(i.get("value"))} for i in out.get("identifiers") or []]
    out["mrn"] = mask_identifier(out.get("mrn"))
    out["external_id"] = mask_identifier(out.get("external_id"))
    out["birth_date"] = mask_birth_date(out.get("birth_date"))
    out["masked"] = True
    return out


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
