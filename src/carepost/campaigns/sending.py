"""Sending a planned campaign: due recipient rows become messages, throttled, in batches.

:func:`materialize` takes the due ``planned`` recipients of a campaign in ``sending`` (never a
paused or cancelled one), within the campaign's throttles (messages per hour; messages per hour
to one receiving domain — counted from what this campaign materialized in the last hour, under
a lock every worker shares),
renders each contact's message from the template version (language variant, dynamic blocks of
the plan, A/B subject), and stores the messages through delivery's own
:func:`carepost.delivery.messages.store_messages` (which runs the eligibility check at
acceptance), marking each recipient row ``materialized`` with its message id — **in the same
transaction**. The caller then hands the message ids to the delivery pipeline task; the
pipeline re-checks eligibility when it claims them (a revocation between plan and send wins).

Why a crash never makes two messages for one recipient: a batch first claims its rows with
``UPDATE ... SET status = 'materialized' WHERE id IN (...) AND status = 'planned'``; if any row
was taken by another run the transaction is rolled back and the batch chosen again. The
messages and the row updates commit together or not at all. Messages committed whose delivery
task was lost (a kill between commit and enqueue) are queued again by delivery's own sweep.

Each message gets the purpose the rules make of it for its recipient (a refill reminder to a
patient whose prescription lapsed more than 90 days ago is marketing), computed again here from
the stored medication facts, so the pipeline's check at delivery applies the right rule.

This module reads the tables of patients (contacts' primary email identifiers) and delivery
(this campaign's messages of the last hour, for the throttles) directly: set-based reads that
need joins. It only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from carepost.campaigns import ab_tests, planning
from carepost.campaigns.models import Campaign, CampaignRecipient
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.database import org_session
from carepost.core.errors import ValidationFailed
from carepost.core.logging import get_logger

log = get_logger("carepost.campaigns.sending")

BATCH = 200
HOUR = timedelta(hours=1)


@dataclass
class SendReport:
    message_ids: list[str]
    more_due: bool = False  # a full batch was taken: call again at once
    next_due_at: datetime | None = None  # nothing more now; the next row (or throttle window) is due then
    completed: bool = False
    stopped: str | None = None


def _naive(when: datetime) -> datetime:
    return planning._naive(when)


def _sent_last_hour(session: Session, org_id: str, campaign_id: str, now: datetime) -> tuple[int, datetime | None]:
    from carepost.delivery.models import Message

    n, oldest = session.execute(select(func.count(Message.id), func.min(Message.created_at)).where(
        Message.org_id == org_id, Message.campaign_id == campaign_id, Message.created_at > _naive(now - HOUR))).one()
    return int(n or 0), oldest


def _per_domain_last_hour(session: Session, org_id: str, campaign_id: str, now: datetime) -> dict[str, int]:
    from carepost.delivery.models import Message, MessageRecipient

    return dict(session.execute(
        select(MessageRecipient.domain_index, func.count()).join(Message, Message.id == MessageRecipient.message_id)
        .where(Message.org_id == org_id, Message.campaign_id == campaign_id, Message.created_at > _naive(now - HOUR))
        .group_by(MessageRecipient.domain_index)).tuples().all())


def primary_addresses(session: Session, org_id: str, contact_ids: list[str]) -> dict[str, str]:
    """``{contact_id: primary email address}`` (decrypted in memory only), one query."""
    from carepost.patients.models import ContactIdentifier

    ring = get_keyring()
    best: dict[str, tuple] = {}
    for ident_id, cid, rank, blob in session.execute(
            select(ContactIdentifier.id, ContactIdentifier.contact_id, ContactIdentifier.rank, ContactIdentifier.value_enc)
            .where(ContactIdentifier.org_id == org_id, ContactIdentifier.kind == "email",
                   ContactIdentifier.contact_id.in_(contact_ids))):
        if cid not in best or (rank, ident_id) < best[cid][0]:
            best[cid] = ((rank, ident_id), blob)
    return {cid: ring.decrypt_text(session, org_id, "contact_identifiers", "value", key[1], blob)
            for cid, (key, blob) in best.items()}


class _Sender:
    """What every message of the campaign shares: From, sending domain, security mode."""

    def __init__(self, session: Session, org_id: str, campaign: Campaign, contains_phi: bool):
        from carepost.delivery import policy
        from carepost.delivery.domains import may_send, sending_domain_for
        from carepost.delivery.mime import parse_address
        from carepost.delivery.settings import delivery_settings

        name = None
        if campaign.from_name_enc:
            name = get_keyring().decrypt_text(session, org_id, Campaign.__tablename__, "from_name_enc", campaign.id,
                                              campaign.from_name_enc)
        address = parse_address(campaign.from_address or "", field_name="from_address")
        self.sender = type(address)(address.local, address.domain, name or "")
        self.domain = sending_domain_for(session, org_id, address.domain)
        if self.domain is None or not may_send(self.domain):
            raise ValidationFailed("The campaign's From address is not in a sending domain of the organization whose "
                                   "ownership is proven.", field="from_address")
        org = delivery_settings(session, org_id)
        override = None if campaign.security in (None, "", "auto") else campaign.security
        mode = policy.effective_mode(org["security_mode"], override)
        if contains_phi and mode == "opportunistic":
            mode = "tls_required"  # the least mode PHI may travel in (as delivery.messages does)
        self.security = mode


def _due_rows(session: Session, campaign_id: str, now: datetime, limit: int) -> list:
    """The due rows as tuples of the four columns sending reads (``id``, ``contact_id``,
    ``variant``, ``blocks``), not ORM objects: loading a batch's objects was 1.3 % of a campaign
    worker's CPU (profile of bench/campaign_send.py), and the rows are only ever updated by id.
    ``ix_campaign_recipients_due`` holds the order: a batch is read from the index, not by sorting
    every planned row of the campaign (which took each batch a whole scan of a 1,000,000-row campaign)."""
    R = CampaignRecipient
    return list(session.execute(select(R.id, R.contact_id, R.variant, R.blocks).where(
        R.campaign_id == campaign_id, R.status == "planned",
        R.send_after <= _naive(now)).order_by(R.send_after, R.contact_id).limit(limit)))


def _next_due(session: Session, campaign_id: str) -> datetime | None:
    return session.scalar(select(func.min(CampaignRecipient.send_after)).where(
        CampaignRecipient.campaign_id == campaign_id, CampaignRecipient.status == "planned"))


def _finish_if_done(session: Session, campaign: Campaign) -> bool:
    """``sending`` -> ``completed`` once planning finished and no planned row is left."""
    if campaign.plan_finished_at is None:
        return False
    left = session.scalar(select(CampaignRecipient.id).where(
        CampaignRecipient.campaign_id == campaign.id,
        CampaignRecipient.status.in_(("planned", "awaiting"))).limit(1))  # awaiting: an A/B winner to come
    if left is not None:
        return False
    done = session.execute(update(Campaign).where(Campaign.id == campaign.id, Campaign.status == "sending")
                           .values(status="completed", worked_at=clock.now())).rowcount
    if done:
        from carepost.campaigns.models import CampaignEvent

        session.add(CampaignEvent(org_id=campaign.org_id, campaign_id=campaign.id, action="completed", actor=None))
    return bool(done)


def materialize(org_id: str, campaign_id: str, *, batch: int = BATCH, now: datetime | None = None) -> SendReport:
    """One batch of a campaign's due recipients into messages (see the module docstring).

    A throttled campaign's batch is counted and claimed under a lock shared by every worker
    (core.limits: Redis when configured): the hourly allowance is read from the database, so two
    workers counting at once would both take the last of it."""
    from carepost.core.limits import LockBusy, lock

    with org_session(org_id) as session:
        throttled = session.execute(select(Campaign.throttle_per_hour, Campaign.throttle_per_domain_per_hour)
                                    .where(Campaign.id == campaign_id)).first()
    for _attempt in range(5):
        if throttled is not None and any(throttled):
            try:
                with lock("campaign-throttle:" + campaign_id, ttl=300, wait=30):
                    report = _materialize_once(org_id, campaign_id, batch, now)
            except LockBusy:
                return SendReport([], more_due=True)  # another worker is taking this campaign's batch
        else:
            report = _materialize_once(org_id, campaign_id, batch, now)
        if report is not None:
            return report
    return SendReport([], more_due=True)  # contended by other runs every time: try again later


def _materialize_once(org_id: str, campaign_id: str, batch: int, now: datetime | None) -> SendReport | None:
    from carepost.content import service as content
    from carepost.delivery.messages import PreparedMessage, store_messages
    from carepost.delivery.mime import parse_address

    now = clock.aware(now) if now else clock.now()
    with org_session(org_id) as session:
        campaign = session.get(Campaign, campaign_id)
        if campaign is None or campaign.org_id != org_id or campaign.status != "sending":
            return SendReport([], stopped=campaign.status if campaign else "missing")
        allowance = batch
        if campaign.throttle_per_hour:
            n, oldest = _sent_last_hour(session, org_id, campaign_id, now)
            allowance = min(allowance, campaign.throttle_per_hour - n)
            if allowance <= 0:
                session.execute(update(Campaign).where(Campaign.id == campaign_id).values(worked_at=clock.now()))
                session.commit()
                return SendReport([], next_due_at=(clock.aware(oldest) + HOUR) if oldest else now + HOUR)
        per_domain = campaign.throttle_per_domain_per_hour
        # With a per-domain throttle, look further ahead: rows for a domain at its limit stay planned.
        rows = _due_rows(session, campaign_id, now, allowance * (4 if per_domain else 1))
        if not rows:
            completed = _finish_if_done(session, campaign)
            session.execute(update(Campaign).where(Campaign.id == campaign_id).values(worked_at=clock.now()))
            next_due = _next_due(session, campaign_id)
            session.commit()
            return SendReport([], completed=completed, next_due_at=clock.aware(next_due) if next_due else None)
        addresses = primary_addresses(session, org_id, [r.contact_id for r in rows])
        ring = get_keyring()
        if per_domain:
            used = _per_domain_last_hour(session, org_id, campaign_id, now)
            kept = []
            for r in rows:
                address = addresses.get(r.contact_id)
                if address is None:
                    kept.append(r)
                    continue
                dom = ring.blind_index(session, org_id, "domain", address.rsplit("@", 1)[-1].lower())
                if used.get(dom, 0) < per_domain:
                    used[dom] = used.get(dom, 0) + 1
                    kept.append(r)
            rows = kept
        rows = rows[:allowance]
        if not rows:  # every due row is for a domain at its hourly limit
            session.execute(update(Campaign).where(Campaign.id == campaign_id).values(worked_at=clock.now()))
            session.commit()
            return SendReport([], next_due_at=now + timedelta(minutes=5))

        # Claim: the rows are this run's only if every one of them is still planned.
        claimed = session.execute(update(CampaignRecipient).where(
            CampaignRecipient.id.in_([r.id for r in rows]), CampaignRecipient.status == "planned")
            .values(status="materialized").execution_options(synchronize_session=False)).rowcount
        if claimed != len(rows):
            session.rollback()
            return None

        version = content.get_version_by_id(session, org_id, campaign.template_version_id)
        sender = _Sender(session, org_id, campaign, version.contains_phi)
        lapses = (planning.refill_lapse_days(session, org_id, campaign.refill_drug, [r.contact_id for r in rows])
                  if campaign.refill_drug else {})
        # One render per (variant) group: the render loads every contact's data once per chunk.
        by_variant: dict[str | None, list] = {}
        for r in rows:
            by_variant.setdefault(r.variant, []).append(r)
        # The purpose per recipient depends only on the lapse of its prescription (refill
        # campaigns): worked out once per distinct lapse, not once per recipient.
        purpose_of: dict[int | None, str] = {}

        def purpose_for(contact_id: str) -> str:
            lapse = lapses.get(contact_id)
            found = purpose_of.get(lapse)
            if found is None:
                found = purpose_of[lapse] = planning.effective_purpose(campaign, lapse)
            return found

        prepared: list[PreparedMessage] = []
        owners: list = []
        unsendable: list = []
        base_version = version
        for variant, group in by_variant.items():
            # The A/B variant's settings (a released row "winner:B" takes B's): subject, template version.
            override = ab_tests.variant_settings(campaign.ab_test, variant)
            version = (content.get_version_by_id(session, org_id, override["template_version_id"])
                       if override.get("template_version_id") else base_version)
            visible = {r.contact_id: frozenset(r.blocks or ()) for r in group}
            rendered = content.render_for_contacts(session, org_id, version, [r.contact_id for r in group],
                                                   visible=visible)
            for r in group:
                out = rendered.get(r.contact_id)
                address = addresses.get(r.contact_id)
                if out is None or address is None:
                    unsendable.append(r)  # the contact or its address was removed since planning
                    continue
                try:
                    to = parse_address(address, allow_display_name=False)
                except ValidationFailed:
                    unsendable.append(r)
                    continue
                prepared.append(PreparedMessage(
                    sender=sender.sender, sending_domain=sender.domain, recipients=[("to", to)], reply_to=None,
                    subject=override.get("subject") or out.subject, html=out.html or None, text=out.text or None,
                    attachments=[], headers={}, purpose=purpose_for(r.contact_id),
                    security=sender.security, contains_phi=out.contains_phi, tags=[], portal=None, request_hash="",
                    topic_id=campaign.topic_id, track_opens=bool(campaign.track_opens),
                    track_clicks=bool(campaign.track_clicks), template_id=version.template_id,
                    template_version_id=version.id, campaign_id=campaign.id,
                ))
                owners.append(r)
        # As rows (one INSERT of the batch's messages, no ORM objects): only their ids are read here.
        messages = (store_messages(session, org_id, prepared, source="campaign", created_by=None, as_rows=True)
                    if prepared else [])
        if messages:
            session.execute(update(CampaignRecipient), [{"id": r.id, "message_id": m.id} for r, m in zip(owners, messages)])
        if unsendable:
            session.execute(update(CampaignRecipient).where(CampaignRecipient.id.in_([r.id for r in unsendable]))
                            .values(status="cancelled").execution_options(synchronize_session=False))
        session.execute(update(Campaign).where(Campaign.id == campaign_id).values(
            materialized_count=Campaign.materialized_count + len(messages), worked_at=clock.now()))
        session.commit()
        ids = [m.id for m in messages]
        return SendReport(ids, more_due=len(rows) >= allowance)


def cancel_remaining(session: Session, campaign_id: str) -> int:
    """A cancelled campaign: every row not yet materialized is ``cancelled`` (the caller commits)."""
    return session.execute(update(CampaignRecipient).where(
        CampaignRecipient.campaign_id == campaign_id, CampaignRecipient.status.in_(("planned", "awaiting")))
        .values(status="cancelled").execution_options(synchronize_session=False)).rowcount


def stalled(session: Session, stale_after: timedelta, now: datetime | None = None) -> list[tuple[str, str, str]]:
    """``(org_id, campaign_id, status)`` of campaigns planning or sending whose work stopped
    (no heartbeat for ``stale_after``): a worker was killed, or the queue lost the task. Every
    organization (the periodic sweep runs in a system session). A heartbeat more than a minute
    ahead of the clock was written before the clock was set back: stale too (else a campaign
    whose worker died across the jump would wait as long as the clock went back); queuing a
    campaign that is still being worked is safe."""
    now = clock.aware(now) if now else clock.now()
    cutoff = _naive(now - stale_after)
    q = select(Campaign.org_id, Campaign.id, Campaign.status).where(
        Campaign.status.in_(("planning", "sending")),
        (Campaign.worked_at.is_(None)) | (Campaign.worked_at < cutoff)
        | (Campaign.worked_at > _naive(now + timedelta(minutes=1))))
    return [tuple(r) for r in session.execute(q)]
