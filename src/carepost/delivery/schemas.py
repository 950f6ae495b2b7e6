"""Pydantic shapes of the delivery API (``/api/v1/messages``, ``/domains``, ``/recipient-keys``,
``/security-preview``). The routes are built on these; field names are the public contract in
issue 4, item 11 ("from", "to", "subject", "html", "text", "contains_phi", "security",
"purpose"...). Validation messages never echo the value (it may be PHI)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SecurityMode = Literal["opportunistic", "tls_required", "tls_exclusive", "secure"]
Method = Literal["tls", "pgp", "smime", "portal", "none"]
RecipientStatus = Literal[
    "queued", "excluded", "deferred", "sent", "delivered", "bounced", "failed", "portal_viewed", "recalled", "expired"
]

MAX_RECIPIENTS = 1000
MAX_BATCH = 1000
MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def decode_base64(value, max_bytes: int) -> bytes:
    """A pydantic ``before`` validator's body for file content sent as base64 text: the decoded
    bytes, or ValueError (422 naming the field) for what is not base64 or is too large."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        raise ValueError("must be base64 text")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64") from None
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    return data


class AttachmentIn(_In):
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field("application/octet-stream", max_length=255)
    content: bytes = Field(description="Base64 of the file.")
    content_id: str | None = Field(None, max_length=200, description="Set for an inline image the html refers to as cid:<content_id>.")

    @field_validator("content", mode="before")
    @classmethod
    def _decode(cls, value):
        return decode_base64(value, MAX_ATTACHMENT_BYTES)


class PortalOptionsIn(_In):
    """How a recipient who gets the secure portal signs in, and how long the message stays."""

    auth: Literal["code", "question"] = Field("code", description="A one-time code mailed to the recipient, or the sender's question.")
    question: str | None = Field(None, max_length=300)
    answer: str | None = Field(None, max_length=200, description="Hashed (Argon2id) when the message is accepted; never stored readable. "
                        "Compared ignoring case and spacing.")
    expires_at: datetime | None = Field(None, description="Default: CAREPOST_PORTAL_EXPIRY_DAYS after delivery.")

    @model_validator(mode="after")
    def _question(self):
        if self.auth == "question" and not (self.question and self.question.strip() and self.answer and self.answer.strip()):
            raise ValueError("a question and its answer are needed when auth is question")
        return self


class MessageIn(_In):
    sender: str = Field(alias="from", max_length=400)
    to: list[str] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    cc: list[str] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: list[str] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    reply_to: str | None = Field(None, max_length=400)
    subject: str | None = Field(None, max_length=998)
    html: str | None = None
    text: str | None = None
    template_id: str | None = Field(None, max_length=32)
    data: dict = Field(default_factory=dict, description="Template variables.")
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=50)
    contains_phi: bool = True
    security: SecurityMode | None = Field(None, description="Raises the organization's mode for this message; never lowers it.")
    purpose: str | None = Field(None, max_length=64)
    topic: str | None = Field(None, min_length=1, max_length=64,
                              description="The consent topic the message belongs to (its id or short name): "
                                          "patients unsubscribed from it are excluded, and its unsubscribe link "
                                          "opts out of that topic.")
    tags: list[str] = Field(default_factory=list, max_length=20)
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)
    portal: PortalOptionsIn | None = Field(None, description="Sign-in and expiry for recipients who get the secure portal.")
    track_opens: bool = Field(False, description="Add an open pixel (not for PGP/S/MIME copies nor the portal; "
                              "see docs/tracking.md). Opens are classified human, proxy or scanner.")
    track_clicks: bool = Field(False, description="Send links through click redirects under /t/c/ (opaque tokens, "
                               "the URL recorded at send time).")

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not tag or len(tag) > 64 or not tag.isprintable():
                raise ValueError("tags are 1 to 64 printable characters")
        return tags

    @model_validator(mode="after")
    def _complete(self):
        if not (self.to or self.cc or self.bcc):
            raise ValueError("at least one recipient (to, cc or bcc) is required")
        if len(self.to) + len(self.cc) + len(self.bcc) > MAX_RECIPIENTS:
            raise ValueError(f"at most {MAX_RECIPIENTS} recipients per message")
        if self.template_id is None:
            if self.html is None and self.text is None:
                raise ValueError("give html or text, or a template_id")
            if self.subject is None:
                raise ValueError("a subject is required without a template")
        if sum(len(a.content) for a in self.attachments) > MAX_ATTACHMENT_BYTES:
            raise ValueError(f"attachments larger than {MAX_ATTACHMENT_BYTES} bytes in total")
        return self


class MessageBatchIn(_In):
    messages: list[MessageIn] = Field(min_length=1, max_length=MAX_BATCH)


class MessageAccepted(BaseModel):
    id: str


class MessageBatchAccepted(BaseModel):
    ids: list[str]


class EventOut(BaseModel):
    type: str
    at: datetime
    details: dict = Field(default_factory=dict)


class EvidenceOut(BaseModel):
    mx_host: str | None = None
    address: str | None = Field(None, description="The IP address of the MX host the message was handed to.")
    port: int | None = Field(None, description="The port of that connection.")
    tls_version: str | None = None
    cipher: str | None = None
    cert_fingerprint: str | None = None
    cert_verified: bool = False
    dane: bool = Field(False, description="The certificate was authenticated by DNSSEC-validated TLSA records (DANE, RFC 7672).")
    mta_sts: str | None = Field(None, description="The MTA-STS mode in force: enforce, testing or none.")
    mta_sts_id: str | None = None
    mta_sts_source: str | None = Field(
        None, description="fetched, stored (unchanged id), or stored_after_failure (refresh failed; RFC 8461 5.1).")
    mta_sts_report: str | None = Field(
        None, description="Mode testing: what enforce would have refused (reported, not enforced).")
    relay: bool = False
    reply_code: int | None = None
    key_fingerprint: str | None = None
    portal_message_id: str | None = None
    sandbox: bool = False


class EngagementKindOut(BaseModel):
    human: int = Field(0, description="Events classified as a person.")
    machine: int = Field(0, description="Events from a privacy proxy (Apple Mail Privacy Protection, image proxies) "
                                        "or a security scanner.")
    first_at: datetime | None = None
    last_at: datetime | None = None
    first_human_at: datetime | None = None


class RecipientEngagementOut(BaseModel):
    opened: EngagementKindOut
    clicked: EngagementKindOut


class MessageEngagementOut(BaseModel):
    privacy_mode: bool = Field(False, description="The organization keeps aggregate counts only: no per-recipient "
                                                  "engagement, unique figures unknown (null).")
    totals: dict[str, int | None] = Field(default_factory=dict, description=(
        "opened, opened_unique, opened_human, opened_machine, clicked, clicked_unique, clicked_human, clicked_machine "
        "— the analytics metrics of the same names (GET /api/v1/analytics/metrics); *_machine counts events."))


class RecipientOut(BaseModel):
    address: str
    kind: Literal["to", "cc", "bcc"] = "to"
    status: RecipientStatus
    method: Method | None = None
    reason: str | None = None
    possible_duplicate: bool = False
    evidence: EvidenceOut = Field(default_factory=EvidenceOut)
    events: list[EventOut] = Field(default_factory=list)
    engagement: RecipientEngagementOut | None = Field(
        None, description="Opens and clicks of this copy (null: none recorded, or privacy mode).")


class MessageOut(BaseModel):
    id: str
    created_at: datetime | None = None
    purpose: str | None = None
    topic: str | None = Field(None, description="The consent topic's id (null when the message has none).")
    security: SecurityMode | None = None
    contains_phi: bool = True
    engagement: MessageEngagementOut = Field(default_factory=MessageEngagementOut)
    recipients: list[RecipientOut]


class RecipientKeyIn(_In):
    address: str = Field(max_length=320)
    kind: Literal["pgp", "smime"]
    key: str = Field(min_length=1, max_length=256 * 1024, description="Armored OpenPGP certificate or PEM X.509 certificate.")
    legacy_cbc: bool = Field(
        False, description="S/MIME only: the recipient's client cannot read AES-GCM (RFC 5084), so messages use "
        "AES-256-CBC. Without it the certificate's SMIMECapabilities decide, and AES-GCM is the default.",
    )


class RecipientKeyOut(BaseModel):
    id: str
    kind: Literal["pgp", "smime"]
    fingerprint: str
    expires_at: datetime | None
    expiring_soon: bool
    smime_capabilities: Literal["aes128-gcm", "aes256-gcm", "aes256-cbc"] | None = Field(
        None, description="S/MIME only: the content encryption used for this recipient (CBC only for legacy clients).")


class SendingDomainIn(_In):
    domain: str = Field(min_length=3, max_length=253)


class DnsRecordOut(BaseModel):
    purpose: str
    type: str
    name: str
    value: str
    note: str = ""


class RecordCheckOut(BaseModel):
    purpose: str
    name: str
    ok: bool
    detail: str


class SendingDomainOut(BaseModel):
    id: str
    domain: str
    selector: str
    return_path_domain: str
    verified: bool = Field(description="Ownership proven (the ownership TXT record was found): only then can the "
                           "domain send, except with sandbox credentials")
    verified_at: datetime | None = None
    ownership_record: DnsRecordOut = Field(description="Publish this TXT record, then verify the domain")
    dns_ok: bool
    checked_at: datetime | None
    records: list[DnsRecordOut]
    checks: list[RecordCheckOut] = Field(default_factory=list)


class SecurityPreviewIn(_In):
    addresses: list[str] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    security: SecurityMode | None = None
    contains_phi: bool = True


class SecurityPreviewRowOut(BaseModel):
    address: str
    method: Method
    reason: str
    mode: SecurityMode


class SecurityPreviewOut(BaseModel):
    recipients: list[SecurityPreviewRowOut]


# --- added with the delivery API (issue 4, items 3-7) ------------------------------------------


class RecipientKeySearchIn(_In):
    address: str = Field(max_length=320)


class RecipientKeyListItem(RecipientKeyOut):
    address: str = Field(description="Masked unless the caller may read PHI unmasked.")


class RecipientKeyList(BaseModel):
    data: list[RecipientKeyListItem]
    expiring_soon: int = Field(description="Keys that expire within 30 days.")


class SendingDomainList(BaseModel):
    data: list[SendingDomainOut]


class RelayIn(_In):
    host: str = Field(max_length=300, description="host, host:port or host@address:port (port 587 by default). "
                      "Reached over verified TLS for the host name; its addresses must be public unless the "
                      "installation allows them (CAREPOST_DELIVERY_ALLOWED_HOSTS).")
    username: str | None = Field(None, max_length=255, description="AUTH user name; none: no AUTH.")
    password: str | None = Field(None, max_length=1024, description="Write-only. Omitted or null: keep the stored "
                                 "password (only while host and user name stay the same); empty: remove it.")
    enforces_tls: bool = Field(False, description="The relay delivers onward only over verified TLS.")


class RelayOut(BaseModel):
    host: str
    port: int | None
    username: str | None
    password_set: bool = Field(description="Whether a password is stored; the password itself is never returned.")
    enforces_tls: bool


class DeliverySettingsIn(_In):
    security_mode: SecurityMode | None = None
    default_purpose: str | None = Field(None, max_length=64)
    relay: RelayIn | None = Field(None, description="The organization's own relay; null removes it (the "
                                  "installation's relay, or direct delivery, is used again).")
    engagement_privacy: bool | None = Field(None, description="Privacy mode for engagement tracking: only aggregate "
                                            "open and click counts, no per-recipient rows (tokens name no recipient).")


class DeliverySettingsOut(BaseModel):
    security_mode: SecurityMode
    default_purpose: str | None
    relay: RelayOut | None = Field(None, description="The organization's own relay; null: the installation's relay "
                                   "(CAREPOST_SMTP_RELAY) or direct delivery.")
    engagement_privacy: bool = Field(False, description="Privacy mode for engagement tracking (aggregate counts only).")


class MessageSummaryOut(BaseModel):
    id: str
    created_at: datetime
    source: str
    purpose: str | None
    security: SecurityMode
    contains_phi: bool
    sandbox: bool
    recipients: int
    statuses: dict[str, int]


class MessageList(BaseModel):
    data: list[MessageSummaryOut]
    next_cursor: str | None = None
