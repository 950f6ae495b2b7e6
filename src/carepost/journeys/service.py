"""Journeys, the declarative part: create and change, versions, approval, publish, pause, archive,
and the runs of a journey or a contact (the engine in ``engine.py`` moves them).

* **Versions.** A journey's definition lives in versions 1, 2, 3… The newest version is a draft
  until it is published; saving a definition changes that draft (its approval is void), or starts
  a new draft when the newest is published. A published version never changes.
* **Approval** (as for campaigns, docs/campaigns.md): a version whose purpose is marketing (or
  marketing with remuneration), or that names a sensitive segment (entry or branch), needs
  approval — and so does one the organization's campaign approval rules cover (another purpose
  it lists, or every send) — by compliance (``campaigns:approve``) before it can be published — and never by the
  person who wrote the version.
* **Publish** validates the version again (references may have gone), checks the approval and
  makes it the live version new runs enter. When the journey already has a live version the
  caller chooses: ``migrate`` (open runs of older versions move to the step with the same id in
  the new version; a run whose step is gone there drains on its old version) or ``drain`` (runs
  finish on the version they entered). The choice is recorded on the version.
* **Pause / resume / archive**: a paused journey neither admits nor advances runs (the engine
  reads the status); archiving ends its open runs with the reason ``removed``.

Plain functions taking a session; callers commit and write the audit record. Every query is
scoped to the organization; another organization's journey is a 404.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from carepost.accounts.permissions import Permission
from carepost.core import clock, purposes
from carepost.core.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.journeys import validation
from carepost.journeys.models import (
    JOURNEY_STATUSES,
    OPEN_STATES,
    RUN_STATES,
    Journey,
    JourneyRun,
    JourneyRunStep,
    JourneyVersion,
)

MAX_VERSIONS = 10_000


def actor_of(principal) -> str:
    """The person (or, without one, the credential) acting."""
    return principal.user_id or principal.on_behalf_of or principal.actor_id


def _iso(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return clock.aware(value).isoformat()
    return value.isoformat()


# --------------------------------------------------------------------------- reading

def get_journey(session: Session, org_id: str, journey_id: str, field: str = "journey_id") -> Journey:
    row = session.get(Journey, journey_id) if isinstance(journey_id, str) and is_id(journey_id) else None
    if row is None or row.org_id != org_id:
        raise NotFound("No such journey.", field=field)
    return row


def list_journeys(session: Session, org_id: str, *, status: str | None = None, limit: int = 200) -> list[Journey]:
    stmt = select(Journey).where(Journey.org_id == org_id)
    if status is not None:
        if status not in JOURNEY_STATUSES:
            raise ValidationFailed(f"status must be one of {', '.join(JOURNEY_STATUSES)}.", field="status")
        stmt = stmt.where(Journey.status == status)
    return list(session.scalars(stmt.order_by(Journey.created_at.desc(), Journey.id).limit(max(1, min(limit, 1000)))))


def list_versions(session: Session, row: Journey) -> list[JourneyVersion]:
    return list(session.scalars(select(JourneyVersion).where(JourneyVersion.org_id == row.org_id,
                                                             JourneyVersion.journey_id == row.id)
                                .order_by(JourneyVersion.version)))


def get_version(session: Session, row: Journey, number: int | None = None, field: str = "version") -> JourneyVersion:
    """Version ``number``, or the newest one."""
    stmt = select(JourneyVersion).where(JourneyVersion.org_id == row.org_id, JourneyVersion.journey_id == row.id)
    if number is None:
        ver = session.scalars(stmt.order_by(JourneyVersion.version.desc()).limit(1)).first()
    elif not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= MAX_VERSIONS:
        ver = None
    else:
        ver = session.scalars(stmt.where(JourneyVersion.version == number)).first()
    if ver is None:
        raise NotFound("The journey has no such version.", field=field)
    return ver


def live_version(session: Session, row: Journey) -> JourneyVersion | None:
    return get_version(session, row, row.current_version) if row.current_version else None


def version_dict(ver: JourneyVersion, *, with_definition: bool = True) -> dict:
    out = {"id": ver.id, "version": ver.version, "published": ver.published_at is not None,
           "published_at": _iso(ver.published_at), "published_by": ver.published_by,
           "migration_mode": ver.migration_mode if ver.published_at else None,
           "approved_by": ver.approved_by, "approved_at": _iso(ver.approved_at),
           "created_by": ver.created_by, "created_at": _iso(ver.created_at)}
    if with_definition:
        out["definition"] = ver.definition
    return out


def journey_dict(session: Session, row: Journey, *, with_definition: bool = True) -> dict:
    newest = get_version(session, row)
    live = live_version(session, row)
    reasons = approval_reasons(session, row.org_id, newest.definition)
    return {"id": row.id, "name": row.name, "description": row.description, "status": row.status,
            "current_version": row.current_version, "latest_version": newest.version,
            "draft": newest.published_at is None,
            "purpose": (newest.definition or {}).get("purpose"),
            "entry_type": ((newest.definition or {}).get("entry") or {}).get("type"),
            "approval_required": bool(reasons), "approval_reasons": reasons,
            "approved": newest.approved_at is not None,
            "created_by": row.created_by, "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at),
            "latest": version_dict(newest, with_definition=with_definition),
            "live": version_dict(live, with_definition=False) if live is not None else None}


# --------------------------------------------------------------------------- approval rules

def approval_reasons(session: Session, org_id: str, definition: dict) -> list[str]:
    """Why a version needs compliance approval: ``marketing_purpose`` and ``sensitive_segment``
    always (whatever the organization's settings), and the organization's own campaign approval
    rules (``docs/campaigns.md``): ``purpose_rule`` for another purpose it lists,
    ``all_sends`` when it requires approval of every send."""
    from carepost.campaigns.service import campaign_settings
    from carepost.segments.service import get_segment

    reasons = []
    purpose = (definition or {}).get("purpose")
    rules = campaign_settings(session, org_id)
    if purpose in purposes.MARKETING_PURPOSES:
        reasons.append("marketing_purpose")
    elif purpose in rules["approval_required_purposes"]:
        reasons.append("purpose_rule")
    if rules["approval_required_for_all"] and not reasons:
        reasons.append("all_sends")
    for segment_id in sorted(validation.references(definition or {})["segments"]):
        try:
            seg = get_segment(session, org_id, segment_id)
        except NotFound:
            continue
        if seg.sensitive:
            reasons.append("sensitive_segment")
            break
    return reasons


# --------------------------------------------------------------------------- create, change, delete

def check_size(definition) -> None:
    import json

    from carepost.journeys.schemas import MAX_DEFINITION_BYTES

    try:
        size = len(json.dumps(definition, allow_nan=False))
    except (TypeError, ValueError):
        raise ValidationFailed("The definition is not plain JSON.", field="definition") from None
    if size > MAX_DEFINITION_BYTES:
        raise ValidationFailed(f"A definition is at most {MAX_DEFINITION_BYTES // 1024} KB of JSON.", field="definition")


def _values(values) -> dict:
    return values.model_dump(exclude_unset=True) if hasattr(values, "model_dump") else dict(values)


def create_journey(session: Session, org_id: str, values, principal) -> Journey:
    """A journey and its version 1 (a draft), the definition validated in full (422 naming every path)."""
    data = _values(values)
    definition = data.get("definition")
    check_size(definition)
    validation.check_definition(session, org_id, definition)
    now = clock.now()
    row = Journey(id=new_id(), org_id=org_id, name=data["name"], description=data.get("description"), status="draft",
                  created_by=actor_of(principal), created_at=now, updated_at=now)
    session.add(row)
    session.flush()
    session.add(JourneyVersion(id=new_id(), org_id=org_id, journey_id=row.id, version=1, definition=definition,
                               migration_mode="drain", created_by=actor_of(principal), created_at=now))
    session.flush()
    return row


def update_journey(session: Session, row: Journey, values) -> Journey:
    changes = _values(values)
    for key in ("name", "description"):
        if key in changes:
            if key == "name" and not changes[key]:
                raise ValidationFailed("A journey needs a name.", field="name")
            setattr(row, key, changes[key])
    row.updated_at = clock.now()
    session.flush()
    return row


def save_definition(session: Session, row: Journey, definition, principal) -> JourneyVersion:
    """Change the draft version, or start a new draft when the newest version is published.
    A change voids the draft's approval."""
    if row.status == "archived":
        raise Conflict("An archived journey cannot be changed.", field="status", code="archived")
    check_size(definition)
    validation.check_definition(session, row.org_id, definition)
    newest = get_version(session, row)
    if newest.published_at is None:
        if newest.definition != definition:
            newest.definition = definition
            newest.approved_by = newest.approved_at = None
            newest.created_by = actor_of(principal)  # the author whose work is approved
        ver = newest
    else:
        if newest.version >= MAX_VERSIONS:
            raise Conflict("This journey has too many versions; create a new journey.", field="version")
        ver = JourneyVersion(id=new_id(), org_id=row.org_id, journey_id=row.id, version=newest.version + 1,
                             definition=definition, migration_mode="drain", created_by=actor_of(principal),
                             created_at=clock.now())
        session.add(ver)
    row.updated_at = clock.now()
    session.flush()
    return ver


def delete_journey(session: Session, row: Journey) -> None:
    """Only a journey never published (no patient ever entered) is deleted; others are archived."""
    published = session.scalar(select(func.count()).select_from(JourneyVersion).where(
        JourneyVersion.org_id == row.org_id, JourneyVersion.journey_id == row.id,
        JourneyVersion.published_at.is_not(None)))
    if published:
        raise Conflict("A journey that was published cannot be deleted; archive it.", field="status",
                       code="published")
    session.delete(row)
    session.flush()


# --------------------------------------------------------------------------- approval and publishing

def approve(session: Session, row: Journey, principal, number: int | None = None) -> JourneyVersion:
    """Compliance approves the draft version (never the author of it)."""
    if not principal.can(Permission.CAMPAIGNS_APPROVE):
        raise PermissionDenied("Approving a journey needs campaigns:approve (compliance).", field="journey_id")
    ver = get_version(session, row, number)
    if ver.published_at is not None:
        raise Conflict("This version is already published.", field="version", code="published")
    actor = actor_of(principal)
    if actor == ver.created_by:
        raise PermissionDenied("The person who wrote a journey version cannot approve it.", field="approved_by",
                               code="self_approval")
    validation.check_definition(session, row.org_id, ver.definition)
    ver.approved_by, ver.approved_at = actor, clock.now()
    session.flush()
    return ver


def revoke_approval(session: Session, row: Journey, principal, number: int | None = None) -> JourneyVersion:
    """Compliance withdraws an approval of a version not yet published (the reason goes in the audit)."""
    if not principal.can(Permission.CAMPAIGNS_APPROVE):
        raise PermissionDenied("Rejecting a journey needs campaigns:approve (compliance).", field="journey_id")
    ver = get_version(session, row, number)
    if ver.published_at is not None:
        raise Conflict("This version is already published.", field="version", code="published")
    if actor_of(principal) == ver.created_by:
        raise PermissionDenied("The person who wrote a journey version cannot review it.", field="approved_by",
                               code="self_approval")
    ver.approved_by = ver.approved_at = None
    session.flush()
    return ver


def publish(session: Session, row: Journey, principal, *, number: int | None = None,
            mode: str | None = None) -> tuple[JourneyVersion, int]:
    """Make a draft version live. Returns (version, runs migrated)."""
    if row.status == "archived":
        raise Conflict("An archived journey cannot be published.", field="status", code="archived")
    ver = get_version(session, row, number)
    if ver.published_at is not None:
        raise Conflict(f"Version {ver.version} is already published; save a new version first.", field="version",
                       code="published")
    newest = get_version(session, row)
    if newest.id != ver.id:
        raise Conflict("Only the newest version can be published.", field="version")
    definition = ver.definition
    validation.check_definition(session, row.org_id, definition)
    reasons = approval_reasons(session, row.org_id, definition)
    if reasons and ver.approved_at is None:
        raise Conflict("This journey needs approval by compliance before it can be published "
                       f"({', '.join(r.replace('_', ' ') for r in reasons)}).", field="status",
                       code="approval_required")
    live = row.current_version is not None and row.status in ("live", "paused")
    if live and mode not in ("migrate", "drain"):
        raise ValidationFailed("The journey has a live version: choose what happens to its runs, migrate or drain.",
                               field="mode", code="mode_required")
    ver.published_at, ver.published_by = clock.now(), actor_of(principal)
    ver.migration_mode = mode if live else "drain"
    migrated = 0
    if live and mode == "migrate":
        step_ids = list((definition.get("steps") or {}).keys())
        result = session.execute(
            update(JourneyRun).where(JourneyRun.org_id == row.org_id, JourneyRun.journey_id == row.id,
                                     JourneyRun.state.in_(OPEN_STATES), JourneyRun.version < ver.version,
                                     JourneyRun.step_id.in_(step_ids))
            .values(version=ver.version, version_id=ver.id).execution_options(synchronize_session=False))
        migrated = result.rowcount or 0
    row.current_version = ver.version
    if row.status == "draft":
        row.status = "live"
    row.updated_at = clock.now()
    session.flush()
    return ver, migrated


def _require(row: Journey, allowed: tuple[str, ...], action: str) -> None:
    if row.status not in allowed:
        raise Conflict(f"A journey that is {row.status} cannot be {action} (it must be {' or '.join(allowed)}).",
                       field="status", code="illegal_transition")


def pause(session: Session, row: Journey) -> Journey:
    _require(row, ("live",), "paused")
    row.status = "paused"
    row.updated_at = clock.now()
    session.flush()
    return row


def resume(session: Session, row: Journey) -> Journey:
    _require(row, ("paused",), "resumed")
    row.status = "live"
    row.updated_at = clock.now()
    session.flush()
    return row


def archive(session: Session, row: Journey) -> int:
    """Archive; open runs end with the reason ``removed``. Returns how many ended."""
    _require(row, ("draft", "live", "paused"), "archived")
    now = clock.now()
    result = session.execute(
        update(JourneyRun).where(JourneyRun.org_id == row.org_id, JourneyRun.journey_id == row.id,
                                 JourneyRun.state.in_(OPEN_STATES))
        .values(state="exited", exit_reason="removed", active_key=None, ended_at=now, wake_at=None,
                lease_until=None, updated_at=now).execution_options(synchronize_session=False))
    row.status = "archived"
    row.updated_at = now
    session.flush()
    return result.rowcount or 0


# --------------------------------------------------------------------------- runs

def _check_state(state: str | None) -> None:
    if state is not None and state not in RUN_STATES:
        raise ValidationFailed(f"state must be one of {', '.join(RUN_STATES)}.", field="state")


def list_runs(session: Session, org_id: str, *, journey_id: str | None = None, contact_id: str | None = None,
              state: str | None = None, step_id: str | None = None, limit: int = 100,
              after: str | None = None) -> list[JourneyRun]:
    """Runs, newest first (``after``: the last run id of the previous page)."""
    _check_state(state)
    stmt = select(JourneyRun).where(JourneyRun.org_id == org_id)
    if journey_id is not None:
        stmt = stmt.where(JourneyRun.journey_id == journey_id)
    if contact_id is not None:
        stmt = stmt.where(JourneyRun.contact_id == contact_id)
    if state is not None:
        stmt = stmt.where(JourneyRun.state == state)
    if step_id is not None:
        stmt = stmt.where(JourneyRun.step_id == step_id)
    if after is not None:
        prev = session.get(JourneyRun, after) if is_id(after) else None
        if prev is None or prev.org_id != org_id:
            raise ValidationFailed("No such run to continue after.", field="after")
        stmt = stmt.where((JourneyRun.entered_at < prev.entered_at)
                          | ((JourneyRun.entered_at == prev.entered_at) & (JourneyRun.id > prev.id)))
    return list(session.scalars(stmt.order_by(JourneyRun.entered_at.desc(), JourneyRun.id)
                                .limit(max(1, min(limit, 1000)))))


def run_steps(session: Session, org_id: str, run_ids: list[str]) -> dict[str, list[dict]]:
    if not run_ids:
        return {}
    out: dict[str, list[dict]] = {rid: [] for rid in run_ids}
    rows = session.scalars(select(JourneyRunStep).where(JourneyRunStep.org_id == org_id,
                                                        JourneyRunStep.run_id.in_(run_ids))
                           .order_by(JourneyRunStep.run_id, JourneyRunStep.seq, JourneyRunStep.at))
    for s in rows:
        out[s.run_id].append({"step_id": s.step_id, "type": s.step_type, "seq": s.seq, "status": s.status,
                              "reason": s.reason, "message_id": s.message_id, "at": _iso(s.at)})
    return out


def run_dict(run: JourneyRun, steps: list[dict] | None = None) -> dict:
    out = {"id": run.id, "journey_id": run.journey_id, "version": run.version, "contact_id": run.contact_id,
           "state": run.state, "step_id": run.step_id, "wake_at": _iso(run.wake_at),
           "waiting_event": run.waiting_event, "variants": dict(run.variants or {}),
           "entered_at": _iso(run.entered_at), "ended_at": _iso(run.ended_at), "exit_reason": run.exit_reason,
           "converted_at": _iso(run.converted_at)}
    if steps is not None:
        out["steps"] = steps
    return out
