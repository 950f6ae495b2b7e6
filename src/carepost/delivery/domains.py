"""Sending domains: DKIM keys, the DNS records to publish, live checks, and the queries the API, CLI and doctor use.

(Split out of ``delivery.service``, which still exports every public name.)
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.crypto import get_keyring
from carepost.core.database import ALL_ORGANIZATIONS
from carepost.core.errors import Conflict, NotFound
from carepost.core.ids import is_id, new_id
from carepost.delivery import dkim, smime
from carepost.delivery import dns as cpdns
from carepost.delivery import tlsprobe
from carepost.delivery.mime import ascii_domain
from carepost.delivery.models import SendingDomain

# --- sending domains ---------------------------------------------------------------------------


def _selector() -> str:
    return f"cp{clock.now():%Y%m}"


DOMAIN_TAKEN = ("This domain's ownership has been proven by another organization on this installation; a domain "
                "sends for one organization only.")


def _verified_elsewhere(session: Session, org_id: str, name: str) -> bool:
    """Has another organization proven ownership of ``name``? Reads across organizations (the
    one fact needed, never which organization), hence ``ALL_ORGANIZATIONS``."""
    found = session.scalars(
        select(SendingDomain.id).where(SendingDomain.domain == name, SendingDomain.org_id != org_id,
                                       SendingDomain.verified_at.is_not(None)).execution_options(**ALL_ORGANIZATIONS)
    ).first()
    return found is not None


def create_sending_domain(session: Session, org_id: str, domain: str, *, ed25519: bool = True) -> SendingDomain:
    """Add a sending domain with fresh DKIM keys (RSA-2048, and Ed25519 unless disabled) and a
    random ownership token. The new claim cannot send until :func:`verify_ownership` finds the
    token in DNS. A domain another organization has proven is refused (409 on ``domain``,
    without saying which organization); unproven claims of several organizations may coexist."""
    name = ascii_domain(domain, field_name="domain")
    exists = session.scalars(select(SendingDomain).where(SendingDomain.org_id == org_id, SendingDomain.domain == name)).first()
    if exists:
        raise Conflict("This sending domain already exists.", field="domain")
    if _verified_elsewhere(session, org_id, name):
        raise Conflict(DOMAIN_TAKEN, field="domain", code="domain_taken")
    row = SendingDomain(id=new_id(), org_id=org_id, domain=name, selector=_selector(), return_path_domain=f"bounces.{name}",
                        mta_sts_id=secrets.token_hex(8), check_results={}, ownership_token=secrets.token_hex(16))
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
    purpose: str  # dkim | dkim-ed25519 | spf | dmarc | return-path-mx | tls-rpt | mta-sts | mta-sts-host
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
        DnsRecord("tls-rpt", "TXT", f"_smtp._tls.{rp}", f"v=TLSRPTv1; rua=mailto:tlsrpt@{rp}",
                  "Receivers report TLS failures on the way to the return-path host (RFC 8460)."),
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
    if record.purpose == "tls-rpt":
        rpt = [t for t in found if t.replace(" ", "").lower().startswith("v=tlsrptv1")]
        if len(rpt) != 1:
            return result(False, "not published" if not rpt else "more than one TLS-RPT record")
        return result(True, "published") if record.value.split("rua=", 1)[1].lower() in rpt[0].lower() \
            else result(False, "the reports go elsewhere (CarePost shows only what reaches its tlsrpt@ mailbox)")
    if record.purpose == OWNERSHIP:
        values = [t.strip() for t in found]
        if record.value in values:
            return result(True, "published")
        if any(v.startswith(OWNERSHIP_PREFIX) for v in values):
            return result(False, "a different ownership token is published")
        return result(False, "not published")
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
    """Store a check's outcome on the domain (once its ownership is proven, sending is allowed
    either way; the UI and ``doctor`` flag a domain whose records do not check out). The last
    ownership check is kept: it is not one of the mail records ``dns_ok`` sums up."""
    kept = {k: v for k, v in (row.check_results or {}).items() if k == OWNERSHIP}
    row.check_results = {**kept, **{r.purpose: {"name": r.name, "ok": r.ok, "detail": r.detail} for r in results}}
    row.dns_ok = all(r.ok for r in results)
    row.checked_at = clock.now()


# --- ownership (issue 9 item 2) ------------------------------------------------------------------
#
# A sending domain is a claim until the organization proves it controls the domain's DNS: it
# publishes ``_carepost-challenge.<domain> TXT "carepost-verify=<token>"`` with the claim's own
# random token, and a check finds it through the same resolver as every other look-up
# (``CAREPOST_DNS_NAMESERVERS``). Until then the domain cannot send (acceptance and the pipeline
# refuse it) and reports to its return-path domain are not stored for the organization.
# Exceptions, where nothing can reach another party: sandbox credentials (the message is
# captured, never sent) and the local mail capture of ``carepost run``.

OWNERSHIP = "ownership"
OWNERSHIP_LABEL = "_carepost-challenge"
OWNERSHIP_PREFIX = "carepost-verify="


def ownership_record(row: SendingDomain) -> DnsRecord:
    """The TXT record that proves the organization controls the domain."""
    return DnsRecord(OWNERSHIP, "TXT", f"{OWNERSHIP_LABEL}.{row.domain}", f"{OWNERSHIP_PREFIX}{row.ownership_token}",
                     "Proves the domain is yours. Nothing can be sent from the domain until this record is found; "
                     "it may stay published afterwards.")


def is_verified(row: SendingDomain | None) -> bool:
    return row is not None and row.verified_at is not None


def local_capture(settings: Settings | None = None) -> bool:
    """Is all outgoing mail going to the local mail capture of ``carepost run``? Only when the
    capture flag is set *and* the relay is a loopback address, so the flag alone cannot open
    real delivery to unproven domains."""
    from carepost.core.mailcapture import is_loopback

    settings = settings or get_settings()
    if not settings.mail_capture or not settings.smtp_relay:
        return False
    from carepost.delivery.smtp import parse_relay

    try:
        relay = parse_relay(settings.smtp_relay)
    except ValueError:
        return False
    return is_loopback(relay.address or relay.host)


def may_send(row: SendingDomain | None, *, sandbox: bool = False, settings: Settings | None = None) -> bool:
    """May mail From this sending domain be sent? Only when its ownership is proven, or when it
    cannot reach anyone (a sandbox credential's message, the local capture of ``carepost run``)."""
    if row is None:
        return False
    return is_verified(row) or bool(sandbox) or local_capture(settings)


UNVERIFIED_REASON = ("sending_domain_unverified: the organization has not proven ownership of the From domain "
                     "(publish its ownership TXT record and check the domain)")


async def check_ownership(row: SendingDomain) -> RecordCheck:
    """Look the ownership record up live: pass when one TXT string is exactly the expected value."""
    return (await check_dns([ownership_record(row)]))[0]


def confirm_ownership(session: Session, row: SendingDomain) -> None:
    """Record that the organization proved ownership of the domain (the one place ``verified_at``
    is set). Refused with 409 on ``domain`` when another organization proved it first; the
    partial unique index settles a race between two checks."""
    if row.verified_at is not None:
        return
    if _verified_elsewhere(session, row.org_id, row.domain):
        raise Conflict(DOMAIN_TAKEN, field="domain", code="domain_taken")
    try:
        with session.begin_nested():
            row.verified_at = clock.now()
            session.flush()
    except IntegrityError:
        row.verified_at = None
        raise Conflict(DOMAIN_TAKEN, field="domain", code="domain_taken") from None


def apply_ownership_check(session: Session, row: SendingDomain, result: RecordCheck) -> bool:
    """Store an ownership check on the domain and, when it passed, prove the claim; True when
    the domain is verified afterwards. A domain proven once stays proven when the record is
    later removed (the check then shows it as not published). Raises 409 ``domain_taken`` when
    another organization proved the domain first."""
    ok, detail = result.ok, result.detail
    taken = ok and row.verified_at is None and _verified_elsewhere(session, row.org_id, row.domain)
    if taken:
        ok, detail = False, "another organization has proven ownership of this domain"
    row.check_results = {**(row.check_results or {}), OWNERSHIP: {"name": result.name, "ok": ok, "detail": detail}}
    if taken:
        raise Conflict(DOMAIN_TAKEN, field="domain", code="domain_taken")
    if ok:
        confirm_ownership(session, row)
    return is_verified(row)


def records_to_check(row: SendingDomain, settings: Settings | None = None) -> list[DnsRecord]:
    """What "check now" looks up: the ownership record and the mail records."""
    return [ownership_record(row), *dns_records(row, settings)]


def apply_checks(session: Session, row: SendingDomain, results: list[RecordCheck]) -> None:
    """Store a "check now" outcome: the mail records (``dns_ok``) and the ownership record,
    which proves the claim when it passes. A domain another organization proved first stays
    unproven here, with that reason on its ownership check (no error: the mail records are
    still stored)."""
    apply_dns_check(row, [r for r in results if r.purpose != OWNERSHIP])
    for result in results:
        if result.purpose == OWNERSHIP:
            try:
                apply_ownership_check(session, row, result)
            except Conflict:
                pass


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
    """The API/CLI shape of a sending domain: the ownership record and whether it is proven, its
    DNS records (DKIM TXT in full) and last check."""
    checks = [{"purpose": purpose, **result} for purpose, result in (row.check_results or {}).items()]
    return {
        "id": row.id, "domain": row.domain, "selector": row.selector, "return_path_domain": row.return_path_domain,
        "verified": is_verified(row), "verified_at": clock.aware(row.verified_at),
        "ownership_record": asdict(ownership_record(row)),
        "dns_ok": bool(row.dns_ok), "checked_at": clock.aware(row.checked_at),
        "records": [asdict(r) for r in dns_records(row, settings)], "checks": checks,
    }


def verified_owner(session: Session, domain: str) -> str | None:
    """The organization that proved ownership of ``domain``, if any (needs a system session or
    reads across organizations: the inbound return path routes reports by it)."""
    return session.scalars(
        select(SendingDomain.org_id).where(SendingDomain.domain == domain, SendingDomain.verified_at.is_not(None))
        .execution_options(**ALL_ORGANIZATIONS)
    ).first()


def unproven_sending_domains(session: Session) -> list[tuple[str, str]]:
    """(organization id, domain) of every sending domain whose ownership is not proven: nothing
    is sent from it. For ``carepost doctor``; needs a system session."""
    rows = session.execute(select(SendingDomain.org_id, SendingDomain.domain).where(SendingDomain.verified_at.is_(None))).all()
    return [(org_id, domain) for org_id, domain in rows]


def unverified_sending_domains(session: Session) -> list[tuple[str, str]]:
    """(organization id, domain) of every sending domain whose DNS records did not check out
    (or were never checked). For ``carepost doctor``; needs a system session."""
    rows = session.execute(select(SendingDomain.org_id, SendingDomain.domain).where(SendingDomain.dns_ok.is_(False))).all()
    return [(org_id, domain) for org_id, domain in rows]


def notice_sending_domain(session: Session, org_id: str) -> SendingDomain | None:
    """The organization's domain for its own notices (account, consent and portal emails): a
    proven one first (DNS checking out first, then the oldest); an unproven one only where it
    may send (the local capture of ``carepost run``). None: notices need another sender."""
    rows = session.scalars(
        select(SendingDomain).where(SendingDomain.org_id == org_id)
        .order_by(SendingDomain.verified_at.is_(None), SendingDomain.dns_ok.desc(), SendingDomain.created_at)
    ).all()
    return next((r for r in rows if may_send(r)), None)
