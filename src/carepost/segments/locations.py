"""The organization's locations that segments measure distance from.

A location is a name and a five-digit ZIP code whose centroid is known (:mod:`.geo`). A query
names a location (``within 25 miles of location "Main Street Clinic"``); the compiler resolves the
name when the query runs, so moving a location moves every dynamic segment that uses it. A
location that a saved segment names cannot be deleted or renamed until the segment changes.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.segments import geo
from carepost.segments.models import Location, Segment


def name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def find(session: Session, org_id: str, name: str) -> Location | None:
    return session.scalar(select(Location).where(Location.org_id == org_id, Location.name_key == name_key(name)))


def list_locations(session: Session, org_id: str) -> list[Location]:
    return list(session.scalars(select(Location).where(Location.org_id == org_id).order_by(Location.name_key)))


def _check_zip(postal_code: str) -> str:
    zip5 = geo.normalize_zip(postal_code)
    if zip5 is None or geo.zip_centroid(zip5) is None:
        raise ValidationFailed("The ZIP code is not a known five-digit US ZIP code.", field="postal_code")
    return zip5


def _users(session: Session, org_id: str, location: Location) -> list[str]:
    """Names of saved segments whose query names this location."""
    key = location.name_key
    out = []
    for seg in session.scalars(select(Segment).where(Segment.org_id == org_id)):
        if any(name_key(n) == key for n in _named_locations(seg.query)):
            out.append(seg.name)
    return out


def _named_locations(tree: dict) -> list[str]:
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("type") == "distance" and isinstance(node.get("location"), str):
                found.append(node["location"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)
    return found


def save(session: Session, org_id: str, *, name: str, postal_code: str, created_by: str | None,
         location_id: str | None = None) -> Location:
    name = " ".join(name.split())
    if not name:
        raise ValidationFailed("A location needs a name.", field="name")
    zip5 = _check_zip(postal_code)
    other = find(session, org_id, name)
    if location_id is None:
        if other is not None:
            raise Conflict("A location with this name exists.", field="name")
        row = Location(org_id=org_id, name=name, name_key=name_key(name), postal_code=zip5, created_by=created_by)
        session.add(row)
    else:
        row = get(session, org_id, location_id)
        if other is not None and other.id != row.id:
            raise Conflict("A location with this name exists.", field="name")
        if row.name_key != name_key(name) and (users := _users(session, org_id, row)):
            raise Conflict(f"Saved segments name this location: {', '.join(sorted(users)[:5])}.", field="name")
        row.name, row.name_key, row.postal_code = name, name_key(name), zip5
    session.flush()
    return row


def get(session: Session, org_id: str, location_id: str) -> Location:
    row = session.scalar(select(Location).where(Location.org_id == org_id, Location.id == location_id))
    if row is None:
        raise NotFound("No such location.", field="location_id")
    return row


def delete(session: Session, org_id: str, location_id: str) -> Location:
    row = get(session, org_id, location_id)
    if users := _users(session, org_id, row):
        raise Conflict(f"Saved segments name this location: {', '.join(sorted(users)[:5])}.", field="location_id")
    session.delete(row)
    session.flush()
    return row


def to_dict(row: Location) -> dict:
    return {"id": row.id, "name": row.name, "postal_code": row.postal_code,
            "created_at": row.created_at.isoformat() if row.created_at else None}
