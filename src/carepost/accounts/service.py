"""Organizations, users and memberships: plain functions taking a session."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carepost.accounts.models import ApiCredential, Membership, OneTimeLink, Organization, User
from carepost.accounts.permissions import permissions_for
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.database import ALL_ORGANIZATIONS
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import slugify

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def normalize_email(email: str, field: str = "email") -> str:
    value = (email or "").strip().lower()
    if len(value) > 320 or not _EMAIL_RE.match(value) or any(c in value for c in "\r\n<>,;\""):
        raise ValidationFailed("Enter a valid email address.", field=field)
    return value


def create_organization(session: Session, name: str) -> Organization:
    """A tenant with its own data key, blind-index key and audit chain."""
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise ValidationFailed("An organization needs a name of 1 to 200 characters.", field="name")
    base = slugify(name)
    slug, n = base, 1
    while session.scalar(select(Organization.id).where(Organization.slug == slug)):
        n += 1
        slug = f"{base}-{n}"
    org = Organization(name=name, slug=slug, settings={})
    session.add(org)
    session.flush()
    get_keyring().ensure_org_keys(session, org.id)
    return org


def get_organization(session: Session, org_ref: str) -> Organization:
    """By slug or id (the CLI's ``--org`` takes either)."""
    org = session.scalar(select(Organization).where((Organization.slug == org_ref) | (Organization.id == org_ref)))
    if org is None:
        raise NotFound(f"No organization {org_ref!r}.", field="org")
    return org


def list_organizations(session: Session) -> list[Organization]:
    return list(session.scalars(select(Organization).order_by(Organization.created_at)))


def organizations_of_user(session: Session, user_id: str) -> list[tuple[Organization, str]]:
    """Every organization a person belongs to, with their role there (for the switcher)."""
    rows = session.execute(
        select(Organization, Membership.role)
        .join(Membership, Membership.org_id == Organization.id)
        .where(Membership.user_id == user_id)
        .order_by(Organization.name)
        .execution_options(**ALL_ORGANIZATIONS)
    ).all()
    return [(org, role) for org, role in rows]


def add_membership(session: Session, org_id: str, user: User, role: str) -> Membership:
    permissions_for(role)  # validates the role name
    existing = session.scalar(select(Membership).where(Membership.user_id == user.id, Membership.org_id == org_id))
    if existing:
        raise Conflict("This person already belongs to the organization.", field="email")
    membership = Membership(org_id=org_id, user_id=user.id, role=role)
    session.add(membership)
    session.flush()
    return membership


def organization_stats(session: Session, org_id: str) -> list[tuple[str, int]]:
    users = session.scalar(select(func.count()).select_from(Membership).where(Membership.org_id == org_id)) or 0
    keys = session.scalar(
        select(func.count()).select_from(ApiCredential).where(ApiCredential.org_id == org_id, ApiCredential.revoked_at.is_(None))
    ) or 0
    return [("People", users), ("Active API credentials", keys)]


SETUP_LINK_HOURS = 24


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_setup_link_if_needed(session: Session, base_url: str) -> str | None:
    """No default credentials: the first owner is created through a one-time link that expires
    after a day or its first use. Returns None once any person exists."""
    if session.scalar(select(func.count()).select_from(User)):
        return None
    for old in session.scalars(select(OneTimeLink).where(OneTimeLink.purpose == "setup", OneTimeLink.used_at.is_(None))):
        old.used_at = clock.now()  # a new link replaces any earlier one
    token = secrets.token_urlsafe(32)
    session.add(
        OneTimeLink(purpose="setup", token_hash=hash_token(token), expires_at=clock.now() + timedelta(hours=SETUP_LINK_HOURS))
    )
    session.flush()
    return f"{base_url}/app/setup/{token}"
