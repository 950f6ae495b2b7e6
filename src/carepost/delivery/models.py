"""Tables of secure delivery: sending domains, recipient keys, messages, recipients, events.

Encryption follows ARCHITECTURE.md section 2 (``*_enc`` columns: AES-GCM under the
organization's data key, bound to organization, table, column — the name without ``_enc`` —
and row):

* DKIM private keys are encrypted (the invariant "private keys encrypted"); public records are
  plain, they are published in DNS anyway.
* Recipient addresses are direct identifiers: encrypted, found by a keyed blind index
  (``address_index``, kind "email"). The recipient's domain is kept only as a blind index too
  (``domain_index``, kind "domain"), enough to group deliveries per destination.
* Recipient certificates name the address, so they are encrypted as well; fingerprints and
  expiry dates are plain (they identify a key, not a person, and drive expiry warnings).
* Message subjects and bodies, attachments and remote SMTP replies (which often quote the
  address) are encrypted. Evidence (MX host, TLS version, cipher, certificate fingerprint,
  reply code) is plain JSON without any address.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id

RECIPIENT_STATUSES = (
    "queued", "excluded", "deferred", "sent", "delivered", "bounced", "failed", "portal_viewed", "recalled", "expired",
)
METHODS = ("tls", "pgp", "smime", "portal", "none")


class SendingDomain(OrgScoped, Base):
    """A domain an organization sends from, with its DKIM keys and DNS check results.

    Ownership (issue 9 item 2): a row is the organization's *claim* on the domain. Several
    organizations may hold unverified claims on the same name (so a claim that never verifies
    blocks no one), but at most one claim per domain is verified on the installation — the
    partial unique index below enforces it on both databases. A claim is verified when the
    organization's own random ``ownership_token`` is found in the TXT record
    ``_carepost-challenge.<domain>`` (``domains.verify_ownership``); only then may the domain send
    (except to the local capture of ``carepost run`` and for sandbox credentials), and only the
    verified owner receives the reports sent to its return-path domain.
    """

    __tablename__ = "sending_domains"
    __table_args__ = (
        UniqueConstraint("org_id", "domain"),
        Index("uq_sending_domains_verified_domain", "domain", unique=True,
              sqlite_where=text("verified_at IS NOT NULL"), postgresql_where=text("verified_at IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    domain: Mapped[str] = mapped_column(String(253))  # A-label form
    selector: Mapped[str] = mapped_column(String(63))  # RSA key; the Ed25519 key uses f"{selector}e"
    dkim_rsa_private_enc: Mapped[bytes] = mapped_column(LargeBinary)
    dkim_rsa_record: Mapped[str] = mapped_column(Text)
    dkim_ed25519_private_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    dkim_ed25519_record: Mapped[str | None] = mapped_column(Text)
    # RSA-2048 key that signs S/MIME messages from this domain (RFC 8551), encrypted; made with
    # the domain, or at its first S/MIME message for domains older than the signature.
    smime_signing_private_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    return_path_domain: Mapped[str] = mapped_column(String(253))
    mta_sts_id: Mapped[str] = mapped_column(String(32))
    checked_at: Mapped[datetime | None]
    check_results: Mapped[dict] = mapped_column(JSON, default=dict)
    dns_ok: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    # Published by the domain's owner as ``_carepost-challenge.<domain> TXT "carepost-verify=<token>"``;
    # random per claim, so one organization's record never verifies another's claim.
    ownership_token: Mapped[str] = mapped_column(String(64), default=lambda: secrets.token_hex(16))
    verified_at: Mapped[datetime | None]  # when the ownership record was found; None: not proven


class RecipientKey(OrgScoped, Base):
    """An OpenPGP or S/MIME certificate on file for one recipient address."""

    __tablename__ = "recipient_keys"
    __table_args__ = (UniqueConstraint("org_id", "address_index", "kind"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    address_index: Mapped[str] = mapped_column(String(64), index=True)
    address_enc: Mapped[bytes] = mapped_column(LargeBinary)
    kind: Mapped[str] = mapped_column(String(8))  # pgp | smime
    key_enc: Mapped[bytes] = mapped_column(LargeBinary)  # armored OpenPGP certificate or PEM certificate
    fingerprint: Mapped[str] = mapped_column(String(64))
    # S/MIME only: the content encryption the holder can read (aes128-gcm | aes256-gcm |
    # aes256-cbc), from the certificate's SMIMECapabilities or the explicit legacy flag on upload.
    smime_capabilities: Mapped[str | None] = mapped_column(String(16))
    expires_at: Mapped[datetime | None]
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class Message(OrgScoped, Base):
    """One message as submitted (API, SMTP submission, campaign, journey)."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("org_id", "idempotency_key"),
        # Covering for segments' "message ... within" criteria (issue 12): the window's messages are
        # read from the index alone, never from the wide (encrypted) rows.
        Index("ix_messages_org_created", "org_id", "created_at", "sandbox", "id"),
        Index("ix_messages_org_campaign", "org_id", "campaign_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    source: Mapped[str] = mapped_column(String(16), default="api")  # api | smtp | ui (compose page) | campaign | journey
    sending_domain_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("sending_domains.id", ondelete="SET NULL"))
    from_address: Mapped[str] = mapped_column(String(320))  # the organization's own address, not PHI
    from_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    reply_to_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    subject_enc: Mapped[bytes] = mapped_column(LargeBinary)
    html_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    text_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    template_id: Mapped[str | None] = mapped_column(String(32))
    template_version_id: Mapped[str | None] = mapped_column(String(32))  # the immutable version rendered
    contains_phi: Mapped[bool] = mapped_column(Boolean, default=True)
    security: Mapped[str] = mapped_column(String(16))  # effective mode
    purpose: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[list] = mapped_column(JSON, default=list)
    # The consent topic (consent.models.Topic id) the message belongs to; its opt-outs apply.
    # Messages stored before the field carry a ``topic:<key>`` tag instead (still read).
    topic_id: Mapped[str | None] = mapped_column(String(32))
    # The campaign (campaigns.models.Campaign id) that planned this message; None for others.
    campaign_id: Mapped[str | None] = mapped_column(String(32))
    # The journey step that sent this message (journeys.models.step_key: version and step id,
    # 32 hex characters — the rollups' ``journey_step_id`` dimension); None for others.
    journey_step_id: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    sandbox: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(32))  # user or API credential id
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    # Idempotency: ``idempotency_key`` holds the SHA-256 of the caller's key (a key could be
    # anything, PHI included); ``request_hash`` the SHA-256 of the request it came with.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    message_id_header: Mapped[str | None] = mapped_column(String(300))  # the Message-ID every copy carries
    headers_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # the caller's extra headers (JSON), encrypted
    portal_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # portal options (JSON: auth, question, answer, expiry), encrypted
    # Engagement tracking (issue 13 item 1): an open pixel and click redirects added at composition
    # (carepost.tracking.links), per message; campaigns and journeys set them for their messages.
    track_opens: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    track_clicks: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class MessageAttachment(OrgScoped, Base):
    __tablename__ = "message_attachments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    filename_enc: Mapped[bytes] = mapped_column(LargeBinary)
    content_type: Mapped[str] = mapped_column(String(255))
    content_enc: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    inline_cid: Mapped[str | None] = mapped_column(String(200))


class MessageRecipient(OrgScoped, Base):
    """One recipient of one message: its method, status and the evidence of protection."""

    __tablename__ = "message_recipients"
    __table_args__ = (
        Index("ix_message_recipients_due", "status", "next_attempt_at"),
        Index("ix_message_recipients_org_address", "org_id", "address_index"),
        # a contact's recipient rows (segments' engagement criteria probe it per contact; issue 12)
        Index("ix_message_recipients_org_contact", "org_id", "contact_id", "status", "message_id"),
        # a message's recipients; covering for segments' engagement criteria, which go from the
        # messages of a window to the delivered recipients' contacts without reading the rows
        Index("ix_message_recipients_message_id", "message_id", "status", "contact_id", "org_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(3), default="to")  # to | cc | bcc
    address_enc: Mapped[bytes] = mapped_column(LargeBinary)
    address_index: Mapped[str] = mapped_column(String(64))
    domain_index: Mapped[str] = mapped_column(String(64))
    contact_id: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    method: Mapped[str | None] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(Text)  # never PHI: policy and SMTP reasons by code
    possible_duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    first_attempt_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    evidence: Mapped[dict] = mapped_column(JSON, default=dict)
    reply_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_fingerprint: Mapped[str | None] = mapped_column(String(64))
    portal_message_id: Mapped[str | None] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)
    display_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # "Pat Doe" of "Pat Doe <pat@...>", encrypted
    enqueued_at: Mapped[datetime | None]  # last time a delivery task was queued for it (the sweep re-queues lost ones)
    # Set (and committed) before the SMTP transaction of an attempt begins, cleared when its
    # outcome is recorded: still set when the recipient is claimed again means a worker died
    # while the message may have reached the server, so a new send is a possible duplicate.
    sending_since: Mapped[datetime | None]


class MessageEvent(OrgScoped, Base):
    """What happened to a recipient, in order. Details hold codes and ids, never PHI."""

    __tablename__ = "message_events"
    __table_args__ = (
        Index("ix_message_events_recipient", "recipient_id", "created_at"),
        # an organization's events from a day on: ``carepost analytics rebuild --from DAY`` (issue 13)
        Index("ix_message_events_org_created", "org_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    recipient_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("message_recipients.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class SandboxCapture(OrgScoped, Base):
    """What a sandbox credential's message would have sent to one recipient: the final wire form
    (composed, encrypted when so decided, DKIM-signed), encrypted at rest. Nothing was delivered."""

    __tablename__ = "sandbox_captures"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    recipient_id: Mapped[str] = mapped_column(String(32), ForeignKey("message_recipients.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(8))
    raw_enc: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


SUPPRESSION_REASONS = ("bounce_hard", "bounce_soft", "complaint", "unsubscribe", "manual", "legal_hold")
SUPPRESSION_SCOPES = ("all", "marketing", "topic")


class Suppression(OrgScoped, Base):
    """An address CarePost must not send to (everything, all marketing, or one topic).

    ``scope_key`` is ``"<scope>:<topic id or ''>"``: one row per (organization, address, scope,
    topic) — adding the same suppression twice is a no-op. ``details`` holds codes only (SMTP
    status, feedback type, import id), never PHI.
    """

    __tablename__ = "suppressions"
    __table_args__ = (
        UniqueConstraint("org_id", "address_index", "scope_key", name="uq_suppressions_address_scope"),
        Index("ix_suppressions_org_created", "org_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    address_index: Mapped[str] = mapped_column(String(64))
    address_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(12), default="all")
    topic_id: Mapped[str | None] = mapped_column(String(32))
    scope_key: Mapped[str] = mapped_column(String(48))
    source: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)
    expires_at: Mapped[datetime | None]


class InboundReport(OrgScoped, Base):
    """A message received on an organization's return-path domain (a bounce, a complaint, or
    anything else sent there), kept encrypted until it is processed and for a while after."""

    __tablename__ = "inbound_reports"
    __table_args__ = (Index("ix_inbound_reports_org_received", "org_id", "received_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    received_at: Mapped[datetime] = mapped_column(default=clock.now)
    envelope_recipients: Mapped[list] = mapped_column(JSON, default=list)  # return-path addresses: ids and MACs only
    null_sender: Mapped[bool] = mapped_column(Boolean, default=False)
    peer: Mapped[str | None] = mapped_column(String(64))  # the sending MTA's IP address
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    size: Mapped[int] = mapped_column(Integer, default=0)
    raw_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | applied | ignored
    kind: Mapped[str | None] = mapped_column(String(16))  # dsn | arf | other | unparseable | unsubscribe | dmarc_aggregate | tls_report | feedback
    outcome: Mapped[dict] = mapped_column(JSON, default=dict)  # bounces.Outcome, no PHI
    recipient_id: Mapped[str | None] = mapped_column(String(32))
    processed_at: Mapped[datetime | None]


class StoredMtaStsPolicy(Base):
    """The last MTA-STS policy (RFC 8461) fetched for a recipient domain, kept until its
    ``max_age`` runs out so that a failed refresh — an attacker blocking the policy host, or an
    outage — does not downgrade delivery to "no policy" (RFC 8461 5.1).

    Installation-wide (a recipient domain's policy is the same for every organization), so it is
    not organization-scoped. A recipient's domain can identify a person, so the domain is kept
    only as a keyed hash (``domain_index``, HMAC under the installation's ``mtasts`` key) and the
    policy text (its MX patterns name the domain) encrypted under that key."""

    __tablename__ = "mta_sts_policies"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    domain_index: Mapped[str] = mapped_column(String(64), unique=True)
    policy_id: Mapped[str] = mapped_column(String(32))  # the id= of the _mta-sts TXT record
    mode: Mapped[str] = mapped_column(String(8))  # enforce | testing | none
    policy_enc: Mapped[bytes] = mapped_column(LargeBinary)  # JSON {"mx": [...], "max_age": n}, AES-GCM
    fetched_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)  # fetched_at + max_age


class ComposedSend(OrgScoped, Base):
    """What one press of "Send" on the compose page stored (issue 10 item 5): one message per
    recipient, listed together on the page that follows. Ids only: no address, no content."""

    __tablename__ = "composed_sends"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_ids: Mapped[list] = mapped_column(JSON, default=list)
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
