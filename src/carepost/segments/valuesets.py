"""Value sets as segments see them: the shipped library merged with the organization's own,
versioned sets (a user set with a shipped key overrides it for that organization)."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.segments import library
from carepost.segments.models import ValueSet


def _user_current(session: Session, org_id: str) -> dict[str, ValueSet]:
    """key -> the highest version of each user set (deleted ones included, to hide shipped ones
    the organization removed? No: a deleted user set falls back to the shipped one)."""
    latest = (select(ValueSet.key, func.max(ValueSet.version).label("v")).where(ValueSet.org_id == org_id)
              .group_by(ValueSet.key).subquery())
    rows = session.scalars(select(ValueSet).join(latest, (ValueSet.key == latest.c.key) & (ValueSet.version == latest.c.v))
                           .where(ValueSet.org_id == org_id))
    return {r.key: r for r in rows}


def value_set_dict(row: ValueSet) -> dict:
    return {"key": row.key, "name": row.name, "version": str(row.version), "source": row.source,
            "description": row.description, "sensitive_category": row.sensitive_category, "codes": list(row.codes or []),
            "origin": "user", "id": row.id, "created_by": row.created_by,
            "created_at": row.created_at.isoformat() if row.created_at else None}


def _shipped(vs: dict) -> dict:
    return {**vs, "origin": "shipped"}


def all_value_sets(session: Session, org_id: str) -> dict[str, dict]:
    """Every value set the organization can use, by key (user sets over shipped ones)."""
    out = {vs["key"]: _shipped(vs) for vs in library.shipped_value_sets()}
    for key, row in _user_current(session, org_id).items():
        if row.deleted:
            continue
        out[key] = value_set_dict(row)
    return out


def resolve_value_set(session: Session, org_id: str, key: str) -> dict | None:
    """The value set a segment means by ``key`` (user set over shipped), or None."""
    row = session.scalar(select(ValueSet).where(ValueSet.org_id == org_id, ValueSet.key == key)
                         .order_by(ValueSet.version.desc()).limit(1))
    if row is not None and not row.deleted:
        return value_set_dict(row)
    shipped = library.shipped_value_set(key)
    return _shipped(shipped) if shipped else None


def sensitive_value_sets(session: Session, org_id: str) -> list[dict]:
    return [vs for vs in all_value_sets(session, org_id).values() if vs.get("sensitive_category")]


# Compiling a segment needs the organization's value sets (the ones it names, and every sensitive
# one for the category check). Reading them for every keystroke of a live count cost more than
# parsing and compiling together, so each process keeps them for a few seconds; a change made
# in this process is seen at once, one made by another process within CACHE_SECONDS.
CACHE_SECONDS = 5.0
_cache: dict[str, tuple[float, dict[str, dict]]] = {}
_cache_lock = threading.Lock()


def org_value_sets(session: Session, org_id: str) -> dict[str, dict]:
    """key -> value set as segments resolve it (read-only: callers must not modify it)."""
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(org_id)
    if hit is not None and now - hit[0] < CACHE_SECONDS:
        return hit[1]
    sets = all_value_sets(session, org_id)
    with _cache_lock:
        _cache[org_id] = (now, sets)
    return sets


def forget_value_sets(org_id: str) -> None:
    with _cache_lock:
        _cache.pop(org_id, None)


def _validated(data: dict, key: str) -> dict:
    doc = {"key": key, "name": data.get("name"), "version": "1", "source": data.get("source") or "user",
           "sensitive_category": data.get("sensitive_category"), "codes": data.get("codes")}
    if data.get("description"):
        doc["description"] = data["description"]
    try:
        return library.validate_value_set(doc, key)
    except library.ValueSetError as exc:
        field = getattr(exc, "field", None) or "codes"
        raise ValidationFailed(f"{field}: {getattr(exc, 'reason', str(exc))}", field=field) from None


def save_value_set(session: Session, org_id: str, key: str, data: dict, *, created_by: str | None,
                   create: bool) -> ValueSet:
    """Create (``create``) or change a user value set; a change adds a version."""
    current = session.scalar(select(ValueSet).where(ValueSet.org_id == org_id, ValueSet.key == key)
                             .order_by(ValueSet.version.desc()).limit(1))
    if create and current is not None and not current.deleted:
        raise Conflict("A value set with this key exists.", field="key")
    if not create and (current is None or current.deleted):
        raise NotFound("No such value set.", field="key")
    doc = _validated(data, key)
    row = ValueSet(org_id=org_id, key=key, version=(current.version + 1) if current else 1, name=doc["name"],
                   description=doc.get("description") or "", source=doc.get("source") or "",
                   sensitive_category=doc.get("sensitive_category"), codes=doc["codes"], created_by=created_by)
    session.add(row)
    session.flush()
    forget_value_sets(org_id)
    return row


def delete_value_set(session: Session, org_id: str, key: str, *, created_by: str | None) -> None:
    current = session.scalar(select(ValueSet).where(ValueSet.org_id == org_id, ValueSet.key == key)
                             .order_by(ValueSet.version.desc()).limit(1))
    if current is None or current.deleted:
        raise NotFound("No such user value set.", field="key")
    session.add(ValueSet(org_id=org_id, key=key, version=current.version + 1, name=current.name,
                         description=current.description, source=current.source,
                         sensitive_category=current.sensitive_category, codes=current.codes, deleted=True,
                         created_by=created_by))
    session.flush()
    forget_value_sets(org_id)


def value_set_versions(session: Session, org_id: str, key: str) -> list[dict]:
    rows = session.scalars(select(ValueSet).where(ValueSet.org_id == org_id, ValueSet.key == key)
                           .order_by(ValueSet.version))
    return [{**value_set_dict(r), "deleted": r.deleted} for r in rows]
