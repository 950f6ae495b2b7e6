"""The delivery pipeline: from queued recipients to recorded outcomes, as named steps.

ARCHITECTURE.md section 4, step 2. A delivery task carries message ids only; :func:`deliver`
runs these steps over the due recipients of those messages, top to bottom (the shape of
Postal's ``outgoing_message_processor``)::

    with the database (one short transaction):
      1. claim              lease the due recipients (one UPDATE): no other worker sends them
      2. load               messages, contents, addresses, keys, DKIM keys: decrypted in memory only
      3. check_eligibility  consent's steps (ports): eligibility, quiet hours, List-Unsubscribe
      4. check_sender       the From domain must still be a sending domain of the organization, ownership proven
    without a transaction (SQLite's write lock is free for everyone else):
      5. decide             the secure method per recipient (``policy.decide``)
      5b. links             link guard and engagement tracking per copy (port ``links``), before composition
      6. compose            MIME once per message (per recipient when unsubscribe headers differ)
      7. protect            PGP or S/MIME per recipient, then the DKIM signature
      8. store_for_portal   portal recipients: the copy goes to the portal, a notification by email
      9. send               pooled SMTP connections (or, for sandbox credentials, the capture)
     10. fall_back          verified TLS unavailable at send time: the portal, or not sent at all
     11. record             status, method, evidence, events, as servers answer (steps 9-10 flush small groups)

Why it is safe to run twice, or on two workers at once: step 1 leases a recipient only when it
is due and nobody holds it (``lease_until``), in one UPDATE that both databases serialize; a
copy is marked as being sent, and so sent, only while its lease is still this run's (a run that
outlived its lease — a slow batch, a wall clock that jumped forward — leaves the rest to the run
that claimed them since; a lease ending further ahead than any lease is granted was written
before the clock was set back, and is free too: ``lease_free``); step 11 writes only rows whose lease is still this run's. A connection lost after the message's final
"." is recorded as ``possible_duplicate``: nobody can know whether it arrived.

Why a crash sends nothing twice unflagged: outcomes are recorded as the servers answer, in small
groups committed as soon as the previous group is (not once for the whole batch at the end),
and before a copy's SMTP transaction begins its row is marked ``sending_since`` in a committed
group. A sender waits for the commit of its mark before it sends and of its outcome before it
frees its place among the concurrent sends, so a worker killed mid-send leaves at most
``CAREPOST_DELIVERY_CONCURRENCY`` copies marked and unrecorded; when they are sent
again they are flagged ``possible_duplicate``. Their lease (``CAREPOST_DELIVERY_LEASE_SECONDS``)
expires, and the task that step 1 scheduled for that moment (``tasks.schedule_lease_expiry``)
delivers them; the periodic sweep (``tasks.deliver_due``, every minute) remains the backstop.

A message that needs protection is never sent in clear: the policy decides TLS only with
``require_verified_tls``, the SMTP client refuses anything less, and the fallback is the portal
or nothing (``policy.after_tls_failure``).

Steps owned by capabilities above delivery are ports (``carepost.core.ports``) that the composition
root (``carepost.assembly``) fills; a process that did not assemble cannot deliver (``NotAssembled``),
and there is no weaker default:

``eligibility(session, candidates) -> {recipient id: reason}`` (consent)
    Which recipients must not get their message now: invalid address, suppressed, unsubscribed,
    authorization missing/expired/revoked for the purpose, frequency cap. ``candidates`` is a list
    of :class:`Candidate` (the decrypted address is in memory only; reasons are codes, never the
    address). Also run at acceptance (``delivery.messages``).
``quiet_hours(session, candidates) -> {recipient id: next allowed time}`` (consent)
    Recipients inside their quiet hours are ``deferred`` to that time, never excluded.
``list_unsubscribe(session, candidates) -> {recipient id: [uri, ...]}`` (consent)
    List-Unsubscribe URIs per recipient (RFC 8058 one-click when one is https); covered by the
    DKIM signature, and the visible footer link.
``portal_store(session, **copy)`` and ``portal_notification(session, portal_message)`` (portal)
    Step 8: store a recipient's copy for pickup; the notification (no PHI) sent instead.
``links(session, requests) -> {recipient id: LinkOutcome}`` (tracking)
    Step 5b, before composition so the DKIM signature covers the final body: the link guard (no
    recipient's email address, MRN or date of birth in any URL: that copy fails with
    ``link_phi``, the link named, never the value) and, for tracked messages, click redirects and
    the open pixel (``carepost.tracking.links``). No outcome for a recipient: its body is unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import (
    String,
    and_,
    any_,
    bindparam,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from carepost.core import clock, metrics
from carepost.core import events as domain_events
from carepost.core.config import Settings, get_settings
from carepost.core.crypto import get_keyring
from carepost.core.database import system_session
from carepost.core.errors import ValidationFailed
from carepost.core.ids import new_id
from carepost.core.logging import get_logger
from carepost.core.ports import Port
from carepost.delivery import dkim, policy, service, tlsprobe
from carepost.delivery.mime import Attachment, InlineImage, body_end, compose
from carepost.delivery.models import (
    Message,
    MessageAttachment,
    MessageEvent,
    MessageRecipient,
    RecipientKey,
    SandboxCapture,
    SendingDomain,
)
from carepost.delivery.settings import organization_relay, relay_mode
from carepost.delivery.smtp import DeliveryClient, Envelope, Evidence, RecipientResult

log = get_logger("carepost.delivery.pipeline")

REQUEUE_AFTER = timedelta(minutes=10)  # a queued recipient no task picked up is queued again after this


# --------------------------------------------------------------------------- hook points


@dataclass(frozen=True)
class Candidate:
    """One recipient about to be delivered, as the eligibility hook sees it."""

    recipient_id: str
    message_id: str
    org_id: str
    address: str  # decrypted, in memory only: never log it, never return it
    address_index: str
    contact_id: str | None
    purpose: str | None
    source: str
    contains_phi: bool


EligibilityCheck = Callable[[Session, list[Candidate]], dict[str, str]]
UnsubscribeHeaders = Callable[[Session, list[Candidate]], dict[str, list[str]]]


QuietHours = Callable[[Session, list[Candidate]], dict[str, datetime]]


@dataclass(frozen=True)
class LinkRequest:
    """One copy's body, as the link step sees it (decrypted, in memory only)."""

    recipient_id: str
    message_id: str
    org_id: str
    contact_id: str | None
    address: str  # never log it, never return it
    method: str  # the secure method decided: tls | none | pgp | smime | portal
    track_opens: bool
    track_clicks: bool
    html: str | None
    text: str | None
    composed_at: datetime


@dataclass(frozen=True)
class LinkOutcome:
    """The body to compose for one recipient, or why it may not be sent (a reason code, no PHI)."""

    html: str | None = None
    text: str | None = None
    refused: str | None = None

eligibility: Port[EligibilityCheck] = Port(
    "delivery.eligibility", "Which candidates must not be sent now: {recipient id: reason code} (consent).")
quiet_hours: Port[QuietHours] = Port(
    "delivery.quiet_hours", "Candidates inside quiet hours: {recipient id: next allowed time} (consent).")
list_unsubscribe: Port[UnsubscribeHeaders] = Port(
    "delivery.list_unsubscribe", "List-Unsubscribe URIs per candidate: {recipient id: [uri]} (consent).")
portal_store: Port = Port(
    "delivery.portal_store", "Store a recipient's copy for pickup in the secure portal (portal.service).")
portal_notification: Port = Port(
    "delivery.portal_notification", "(subject, text, html) of the notice for a stored portal message (portal.service).")
links: Port = Port(
    "delivery.links", "The link guard and engagement tracking per copy: {recipient id: LinkOutcome} (tracking.links).")
relay_baa: Port = Port(
    "delivery.relay_baa", "(session, org_id, relay host) -> None when a BAA covers the organization's relay, else the "
    "reason PHI may not go through it (compliance.associates.relay_refusal).")

# The steps, top to bottom (the names the module docstring and the logs use).
STEPS = ("claim", "load", "eligibility", "quiet_hours", "list_unsubscribe", "check_sender", "decide", "links", "compose",
         "protect", "portal", "send", "fall_back", "record")


# --------------------------------------------------------------------------- run state


@dataclass
class Content:
    """One message's content, decrypted in memory for this run."""

    message: Message
    sender: str
    subject: str
    html: str | None
    text: str | None
    reply_to: str | None
    headers: dict[str, str]
    attachments: list[Attachment]
    inline: list[InlineImage]
    portal: dict
    to: list[str]
    cc: list[str]
    domain: SendingDomain | None = None
    dkim_keys: list[dkim.DkimKey] = field(default_factory=list)
    smime_signing_key: object | None = None  # the domain's S/MIME signing key, loaded when a copy needs it
    composed: dict[tuple, tuple[bytes, bool]] = field(default_factory=dict)  # unsubscribe URIs -> (raw, smtputf8)
    signed: dict[tuple, bytes] = field(default_factory=dict)


@dataclass
class Copy:
    """One recipient's copy in this run."""

    recipient: MessageRecipient
    content: Content
    address: str
    display_name: str | None
    keys: dict[str, RecipientKey]
    key_material: dict[str, str]
    envelope_from: str = ""
    unsubscribe: tuple[str, ...] = ()
    decision: policy.Decision | None = None
    wire: bytes | None = None
    smtputf8: bool = False
    require_verified_tls: bool = False
    notification: bool = False  # the wire is a portal notification, not the message
    portal_message_id: str | None = None
    result: RecipientResult | None = None
    final: tuple[str, str] | None = None  # (status, reason) decided without an SMTP result
    defer_until: datetime | None = None  # with final ("deferred", ...): when to try again
    fell_back_from: str | None = None
    interrupted: bool = False  # an earlier attempt was cut off mid-send: a new send may be a duplicate
    recorded: bool = False
    body: tuple[str | None, str | None] | None = None  # (text, html) of this recipient (links step), else the message's

    @property
    def variant(self) -> tuple:
        """What the composed MIME depends on: the unsubscribe URIs, and the recipient when its body is its own."""
        return (self.unsubscribe, self.recipient.id if self.body is not None else None)

    @property
    def org_id(self) -> str:
        return self.recipient.org_id

    @property
    def sandbox(self) -> bool:
        return bool(self.content.message.sandbox)

    @property
    def open(self) -> bool:
        """Still on its way (no final outcome yet)."""
        return self.final is None and self.result is None


@dataclass
class Run:
    session: Session
    owner: str
    settings: Settings
    copies: list[Copy] = field(default_factory=list)
    contents: dict[str, Content] = field(default_factory=dict)
    org_modes: dict[str, str] = field(default_factory=dict)
    org_relays: dict[str, object] = field(default_factory=dict)  # org id -> smtp.Relay, or None: the installation's
    relay_refusals: dict[str, str | None] = field(default_factory=dict)  # org id -> why PHI may not use its relay (no BAA)
    claimed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    footers: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # org id -> org_footer()

    def open_copies(self) -> list[Copy]:
        return [c for c in self.copies if c.open]

    def footer(self, org_id: str) -> tuple[str, str | None]:
        """:func:`org_footer`, read once per run and organization (it was read per copy, each a
        SELECT: the organization row is expired by the run's commits)."""
        found = self.footers.get(org_id)
        if found is None:
            found = self.footers[org_id] = org_footer(self.session, org_id)
        return found


@dataclass
class RunReport:
    claimed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- the pipeline


def deliver(message_ids: list[str], *, settings: Settings | None = None) -> RunReport:
    """Deliver the due recipients of ``message_ids``. Safe to call twice and from many workers."""
    _require_assembled()
    settings = settings or get_settings()
    ids = list(dict.fromkeys(message_ids))
    with system_session() as session:
        run = Run(session, owner=new_id(), settings=settings)
        hold_index_versions(session, ids)
        claim(run, ids)
        if not run.claimed:
            session.commit()
            return RunReport()
        load(run)
        check_eligibility(run)
        check_sender(run)
        for org_id in sorted({c.org_id for c in run.copies}):
            run.footer(org_id)  # read now, for step 6's unsubscribe footers: nothing below reads the database
        session.commit()  # end the transaction: nothing below holds the database

        decide(run)
        apply_links(run)
        compose_messages(run)
        protect(run)
        store_for_portal(run, run.open_copies())
        _no_transaction_across_the_network(session)
        send(run, [c for c in run.open_copies() if c.wire is not None])
        fall_back(run)
        record(run)
        session.commit()
        report = RunReport(claimed=run.claimed, statuses=run.statuses)
    log.info("delivery_run", claimed_count=report.claimed, **{f"{k}_count": v for k, v in report.statuses.items()})
    return report


def hold_index_versions(session: Session, message_ids: list[str]) -> None:
    """Before reading any recipient: hold the blind-index version of each organization these
    messages belong to (``Keyring.index_version``), so a blind-index rotation cannot commit
    between reading the recipients' address indexes and comparing them with suppressions and
    recipient keys (docs/keys.md, "Rotating blind-index keys")."""
    ring = get_keyring()
    orgs = {org_id for _id, org_id in _by_ids(session, Message.id, message_ids, Message.id, Message.org_id)}
    for org_id in sorted(orgs):
        ring.index_version(session, org_id)


def claim(run: Run, message_ids: list[str]) -> None:
    """Step 1: lease the recipients of these messages that are due and held by nobody."""
    now = clock.now()
    until = now + timedelta(seconds=run.settings.delivery_lease_seconds)
    R = MessageRecipient
    if run.session.get_bind().dialect.name == "sqlite":
        # By primary key: the due rows found first through the message_id index (``_by_ids``), then
        # leased by id, their conditions checked again. Written ``message_id IN (...) AND (status =
        # 'queued' OR ...)``, SQLite planned a MULTI-INDEX OR whose deferred branch reads every due
        # deferred recipient of the database; with the ids as ``IN (SELECT value FROM
        # json_each(?))``, a walk of every queued recipient (the status index) through a bloom
        # filter (EXPLAIN QUERY PLAN on bench/campaign_send.py's database). The status and
        # schedule are compared as ``+column`` (SQLite's unary plus keeps a term from choosing an
        # index), so the ids' index is the only one these statements can use.
        status, next_at = _unindexed(R.status), _unindexed(R.next_attempt_at)
        due = (or_(status == "queued", and_(status == "deferred", next_at <= now)),
               lease_free(now, run.settings.delivery_lease_seconds))
        keys = [rid for (rid,) in _by_ids(run.session, R.message_id, message_ids, R.id, extra=due)]
        wheres = [(R.id.in_(keys[start:start + 500]), *due) for start in range(0, len(keys), 500)]
    else:
        due = (or_(R.status == "queued", and_(R.status == "deferred", R.next_attempt_at <= now)),
               lease_free(now, run.settings.delivery_lease_seconds))
        wheres = [(_any(R.message_id, message_ids), *due)]
    for where in wheres:
        run.session.execute(update(R).where(*where).values(lease_owner=run.owner, lease_until=until)
                            .execution_options(synchronize_session=False))
    rows = [r for (r,) in _by_ids(run.session, R.message_id, message_ids, R, extra=(R.lease_owner == run.owner,),
                                  options={"populate_existing": True})]
    run.claimed = len(rows)
    if rows:
        # Should this worker die holding the lease, its recipients are due once the lease expires:
        # the queue runs these messages again then (a no-op when this run finished them).
        from carepost.delivery.tasks import schedule_lease_expiry

        schedule_lease_expiry(sorted({r.message_id for r in rows}), run.settings.delivery_lease_seconds)
    run.copies = [Copy(recipient=r, content=None, address="", display_name=None, keys={}, key_material={},  # type: ignore[arg-type]
                       interrupted=r.sending_since is not None)
                  for r in rows]


def load(run: Run) -> None:
    """Step 2: everything the copies need, decrypted in memory (never written anywhere)."""
    session, ring = run.session, get_keyring()
    message_ids = sorted({c.recipient.message_id for c in run.copies})
    messages = {m.id: m for (m,) in _by_ids(session, Message.id, message_ids, Message)}
    # Every recipient of these messages (the To and Cc headers name them all): the columns
    # needed, as row tuples, not ORM objects (the claimed ones are loaded by step 1 already).
    R = MessageRecipient
    everyone = _by_ids(session, R.message_id, message_ids, R.id, R.message_id, R.org_id, R.kind, R.address_enc,
                       R.display_name_enc)
    attachments = [a for (a,) in _by_ids(session, MessageAttachment.message_id, message_ids, MessageAttachment)]
    rt, mt, at = MessageRecipient.__tablename__, Message.__tablename__, MessageAttachment.__tablename__

    # One decryptor per organization for this claim batch: each key version is looked up once,
    # not once per field (``Keyring.text_decryptor``); each field keeps its own AAD.
    decryptors: dict[str, Callable] = {}

    def decryptor(org_id: str) -> Callable:
        found = decryptors.get(org_id)
        if found is None:
            found = decryptors[org_id] = ring.text_decryptor(session, org_id)
        return found

    def mailbox(r) -> tuple[str, str | None]:
        dec = decryptor(r.org_id)
        return dec(rt, "address", r.id, r.address_enc), dec(rt, "display_name", r.id, r.display_name_enc)

    headers_of: dict[str, dict[str, list[str]]] = {}
    decrypted: dict[str, tuple[str, str | None]] = {}
    for r in everyone:
        decrypted[r.id] = mailbox(r)
        if r.kind in ("to", "cc"):
            address, name = decrypted[r.id]
            headers_of.setdefault(r.message_id, {"to": [], "cc": []})[r.kind].append(
                _mailbox_text(address, name))
    files: dict[str, list] = {}
    for a in attachments:
        files.setdefault(a.message_id, []).append(a)

    for message_id, m in messages.items():
        decrypt = decryptor(m.org_id)
        dec = lambda column, blob, _m=m, _d=decrypt: _d(mt, column, _m.id, blob)
        name = dec("from_name", m.from_name_enc)
        content = Content(
            message=m, sender=_mailbox_text(m.from_address, name), subject=dec("subject", m.subject_enc) or "",
            html=dec("html", m.html_enc), text=dec("text", m.text_enc), reply_to=dec("reply_to", m.reply_to_enc),
            headers=json.loads(dec("headers", m.headers_enc) or "{}"), attachments=[], inline=[],
            portal=json.loads(dec("portal", m.portal_enc) or "{}"),
            to=headers_of.get(message_id, {}).get("to", []), cc=headers_of.get(message_id, {}).get("cc", []),
        )
        for a in sorted(files.get(message_id, []), key=lambda a: a.id):
            filename = ring.decrypt_text(session, a.org_id, at, "filename", a.id, a.filename_enc)
            data = ring.decrypt(session, a.org_id, at, "content", a.id, a.content_enc)
            if a.inline_cid:
                content.inline.append(InlineImage(a.inline_cid, data, a.content_type, filename))
            else:
                content.attachments.append(Attachment(filename, data, a.content_type))
        run.contents[message_id] = content

    run.org_modes = {org_id: service.delivery_settings(session, org_id)["security_mode"]
                     for org_id in {c.recipient.org_id for c in run.copies}}
    # The organization's own relay (issue 10 item 9), its password decrypted for this run only.
    # Never under the local mail capture of ``carepost run``: nothing may leave the machine there.
    run.org_relays = {} if service.local_capture(run.settings) else {
        org_id: organization_relay(session, org_id) for org_id in run.org_modes}
    # A BAA must cover the organization's relay before PHI goes through it (issue 16 item 9):
    # asked once per organization per batch.
    run.relay_refusals = {org_id: relay_baa(session, org_id, r.target.host)
                          for org_id, r in run.org_relays.items() if r is not None}
    keys = _recipient_keys(session, [c.recipient for c in run.copies])
    for c in run.copies:
        c.content = run.contents[c.recipient.message_id]
        c.address, c.display_name = decrypted[c.recipient.id]
        c.keys = keys.get((c.org_id, c.recipient.address_index), {})
        c.key_material = {kind: service.recipient_key_material(session, row) for kind, row in c.keys.items()}


def check_eligibility(run: Run) -> None:
    """Step 3: the eligibility hook, at delivery time (a revocation between acceptance and
    delivery wins); then the List-Unsubscribe hook for the ones that stay."""
    candidates = [
        Candidate(c.recipient.id, c.recipient.message_id, c.org_id, c.address, c.recipient.address_index,
                  c.recipient.contact_id, c.content.message.purpose, c.content.message.source, c.content.message.contains_phi)
        for c in run.copies
    ]
    excluded = eligibility(run.session, candidates) or {}
    for c in run.copies:
        reason = excluded.get(c.recipient.id)
        if reason:
            c.final = ("excluded", str(reason)[:200])
    waiting = [cand for cand in candidates if cand.recipient_id not in excluded]
    deferrals = quiet_hours(run.session, waiting) or {} if waiting else {}
    for c in run.copies:
        until = deferrals.get(c.recipient.id)
        if until is not None and c.final is None:
            c.final = ("deferred", "quiet_hours")
            c.defer_until = until
            excluded = {**excluded, c.recipient.id: "quiet_hours"}  # no List-Unsubscribe work for it now
    remaining = [cand for cand in candidates if cand.recipient_id not in excluded]
    uris = list_unsubscribe(run.session, remaining) or {} if remaining else {}
    from carepost.core import purposes

    for c in run.copies:
        c.unsubscribe = tuple(uris.get(c.recipient.id) or ())
        purpose = c.content.message.purpose
        if (c.final is None and purpose in purposes.PURPOSES and purposes.requirements(purpose).opt_out_required
                and not any(u.startswith(("https://", "http://")) for u in c.unsubscribe)):
            # A commercial message never goes out without a working opt-out (fail closed).
            c.final = ("excluded", "no_opt_out")


def check_sender(run: Run) -> None:
    """Step 4: the From domain must still be a sending domain of the organization, whose
    ownership it has proven (its DNS records may still be flagged); its DKIM keys sign the message. The return path (VERP) names the recipient row."""
    from carepost.delivery.bounces import return_path, verp_secret

    verp_secrets: dict[str, bytes] = {}  # each organization's VERP secret, looked up once per run

    def secret_of(org_id: str) -> bytes:
        found = verp_secrets.get(org_id)
        if found is None:
            found = verp_secrets[org_id] = verp_secret(run.session, org_id)
        return found

    for content in run.contents.values():
        m = content.message
        row = run.session.get(SendingDomain, m.sending_domain_id) if m.sending_domain_id else None
        if row is None or row.org_id != m.org_id:
            row = service.sending_domain_for(run.session, m.org_id, m.from_address.rsplit("@", 1)[1])
        content.domain = row
        if row is not None:
            content.dkim_keys = _dkim_keys(run.session, row)
    for c in run.open_copies():
        domain = c.content.domain
        if domain is None:
            c.final = ("failed", "sending_domain_missing: the From domain is no longer a sending domain of the organization")
            continue
        if not service.may_send(domain, sandbox=c.sandbox, settings=run.settings):
            # Checked again at delivery: a message accepted under the local capture, or from a
            # claim that was never proven, does not go out for an organization that does not
            # own the From domain (issue 9 item 2).
            c.final = ("failed", service.UNVERIFIED_REASON)
            continue
        c.envelope_from = return_path(run.session, c.org_id, domain.return_path_domain, c.recipient.id,
                                      secret=secret_of(c.org_id))
        if c.unsubscribe:
            # RFC 2369 mailto: handled by the return path (carepost inbound); opaque, no PHI.
            from carepost.delivery.bounces import unsubscribe_mailbox

            c.unsubscribe = (*c.unsubscribe, "mailto:" + unsubscribe_mailbox(
                run.session, c.org_id, domain.return_path_domain, c.recipient.id, secret=secret_of(c.org_id))
                + "?subject=unsubscribe")
        if "smime" in c.keys and c.content.smime_signing_key is None:
            # Inside the first transaction: a domain older than S/MIME signing gets its key now.
            c.content.smime_signing_key = service.smime_signing_key(run.session, domain)


def decide(run: Run) -> None:
    """Step 5: the method per recipient. The TLS facts are left to send time: a TLS decision
    requires verified TLS there, with the policy's fallback."""
    org_modes = run.org_modes
    for c in run.open_copies():
        m = c.content.message
        mode = max(m.security, org_modes.get(m.org_id, m.security), key=policy.MODE_RANK.__getitem__)
        org_relay = run.org_relays.get(m.org_id)
        relay = relay_mode(run.settings, org_relay)
        try:
            c.decision = policy.decide(org_mode=mode, contains_phi=m.contains_phi, pgp_key="pgp" in c.keys,
                                       smime_key="smime" in c.keys, relay=relay)
        except ValidationFailed as exc:
            c.final = ("failed", f"policy: {exc.message}")
            continue
        refusal = run.relay_refusals.get(m.org_id) if m.contains_phi and c.decision.method != "portal" else None
        if refusal:  # the portal keeps PHI here (its notice carries none); anything else would cross the relay
            c.final = ("failed", refusal)
            continue
        c.require_verified_tls = c.decision.require_verified_tls


def apply_links(run: Run) -> None:
    """Step 5b: the link guard and engagement tracking (port ``links``), before composition so
    the DKIM signature covers the final body. Its own short transaction (the links of tracked
    messages are recorded)."""
    now = clock.now()
    requests = [
        LinkRequest(c.recipient.id, c.recipient.message_id, c.org_id, c.recipient.contact_id, c.address,
                    c.decision.method, bool(c.content.message.track_opens), bool(c.content.message.track_clicks),
                    c.content.html, c.content.text, now)
        for c in run.open_copies() if c.decision is not None and (c.content.html or c.content.text)
    ]
    if not requests:
        return
    try:
        outcomes = links(run.session, requests) or {}
        run.session.commit()
    except Exception:
        run.session.rollback()
        raise
    for c in run.open_copies():
        outcome = outcomes.get(c.recipient.id)
        if outcome is None:
            continue
        if outcome.refused:
            c.final = ("failed", outcome.refused[:200])
        else:
            c.body = (outcome.text, outcome.html)


def compose_messages(run: Run) -> None:
    """Step 6: one MIME message per message (and per set of unsubscribe URIs, and per recipient
    whose links were rewritten). Bcc recipients are in the envelope only."""
    for c in run.open_copies():
        content = c.content
        variant = c.variant
        if variant in content.composed:
            continue
        body_text, body_html = c.body if c.body is not None else (content.text, content.html)
        text, html = with_unsubscribe_footer(body_text, body_html, c.unsubscribe,
                                             run.footer(c.org_id) if c.unsubscribe else None)
        try:
            composed = compose(
                sender=content.sender, to=content.to, cc=content.cc, bcc=[] if (content.to or content.cc) else [c.address],
                subject=content.subject, text=text, html=html, reply_to=content.reply_to,
                inline_images=content.inline, attachments=content.attachments, headers=content.headers,
                list_unsubscribe=list(c.unsubscribe) or None,
                list_unsubscribe_post=any(u.startswith("https://") for u in c.unsubscribe),
                message_id=content.message.message_id_header, date=clock.aware(content.message.created_at),
            )
        except ValidationFailed as exc:
            content.composed[variant] = (b"", False)
            log.warning("composition_failed", message_id=content.message.id, field_name=exc.field)
            continue
        content.composed[variant] = (composed.raw, composed.smtputf8)
    for c in run.open_copies():
        raw, _ = c.content.composed[c.variant]
        if not raw:
            c.final = ("failed", "composition_failed")


def org_footer(session: Session, org_id: str) -> tuple[str, str | None]:
    """(organization name, postal address) for the footer of a commercial message (CAN-SPAM: the
    sender's valid physical postal address, kept in the organization's consent settings)."""
    from carepost.accounts.models import Organization

    org = session.get(Organization, org_id)
    if org is None:
        return "", None
    return org.name or "", ((org.settings or {}).get("consent") or {}).get("postal_address")


def with_unsubscribe_footer(text: str | None, html: str | None, uris: tuple[str, ...],
                            sender: tuple[str, str | None] | None = None) -> tuple[str | None, str | None]:
    """A message that needs an opt-out carries a visible link in its body too (CAN-SPAM: clear
    and conspicuous), not only the List-Unsubscribe header, and the organization's name and postal
    address; the URL holds an opaque token only."""
    url = next((u for u in uris if u.startswith(("https://", "http://"))), None)
    if url is None:
        return text, html
    from html import escape

    name, postal = sender or ("", None)
    postal_lines = [line for line in (postal or "").splitlines() if line.strip()]
    if text is not None:
        text = f"{text.rstrip()}\n\n--\nTo stop receiving these emails, unsubscribe: {url}\n"
        if name or postal_lines:
            text += "\n".join([x for x in [name, *postal_lines] if x]) + "\n"
    if html is not None:
        footer = (f'<p class="carepost-unsubscribe">To stop receiving these emails, '
                  f'<a href="{escape(url)}">unsubscribe</a>.</p>')
        if name or postal_lines:
            footer += ('<p class="carepost-postal-address">'
                       + "<br>".join(escape(x) for x in [name, *postal_lines] if x) + "</p>")
        at = body_end(html)
        html = html[:at] + footer + html[at:] if at != -1 else html + footer
    return text, html


def protect(run: Run) -> None:
    """Step 7: encrypt for PGP / S/MIME recipients, and DKIM-sign what will travel."""
    for c in run.open_copies():
        method = c.decision.method
        raw, c.smtputf8 = c.content.composed[c.variant]
        if method == "portal":
            continue  # step 8
        if not c.decision.sends:
            c.final = ("failed", c.decision.reason)
            continue
        if method in ("pgp", "smime"):
            try:
                c.wire = dkim.sign(service.protect(
                    raw, method, c.key_material[method], smime_signing_key=c.content.smime_signing_key,
                    smime_capabilities=c.keys[method].smime_capabilities if method == "smime" else None,
                ), c.content.dkim_keys)
            except Exception as exc:  # noqa: BLE001 - a key that cannot encrypt: nothing is sent in clear
                c.final = ("failed", f"encryption_failed: {type(exc).__name__}")
            continue
        signed = c.content.signed.get(c.variant)
        if signed is None:
            signed = c.content.signed[c.variant] = dkim.sign(raw, c.content.dkim_keys)
        c.wire = signed


def store_for_portal(run: Run, copies: list[Copy]) -> None:
    """Step 8: recipients who get the portal. Their copy is stored encrypted for pickup
    (``carepost.portal.service.store_portal_message``, idempotent per recipient) and they get
    a notification without PHI (the organization's wording and a link) by email."""
    portal = [c for c in copies if c.decision is not None and c.decision.method == "portal" and c.open]
    if not portal:
        return
    session = run.session
    for c in portal:
        content = c.content
        if c.sandbox:
            # A sandbox run shows what the portal would hold; nothing is stored for pickup.
            c.wire = content.composed[c.variant][0]
            continue
        options = content.portal or {}
        expires = options.get("expires_at")
        try:
            with session.begin_nested():
                # The portal copy of a commercial message carries the same visible opt-out and postal
                # address as an emailed copy; the notification carries List-Unsubscribe.
                copy_text, copy_html = with_unsubscribe_footer(
                    content.text, content.html, c.unsubscribe, run.footer(c.org_id) if c.unsubscribe else None)
                pm = portal_store(
                    session, org_id=c.org_id, message_id=content.message.id, recipient_id=c.recipient.id,
                    recipient_address=c.address, subject=content.subject, html=copy_html, text=copy_text,
                    attachments=list(content.attachments) + [
                        Attachment(i.filename or i.cid, i.content, i.content_type) for i in content.inline],
                    sender_user_or_credential_id=content.message.created_by,
                    expires_at=_parse_time(expires) if expires else None, auth=options.get("auth") or "code",
                    question=options.get("question"), answer_hash=options.get("answer_hash"),
                    answer=options.get("answer"),  # only in messages accepted before answers were hashed
                )
                subject, text, html = portal_notification(session, pm)
        except ValidationFailed as exc:
            c.final = ("failed", f"portal: {exc.field or 'invalid'}")
            continue
        # To: the bare address; a display name would put the patient's name into the notification.
        if c.unsubscribe:
            text, html = with_unsubscribe_footer(text, html, c.unsubscribe, run.footer(c.org_id))
        notification = compose(sender=content.sender, to=[c.address], subject=subject, text=text, html=html,
                               list_unsubscribe=list(c.unsubscribe) or None,
                               list_unsubscribe_post=any(u.startswith("https://") for u in c.unsubscribe))
        c.portal_message_id = pm.id
        c.notification = True
        c.smtputf8 = notification.smtputf8
        c.wire = dkim.sign(notification.raw, content.dkim_keys)
        # The notification carries no PHI: it may travel where verified TLS is unavailable.
        c.require_verified_tls = False
    session.commit()


def send(run: Run, copies: list[Copy]) -> None:
    """Step 9: over pooled SMTP connections, at most CAREPOST_DELIVERY_CONCURRENCY at a time.
    A sandbox copy is captured instead (step 11 stores it)."""
    outgoing = []
    for c in copies:
        if c.sandbox:
            c.result = RecipientResult(c.address, "delivered", "sandbox: captured, not delivered", None, False,
                                       Evidence(at=clock.now()))
        else:
            outgoing.append(c)
    if not outgoing:
        return
    envelopes = [Envelope(sender=c.envelope_from, recipients=[c.address], message=c.wire, smtputf8=c.smtputf8,
                          require_verified_tls=c.require_verified_tls, relay=run.org_relays.get(c.org_id))
                 for c in outgoing]
    record(run, [c for c in run.copies if c.final is not None])  # decided without SMTP: recorded before any send
    run.session.commit()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    sending = _LOOP.submit(envelopes, run.settings, inbox)
    _record_as_answered(run, outgoing, inbox, sending)


FLUSH_SECONDS = 0.1  # how long the recorder waits for the first mark or answer of a group


def _record_as_answered(run: Run, outgoing: list[Copy], inbox: queue.SimpleQueue, sending) -> None:
    """Commit, in small groups, the marks of copies about to be sent and the outcomes of copies the
    servers answered; each sender waits for the commit — of its mark before it sends, of its
    outcome before it frees its place — so at most CAREPOST_DELIVERY_CONCURRENCY copies are ever
    marked without a recorded outcome. A copy that found no verified TLS waits for step 10 (its
    fallback); nothing of it was sent."""
    session = run.session
    while True:
        finished = sending.done()
        items = _drain(inbox, 0 if finished else FLUSH_SECONDS)
        if not items:
            if finished:
                break
            continue
        starts, answered, releases = [], [], []
        for kind, i, payload, release in items:
            if kind == "start":
                starts.append((outgoing[i], release))
            else:
                outgoing[i].result = payload
                answered.append(outgoing[i])
                releases.append(release)
        try:
            marked = _mark_sending(run, [c for c, _ in starts]) if starts else set()
            record(run, [c for c in answered if c.notification or c.result.status != "tls_unavailable"])
            session.commit()
        except Exception:
            session.rollback()
            # a start not marked gives up on that copy (deferred, not sent)
            _release_all([(release, False) for release in releases + [release for _, release in starts]])
            _refuse_the_rest(inbox, sending)
            raise
        # A copy whose lease another run took meanwhile (this run outlived its lease: a slow
        # batch, a wall clock that jumped forward) is not sent: that run sends it.
        _release_all([(release, c.recipient.id in marked) for c, release in starts]
                     + [(release, True) for release in releases])
    sending.result()  # surface an error of the loop itself


def _refuse_the_rest(inbox: queue.SimpleQueue, sending) -> None:
    """The recorder failed (the database went away mid-send): copies not yet started are not
    sent, and copies answered free their place at once, so the worker's other runs do not wait
    ``MARK_TIMEOUT`` for a recorder that is gone. Returns once every copy of this run is done;
    what was marked and not recorded is sent again, flagged, once the lease expires."""
    while True:
        finished = sending.done()
        items = _drain(inbox, 0 if finished else FLUSH_SECONDS)
        _release_all([(release, False) for *_, release in items])
        if finished and not items:
            return


class _Release:
    """Frees a sender waiting in the delivery loop (:meth:`DeliveryLoop.submit`): ``ok`` True, its
    mark or outcome is committed. Called from the recorder's thread."""

    __slots__ = ("done",)

    def __init__(self, done: asyncio.Future) -> None:
        self.done = done

    def __call__(self, ok: bool) -> None:
        _release_all([(self, ok)])


def _release_all(pairs: list[tuple[_Release, bool]]) -> None:
    """Free a committed group's senders with one hand-over to their loop (one wake-up of the
    loop per group, not one per copy)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool]]] = {}
    for release, ok in pairs:
        by_loop.setdefault(release.done.get_loop(), []).append((release.done, ok))
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_results, futures)
        except RuntimeError:  # the loop was closed meanwhile (process exit): nobody waits any more
            pass


def _set_results(futures: list[tuple[asyncio.Future, bool]]) -> None:
    for done, ok in futures:
        if not done.done():
            done.set_result(ok)


def _drain(inbox: queue.SimpleQueue, timeout: float) -> list:
    try:
        items = [inbox.get(timeout=timeout) if timeout else inbox.get_nowait()]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


def _mark_sending(run: Run, copies: list[Copy]) -> set[str]:
    """Mark these copies as being sent, where this run still holds their lease; the recipient
    ids marked (RETURNING, on both databases: the rows the UPDATE matched, none that another run
    claimed)."""
    now = clock.now()
    ids = [c.recipient.id for c in copies]
    marked: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marked.update(run.session.scalars(
            update(MessageRecipient)
            .where(MessageRecipient.id.in_(chunk), MessageRecipient.lease_owner == run.owner)
            .values(sending_since=now).returning(MessageRecipient.id)
            .execution_options(synchronize_session=False)).all())
    for c in copies:
        if c.recipient.id in marked:
            set_committed_value(c.recipient, "sending_since", now)  # written above: no second UPDATE at the next flush
        else:
            log.warning("lease_lost", recipient_id=c.recipient.id)
    return marked


def fall_back(run: Run) -> None:
    """Step 10: where verified TLS turned out to be unavailable (STARTTLS missing, stripped or
    failing; certificate invalid), the policy's fallback: the portal, or not sent, or — for an
    encrypted (keyed) message — the same encrypted copy over TLS when offered. Never clear text."""
    retry, resend = [], []
    for c in run.copies:
        if c.result is None or c.result.status != "tls_unavailable" or c.notification:
            continue
        fallback = policy.after_tls_failure(c.decision, c.result.reason)
        if fallback.method in ("pgp", "smime") and fallback.method == c.decision.method:
            # A keyed message: the same encrypted copy again, over TLS when offered (issue 9 item 9).
            c.fell_back_from, c.decision, c.result = c.decision.method, fallback, None
            c.require_verified_tls = False
            resend.append(c)
            continue
        c.fell_back_from, c.decision, c.result, c.wire = c.decision.method, fallback, None, None
        if fallback.method == "portal":
            retry.append(c)
        else:
            c.final = ("failed", fallback.reason)
    if retry:
        store_for_portal(run, retry)
    if retry or resend:
        send(run, resend + [c for c in retry if c.open and c.wire is not None])


def record(run: Run, copies: list[Copy] | None = None) -> None:
    """Step 11: outcomes on rows this run still holds; events; the next attempt of deferred ones.
    ``copies`` (default: every copy) not recorded yet; the send step records as servers answer.

    Set-based: the group's outcomes go out as one executemany UPDATE of the recipient rows and
    one executemany INSERT of their events (no ORM unit of work per row); the rows in memory get
    the same values as committed state, and each event is then published to its subscribers
    (webhooks, analytics) as ``delivery.service.add_event`` does."""
    session = run.session
    copies = [c for c in (run.copies if copies is None else copies) if not c.recorded]
    if not copies:
        return
    ids = [c.recipient.id for c in copies]
    still_ours = set()
    for start in range(0, len(ids), 500):
        still_ours.update(session.scalars(
            select(MessageRecipient.id).where(MessageRecipient.id.in_(ids[start:start + 500]),
                                              MessageRecipient.lease_owner == run.owner)
        ).all())
    ring = get_keyring()
    now = clock.now()
    encryptors: dict[str, Callable] = {}
    changes: list[dict] = []
    events: list[dict] = []
    published: list[tuple[MessageRecipient, dict]] = []
    bounced: list[tuple[MessageRecipient, RecipientResult]] = []

    def event(r: MessageRecipient, type_: str, **details) -> None:
        row = {"id": new_id(), "org_id": r.org_id, "message_id": r.message_id, "recipient_id": r.id, "type": type_,
               "details": details, "created_at": clock.now()}  # its own time: a fallback precedes the outcome
        events.append(row)
        published.append((r, row))

    for c in copies:
        c.recorded = True
        r = c.recipient
        if r.id not in still_ours:
            log.warning("lease_lost", recipient_id=r.id)
            continue
        if c.fell_back_from:
            event(r, "fallback", from_method=c.fell_back_from, to_method=c.decision.method)
        values: dict = {}
        if c.portal_message_id:
            values["portal_message_id"] = c.portal_message_id
        why, code, duplicate = None, None, False  # for the worker's metrics: classified, never exported
        if c.final is not None:
            status, reason = c.final
            why = reason
            values.update(_finish_values(status, reason, c.decision.method if c.decision else None, until=c.defer_until))
            if c.interrupted and status == "deferred":
                # Cut off mid-send before, deferred now without a send (quiet hours, a limit): the
                # mark stays, so the attempt that sends it flags it ``possible_duplicate``.
                values["sending_since"] = r.sending_since
        elif c.result is not None:
            result, method = c.result, c.decision.method
            why, code, duplicate = result.reason, result.reply_code, result.possible_duplicate
            if c.interrupted and result.status in ("delivered", "sent", "deferred", "bounced"):
                # An earlier attempt was cut off after its transaction began: it may have arrived.
                result = _with_duplicate_flag(result, INTERRUPTED)
            if c.sandbox:
                capture = SandboxCapture(id=new_id(), org_id=r.org_id, message_id=r.message_id, recipient_id=r.id,
                                         method=method, raw_enc=b"")
                capture.raw_enc = ring.encrypt(session, r.org_id, SandboxCapture.__tablename__, "raw", capture.id, c.wire)
                session.add(capture)
            elif result.status == "delivered" and (c.notification or (result.evidence and result.evidence.relay)):
                # Accepted by a relay, or a portal notification accepted: the message itself is
                # on its way (relay) or waiting in the portal; "delivered" is for the recipient's server.
                result = _with_status(result, "sent")
            if method == "tls" and not c.require_verified_tls and result.evidence and not result.evidence.tls_version \
                    and not c.sandbox:
                method = "none"  # opportunistic, no PHI: the server offered no TLS
            encrypt = encryptors.get(r.org_id)
            if encrypt is None:
                encrypt = encryptors[r.org_id] = ring.encryptor(session, r.org_id)
            changed, details = service.result_changes(
                session, r, result, method=method, encrypt=encrypt,
                key_fingerprint=c.keys[method].fingerprint if method in ("pgp", "smime") else None)
            if c.sandbox:
                changed["evidence"] = {**(changed["evidence"] or {}), "sandbox": True}
            values.update(changed)
            values["_event"] = details
            if changed["status"] == "bounced":
                bounced.append((r, result))
        else:  # unreachable: every open copy gets a result or a final outcome
            values.update(_finish_values("deferred", "internal: no outcome", None, retry=True))
        details = values.pop("_event")
        for column, value in values.items():
            set_committed_value(r, column, value)  # what the UPDATE below writes; nothing left for the unit of work
        changes.append({"id": r.id, "updated_at": now, **values})
        event(r, r.status, **details)
        run.statuses[r.status] = run.statuses.get(r.status, 0) + 1
        metrics.observe_delivery(r.status, why, code, duplicate)
    if changes:
        session.execute(update(MessageRecipient), changes)  # executemany, grouped by the columns each row sets
    if events:
        session.execute(insert(MessageEvent), events)
    for r, row in published:
        # Every message event goes out to the organization's webhooks and analytics (as add_event).
        domain_events.publish("message.recipient_event", session, r, _EventRow(row))
    for r, result in bounced:
        from carepost.delivery import bounces

        bounce = bounces.smtp_bounce_details(result)
        if bounce:
            bounces.after_bounce(session, r, bounce, source="smtp")
    session.flush()


class _EventRow:
    """A written event's columns as attributes (what ``message.recipient_event`` subscribers read)."""

    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


# --------------------------------------------------------------------------- the delivery loop


class DeliveryLoop:
    """One asyncio loop per worker process, in its own thread, holding the pooled SMTP client.
    Task threads hand it envelopes; connections are reused across tasks."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: DeliveryClient | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or not self._loop.is_running():
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run():
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="carepost-delivery-loop", daemon=True)
                self._thread.start()
                started.wait(5)
                self._loop, self._client, self._semaphore = loop, None, None
            return self._loop

    def deliver(self, envelopes: list[Envelope], settings: Settings) -> list[RecipientResult]:
        loop = self._ensure()
        return asyncio.run_coroutine_threadsafe(self._deliver_all(envelopes, settings), loop).result()

    def submit(self, envelopes: list[Envelope], settings: Settings, inbox: queue.SimpleQueue):
        """Start sending; returns a future. Into ``inbox`` go ``("start", i, None, release)``
        before envelope ``i``'s transaction begins — it waits until ``release(True)`` says its mark
        is committed (``release(False)``: not sent) — and ``("done", i, result, release)`` when it
        is answered; it keeps its place among the concurrent sends until that outcome is committed."""
        loop = self._ensure()
        return asyncio.run_coroutine_threadsafe(self._deliver_all(envelopes, settings, inbox), loop)

    async def _client_for(self, settings: Settings) -> tuple[DeliveryClient, asyncio.Semaphore]:
        if self._client is None or self._client.settings is not settings:
            # MTA-STS policies persist in the database with their max_age (RFC 8461 5.1).
            old, self._client = self._client, DeliveryClient(settings, policy_store=tlsprobe.DatabasePolicyStore())
            self._semaphore = asyncio.Semaphore(max(1, settings.delivery_concurrency))
            if old is not None:
                await old.close()
        return self._client, self._semaphore

    async def _deliver_all(self, envelopes: list[Envelope], settings: Settings,
                           inbox: queue.SimpleQueue | None = None) -> list[RecipientResult]:
        client, semaphore = await self._client_for(settings)
        deadline = max(30.0, settings.delivery_lease_seconds - 60.0)
        loop = asyncio.get_running_loop()

        def expire(done: asyncio.Future) -> None:
            if not done.done():
                done.set_result(False)

        async def committed(kind: str, i: int, payload) -> bool:
            # Waits for the recorder (``_Release``), False after MARK_TIMEOUT: one timer, no
            # ``wait_for`` wrapper (two waits per copy, on the hot path).
            done = loop.create_future()
            inbox.put((kind, i, payload, _Release(done)))
            timer = loop.call_later(MARK_TIMEOUT, expire, done)
            try:
                return await done
            finally:
                timer.cancel()

        async def one(i: int, envelope: Envelope) -> RecipientResult:
            async with semaphore:
                if inbox is not None and not await committed("start", i, None):
                    result = RecipientResult(envelope.recipients[0], "deferred", "internal: attempt not recorded",
                                             None, False, None)
                else:
                    try:
                        [result] = await asyncio.wait_for(client.deliver(envelope), deadline)
                    except Exception as exc:  # noqa: BLE001 - an outcome for every copy, whatever happened
                        # Whether the message left is unknown: retry, and say it may be a duplicate.
                        log.error("delivery_internal_error", error=type(exc).__name__)
                        result = RecipientResult(envelope.recipients[0], "deferred",
                                                 f"internal error: {type(exc).__name__}", None, True, None)
                if inbox is not None:
                    await committed("done", i, result)  # this place frees once the outcome is committed
                return result

        return list(await asyncio.gather(*(one(i, e) for i, e in enumerate(envelopes))))

    def close(self) -> None:
        """Close the pooled connections and stop the loop (tests; process exit)."""
        with self._lock:
            loop, client = self._loop, self._client
            self._loop, self._client, self._semaphore = None, None, None
        if loop is None or not loop.is_running():
            return
        if client is not None:
            try:
                asyncio.run_coroutine_threadsafe(client.close(), loop).result(10)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)


MARK_TIMEOUT = 30.0  # seconds a sender waits for its "being sent" mark to be committed

_LOOP = DeliveryLoop()


def reset() -> None:
    """Forget pooled connections and caches (tests change settings between cases)."""
    _LOOP.close()
    with _dkim_lock:
        _dkim_cache.clear()


# --------------------------------------------------------------------------- due recipients


# How far ahead of this process's clock another's may be (NTP keeps machines well within it).
CLOCK_SLACK = timedelta(seconds=60)


def lease_free(now: datetime, lease_seconds: float):
    """The SQL condition: a recipient's lease is free — none held, run out, or ending further
    ahead than any lease this installation grants (``CAREPOST_DELIVERY_LEASE_SECONDS`` plus
    :data:`CLOCK_SLACK`). Only a clock that was ahead and has been set back since (an NTP step,
    an operator fixing the time) writes such a lease; left alone, a worker killed holding it
    would leave its recipients stuck for as long as the clock went back. Taking such a lease is
    safe as taking an expired one: the run that wrote it, if still alive, sends only the
    copies it marked before (a copy marked and not recorded is sent again flagged
    ``possible_duplicate``), and records nothing on rows no longer its own."""
    R = MessageRecipient
    return or_(R.lease_until.is_(None), R.lease_until < now,
               R.lease_until > now + timedelta(seconds=lease_seconds) + CLOCK_SLACK)


def due_message_ids(session: Session, limit: int = 10000, *, stale_after: timedelta = REQUEUE_AFTER) -> list[str]:
    """Messages with recipients that are due and that no task is known to be handling:
    deferred ones whose next attempt has come, and queued ones whose task got lost (queued
    ``stale_after`` ago or more: 0 when the queue's store lost its tasks). Marks them as queued
    again (``enqueued_at``), so the next sweep does not queue them twice."""
    now = clock.now()
    R = MessageRecipient
    stale = now - stale_after
    # Queued again "in the future": the clock was set back since; its task may be lost as well.
    ahead = R.enqueued_at > now + CLOCK_SLACK
    due = and_(
        lease_free(now, get_settings().delivery_lease_seconds),
        or_(
            # claimed by a worker that died: due as soon as its lease expired (queued again once)
            and_(R.status == "queued", R.lease_until.is_not(None),
                 or_(R.enqueued_at.is_(None), R.enqueued_at < R.lease_until, ahead)),
            and_(R.status == "queued", or_(R.enqueued_at.is_(None), R.enqueued_at < stale, ahead)),
            and_(R.status == "deferred", R.next_attempt_at <= now,
                 or_(R.enqueued_at.is_(None), R.enqueued_at < R.next_attempt_at, R.enqueued_at < stale, ahead)),
        ),
    )
    ids = list(session.scalars(select(R.message_id).where(due).distinct().limit(limit)))
    for start in range(0, len(ids), 500):
        session.execute(update(R).where(R.message_id.in_(ids[start:start + 500]), due).values(enqueued_at=now)
                        .execution_options(synchronize_session=False))
    return ids


# --------------------------------------------------------------------------- helpers


def _mailbox_text(address: str, name: str | None) -> str:
    if not name:
        return address
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{address}>'


def _any(column, ids: list[str]):
    """PostgreSQL: ``column = ANY(:ids)``, the ids as one array parameter whatever their number
    (one cached statement, nothing rendered per id)."""
    return column == any_(bindparam(None, list(ids), type_=postgresql.ARRAY(String)))


def _unindexed(column):
    """SQLite only: ``+table.column``, the column as a term no index may serve (unary plus)."""
    return literal_column(f"+{column.table.name}.{column.name}", type_=column.type)


def _by_ids(session: Session, key, ids: list[str], *columns, extra: tuple = (), options: dict | None = None) -> list:
    """``columns`` of the rows whose ``key`` (the primary key or ``message_id``) is one of ``ids``
    (and ``extra``), looked up through ``key``'s index whatever SQLite's statistics.

    Written ``key IN (...)``, SQLite chose by its statistics between one index probe per id and a
    scan of the whole table, and stale statistics chose the scan: in bench/campaign_send.py those
    of the population's load (40 messages of ~944 recipients each: ``message_id`` estimated at 944
    rows a value) made every worker until the next ANALYZE scan ``message_recipients`` (37,749
    rows) for the claim's leased rows and load's recipients, and ``messages`` for load's messages:
    30-70 ms a statement for 200 ids instead of 0.3-2 ms (EXPLAIN QUERY PLAN in a fresh connection
    at each worker's start; docs/performance.md, "Campaign end to end: the pipeline's reads by
    id"). On SQLite the ids are one JSON parameter LEFT JOINed to the table (as
    ``consent.eligibility._by_ids``): a LEFT JOIN keeps the ids the outer loop, one index probe
    each, every condition in its ON clause; an id without a row gives NULLs, dropped here. The
    pipeline runs in a system session, so no tenant condition is added. PostgreSQL plans ``=
    ANY(:ids)`` with the statistics autovacuum keeps."""
    if not ids:
        return []
    if session.get_bind().dialect.name != "sqlite":
        query = select(*columns).where(_any(key, ids), *extra)
    else:
        wanted = func.json_each(bindparam(None, json.dumps(list(ids)))).table_valued("value").alias("wanted")
        query = select(*columns).select_from(wanted).outerjoin(key.class_, and_(key == wanted.c.value, *extra))
    if options:
        query = query.execution_options(**options)
    return [row for row in session.execute(query).all() if row[0] is not None]


def _recipient_keys(session: Session, recipients: list[MessageRecipient]) -> dict[tuple[str, str], dict[str, RecipientKey]]:
    """(org, address index) -> {kind: key} for keys on file that have not expired."""
    now = clock.now()
    out: dict[tuple[str, str], dict[str, RecipientKey]] = {}
    by_org: dict[str, set[str]] = {}
    for r in recipients:
        by_org.setdefault(r.org_id, set()).add(r.address_index)
    for org_id, indexes in by_org.items():
        values = sorted(indexes)
        for start in range(0, len(values), 500):
            for row in session.scalars(select(RecipientKey).where(RecipientKey.org_id == org_id,
                                                                  RecipientKey.address_index.in_(values[start:start + 500]))):
                if row.expires_at is None or clock.aware(row.expires_at) > now:
                    out.setdefault((org_id, row.address_index), {})[row.kind] = row
    return out


def _require_assembled() -> None:
    """Fail closed before claiming anything: every step must be assembled."""
    for port in (eligibility, quiet_hours, list_unsubscribe, portal_store, portal_notification, links):
        port.impl  # noqa: B018 - raises NotAssembled when the composition root did not run


def _no_transaction_across_the_network(session: Session) -> None:
    """SQLite takes its write lock at BEGIN: a transaction left open through the SMTP step would
    stall every other writer for as long as the network takes. The steps before this read the
    database only in step 1-4 and step 8 (which commit); should one ever read after the commit,
    end that transaction here rather than hold it."""
    if session.in_transaction():
        log.warning("transaction_open_before_send")
        session.commit()


_dkim_cache: dict[tuple[str, bytes], list[dkim.DkimKey]] = {}
_dkim_lock = threading.Lock()


def _dkim_keys(session: Session, row: SendingDomain) -> list[dkim.DkimKey]:
    """The domain's signing keys; parsed once per process (keyed by the encrypted key, so a
    rotated key is picked up)."""
    key = (row.id, hashlib.sha256((row.dkim_rsa_private_enc or b"") + (row.dkim_ed25519_private_enc or b"")).digest())
    with _dkim_lock:
        found = _dkim_cache.get(key)
    if found is None:
        found = service.dkim_keys(session, row)
        with _dkim_lock:
            if len(_dkim_cache) > 1000:
                _dkim_cache.clear()
            _dkim_cache[key] = found
    return found


def _finish_values(status: str, reason: str, method: str | None, *, retry: bool = False,
                   until: datetime | None = None) -> dict:
    """A final outcome decided without an SMTP answer: the row's new values, and its event's details
    under ``_event``."""
    method = method if status != "excluded" else None
    return {"status": status, "reason": reason, "method": method, "lease_until": None, "lease_owner": None,
            "sending_since": None, "next_attempt_at": until or (clock.now() + timedelta(minutes=5) if retry else None),
            "_event": {"method": method, "reason": reason.split(":", 1)[0]}}


INTERRUPTED = "possible duplicate: an earlier attempt was cut off after its SMTP transaction began"


def _with_duplicate_flag(result: RecipientResult, why: str) -> RecipientResult:
    """The outcome flagged ``possible_duplicate``, its reason saying why."""
    reason = f"{result.reason}; {why}" if result.reason else why
    return RecipientResult(result.address, result.status, reason, result.reply_code, True, result.evidence)


def _with_status(result: RecipientResult, status: str) -> RecipientResult:
    return RecipientResult(result.address, status, result.reason, result.reply_code, result.possible_duplicate,
                           result.evidence)


def _parse_time(value: str):
    from datetime import datetime

    return clock.aware(datetime.fromisoformat(value))
