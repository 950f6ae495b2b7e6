"""Contacts and their clinical facts: plain functions taking a session.

Direct identifiers are encrypted on write and decrypted only into the dicts these functions
return (in memory, for the caller that asked). Lookups by email, phone, MRN or source id go through
blind indexes. Callers commit; these functions only flush.

Other capabilities extend two points here:

* :func:`register_deletion_hook` — called with the blind indexes of a contact being deleted, so
  consent can keep suppressions and opt-outs (a re-import must never mail someone who opted out)
  and authorization evidence for its retention period;
* :func:`register_export_section` — adds a section (consent, message history) to a patient's
  right-of-access export (45 CFR 164.524).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.patients.models import (
    ATTRIBUTE_TYPES,
    ENCRYPTED_CONTACT_FIELDS,
    FACT_MODELS,
    PLAIN_CONTACT_FIELDS,
    Appointment,
    ClinicalFact,
    Contact,
    ContactIdentifier,
    CustomAttributeDefinition,
    CustomAttributeValue,
    Encounter,
    IdentifierSystem,
)
from carepost.patients.schemas import AttributeDefinitionIn, ContactIn, FactIn

SOURCE_SYSTEM = "urn:carepost:source"
EXTERNAL_TYPE = "external"
MRN_TYPE = "MR"
MEMBER_TYPE = "MB"

# Short names of the code systems CarePost speaks; FHIR URIs and OIDs map onto them.
CODE_SYSTEMS = {
    "http://hl7.org/fhir/sid/icd-10-cm": "icd10cm",
    "http://hl7.org/fhir/sid/icd-10": "icd10",
    "http://snomed.info/sct": "snomed",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "rxnorm",
    "http://loinc.org": "loinc",
    "http://hl7.org/fhir/sid/cvx": "cvx",
    "http://www.ama-assn.org/go/cpt": "cpt",
    "http://hl7.org/fhir/sid/ndc": "ndc",
    "http://www.cms.gov/Medicare/Coding/ICD10": "icd10pcs",
    "urn:oid:2.16.840.1.113883.6.90": "icd10cm",
    "urn:oid:2.16.840.1.113883.6.96": "snomed",
    "urn:oid:2.16.840.1.113883.6.88": "rxnorm",
    "urn:oid:2.16.840.1.113883.6.1": "loinc",
    "urn:oid:2.16.840.1.113883.12.292": "cvx",
    "http://terminology.hl7.org/CodeSystem/v3-ActCode": "v3-actcode",
}
SHORT_CODE_SYSTEMS = set(CODE_SYSTEMS.values())
PREFERRED_SYSTEMS = ("icd10cm", "snomed", "rxnorm", "loinc", "cvx", "cpt", "icd10pcs", "ndc", "icd10")


def normalize_code_system(system: str | None) -> str | None:
    if not system:
        return None
    system = system.strip()
    if system in SHORT_CODE_SYSTEMS:
        return system
    return CODE_SYSTEMS.get(system, system[:40])


# --------------------------------------------------------------------------- identifier classes (minimum necessary)

# 45 CFR 164.502(b), minimum necessary: no email needs a Social Security, driver's licence or
# passport number. Identifiers of these classes are not stored unless the organization keeps
# their system on purpose (``identifier_policy.keep_systems``); where kept, even the unmasked view
# shows the last four characters unless one is revealed (audited).
GOVERNMENT_CLASS = "government"
RECORD_CLASS = "record"
# HL7 v2 table 0203 identifier type codes of government-issued and national identifiers.
GOVERNMENT_TYPE_CODES = frozenset({
    "SS", "SSN", "DL", "PPN", "TAX", "NI", "SB", "CZ", "BC", "VS", "PRC", "MI", "WP", "TN", "ITIN", "EIN", "HC",
})
GOVERNMENT_SYSTEMS = frozenset({
    "http://hl7.org/fhir/sid/us-ssn",
    "urn:oid:2.16.840.1.113883.4.1",  # US SSN
    "http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber",  # Synthea's passports
    "http://hl7.org/fhir/sid/us-itin",
    "urn:carepost:ssn", "urn:carepost:drivers-license", "urn:carepost:passport",
})
GOVERNMENT_SYSTEM_PREFIXES = (
    "urn:oid:2.16.840.1.113883.4.3.",  # US state driver's licences (Synthea: .4.3.25)
    "urn:oid:2.16.840.1.113883.4.330.",  # passports by country
    "http://hl7.org/fhir/sid/passport-",
)
# CSV columns of government identifiers -> (system, type code)
GOVERNMENT_COLUMNS = {
    "ssn": ("http://hl7.org/fhir/sid/us-ssn", "SS"),
    "drivers_license": ("urn:carepost:drivers-license", "DL"),
    "passport": ("urn:carepost:passport", "PPN"),
}


def identifier_class(system: str | None, type_code: str | None) -> str:
    """``government`` (SSN, driver's licence, passport, tax and other national ids) or
    ``record`` (MRN, member id, external id and everything else)."""
    code = (type_code or "").strip().upper()
    if code in GOVERNMENT_TYPE_CODES or (len(code) == 5 and code.startswith("NN") and code[2:].isalpha()):
        return GOVERNMENT_CLASS
    system = (system or "").strip()
    if system in GOVERNMENT_SYSTEMS or system.startswith(GOVERNMENT_SYSTEM_PREFIXES):
        return GOVERNMENT_CLASS
    return RECORD_CLASS


def kept_government_systems(session: Session, org_id: str) -> set[str]:
    """Systems of government identifiers the organization chose to keep (none by default)."""
    from carepost.accounts.service import get_organization

    cache = session.info.setdefault("_carepost_identifier_policy", {})
    if org_id not in cache:
        org = get_organization(session, org_id)
        cache[org_id] = set(((org.settings or {}).get("identifier_policy") or {}).get("keep_systems") or [])
    return cache[org_id]


def identifier_policy(session: Session, org_id: str) -> dict:
    return {"keep_systems": sorted(kept_government_systems(session, org_id))}


def set_identifier_policy(session: Session, org_id: str, keep_systems: list[str]) -> dict:
    """Opt in, per system, to keeping government identifiers (SSN, driver's licence, passport...)."""
    from carepost.accounts.service import get_organization

    cleaned = []
    for i, system in enumerate(keep_systems):
        system = (system or "").strip()
        if not system or len(system) > 255:
            raise ValidationFailed("A system is a URI of at most 255 characters.", field=f"keep_systems.{i}")
        cleaned.append(system)
    org = get_organization(session, org_id)
    org.settings = {**(org.settings or {}), "identifier_policy": {"keep_systems": sorted(set(cleaned))}}
    session.info.pop("_carepost_identifier_policy", None)
    session.flush()
    return identifier_policy(session, org_id)


def mask_last_four(value: str | None) -> str | None:
    """``***1234``: what even the unmasked view shows of a government identifier."""
    if not value:
        return value
    return "***" + value[-4:] if len(value) > 4 else "***"


# --------------------------------------------------------------------------- encryption helpers


def _encrypt(session: Session, org_id: str, table: str, column: str, row_id: str, value: str | None) -> bytes | None:
    if value is None or value == "":
        return None
    return get_keyring().encrypt(session, org_id, table, column, row_id, value)


def _decrypt(session: Session, org_id: str, table: str, column: str, row_id: str, blob: bytes | None) -> str | None:
    return get_keyring().decrypt_text(session, org_id, table, column, row_id, blob)


def blind_index(session: Session, org_id: str, kind: str, value: str, system: str | None = None) -> str:
    return get_keyring().blind_index(session, org_id, kind, value, system=system)


def source_index(session: Session, org_id: str, ref: str) -> str:
    """Blind index of a source reference (``Patient/abc``, ``urn:uuid:...``): exact, case kept."""
    return get_keyring().blind_index(session, org_id, "identifier", ref, system=SOURCE_SYSTEM)


def identifier_index(session: Session, org_id: str, kind: str, value: str, system: str | None = None) -> str:
    if kind == "identifier":
        return blind_index(session, org_id, "identifier", value, system=system)
    return blind_index(session, org_id, kind, value)


_PHONE_DIGITS = re.compile(r"\D")

# --------------------------------------------------------------------------- name tokens (search without clear names)

NAME_KIND = "name"  # ContactIdentifier rows holding only the blind index of one name token
NAME_FIELDS = ("given_name", "middle_name", "family_name")
MAX_NAME_TOKENS = 12
_TOKEN_SPLIT = re.compile(r"[^\w]+|_")


def name_tokens(*parts: str | None) -> list[str]:
    """Normalized tokens of names: NFKD, accents stripped, case-folded, split on anything that is
    not a letter or digit (``Nguyễn-Smith`` -> ``nguyen``, ``smith``; ``O'Brien`` -> ``o``,
    ``brien``). Distinct, in order; a search and the index use the same function."""
    import unicodedata

    out: list[str] = []
    for part in parts:
        if not part:
            continue
        text = unicodedata.normalize("NFKD", part)
        text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
        text = text.replace("ß", "ss").replace("ø", "o").replace("ł", "l").replace("đ", "d").replace("æ", "ae").replace("œ", "oe")
        for token in _TOKEN_SPLIT.split(text):
            if token and token not in out:
                out.append(token)
    return out[:MAX_NAME_TOKENS]


def name_token_indexes(session: Session, org_id: str, tokens: Iterable[str]) -> list[str]:
    """Keyed blind indexes (the organization's blind-index key, as for email and MRN) of tokens."""
    return [blind_index(session, org_id, NAME_KIND, t) for t in tokens]


def write_name_tokens(session: Session, org_id: str, contact: Contact, names: dict[str, str | None] | None = None) -> int:
    """Replace the name-token indexes of a contact from its names (``names`` given, else
    decrypted from the contact). Returns how many tokens it holds now."""
    if names is None:
        names = {n: _decrypt(session, org_id, "contacts", n, contact.id, getattr(contact, f"{n}_enc")) for n in NAME_FIELDS}
    session.execute(delete(ContactIdentifier).where(ContactIdentifier.org_id == org_id, ContactIdentifier.contact_id == contact.id,
                                                    ContactIdentifier.kind == NAME_KIND))
    indexes = list(dict.fromkeys(name_token_indexes(session, org_id, name_tokens(*(names.get(n) for n in NAME_FIELDS)))))
    for rank, idx in enumerate(indexes):
        session.add(ContactIdentifier(id=new_id(), org_id=org_id, contact_id=contact.id, kind=NAME_KIND, rank=rank, blind_index=idx))
    return len(indexes)


def find_contact_ids_by_name(session: Session, org_id: str, name: str) -> list[str]:
    """Contacts whose names hold every token of ``name`` (any order, any name part; accents and
    case ignored), found by blind index: no name is decrypted or scanned."""
    tokens = name_tokens(name)
    if not tokens:
        raise ValidationFailed("Enter a name to search for.", field="name")
    indexes = list(dict.fromkeys(name_token_indexes(session, org_id, tokens)))
    rows = session.execute(
        select(ContactIdentifier.contact_id).where(
            ContactIdentifier.org_id == org_id, ContactIdentifier.kind == NAME_KIND, ContactIdentifier.blind_index.in_(indexes))
        .group_by(ContactIdentifier.contact_id).having(func.count(func.distinct(ContactIdentifier.blind_index)) == len(indexes))
    ).scalars().all()
    return sorted(rows)


def reindex_names(session: Session, org_id: str, *, only_missing: bool = True, chunk: int = 500,
                  progress: Callable[[int], None] | None = None) -> int:
    """Write name tokens for the organization's contacts (only those that have none, by
    default): the migration path for contacts stored before name search. Commits per chunk."""
    done = 0
    last = ""
    while True:
        contacts = list(session.scalars(select(Contact).where(Contact.org_id == org_id, Contact.id > last).order_by(Contact.id).limit(chunk)))
        if not contacts:
            break
        last = contacts[-1].id
        ids = [c.id for c in contacts]
        have = set(session.scalars(select(ContactIdentifier.contact_id).where(
            ContactIdentifier.org_id == org_id, ContactIdentifier.kind == NAME_KIND, ContactIdentifier.contact_id.in_(ids)).distinct()))
        for c in contacts:
            if only_missing and c.id in have:
                continue
            if write_name_tokens(session, org_id, c) or c.id in have:
                done += 1
        session.commit()
        if progress:
            progress(len(contacts))
    return done


def normalize_phone(value: str, field: str = "phone") -> str:
    """Keep what the person typed (it is encrypted), but refuse what cannot be a phone number."""
    text = (value or "").strip()
    digits = _PHONE_DIGITS.sub("", text)
    if not 7 <= len(digits) <= 15 or re.search(r"[^0-9+().\-\s/x]", text.lower()):
        raise ValidationFailed("Enter a phone number of 7 to 15 digits.", field=field)
    return text


def normalize_email(value: str, field: str = "email") -> str:
    from carepost.accounts.service import normalize_email as _normalize

    return _normalize(value, field)


# --------------------------------------------------------------------------- look-ups


def get_contact(session: Session, contact_id: str) -> Contact:
    """A contact of the session's organization (the central scope hides everyone else's)."""
    contact = session.get(Contact, contact_id) if is_id(contact_id) else None
    if contact is None or (session.info.get("org_id") and contact.org_id != session.info["org_id"]):
        raise NotFound("No such contact.", field="contact_id")
    return contact


def contacts_by_index(session: Session, org_id: str, kind: str, indexes: Iterable[str]) -> dict[str, str]:
    """blind index -> contact id for identifiers of ``kind`` (first match wins)."""
    indexes = list(set(indexes))
    if not indexes:
        return {}
    found: dict[str, str] = {}
    for start in range(0, len(indexes), 500):
        rows = session.execute(
            select(ContactIdentifier.blind_index, ContactIdentifier.contact_id).where(
                ContactIdentifier.org_id == org_id,
                ContactIdentifier.kind == kind,
                ContactIdentifier.blind_index.in_(indexes[start : start + 500]),
            )
        ).all()
        for idx, contact_id in rows:
            found.setdefault(idx, contact_id)
    return found


def find_contact_ids(
    session: Session,
    org_id: str,
    *,
    email: str | None = None,
    phone: str | None = None,
    mrn: str | None = None,
    identifier: str | None = None,
    system: str | None = None,
) -> list[str]:
    """Exact search by a direct identifier through its blind index (no scan, no decryption).

    An MRN without ``system`` is tried in every identifier system the organization holds MRNs in.
    """
    clauses = []
    if email:
        clauses.append(and_(ContactIdentifier.kind == "email", ContactIdentifier.blind_index == blind_index(session, org_id, "email", email)))
    if phone:
        clauses.append(and_(ContactIdentifier.kind == "phone", ContactIdentifier.blind_index == blind_index(session, org_id, "phone", phone)))
    if mrn or identifier:
        value = mrn or identifier
        systems = [system] if system else sorted({
            s for s, t in identifier_systems(session, org_id) if not mrn or t == MRN_TYPE
        })
        indexes = [blind_index(session, org_id, "identifier", value, system=s) for s in systems if s]
        if indexes:
            clauses.append(and_(ContactIdentifier.kind == "identifier", ContactIdentifier.blind_index.in_(indexes)))
        elif not clauses:
            return []
    if not clauses:
        raise ValidationFailed("Search by email, phone or MRN.", field="q")
    rows = session.scalars(
        select(ContactIdentifier.contact_id).where(ContactIdentifier.org_id == org_id, or_(*clauses)).distinct()
    ).all()
    return sorted(set(rows))


def find_contact_ids_by_mrns(session: Session, org_id: str,
                             values: Iterable[tuple[str, str | None]]) -> dict[tuple[str, str | None], list[str]]:
    """:func:`find_contact_ids` by MRN for many ``(value, system)`` at once: the same answers
    (every MRN system the organization holds when ``system`` is None; more than one id means
    ambiguous), one query per 500 blind indexes instead of one per value (the HL7 listener's
    group of messages)."""
    wanted = list(dict.fromkeys(values))
    all_systems = sorted({s for s, t in identifier_systems(session, org_id) if t == MRN_TYPE and s})
    by_index: dict[str, list[tuple[str, str | None]]] = {}
    for value, system in wanted:
        for s in ([system] if system else all_systems):
            by_index.setdefault(blind_index(session, org_id, "identifier", value, system=s), []).append((value, system))
    found: dict[tuple[str, str | None], set[str]] = {key: set() for key in wanted}
    indexes = list(by_index)
    for start in range(0, len(indexes), 500):
        if session.info.get("org_id") == org_id:  # a scoped Core statement: no ORM cost per group
            from carepost.core.scoped_select import org_select

            if session.autoflush:
                session.flush()  # what an ORM query would have written first (a Core one does not)

            rows = org_select(session, _IDENTIFIERS_BY_INDEX, {"indexes": indexes[start:start + 500]}).all()
        else:
            rows = session.execute(select(ContactIdentifier.blind_index, ContactIdentifier.contact_id).where(
                ContactIdentifier.org_id == org_id, ContactIdentifier.kind == "identifier",
                ContactIdentifier.blind_index.in_(indexes[start:start + 500]))).all()
        for idx, contact_id in rows:
            for key in by_index.get(idx, ()):
                found[key].add(contact_id)
    return {key: sorted(ids) for key, ids in found.items()}


def move_mrns(session: Session, org_id: str, values: Iterable[tuple[str, str | None]], contact_id: str, *,
              dry_run: bool = False) -> list[str]:
    """A merge of patient records (HL7 ADT^A40): the MRNs ``(value, system)`` — every MRN system
    of the organization when ``system`` is None, as :func:`find_contact_ids_by_mrns` — are moved
    to ``contact_id``, found by their blind indexes (no MRN is compared or stored in clear), so a
    message naming a prior MRN finds the surviving contact. Returns the ids of the contacts they
    were moved from (nothing else of those contacts changes: their own data is not merged).
    Moved identifiers come after the contact's own (``rank``). ``dry_run``: only which contacts
    they would be moved from."""
    all_systems = sorted({s for s, t in identifier_systems(session, org_id) if t == MRN_TYPE and s})
    indexes = sorted({blind_index(session, org_id, "identifier", value, system=s)
                      for value, system in values for s in ([system] if system else all_systems)})
    if not indexes:
        return []
    rows = session.scalars(select(ContactIdentifier).where(
        ContactIdentifier.org_id == org_id, ContactIdentifier.kind == "identifier",
        ContactIdentifier.blind_index.in_(indexes), ContactIdentifier.contact_id != contact_id)).all()
    if not rows:
        return []
    rank = session.scalar(select(func.max(ContactIdentifier.rank)).where(
        ContactIdentifier.org_id == org_id, ContactIdentifier.contact_id == contact_id,
        ContactIdentifier.kind == "identifier")) or 0
    moved_from = sorted({row.contact_id for row in rows})
    if dry_run:
        return moved_from
    for n, row in enumerate(rows, start=1):
        row.contact_id, row.rank = contact_id, rank + n
    session.flush()
    return moved_from


def identifier_systems(session: Session, org_id: str) -> set[tuple[str, str]]:
    """(system, type code) pairs the organization holds identifiers in; cached per session."""
    cache = session.info.setdefault("_carepost_identifier_systems", {})
    if org_id not in cache:
        if session.info.get("org_id") == org_id:  # a scoped Core statement (the listener's group)
            from carepost.core.scoped_select import org_select

            if session.autoflush:
                session.flush()  # what an ORM query would have written first (a Core one does not)

            rows = org_select(session, _IDENTIFIER_SYSTEMS)
        else:
            rows = session.execute(select(IdentifierSystem.system, IdentifierSystem.type_code)
                                   .where(IdentifierSystem.org_id == org_id))
        cache[org_id] = {(s, t or "") for s, t in rows}
    return cache[org_id]


# Core statements for :func:`org_select` (the organization is added by it, from the session).
_IDENTIFIERS_BY_INDEX = (
    select(ContactIdentifier.__table__.c.blind_index, ContactIdentifier.__table__.c.contact_id)
    .where(ContactIdentifier.__table__.c.kind == "identifier",
           ContactIdentifier.__table__.c.blind_index.in_(bindparam("indexes", expanding=True)))
)
_IDENTIFIER_SYSTEMS = select(IdentifierSystem.__table__.c.system, IdentifierSystem.__table__.c.type_code)


def register_identifier_systems(session: Session, org_id: str, pairs: Iterable[tuple[str, str | None]]) -> None:
    known = identifier_systems(session, org_id)
    for system, type_code in {(s, t or "") for s, t in pairs}:
        if (system, type_code) in known:
            continue
        try:
            with session.begin_nested():
                session.add(IdentifierSystem(org_id=org_id, system=system, type_code=type_code))
        except IntegrityError:
            pass  # another writer registered it first
        known.add((system, type_code))


def contact_for_sources(session: Session, org_id: str, refs: Iterable[str]) -> str | None:
    found = contacts_by_index(session, org_id, "source", [source_index(session, org_id, r) for r in refs if r])
    return next(iter(found.values()), None)


# --------------------------------------------------------------------------- writing contacts


@dataclass
class SaveResult:
    contact: Contact
    created: bool
    identifiers_not_kept: int = 0  # government identifiers left out (minimum necessary)


class DuplicateInImport(ValidationFailed):
    code = "duplicate_in_file"


def _identifier_specs(data: dict) -> list[tuple[str, str, str]]:
    """(system, value, type) of every identifier named in the input."""
    specs = []
    if data.get("external_id"):
        specs.append((data.get("external_id_system") or "urn:carepost:external", data["external_id"], EXTERNAL_TYPE))
    if data.get("mrn"):
        specs.append((data.get("mrn_system") or "urn:carepost:mrn", data["mrn"], MRN_TYPE))
    for i, ident in enumerate(data.get("identifiers") or []):
        ident = ident if isinstance(ident, dict) else ident.model_dump()
        specs.append((ident["system"].strip(), ident["value"].strip(), (ident.get("type") or "").strip() or None))
        if not specs[-1][0] or not specs[-1][1]:
            raise ValidationFailed("An identifier needs a system and a value.", field=f"identifiers.{i}")
    return specs


def save_contact(
    session: Session,
    org_id: str,
    data: ContactIn | dict,
    *,
    source: str = "api",
    source_refs: Iterable[str] = (),
    import_id: str | None = None,
    contact: Contact | None = None,
) -> SaveResult:
    """Create a contact, or update the one that holds the same source reference or external id.

    Only fields present in ``data`` change (PATCH semantics); ``email``/``emails`` and
    ``phone``/``phones`` replace the set they name. Within one import, a second record for the
    same source is refused (:class:`DuplicateInImport`) rather than silently merged.
    """
    if isinstance(data, ContactIn):
        fields = data.model_dump(exclude_unset=True)
    else:
        fields = dict(data)
    refs = [r for r in source_refs if r]
    source_idx = [source_index(session, org_id, r) for r in refs]
    specs = _identifier_specs(fields)
    not_kept = 0
    if specs:
        kept = None
        wanted = []
        for system, value, type_code in specs:
            if identifier_class(system, type_code) == GOVERNMENT_CLASS:
                kept = kept_government_systems(session, org_id) if kept is None else kept
                if system not in kept:
                    not_kept += 1  # never stored, not even as a blind index
                    continue
            wanted.append((system, value, type_code))
        specs = wanted
    spec_idx = [(s, v, t, identifier_index(session, org_id, "identifier", v, s)) for s, v, t in specs]

    holders: dict[str, str] = {}
    by_source: dict[str, str] = {}
    lookups = [("identifier", i) for *_, i in spec_idx] + ([("source", i) for i in source_idx] if contact is None else [])
    if lookups:  # one query for every identifier and source reference of the record
        for kind, idx, contact_id in session.execute(
            select(ContactIdentifier.kind, ContactIdentifier.blind_index, ContactIdentifier.contact_id).where(
                ContactIdentifier.org_id == org_id, ContactIdentifier.kind.in_({k for k, _ in lookups}),
                ContactIdentifier.blind_index.in_([i for _, i in lookups]))
        ):
            (holders if kind == "identifier" else by_source).setdefault(idx, contact_id)
    if contact is None:
        candidates = [by_source[i] for i in source_idx if i in by_source] + [holders[i] for *_, i in spec_idx if i in holders]
        if candidates:
            contact = session.get(Contact, candidates[0])
    for (system, _value, type_code, idx) in spec_idx:
        holder = holders.get(idx)
        if holder and contact is not None and holder != contact.id:
            field_name = "external_id" if type_code == EXTERNAL_TYPE else ("mrn" if type_code == MRN_TYPE else "identifiers")
            raise Conflict("Another contact already holds this identifier.", field=field_name)

    created = contact is None
    if created:
        contact = Contact(id=new_id(), org_id=org_id, source=source, care_stage="new", care_stage_changed_at=clock.now())
        session.add(contact)
    elif import_id and contact.last_import_id == import_id:
        raise DuplicateInImport("The same patient appears more than once in this file; the first record was kept.", field="id")
    if import_id:
        contact.last_import_id = import_id

    for name in ENCRYPTED_CONTACT_FIELDS:
        if name in fields:
            value = fields[name]
            setattr(contact, f"{name}_enc", _encrypt(session, org_id, "contacts", name, contact.id, value or None))
    for name in PLAIN_CONTACT_FIELDS:
        if name in fields:
            value = fields[name]
            if name == "deceased":
                value = bool(value)
            elif name == "postal_code" and value:
                value = str(value).strip().upper()
            elif name == "state" and value:
                value = str(value).strip().upper() if len(str(value).strip()) <= 3 else str(value).strip()
            setattr(contact, name, value)
    if "care_stage" in fields:
        set_stage_override(session, org_id, contact, fields["care_stage"])
    if contact.deceased and contact.care_stage != TERMINAL_STAGE:
        contact.care_stage = TERMINAL_STAGE
        contact.care_stage_changed_at = clock.now()
    revived = "deceased" in fields and not contact.deceased and contact.care_stage == TERMINAL_STAGE

    if created:
        session.flush()
    existing = [] if created else list(session.scalars(select(ContactIdentifier).where(ContactIdentifier.contact_id == contact.id)))
    _write_identifiers(session, org_id, contact, fields, existing, spec_idx, source_idx)
    if any(n in fields for n in NAME_FIELDS):
        write_name_tokens(session, org_id, contact, {n: fields[n] if n in fields else _decrypt(
            session, org_id, "contacts", n, contact.id, getattr(contact, f"{n}_enc")) for n in NAME_FIELDS})
    elif not created and not any(row.kind == NAME_KIND for row in existing):
        write_name_tokens(session, org_id, contact)  # stored before name search: indexed when next written
    if "attributes" in fields and fields["attributes"] is not None:
        set_attributes(session, org_id, contact, fields["attributes"])
    if not created:
        contact.updated_at = clock.now()
        if ("care_stage" in fields and not fields["care_stage"]) or revived:
            refresh_care_stages(session, org_id, [contact.id])  # back to the derived stage at once
    return SaveResult(contact, created, not_kept)


def _write_identifiers(session, org_id, contact, fields, existing, spec_idx, source_idx) -> None:
    by_kind: dict[str, list[ContactIdentifier]] = {}
    for row in existing:
        by_kind.setdefault(row.kind, []).append(row)

    def add(kind, value, idx, *, system=None, type_code=None, use=None, rank=0, encrypt=True):
        row = ContactIdentifier(id=new_id(), org_id=org_id, contact_id=contact.id, kind=kind, system=system,
                                type_code=type_code, use=use, rank=rank, blind_index=idx)
        if encrypt:
            row.value_enc = _encrypt(session, org_id, "contact_identifiers", "value", row.id, value)
        session.add(row)
        by_kind.setdefault(kind, []).append(row)

    # emails: replace the set when named
    if "email" in fields or "emails" in fields:
        emails: list[str] = []
        if fields.get("email"):
            emails.append(normalize_email(fields["email"], "email"))
        for i, e in enumerate(fields.get("emails") or []):
            value = normalize_email(e, f"emails.{i}")
            if value not in emails:
                emails.append(value)
        _replace_set(session, org_id, by_kind.get("email", []), emails, "email", add)
    if "phone" in fields or "phones" in fields:
        phones: list[tuple[str, str | None]] = []
        if fields.get("phone"):
            phones.append((normalize_phone(fields["phone"], "phone"), None))
        for i, p in enumerate(fields.get("phones") or []):
            p = p if isinstance(p, dict) else p.model_dump()
            phones.append((normalize_phone(p["value"], f"phones.{i}.value"), p.get("use")))
        _replace_set(session, org_id, by_kind.get("phone", []), phones, "phone", add)
    # identifiers: merged, one value per system
    if spec_idx:
        register_identifier_systems(session, org_id, [(system, type_code) for system, _v, type_code, _i in spec_idx])
    current = {row.system: row for row in by_kind.get("identifier", [])}
    for system, value, type_code, idx in spec_idx:
        row = current.get(system)
        if row is not None and row.blind_index == idx:
            if type_code and row.type_code != type_code:
                row.type_code = type_code
            continue
        if row is not None:
            session.delete(row)
        add("identifier", value, idx, system=system, type_code=type_code)
        current[system] = by_kind["identifier"][-1]
    have_sources = {row.blind_index for row in by_kind.get("source", [])}
    for idx in source_idx:
        if idx not in have_sources:
            add("source", None, idx, encrypt=False)
            have_sources.add(idx)


def _replace_set(session, org_id, rows, wanted, kind, add) -> None:
    wanted_pairs = [(w, None) if isinstance(w, str) else w for w in wanted]
    wanted_idx = [blind_index(session, org_id, kind, v) for v, _ in wanted_pairs]
    keep = {}
    for row in rows:
        if row.blind_index in wanted_idx and row.blind_index not in keep:
            keep[row.blind_index] = row
        else:
            session.delete(row)
    added: set[str] = set()
    for rank, ((value, use), idx) in enumerate(zip(wanted_pairs, wanted_idx)):
        if idx in added:
            continue
        added.add(idx)
        row = keep.get(idx)
        if row is None:
            add(kind, value, idx, use=use, rank=rank)
        else:
            row.rank = rank
            if use:
                row.use = use


# --------------------------------------------------------------------------- reading contacts


def reveal_identifier(session: Session, contact_id: str, identifier_id: str) -> dict:
    """One identifier of a contact in clear (a government identifier is otherwise shown to its
    last four characters); the caller audits the reveal."""
    contact = get_contact(session, contact_id)
    row = session.get(ContactIdentifier, identifier_id) if is_id(identifier_id) else None
    if row is None or row.contact_id != contact.id or row.kind != "identifier" or row.org_id != contact.org_id:
        raise NotFound("No such identifier.", field="identifier_id")
    value = _decrypt(session, contact.org_id, "contact_identifiers", "value", row.id, row.value_enc)
    return {"id": row.id, "system": row.system, "type": row.type_code, "value": value,
            "class": identifier_class(row.system, row.type_code)}


def _attribute_definitions(session: Session, org_id: str) -> dict[str, CustomAttributeDefinition]:
    cache = session.info.setdefault("_carepost_attr_defs", {})
    if org_id not in cache:
        cache[org_id] = {
            d.key: d for d in session.scalars(select(CustomAttributeDefinition).where(CustomAttributeDefinition.org_id == org_id))
        }
    return cache[org_id]


def _forget_attribute_definitions(session: Session) -> None:
    session.info.pop("_carepost_attr_defs", None)


def contact_dicts(session: Session, contacts: list[Contact]) -> list[dict]:
    """Decrypted views of contacts (identifiers and attributes loaded in one query each)."""
    if not contacts:
        return []
    ids = [c.id for c in contacts]
    idents: dict[str, list[ContactIdentifier]] = {}
    for row in session.scalars(
        select(ContactIdentifier).where(ContactIdentifier.contact_id.in_(ids), ContactIdentifier.kind.notin_(("source", NAME_KIND)))
        .order_by(ContactIdentifier.kind, ContactIdentifier.rank, ContactIdentifier.created_at)
    ):
        idents.setdefault(row.contact_id, []).append(row)
    attrs: dict[str, dict[str, Any]] = {}
    org_id = contacts[0].org_id
    values = list(session.scalars(select(CustomAttributeValue).where(CustomAttributeValue.contact_id.in_(ids))))
    # The definitions only when there are values to name (most contacts have none: one query less).
    defs_by_id = {d.id: d for d in _attribute_definitions(session, org_id).values()} if values else {}
    for v in values:
        d = defs_by_id.get(v.definition_id)
        if d is None:
            continue
        value = _attr_value(d, v)
        bucket = attrs.setdefault(v.contact_id, {})
        if d.type == "list":
            bucket.setdefault(d.key, []).append(value)
        else:
            bucket[d.key] = value
    return [_contact_dict(session, c, idents.get(c.id, []), attrs.get(c.id, {})) for c in contacts]


def contact_dict(session: Session, contact: Contact) -> dict:
    return contact_dicts(session, [contact])[0]


# One contact read for the API's hot path (issue 11 item 6): the contact and its identifiers in
# one Core statement, its attribute values (with their definitions) in a second, both scoped to
# the session's organization by ``core.scoped_select`` — no ORM objects, no per-field key look-up.
_CONTACTS, _IDENTS = Contact.__table__, ContactIdentifier.__table__
_VALUES, _DEFS = CustomAttributeValue.__table__, CustomAttributeDefinition.__table__
_CONTACT_WITH_IDENTIFIERS = (
    select(_CONTACTS, _IDENTS.c.id.label("ident_id"), _IDENTS.c.kind.label("ident_kind"),
           _IDENTS.c.system.label("ident_system"), _IDENTS.c.type_code.label("ident_type"),
           _IDENTS.c.use.label("ident_use"), _IDENTS.c.value_enc.label("ident_value_enc"))
    .select_from(_CONTACTS.outerjoin(_IDENTS, and_(_IDENTS.c.contact_id == _CONTACTS.c.id,
                                                   _IDENTS.c.kind.notin_(("source", NAME_KIND)))))
    .where(_CONTACTS.c.id == bindparam("contact_id"))
    .order_by(_IDENTS.c.kind, _IDENTS.c.rank, _IDENTS.c.created_at)
)
_CONTACT_ATTRIBUTES = (
    select(_DEFS.c.key, _DEFS.c.type, _VALUES.c.value_text, _VALUES.c.value_number, _VALUES.c.value_date,
           _VALUES.c.value_boolean)
    .select_from(_VALUES.join(_DEFS, _DEFS.c.id == _VALUES.c.definition_id))
    .where(_VALUES.c.contact_id == bindparam("contact_id"))
)


def _identifier_fields(out: dict[str, Any], idents) -> None:
    """Fill a contact dict's emails, phones, identifiers, MRN and external id from
    ``(id, kind, system, type, use, decrypted value)`` tuples, in order."""
    emails, phones, identifiers = [], [], []
    for ident_id, kind, system, type_code, use, value in idents:
        if kind == "email":
            emails.append(value)
        elif kind == "phone":
            phones.append({"value": value, "use": use})
        elif kind == "identifier":
            identifiers.append({"id": ident_id, "system": system, "type": type_code, "value": value,
                                "class": identifier_class(system, type_code)})
    out["email"] = emails[0] if emails else None
    out["emails"] = emails
    out["phone"] = phones[0]["value"] if phones else None
    out["phones"] = phones
    out["identifiers"] = identifiers
    out["mrn"] = next((i["value"] for i in identifiers if i["type"] == MRN_TYPE), None)
    out["external_id"] = next((i["value"] for i in identifiers if i["type"] == EXTERNAL_TYPE), None)


def contact_view(session: Session, contact_id: str) -> dict:
    """``contact_dict(session, get_contact(session, contact_id))`` in two scoped Core statements
    (same shape, same values); NotFound for another organization's or an unknown id."""
    from carepost.core.scoped_select import org_select

    rows = org_select(session, _CONTACT_WITH_IDENTIFIERS, {"contact_id": contact_id}).all() if is_id(contact_id) else []
    if not rows:
        raise NotFound("No such contact.", field="contact_id")
    c = rows[0]._mapping
    decrypt = get_keyring().text_decryptor(session, c["org_id"])
    out: dict[str, Any] = {"id": c["id"]}
    for name in ENCRYPTED_CONTACT_FIELDS:
        out[name] = decrypt("contacts", name, c["id"], c[f"{name}_enc"])
    for name in PLAIN_CONTACT_FIELDS:
        value = c[name]
        out[name] = value.isoformat() if isinstance(value, date) else value
    _identifier_fields(out, ((row.ident_id, row.ident_kind, row.ident_system, row.ident_type, row.ident_use,
                              decrypt("contact_identifiers", "value", row.ident_id, row.ident_value_enc))
                             for row in rows if row.ident_id is not None))
    attrs: dict[str, Any] = {}
    for key, type_, text, number, day, boolean in org_select(session, _CONTACT_ATTRIBUTES, {"contact_id": c["id"]}):
        value = number if type_ == "number" else (day.isoformat() if day else None) if type_ == "date" else \
            boolean if type_ == "boolean" else text
        if type_ == "list":
            attrs.setdefault(key, []).append(value)
        else:
            attrs[key] = value
    out["attributes"] = attrs
    out["care_stage"] = c["care_stage"]
    out["care_stage_is_override"] = c["care_stage_override"] is not None
    out["source"] = c["source"]
    out["created_at"] = clock.aware(c["created_at"]).isoformat()
    out["updated_at"] = clock.aware(c["updated_at"]).isoformat()
    return out


def _contact_dict(session, c: Contact, idents: list[ContactIdentifier], attrs: dict) -> dict:
    out: dict[str, Any] = {"id": c.id}
    for name in ENCRYPTED_CONTACT_FIELDS:
        out[name] = _decrypt(session, c.org_id, "contacts", name, c.id, getattr(c, f"{name}_enc"))
    for name in PLAIN_CONTACT_FIELDS:
        value = getattr(c, name)
        out[name] = value.isoformat() if isinstance(value, date) else value
    _identifier_fields(out, ((row.id, row.kind, row.system, row.type_code, row.use,
                              _decrypt(session, c.org_id, "contact_identifiers", "value", row.id, row.value_enc))
                             for row in idents))
    out["attributes"] = attrs
    out["care_stage"] = c.care_stage
    out["care_stage_is_override"] = c.care_stage_override is not None
    out["source"] = c.source
    out["created_at"] = clock.aware(c.created_at).isoformat()
    out["updated_at"] = clock.aware(c.updated_at).isoformat()
    return out


@dataclass
class ContactFilters:
    care_stage: str | None = None
    sex: str | None = None
    state: str | None = None
    city: str | None = None
    postal_code: str | None = None
    preferred_language: str | None = None
    coverage_type: str | None = None
    born_after: date | None = None
    born_before: date | None = None
    updated_since: datetime | None = None
    ids: list[str] | None = None


def encode_cursor(contact_id: str) -> str:
    return base64.urlsafe_b64encode(contact_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        value = ""
    if not is_id(value):
        raise ValidationFailed("The cursor is not valid; start again without it.", field="cursor")
    return value


def list_contacts(session: Session, org_id: str, filters: ContactFilters, *, cursor: str | None = None, limit: int = 50) -> tuple[list[Contact], str | None]:
    """A page of contacts in creation order and the cursor of the next page (keyset pagination)."""
    if not 1 <= limit <= 500:
        raise ValidationFailed("limit must be between 1 and 500.", field="limit")
    q = select(Contact).where(Contact.org_id == org_id)
    for name in ("care_stage", "sex", "city", "preferred_language", "coverage_type"):
        value = getattr(filters, name)
        if value:
            q = q.where(getattr(Contact, name) == value)
    if filters.state:
        q = q.where(Contact.state == filters.state.upper())
    if filters.postal_code:
        q = q.where(Contact.postal_code.startswith(filters.postal_code.upper()))
    if filters.born_after:
        q = q.where(Contact.birth_date >= filters.born_after)
    if filters.born_before:
        q = q.where(Contact.birth_date <= filters.born_before)
    if filters.updated_since:
        q = q.where(Contact.updated_at >= filters.updated_since)
    if filters.ids is not None:
        q = q.where(Contact.id.in_(filters.ids or [""]))
    if cursor:
        q = q.where(Contact.id > decode_cursor(cursor))
    rows = list(session.scalars(q.order_by(Contact.id).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def count_contacts(session: Session, org_id: str, *, deceased: bool | None = None) -> int:
    """How many contacts (``deceased=True``: only those marked deceased, whom consent excludes from every send)."""
    q = select(func.count()).select_from(Contact).where(Contact.org_id == org_id)
    if deceased is not None:
        q = q.where(Contact.deceased.is_(deceased))
    return session.scalar(q) or 0


# --------------------------------------------------------------------------- custom attributes


def define_attribute(session: Session, org_id: str, data: AttributeDefinitionIn) -> CustomAttributeDefinition:
    if data.type not in ATTRIBUTE_TYPES:
        raise ValidationFailed("Unknown attribute type.", field="type")
    if data.type == "list" and not data.options:
        raise ValidationFailed("A list attribute needs its options.", field="options")
    if session.scalar(select(CustomAttributeDefinition.id).where(CustomAttributeDefinition.org_id == org_id, CustomAttributeDefinition.key == data.key)):
        raise Conflict("An attribute with this key exists.", field="key")
    d = CustomAttributeDefinition(org_id=org_id, key=data.key, label=data.label, type=data.type, options=list(data.options))
    session.add(d)
    session.flush()
    _forget_attribute_definitions(session)
    return d


def list_attribute_definitions(session: Session, org_id: str) -> list[CustomAttributeDefinition]:
    return list(session.scalars(select(CustomAttributeDefinition).where(CustomAttributeDefinition.org_id == org_id).order_by(CustomAttributeDefinition.key)))


_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f"}


def convert_attribute(d: CustomAttributeDefinition, value: Any, field: str) -> list[dict]:
    """Typed column values for one attribute value (a list gives one per item)."""
    if d.type == "text":
        text = str(value).strip()
        if len(text) > 500:
            raise ValidationFailed("Text attributes hold at most 500 characters.", field=field)
        return [{"value_text": text}]
    if d.type == "number":
        if isinstance(value, bool):
            raise ValidationFailed("Expected a number.", field=field)
        try:
            return [{"value_number": float(str(value).strip().replace(",", ""))}]
        except ValueError:
            raise ValidationFailed("Expected a number.", field=field) from None
    if d.type == "date":
        if isinstance(value, date):
            return [{"value_date": value}]
        parsed = parse_date(str(value), None)
        if parsed is None:
            raise ValidationFailed("Expected a date (YYYY-MM-DD).", field=field)
        return [{"value_date": parsed}]
    if d.type == "boolean":
        if isinstance(value, bool):
            return [{"value_boolean": value}]
        text = str(value).strip().lower()
        if text in _TRUE:
            return [{"value_boolean": True}]
        if text in _FALSE:
            return [{"value_boolean": False}]
        raise ValidationFailed("Expected yes or no.", field=field)
    items = value if isinstance(value, list) else [s for s in re.split(r"[;|]", str(value))]
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if item not in d.options:
            raise ValidationFailed("Not one of the attribute's options.", field=field)
        out.append({"value_text": item})
    return out


def _attr_value(d: CustomAttributeDefinition, v: CustomAttributeValue) -> Any:
    if d.type == "number":
        return v.value_number
    if d.type == "date":
        return v.value_date.isoformat() if v.value_date else None
    if d.type == "boolean":
        return v.value_boolean
    return v.value_text


def set_attributes(session: Session, org_id: str, contact: Contact, values: dict[str, Any]) -> None:
    defs = _attribute_definitions(session, org_id)
    rows: list[tuple[CustomAttributeDefinition, list[dict]]] = []
    for key, value in values.items():
        d = defs.get(key)
        if d is None:
            raise ValidationFailed("No custom attribute with this key; define it first.", field=f"attributes.{key}")
        rows.append((d, [] if value is None or value == "" else convert_attribute(d, value, f"attributes.{key}")))
    for d, converted in rows:
        session.execute(delete(CustomAttributeValue).where(CustomAttributeValue.contact_id == contact.id, CustomAttributeValue.definition_id == d.id))
        for col in converted:
            session.add(CustomAttributeValue(org_id=org_id, contact_id=contact.id, definition_id=d.id, **col))


# --------------------------------------------------------------------------- dates


_DATE_FORMATS = ("%Y-%m-%d", "%m/%d/%Y", "%m/%d/%y", "%m-%d-%Y", "%Y/%m/%d", "%d.%m.%Y", "%Y%m%d", "%d-%b-%Y", "%b %d, %Y")


def parse_date(text: str, fmt: str | None) -> date | None:
    """A date in ``fmt`` or, without one, ISO 8601 then the formats practice systems export.
    Ambiguous slashed dates are read US-style (month first) unless a format says otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    if fmt:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            return None
    if "T" in text:
        text = text.split("T", 1)[0]
    for f in _DATE_FORMATS:
        try:
            parsed = datetime.strptime(text, f).date()
        except ValueError:
            continue
        if f == "%m/%d/%y" and parsed > date.today():
            parsed = parsed.replace(year=parsed.year - 100)
        return parsed
    return None


# --------------------------------------------------------------------------- clinical facts

FACT_COMMON = ("code_system", "code", "display", "status")


def fact_fields(model: type[ClinicalFact]) -> set[str]:
    cols = set(model.__table__.columns.keys())
    return cols - {"id", "org_id", "contact_id", "source_key", "last_import_id", "created_at", "updated_at"}


def fact_model(kind: str) -> type[ClinicalFact]:
    model = FACT_MODELS.get(kind)
    if model is None:
        raise NotFound("No such kind of clinical fact.", field="kind")
    return model


def fact_dict(fact: ClinicalFact) -> dict:
    out: dict[str, Any] = {"id": fact.id, "contact_id": fact.contact_id}
    for name in sorted(fact_fields(type(fact))):
        value = getattr(fact, name)
        if isinstance(value, datetime):
            value = clock.aware(value).isoformat()
        elif isinstance(value, date):
            value = value.isoformat()
        out[name] = value
    out["from_import"] = fact.source_key is not None
    out["updated_at"] = clock.aware(fact.updated_at).isoformat()
    return out


def _check_fact_fields(model: type[ClinicalFact], values: dict) -> dict:
    allowed = fact_fields(model)
    for name in values:
        if name not in allowed:
            raise ValidationFailed(f"{name} does not apply to {model.__tablename__}.", field=name)
    if "code_system" in values:
        values["code_system"] = normalize_code_system(values["code_system"])
    return values


def list_facts(session: Session, org_id: str, contact_id: str, kind: str, limit: int = 500) -> list[ClinicalFact]:
    model = fact_model(kind)
    get_contact(session, contact_id)
    order = {"observations": "effective_at", "encounters": "start_at", "appointments": "start_at"}.get(kind, "created_at")
    return list(session.scalars(
        select(model).where(model.org_id == org_id, model.contact_id == contact_id).order_by(getattr(model, order).desc(), model.id).limit(limit)
    ))


def create_fact(session: Session, org_id: str, contact_id: str, kind: str, data: FactIn) -> ClinicalFact:
    model = fact_model(kind)
    contact = get_contact(session, contact_id)
    values = _check_fact_fields(model, data.model_dump(exclude_unset=True))
    if kind == "medications" and values.get("next_refill_due") is None:
        values["next_refill_due"] = next_refill_due(values.get("last_fill_date") or values.get("authored_on"), values.get("days_supply"))
    fact = model(id=new_id(), org_id=org_id, contact_id=contact.id, **values)
    session.add(fact)
    session.flush()
    _after_fact_change(session, org_id, kind, [contact.id])
    return fact


def get_fact(session: Session, contact_id: str, kind: str, fact_id: str) -> ClinicalFact:
    model = fact_model(kind)
    fact = session.get(model, fact_id) if is_id(fact_id) else None
    if fact is None or fact.contact_id != contact_id or (session.info.get("org_id") and fact.org_id != session.info["org_id"]):
        raise NotFound("No such clinical fact.", field="fact_id")
    return fact


def update_fact(session: Session, org_id: str, contact_id: str, kind: str, fact_id: str, data: FactIn) -> ClinicalFact:
    fact = get_fact(session, contact_id, kind, fact_id)
    values = _check_fact_fields(type(fact), data.model_dump(exclude_unset=True))
    for name, value in values.items():
        setattr(fact, name, value)
    fact.updated_at = clock.now()
    session.flush()
    _after_fact_change(session, org_id, kind, [contact_id])
    return fact


def delete_fact(session: Session, org_id: str, contact_id: str, kind: str, fact_id: str) -> None:
    fact = get_fact(session, contact_id, kind, fact_id)
    session.delete(fact)
    session.flush()
    _after_fact_change(session, org_id, kind, [contact_id])


def next_refill_due(last_fill: date | None, days_supply: int | None) -> date | None:
    if last_fill is None or not days_supply:
        return None
    return last_fill + timedelta(days=int(days_supply))


def _after_fact_change(session: Session, org_id: str, kind: str, contact_ids: list[str]) -> None:
    if kind in ("encounters", "appointments"):
        refresh_care_stages(session, org_id, contact_ids)


# --------------------------------------------------------------------------- care-journey stage

DERIVED_STAGES = ("new", "active", "overdue", "at_risk", "deceased")
TERMINAL_STAGE = "deceased"  # a deceased patient is never "overdue" again, whatever the visits or an override say
CARE_JOURNEY_DEFAULTS = {
    "overdue_after_days": 365,  # no visit for this long: overdue
    "at_risk_hospitalization_days": 90,  # a hospitalization this recent: at risk
    "at_risk_noshow_count": 2,  # this many no-shows ...
    "at_risk_noshow_days": 180,  # ... within this many days: at risk
    "stages": [],  # organization-defined stages, set on contacts by hand or by import
}


def care_journey_config(session: Session, org_id: str) -> dict:
    from carepost.accounts.service import get_organization

    cache = session.info.setdefault("_carepost_care_journey", {})
    if org_id not in cache:
        org = get_organization(session, org_id)
        cfg = dict(CARE_JOURNEY_DEFAULTS)
        cfg.update((org.settings or {}).get("care_journey") or {})
        cache[org_id] = cfg
    return cache[org_id]


def set_care_journey_config(session: Session, org_id: str, values: dict) -> dict:
    """Change the rules (kept in the organization's settings) and re-derive every stage."""
    from carepost.accounts.service import get_organization

    cfg = dict(CARE_JOURNEY_DEFAULTS)
    org = get_organization(session, org_id)
    cfg.update((org.settings or {}).get("care_journey") or {})
    for key, value in values.items():
        if key not in CARE_JOURNEY_DEFAULTS:
            raise ValidationFailed("Unknown care-journey setting.", field=key)
        if key == "stages":
            if not isinstance(value, list) or not all(isinstance(s, str) and re.fullmatch(r"[a-z][a-z0-9_]{0,39}", s) for s in value):
                raise ValidationFailed("Stages are lowercase names (letters, digits, _).", field="stages")
            if set(value) & set(DERIVED_STAGES):
                raise ValidationFailed("Organization stages may not reuse a derived stage name.", field="stages")
        elif not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 3650:
            raise ValidationFailed("Expected a whole number from 1 to 3650.", field=key)
        cfg[key] = value
    org.settings = {**(org.settings or {}), "care_journey": cfg}
    session.info.pop("_carepost_care_journey", None)
    session.flush()
    refresh_care_stages(session, org_id, None)
    return cfg


def set_stage_override(session: Session, org_id: str, contact: Contact, stage: str | None) -> None:
    if stage is None or stage == "":
        contact.care_stage_override = None
        return
    if stage not in care_journey_config(session, org_id)["stages"]:
        raise ValidationFailed("Not a stage defined by the organization.", field="care_stage")
    contact.care_stage_override = stage
    if contact.care_stage != stage and not contact.deceased:
        contact.care_stage = stage
        contact.care_stage_changed_at = clock.now()


_VISIT_EXCLUDED = ("cancelled", "entered-in-error", "planned")


def refresh_care_stages(session: Session, org_id: str, contact_ids: list[str] | None, *, chunk: int = 1000) -> int:
    """Derive the stage of contacts (all when ``contact_ids`` is None) from their visits,
    hospitalizations and no-shows; returns how many changed. Set-based: a few aggregate queries
    per chunk of contacts, so the nightly refresh of a large organization stays cheap."""
    cfg = care_journey_config(session, org_id)
    now = clock.now()
    changed = 0
    if contact_ids is None:
        last = ""
        while True:
            ids = list(session.scalars(select(Contact.id).where(Contact.org_id == org_id, Contact.id > last).order_by(Contact.id).limit(chunk)))
            if not ids:
                break
            changed += _refresh_chunk(session, org_id, ids, cfg, now)
            last = ids[-1]
        return changed
    for start in range(0, len(contact_ids), chunk):
        changed += _refresh_chunk(session, org_id, list(contact_ids[start : start + chunk]), cfg, now)
    return changed


def _refresh_chunk(session: Session, org_id: str, ids: list[str], cfg: dict, now: datetime) -> int:
    session.flush()
    last_visit = dict(session.execute(
        select(Encounter.contact_id, func.max(Encounter.start_at))
        .where(Encounter.org_id == org_id, Encounter.contact_id.in_(ids), Encounter.start_at <= now,
               or_(Encounter.status.is_(None), Encounter.status.notin_(_VISIT_EXCLUDED)))
        .group_by(Encounter.contact_id)
    ).all())
    for contact_id, start in session.execute(
        select(Appointment.contact_id, func.max(Appointment.start_at))
        .where(Appointment.org_id == org_id, Appointment.contact_id.in_(ids), Appointment.status.in_(("fulfilled", "arrived", "checked-in")))
        .group_by(Appointment.contact_id)
    ):
        if start is not None and (last_visit.get(contact_id) is None or clock.aware(start) > clock.aware(last_visit[contact_id])):
            last_visit[contact_id] = start
    hosp_since = now - timedelta(days=cfg["at_risk_hospitalization_days"])
    hospitalized = set(session.scalars(
        select(Encounter.contact_id).where(
            Encounter.org_id == org_id, Encounter.contact_id.in_(ids), Encounter.is_hospitalization.is_(True),
            or_(Encounter.end_at >= hosp_since, Encounter.start_at >= hosp_since),
        ).distinct()
    ))
    noshow_since = now - timedelta(days=cfg["at_risk_noshow_days"])
    noshows = {
        cid for cid, n in session.execute(
            select(Appointment.contact_id, func.count()).where(
                Appointment.org_id == org_id, Appointment.contact_id.in_(ids), Appointment.status == "noshow",
                Appointment.start_at >= noshow_since,
            ).group_by(Appointment.contact_id)
        ) if n >= cfg["at_risk_noshow_count"]
    }
    overdue_before = now - timedelta(days=cfg["overdue_after_days"])
    changed = 0
    for contact in session.scalars(select(Contact).where(Contact.org_id == org_id, Contact.id.in_(ids))):
        if contact.deceased:
            stage = TERMINAL_STAGE
        elif contact.care_stage_override:
            stage = contact.care_stage_override
        elif contact.id in hospitalized or contact.id in noshows:
            stage = "at_risk"
        else:
            visit = clock.aware(last_visit.get(contact.id))
            if visit is None:
                stage = "new" if clock.aware(contact.created_at) >= overdue_before else "overdue"
            else:
                stage = "active" if visit >= overdue_before else "overdue"
        if contact.care_stage != stage:
            contact.care_stage = stage
            contact.care_stage_changed_at = now
            changed += 1
    session.flush()
    return changed


# --------------------------------------------------------------------------- deletion and export

DeletionHook = Callable[[Session, str, str, dict[str, list[str]]], None]
# The same duty for a set of contacts at once: ``{contact_id: {kind: [blind indexes]}}``.
ManyDeletionHook = Callable[[Session, str, dict[str, dict[str, list[str]]]], None]
_DELETION_HOOKS: list[DeletionHook] = []
_MANY_DELETION_HOOKS: dict[DeletionHook, ManyDeletionHook] = {}
ExportSection = Callable[[Session, str, str], Any]
_EXPORT_SECTIONS: dict[str, ExportSection] = {}


def register_deletion_hook(hook: DeletionHook, *, many: ManyDeletionHook | None = None) -> None:
    """``hook(session, org_id, contact_id, {"email": [blind indexes], "phone": [...], "identifier": [...]})``
    runs before a contact is deleted, in the same transaction: keep what the law and the patient
    need kept (suppressions, opt-outs, authorization evidence) keyed by blind index. ``many``
    does the same for a set of contacts with set-based statements (``{contact_id: indexes}``;
    :func:`delete_contacts`); without it ``hook`` runs once per contact."""
    if hook not in _DELETION_HOOKS:
        _DELETION_HOOKS.append(hook)
    if many is not None:
        _MANY_DELETION_HOOKS[hook] = many


def register_export_section(name: str, section: ExportSection) -> None:
    """``section(session, org_id, contact_id)`` returns JSON-ready data for a patient's export."""
    _EXPORT_SECTIONS[name] = section


@dataclass
class DeletionResult:
    contact_id: str
    kept_indexes: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)


def delete_contact(session: Session, org_id: str, contact_id: str) -> DeletionResult:
    """Delete a patient and every encrypted value and fact about them. What must survive is
    handed, as blind indexes only, to the deletion hooks first."""
    contact = get_contact(session, contact_id)
    session.expunge(contact)
    return delete_contacts(session, org_id, [contact.id])[0]


def delete_contacts(session: Session, org_id: str, contact_ids: Iterable[str]) -> list[DeletionResult]:
    """Delete a set of patients (a retention purge's chunk of inactive contacts) exactly as
    :func:`delete_contact` deletes one — the hooks first, with every contact's blind indexes —
    with one statement per table for the whole set instead of one per contact. Ids that name no
    contact of the organization are left out of the result."""
    wanted = sorted({c for c in contact_ids if is_id(c)})
    ids = sorted(session.scalars(select(Contact.id).where(Contact.org_id == org_id, Contact.id.in_(wanted)))) if wanted else []
    if not ids:
        return []
    indexes: dict[str, dict[str, list[str]]] = {i: {} for i in ids}
    for cid, kind, idx in session.execute(
        select(ContactIdentifier.contact_id, ContactIdentifier.kind, ContactIdentifier.blind_index)
        .where(ContactIdentifier.org_id == org_id, ContactIdentifier.contact_id.in_(ids))
        .order_by(ContactIdentifier.contact_id, ContactIdentifier.id)
    ):
        if kind not in ("source", NAME_KIND):
            indexes[cid].setdefault(kind, []).append(idx)
    for hook in list(_DELETION_HOOKS):
        many = _MANY_DELETION_HOOKS.get(hook)
        if many is not None:
            many(session, org_id, indexes)
        else:
            for cid in ids:
                hook(session, org_id, cid, indexes[cid])
    removed: dict[str, dict[str, int]] = {i: {} for i in ids}
    for kind, model in FACT_MODELS.items():
        counts = dict(session.execute(select(model.contact_id, func.count()).where(
            model.org_id == org_id, model.contact_id.in_(ids)).group_by(model.contact_id)).all())
        if counts:
            session.execute(delete(model).where(model.org_id == org_id, model.contact_id.in_(ids)))
        for cid in ids:
            removed[cid][kind] = counts.get(cid, 0)
    for model in (CustomAttributeValue, ContactIdentifier, Contact):
        column = model.id if model is Contact else model.contact_id
        session.execute(delete(model).where(model.org_id == org_id, column.in_(ids)))
    return [DeletionResult(cid, indexes[cid], removed[cid]) for cid in ids]


def export_contact(session: Session, org_id: str, contact_id: str) -> dict:
    """Everything CarePost holds about one patient, decrypted, for a right-of-access request."""
    contact = get_contact(session, contact_id)
    out: dict[str, Any] = {
        "exported_at": clock.now().isoformat(),
        "contact": contact_dict(session, contact),
        "clinical_facts": {},
    }
    for kind, model in FACT_MODELS.items():
        rows = session.scalars(select(model).where(model.org_id == org_id, model.contact_id == contact.id).order_by(model.created_at))
        out["clinical_facts"][kind] = [fact_dict(r) for r in rows]
    for name, section in _EXPORT_SECTIONS.items():
        out[name] = section(session, org_id, contact.id)
    return out


def export_html(data: dict) -> str:
    """A readable, self-contained summary of :func:`export_contact` (no scripts, no remote assets)."""
    from carepost.web.rendering import templates

    return templates.env.get_template("patients/export.html").render(data=data, labels=FACT_LABELS)


FACT_LABELS = {
    "conditions": "Conditions",
    "medications": "Medications",
    "procedures": "Procedures and surgeries",
    "observations": "Lab results and vitals",
    "immunizations": "Immunizations",
    "encounters": "Encounters and hospitalizations",
    "appointments": "Appointments",
    "care-plans": "Care plans",
    "coverages": "Coverage",
}


def touch(session: Session, org_id: str, contact_ids: list[str]) -> None:
    if contact_ids:
        session.execute(update(Contact).where(Contact.org_id == org_id, Contact.id.in_(contact_ids)).values(updated_at=clock.now()))
