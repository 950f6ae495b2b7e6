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
from carepost.core import clock, events
from carepost.core.crypto import get_keyring
from carepost.core.database import ALL_ORGANIZATIONS
from carepost.core.errors import CarePostError, Conflict, NotFound, ValidationFailed
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
    # Consent writes the default authorization texts for compliance review (wired by the root).
    events.publish("organization.created", session, org.id)
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


# --------------------------------------------------------------------------- people (authentication work)
# One-time links, first-owner setup, enrollment, roles. These functions do not commit; the route
# or CLI command commits. ``audit`` is the keyword set passed to ``audit.service.record`` (who,
# from where); each change appends its own event.


class LinkGone(CarePostError):
    status_code = 410
    code = "link_expired"


def _record(audit: dict | None, **kwargs) -> None:
    if audit is None:
        return
    from carepost.accounts.ports import record

    session = kwargs.pop("session")
    record(session, **{**audit, **kwargs})


def find_link(session: Session, token: str, purpose: str) -> OneTimeLink:
    """The unused, unexpired link of ``purpose``; NotFound (404) or LinkGone (410) otherwise."""
    link = session.scalar(
        select(OneTimeLink).where(OneTimeLink.token_hash == hash_token(token or ""), OneTimeLink.purpose == purpose)
    ) if token and len(token) <= 100 else None
    if link is None:
        raise NotFound("This link is not valid. Check that you copied all of it.", field="token")
    if link.used_at is not None:
        raise LinkGone("This link has already been used. Ask for a new one.", field="token")
    if clock.aware(link.expires_at) <= clock.now():
        raise LinkGone("This link has expired. Ask for a new one.", field="token")
    if purpose == "setup" and session.scalar(select(func.count()).select_from(User)):
        # Issue 9 item 23: the first-owner link dies once any person exists, however they were
        # created (``carepost user create``, another setup).
        raise LinkGone("Setup is finished: people already exist. Ask an owner to invite you.", field="token")
    return link


def _display_name(value: str | None) -> str:
    value = " ".join((value or "").split())
    if len(value) > 200:
        raise ValidationFailed("Use a name of at most 200 characters.", field="display_name")
    return value


def _role(role: str) -> str:
    try:
        permissions_for(role)
    except ValueError:
        from carepost.accounts.permissions import ROLES

        raise ValidationFailed("Choose one of the roles: " + ", ".join(ROLES) + ".", field="role") from None
    return role


def setup_first_owner(session: Session, link: OneTimeLink, *, org_name: str, email: str, display_name: str,
                      password: str, audit: dict | None = None) -> tuple[Organization, User]:
    """Item 2 of issue 2: the setup link creates the first organization and its owner, once."""
    from carepost.accounts.passwords import hash_password, validate_password

    org_name = (org_name or "").strip()
    if not org_name or len(org_name) > 200:
        raise ValidationFailed("An organization needs a name of 1 to 200 characters.", field="org_name")
    email = normalize_email(email)
    display_name = _display_name(display_name)
    validate_password(password, email=email, org_name=org_name, display_name=display_name)
    if session.scalar(select(func.count()).select_from(User)):
        raise LinkGone("Setup is finished: people already exist. Ask an owner to invite you.", field="token")
    org = create_organization(session, org_name)
    now = clock.now()
    user = User(email=email, display_name=display_name, password_hash=hash_password(password), password_changed_at=now)
    session.add(user)
    session.flush()
    add_membership(session, org.id, user, "owner")
    # `carepost run --demo` may have loaded its synthetic population before anyone existed: the
    # first owner becomes an owner of that demo organization too (issue 10 item 10).
    for demo in session.scalars(select(Organization).where(Organization.id != org.id)):
        if (demo.settings or {}).get("demo"):
            add_membership(session, demo.id, user, "owner")
            _record(audit, session=session, org_id=demo.id, actor_type="user", actor_id=user.id, action="membership.create",
                    target_type="user", target_id=user.id, details={"role": "owner", "demo": True})
    link.used_at = now
    link.org_id = org.id
    link.user_id = user.id
    _record(audit, session=session, org_id=org.id, actor_type="user", actor_id=user.id, action="organization.setup",
            target_type="organization", target_id=org.id)
    _record(audit, session=session, org_id=org.id, actor_type="user", actor_id=user.id, action="user.create",
            target_type="user", target_id=user.id, details={"role": "owner"})
    return org, user


def create_enrollment_link(session: Session, user: User, org_id: str, role: str, base_url: str) -> str:
    """A one-time link with which a new person sets their password (older ones stop working)."""
    from carepost.core.config import get_settings

    for old in session.scalars(
        select(OneTimeLink).where(OneTimeLink.purpose == "enrollment", OneTimeLink.user_id == user.id, OneTimeLink.used_at.is_(None))
    ):
        old.used_at = clock.now()
    token = secrets.token_urlsafe(32)
    session.add(
        OneTimeLink(
            purpose="enrollment", token_hash=hash_token(token), org_id=org_id, user_id=user.id, role=role,
            expires_at=clock.now() + timedelta(hours=get_settings().enrollment_link_hours),
        )
    )
    session.flush()
    return f"{base_url}/app/enroll/{token}"


def create_member(session: Session, org_id: str, *, email: str, role: str, display_name: str = "",
                  password: str | None = None, base_url: str, actor_role: str | None = None,
                  audit: dict | None = None) -> tuple[User, str | None]:
    """Add a person on the server (``carepost user create``). Returns (user, enrollment link or None).

    A new person gets an enrollment link printed on the server console (shown once) unless a
    password is given (``--password-stdin``). Someone who already has an account is invited
    (:func:`invite_member`) and joins only by accepting. The API and the UI always invite.
    """
    from carepost.accounts.passwords import hash_password, validate_password

    email = normalize_email(email)
    role = _role(role)
    display_name = _display_name(display_name)
    if role == "owner" and actor_role not in (None, "owner"):
        from carepost.core.errors import PermissionDenied

        raise PermissionDenied("Only an owner can add another owner.", code="owner_required")
    org = session.get(Organization, org_id)
    user = session.scalar(select(User).where(User.email == email))
    link = None
    if user is None:
        if password is not None:
            validate_password(password, email=email, org_name=org.name if org else None, display_name=display_name)
        user = User(email=email, display_name=display_name,
                    password_hash=hash_password(password) if password is not None else None,
                    password_changed_at=clock.now() if password is not None else None)
        session.add(user)
        session.flush()
    else:
        if password is not None:
            raise Conflict("This person already has an account; add them without a password.", field="email")
        # Issue 9 item 1: an existing account holder accepts each new membership themselves.
        return invite_member(session, org_id, email=email, role=role, display_name=display_name, base_url=base_url,
                             actor_role=actor_role, audit=audit), None
    created = True
    add_membership(session, org_id, user, role)
    if not user.is_active:
        user.is_active = True
    if user.password_hash is None:
        link = create_enrollment_link(session, user, org_id, role, base_url)
    _record(audit, session=session, org_id=org_id, action="user.create" if created else "membership.create",
            target_type="user", target_id=user.id, details={"role": role, "enrollment_link": link is not None})
    return user, link


def complete_enrollment(session: Session, link: OneTimeLink, *, password: str, display_name: str | None = None,
                        audit: dict | None = None) -> User:
    from carepost.accounts.passwords import hash_password, validate_password

    user = session.get(User, link.user_id) if link.user_id else None
    if user is None:
        raise NotFound("This link is not valid. Check that you copied all of it.", field="token")
    if display_name is not None and display_name.strip():
        user.display_name = _display_name(display_name)
    org = session.get(Organization, link.org_id) if link.org_id else None
    validate_password(password, email=user.email, org_name=org.name if org else None, display_name=user.display_name)
    user.password_hash = hash_password(password)
    user.password_changed_at = clock.now()
    user.is_active = True
    link.used_at = clock.now()
    _record(audit, session=session, org_id=link.org_id, actor_type="user", actor_id=user.id, action="user.enroll",
            target_type="user", target_id=user.id)
    return user


def list_members(session: Session, org_id: str) -> list[tuple[User, Membership]]:
    rows = session.execute(
        select(User, Membership).join(Membership, Membership.user_id == User.id)
        .where(Membership.org_id == org_id).order_by(User.email)
    ).all()
    return [(u, m) for u, m in rows]


def get_member(session: Session, org_id: str, user_id: str) -> tuple[User, Membership]:
    membership = session.scalar(select(Membership).where(Membership.org_id == org_id, Membership.user_id == user_id))
    user = session.get(User, user_id) if membership else None
    if membership is None or user is None:
        raise NotFound("No such person in this organization.", field="user_id")
    return user, membership


def _owner_count(session: Session, org_id: str) -> int:
    return session.scalar(
        select(func.count()).select_from(Membership).where(Membership.org_id == org_id, Membership.role == "owner")
    ) or 0


def change_role(session: Session, org_id: str, user_id: str, role: str, *, actor_role: str | None,
                audit: dict | None = None) -> Membership:
    from carepost.core.errors import PermissionDenied

    role = _role(role)
    user, membership = get_member(session, org_id, user_id)
    old = membership.role
    if old == role:
        return membership
    if "owner" in (old, role) and actor_role not in (None, "owner"):
        raise PermissionDenied("Only an owner can give or take away the owner role.", code="owner_required")
    if old == "owner" and _owner_count(session, org_id) <= 1:
        raise Conflict("An organization needs at least one owner. Make someone else owner first.", field="role")
    membership.role = role
    _record(audit, session=session, org_id=org_id, action="membership.role_change", target_type="user",
            target_id=user.id, details={"old_role": old, "new_role": role})
    _follow_keys(session, org_id, user.id, permissions_for(role), audit, role=role)
    return membership


def _follow_keys(session: Session, org_id: str, user_id: str, permissions, audit: dict | None,
                 role: str | None = None) -> None:
    """Issue 9 item 6: the API credentials a person created follow their role (suspended when
    their scopes exceed it, resumed when it covers them again) and die with their membership."""
    from carepost.accounts.credentials import follow_creator_role

    stopped, resumed = follow_creator_role(session, org_id, user_id, permissions, role)
    action = "api_credential.revoke" if permissions is None else "api_credential.suspend"
    for cred_id in stopped:
        _record(audit, session=session, org_id=org_id, action=action, target_type="api_credential", target_id=cred_id,
                details={"reason": "creator_removed" if permissions is None else "creator_role_narrowed"})
    for cred_id in resumed:
        _record(audit, session=session, org_id=org_id, action="api_credential.resume", target_type="api_credential",
                target_id=cred_id, details={"reason": "creator_role_covers_scopes"})


def remove_member(session: Session, org_id: str, user_id: str, *, actor_role: str | None,
                  audit: dict | None = None) -> User:
    """Take a person out of the organization: membership deleted, their sessions there ended,
    pending links voided; with no organization left the account is deactivated."""
    from carepost.accounts.models import WebSession
    from carepost.core.errors import PermissionDenied

    user, membership = get_member(session, org_id, user_id)
    if membership.role == "owner":
        if actor_role not in (None, "owner"):
            raise PermissionDenied("Only an owner can remove an owner.", code="owner_required")
        if _owner_count(session, org_id) <= 1:
            raise Conflict("The last owner cannot be removed. Make someone else owner first.", field="user_id")
    session.delete(membership)
    _follow_keys(session, org_id, user.id, None, audit)
    for ws in session.scalars(select(WebSession).where(WebSession.user_id == user.id, WebSession.org_id == org_id, WebSession.revoked_at.is_(None))):
        ws.revoked_at = clock.now()
    for link in session.scalars(select(OneTimeLink).where(OneTimeLink.user_id == user.id, OneTimeLink.org_id == org_id, OneTimeLink.used_at.is_(None))):
        link.used_at = clock.now()
    session.flush()
    others = session.scalar(
        select(func.count()).select_from(Membership).where(Membership.user_id == user.id).execution_options(**ALL_ORGANIZATIONS)
    ) or 0
    if not others:
        user.is_active = False
        forget_credentials(session, user)
    _record(audit, session=session, org_id=org_id, action="membership.remove", target_type="user", target_id=user.id,
            details={"role": membership.role, "deactivated": not others})
    return user


# --------------------------------------------------------------------------- invitations and recovery
# Issue 9 item 1. Accounts are global by email, so whoever can add a membership or learn a
# credential of a person could act as that person in every organization they belong to. Hence:
# an invitation reaches the invitee's own mailbox (``account.notice``, delivered by a higher
# capability over the organization's protected mail) and is never shown to the inviting admin;
# the membership exists only once the invitee accepts it — a new person by choosing their own
# password (then their own second factor), an existing account holder while signed in as
# themselves; recovery is by emailed link (the second factor still required) or by owners of
# every organization of the person; a person with no organization left loses every credential.

INVITATION_HOURS_DEFAULT = 72


def _notify(session: Session, kind: str, *, org_id: str | None, user_id: str, **kwargs) -> bool:
    """Publish ``account.notice``; True when a handler queued the email."""
    return any(result is not None for result in events.publish("account.notice", session, kind, org_id=org_id,
                                                                  user_id=user_id, **kwargs))


def _new_link(session: Session, purpose: str, *, user_id: str, org_id: str | None, role: str | None,
              hours: int) -> str:
    """A fresh one-time link of ``purpose`` for the person (earlier unused ones of the same
    purpose and organization stop working); the token, shown nowhere but in the email."""
    query = select(OneTimeLink).where(OneTimeLink.purpose == purpose, OneTimeLink.user_id == user_id,
                                      OneTimeLink.used_at.is_(None))
    if org_id is not None:
        query = query.where(OneTimeLink.org_id == org_id)
    for old in session.scalars(query):
        old.used_at = clock.now()
    token = secrets.token_urlsafe(32)
    session.add(OneTimeLink(purpose=purpose, token_hash=hash_token(token), org_id=org_id, user_id=user_id, role=role,
                            expires_at=clock.now() + timedelta(hours=hours)))
    session.flush()
    return token


def invite_member(session: Session, org_id: str, *, email: str, role: str, display_name: str = "", base_url: str,
                  actor_role: str | None = None, audit: dict | None = None) -> User:
    """Invite a person: a one-time link goes to their own mailbox; nothing is returned to the
    caller but the (pending) person. No membership exists until they accept."""
    from carepost.core.config import get_settings
    from carepost.core.errors import PermissionDenied

    email = normalize_email(email)
    role = _role(role)
    display_name = _display_name(display_name)
    if role == "owner" and actor_role not in (None, "owner"):
        raise PermissionDenied("Only an owner can add another owner.", code="owner_required")
    user = session.scalar(select(User).where(User.email == email))
    created = user is None
    if user is None:
        user = User(email=email, display_name=display_name, password_hash=None, is_active=True)
        session.add(user)
        session.flush()
    elif session.scalar(select(Membership.id).where(Membership.user_id == user.id, Membership.org_id == org_id)):
        raise Conflict("This person already belongs to the organization.", field="email")
    token = _new_link(session, "invitation", user_id=user.id, org_id=org_id, role=role,
                      hours=get_settings().enrollment_link_hours)
    if not _notify(session, "invitation", org_id=org_id, user_id=user.id, role=role,
                   link=f"{base_url}/app/invite/{token}"):
        raise Conflict("Invitations are emailed to the person: add a sending domain to the organization first.",
                       field="email", code="no_sending_domain")
    _record(audit, session=session, org_id=org_id, action="membership.invite", target_type="user", target_id=user.id,
            details={"role": role, "new_account": created})
    return user


def pending_invitations(session: Session, org_id: str) -> list[tuple[User, OneTimeLink]]:
    rows = session.execute(
        select(User, OneTimeLink).join(OneTimeLink, OneTimeLink.user_id == User.id)
        .where(OneTimeLink.purpose == "invitation", OneTimeLink.org_id == org_id, OneTimeLink.used_at.is_(None),
               OneTimeLink.expires_at > clock.now())
        .order_by(User.email)
    ).all()
    return [(u, link) for u, link in rows]


def accept_invitation(session: Session, link: OneTimeLink, *, user_id: str, password: str | None = None,
                      display_name: str | None = None, audit: dict | None = None) -> Membership:
    """The invitee accepts: ``user_id`` is who is signed in (an existing account holder) or the
    link's own person choosing a first password (``password``). Anyone else is refused."""
    from carepost.accounts.passwords import hash_password, validate_password
    from carepost.core.errors import PermissionDenied

    user = session.get(User, link.user_id) if link.user_id else None
    if user is None or link.org_id is None:
        raise NotFound("This link is not valid. Check that you copied all of it.", field="token")
    if user_id != user.id:
        raise PermissionDenied("This invitation is for another account. Sign out and open the link again.",
                               field="token", code="wrong_account")
    if password is not None:
        if user.password_hash is not None:
            raise Conflict("You already have an account: sign in, then open the link again.", field="password")
        if display_name is not None and display_name.strip():
            user.display_name = _display_name(display_name)
        org = session.get(Organization, link.org_id)
        validate_password(password, email=user.email, org_name=org.name if org else None, display_name=user.display_name)
        user.password_hash = hash_password(password)
        user.password_changed_at = clock.now()
    elif user.password_hash is None:
        raise ValidationFailed("Choose a password.", field="password")
    user.is_active = True
    membership = add_membership(session, link.org_id, user, _role(link.role or "read_only"))
    link.used_at = clock.now()
    _record(audit, session=session, org_id=link.org_id, actor_type="user", actor_id=user.id, action="membership.accept",
            target_type="user", target_id=user.id, details={"role": membership.role})
    return membership


def request_password_reset(session: Session, email: str, base_url: str, *, audit: dict | None = None) -> None:
    """Email a one-time reset link to the person, if the address has an active account with an
    organization. Answers the same either way (no account enumeration)."""
    from carepost.core.config import get_settings

    try:
        email = normalize_email(email)
    except ValidationFailed:
        raise
    user = session.scalar(select(User).where(User.email == email, User.is_active.is_(True)))
    if user is None or user.password_hash is None:
        return
    orgs = organizations_of_user(session, user.id)
    if not orgs:
        return
    token = _new_link(session, "password_reset", user_id=user.id, org_id=None, role=None,
                      hours=max(1, min(24, get_settings().enrollment_link_hours)))
    link = f"{base_url}/app/password-reset/{token}"
    sent = False
    for org, _role_name in orgs:  # the first organization that can send mail
        if _notify(session, "password_reset", org_id=org.id, user_id=user.id, link=link):
            sent = True
            break
    _record(audit, session=session, org_id=orgs[0][0].id, actor_type="anonymous", actor_id=None,
            action="auth.password_reset_request", target_type="user", target_id=user.id, details={"sent": sent})


def complete_password_reset(session: Session, link: OneTimeLink, password: str, *, audit: dict | None = None) -> User:
    """A new password from the emailed link. Sessions end; the second factor stays required."""
    from carepost.accounts.passwords import hash_password, validate_password
    from carepost.accounts.sessions import revoke_user_sessions

    user = session.get(User, link.user_id) if link.user_id else None
    if user is None or not user.is_active:
        raise NotFound("This link is not valid. Check that you copied all of it.", field="token")
    validate_password(password, email=user.email, display_name=user.display_name)
    user.password_hash = hash_password(password)
    user.password_changed_at = clock.now()
    user.failed_logins = 0
    user.locked_until = None
    link.used_at = clock.now()
    revoke_user_sessions(session, user.id)
    for org, _r in organizations_of_user(session, user.id):
        _record(audit, session=session, org_id=org.id, actor_type="user", actor_id=user.id,
                action="auth.password_reset", target_type="user", target_id=user.id)
    return user


def _clear_second_factor(session: Session, user: User) -> None:
    from carepost.accounts.mfa import RecoveryCode
    from carepost.accounts.models import WebAuthnCredential

    user.totp_secret = None
    user.totp_confirmed_at = None
    user.totp_last_step = None
    for row in session.scalars(select(WebAuthnCredential).where(WebAuthnCredential.user_id == user.id)):
        session.delete(row)
    for row in session.scalars(select(RecoveryCode).where(RecoveryCode.user_id == user.id)):
        session.delete(row)


def reset_mfa(session: Session, user: User, *, reason: str, audit: dict | None = None) -> None:
    """Remove every second factor of the person and end their sessions; audited in each of
    their organizations. At the next sign-in they set up a new factor."""
    from carepost.accounts.models import MfaResetApproval
    from carepost.accounts.sessions import revoke_user_sessions

    _clear_second_factor(session, user)
    revoke_user_sessions(session, user.id)
    for row in session.scalars(select(MfaResetApproval).where(MfaResetApproval.user_id == user.id)
                               .execution_options(**ALL_ORGANIZATIONS)):
        session.delete(row)
    orgs = organizations_of_user(session, user.id)
    for org, _r in orgs:
        _record(audit, session=session, org_id=org.id, action="auth.mfa_reset", target_type="user", target_id=user.id,
                details={"by": reason})
    if orgs:
        _notify(session, "mfa_reset", org_id=orgs[0][0].id, user_id=user.id)


def approve_mfa_reset(session: Session, org_id: str, user_id: str, *, actor_id: str, actor_role: str | None,
                      audit: dict | None = None) -> bool:
    """An owner of ``org_id`` approves resetting the person's second factor. The reset happens
    when an owner of every organization the person belongs to has approved within a day; True
    then. One organization alone cannot take over a person it shares with another."""
    from carepost.accounts.models import MfaResetApproval
    from carepost.core.errors import PermissionDenied

    if actor_role != "owner":
        raise PermissionDenied("Only an owner can approve a second-factor reset.", code="owner_required")
    user, _m = get_member(session, org_id, user_id)
    if user.id == actor_id:
        raise PermissionDenied("You cannot reset your own second factor; ask another owner.", code="not_self")
    existing = session.scalar(select(MfaResetApproval).where(MfaResetApproval.user_id == user.id,
                                                             MfaResetApproval.org_id == org_id))
    if existing is None:
        session.add(MfaResetApproval(user_id=user.id, org_id=org_id, approved_by=actor_id))
    else:
        existing.approved_by, existing.created_at = actor_id, clock.now()
    session.flush()
    _record(audit, session=session, org_id=org_id, action="auth.mfa_reset_approve", target_type="user", target_id=user.id)
    since = clock.now() - timedelta(days=1)
    approved = set(session.scalars(select(MfaResetApproval.org_id).where(
        MfaResetApproval.user_id == user.id, MfaResetApproval.created_at >= since).execution_options(**ALL_ORGANIZATIONS)))
    needed = {org.id for org, _r in organizations_of_user(session, user.id)}
    if needed <= approved:
        reset_mfa(session, user, reason="owners", audit=audit)
        return True
    return False


def forget_credentials(session: Session, user: User) -> None:
    """A person with no organization left keeps nothing to sign in with: a later invitation
    starts from a new password and a new second factor (no old session, key or factor revives)."""
    from carepost.accounts.sessions import revoke_user_sessions

    user.password_hash = None
    user.password_changed_at = None
    _clear_second_factor(session, user)
    revoke_user_sessions(session, user.id)
    for link in session.scalars(select(OneTimeLink).where(OneTimeLink.user_id == user.id, OneTimeLink.used_at.is_(None))):
        link.used_at = clock.now()
