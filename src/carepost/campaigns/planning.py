"""Planning a campaign: its audience, chunk by chunk, into recipient and exclusion rows.

ARCHITECTURE.md section 4, step 1. :func:`plan` resolves the segment (minus the exclusion
segments) to contact ids in chunks ordered by contact id, starting after ``plan_cursor``; each
chunk goes through the one set-based eligibility check, the refill facts of the campaign's drug,
the dynamic-block plan of the template version (one query per block per chunk) and the A/B
assignment, and is written — recipient rows, exclusion rows with their reason, the cursor and
the counts — in **one transaction per chunk**.

Speed (issue 14: a million recipients in minutes): a campaign with one effective purpose (no
refill drug) reads the chunk of the segment and its eligibility in **one statement**
(``consent.eligibility.verdict_select``: per contact a few index probes, no id list sent), only
the few verdicts that statement leaves undecided go through ``check_eligibility``; id sets are
sent as one parameter (:func:`among`); the block conditions are compiled once per run; the rows
are written by COPY on PostgreSQL. A refill campaign (a purpose per recipient) takes the general
path (:func:`chunk_rows`: ``check_eligibility`` per purpose).

Why a crash plans nobody twice and skips nobody: the cursor moves in the same transaction as the
rows of its chunk, by a compare-and-set (``UPDATE ... WHERE plan_cursor = <the one read>``, which
also adds the chunk's counts), made before the rows are written, so a second planner of the same
campaign (the sweep re-queued it while the first was still alive) waits on the campaign row,
finds the cursor moved and re-reads instead of writing; the unique constraints on (campaign,
contact) are the last guard. A killed planner leaves its chunk uncommitted; the next one starts
at the last committed cursor. The segment is evaluated at ``plan_started_at`` every time, so a
resumed plan sees the same audience definition.

This module reads the tables of patients (contacts' time zones, medications of the refill drug)
directly: a set-based answer needs joins, which calling their services one contact at a time
cannot give. It only reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    JSON,
    String,
    any_,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from carepost.campaigns import ab_tests
from carepost.campaigns.models import Campaign, CampaignExclusion, CampaignRecipient
from carepost.core import clock, purposes
from carepost.core.database import org_session
from carepost.core.ids import new_id
from carepost.core.logging import get_logger

log = get_logger("carepost.campaigns.planning")

CHUNK = 2000
# A campaign's remuneration (campaigns' words) -> consent's (core.purposes.REMUNERATION).
REMUNERATION = {"none": "none", "cost": "cost_related", "other": "above_cost", None: "none"}
EXCLUSION_SEGMENT = "exclusion_segment"  # reason of a contact removed by an exclusion segment
UTC = ZoneInfo("UTC")


@dataclass
class PlanReport:
    chunks: int = 0
    planned: int = 0
    excluded: int = 0
    finished: bool = False
    stopped: str | None = None  # why planning stopped before the end (paused, cancelled, not planning)


def among(session: Session, column, ids: list[str]):
    """``column IN <ids>`` as one bound parameter, not one per id: ``= ANY(:ids)`` (an array) on
    PostgreSQL, ``IN (SELECT value FROM json_each(:ids))`` on SQLite. An expanded 2,000-id
    ``IN`` list costs more to render and convert than the query costs to run."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(ids), type_=postgresql.ARRAY(String)))
    return column.in_(select(literal_column("value")).select_from(func.json_each(bindparam(None, json.dumps(list(ids))))))


# --------------------------------------------------------------------------- the audience


class Audience:
    """The segment and exclusion segments of one campaign, compiled once per planning run."""

    def __init__(self, session: Session, org_id: str, campaign: Campaign):
        from carepost.segments import compiler
        from carepost.segments import service as segments
        from carepost.segments.models import SegmentMember

        self.org_id = org_id
        at = clock.aware(campaign.plan_started_at) if campaign.plan_started_at else clock.now()
        self._member = SegmentMember
        self.segment = segments.get_segment(session, org_id, campaign.segment_id)
        self.statement = None
        if self.segment.kind != "snapshot":
            self.statement = compiler.compile_query(session, org_id, segments.read_query(self.segment.query), at,
                                                    segment_id=self.segment.id).statement
        self.exclusions = []
        for seg_id in campaign.exclusion_segment_ids or []:
            seg = segments.get_segment(session, org_id, seg_id)
            if seg.kind == "snapshot":
                self.exclusions.append(("snapshot", seg.id))
            else:
                compiled = compiler.compile_query(session, org_id, segments.read_query(seg.query), at, segment_id=seg.id)
                self.exclusions.append(("dynamic", compiled.statement))

    def chunk_select(self, after: str | None, limit: int):
        """The next ``limit`` contacts of the audience after ``after`` as SQL — a CTE of
        ``contacts`` rows (``id``, ``deceased``, ``time_zone``) for the planner's one-statement
        eligibility check (``consent.eligibility.verdict_select``)."""
        from carepost.patients.models import Contact

        columns = (Contact.id.label("id"), Contact.deceased.label("deceased"), Contact.time_zone.label("time_zone"))
        if self.statement is None:
            m = self._member
            stmt = select(*columns).join(m, m.contact_id == Contact.id).where(
                m.segment_id == self.segment.id, Contact.org_id == self.org_id)
        else:
            stmt = self.statement.with_only_columns(*columns).where(Contact.org_id == self.org_id)
        if after:
            stmt = stmt.where(Contact.id > after)
        return stmt.order_by(Contact.id).limit(limit).cte("plan_chunk")

    def chunk(self, session: Session, after: str | None, limit: int) -> list[str]:
        from carepost.patients.models import Contact

        if self.statement is None:
            m = self._member
            stmt = select(m.contact_id).where(m.segment_id == self.segment.id)
            if after:
                stmt = stmt.where(m.contact_id > after)
            return list(session.scalars(stmt.order_by(m.contact_id).limit(limit)))
        stmt = self.statement.where(Contact.org_id == self.org_id)
        if after:
            stmt = stmt.where(Contact.id > after)
        return list(session.scalars(stmt.order_by(Contact.id).limit(limit)))

    def excluded(self, session: Session, ids: list[str]) -> set[str]:
        from carepost.patients.models import Contact

        out: set[str] = set()
        for kind, what in self.exclusions:
            if kind == "snapshot":
                m = self._member
                out |= set(session.scalars(select(m.contact_id).where(m.segment_id == what, among(session, m.contact_id, ids))))
            else:
                out |= set(session.scalars(what.where(Contact.org_id == self.org_id, among(session, Contact.id, ids))))
        return out


# --------------------------------------------------------------------------- per-recipient facts


def refill_lapse_days(session: Session, org_id: str, drug: str, contact_ids: list[str],
                      today: date | None = None) -> dict[str, int | None]:
    """``{contact_id: days since the prescription of ``drug`` lapsed}`` for one chunk, in one
    query: 0 while it is current (an active prescription without an end, or supply that has not
    run out), ``None`` when the contact has no prescription of that drug at all (not currently
    prescribed). A prescription runs until its end date, else its next refill due date, else
    last fill (or authored date) plus the days of supply."""
    from carepost.patients.models import Medication
    from carepost.segments.compiler import _entries_for_codes, code_predicate

    today = today or clock.now().date()
    out: dict[str, int | None] = {cid: None for cid in contact_ids}
    rows = session.execute(select(
        Medication.contact_id, Medication.status, Medication.end_date, Medication.next_refill_due,
        Medication.last_fill_date, Medication.authored_on, Medication.start_date, Medication.days_supply,
    ).where(Medication.org_id == org_id, Medication.contact_id.in_(contact_ids),
            code_predicate(Medication, _entries_for_codes([drug]))))
    for cid, status, end, due, last_fill, authored, start, supply in rows:
        runs_until = end or due
        if runs_until is None:
            began = last_fill or authored or start
            if began is not None and supply:
                runs_until = began + timedelta(days=int(supply))
        if runs_until is None:
            lapsed = 0 if status in (None, "active", "on-hold", "intended") else None
        else:
            lapsed = max(0, (today - runs_until).days)
        if lapsed is None:
            continue
        cur = out.get(cid)
        out[cid] = lapsed if cur is None else min(cur, lapsed)
    return out


def effective_purpose(campaign: Campaign, lapsed_days: int | None) -> str:
    """The purpose the rules make of this campaign for one recipient (consent's ``requirements``):
    a refill reminder to a patient whose prescription lapsed more than 90 days ago — or who has
    none — is marketing."""
    lapse = lapsed_days if campaign.refill_drug else None
    if campaign.refill_drug and lapsed_days is None:
        lapse = purposes.CURRENT_PRESCRIPTION_LAPSE_DAYS + 1  # never prescribed: not "currently prescribed"
    return purposes.requirements(campaign.purpose, remuneration=REMUNERATION.get(campaign.remuneration, "none"),
                                 prescription_lapsed_days=lapse).effective_purpose


def eligibility(session: Session, org_id: str, campaign: Campaign, ids: list[str],
                at: datetime | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``({contact_id: "eligible" | reason}, {contact_id: effective purpose})`` for one chunk:
    one call of the set-based check per distinct effective purpose (two at most for a refill
    campaign: current and lapsed prescriptions)."""
    from carepost.consent import eligibility as consent
    from carepost.consent.service import consent_settings

    lapses = refill_lapse_days(session, org_id, campaign.refill_drug, ids) if campaign.refill_drug else {}
    groups: dict[str, list[str]] = {}
    purpose_of: dict[str, str] = {}
    for cid in ids:
        eff = effective_purpose(campaign, lapses.get(cid))
        purpose_of[cid] = eff
        groups.setdefault(eff, []).append(cid)
    out: dict[str, str] = {}
    postal = None
    for eff, members in groups.items():
        checked = consent.check_eligibility(session, members, eff, campaign.topic_id, "email", at, org_id=org_id)
        if purposes.requirements(eff).opt_out_required:
            if postal is None:
                postal = bool(consent_settings(session, org_id).get("postal_address"))
            if not postal:  # CAN-SPAM: never sent without the sender's postal address
                checked = {k: ("no_postal_address" if v == consent.ELIGIBLE else v) for k, v in checked.items()}
        out.update(checked)
    return out, purpose_of


def assign_variant(campaign_id: str, contact_id: str, ab_test: dict | None) -> str | None:
    """The A/B variant of one contact, or ``"holdout"``: a hash of (campaign, contact), so a
    re-plan gives the same answer. ``ab_test``: ``{"variants": [{"key": "A", ...}, ...] or
    ["A", "B"], "holdout": 0.05}``."""
    if not ab_test:
        return None
    digest = hashlib.sha256(f"{campaign_id}:{contact_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < float(ab_test.get("holdout") or 0):
        return "holdout"
    variants = [v.get("key") if isinstance(v, dict) else str(v) for v in ab_test.get("variants") or []]
    if not variants:
        return None
    return variants[int.from_bytes(digest[8:16], "big") % len(variants)]


def _zone(name: str | None, default: ZoneInfo) -> ZoneInfo:
    if not name:
        return default
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return default


def send_times(session: Session, org_id: str, campaign: Campaign, ids: list[str],
               now: datetime | None = None, zones: dict[str, str | None] | None = None) -> dict[str, datetime]:
    """``{contact_id: send_after (UTC)}``: now (the launch), the campaign's ``send_at``, or
    ``local_time`` on ``local_date`` in each contact's time zone (the organization's default for
    contacts without one; ``zones`` when the caller has read them) — one query for the chunk, one
    conversion per distinct zone. Quiet hours are not applied here: the delivery pipeline defers at send time (never excludes)."""
    now = clock.aware(now) if now else clock.now()
    if campaign.schedule_kind == "at" and campaign.send_at:
        when = clock.aware(campaign.send_at)
        return {cid: when for cid in ids}
    if campaign.schedule_kind != "local" or not campaign.local_time:
        when = clock.aware(campaign.launched_at) if campaign.launched_at else now
        return {cid: when for cid in ids}
    from carepost.consent.service import consent_settings
    from carepost.patients.models import Contact

    default = _zone(consent_settings(session, org_id).get("default_time_zone"), UTC)
    hh, mm = (int(x) for x in campaign.local_time.split(":"))
    day = campaign.local_date or (clock.aware(campaign.send_at) if campaign.send_at else now).date()
    by_zone: dict[str | None, datetime] = {}
    out: dict[str, datetime] = {}
    if zones is not None:  # the planner read them with the eligibility check
        pairs = [(cid, zones[cid]) for cid in ids if cid in zones]
    else:
        pairs = session.execute(select(Contact.id, Contact.time_zone).where(
            Contact.org_id == org_id, among(session, Contact.id, ids))).tuples().all()
    for cid, tz in pairs:
        if tz not in by_zone:
            by_zone[tz] = datetime.combine(day, time(hh, mm), tzinfo=_zone(tz, default)).astimezone(UTC)
        out[cid] = by_zone[tz]
    return out


# --------------------------------------------------------------------------- one chunk


def _naive(when: datetime) -> datetime:
    """In UTC, as every stored time (both databases compare them as UTC)."""
    return clock.aware(when).astimezone(UTC)


def _correlated(statement):
    """``statement`` with each ``contacts.id IN (SELECT x.contact_id FROM x WHERE ...)`` of the
    segments compiler rewritten as ``EXISTS (SELECT ... WHERE ... AND x.contact_id = contacts.id)``
    — the same rows when ``x.contact_id`` cannot be NULL (only then is it rewritten). For a chunk
    of ids this is one index probe per contact, where SQLite evaluates the ``IN`` list over the
    whole table (every diabetic of the organization) for every chunk."""
    from sqlalchemy import exists
    from sqlalchemy.sql import operators, visitors
    from sqlalchemy.sql.elements import BinaryExpression
    from sqlalchemy.sql.selectable import ScalarSelect, Select

    from carepost.patients.models import Contact

    def replace(element):
        if not (isinstance(element, BinaryExpression) and element.operator is operators.in_op
                and getattr(element.left, "table", None) is Contact.__table__ and element.left.name == "id"
                and isinstance(element.right, ScalarSelect) and isinstance(element.right.element, Select)):
            return None
        inner = element.right.element
        columns = list(inner.selected_columns)
        if len(columns) != 1 or getattr(columns[0], "nullable", True) or inner._limit_clause is not None:
            return None
        return exists(inner.where(columns[0] == Contact.__table__.c.id)).correlate(Contact.__table__)

    return visitors.replacement_traverse(statement, {}, replace)


class BlockPlan:
    """The template's dynamic blocks compiled once per planning run: one set-wise query per block
    per chunk (``contacts.id = ANY(:ids) AND <condition>``), the segments compiler's SQL — the same
    as ``content.blocks.plan`` without parsing and compiling each condition for every chunk."""

    def __init__(self, session: Session, org_id: str, conditions: dict[str, str]):
        from carepost.segments import compiler, language

        self.org_id = org_id
        self.statements = {key: _correlated(compiler.compile_query(session, org_id, language.parse(cond)).statement)
                           for key, cond in conditions.items()}

    def __bool__(self) -> bool:
        return bool(self.statements)

    def plan(self, session: Session, contact_ids: list[str]) -> dict[str, list[str]]:
        """``{contact_id: keys of the blocks it sees}`` (contacts seeing none are left out) for
        ``contact_ids`` in the database's order of ids (a chunk's order)."""
        from carepost.patients.models import Contact

        seen: dict[str, list[str]] = {}
        if not contact_ids:
            return seen
        # The ids come in the database's order (a chunk's), so the first and last bound them: the
        # range lets PostgreSQL read the chunk by the primary key instead of scanning every contact.
        for key in sorted(self.statements):
            for cid in session.scalars(self.statements[key].where(
                    Contact.org_id == self.org_id, Contact.id >= contact_ids[0], Contact.id <= contact_ids[-1],
                    among(session, Contact.id, contact_ids))):
                seen.setdefault(cid, []).append(key)
        return seen


def chunk_rows(session: Session, org_id: str, campaign: Campaign, audience: Audience, ids: list[str],
               conditions: dict[str, str] | BlockPlan) -> tuple[list[dict], list[dict]]:
    """The recipient and exclusion rows of one chunk by the general path (not written)."""
    removed = audience.excluded(session, ids) if audience.exclusions else set()
    rest = [cid for cid in ids if cid not in removed]
    verdicts, _ = eligibility(session, org_id, campaign, rest) if rest else ({}, {})
    return build_rows(session, org_id, campaign, ids, removed, verdicts, conditions)


def checked_rows(session: Session, org_id: str, campaign: Campaign, audience: Audience,
                 rows: list[tuple[str, str | None, str | None]], blocks: BlockPlan, purpose: str,
                 at: datetime) -> tuple[list[dict], list[dict]]:
    """One chunk whose eligibility the database has answered (``consent.eligibility.verdict_select``:
    ``(contact_id, time_zone, verdict)``): the few undecided verdicts (suppressed addresses,
    revoked or expired authorizations) go to ``check_eligibility``, the CAN-SPAM postal rule
    applies as in :func:`eligibility`: the recipient and exclusion rows (not written). Only for one
    effective purpose (no refill drug)."""
    from carepost.consent import eligibility as consent
    from carepost.consent.service import consent_settings

    ids = [r[0] for r in rows]
    removed = audience.excluded(session, ids) if audience.exclusions else set()
    verdicts = {cid: verdict for cid, _, verdict in rows if cid not in removed}
    undecided = [cid for cid, verdict in verdicts.items() if verdict is None]
    if undecided:
        verdicts.update(consent.check_eligibility(session, undecided, purpose, campaign.topic_id, "email", at,
                                                  org_id=org_id))
    if purposes.requirements(purpose).opt_out_required and not consent_settings(session, org_id).get("postal_address"):
        verdicts = {k: ("no_postal_address" if v == consent.ELIGIBLE else v) for k, v in verdicts.items()}
    zones = {cid: tz for cid, tz, _ in rows}
    return build_rows(session, org_id, campaign, ids, removed, verdicts, blocks, zones)


def build_rows(session: Session, org_id: str, campaign: Campaign, ids: list[str], removed: set[str],
               verdicts: dict[str, str], conditions: dict[str, str] | BlockPlan,
               zones: dict[str, str | None] | None = None) -> tuple[list[dict], list[dict]]:
    from carepost.content import blocks

    rest = [cid for cid in ids if cid not in removed]
    eligible = [cid for cid in rest if verdicts.get(cid) == "eligible"]
    if isinstance(conditions, BlockPlan):
        shown = conditions.plan(session, eligible) if conditions and eligible else {}
    else:
        shown = blocks.plan(session, org_id, conditions, eligible) if conditions and eligible else {}
    when = send_times(session, org_id, campaign, eligible, zones=zones) if eligible else {}
    now = _naive(clock.now())
    exclusions = [{"id": new_id(), "org_id": org_id, "campaign_id": campaign.id, "contact_id": cid,
                   "reason": EXCLUSION_SEGMENT, "created_at": now} for cid in ids if cid in removed]
    exclusions += [{"id": new_id(), "org_id": org_id, "campaign_id": campaign.id, "contact_id": cid,
                    "reason": verdicts.get(cid, "no_address"), "created_at": now}
                   for cid in rest if verdicts.get(cid) != "eligible"]
    recipients = []
    ab = campaign.ab_test
    offsets: dict[str | None, timedelta] = {}
    for cid in eligible:
        # A/B: the holdout (held_out), the test fraction (a variant, planned, shifted by the variant's
        # send offset) or the rest (awaiting the winner) — campaigns.ab_tests.
        variant, status = ab_tests.assign(campaign.id, cid, ab)
        if variant not in offsets:
            offsets[variant] = ab_tests.send_offset(ab, variant)
        at = _naive(when[cid]) if cid in when else now
        recipients.append({
            "id": new_id(), "org_id": org_id, "campaign_id": campaign.id, "contact_id": cid, "variant": variant,
            "blocks": sorted(shown.get(cid, ())), "send_after": at + offsets[variant],
            "receiving_domain_index": None, "status": status, "message_id": None,
        })
    return recipients, exclusions


def write_rows(session: Session, table, rows: list[dict]) -> None:
    """Insert rows in the caller's transaction by each database's bulk path: COPY on PostgreSQL
    (one round trip for the chunk, no per-row statement), one executemany of a Core INSERT on
    SQLite (no ORM unit of work either way)."""
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        connection.execute(insert(table), rows)
        return
    columns = list(rows[0])
    encoders = [(lambda v: None if v is None else json.dumps(v)) if isinstance(table.c[c].type, JSON) else None
                for c in columns]
    raw = connection.connection.dbapi_connection
    quoted = ", ".join(f'"{c}"' for c in columns)
    with raw.cursor() as cursor, cursor.copy(f'COPY "{table.name}" ({quoted}) FROM STDIN') as copy:
        for row in rows:
            copy.write_row([enc(row[c]) if enc else row[c] for c, enc in zip(columns, encoders)])


# --------------------------------------------------------------------------- the run


def start(session: Session, campaign: Campaign) -> bool:
    """Move a launched campaign into ``planning`` (from ``scheduled``, or ``planning`` again after
    a crash); False when it is in another state (paused, cancelled, already sending...)."""
    if campaign.status == "scheduled":
        campaign.status = "planning"
    if campaign.status != "planning" or campaign.plan_finished_at is not None:
        return False
    if campaign.plan_started_at is None:
        campaign.plan_started_at = clock.now()
    campaign.worked_at = clock.now()
    return True


def plan(org_id: str, campaign_id: str, *, chunk_size: int = CHUNK, max_chunks: int | None = None) -> PlanReport:
    """Plan a campaign to the end (or ``max_chunks`` chunks), one transaction per chunk;
    resumable from ``plan_cursor``. On the last chunk the campaign moves to ``sending``."""
    from carepost.content import service as content

    report = PlanReport()
    with org_session(org_id) as session:
        campaign = session.get(Campaign, campaign_id)
        if campaign is None or campaign.org_id != org_id:
            report.stopped = "missing"
            return report
        if not start(session, campaign):
            report.stopped = campaign.status
            session.rollback()
            return report
        session.commit()
        audience = Audience(session, org_id, campaign)
        conditions: dict[str, str] = {}
        if campaign.template_version_id:
            version = content.get_version_by_id(session, org_id, campaign.template_version_id)
            conditions = content.version_blocks(version)
        blocks = BlockPlan(session, org_id, conditions)
        # One effective purpose for every recipient (no refill drug): the database answers the
        # chunk's eligibility in the statement that reads the chunk (consent.eligibility.verdict_select).
        one_purpose = None if campaign.refill_drug else effective_purpose(campaign, None)
        session.commit()
        reload = True
        while max_chunks is None or report.chunks < max_chunks:
            if reload:  # at the start, and when the compare-and-set found the campaign changed
                session.expire_all()
                campaign = session.get(Campaign, campaign_id)
                if campaign.status != "planning" or campaign.plan_finished_at is not None:
                    report.stopped = campaign.status
                    session.rollback()
                    return report
                cursor, reload = campaign.plan_cursor, False
            if one_purpose:
                from carepost.consent.eligibility import verdict_select

                at = clock.now()
                rows = session.execute(verdict_select(session, org_id, audience.chunk_select(cursor, chunk_size),
                                                      one_purpose, campaign.topic_id, at)).tuples().all()
                ids = [r[0] for r in rows]
            else:
                ids = audience.chunk(session, cursor, chunk_size)
            if not ids:
                finished = session.execute(update(Campaign).where(
                    Campaign.id == campaign_id, Campaign.status == "planning", Campaign.plan_finished_at.is_(None))
                    .values(status="sending", plan_finished_at=clock.now(), worked_at=clock.now())).rowcount
                session.commit()
                report.finished = bool(finished)
                planned_count, excluded_count = session.execute(select(
                    Campaign.planned_count, Campaign.excluded_count).where(Campaign.id == campaign_id)).one()
                session.rollback()
                log.info("campaign_planned", campaign_id=campaign_id, planned_count=planned_count,
                         excluded_count=excluded_count)
                return report
            if one_purpose:
                recipients, exclusions = checked_rows(session, org_id, campaign, audience, rows, blocks, one_purpose, at)
            else:
                recipients, exclusions = chunk_rows(session, org_id, campaign, audience, ids, blocks)
            # Compare-and-set: this transaction owns the chunk only if nobody moved the cursor (nor
            # paused or cancelled the campaign); the counts move with it, in the same statement.
            cas = update(Campaign).where(Campaign.id == campaign_id, Campaign.status == "planning")
            cas = cas.where(Campaign.plan_cursor == cursor) if cursor else cas.where(Campaign.plan_cursor.is_(None))
            if session.execute(cas.values(
                    plan_cursor=ids[-1], worked_at=clock.now(),
                    planned_count=Campaign.planned_count + len(recipients),
                    excluded_count=Campaign.excluded_count + len(exclusions))).rowcount != 1:
                session.rollback()
                reload = True
                continue
            write_rows(session, CampaignRecipient.__table__, recipients)
            write_rows(session, CampaignExclusion.__table__, exclusions)
            session.commit()
            cursor = ids[-1]
            report.chunks += 1
            report.planned += len(recipients)
            report.excluded += len(exclusions)
    return report


def progress(session: Session, campaign: Campaign) -> dict:
    """What planning and sending have done so far (for the API, the CLI's progress bar)."""
    counts = dict(session.execute(select(CampaignRecipient.status, func.count()).where(
        CampaignRecipient.campaign_id == campaign.id).group_by(CampaignRecipient.status)).tuples().all())
    reasons = dict(session.execute(select(CampaignExclusion.reason, func.count()).where(
        CampaignExclusion.campaign_id == campaign.id).group_by(CampaignExclusion.reason)).tuples().all())
    return {"status": campaign.status, "planned": campaign.planned_count, "excluded": campaign.excluded_count,
            "materialized": campaign.materialized_count, "plan_finished": campaign.plan_finished_at is not None,
            "recipients_by_status": counts, "exclusions_by_reason": reasons}
