"""Workforce training and policy acknowledgement (issue 16 item 10; 164.308(a)(5), 164.316).

An organization publishes its policies and training modules, versioned by ``key``: publishing
the same key again makes a new version that supersedes the earlier ones. A person may not open
PHI unmasked until they have acknowledged the *current* version of every published document
within the acknowledgement period (12 months by default; the organization's setting
``training.period_days``). Reminders go out ``training.reminder_days`` (30) before a person's
acknowledgement expires (:func:`send_reminders`, the ``compliance.training_reminders`` task and
``carepost compliance remind``).

**The gate.** :func:`phi_gate` is called by ``accounts.access.require`` (port
``accounts.phi_gate``) for every caller whose permissions include ``phi:read_unmasked``: people
(session cookie) and API credentials (held to the person who created them). When the caller is
not current, the permission is taken out of this request's principal: routes that need it are
refused with ``acknowledgement_required`` (403, a message pointing at
``/app/compliance/acknowledge``) and pages that show PHI masked or unmasked show it masked.

Not gated, by design (docs/compliance.md): an organization that has published nothing (there
is nothing to acknowledge — the reports flag it); the system itself (workers, CLI); break-glass
grants (emergency access, 164.312(a)(2)(ii), reviewed afterwards).

The answer is cached per process for :data:`CACHE_SECONDS` per (organization, person); publishing
or acknowledging in this process clears it, another process sees the change within that time.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carepost.audit.service import record
from carepost.compliance.models import PolicyAcknowledgement, PolicyDocument
from carepost.core import clock
from carepost.core.errors import NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id

KINDS = ("policy", "training")
DEFAULT_PERIOD_DAYS = 365
DEFAULT_REMINDER_DAYS = 30
CACHE_SECONDS = 30.0
KEY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
GATE_MESSAGE = ("Acknowledge your organization's current policies and training before opening PHI "
                "(Compliance > Policies: /app/compliance/acknowledge).")

_cache: dict[tuple[str, str], tuple[float, bool]] = {}
_cache_lock = threading.Lock()


def clear_cache(org_id: str | None = None) -> None:
    with _cache_lock:
        if org_id is None:
            _cache.clear()
        else:
            for k in [k for k in _cache if k[0] == org_id]:
                del _cache[k]


# --------------------------------------------------------------------------- settings


def settings_of(session: Session, org_id: str) -> dict:
    from carepost.accounts.service import get_organization

    stored = (get_organization(session, org_id).settings or {}).get("training") or {}
    return {"period_days": int(stored.get("period_days", DEFAULT_PERIOD_DAYS)),
            "reminder_days": int(stored.get("reminder_days", DEFAULT_REMINDER_DAYS))}


def update_settings(session: Session, org_id: str, period_days, reminder_days, actor: dict) -> dict:
    from carepost.accounts.service import get_organization

    def number(value, field: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.strip().isdigit()):
            raise ValidationFailed(f"A whole number of days from {low} to {high}.", field=field)
        n = int(value)
        if not low <= n <= high:
            raise ValidationFailed(f"A whole number of days from {low} to {high}.", field=field)
        return n

    current = settings_of(session, org_id)
    period = number(period_days, "period_days", 30, 365) if period_days is not None else current["period_days"]
    reminder = number(reminder_days, "reminder_days", 1, 90) if reminder_days is not None else current["reminder_days"]
    if reminder >= period:
        raise ValidationFailed("Remind before the period ends: fewer days than the period.", field="reminder_days")
    org = get_organization(session, org_id)
    org.settings = {**(org.settings or {}), "training": {"period_days": period, "reminder_days": reminder}}
    record(session, org_id=org_id, action="compliance.training.settings_changed", target_type="organization",
           target_id=org_id, details={"before": current, "after": {"period_days": period, "reminder_days": reminder}},
           **actor)
    clear_cache(org_id)
    return {"period_days": period, "reminder_days": reminder}


# --------------------------------------------------------------------------- documents


def current_documents(session: Session, org_id: str) -> list[PolicyDocument]:
    """The latest version of every published key (retired keys left out)."""
    latest = (select(PolicyDocument.key, func.max(PolicyDocument.version).label("v"))
              .where(PolicyDocument.org_id == org_id).group_by(PolicyDocument.key).subquery())
    return list(session.scalars(
        select(PolicyDocument).join(latest, (PolicyDocument.key == latest.c.key) & (PolicyDocument.version == latest.c.v))
        .where(PolicyDocument.org_id == org_id, PolicyDocument.retired_at.is_(None))
        .order_by(PolicyDocument.kind, PolicyDocument.key)))


def publish(session: Session, org_id: str, *, key, kind, title, body, actor: dict) -> PolicyDocument:
    """A new version of ``key`` (version 1 if new). Everyone must acknowledge it."""
    key = (key or "").strip().lower() if isinstance(key, str) or key is None else ""
    if not KEY_RE.match(key):
        raise ValidationFailed("Lower-case letters, digits and dashes, up to 64 (e.g. privacy-policy).", field="key")
    if kind not in KINDS:
        raise ValidationFailed("Choose policy or training.", field="kind")
    title = (title or "").strip() if isinstance(title, str) or title is None else ""
    if not title or len(title) > 200:
        raise ValidationFailed("Required, at most 200 characters.", field="title")
    body = (body or "").strip() if isinstance(body, str) or body is None else ""
    if len(body) < 20 or len(body) > 200_000:
        raise ValidationFailed("The text people read and acknowledge: 20 to 200,000 characters.", field="body")
    version = (session.scalar(select(func.max(PolicyDocument.version)).where(PolicyDocument.org_id == org_id,
                                                                            PolicyDocument.key == key)) or 0) + 1
    doc = PolicyDocument(id=new_id(), org_id=org_id, key=key, kind=kind, title=title, version=version, body=body,
                         sha256=hashlib.sha256(body.encode()).hexdigest(), published_by=actor.get("actor_id"),
                         published_at=clock.now())
    session.add(doc)
    session.flush([doc])
    record(session, org_id=org_id, action="compliance.policy.published", target_type="policy_document",
           target_id=doc.id, details={"key": key, "kind": kind, "version": version, "sha256": doc.sha256}, **actor)
    clear_cache(org_id)
    return doc


def retire(session: Session, org_id: str, document_id: str, actor: dict) -> PolicyDocument:
    doc = get_document(session, org_id, document_id)
    doc.retired_at = clock.now()
    record(session, org_id=org_id, action="compliance.policy.retired", target_type="policy_document", target_id=doc.id,
           details={"key": doc.key, "version": doc.version}, **actor)
    clear_cache(org_id)
    return doc


def get_document(session: Session, org_id: str, document_id: str) -> PolicyDocument:
    doc = session.scalar(select(PolicyDocument).where(PolicyDocument.org_id == org_id,
                                                      PolicyDocument.id == document_id)) if is_id(document_id) else None
    if doc is None:
        raise NotFound("No such policy or training document.", field="document_id")
    return doc


def document_dict(doc: PolicyDocument, *, body: bool = False) -> dict:
    out = {"id": doc.id, "key": doc.key, "kind": doc.kind, "title": doc.title, "version": doc.version,
           "sha256": doc.sha256, "published_at": clock.aware(doc.published_at).isoformat(),
           "retired": doc.retired_at is not None}
    if body:
        out["body"] = doc.body
    return out


# --------------------------------------------------------------------------- acknowledgement


def status(session: Session, org_id: str, user_id: str, *, now: datetime | None = None,
           docs: list[PolicyDocument] | None = None, cfg: dict | None = None) -> dict:
    """A person's standing: per current document, when they acknowledged that version and until
    when it counts; ``current`` is True when every one is acknowledged and not expired."""
    now = now or clock.now()
    cfg = cfg or settings_of(session, org_id)
    docs = current_documents(session, org_id) if docs is None else docs
    acks: dict[str, datetime] = {}
    if docs:
        for doc_id, at in session.execute(
                select(PolicyAcknowledgement.document_id, func.max(PolicyAcknowledgement.acknowledged_at))
                .where(PolicyAcknowledgement.org_id == org_id, PolicyAcknowledgement.user_id == user_id,
                       PolicyAcknowledgement.document_id.in_([d.id for d in docs]))
                .group_by(PolicyAcknowledgement.document_id)):
            acks[doc_id] = clock.aware(at)
    period = timedelta(days=cfg["period_days"])
    soon = timedelta(days=cfg["reminder_days"])
    items = []
    for d in docs:
        at = acks.get(d.id)
        until = at + period if at else None
        state = ("missing" if at is None else "expired" if until <= now else "due_soon" if until - now <= soon else "ok")
        items.append({**document_dict(d), "acknowledged_at": at.isoformat() if at else None,
                      "valid_until": until.isoformat() if until else None, "state": state})
    valid = [datetime.fromisoformat(i["valid_until"]) for i in items if i["valid_until"]]
    return {"user_id": user_id, "current": all(i["state"] in ("ok", "due_soon") for i in items),
            "gated": bool(docs), "documents": items,
            "expires_at": min(valid).isoformat() if valid and len(valid) == len(items) else None}


def acknowledge(session: Session, org_id: str, user_id: str, document_ids: list[str] | None, actor: dict) -> list[str]:
    """Acknowledge current documents (``document_ids``, or all current ones). Only a current
    version can be acknowledged; an unknown or superseded one is refused naming ``document_ids``."""
    docs = {d.id: d for d in current_documents(session, org_id)}
    if not docs:
        raise ValidationFailed("Your organization has published no policy or training to acknowledge.",
                               field="document_ids")
    wanted = list(docs) if not document_ids else list(dict.fromkeys(document_ids))
    for doc_id in wanted:
        if doc_id not in docs:
            raise ValidationFailed("Not a current policy or training version of your organization.",
                                   field="document_ids")
    now = clock.now()
    for doc_id in wanted:
        d = docs[doc_id]
        session.add(PolicyAcknowledgement(id=new_id(), org_id=org_id, user_id=user_id, document_id=d.id, key=d.key,
                                          version=d.version, sha256=d.sha256, acknowledged_at=now))
    record(session, org_id=org_id, action="compliance.policy.acknowledged", target_type="user", target_id=user_id,
           details={"documents": [{"key": docs[i].key, "version": docs[i].version, "sha256": docs[i].sha256}
                                  for i in wanted]}, **actor)
    session.flush()
    clear_cache(org_id)
    return wanted


def _person_of(session: Session, principal) -> str | None:
    if principal.kind == "user":
        return principal.user_id or principal.actor_id
    if principal.kind == "api_credential" and principal.credential_id:
        from carepost.accounts.models import ApiCredential

        return session.scalar(select(ApiCredential.created_by).where(ApiCredential.id == principal.credential_id))
    return None


def phi_gate(session: Session | None, principal) -> str | None:
    """The reason this caller may not open PHI now (None: they may). Port ``accounts.phi_gate``.

    ``session=None``: answer from this process's cache only (the event loop may ask, issue 11
    item 6); raises :class:`LookupError` when the answer needs the database."""
    if principal.kind not in ("user", "api_credential") or principal.break_glass_grant_id:
        return None
    key = (principal.org_id, principal.credential_id or principal.user_id or principal.actor_id)
    mono = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
    if hit and hit[0] > mono:
        return GATE_MESSAGE if hit[1] else None
    if session is None:
        raise LookupError("the training gate of this caller is not cached")
    docs = current_documents(session, principal.org_id)
    blocked = False
    if docs:
        person = _person_of(session, principal)
        blocked = person is None or not status(session, principal.org_id, person, docs=docs)["current"]
    with _cache_lock:
        _cache[key] = (mono + CACHE_SECONDS, blocked)
    return GATE_MESSAGE if blocked else None


# --------------------------------------------------------------------------- report and reminders


def report(session: Session, org_id: str) -> dict:
    """Per person of the organization: their role, standing and per-document acknowledgements."""
    from carepost.accounts.service import list_members

    cfg = settings_of(session, org_id)
    docs = current_documents(session, org_id)
    people = []
    for user, membership in list_members(session, org_id):
        st = status(session, org_id, user.id, docs=docs, cfg=cfg)
        people.append({"user_id": user.id, "email": user.email, "display_name": user.display_name,
                       "role": membership.role, "current": st["current"], "expires_at": st["expires_at"],
                       "documents": [{"key": d["key"], "version": d["version"], "state": d["state"],
                                      "acknowledged_at": d["acknowledged_at"]} for d in st["documents"]]})
    return {"settings": cfg, "documents": [document_dict(d) for d in docs], "people": people,
            "gated": bool(docs), "not_current": sum(1 for p in people if not p["current"])}


def send_reminders(session: Session, org_id: str, *, now: datetime | None = None) -> list[str]:
    """Email a reminder (account notice ``policy_reminder``) to each person whose acknowledgement
    is missing or ends within ``reminder_days``, at most once per 7 days; the user ids reminded."""
    from carepost.accounts.service import list_members
    from carepost.core import events
    from carepost.core.config import get_settings

    now = now or clock.now()
    cfg = settings_of(session, org_id)
    docs = current_documents(session, org_id)
    if not docs:
        return []
    reminded = []
    for user, _m in list_members(session, org_id):
        st = status(session, org_id, user.id, now=now, docs=docs, cfg=cfg)
        if all(d["state"] == "ok" for d in st["documents"]):
            continue
        last = session.scalar(select(func.max(PolicyAcknowledgement.reminded_at))
                              .where(PolicyAcknowledgement.org_id == org_id, PolicyAcknowledgement.user_id == user.id,
                                     PolicyAcknowledgement.document_id == "reminder"))
        if last is not None and now - clock.aware(last) < timedelta(days=7):
            continue
        events.publish("account.notice", session, "policy_reminder", org_id=org_id, user_id=user.id,
                       link=f"{get_settings().base_url}/app/compliance/acknowledge")
        # A marker row (document "reminder") keeps the last reminder per person; no PHI.
        session.add(PolicyAcknowledgement(id=new_id(), org_id=org_id, user_id=user.id, document_id="reminder",
                                          key="reminder", version=0, sha256="", acknowledged_at=now, reminded_at=now))
        record(session, org_id=org_id, actor_type="system", actor_id=None, action="compliance.policy.reminded",
               target_type="user", target_id=user.id,
               details={"states": {d["key"]: d["state"] for d in st["documents"]}})
        reminded.append(user.id)
    return reminded
