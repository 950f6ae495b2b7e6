"""Patients (contacts), their identifiers, custom attributes, clinical facts and imports.

What is encrypted and what is plain follows ARCHITECTURE.md section 2:

* direct identifiers — name parts, street address lines, email addresses, phone numbers, MRNs
  and every other identifier — are encrypted by the application (``*_enc`` columns, AES-GCM bound
  to organization, table, column and row) and found by exact match through keyed blind indexes
  (:class:`ContactIdentifier`);
* everything segments query — birth date, sex, city, state, ZIP, demographics, codes and dates of
  clinical facts — lives in plain columns of the (itself encrypted) database;
* narratives (FHIR ``Resource.text``), notes and attachments are never stored.

Clinical facts carry ``source_key``: a blind index of the source resource (``Condition/abc``), so
a re-import updates the same row instead of adding a duplicate, without storing the source id.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id


class Contact(OrgScoped, Base):
    """A patient, member or customer of one organization."""

    __tablename__ = "contacts"
    __table_args__ = (
        # + birth date, sex, deceased: a segment's contact look-ups by id are index-only (issue 12)
        Index("ix_contacts_org_created", "org_id", "id", "birth_date", "sex", "deceased"),
        Index("ix_contacts_org_stage", "org_id", "care_stage"),
        Index("ix_contacts_org_zip", "org_id", "postal_code"),
        # covering for the usual demographic filters of a segment (age, sex, not deceased): an
        # index-only range scan, no visit to the wide contact rows (issue 12, docs/performance.md)
        Index("ix_contacts_org_birth_sex", "org_id", "birth_date", "sex", "deceased", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # --- direct identifiers, encrypted (column name without _enc is the AAD column)
    name_prefix_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    given_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    middle_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    family_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    name_suffix_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    address_line1_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    address_line2_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    # --- plain, queryable by segments
    birth_date: Mapped[date | None] = mapped_column(Date)
    sex: Mapped[str | None] = mapped_column(String(16))  # administrative gender: female|male|other|unknown
    gender_identity: Mapped[str | None] = mapped_column(String(64))
    preferred_language: Mapped[str | None] = mapped_column(String(35))  # BCP 47
    time_zone: Mapped[str | None] = mapped_column(String(64))  # IANA
    ethnicity: Mapped[str | None] = mapped_column(String(64))
    race: Mapped[str | None] = mapped_column(String(64))
    marital_status: Mapped[str | None] = mapped_column(String(32))
    education: Mapped[str | None] = mapped_column(String(64))
    employment_status: Mapped[str | None] = mapped_column(String(64))
    household_status: Mapped[str | None] = mapped_column(String(64))
    income_band: Mapped[str | None] = mapped_column(String(32))
    coverage_type: Mapped[str | None] = mapped_column(String(64))
    coverage_plan: Mapped[str | None] = mapped_column(String(200))
    religion: Mapped[str | None] = mapped_column(String(64))
    city: Mapped[str | None] = mapped_column(String(100))
    state: Mapped[str | None] = mapped_column(String(50))
    postal_code: Mapped[str | None] = mapped_column(String(16))
    country: Mapped[str | None] = mapped_column(String(2))
    deceased: Mapped[bool] = mapped_column(Boolean, default=False)
    # --- care journey: derived stage, unless an organization-defined stage is set by hand
    care_stage: Mapped[str] = mapped_column(String(40), default="new")
    care_stage_override: Mapped[str | None] = mapped_column(String(40))
    care_stage_changed_at: Mapped[datetime | None]
    # --- provenance
    source: Mapped[str | None] = mapped_column(String(20))  # api | fhir | csv | ui
    last_import_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


ENCRYPTED_CONTACT_FIELDS = ("name_prefix", "given_name", "middle_name", "family_name", "name_suffix", "address_line1", "address_line2")
PLAIN_CONTACT_FIELDS = (
    "birth_date", "sex", "gender_identity", "preferred_language", "time_zone", "ethnicity", "race",
    "marital_status", "education", "employment_status", "household_status", "income_band",
    "coverage_type", "coverage_plan", "religion", "city", "state", "postal_code", "country", "deceased",
)


class ContactIdentifier(OrgScoped, Base):
    """An email address, phone number or identifier of a contact, found through its blind index.

    ``kind``: ``email`` | ``phone`` | ``identifier`` (MRN, member id, customer id, an API client's
    external id: ``system`` scopes the value, ``type_code`` says what it is: MR, MB, PT, external)
    | ``source`` (a source resource such as ``Patient/abc`` or a bundle's ``urn:uuid:``; only the
    blind index is kept, so re-imports and references resolve without storing the id).
    """

    __tablename__ = "contact_identifiers"
    __table_args__ = (
        Index("ix_contact_identifiers_lookup", "org_id", "kind", "blind_index"),
        Index("ix_contact_identifiers_system", "org_id", "kind", "type_code", "system"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(12))
    system: Mapped[str | None] = mapped_column(String(255))
    type_code: Mapped[str | None] = mapped_column(String(20))
    use: Mapped[str | None] = mapped_column(String(12))  # home | work | mobile | ...
    rank: Mapped[int] = mapped_column(Integer, default=0)  # 0 = primary
    value_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    blind_index: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class IdentifierSystem(OrgScoped, Base):
    """The identifier systems an organization holds identifiers in (a handful per organization),
    so an MRN searched without its system is tried in each of them by blind index — never by
    scanning millions of identifier rows for their distinct systems."""

    __tablename__ = "identifier_systems"
    __table_args__ = (UniqueConstraint("org_id", "system", "type_code"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    system: Mapped[str] = mapped_column(String(255))
    type_code: Mapped[str] = mapped_column(String(20), default="")  # "" when the identifier has no type
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


ATTRIBUTE_TYPES = ("text", "number", "date", "boolean", "list")


class CustomAttributeDefinition(OrgScoped, Base):
    """An organization-defined, typed contact attribute (``list`` values come from ``options``)."""

    __tablename__ = "custom_attribute_definitions"
    __table_args__ = (UniqueConstraint("org_id", "key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    key: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(10))
    options: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class CustomAttributeValue(OrgScoped, Base):
    """One value of a custom attribute; a ``list`` attribute has one row per chosen item."""

    __tablename__ = "custom_attribute_values"
    __table_args__ = (Index("ix_custom_attribute_values_def", "org_id", "definition_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    definition_id: Mapped[str] = mapped_column(String(32), ForeignKey("custom_attribute_definitions.id", ondelete="CASCADE"))
    value_text: Mapped[str | None] = mapped_column(String(500))
    value_number: Mapped[float | None] = mapped_column(Float)
    value_date: Mapped[date | None] = mapped_column(Date)
    value_boolean: Mapped[bool | None] = mapped_column(Boolean)


# --------------------------------------------------------------------------- clinical facts


class ClinicalFact(OrgScoped):
    """Columns every clinical fact has: the coded concept, a status, where it came from."""

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    source_key: Mapped[str | None] = mapped_column(String(64), index=True)
    last_import_id: Mapped[str | None] = mapped_column(String(32))
    code_system: Mapped[str | None] = mapped_column(String(40))  # short name: icd10cm, snomed, rxnorm, loinc, cvx, ...
    code: Mapped[str | None] = mapped_column(String(64), index=True)
    # False when the code failed its system's format check at import (``5089AAAA`` labelled LOINC):
    # the record is kept, the import reports a warning, and code-matching queries must require True.
    code_verified: Mapped[bool] = mapped_column(Boolean, default=True)
    display: Mapped[str | None] = mapped_column(String(300))
    status: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class Condition(ClinicalFact, Base):
    __tablename__ = "conditions"

    verification_status: Mapped[str | None] = mapped_column(String(32))
    category: Mapped[str | None] = mapped_column(String(64))
    onset_date: Mapped[date | None] = mapped_column(Date)
    abatement_date: Mapped[date | None] = mapped_column(Date)
    recorded_date: Mapped[date | None] = mapped_column(Date)


class Medication(ClinicalFact, Base):
    """A prescription or medication statement (RxNorm); ``status`` active | stopped | completed | ..."""

    __tablename__ = "medications"

    source_type: Mapped[str | None] = mapped_column(String(32))  # MedicationRequest | MedicationStatement
    intent: Mapped[str | None] = mapped_column(String(20))
    authored_on: Mapped[date | None] = mapped_column(Date)
    start_date: Mapped[date | None] = mapped_column(Date)
    end_date: Mapped[date | None] = mapped_column(Date)
    last_fill_date: Mapped[date | None] = mapped_column(Date)
    days_supply: Mapped[int | None] = mapped_column(Integer)
    refills_allowed: Mapped[int | None] = mapped_column(Integer)
    next_refill_due: Mapped[date | None] = mapped_column(Date, index=True)


class Procedure(ClinicalFact, Base):
    __tablename__ = "procedures"
    # "has procedure in <value set> within <window>" as an index-only range scan (issue 12)
    __table_args__ = (Index("ix_procedures_org_code_performed", "org_id", "code", "performed_start", "contact_id",
                            "code_system", "code_verified"),)

    performed_start: Mapped[datetime | None]
    performed_end: Mapped[datetime | None]


class Observation(ClinicalFact, Base):
    """A lab result or vital sign (LOINC). Multi-component observations (blood pressure) become
    one row per component so segments can test each value."""

    __tablename__ = "observations"
    # "last observation in <value set> ... within <window>": the window's rows of the codes with
    # everything the latest-value test reads, as an index-only range scan (issue 12)
    __table_args__ = (Index("ix_observations_org_code_effective", "org_id", "code", "effective_at", "contact_id",
                            "id", "value_quantity", "code_system", "code_verified"),)

    category: Mapped[str | None] = mapped_column(String(40))
    effective_at: Mapped[datetime | None] = mapped_column(index=True)
    value_quantity: Mapped[float | None] = mapped_column(Float)
    value_unit: Mapped[str | None] = mapped_column(String(40))
    value_code: Mapped[str | None] = mapped_column(String(64))
    value_display: Mapped[str | None] = mapped_column(String(200))
    interpretation: Mapped[str | None] = mapped_column(String(20))


class Immunization(ClinicalFact, Base):
    __tablename__ = "immunizations"

    occurrence_date: Mapped[date | None] = mapped_column(Date)


class Encounter(ClinicalFact, Base):
    """A visit or hospitalization; ``class_code`` AMB | IMP | EMER | ACUTE | VR | HH ..."""

    __tablename__ = "encounters"

    class_code: Mapped[str | None] = mapped_column(String(20))
    start_at: Mapped[datetime | None] = mapped_column(index=True)
    end_at: Mapped[datetime | None]
    is_hospitalization: Mapped[bool] = mapped_column(Boolean, default=False)
    discharge_disposition: Mapped[str | None] = mapped_column(String(40))


class Appointment(ClinicalFact, Base):
    """Upcoming and past appointments; ``status`` booked | fulfilled | noshow | cancelled | ..."""

    __tablename__ = "appointments"

    start_at: Mapped[datetime | None] = mapped_column(index=True)
    end_at: Mapped[datetime | None]
    minutes_duration: Mapped[int | None] = mapped_column(Integer)


class CarePlan(ClinicalFact, Base):
    __tablename__ = "care_plans"

    intent: Mapped[str | None] = mapped_column(String(20))
    period_start: Mapped[date | None] = mapped_column(Date)
    period_end: Mapped[date | None] = mapped_column(Date)


class Coverage(ClinicalFact, Base):
    """Insurance coverage; the member id is an encrypted :class:`ContactIdentifier` (type MB)."""

    __tablename__ = "coverages"

    plan_name: Mapped[str | None] = mapped_column(String(200))
    payor_name: Mapped[str | None] = mapped_column(String(200))
    period_start: Mapped[date | None] = mapped_column(Date)
    period_end: Mapped[date | None] = mapped_column(Date)


# The clinical fact tables by the name the API uses under /contacts/{id}/...
FACT_MODELS: dict[str, type[ClinicalFact]] = {
    "conditions": Condition,
    "medications": Medication,
    "procedures": Procedure,
    "observations": Observation,
    "immunizations": Immunization,
    "encounters": Encounter,
    "appointments": Appointment,
    "care-plans": CarePlan,
    "coverages": Coverage,
}


# --------------------------------------------------------------------------- imports


class ImportJob(OrgScoped, Base):
    """One import of one file: status, progress and counts (never PHI)."""

    __tablename__ = "import_jobs"
    __table_args__ = (Index("ix_import_jobs_org_created", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    format: Mapped[str] = mapped_column(String(12))  # fhir | ndjson | csv (detected when "auto")
    status: Mapped[str] = mapped_column(String(24), default="uploading")
    # uploading | queued | running | succeeded | completed_with_errors | failed
    filename_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # a file name may name a patient
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    mapping_id: Mapped[str | None] = mapped_column(String(32))
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    counts: Mapped[dict] = mapped_column(JSON, default=dict)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    error_count: Mapped[int] = mapped_column(Integer, default=0)  # records that failed (not imported)
    warning_count: Mapped[int] = mapped_column(Integer, default=0)  # records kept with a flagged value (an unverified code)
    failure: Mapped[str | None] = mapped_column(Text)  # why the whole import failed (no PHI)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class ImportChunk(OrgScoped, Base):
    """The uploaded file, encrypted, in order: every worker can read it; no web-server disk."""

    __tablename__ = "import_chunks"
    __table_args__ = (UniqueConstraint("import_id", "seq"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    import_id: Mapped[str] = mapped_column(String(32), ForeignKey("import_jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    data_enc: Mapped[bytes] = mapped_column(LargeBinary)


class ImportRecordError(OrgScoped, Base):
    """A record that failed (``severity`` error) or was kept with a flagged value (``warning``):
    where (line number or resource type/id) and why — never the value."""

    __tablename__ = "import_errors"
    __table_args__ = (Index("ix_import_errors_import", "import_id", "seq"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    import_id: Mapped[str] = mapped_column(String(32), ForeignKey("import_jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    line: Mapped[int | None] = mapped_column(Integer)
    resource: Mapped[str | None] = mapped_column(String(200))
    field: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(String(500))
    severity: Mapped[str] = mapped_column(String(10), default="error")  # error | warning


class CsvMapping(OrgScoped, Base):
    """A saved CSV column mapping: header -> CarePost field, plus parsing options."""

    __tablename__ = "csv_mappings"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    columns: Mapped[dict] = mapped_column(JSON, default=dict)
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # delimiter, encoding, date_format, identifier_system
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)
