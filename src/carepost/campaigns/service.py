"""Campaigns, the declarative part: create and change (every field validated, a 422 naming it),
the approval workflow and its state machine, the organization's approval rules, the calendar.

The pre-launch compliance report and the per-recipient legal facts (remuneration, refill drug)
live in :mod:`carepost.campaigns.report`; planning and sending in ``planning.py``/``tasks.py``.

States (docs/campaigns.md)::

    draft -> submitted -> approved -> scheduled -> planning -> sending -> completed
               |  \\-> rejected -> (edit) draft           \\-> paused -> (resume)
               any edit of an approved field -> draft      any live state -> cancelled

Approval is required (``approval_required``) by the organization's rules: a marketing purpose, a
sensitive segment, or every campaign when so configured. A submitter never approves their own
campaign. Compliance approves the fields of :data:`APPROVED_FIELDS`: their hash is kept
(``content_hash``), so an edit of one after approval returns the campaign to draft, and a launch
re-checks it.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from carepost.accounts.permissions import Permission
from carepost.campaigns.models import (
    CAMPAIGN_STATUSES,
    Campaign,
    CampaignEvent,
    CampaignExclusion,
    CampaignRecipient,
)
from carepost.core import clock, purposes
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from carepost.core.ids import is_id


# Fields compliance approves: a change of any of them after approval returns the campaign to draft.
APPROVED_FIELDS = ("purpose", "topic_id", "segment_id", "exclusion_segment_ids", "template_version_id",
                   "sending_domain_id", "from_address", "from_name", "security", "remuneration", "refill_drug",
                   "track_opens", "track_clicks", "ab_test")
SCHEDULE_FIELDS = ("schedule_kind", "send_at", "local_time", "local_date", "time_zone")
EDITABLE_FIELDS = ("name",) + APPROVED_FIELDS + SCHEDULE_FIELDS + ("throttle_per_hour", "throttle_per_domain_per_hour")

EDITABLE_STATES = ("draft", "submitted", "approved", "rejected", "scheduled")
LAUNCHABLE_STATES = ("draft", "approved", "scheduled")
LIVE_STATES = ("planning", "sending", "paused")
FINAL_STATES = ("completed", "cancelled")

# The organization's approval rules (kept in ``organizations.settings["campaigns"]``).
CAMPAIGN_SETTINGS_DEFAULTS: dict = {
    "approval_required_purposes": list(purposes.MARKETING_PURPOSES),
    "approval_required_for_sensitive_segments": True,
    "approval_required_for_all": False,
    "overlap_days": 7,  # the calendar warns when two sends reach the same patients within this many days
}
THROTTLE_MAX = 10_000_000
SCHEDULE_HORIZON = timedelta(days=400)
CALENDAR_FIRST, CALENDAR_LAST = date(2000, 1, 1), date(2200, 12, 31)
AB_TEST_MAX = 10_000  # bytes of JSON
HHMM = re.compile(r"([01]\d|2[0-3]):[0-5]\d")
DRUG = re.compile(r"[A-Za-z][A-Za-z0-9_-]{1,19}:[A-Za-z0-9][A-Za-z0-9.\-]{0,40}")
EMAIL = re.compile(r"[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
# Remuneration as a campaign declares it -> as consent's requirements() names it.
REMUNERATION_FOR_CONSENT = {"none": "none", "cost": "cost_related", "other": "above_cost"}


# --------------------------------------------------------------------------- who acts

def actor_of(principal) -> str:
    """The person (or, without one, the credential) acting: what submitted_by/approved_by hold."""
    return principal.user_id or principal.on_behalf_of or principal.actor_id


def _segment_actor(principal):
    from carepost.segments.service import Actor

    return Actor(principal.kind, principal.actor_id, frozenset(principal.permissions), principal.on_behalf_of, {})


# --------------------------------------------------------------------------- settings

def campaign_settings(session: Session, org_id: str) -> dict:
    from carepost.accounts.service import get_organization

    stored = (get_organization(session, org_id).settings or {}).get("campaigns") or {}
    return {**CAMPAIGN_SETTINGS_DEFAULTS, **stored}


def set_campaign_settings(session: Session, org_id: str, values: dict) -> dict:
    from carepost.accounts.service import get_organization

    cfg = campaign_settings(session, org_id)
    for key, value in values.items():
        if value is None:
            continue
        if key not in CAMPAIGN_SETTINGS_DEFAULTS:
            raise ValidationFailed("Unknown campaign setting.", field=key)
        if key == "approval_required_purposes":
            for i, p in enumerate(value):
                purposes.check_purpose(p, f"approval_required_purposes[{i}]")
            value = sorted(set(value))
        elif key == "overlap_days":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 90:
                raise ValidationFailed("Enter a number of days from 0 to 90.", field=key)
        elif not isinstance(value, bool):
            raise ValidationFailed("Enter true or false.", field=key)
        cfg[key] = value
    org = get_organization(session, org_id)
    org.settings = {**(org.settings or {}), "campaigns": cfg}
    session.flush()
    return cfg


def approval_needed(session: Session, org_id: str, purpose: str, segment_sensitive: bool) -> bool:
    cfg = campaign_settings(session, org_id)
    return bool(cfg["approval_required_for_all"] or purpose in cfg["approval_required_purposes"]
                or (segment_sensitive and cfg["approval_required_for_sensitive_segments"]))


# --------------------------------------------------------------------------- reading

def get_campaign(session: Session, org_id: str, campaign_id: str, field: str = "campaign_id") -> Campaign:
    row = session.get(Campaign, campaign_id) if isinstance(campaign_id, str) and is_id(campaign_id) else None
    if row is None or row.org_id != org_id:
        raise NotFound("No such campaign.", field=field)
    return row


def list_campaigns(session: Session, org_id: str, *, status: str | None = None, limit: int = 200) -> list[Campaign]:
    stmt = select(Campaign).where(Campaign.org_id == org_id)
    if status is not None:
        if status not in CAMPAIGN_STATUSES:
            raise ValidationFailed(f"status must be one of {', '.join(CAMPAIGN_STATUSES)}.", field="status")
        stmt = stmt.where(Campaign.status == status)
    return list(session.scalars(stmt.order_by(Campaign.created_at.desc(), Campaign.id).limit(max(1, min(limit, 1000)))))


def from_name(session: Session, row: Campaign) -> str | None:
    return get_keyring().decrypt_text(session, row.org_id, "campaigns", "from_name_enc", row.id, row.from_name_enc)


def _iso(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return clock.aware(value).isoformat()
    return value.isoformat()


def campaign_dict(session: Session, row: Campaign) -> dict:
    out = {key: getattr(row, key) for key in (
        "id", "name", "purpose", "topic_id", "segment_id", "template_id", "template_version_id", "sending_domain_id",
        "from_address", "security", "remuneration", "refill_drug", "schedule_kind", "local_time", "time_zone",
        "throttle_per_hour", "throttle_per_domain_per_hour", "track_opens", "track_clicks", "status",
        "approval_required", "submitted_by", "approved_by", "ab_test", "planned_count", "excluded_count",
        "materialized_count", "launched_by", "created_by")}
    out["exclusion_segment_ids"] = list(row.exclusion_segment_ids or [])
    out["from_name"] = from_name(session, row)
    for key in ("send_at", "local_date", "submitted_at", "approved_at", "plan_started_at", "plan_finished_at",
                "launched_at", "created_at", "updated_at"):
        out[key] = _iso(getattr(row, key))
    out["approval_current"] = bool(row.approved_at and row.content_hash == content_hash(session, row))
    return out


def events_of(session: Session, row: Campaign) -> list[dict]:
    keyring = get_keyring()
    rows = session.scalars(select(CampaignEvent).where(CampaignEvent.campaign_id == row.id)
                           .order_by(CampaignEvent.created_at, CampaignEvent.id))
    return [{"action": e.action, "actor": e.actor, "at": _iso(e.created_at),
             "comment": keyring.decrypt_text(session, e.org_id, "campaign_events", "comment_enc", e.id, e.comment_enc)}
            for e in rows]


# --------------------------------------------------------------------------- validation

def _refuse(exc: NotFound, field: str, what: str) -> ValidationFailed:
    return ValidationFailed(f"No such {what} in this organization.", field=field, code="unknown_reference")


def _check_id(value, field: str, what: str) -> str:
    if not isinstance(value, str) or not is_id(value):
        raise ValidationFailed(f"No such {what} in this organization.", field=field, code="unknown_reference")
    return value


def _segment(session: Session, org_id: str, segment_id: str, field: str):
    from carepost.segments.service import get_segment

    _check_id(segment_id, field, "segment")
    try:
        return get_segment(session, org_id, segment_id)
    except NotFound as exc:
        raise _refuse(exc, field, "segment") from None


def _zone(name: str | None, field: str = "time_zone") -> ZoneInfo | None:
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValidationFailed("Enter an IANA time zone such as America/Chicago.", field=field,
                               code="unknown_time_zone") from None


def org_time_zone(session: Session, org_id: str) -> str:
    from carepost.consent.service import consent_settings

    return consent_settings(session, org_id).get("default_time_zone") or "UTC"


def _check_schedule(session: Session, org_id: str, data: dict) -> None:
    """Normalize the schedule fields of ``data`` (all of them present) in place."""
    kind = data.get("schedule_kind") or "now"
    zone = _zone(data.get("time_zone"))
    now = clock.now()
    if kind == "now":
        data.update(send_at=None, local_time=None, local_date=None)
        return
    if kind == "at":
        at = data.get("send_at")
        if at is None:
            raise ValidationFailed("A send time is needed for a schedule at a time.", field="send_at")
        try:
            if at.tzinfo is None:
                at = at.replace(tzinfo=zone or ZoneInfo("UTC"))
            at = clock.aware(at.astimezone(ZoneInfo("UTC")))
        except (OverflowError, ValueError):
            raise ValidationFailed("Enter a send time within the next year.", field="send_at") from None
        if at <= now:
            raise ValidationFailed("The send time is in the past.", field="send_at", code="schedule_in_past")
        if at > now + SCHEDULE_HORIZON:
            raise ValidationFailed("Enter a send time within the next year.", field="send_at")
        data.update(send_at=at, local_time=None, local_date=None)
        return
    # "local": HH:MM on a day, in each recipient's zone (contacts without one: time_zone or the org's)
    hhmm, day = data.get("local_time"), data.get("local_date")
    if not isinstance(hhmm, str) or not HHMM.fullmatch(hhmm):
        raise ValidationFailed("Enter the local time as HH:MM (24-hour clock).", field="local_time")
    if day is None:
        raise ValidationFailed("A day is needed for a send at each recipient's local time.", field="local_date")
    fallback = zone or _zone(org_time_zone(session, org_id))
    if not now.date() - timedelta(days=2) <= day <= now.date() + SCHEDULE_HORIZON:
        raise ValidationFailed("Enter a day within the next year.", field="local_date",
                               code="schedule_in_past" if day < now.date() else None)
    wall = datetime.combine(day, time(int(hhmm[:2]), int(hhmm[3:])))
    if wall.replace(tzinfo=fallback) <= now:
        raise ValidationFailed("The local send time is in the past (in the organization's time zone).",
                               field="local_date", code="schedule_in_past")
    # The earliest instant any recipient can receive it (UTC+14): what the calendar orders by.
    data["send_at"] = clock.aware(wall.replace(tzinfo=ZoneInfo("Etc/GMT-14")).astimezone(ZoneInfo("UTC")))


def _check_throttle(value, field: str):
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= THROTTLE_MAX:
        raise ValidationFailed(f"Enter a whole number of messages per hour from 1 to {THROTTLE_MAX:,}, "
                               "or nothing for no limit.", field=field, code="bad_throttle")
    return value


def _segment_empty(session: Session, org_id: str, segment) -> bool:
    """Whether a segment selects nobody (evaluated by the system: no count is shown to anyone)."""
    from carepost.segments.service import SYSTEM, contact_ids

    return not contact_ids(session, org_id, {"type": "segment", "segment": segment.id}, SYSTEM, limit=1)


def _validate(session: Session, org_id: str, data: dict, changed: set[str]) -> dict:
    """Check every field of ``data`` (a full set of campaign values); return the derived values
    (template_id, segment sensitivity). Only ``changed`` references are looked up again."""
    from carepost.consent.service import get_topic
    from carepost.content.service import check_purpose_fit, get_version_by_id
    from carepost.delivery.service import sending_domain_by_id

    derived: dict = {}
    purposes.check_purpose(data["purpose"], "purpose")
    if data.get("remuneration") not in REMUNERATION_FOR_CONSENT:
        raise ValidationFailed("remuneration must be none, cost or other.", field="remuneration")
    purposes.requirements(data["purpose"], remuneration=REMUNERATION_FOR_CONSENT[data["remuneration"]])
    if data.get("topic_id"):
        try:
            get_topic(session, org_id, data["topic_id"], "topic_id", by_key=False)
        except NotFound as exc:
            raise _refuse(exc, "topic_id", "topic") from None
    seg = _segment(session, org_id, data["segment_id"], "segment_id")
    derived["segment_sensitive"] = bool(seg.sensitive)
    exclusions = data.get("exclusion_segment_ids") or []
    if len(set(exclusions)) != len(exclusions):
        raise ValidationFailed("An exclusion segment is named twice.", field="exclusion_segment_ids")
    for i, ex in enumerate(exclusions):
        field = f"exclusion_segment_ids[{i}]"
        if ex == data["segment_id"]:
            raise ValidationFailed("The audience segment cannot also be an exclusion segment.", field=field)
        _segment(session, org_id, ex, field)
    if "segment_id" in changed and _segment_empty(session, org_id, seg):
        raise ValidationFailed("The segment selects no contact.", field="segment_id", code="empty_segment")
    _check_id(data["template_version_id"], "template_version_id", "template version")
    try:
        version = get_version_by_id(session, org_id, data["template_version_id"])
    except NotFound as exc:
        raise _refuse(exc, "template_version_id", "template version") from None
    derived["template_id"] = version.template_id
    check_purpose_fit(session, org_id, version.id, data["purpose"], field="template_version_id")
    if data.get("sending_domain_id"):
        _check_id(data["sending_domain_id"], "sending_domain_id", "sending domain")
        try:
            domain = sending_domain_by_id(session, data["sending_domain_id"])
        except NotFound as exc:
            raise _refuse(exc, "sending_domain_id", "sending domain") from None
    else:
        domain = None
    addr = data.get("from_address")
    if addr:
        if not EMAIL.fullmatch(addr):
            raise ValidationFailed("Enter the sender address as name@domain.", field="from_address")
        host = addr.rsplit("@", 1)[1].lower()
        if domain is not None and not (host == domain.domain or host.endswith("." + domain.domain)):
            raise ValidationFailed("The sender address is not under the sending domain.", field="from_address")
    drug = data.get("refill_drug")
    if data["purpose"] == "refill_reminder" and not drug:
        raise ValidationFailed("A refill reminder names the drug (e.g. rxnorm:197361): planning decides per patient "
                               "whether the prescription is current.", field="refill_drug")
    if drug is not None:
        if data["purpose"] != "refill_reminder":
            raise ValidationFailed("Only a refill reminder names a drug.", field="refill_drug")
        if not DRUG.fullmatch(drug):
            raise ValidationFailed("Enter the drug as system:code, e.g. rxnorm:197361.", field="refill_drug")
        data["refill_drug"] = drug.split(":", 1)[0].lower() + ":" + drug.split(":", 1)[1]
    _check_throttle(data.get("throttle_per_hour"), "throttle_per_hour")
    _check_throttle(data.get("throttle_per_domain_per_hour"), "throttle_per_domain_per_hour")
    if data.get("ab_test") is not None:
        if not isinstance(data["ab_test"], dict):
            raise ValidationFailed("The A/B test settings are an object.", field="ab_test")
        dumped = json.dumps(data["ab_test"])
        if len(dumped) > AB_TEST_MAX or "\\u0000" in dumped:
            raise ValidationFailed(f"The A/B test settings are at most {AB_TEST_MAX:,} bytes of plain JSON.",
                                   field="ab_test")
        from carepost.campaigns import ab_tests

        data["ab_test"] = ab_tests.validate(session, org_id, data["ab_test"], purpose=data["purpose"],
                                            template_id=version.template_id)
    if changed & set(SCHEDULE_FIELDS):
        _check_schedule(session, org_id, data)
    return derived


def _values_of(session: Session, row: Campaign) -> dict:
    out = {key: getattr(row, key) for key in EDITABLE_FIELDS if key != "from_name"}
    out["from_name"] = from_name(session, row)
    out["exclusion_segment_ids"] = list(row.exclusion_segment_ids or [])
    return out


def _hash_values(values: dict) -> str:
    approved = {key: values.get(key) for key in APPROVED_FIELDS}
    return hashlib.sha256(json.dumps(approved, sort_keys=True, default=str).encode()).hexdigest()


def content_hash(session: Session, row: Campaign) -> str:
    """The SHA-256 of the approved fields as they are now."""
    return _hash_values(_values_of(session, row))


def _event(session: Session, row: Campaign, action: str, actor: str | None, comment: str | None = None) -> None:
    from carepost.core.ids import new_id

    ev = CampaignEvent(id=new_id(), org_id=row.org_id, campaign_id=row.id, action=action, actor=actor,
                       created_at=clock.now())
    if comment:
        ev.comment_enc = get_keyring().encrypt(session, row.org_id, "campaign_events", "comment_enc", ev.id, comment)
    session.add(ev)


def _store(session: Session, row: Campaign, data: dict, derived: dict) -> None:
    for key in EDITABLE_FIELDS:
        if key == "from_name":
            continue
        setattr(row, key, data.get(key))
    row.exclusion_segment_ids = list(data.get("exclusion_segment_ids") or [])
    row.from_name_enc = (get_keyring().encrypt(session, row.org_id, "campaigns", "from_name_enc", row.id, data["from_name"])
                         if data.get("from_name") else None)
    row.template_id = derived["template_id"]
    row.approval_required = approval_needed(session, row.org_id, row.purpose, derived["segment_sensitive"])


# --------------------------------------------------------------------------- create, change, delete

def create_campaign(session: Session, org_id: str, values, principal) -> Campaign:
    from carepost.core.ids import new_id

    data = values.model_dump() if hasattr(values, "model_dump") else dict(values)
    for key in EDITABLE_FIELDS:
        data.setdefault(key, None)
    data.setdefault("remuneration", "none")
    data["remuneration"] = data["remuneration"] or "none"
    data["schedule_kind"] = data.get("schedule_kind") or "now"
    data["exclusion_segment_ids"] = data.get("exclusion_segment_ids") or []
    for key in ("track_opens", "track_clicks"):
        data[key] = True if data.get(key) is None else data[key]
    derived = _validate(session, org_id, data, set(EDITABLE_FIELDS))
    row = Campaign(id=new_id(), org_id=org_id, status="draft", created_by=actor_of(principal), created_at=clock.now(),
                   updated_at=clock.now())
    _store(session, row, data, derived)
    session.add(row)
    session.flush()
    _event(session, row, "created", actor_of(principal))
    return row


def update_campaign(session: Session, row: Campaign, values, principal) -> Campaign:
    """Change fields; an approved field changed after submission or approval returns the
    campaign to draft (its approval is void)."""
    changes = values.model_dump(exclude_unset=True) if hasattr(values, "model_dump") else dict(values)
    if row.status not in EDITABLE_STATES:
        raise Conflict(f"A campaign that is {row.status} cannot be edited.", field="status", code="not_editable")
    for key in changes:
        if key not in EDITABLE_FIELDS:
            raise ValidationFailed("Unknown campaign field.", field=key)
    for key in ("name", "purpose", "segment_id", "template_version_id", "remuneration", "schedule_kind",
                "exclusion_segment_ids", "track_opens", "track_clicks"):
        if key in changes and changes[key] is None:
            raise ValidationFailed("This field cannot be emptied.", field=key)
    before = _values_of(session, row)
    data = {**before, **changes}
    changed = {k for k in changes if changes[k] != before.get(k)}
    if changed & {"schedule_kind"} or (changed & set(SCHEDULE_FIELDS)):
        changed |= set(SCHEDULE_FIELDS)
    if not changed:
        return row
    derived = _validate(session, row.org_id, data, changed)
    _store(session, row, data, derived)
    actor = actor_of(principal)
    _event(session, row, "updated", actor)
    if row.status != "draft" and changed & set(APPROVED_FIELDS):
        _return_to_draft(session, row, actor)
    row.updated_at = clock.now()
    session.flush()
    return row


def _return_to_draft(session: Session, row: Campaign, actor: str | None, comment: str | None = None) -> None:
    row.status = "draft"
    row.submitted_by = row.submitted_at = row.approved_by = row.approved_at = None
    row.content_hash = None
    _event(session, row, "returned_to_draft", actor, comment)


def delete_campaign(session: Session, row: Campaign) -> None:
    if row.status not in ("draft", "rejected"):
        raise Conflict(f"Only a draft can be deleted; this campaign is {row.status} (cancel it instead).",
                       field="status", code="not_draft")
    session.execute(delete(CampaignEvent).where(CampaignEvent.campaign_id == row.id))
    session.delete(row)
    session.flush()


# --------------------------------------------------------------------------- the workflow

def _require_state(row: Campaign, allowed: tuple[str, ...], action: str) -> None:
    if row.status not in allowed:
        raise Conflict(f"A campaign that is {row.status} cannot be {action} (it must be "
                       f"{' or '.join(allowed)}).", field="status", code="illegal_transition")


def _check_complete(row: Campaign) -> None:
    """What a campaign needs before it is submitted or launched (a draft may lack it)."""
    if not row.from_address:
        raise ValidationFailed("A campaign needs a sender address (from_address) before it is submitted or "
                               "launched.", field="from_address", code="incomplete")


def submit(session: Session, row: Campaign, principal, comment: str = "") -> Campaign:
    _require_state(row, ("draft", "rejected"), "submitted")
    _check_complete(row)
    data = _values_of(session, row)
    derived = _validate(session, row.org_id, data, {"segment_id"})  # references may have gone meanwhile
    row.approval_required = approval_needed(session, row.org_id, row.purpose, derived["segment_sensitive"])
    row.status = "submitted"
    row.submitted_by, row.submitted_at = actor_of(principal), clock.now()
    row.approved_by = row.approved_at = row.content_hash = None
    _event(session, row, "submitted", actor_of(principal), comment or None)
    session.flush()
    return row


def approve(session: Session, row: Campaign, principal, comment: str = "") -> Campaign:
    if not principal.can(Permission.CAMPAIGNS_APPROVE):
        raise PermissionDenied("Approving a campaign needs campaigns:approve.", field="campaign_id")
    _require_state(row, ("submitted",), "approved")
    actor = actor_of(principal)
    if actor in (row.submitted_by,):
        raise PermissionDenied("The person who submitted a campaign cannot approve it.", field="approved_by",
                               code="self_approval")
    row.status = "approved"
    row.approved_by, row.approved_at = actor, clock.now()
    row.content_hash = content_hash(session, row)
    _event(session, row, "approved", actor, comment or None)
    session.flush()
    return row


def reject(session: Session, row: Campaign, principal, comment: str) -> Campaign:
    if not principal.can(Permission.CAMPAIGNS_APPROVE):
        raise PermissionDenied("Rejecting a campaign needs campaigns:approve.", field="campaign_id")
    _require_state(row, ("submitted",), "rejected")
    if not (comment or "").strip():
        raise ValidationFailed("Say why the campaign is rejected.", field="comment")
    actor = actor_of(principal)
    if actor == row.submitted_by:
        raise PermissionDenied("The person who submitted a campaign cannot review it.", field="approved_by",
                               code="self_approval")
    row.status = "rejected"
    row.approved_by = row.approved_at = row.content_hash = None
    _event(session, row, "rejected", actor, comment.strip())
    session.flush()
    return row


def _approval_valid(session: Session, row: Campaign) -> bool:
    return bool(row.approved_at and row.content_hash and row.content_hash == content_hash(session, row))


def schedule(session: Session, row: Campaign, values, principal) -> Campaign:
    """Set (or confirm) the schedule and mark the campaign scheduled; it still waits for launch
    and for approval when approval is required. A schedule change voids no approval."""
    _require_state(row, ("draft", "approved", "scheduled"), "scheduled")
    changes = values.model_dump(exclude_unset=True) if hasattr(values, "model_dump") else dict(values)
    data = _values_of(session, row)
    data.update(changes)
    _check_schedule(session, row.org_id, data)
    for key in SCHEDULE_FIELDS:
        setattr(row, key, data.get(key))
    if row.status != "draft":
        row.status = "scheduled"
    _event(session, row, "scheduled", actor_of(principal))
    session.flush()
    return row


def launch(session: Session, row: Campaign, principal) -> Campaign:
    """Approved (when required) and complete -> ``planning``. The caller commits, then calls
    :func:`start_work` (the task must see the committed state)."""
    _require_state(row, LAUNCHABLE_STATES, "launched")
    _check_complete(row)
    data = _values_of(session, row)
    derived = _validate(session, row.org_id, data, {"segment_id"})
    row.approval_required = approval_needed(session, row.org_id, row.purpose, derived["segment_sensitive"]) \
        or row.approval_required
    if row.approval_required and not _approval_valid(session, row):
        raise Conflict("This campaign needs approval by compliance before it can be launched.", field="status",
                       code="approval_required")
    if row.schedule_kind in ("at", "local") and row.send_at is not None and clock.aware(row.send_at) <= clock.now() \
            and row.schedule_kind == "at":
        raise ValidationFailed("The send time is in the past; schedule it again.", field="send_at",
                               code="schedule_in_past")
    row.status = "planning"
    row.launched_by, row.launched_at = actor_of(principal), clock.now()
    if row.schedule_kind == "now":
        row.send_at = row.launched_at
    _event(session, row, "launched", actor_of(principal))
    session.flush()
    return row


def start_work(org_id: str, campaign_id: str, status: str) -> None:
    """Queue what a launched or resumed campaign needs next — planning (``planning``) or sending
    (``sending``): ``campaigns.tasks.resume_work``, tasks of ids only. Call after the state change
    is committed (the task must see it)."""
    from carepost.campaigns.tasks import resume_work  # tasks import this module

    resume_work(org_id, campaign_id, status)


def pause(session: Session, row: Campaign, principal) -> Campaign:
    _require_state(row, ("planning", "sending"), "paused")
    row.status = "paused"
    _event(session, row, "paused", actor_of(principal))
    session.flush()
    return row


def resume(session: Session, row: Campaign, principal) -> Campaign:
    """Paused -> sending (or planning again when the plan had not finished; the caller then
    commits and calls :func:`start_work`; planning resumes from its cursor)."""
    _require_state(row, ("paused",), "resumed")
    row.status = "sending" if row.plan_finished_at else "planning"
    _event(session, row, "resumed", actor_of(principal))
    session.flush()
    return row


def cancel(session: Session, row: Campaign, principal, comment: str = "") -> Campaign:
    if row.status in FINAL_STATES:
        raise Conflict(f"A campaign that is {row.status} cannot be cancelled.", field="status",
                       code="illegal_transition")
    row.status = "cancelled"
    session.execute(update(CampaignRecipient).where(CampaignRecipient.org_id == row.org_id,
                                                    CampaignRecipient.campaign_id == row.id,
                                                    CampaignRecipient.status.in_(("planned", "awaiting")))
                    .values(status="cancelled"))
    _event(session, row, "cancelled", actor_of(principal), comment or None)
    session.flush()
    return row


def mark_completed(session: Session, row: Campaign) -> Campaign:
    """For planning and sending: every recipient is materialized and sent (or excluded)."""
    _require_state(row, ("sending", "planning"), "completed")
    row.status = "completed"
    _event(session, row, "completed", None)
    session.flush()
    return row


# --------------------------------------------------------------------------- progress

SENT_STATUSES = ("sent", "delivered", "portal_viewed")
PENDING_STATUSES = ("queued", "deferred")  # message recipient statuses without a final outcome yet

def progress(session: Session, row: Campaign) -> dict:
    """Counts after launch: recipients by status, exclusions by reason, messages by delivery status.

    Reads delivery's message tables directly: one grouped count over the campaign's messages
    (set-based; a service call per message could not give it)."""
    from carepost.delivery.models import Message, MessageRecipient

    recipients = dict(session.execute(
        select(CampaignRecipient.status, func.count()).where(CampaignRecipient.org_id == row.org_id,
                                                             CampaignRecipient.campaign_id == row.id)
        .group_by(CampaignRecipient.status)).all())
    exclusions = dict(session.execute(
        select(CampaignExclusion.reason, func.count()).where(CampaignExclusion.org_id == row.org_id,
                                                             CampaignExclusion.campaign_id == row.id)
        .group_by(CampaignExclusion.reason)).all())
    delivery = dict(session.execute(
        select(MessageRecipient.status, func.count()).join(Message, Message.id == MessageRecipient.message_id)
        .where(Message.org_id == row.org_id, Message.campaign_id == row.id, MessageRecipient.org_id == row.org_id)
        .group_by(MessageRecipient.status)).all())
    return {"status": row.status, "planned": row.planned_count, "excluded": row.excluded_count,
            "materialized": row.materialized_count, "recipients": recipients, "exclusions": exclusions,
            "messages": delivery, "sent": sum(v for k, v in delivery.items() if k in SENT_STATUSES),
            "finished": sum(v for k, v in delivery.items() if k not in PENDING_STATUSES),
            "plan_started_at": _iso(row.plan_started_at), "plan_finished_at": _iso(row.plan_finished_at)}


# --------------------------------------------------------------------------- calendar

def calendar(session: Session, org_id: str, start: date, end: date, principal, *, overlap_days: int | None = None,
             time_zone: str | None = None) -> dict:
    """Campaigns whose send falls on a day in [start, end] — days of ``time_zone`` (UTC by
    default; a local-time send is on its ``local_date``) —, and a warning for each pair that
    reaches the same patients within ``overlap_days`` (the organization's setting by default).

    Overlap is counted in SQL, one statement per pair: two planned campaigns by joining their
    recipient rows; otherwise the audience predicates (segment minus exclusions) of both, or one
    predicate against the other's recipient rows. Counts 1..10 are shown as "fewer than 11" to a
    viewer without ``phi:read_unmasked``, and a sensitive audience's overlap only as a warning."""
    from carepost.campaigns.report import audience_predicate
    from carepost.patients.models import Contact
    from carepost.segments.service import present_count

    for name, value in (("start", start), ("end", end)):
        if not CALENDAR_FIRST <= value <= CALENDAR_LAST:
            raise ValidationFailed(f"Enter a day from {CALENDAR_FIRST.year} to {CALENDAR_LAST.year}.", field=name)
    if end < start:
        raise ValidationFailed("The end is before the start.", field="end")
    if (end - start).days > 366:
        raise ValidationFailed("Ask for at most a year at a time.", field="end")
    days = campaign_settings(session, org_id)["overlap_days"] if overlap_days is None else overlap_days
    if isinstance(days, bool) or not isinstance(days, int) or not 0 <= days <= 90:
        raise ValidationFailed("Enter a number of days from 0 to 90.", field="overlap_days")
    try:
        zone = ZoneInfo(time_zone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationFailed("Unknown time zone.", field="time_zone") from None
    utc = ZoneInfo("UTC")  # SQLite keeps the wall time of what it is given: compare in UTC
    lo = datetime.combine(start, time.min).replace(tzinfo=zone).astimezone(utc)
    hi = datetime.combine(end + timedelta(days=1), time.min).replace(tzinfo=zone).astimezone(utc)
    margin = timedelta(days=days + 1)  # a local-time send is stored at its earliest instant (UTC+14)
    rows = list(session.scalars(
        select(Campaign).where(Campaign.org_id == org_id, Campaign.send_at.is_not(None),
                               Campaign.status.not_in(("cancelled", "rejected")),
                               Campaign.send_at >= lo - margin, Campaign.send_at < hi + margin)
        .order_by(Campaign.send_at, Campaign.id)))

    def day_of(r: Campaign) -> date:
        if r.schedule_kind == "local" and r.local_date:
            return r.local_date
        return clock.aware(r.send_at).astimezone(zone).date()

    shown = [r for r in rows if start <= day_of(r) <= end]
    actor = _segment_actor(principal)
    unmasked = actor.unmasked
    planned = {cid for (cid,) in session.execute(
        select(CampaignRecipient.campaign_id).where(CampaignRecipient.org_id == org_id,
                                                    CampaignRecipient.campaign_id.in_([r.id for r in rows]))
        .distinct())} if rows else set()
    preds: dict[str, tuple] = {}

    def pred(row: Campaign):
        if row.id not in preds:
            preds[row.id] = audience_predicate(session, org_id, row)
        return preds[row.id]

    def members(row: Campaign):
        return select(CampaignRecipient.contact_id).where(CampaignRecipient.org_id == org_id,
                                                         CampaignRecipient.campaign_id == row.id,
                                                         CampaignRecipient.status != "held_out")

    warnings = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a not in shown and b not in shown:
                continue
            gap = abs(clock.aware(b.send_at) - clock.aware(a.send_at))
            if gap > timedelta(days=days):
                continue
            if a.id in planned and b.id in planned:
                other = members(b).subquery()
                n = session.scalar(select(func.count()).select_from(CampaignRecipient).join(
                    other, other.c.contact_id == CampaignRecipient.contact_id).where(
                    CampaignRecipient.org_id == org_id, CampaignRecipient.campaign_id == a.id,
                    CampaignRecipient.status != "held_out"))
                sensitive = False
            else:
                clauses, sensitive = [], False
                for row in (a, b):
                    if row.id in planned:
                        clauses.append(Contact.id.in_(members(row)))
                    else:
                        predicate, is_sensitive = pred(row)
                        if predicate is None:
                            clauses = None
                            break
                        clauses.append(predicate)
                        sensitive = sensitive or is_sensitive
                if clauses is None:
                    continue
                n = session.scalar(select(func.count(Contact.id)).where(Contact.org_id == org_id, *clauses))
            n = int(n or 0)
            if not n:
                continue
            warning = {"campaigns": [a.id, b.id], "names": [a.name, b.name],
                       "days_apart": round(gap.total_seconds() / 86400, 1)}
            if sensitive and not unmasked:
                warning["overlap"] = "hidden (sensitive segment)"
            else:
                warning["overlap"] = present_count(n, actor)
            warnings.append(warning)
    return {"start": start.isoformat(), "end": end.isoformat(), "overlap_days": days,
            "time_zone": zone.key,
            "campaigns": [{"id": r.id, "name": r.name, "status": r.status, "purpose": r.purpose,
                           "send_at": _iso(r.send_at), "schedule_kind": r.schedule_kind, "segment_id": r.segment_id,
                           "day": day_of(r).isoformat(),
                           "time": r.local_time if r.schedule_kind == "local" and r.local_time
                           else clock.aware(r.send_at).astimezone(zone).strftime("%H:%M")}
                          for r in shown],
            "overlaps": warnings}
