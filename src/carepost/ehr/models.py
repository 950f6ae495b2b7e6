"""Tables of the ``ehr`` capability.

* :class:`MllpConnection` — one sending system of an organization allowed to deliver HL7 v2 over
  ``carepost mllp``: its sending facilities (MSH-4) and a credential it puts in MSH-8 (Security),
  stored hashed, so the listener knows whose patients a message is about before it reads them;
  optionally the SHA-256 fingerprint of the TLS client certificate it must send from (pinned).
* :class:`EhrMessage` — every message or resource received from an authenticated sender, with
  its outcome: ``recorded`` (an event was stored), ``ignored`` (nothing to record, e.g. an
  Appointment still ``proposed``), ``error`` (the error queue: a reason without PHI and the raw
  message encrypted, so it can be retried) or ``discarded``. Unique by organization, source and
  control id (MSH-10, or ``Appointment/<id>/_history/<versionId>``): a message is recorded once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id


class MllpConnection(OrgScoped, Base):
    """A sending system (an EHR or its interface engine) of one organization."""

    __tablename__ = "ehr_mllp_connections"
    __table_args__ = (UniqueConstraint("key_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(120))
    key_id: Mapped[str] = mapped_column(String(16))  # public half of the MSH-8 credential
    secret_hash: Mapped[str] = mapped_column(String(64))  # HMAC-SHA256 of the secret; the secret is shown once
    sending_facilities: Mapped[list] = mapped_column(JSON)  # MSH-4 namespace ids this connection may send as
    mrn_system: Mapped[str | None] = mapped_column(String(255))  # where PID-3 MRNs are looked up; None: any MRN system
    time_zone: Mapped[str] = mapped_column(String(64), default="UTC")  # for HL7 times without an offset
    # SHA-256 (hex) of the DER client certificate this system must present over mutual TLS; None: any
    client_cert_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class EhrMessage(OrgScoped, Base):
    """One received HL7 v2 message or FHIR resource and what became of it (the error queue is the
    rows in status ``error``)."""

    __tablename__ = "ehr_messages"
    __table_args__ = (
        UniqueConstraint("org_id", "source", "control_id"),
        Index("ix_ehr_messages_org_status", "org_id", "status", "received_at"),
        Index("ix_ehr_messages_due", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    source: Mapped[str] = mapped_column(String(10))  # hl7v2 | fhir
    connection_id: Mapped[str | None] = mapped_column(String(32))  # MLLP connection or API credential
    control_id: Mapped[str | None] = mapped_column(String(200))  # MSH-10 / resource id and version; None when absent
    content_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of the message as received
    message_type: Mapped[str] = mapped_column(String(40))  # ADT^A01, SIU^S12, Appointment, Encounter
    event_name: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(12))  # recorded | ignored | error | discarded
    ack_code: Mapped[str] = mapped_column(String(2))  # AA | AE | AR (answered again to a duplicate)
    reason_code: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(String(300))  # fixed texts naming fields; never PHI
    error_field: Mapped[str | None] = mapped_column(String(60))  # PID-3, Appointment.participant...
    raw_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # kept (encrypted) only while in the error queue
    state_hash: Mapped[str | None] = mapped_column(String(64))  # SHA-256 of the appointment start (rescheduled?)
    resource_key: Mapped[str | None] = mapped_column(String(200))  # Appointment/<id>, SCH filler id hash: versions of one thing
    contact_id: Mapped[str | None] = mapped_column(String(32))
    event_id: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    # a queued id-only reference: when its (next) fetch is due — also the lease of the one running it
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    received_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class FhirServer(OrgScoped, Base):
    """The organization's FHIR server (the EHR) CarePost reads resources back from when a
    Subscription sends an id-only notification, and its SMART Backend Services registration:
    the client id, the token endpoint and CarePost's signing key (the private key encrypted under
    the organization's data key; the public key is shown as a JWKS for the EHR's registration)."""

    __tablename__ = "ehr_fhir_servers"
    __table_args__ = (UniqueConstraint("org_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    base_url: Mapped[str] = mapped_column(String(500))  # https://ehr.example/fhir (no trailing slash)
    token_url: Mapped[str] = mapped_column(String(500))  # the SMART token endpoint
    client_id: Mapped[str] = mapped_column(String(255))
    scope: Mapped[str] = mapped_column(String(500))
    algorithm: Mapped[str] = mapped_column(String(8))  # ES384 | RS384 (client assertion signature)
    key_id: Mapped[str] = mapped_column(String(64))  # kid: the public key's JWK thumbprint
    private_key_enc: Mapped[bytes] = mapped_column(LargeBinary)  # PKCS#8 PEM, encrypted
    public_jwk: Mapped[dict] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)
