"""Secure delivery logic over the database: sending domains and their DNS records, recipient
keys, the pre-send security preview, and recording delivery outcomes.

Plain functions taking a session (ARCHITECTURE.md section 3); the caller commits. Audit events
for people and API clients touching recipient keys or messages are written by the routes that
call these functions (``audit.service.record_for``), which know the principal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core import events as domain_events
from carepost.core.config import Settings, get_settings
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.delivery import dkim, pgp, policy, portal_answer, smime
from carepost.delivery import dns as cpdns
from carepost.delivery import tlsprobe
from carepost.delivery.mime import MailAddress, ascii_domain, message_id_for, parse_address
from carepost.delivery.models import Message, MessageAttachment, MessageEvent, MessageRecipient, RecipientKey, SendingDomain
from carepost.delivery.schemas import MAX_ATTACHMENT_BYTES
from carepost.delivery.smtp import RecipientResult, retries_exhausted, retry_delay

KEY_KINDS = ("pgp", "smime")
KEY_EXPIRY_WARNING = timedelta(days=30)


# --- sending domains ---------------------------------------------------------------------------


def _selector() -> str:
    return f"cp{clock.now():%Y%m}"


def create_sending_domain(session: Session, org_id: str, domain: str, *, ed25519: bool = True) -> SendingDomain:
    """Add a sending domain with fresh DKIM keys (RSA-2048, and Ed25519 unless disabled)."""
    name = ascii_domain(domain, field_name="domain")
    exists = session.scalars(select(SendingDomain).where(SendingDomain.org_id == org_id, SendingDomain.domain == name)).first()
    if exists:
        raise Conflict("This sending domain already exists.", field="domain")
    row = SendingDomain(id=new_id(), org_id=org_id, domain=name, selector=_selector(), return_path_domain=f"bounces.{name}",
                        mta_sts_id=secrets.token_hex(8), check_results={})
    ring = get_keyring()
    rsa_key = dkim.generate_rsa_key()
    row.dkim_rsa_private_enc = ring.encrypt(session, org_id, SendingDomain.__tablename__, "dkim_rsa_private", row.id,
                                            dkim.private_key_pem(rsa_key))
    row.dkim_rsa_record = dkim.public_key_record(rsa_key)
    if ed25519:
        ed_key = dkim.generate_ed25519_key()
        row.dkim_ed25519_private_enc = ring.encrypt(session, org_id, SendingDomain.__tablename__,
                                                    "dkim_ed25519_private", row.id, dkim.private_key_pem(ed_key))
        row.dkim_ed25519_record = dkim.public_key_record(ed_key)
    row.smime_signing_private_enc = ring.encrypt(session, org_id, SendingDomain.__tablename__, "smime_signing_private",
                                                 row.id, dkim.private_key_pem(smime.generate_signing_key()))
    session.add(row)
    session.flush()
    return row


def smime_signing_key(session: Session, row: SendingDomain):
    """The domain's S/MIME signing key, decrypted in memory only; made (and stored on the row,
    flushed with the caller's transaction) for a domain created before S/MIME was signed."""
    ring = get_keyring()
    if row.smime_signing_private_enc is None:
        key = smime.generate_signing_key()
        row.smime_signing_private_enc = ring.encrypt(session, row.org_id, SendingDomain.__tablename__,
                                                     "smime_signing_private", row.id, dkim.private_key_pem(key))
        return key
    pem = ring.decrypt(session, row.org_id, SendingDomain.__tablename__, "smime_signing_private", row.id,
                       row.smime_signing_private_enc)
    return dkim.load_private_key(pem)


def get_sending_domain(session: Session, domain: str) -> SendingDomain:
    """The session's organization's sending domain by name (the session is org-scoped)."""
    name = ascii_domain(domain, field_name="domain")
    row = session.scalars(select(SendingDomain).where(SendingDomain.domain == name)).first()
    if row is None:
        raise NotFound("No such sending domain.", field="domain")
    return row


def dkim_keys(session: Session, row: SendingDomain) -> list[dkim.DkimKey]:
    """The domain's signing keys, decrypted in memory only."""
    ring = get_keyring()
    pem = ring.decrypt(session, row.org_id, SendingDomain.__tablename__, "dkim_rsa_private", row.id, row.dkim_rsa_private_enc)
    keys = [dkim.DkimKey(row.domain, row.selector, dkim.load_private_key(pem))]
    if row.dkim_ed25519_private_enc:
        pem = ring.decrypt(session, row.org_id, SendingDomain.__tablename__, "dkim_ed25519_private", row.id,
                           row.dkim_ed25519_private_enc)
        keys.append(dkim.DkimKey(row.domain, f"{row.selector}e", dkim.load_private_key(pem)))
    return keys


@dataclass(frozen=True)
class DnsRecord:
    purpose: str  # dkim | dkim-ed25519 | spf | dmarc | return-path-mx | mta-sts | mta-sts-host
    type: str  # TXT | MX | CNAME
    name: str
    value: str
    note: str = ""


def mail_host(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return (settings.smtp_helo_name or socket.getfqdn()).lower().rstrip(".")


def dns_records(row: SendingDomain, settings: Settings | None = None) -> list[DnsRecord]:
    """The exact records to publish for a sending domain."""
    settings = settings or get_settings()
    host = mail_host(settings)
    web_host = urlparse(settings.base_url).hostname or host
    rp = row.return_path_domain
    records = [
        DnsRecord("dkim", "TXT", dkim.record_name(row.selector, row.domain), row.dkim_rsa_record,
                  "RSA-2048 DKIM key. Longer than 255 characters: most DNS hosts split it for you."),
    ]
    if row.dkim_ed25519_record:
        records.append(DnsRecord("dkim-ed25519", "TXT", dkim.record_name(f"{row.selector}e", row.domain),
                                 row.dkim_ed25519_record, "Ed25519 DKIM key (RFC 8463), the second signature."))
    records += [
        DnsRecord("spf", "TXT", rp, f"v=spf1 a:{host} -all",
                  "The return path is a subdomain, so SPF aligns with the From domain under DMARC (relaxed)."),
        DnsRecord("dmarc", "TXT", f"_dmarc.{row.domain}", f"v=DMARC1; p=none; adkim=r; aspf=r; rua=mailto:dmarc@{rp}",
                  "p=none is the minimum Gmail and Yahoo require; move to quarantine once reports look clean."),
        DnsRecord("return-path-mx", "MX", rp, f"10 {host}", "Bounces and complaints come back to CarePost here."),
        DnsRecord("mta-sts", "TXT", f"_mta-sts.{rp}", f"v=STSv1; id={row.mta_sts_id}",
                  "Tells senders of bounces to require TLS to the return-path host (RFC 8461)."),
        DnsRecord("mta-sts-host", "CNAME", f"mta-sts.{rp}", web_host,
                  "Serves the MTA-STS policy over HTTPS."),
    ]
    return records


def mta_sts_policy(settings: Settings | None = None, *, mode: str = "enforce", max_age: int = 604800) -> str:
    """The policy text served at https://mta-sts.<return-path domain>/.well-known/mta-sts.txt."""
    return f"version: STSv1\nmode: {mode}\nmx: {mail_host(settings)}\nmax_age: {max_age}\n"


@dataclass(frozen=True)
class RecordCheck:
    purpose: str
    name: str
    ok: bool
    detail: str


def _txt_check(record: DnsRecord, found: list[str]) -> RecordCheck:
    def result(ok: bool, detail: str) -> RecordCheck:
        return RecordCheck(record.purpose, record.name, ok, detail)

    if record.purpose.startswith("dkim"):
        wanted = record.value.split("p=", 1)[1]
        keys = [t.replace(" ", "") for t in found if "p=" in t]
        if any(k.split("p=", 1)[1].split(";")[0] == wanted for k in keys):
            return result(True, "published")
        return result(False, "a different DKIM key is published" if keys else "not published")
    if record.purpose == "spf":
        spf = [t for t in found if t.lower().startswith("v=spf1")]
        if not spf:
            return result(False, "no SPF record")
        if len(spf) > 1:
            return result(False, "more than one SPF record (RFC 7208 allows one)")
        mechanism = record.value.split()[1]
        if mechanism.lower() in spf[0].lower().split() or "include:" in spf[0].lower():
            return result(True, "published")
        return result(False, f"the SPF record does not contain {mechanism}")
    if record.purpose == "dmarc":
        dmarc = [t for t in found if t.replace(" ", "").lower().startswith("v=dmarc1")]
        if len(dmarc) != 1:
            return result(False, "no DMARC record" if not dmarc else "more than one DMARC record")
        tags = dict(p.strip().split("=", 1) for p in dmarc[0].split(";") if "=" in p)
        if tags.get("p", "").strip().lower() not in ("none", "quarantine", "reject"):
            return result(False, "the DMARC record has no valid p= policy")
        return result(True, f"published (p={tags['p'].strip().lower()})")
    if record.purpose == "mta-sts":
        return result(True, "published") if tlsprobe.parse_sts_txt(found) else result(False, "not published")
    return result(False, "unknown record")


async def check_dns(records: list[DnsRecord]) -> list[RecordCheck]:
    """Look each record up live; pass or fail with the reason."""

    async def one(record: DnsRecord) -> RecordCheck:
        try:
            if record.type == "TXT":
                return _txt_check(record, await cpdns.lookup_txt(record.name))
            if record.type == "MX":
                host = record.value.split()[1]
                try:
                    targets = await cpdns.lookup_mx(record.name, settings=get_settings().model_copy(update={"mx_overrides": None}))
                except cpdns.DnsError as err:
                    if err.temporary:
                        raise
                    return RecordCheck(record.purpose, record.name, False, "no MX record")
                ok = any(t.host == host for t in targets)
                return RecordCheck(record.purpose, record.name, ok, "published" if ok else f"MX does not point to {host}")
            addresses = await cpdns.resolve_addresses(record.name)
            return RecordCheck(record.purpose, record.name, bool(addresses), "resolves" if addresses else "does not resolve")
        except cpdns.DnsError as err:
            return RecordCheck(record.purpose, record.name, False, f"look-up failed, try again: {err}")

    return list(await asyncio.gather(*(one(r) for r in records)))


def apply_dns_check(row: SendingDomain, results: list[RecordCheck]) -> None:
    """Store a check's outcome on the domain (sending is allowed either way; the UI and
    ``doctor`` flag a domain whose records do not check out)."""
    row.check_results = {r.purpose: {"name": r.name, "ok": r.ok, "detail": r.detail} for r in results}
    row.dns_ok = all(r.ok for r in results)
    row.checked_at = clock.now()


# --- recipient keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    id: str
    kind: str
    fingerprint: str
    expires_at: datetime | None
    expiring_soon: bool
    smime_capabilities: str | None = None


def _key_info(row: RecipientKey) -> KeyInfo:
    expires = clock.aware(row.expires_at)
    return KeyInfo(row.id, row.kind, row.fingerprint, expires,
                   expires is not None and expires - clock.now() <= KEY_EXPIRY_WARNING, row.smime_capabilities)


def add_recipient_key(session: Session, org_id: str, address: str, kind: str, key: str | bytes, *,
                      actor_id: str | None = None, legacy_cbc: bool = False) -> KeyInfo:
    """Validate and store a recipient's certificate; replaces the address's key of that kind.
    For S/MIME the content encryption the holder can read is recorded with it: AES-GCM unless
    the certificate's capabilities or ``legacy_cbc`` (the sender knows the client) say CBC."""
    if kind not in KEY_KINDS:
        raise ValidationFailed("The key kind must be pgp or smime.", field="kind")
    parsed = parse_address(address, field_name="address", allow_display_name=False)
    addr = parsed.addr_spec
    if kind == "pgp":
        info = pgp.load_certificate(key, addr, field="key")
        material, fingerprint, expires = info.armored, info.fingerprint, info.expires_at
        capabilities = None
    else:
        info = smime.load_certificate(key, addr, field="key")
        material, fingerprint, expires = info.pem, info.fingerprint, info.not_after
        capabilities = smime.capabilities_for(info.pem, legacy_cbc=legacy_cbc)
    ring = get_keyring()
    index = ring.blind_index(session, org_id, "email", addr)
    row = session.scalars(
        select(RecipientKey).where(RecipientKey.org_id == org_id, RecipientKey.address_index == index,
                                   RecipientKey.kind == kind)
    ).first()
    row_id = row.id if row is not None else new_id()
    # Encrypt before touching the row: the keyring reads key records, which would autoflush it.
    address_enc = ring.encrypt(session, org_id, RecipientKey.__tablename__, "address", row_id, addr)
    key_enc = ring.encrypt(session, org_id, RecipientKey.__tablename__, "key", row_id, material)
    if row is None:
        row = RecipientKey(id=row_id, org_id=org_id, address_index=index, kind=kind)
        session.add(row)
    row.address_enc = address_enc
    row.key_enc = key_enc
    row.fingerprint = fingerprint
    row.smime_capabilities = capabilities
    row.expires_at = expires
    row.created_by = actor_id
    row.created_at = clock.now()
    session.flush()
    return _key_info(row)


def recipient_keys(session: Session, org_id: str, address: str) -> dict[str, RecipientKey]:
    """The keys on file for an address, by kind (found through the blind index)."""
    try:
        addr = parse_address(address, field_name="address", allow_display_name=False).addr_spec
    except ValidationFailed:
        return {}
    index = get_keyring().blind_index(session, org_id, "email", addr)
    rows = session.scalars(select(RecipientKey).where(RecipientKey.org_id == org_id, RecipientKey.address_index == index)).all()
    now = clock.now()
    return {r.kind: r for r in rows if r.expires_at is None or clock.aware(r.expires_at) > now}


def recipient_key_infos(session: Session, org_id: str, address: str) -> list[KeyInfo]:
    """For the contact page: the keys on file, with a warning flag when one expires soon."""
    return [_key_info(r) for r in recipient_keys(session, org_id, address).values()]


def recipient_key_material(session: Session, row: RecipientKey) -> str:
    return get_keyring().decrypt_text(session, row.org_id, RecipientKey.__tablename__, "key", row.id, row.key_enc)


def expiring_recipient_keys(session: Session, within: timedelta = KEY_EXPIRY_WARNING) -> list[KeyInfo]:
    """Keys of the session's organization that expire within ``within`` (not yet expired)."""
    now = clock.now()
    rows = session.scalars(select(RecipientKey).where(RecipientKey.expires_at.is_not(None))).all()
    return [_key_info(r) for r in rows if now < clock.aware(r.expires_at) <= now + within]


def delete_recipient_key(session: Session, key_id: str) -> None:
    row = session.get(RecipientKey, key_id)
    if row is None or (session.info.get("org_id") and row.org_id != session.info["org_id"]):
        raise NotFound("No such recipient key.", field="id")
    session.delete(row)


# --- security preview --------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewRow:
    address: str
    method: str
    reason: str
    mode: str

    def to_dict(self) -> dict:
        return asdict(self)


async def security_preview(session_keys: dict[str, dict[str, bool]], *, org_mode: str, override: str | None = None,
                           contains_phi: bool = True, settings: Settings | None = None) -> list[PreviewRow]:
    """The method each address would get now, and why. ``session_keys`` maps each address to
    ``{"pgp": bool, "smime": bool}`` (from :func:`keys_on_file`); TLS facts come from the probe
    (cached). Raises ValidationFailed for a mode the message may not use."""
    settings = settings or get_settings()
    policy.effective_mode(org_mode, override)
    relay = None
    if settings.smtp_relay:
        relay = "enforcing" if settings.smtp_relay_enforces_tls else "plain"
    domains = sorted({a.rsplit("@", 1)[1].lower() for a in session_keys})
    probes = {}
    if relay is None:
        found = await asyncio.gather(*(tlsprobe.probe_domain(d, settings=settings) for d in domains))
        probes = dict(zip(domains, found))
    rows = []
    for address, keys in session_keys.items():
        probe = probes.get(address.rsplit("@", 1)[1].lower())
        decision = policy.decide(
            org_mode=org_mode, override=override, contains_phi=contains_phi, pgp_key=keys.get("pgp", False),
            smime_key=keys.get("smime", False), verified_tls=probe.verified_tls if probe else None,
            tls_offered=any(m.starttls for m in probe.mx) if probe else None,
            tls_reason=probe.reason if probe else None, relay=relay,
        )
        rows.append(PreviewRow(address, decision.method, decision.reason, decision.mode))
    return rows


def keys_on_file(session: Session, org_id: str, addresses: list[str]) -> dict[str, dict[str, bool]]:
    """Normalized address -> which kinds of key are on file. Invalid addresses are refused."""
    out = {}
    for i, address in enumerate(addresses):
        addr = parse_address(address, field_name=f"addresses[{i}]", allow_display_name=False).addr_spec
        kinds = recipient_keys(session, org_id, addr)
        out[addr] = {"pgp": "pgp" in kinds, "smime": "smime" in kinds}
    return out


# --- outcomes ----------------------------------------------------------------------------------


def add_event(session: Session, recipient: MessageRecipient, type_: str, **details) -> MessageEvent:
    event = MessageEvent(id=new_id(), org_id=recipient.org_id, message_id=recipient.message_id,
                         recipient_id=recipient.id, type=type_, details=details)
    session.add(event)
    # Every message event goes out to the organization's webhooks (tracking, wired by the root).
    domain_events.publish("message.recipient_event", session, recipient, event)
    return event


def record_result(session: Session, recipient: MessageRecipient, result: RecipientResult, *, method: str,
                  key_fingerprint: str | None = None) -> None:
    """Apply one delivery attempt's outcome to the recipient row and its event log.

    ``deferred`` schedules the next attempt with exponential backoff until the retry period
    (``CAREPOST_DELIVERY_RETRY_HOURS``) is over, then fails the recipient."""
    now = clock.now()
    recipient.attempts += 1
    recipient.first_attempt_at = recipient.first_attempt_at or now
    recipient.method = method
    recipient.key_fingerprint = key_fingerprint or recipient.key_fingerprint
    recipient.possible_duplicate = recipient.possible_duplicate or result.possible_duplicate
    recipient.lease_until = None
    recipient.lease_owner = None
    if result.evidence is not None:
        # Evidence.to_dict() without dataclasses.asdict's deep copy (every value is a scalar):
        # this runs once per delivered recipient.
        evidence = dict(vars(result.evidence))
        evidence["at"] = evidence["at"].isoformat() if evidence.get("at") else None
        reply = evidence.pop("reply", None)
        recipient.evidence = evidence
        if reply:
            recipient.reply_enc = get_keyring().encrypt(session, recipient.org_id, MessageRecipient.__tablename__,
                                                        "reply", recipient.id, reply)
    status = result.status
    if status == "tls_unavailable":
        # The pipeline takes the policy's fallback (policy.after_tls_failure) before recording;
        # reaching here means there was none: the recipient fails, nothing was sent.
        status = "failed"
    if status == "deferred":
        if retries_exhausted(recipient.first_attempt_at):
            status = "failed"
            recipient.next_attempt_at = None
            recipient.reason = f"gave up after retrying: {result.reason}"
        else:
            recipient.next_attempt_at = now + retry_delay(recipient.attempts)
            recipient.reason = result.reason
    else:
        recipient.next_attempt_at = None
        recipient.reason = result.reason
    recipient.status = status
    bounce = {}
    if status == "bounced":
        from carepost.delivery import bounces

        bounce = bounces.smtp_bounce_details(result)
    add_event(session, recipient, status, method=method, reply_code=result.reply_code,
              possible_duplicate=result.possible_duplicate, **bounce)
    if bounce:
        bounces.after_bounce(session, recipient, bounce, source="smtp")


# --- one recipient through the pipeline --------------------------------------------------------
# The named steps, top to bottom: decide -> protect (PGP / S/MIME) -> sign (DKIM) -> send ->
# fall back when verified TLS turned out to be unavailable. Composition happens before (one
# composed message serves every recipient that gets the same content).


@dataclass
class Delivered:
    decision: policy.Decision
    results: list[RecipientResult]
    key_fingerprint: str | None = None

    @property
    def needs_portal(self) -> bool:
        """The recipient gets the secure portal instead (a notification without PHI)."""
        return self.decision.method == "portal"


def protect(raw: bytes, method: str, key_material: str | None, *, smime_signing_key=None,
            smime_capabilities: str | None = None) -> bytes:
    """The message as it must travel for ``method``: encrypted for PGP and S/MIME (S/MIME signed
    first with the sending domain's key), as is for TLS (and for opportunistic clear text). The
    portal never sends the message itself."""
    if method == "pgp":
        return pgp.encrypt_message(raw, key_material)
    if method == "smime":
        return smime.encrypt_message(raw, key_material, signing_key=smime_signing_key, capability=smime_capabilities)
    if method in ("tls", "none"):
        return raw
    raise ValueError(f"method {method!r} does not send the message by email")


async def deliver_one(client, decision: policy.Decision, *, raw: bytes, sender: str, recipient: str,
                      dkim_keys: list[dkim.DkimKey], smtputf8: bool = False,
                      key_material: str | None = None, key_fingerprint: str | None = None) -> Delivered:
    """Send one recipient's copy as the decision says; never in clear when protection is
    required. Returns the final decision (after any fallback) and the SMTP results."""
    from carepost.delivery.smtp import Envelope

    if decision.method == "portal" or not decision.sends:
        return Delivered(decision, [])
    wire = dkim.sign(protect(raw, decision.method, key_material), dkim_keys)
    envelope = Envelope(sender=sender, recipients=[recipient], message=wire, smtputf8=smtputf8,
                        require_verified_tls=decision.require_verified_tls)
    results = await client.deliver(envelope)
    if results and results[0].status == "tls_unavailable":
        fallback = policy.after_tls_failure(decision, results[0].reason)
        return Delivered(fallback, results)
    return Delivered(decision, results, key_fingerprint if decision.method in ("pgp", "smime") else None)


# =============================================================================================
# Added with the delivery API and pipeline (issue 4, items 3, 5, 7 and 8).
# =============================================================================================

# --- organization delivery settings ------------------------------------------------------------
# Kept in the organization's settings: ``security_mode`` (the floor every message starts from,
# default tls_required) and ``default_purpose`` (the purpose of a message that names none).

DEFAULT_SECURITY_MODE = "tls_required"
_PURPOSE_SHAPE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def known_purposes() -> tuple[str, ...]:
    """The purposes CarePost knows (``core.purposes``)."""
    from carepost.core.purposes import PURPOSES

    return tuple(PURPOSES)


def check_purpose(purpose, field_name: str = "purpose") -> str:
    if not isinstance(purpose, str) or not _PURPOSE_SHAPE.match(purpose):
        raise ValidationFailed("The purpose is a lowercase name such as treatment or marketing.", field=field_name)
    known = known_purposes()
    if purpose not in known:
        raise ValidationFailed(f"Unknown purpose; use one of {', '.join(known)}.", field=field_name)
    return purpose


def delivery_settings(session: Session, org_id: str) -> dict:
    from carepost.accounts.service import get_organization

    values = get_organization(session, org_id).settings or {}
    return {"security_mode": values.get("security_mode") or DEFAULT_SECURITY_MODE,
            "default_purpose": values.get("default_purpose")}


def update_delivery_settings(session: Session, org_id: str, changes: dict) -> dict:
    """Change ``security_mode`` and/or ``default_purpose`` (None clears the default purpose).
    Lowering the mode is allowed here: it is the organization's own decision, audited by the
    route; messages already accepted keep the mode they were accepted with, or a higher one."""
    from carepost.accounts.service import get_organization

    org = get_organization(session, org_id)
    values = dict(org.settings or {})
    for key, value in changes.items():
        if key == "security_mode":
            if value not in policy.MODES:
                raise ValidationFailed(f"Unknown security mode; use one of {', '.join(policy.MODES)}.", field=key)
            values[key] = value
        elif key == "default_purpose":
            if value is None:
                values.pop(key, None)
            else:
                values[key] = check_purpose(value, key)
        else:
            raise ValidationFailed("Unknown delivery setting.", field=key)
    org.settings = values
    session.flush()
    return delivery_settings(session, org_id)


# --- sending domains (queries for the API, CLI and doctor) ------------------------------------


def list_sending_domains(session: Session) -> list[SendingDomain]:
    """The session's organization's sending domains (the session is org-scoped)."""
    return list(session.scalars(select(SendingDomain).order_by(SendingDomain.domain)))


def sending_domain_by_id(session: Session, domain_id: str) -> SendingDomain:
    row = session.get(SendingDomain, domain_id) if is_id(domain_id) else None
    if row is None or (session.info.get("org_id") and row.org_id != session.info["org_id"]):
        raise NotFound("No such sending domain.", field="domain_id")
    return row


def delete_sending_domain(session: Session, row: SendingDomain) -> None:
    """Remove a domain and its keys. Messages that were accepted from it and are not delivered
    yet fail at delivery with reason ``sending_domain_missing``."""
    session.delete(row)
    session.flush()


def sending_domain_for(session: Session, org_id: str, domain: str) -> SendingDomain | None:
    """The organization's sending domain for a From domain: the domain itself or the closest
    parent (DKIM d= of a parent aligns under relaxed DMARC alignment)."""
    labels = domain.lower().split(".")
    candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    rows = session.scalars(
        select(SendingDomain).where(SendingDomain.org_id == org_id, SendingDomain.domain.in_(candidates))
    ).all()
    return max(rows, key=lambda r: len(r.domain), default=None)


def domain_view(row: SendingDomain, settings: Settings | None = None) -> dict:
    """The API/CLI shape of a sending domain: its DNS records (DKIM TXT in full) and last check."""
    checks = [{"purpose": purpose, **result} for purpose, result in (row.check_results or {}).items()]
    return {
        "id": row.id, "domain": row.domain, "selector": row.selector, "return_path_domain": row.return_path_domain,
        "dns_ok": bool(row.dns_ok), "checked_at": clock.aware(row.checked_at),
        "records": [asdict(r) for r in dns_records(row, settings)], "checks": checks,
    }


def unverified_sending_domains(session: Session) -> list[tuple[str, str]]:
    """(organization id, domain) of every sending domain whose DNS records did not check out
    (or were never checked). For ``carepost doctor``; needs a system session."""
    rows = session.execute(select(SendingDomain.org_id, SendingDomain.domain).where(SendingDomain.dns_ok.is_(False))).all()
    return [(org_id, domain) for org_id, domain in rows]


# --- accepting a message (API, batch, SMTP submission) ---------------------------------------
# Everything is validated before anything is written, so a refused message (or one refused
# message of a batch) leaves nothing behind, and the error names the field (with its index).

# Attachments are checked by declared type, by file name and by content: executable content is
# refused whatever it claims to be, and a type with a well-known signature must carry it.
BLOCKED_EXTENSIONS = frozenset({
    "exe", "com", "bat", "cmd", "scr", "pif", "msi", "msp", "mst", "vbs", "vbe", "js", "jse", "wsf", "wsh", "ps1",
    "psm1", "jar", "cpl", "hta", "lnk", "reg", "dll", "scf", "apk", "app", "dmg", "iso", "sh", "py",
})
BLOCKED_TYPES = frozenset({
    "application/x-msdownload", "application/x-msdos-program", "application/x-dosexec", "application/x-executable",
    "application/vnd.microsoft.portable-executable", "application/x-sh", "application/x-csh", "application/java-archive",
    "application/x-ms-installer", "application/x-msi", "application/hta", "text/javascript", "application/javascript",
    "application/x-javascript", "application/vbscript", "text/vbscript", "application/x-bat", "application/x-python",
})
_SIGNATURES = {
    "image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",), "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",), "image/webp": (b"RIFF",),
}
_EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xca\xfe\xba\xbe", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"#!")
_RESERVED_HEADER_PREFIX = "x-carepost-"


@dataclass
class PreparedMessage:
    """A message that passed every check, ready to store."""

    sender: MailAddress
    sending_domain: SendingDomain
    recipients: list[tuple[str, MailAddress]]  # (to | cc | bcc, address), each address once
    reply_to: MailAddress | None
    subject: str
    html: str | None
    text: str | None
    attachments: list  # AttachmentIn
    headers: dict[str, str]
    purpose: str
    security: str
    contains_phi: bool
    tags: list[str]
    portal: dict | None
    request_hash: str


def request_fingerprint(data) -> str:
    """SHA-256 of a message request, for Idempotency-Key: same key + same request = same
    message; attachment bodies enter as their hashes."""
    payload = data.model_dump(mode="python", by_alias=True)
    if isinstance(payload.get("portal"), dict):
        # A fast hash over the answer would be an oracle for it beside the Argon2id hash.
        payload["portal"].pop("answer", None)
    for attachment in payload.get("attachments") or []:
        attachment["content"] = hashlib.sha256(attachment["content"]).hexdigest()
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def idempotency_hash(key: str) -> str:
    return hashlib.sha256(f"idempotency\x00{key}".encode()).hexdigest()


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not (1 <= len(key) <= 200) or not key.isascii() or not key.isprintable():
        raise ValidationFailed("The Idempotency-Key is 1 to 200 printable ASCII characters.", field="Idempotency-Key")
    return key


def _check_attachment(attachment, field_name: str, *, inline: bool) -> None:
    ctype = (attachment.content_type or "").lower().strip()
    filename = attachment.filename or ""
    extension = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    content = bytes(attachment.content)
    if ctype in BLOCKED_TYPES or extension in BLOCKED_EXTENSIONS or content.startswith(_EXECUTABLE_MAGIC):
        raise ValidationFailed("Executable and script attachments are not allowed.", field=field_name)
    if inline and not ctype.startswith("image/"):
        raise ValidationFailed("An inline attachment (content_id) must be an image.", field=field_name)
    signatures = _SIGNATURES.get(ctype)
    if signatures and not content.startswith(signatures):
        raise ValidationFailed(f"The content is not {ctype}.", field=field_name)


def _prefixed(exc: ValidationFailed, prefix: str) -> ValidationFailed:
    return ValidationFailed(exc.message, field=f"{prefix}{exc.field}" if exc.field else prefix.rstrip(".") or None,
                            code=exc.code)


def prepare_message(session: Session, org_id: str, data, *, prefix: str = "", org_settings: dict | None = None,
                    domain_cache: dict | None = None) -> PreparedMessage:
    """Check a message request (a :class:`schemas.MessageIn`) completely; raises
    ValidationFailed naming ``prefix`` + the field (``to.2``, ``attachments.0``, ``security``...)."""
    from carepost.delivery.mime import Attachment, InlineImage, compose

    try:
        return _prepare(session, org_id, data, org_settings or delivery_settings(session, org_id),
                        domain_cache if domain_cache is not None else {}, Attachment, InlineImage, compose)
    except ValidationFailed as exc:
        raise _prefixed(exc, prefix) from None


def _prepare(session, org_id, data, org_settings, domain_cache, Attachment, InlineImage, compose) -> PreparedMessage:
    template_purpose = None
    request = data  # the Idempotency-Key fingerprint is of the request, not of its rendering
    if data.template_id is not None:
        # A template renders once per message with its data (which may hold PHI: the result is
        # stored encrypted like any body). Its PHI flag can only raise the message's.
        from carepost.content.service import render_template

        if data.html is not None or data.text is not None or data.subject is not None:
            raise ValidationFailed("Give either a template_id with data, or subject and html/text — not both.",
                                   field="template_id")
        rendered = render_template(session, org_id, data.template_id, data.data)
        data = data.model_copy(update={
            "subject": rendered.subject, "html": rendered.html or None, "text": rendered.text or None,
            "contains_phi": bool(data.contains_phi) or rendered.contains_phi,
        })
        template_purpose = rendered.purpose
    purpose = data.purpose or template_purpose or org_settings.get("default_purpose")
    if not purpose:
        raise ValidationFailed("A purpose is required (the organization sets no default purpose).", field="purpose")
    check_purpose(purpose)
    mode = policy.effective_mode(org_settings["security_mode"], data.security)
    if data.contains_phi is not False and mode == "opportunistic" and data.security is None:
        # The organization's floor is opportunistic, but this message carries PHI: it gets the
        # least mode PHI may travel in (raising, never lowering). Asking for opportunistic
        # explicitly with PHI is refused below.
        mode = "tls_required"
    if data.contains_phi is not False and mode == "opportunistic":
        raise ValidationFailed(
            "Opportunistic TLS is only for messages marked as carrying no PHI; set contains_phi to false or choose "
            "a stronger security mode.", field="security")
    sender = parse_address(data.sender, field_name="from")
    domain = domain_cache.get(sender.domain, False)
    if domain is False:
        domain = domain_cache[sender.domain] = sending_domain_for(session, org_id, sender.domain)
    if domain is None:
        raise ValidationFailed("The From address is not in a sending domain of the organization; add the domain first.",
                               field="from")
    recipients: list[tuple[str, MailAddress]] = []
    seen: set[str] = set()
    for kind in ("to", "cc", "bcc"):
        for i, value in enumerate(getattr(data, kind)):
            address = parse_address(value, field_name=f"{kind}.{i}")
            key = address.addr_spec.lower()
            if key not in seen:
                seen.add(key)
                recipients.append((kind, address))
    reply_to = parse_address(data.reply_to, field_name="reply_to") if data.reply_to else None
    headers = dict(data.headers or {})
    for name in headers:
        if name.lower().startswith(_RESERVED_HEADER_PREFIX):
            raise ValidationFailed("X-CarePost-* headers are for SMTP submission only.", field="headers")
    inline, files = [], []
    for i, attachment in enumerate(data.attachments):
        _check_attachment(attachment, f"attachments.{i}", inline=attachment.content_id is not None)
        if attachment.content_id is not None:
            inline.append(InlineImage(attachment.content_id, attachment.content, attachment.content_type, attachment.filename))
        else:
            files.append(Attachment(attachment.filename, attachment.content, attachment.content_type))
    subject = data.subject or ""
    # A trial composition: every header value, name, file name and part is checked exactly as
    # the pipeline will build it later (header injection, reserved headers, content types).
    compose(sender=data.sender, to=[a.addr_spec for k, a in recipients if k == "to"],
            cc=[a.addr_spec for k, a in recipients if k == "cc"], bcc=[a.addr_spec for k, a in recipients if k == "bcc"],
            subject=subject, text=data.text, html=data.html, reply_to=data.reply_to, inline_images=inline,
            attachments=files, headers=headers, max_attachment_bytes=MAX_ATTACHMENT_BYTES)
    portal = None
    if data.portal is not None:
        portal = data.portal.model_dump(mode="json")
        if data.portal.expires_at is not None and clock.aware(data.portal.expires_at) <= clock.now():
            raise ValidationFailed("The portal expiry must be in the future.", field="portal.expires_at")
        # The question's answer is hashed (Argon2id) before anything is stored: portal_enc never
        # holds it readable. One hash per distinct answer in a batch (the memo rides in the
        # batch's shared cache under a key no domain name can take).
        portal = portal_answer.protect(portal, domain_cache.setdefault(" portal-answers", {}))
    return PreparedMessage(
        sender=sender, sending_domain=domain, recipients=recipients, reply_to=reply_to, subject=subject,
        html=data.html, text=data.text, attachments=list(data.attachments), headers=headers, purpose=purpose,
        security=mode, contains_phi=data.contains_phi is not False, tags=list(data.tags), portal=portal,
        request_hash=request_fingerprint(request),
    )


def find_idempotent(session: Session, org_id: str, key_hash: str) -> Message | None:
    return session.scalars(select(Message).where(Message.org_id == org_id, Message.idempotency_key == key_hash)).first()


def store_message(session: Session, org_id: str, prepared: PreparedMessage, *, source: str, created_by: str | None,
                  sandbox: bool = False, idempotency_key: str | None = None) -> Message:
    """Write a prepared message: encrypted content, one recipient row per address (encrypted,
    blind-indexed, linked to the contact with that address), a ``queued`` event each. Flushes;
    the caller commits and then enqueues delivery (:func:`carepost.delivery.tasks.enqueue_delivery`)."""
    return store_messages(session, org_id, [prepared], source=source, created_by=created_by, sandbox=sandbox,
                          idempotency_keys=[idempotency_key])[0]


def store_messages(session: Session, org_id: str, prepared: list[PreparedMessage], *, source: str,
                   created_by: str | None, sandbox: bool = False,
                   idempotency_keys: list[str | None] | None = None) -> list[Message]:
    """:func:`store_message` for many messages at once (one contact look-up per 500 recipients,
    three flushes in all)."""
    ring = get_keyring()
    now = clock.now()
    keys = idempotency_keys or [None] * len(prepared)

    def enc(table: str, column: str, row_id: str, value) -> bytes | None:
        return None if value is None else ring.encrypt(session, org_id, table, column, row_id, value)

    mt, at, rt = Message.__tablename__, MessageAttachment.__tablename__, MessageRecipient.__tablename__
    messages, dependents, recipients = [], [], []
    for p, key in zip(prepared, keys):
        message_id = new_id()
        messages.append(Message(
            id=message_id, org_id=org_id, source=source, sending_domain_id=p.sending_domain.id,
            from_address=p.sender.addr_spec, from_name_enc=enc(mt, "from_name", message_id, p.sender.display_name or None),
            reply_to_enc=enc(mt, "reply_to", message_id, _mailbox_text(p.reply_to) if p.reply_to else None),
            subject_enc=enc(mt, "subject", message_id, p.subject), html_enc=enc(mt, "html", message_id, p.html),
            text_enc=enc(mt, "text", message_id, p.text), contains_phi=p.contains_phi, security=p.security,
            purpose=p.purpose, tags=p.tags, idempotency_key=idempotency_hash(key) if key else None,
            request_hash=p.request_hash if key else None, sandbox=bool(sandbox), created_by=created_by, created_at=now,
            message_id_header=message_id_for(p.sending_domain.domain),
            headers_enc=enc(mt, "headers", message_id, json.dumps(p.headers)) if p.headers else None,
            portal_enc=enc(mt, "portal", message_id, json.dumps(p.portal)) if p.portal else None,
        ))
        for attachment in p.attachments:
            att_id = new_id()
            dependents.append(MessageAttachment(
                id=att_id, org_id=org_id, message_id=message_id, filename_enc=enc(at, "filename", att_id, attachment.filename),
                content_type=attachment.content_type, content_enc=enc(at, "content", att_id, bytes(attachment.content)),
                size=len(attachment.content), inline_cid=attachment.content_id,
            ))
        for kind, address in p.recipients:
            rid = new_id()
            recipients.append(MessageRecipient(
                id=rid, org_id=org_id, message_id=message_id, kind=kind,
                address_enc=enc(rt, "address", rid, address.addr_spec),
                display_name_enc=enc(rt, "display_name", rid, address.display_name or None),
                address_index=ring.blind_index(session, org_id, "email", address.addr_spec),
                domain_index=ring.blind_index(session, org_id, "domain", address.domain),
                status="queued", attempts=0, evidence={}, possible_duplicate=False, updated_at=now, enqueued_at=now,
            ))
    _link_contacts(session, org_id, recipients)
    events = [MessageEvent(org_id=org_id, message_id=r.message_id, recipient_id=r.id, type="queued",
                           details={"source": source, "sandbox": bool(sandbox)}, created_at=now) for r in recipients]
    # In the order of the foreign keys (the models declare no relationships to sort by).
    for batch in (messages, dependents + recipients, events):
        session.add_all(batch)
        session.flush()
    for recipient, event in zip(recipients, events):  # message.queued to the organization's webhooks
        domain_events.publish("message.recipient_event", session, recipient, event)
    addresses = [address.addr_spec for p in prepared for _kind, address in p.recipients]
    exclude_ineligible(session, messages, recipients, addresses)
    return messages


def exclude_ineligible(session: Session, messages: list[Message], recipients: list[MessageRecipient],
                       addresses: list[str]) -> int:
    """The eligibility check at acceptance (the pipeline checks again when it claims a
    recipient). An ineligible recipient is still accepted — the message answers 202 — but is
    ``excluded`` at once with the reason code, and never queued for delivery."""
    from carepost.delivery import pipeline

    by_id = {m.id: m for m in messages}
    candidates = [
        pipeline.Candidate(r.id, r.message_id, r.org_id, address, r.address_index, r.contact_id,
                           by_id[r.message_id].purpose, by_id[r.message_id].source, by_id[r.message_id].contains_phi)
        for r, address in zip(recipients, addresses)
    ]
    excluded = pipeline.eligibility(session, candidates) or {}
    for recipient in recipients:
        reason = excluded.get(recipient.id)
        if reason:
            recipient.status = "excluded"
            recipient.reason = str(reason)[:200]
            recipient.method = None
            recipient.next_attempt_at = None
            add_event(session, recipient, "excluded", reason=str(reason).split(":", 1)[0])
    session.flush()
    return len(excluded)


def _mailbox_text(address: MailAddress) -> str:
    return f"{address.display_name} <{address.addr_spec}>" if address.display_name else address.addr_spec


def _link_contacts(session: Session, org_id: str, recipients: list[MessageRecipient]) -> None:
    """Tie each recipient to the contact whose email has the same blind index (if any)."""
    try:
        from carepost.patients.service import contacts_by_index
    except ImportError:
        return
    found = contacts_by_index(session, org_id, "email", [r.address_index for r in recipients])
    for recipient in recipients:
        recipient.contact_id = found.get(recipient.address_index)


@dataclass
class Accepted:
    message: Message
    created: bool  # False: an earlier request with the same Idempotency-Key


def accept_message(session: Session, org_id: str, data, *, source: str, created_by: str | None, sandbox: bool = False,
                   idempotency_key: str | None = None, prefix: str = "") -> Accepted:
    """Check and store one message. With an Idempotency-Key the same request returns the
    message stored the first time; a different request with the same key is a 409."""
    key = check_idempotency_key(idempotency_key)
    prepared = prepare_message(session, org_id, data, prefix=prefix)
    if key is not None:
        existing = find_idempotent(session, org_id, idempotency_hash(key))
        if existing is not None:
            if existing.request_hash != prepared.request_hash:
                raise Conflict("This Idempotency-Key was used with a different request.", field="Idempotency-Key",
                               code="idempotency_conflict")
            return Accepted(existing, False)
    return Accepted(store_message(session, org_id, prepared, source=source, created_by=created_by, sandbox=sandbox,
                                  idempotency_key=key), True)


def accept_batch(session: Session, org_id: str, messages: list, *, source: str, created_by: str | None,
                 sandbox: bool = False) -> list[Message]:
    """All or nothing: every message is checked first (the error names ``messages.<i>.<field>``),
    then all are stored."""
    org_settings = delivery_settings(session, org_id)
    domain_cache: dict = {}
    prepared = [prepare_message(session, org_id, m, prefix=f"messages.{i}.", org_settings=org_settings,
                                domain_cache=domain_cache) for i, m in enumerate(messages)]
    return store_messages(session, org_id, prepared, source=source, created_by=created_by, sandbox=sandbox)


# --- reading messages ------------------------------------------------------------------------


def get_message(session: Session, message_id: str) -> Message:
    row = session.get(Message, message_id) if is_id(message_id) else None
    if row is None or (session.info.get("org_id") and row.org_id != session.info["org_id"]):
        raise NotFound("No such message.", field="message_id")
    return row


def recipient_address(session: Session, recipient: MessageRecipient) -> str:
    return get_keyring().decrypt_text(session, recipient.org_id, MessageRecipient.__tablename__, "address",
                                      recipient.id, recipient.address_enc)


def _evidence_view(recipient: MessageRecipient, sandbox: bool) -> dict:
    evidence = dict(recipient.evidence or {})
    return {
        "mx_host": evidence.get("mx_host"), "tls_version": evidence.get("tls_version"), "cipher": evidence.get("cipher"),
        "cert_fingerprint": evidence.get("cert_fingerprint"), "cert_verified": bool(evidence.get("cert_verified")),
        "mta_sts": evidence.get("mta_sts"), "relay": bool(evidence.get("relay")), "reply_code": evidence.get("reply_code"),
        "key_fingerprint": recipient.key_fingerprint, "portal_message_id": recipient.portal_message_id,
        "sandbox": bool(evidence.get("sandbox") or (sandbox and recipient.status != "queued")),
    }


def message_view(session: Session, message: Message, *, unmasked: bool) -> dict:
    """The API shape of a message (``schemas.MessageOut``): per recipient the address (masked
    unless ``unmasked``), status, method, reason, evidence and timestamped events."""
    from carepost.patients.masking import mask_email

    recipients = session.scalars(
        select(MessageRecipient).where(MessageRecipient.message_id == message.id).order_by(MessageRecipient.id)
    ).all()
    events: dict[str, list[dict]] = {}
    for event in session.scalars(
        select(MessageEvent).where(MessageEvent.message_id == message.id).order_by(MessageEvent.created_at, MessageEvent.id)
    ):
        events.setdefault(event.recipient_id, []).append(
            {"type": event.type, "at": clock.aware(event.created_at), "details": event.details or {}})
    out = []
    for r in recipients:
        address = recipient_address(session, r)
        out.append({
            "address": address if unmasked else mask_email(address), "kind": r.kind, "status": r.status,
            "method": r.method, "reason": r.reason, "possible_duplicate": bool(r.possible_duplicate),
            "evidence": _evidence_view(r, message.sandbox), "events": events.get(r.id, []),
        })
    return {"id": message.id, "created_at": clock.aware(message.created_at), "purpose": message.purpose,
            "security": message.security, "contains_phi": message.contains_phi, "recipients": out}


def list_messages(session: Session, *, limit: int = 50, cursor: str | None = None, status: str | None = None,
                  source: str | None = None) -> tuple[list[dict], str | None]:
    """Newest first, for the API and the delivery log: per message the count of recipients by
    status (no addresses, no content). ``cursor`` is the last id of the previous page."""
    from sqlalchemy import func

    q = select(Message).order_by(Message.created_at.desc(), Message.id.desc())
    if cursor:
        last = get_message(session, cursor)
        q = q.where((Message.created_at < last.created_at) | ((Message.created_at == last.created_at) & (Message.id < last.id)))
    if source:
        q = q.where(Message.source == source)
    if status:
        q = q.where(Message.id.in_(select(MessageRecipient.message_id).where(MessageRecipient.status == status)))
    rows = session.scalars(q.limit(limit + 1)).all()
    page = rows[:limit]
    counts: dict[str, dict[str, int]] = {m.id: {} for m in page}
    if page:
        for message_id, st, n in session.execute(
            select(MessageRecipient.message_id, MessageRecipient.status, func.count())
            .where(MessageRecipient.message_id.in_([m.id for m in page]))
            .group_by(MessageRecipient.message_id, MessageRecipient.status)
        ):
            counts[message_id][st] = n
    data = [{
        "id": m.id, "created_at": clock.aware(m.created_at), "source": m.source, "purpose": m.purpose,
        "security": m.security, "contains_phi": m.contains_phi, "sandbox": m.sandbox,
        "recipients": sum(counts[m.id].values()), "statuses": counts[m.id],
    } for m in page]
    return data, (page[-1].id if len(rows) > limit else None)


def sandbox_captures(session: Session, message_id: str) -> list[tuple[str, str, bytes]]:
    """(recipient id, method, wire bytes) of what a sandbox message would have sent."""
    from carepost.delivery.models import SandboxCapture

    rows = session.scalars(select(SandboxCapture).where(SandboxCapture.message_id == message_id)
                           .order_by(SandboxCapture.created_at)).all()
    ring = get_keyring()
    return [(r.recipient_id, r.method, ring.decrypt(session, r.org_id, SandboxCapture.__tablename__, "raw", r.id, r.raw_enc))
            for r in rows]


# --- recipient keys: listing for the API and the UI ------------------------------------------


def key_info(row: RecipientKey) -> KeyInfo:
    return _key_info(row)


def list_recipient_keys(session: Session, *, expiring_only: bool = False, limit: int = 200) -> list[tuple[RecipientKey, str]]:
    """(key, decrypted address) of the session's organization, soonest expiry first; with
    ``expiring_only`` just those that expire within 30 days (or have expired)."""
    q = select(RecipientKey).order_by(RecipientKey.expires_at.is_(None), RecipientKey.expires_at, RecipientKey.id)
    if expiring_only:
        q = q.where(RecipientKey.expires_at.is_not(None), RecipientKey.expires_at <= clock.now() + KEY_EXPIRY_WARNING)
    ring = get_keyring()
    return [(r, ring.decrypt_text(session, r.org_id, RecipientKey.__tablename__, "address", r.id, r.address_enc))
            for r in session.scalars(q.limit(limit))]
