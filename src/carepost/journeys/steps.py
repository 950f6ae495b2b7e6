"""What each step type does, for a whole group of runs at once (the engine groups a chunk's runs
by version and step). Every function returns ``{run id: Outcome}`` and writes in the caller's
transaction only; nothing here commits.

* ``send`` — eligibility first, set-wise, with campaigns' own function
  (``campaigns.planning.eligibility``: consent's ``check_eligibility`` for the journey's purpose
  and topic, plus the postal-address rule for commercial messages), so a journey refuses exactly
  what a campaign would, with the same reason codes. Eligible contacts get the template version
  rendered for them (``content.render_for_contacts``) and the messages are stored through
  delivery's ``store_messages`` (``source="journey"``; the delivery pipeline checks eligibility
  again when it sends, and defers for quiet hours). The secure mode is the organization's (a
  message with PHI never goes below ``tls_required``), as campaigns decide it. From:
  ``no-reply@`` the organization's notice sending domain, with the template's from-name.

  **An excluded send** is recorded on the run's step row (``status="excluded"``, ``reason`` the
  reason code). Then: ``frequency_cap`` — the run goes on to the next step (the cap is about
  this moment, not the patient's wishes); every other reason ends the run: ``unsubscribed_topic``
  and ``unsubscribed_all`` as ``exited``/``unsubscribe``, ``authorization_revoked`` as
  ``exited``/``revocation``, the rest (deceased, no authorization, suppressed address, no
  address...) as ``exited``/``failed:<code>``.
* ``wait`` / ``wait_until`` / ``wait_event`` — park the run (``wake_at``); ``wait_until`` in the
  contact's time zone; ``wait_event`` waits for the named event (``entries.on_contact_event``
  moves it on) or takes ``timeout_next`` at the timeout.
* ``branch`` — cases in order, first match wins, else ``default``: an attribute (the segment
  language's field criterion, compiled once for the group), segment membership, or engagement by
  a human with the message an earlier send step of the same run sent (tracking's classified
  opens and clicks; ``converted``: a goal event attributed to that message).
* ``split`` — deterministic: SHA-256 of (run, step) into the weights; the variant is kept on
  the run (``variants``) and on the step row.
* ``update`` — a contact field (care stage, preferred language, time zone, custom attribute)
  through patients' service, or a topic subscription through consent's; audited as the system.
* ``notify`` — the ``account.notice`` event (kind ``journey_notice``) to the person or to every
  member with the role: the notice's fixed text and a link with the journey id; no contact id.
* ``webhook`` — tracking's ``emit`` of ``journey.step`` (ids only) to the organization's
  endpoints that take it.
* ``exit`` — the run completes (``exit_step``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.ids import new_id  # noqa: F401 - the engine takes it from here
from carepost.core.logging import get_logger
from carepost.journeys.models import step_key

log = get_logger("carepost.journeys.steps")

UTC = ZoneInfo("UTC")
CONTINUE_REASONS = ("frequency_cap",)
EXIT_REASON_OF = {"unsubscribed_topic": "unsubscribe", "unsubscribed_all": "unsubscribe",
                  "authorization_revoked": "revocation"}
SEGMENT_OPS = {"eq": "=", "ne": "!=", "in": "in", "not_in": "not in", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
               "is_empty": "is empty", "is_not_empty": "is not empty"}


@dataclass
class Outcome:
    kind: str  # next | wait | end
    status: str = "done"
    reason: str | None = None
    next_step: str | None = None
    wake_at: datetime | None = None
    waiting_event: str | None = None
    state: str | None = None
    exit_reason: str | None = None
    message_id: str | None = None

    @classmethod
    def go(cls, next_step: str, **kw) -> Outcome:
        return cls("next", next_step=next_step, **kw)

    @classmethod
    def park(cls, next_step: str, wake_at: datetime, **kw) -> Outcome:
        return cls("wait", next_step=next_step, wake_at=wake_at, **kw)

    @classmethod
    def end(cls, state: str, exit_reason: str, **kw) -> Outcome:
        return cls("end", state=state, exit_reason=exit_reason, **kw)


@dataclass
class Context:
    session: Session
    org_id: str
    now: datetime
    message_ids: list[str] = field(default_factory=list)
    excluded: int = 0
    _zones: dict = field(default_factory=dict)
    _default_zone: ZoneInfo | None = None
    _versions: dict = field(default_factory=dict)

    def default_zone(self) -> ZoneInfo:
        if self._default_zone is None:
            from carepost.consent.service import consent_settings

            self._default_zone = zone(consent_settings(self.session, self.org_id).get("default_time_zone"), UTC)
        return self._default_zone


def zone(name: str | None, default: ZoneInfo) -> ZoneInfo:
    if not name:
        return default
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return default


def execute(ctx: Context, definition: dict, version_id: str, step_id: str, step: dict, runs: list) -> dict[str, Outcome]:
    """Run one step for a group of runs; a step that fails (a template removed since publishing,
    a contact field the organization no longer has) fails those runs (``failed:<code>``), never
    the chunk: its writes are rolled back to a savepoint."""
    handler = HANDLERS.get(step.get("type"))
    if handler is None:
        return {r.id: Outcome.end("failed", "failed:unknown_step") for r in runs}
    try:
        with ctx.session.begin_nested():
            return handler(ctx, definition, version_id, step_id, step, runs)
    except Exception as exc:  # noqa: BLE001 - one broken step must not stop every other run of the chunk
        code = getattr(exc, "code", None) or type(exc).__name__
        log.warning("journey_step_failed", step_type=step.get("type"), error_type=type(exc).__name__,
                    runs_count=len(runs))
        return {r.id: Outcome.end("failed", f"failed:{code}"[:40], status="failed", reason=str(code)[:64])
                for r in runs}


# --------------------------------------------------------------------------- waits


def _duration(text) -> timedelta:
    from carepost.journeys.schemas import parse_duration

    return parse_duration(text)


def step_wait(ctx, definition, version_id, step_id, step, runs):
    wake = ctx.now + _duration(step["duration"])
    return {r.id: Outcome.park(step["next"], wake) for r in runs}


def contact_zones(ctx: Context, contact_ids: list[str]) -> dict[str, ZoneInfo]:
    from carepost.patients.models import Contact

    default = ctx.default_zone()
    missing = [c for c in contact_ids if c not in ctx._zones]
    for i in range(0, len(missing), 1000):
        for cid, tz in ctx.session.execute(select(Contact.id, Contact.time_zone).where(
                Contact.org_id == ctx.org_id, Contact.id.in_(missing[i:i + 1000]))):
            ctx._zones[cid] = zone(tz, default)
    return {c: ctx._zones.get(c, default) for c in contact_ids}


def next_local_time(now: datetime, tz: ZoneInfo, hhmm: str, weekdays) -> datetime:
    """The first instant at or after ``now`` that is ``hhmm`` on one of ``weekdays`` (1 = Monday)
    in ``tz``, in UTC."""
    hh, mm = (int(x) for x in hhmm.split(":"))
    days = set(weekdays or range(1, 8))
    local = clock.aware(now).astimezone(tz)
    for add in range(8):
        day = (local + timedelta(days=add)).date()
        if day.isoweekday() not in days:
            continue
        at = datetime.combine(day, time(hh, mm), tzinfo=tz)
        if at >= local:
            return at.astimezone(UTC)
    return (local + timedelta(days=7)).astimezone(UTC)


def step_wait_until(ctx, definition, version_id, step_id, step, runs):
    zones = contact_zones(ctx, [r.contact_id for r in runs])
    out = {}
    for r in runs:
        at = next_local_time(ctx.now, zones[r.contact_id], step["time"], step.get("weekdays"))
        out[r.id] = Outcome.park(step["next"], at) if at > ctx.now else Outcome.go(step["next"])
    return out


def step_wait_event(ctx, definition, version_id, step_id, step, runs):
    out = {}
    for r in runs:
        if r.waiting_event:  # woken while still waiting: the timeout passed
            out[r.id] = Outcome.go(step["timeout_next"], reason="timeout")
        else:
            out[r.id] = Outcome.park(step_id, ctx.now + _duration(step["timeout"]), waiting_event=step["event"],
                                     reason="waiting")
    return out


# --------------------------------------------------------------------------- send


def _sender(ctx: Context, contains_phi: bool):
    cached = ctx._versions.get(("sender", contains_phi))
    if cached is not None:
        return cached
    from carepost.delivery import policy
    from carepost.delivery.domains import notice_sending_domain
    from carepost.delivery.mime import parse_address
    from carepost.delivery.settings import delivery_settings

    domain = notice_sending_domain(ctx.session, ctx.org_id)
    if domain is None:
        raise _StepError("no_sending_domain")
    org = delivery_settings(ctx.session, ctx.org_id)
    mode = policy.effective_mode(org["security_mode"], None)
    if contains_phi and mode == "opportunistic":
        mode = "tls_required"  # the least mode PHI may travel in (as delivery.messages does)
    address = parse_address(f"no-reply@{domain.domain}", field_name="from")
    ctx._versions[("sender", contains_phi)] = (address, domain, mode)
    return address, domain, mode


class _StepError(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def _template_version(ctx: Context, template_id: str, number: int):
    key = ("template", template_id, number)
    if key not in ctx._versions:
        from carepost.content import service as content

        template = content.get_template(ctx.session, ctx.org_id, template_id)
        ctx._versions[key] = content.get_version(ctx.session, template, number)
    return ctx._versions[key]


def send_eligibility(ctx: Context, definition: dict, contact_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Campaigns' eligibility for the journey's purpose and topic (``campaigns.planning``)."""
    from carepost.campaigns import planning

    shape = SimpleNamespace(purpose=definition.get("purpose") or "treatment", topic_id=definition.get("topic_id"),
                            refill_drug=None, remuneration="none")
    return planning.eligibility(ctx.session, ctx.org_id, shape, contact_ids, at=ctx.now)


def step_send(ctx, definition, version_id, step_id, step, runs):
    from carepost.campaigns.sending import primary_addresses
    from carepost.content import service as content
    from carepost.core.errors import ValidationFailed
    from carepost.delivery.messages import PreparedMessage, store_messages
    from carepost.delivery.mime import parse_address

    cids = sorted({r.contact_id for r in runs})
    verdicts, purpose_of = send_eligibility(ctx, definition, cids)
    out: dict[str, Outcome] = {}
    eligible = [r for r in runs if verdicts.get(r.contact_id) == "eligible"]
    for r in runs:
        if verdicts.get(r.contact_id) == "eligible":
            continue
        reason = verdicts.get(r.contact_id) or "no_address"
        out[r.id] = _excluded(step, reason)
    if not eligible:
        ctx.excluded += len(out)
        return out
    version = _template_version(ctx, step["template_id"], int(step["template_version"]))
    contacts = sorted({r.contact_id for r in eligible})
    rendered = content.render_for_contacts(ctx.session, ctx.org_id, version, contacts)
    addresses = primary_addresses(ctx.session, ctx.org_id, contacts)
    prepared, owners = [], []
    jkey = step_key(version_id, step_id)
    for r in eligible:
        body, address = rendered.get(r.contact_id), addresses.get(r.contact_id)
        to = None
        if body is not None and address is not None:
            try:
                to = parse_address(address, allow_display_name=False)
            except ValidationFailed:
                to = None
        if to is None:
            out[r.id] = _excluded(step, "no_address" if address is None else "invalid_address")
            continue
        sender, domain, security = _sender(ctx, bool(body.contains_phi))
        sender = type(sender)(sender.local, sender.domain, (version.from_name or "").strip())
        prepared.append(PreparedMessage(
            sender=sender, sending_domain=domain, recipients=[("to", to)], reply_to=None, subject=body.subject,
            html=body.html or None, text=body.text or None, attachments=[], headers={},
            purpose=purpose_of.get(r.contact_id) or definition.get("purpose") or "treatment", security=security,
            contains_phi=body.contains_phi, tags=[], portal=None, request_hash="", topic_id=definition.get("topic_id"),
            track_opens=True, track_clicks=True, template_id=version.template_id, template_version_id=version.id,
            journey_step_id=jkey))
        owners.append(r)
    keys = [f"journey:{r.id}:{step_id}:{r.seq + 1}" for r in owners]
    messages = store_messages(ctx.session, ctx.org_id, prepared, source="journey", created_by=None,
                              idempotency_keys=keys) if prepared else []
    for r, m in zip(owners, messages):
        out[r.id] = Outcome.go(step["next"], status="sent", message_id=m.id)
        ctx.message_ids.append(m.id)
    ctx.excluded += sum(1 for o in out.values() if o.status == "excluded")
    return out


def _excluded(step: dict, reason: str) -> Outcome:
    if reason in CONTINUE_REASONS:
        return Outcome.go(step["next"], status="excluded", reason=reason)
    return Outcome.end("exited", EXIT_REASON_OF.get(reason, f"failed:{reason}")[:40], status="excluded", reason=reason)


# --------------------------------------------------------------------------- branch and split


def _attribute_members(ctx: Context, cond: dict, contact_ids: list[str]) -> set[str]:
    from carepost.patients.models import Contact
    from carepost.segments import compiler, language

    node = {"type": "field", "field": cond["field"], "op": SEGMENT_OPS[cond["op"]]}
    if cond["op"] not in ("is_empty", "is_not_empty"):
        node["value"] = cond.get("value")
    tree = language.validate(node)
    stmt = compiler.compile_query(ctx.session, ctx.org_id, tree, ctx.now).statement
    return set(ctx.session.scalars(stmt.where(Contact.org_id == ctx.org_id, Contact.id.in_(contact_ids))))


def segment_members(ctx: Context, segment_id: str, contact_ids: list[str]) -> set[str]:
    from carepost.patients.models import Contact
    from carepost.segments import compiler
    from carepost.segments import service as segments
    from carepost.segments.models import SegmentMember

    seg = segments.get_segment(ctx.session, ctx.org_id, segment_id)
    if seg.kind == "snapshot":
        return set(ctx.session.scalars(select(SegmentMember.contact_id).where(
            SegmentMember.segment_id == seg.id, SegmentMember.contact_id.in_(contact_ids))))
    stmt = compiler.compile_query(ctx.session, ctx.org_id, segments.read_query(seg.query), ctx.now,
                                  segment_id=seg.id).statement
    return set(ctx.session.scalars(stmt.where(Contact.org_id == ctx.org_id, Contact.id.in_(contact_ids))))


def _engagement(ctx: Context, cond: dict, runs: list) -> set[str]:
    """Run ids whose message from send step ``cond["step"]`` meets ``cond["is"]``: opened or
    clicked by a human (tracking's classes: proxies and scanners do not count), not opened, or
    converted (a goal event attributed to it)."""
    from carepost.journeys.models import JourneyRunStep
    from carepost.tracking.conversions import ContactEvent
    from carepost.tracking.models import EngagementEvent

    s = ctx.session
    message_of: dict[str, str] = {}
    for run_id, message_id in s.execute(select(JourneyRunStep.run_id, JourneyRunStep.message_id).where(
            JourneyRunStep.org_id == ctx.org_id, JourneyRunStep.run_id.in_([r.id for r in runs]),
            JourneyRunStep.step_id == cond["step"], JourneyRunStep.message_id.is_not(None))
            .order_by(JourneyRunStep.seq)):
        message_of[run_id] = message_id  # the latest send of that step
    mids = list(set(message_of.values()))
    kind = cond.get("is") or cond.get("is_")
    hit: set[str] = set()
    if mids:
        if kind == "converted":
            hit = set(s.scalars(select(ContactEvent.message_id).where(
                ContactEvent.org_id == ctx.org_id, ContactEvent.message_id.in_(mids))))
        else:
            types = ("clicked",) if kind == "clicked" else ("opened", "clicked")
            hit = set(s.scalars(select(EngagementEvent.message_id).where(
                EngagementEvent.org_id == ctx.org_id, EngagementEvent.message_id.in_(mids),
                EngagementEvent.classification == "human", EngagementEvent.type.in_(types)).distinct()))
    matched = {rid for rid, mid in message_of.items() if mid in hit}
    if kind == "not_opened":
        return {r.id for r in runs} - matched
    return matched


def step_branch(ctx, definition, version_id, step_id, step, runs):
    out: dict[str, Outcome] = {}
    rest = list(runs)
    for i, case in enumerate(step.get("cases") or []):
        if not rest:
            break
        cond = case.get("when") or {}
        kind = cond.get("kind")
        cids = sorted({r.contact_id for r in rest})
        if kind == "attribute":
            members = _attribute_members(ctx, cond, cids)
            matched = {r.id for r in rest if r.contact_id in members}
        elif kind == "segment":
            members = segment_members(ctx, cond["segment_id"], cids)
            matched = {r.id for r in rest if r.contact_id in members}
        elif kind == "engagement":
            matched = _engagement(ctx, cond, rest)
        else:
            matched = set()
        for r in rest:
            if r.id in matched:
                out[r.id] = Outcome.go(case["next"], reason=f"case:{i}")
        rest = [r for r in rest if r.id not in matched]
    for r in rest:
        out[r.id] = Outcome.go(step["default"], reason="default")
    return out


def split_variant(run_id: str, step_id: str, variants: list[dict]) -> dict:
    """The variant of one run at one split: a hash of (run, step) into the weights (percent)."""
    point = int.from_bytes(hashlib.sha256(f"{run_id}:{step_id}".encode()).digest()[:8], "big") % 100
    total = 0
    for v in variants:
        total += int(v.get("weight") or 0)
        if point < total:
            return v
    return variants[-1]


def step_split(ctx, definition, version_id, step_id, step, runs):
    out = {}
    for r in runs:
        chosen = split_variant(r.id, step_id, step["variants"])
        r.variants = {**(r.variants or {}), step_id: chosen["name"]}
        out[r.id] = Outcome.go(chosen["next"], reason=str(chosen["name"])[:64])
    return out


# --------------------------------------------------------------------------- update, notify, webhook, exit


def step_update(ctx, definition, version_id, step_id, step, runs):
    from carepost.audit.service import record
    from carepost.patients.models import Contact

    s = ctx.session
    action = step["action"]
    for r in runs:
        if action in ("subscribe_topic", "unsubscribe_topic"):
            from carepost.consent import service as consent

            if action == "subscribe_topic":
                consent.resubscribe_contact(s, ctx.org_id, r.contact_id, step["topic_id"], source="journey")
            else:
                consent.unsubscribe_contact(s, ctx.org_id, r.contact_id, step["topic_id"], source="journey")
        else:
            from carepost.patients import service as patients

            contact = s.get(Contact, r.contact_id)
            if contact is None:
                continue
            name, value = step["field"], step.get("value")
            if name == "stage":
                patients.set_stage_override(s, ctx.org_id, contact, value)
            elif name in ("preferred_language", "time_zone"):
                setattr(contact, name, value)
            elif name.startswith("attr."):
                patients.set_attributes(s, ctx.org_id, contact, {name[5:]: value})
            else:
                raise _StepError("unknown_field")
        record(s, org_id=ctx.org_id, actor_type="system", actor_id=None, action="journey.update",
               target_type="contact", target_id=r.contact_id,
               details={"journey_id": r.journey_id, "run_id": r.id, "step_id": step_id, "action": action,
                        "field": step.get("field"), "topic_id": step.get("topic_id")})
    s.flush()
    return {r.id: Outcome.go(step["next"], reason=action) for r in runs}


def step_notify(ctx, definition, version_id, step_id, step, runs):
    from carepost.accounts.models import Membership
    from carepost.core import events

    s = ctx.session
    if step.get("user_id"):
        users = [step["user_id"]]
    else:
        users = list(s.scalars(select(Membership.user_id).where(Membership.org_id == ctx.org_id,
                                                                 Membership.role == step.get("role"))))
    journeys = sorted({r.journey_id for r in runs})
    for journey_id in journeys:
        n = sum(1 for r in runs if r.journey_id == journey_id)
        for user_id in users:
            # One notice per journey and person per tick (counts only: no contact id, no PHI).
            events.publish("account.notice", s, "journey_notice", org_id=ctx.org_id, user_id=user_id,
                           link=f"/journeys/{journey_id}", note=f"{step['text']}\n\n({n} patient(s) reached this step.)")
    return {r.id: Outcome.go(step["next"], reason=f"notified:{len(users)}") for r in runs}


def step_webhook(ctx, definition, version_id, step_id, step, runs):
    from carepost.tracking.service import emit

    for r in runs:
        emit(ctx.session, ctx.org_id, "journey.step", {
            "event": step.get("event") or "journey.step", "journey_id": r.journey_id, "version": r.version,
            "step_id": step_id, "run_id": r.id, "contact_id": r.contact_id})
    return {r.id: Outcome.go(step["next"]) for r in runs}


def step_exit(ctx, definition, version_id, step_id, step, runs):
    return {r.id: Outcome.end("completed", "exit_step") for r in runs}


HANDLERS = {
    "send": step_send, "wait": step_wait, "wait_until": step_wait_until, "wait_event": step_wait_event,
    "branch": step_branch, "split": step_split, "update": step_update, "notify": step_notify,
    "webhook": step_webhook, "exit": step_exit,
}

# Webhook event types of journeys (registered with tracking by the composition root).
WEBHOOK_EVENT_TYPES: dict[str, str] = {
    "journey.step": "A run reached a journey's webhook step (data: event — the step's name, journey_id, version, "
                    "step_id, run_id, contact_id — ids only).",
}
