"""Secure delivery logic over the database: sending domains and their DNS records, recipient
keys, the pre-send security preview, and recording delivery outcomes.

Plain functions taking a session (ARCHITECTURE.md section 3); the caller commits. Audit events
for people and API clients touching recipient keys or messages are written by the routes that
call these functions (``audit.service.record_for``), which know the principal.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import new_id
from carepost.delivery import dkim, pgp, policy, smime
from carepost.delivery import dns as cpdns
from carepost.delivery import tlsprobe
from carepost.delivery.mime import ascii_domain, parse_address
from carepost.delivery.models import MessageEvent, MessageRecipient, RecipientKey, SendingDomain
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
    session.add(row)
    session.flush()
    return row


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


def _key_info(row: RecipientKey) -> KeyInfo:
    expires = clock.aware(row.expires_at)
    return KeyInfo(row.id, row.kind, row.fingerprint, expires,
                   expires is not None and expires - clock.now() <= KEY_EXPIRY_WARNING)


def add_recipient_key(session: Session, org_id: str, address: str, kind: str, key: str | bytes, *,
                      actor_id: str | None = None) -> KeyInfo:
    """Validate and store a recipient's certificate; replaces the address's key of that kind."""
    if kind not in KEY_KINDS:
        raise ValidationFailed("The key kind must be pgp or smime.", field="kind")
    parsed = parse_address(address, field_name="address", allow_display_name=False)
    addr = parsed.addr_spec
    if kind == "pgp":
        info = pgp.load_certificate(key, addr, field="key")
        material, fingerprint, expires = info.armored, info.fingerprint, info.expires_at
    else:
        info = smime.load_certificate(key, addr, field="key")
        material, fingerprint, expires = info.pem, info.fingerprint, info.not_after
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
    # Every message event goes out to the organization's webhooks through one function.
    from carepost.tracking.service import emit_message_event

    emit_message_event(session, recipient, event)
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
        evidence = result.evidence.to_dict()
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


def protect(raw: bytes, method: str, key_material: str | None) -> bytes:
    """The message as it must travel for ``method``: encrypted for PGP and S/MIME, as is for TLS
    (and for opportunistic clear text). The portal never sends the message itself."""
    if method == "pgp":
        return pgp.encrypt_message(raw, key_material)
    if method == "smime":
        return smime.encrypt_message(raw, key_material)
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
