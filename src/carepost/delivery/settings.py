"""An organization's delivery settings (security mode, default purpose, its own relay) and the
purposes a message may name.

(Split out of ``delivery.service``, which still exports every public name.)

The organization's relay (issue 10 item 9) overrides the installation's (``CAREPOST_SMTP_RELAY``)
for this organization's mail: ``host[:port]`` or ``host@address:port`` (port 587 by default), an
optional AUTH user name and password, and whether the relay enforces verified TLS onward (the
meaning of ``CAREPOST_SMTP_RELAY_ENFORCES_TLS``). The password is write-only: kept encrypted with
the organization's keyring, never returned — only ``password_set``. The relay's addresses are
checked by the SSRF guard like an MX's (an organization chose them, not the operator):
loopback and private addresses need ``CAREPOST_DELIVERY_ALLOWED_HOSTS``. Without an organization
relay the installation's relay is used, or direct MX delivery.
"""

from __future__ import annotations

import base64
import ipaddress
import re

from sqlalchemy.orm import Session

from carepost.core.errors import ValidationFailed
from carepost.delivery import policy

# --- organization delivery settings ------------------------------------------------------------
# Kept in the organization's settings: ``security_mode`` (the floor every message starts from,
# default tls_required) and ``default_purpose`` (the purpose of a message that names none).

DEFAULT_SECURITY_MODE = "tls_required"
_PURPOSE_SHAPE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def known_purposes() -> tuple[str, ...]:
    """The purposes CarePost knows (``core.purposes``)."""
    from carepost.core.purposes import PURPOSES

    return tuple(PURPOSES)


def check_purpose(purpose, field_name: str = "purpose") -> str:
    if not isinstance(purpose, str) or not _PURPOSE_SHAPE.match(purpose):
        raise ValidationFailed("The purpose is a lowercase name such as treatment or marketing.", field=field_name)
    known = known_purposes()
    if purpose not in known:
        raise ValidationFailed(f"Unknown purpose; use one of {', '.join(known)}.", field=field_name)
    return purpose


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_RELAY_TABLE, _RELAY_COLUMN = "organizations", "relay_password"  # the keyring's associated data


def parse_org_relay(value, field_name: str = "relay.host"):
    """``host[:port]`` or ``host@address:port`` -> (normalized text, MxTarget). The target is not
    ``overridden``: its addresses go through the SSRF guard at connect time."""
    from dataclasses import replace

    from carepost.delivery.smtp import parse_relay

    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise ValidationFailed("Enter the relay host, host:port or host@address:port.", field=field_name)
    if len(text) > 300 or any(ch.isspace() or ch in ",=/" for ch in text):
        raise ValidationFailed("The relay is host, host:port or host@address:port (no spaces).", field=field_name)
    try:
        target = parse_relay(text)
    except (ValueError, TypeError):
        raise ValidationFailed("The relay is host, host:port or host@address:port with a valid address and "
                               "port.", field=field_name) from None
    host = target.host
    if not _HOST_NAME.match(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValidationFailed("The relay host is not a valid host name.", field=field_name) from None
    if not 1 <= target.port <= 65535:
        raise ValidationFailed("The relay port is a number from 1 to 65535.", field=field_name)
    return text.lower(), replace(target, overridden=False)


def _relay_view(stored: dict | None) -> dict | None:
    if not stored:
        return None
    try:
        port = parse_org_relay(stored["host"])[1].port
    except ValidationFailed:
        port = None
    return {"host": stored["host"], "port": port, "username": stored.get("username"),
            "password_set": bool(stored.get("password_enc")), "enforces_tls": bool(stored.get("enforces_tls"))}


def delivery_settings(session: Session, org_id: str) -> dict:
    from carepost.accounts.service import get_organization

    values = get_organization(session, org_id).settings or {}
    return {"security_mode": values.get("security_mode") or DEFAULT_SECURITY_MODE,
            "default_purpose": values.get("default_purpose"),
            "relay": _relay_view(values.get("relay")),
            "engagement_privacy": bool(values.get("engagement_privacy"))}


def organization_relay(session: Session, org_id: str):
    """The organization's relay for delivery (``smtp.Relay``, password decrypted), or None."""
    from carepost.accounts.service import get_organization
    from carepost.core.crypto import get_keyring
    from carepost.delivery.smtp import Relay

    stored = (get_organization(session, org_id).settings or {}).get("relay")
    if not stored:
        return None
    _, target = parse_org_relay(stored["host"])
    password = None
    if stored.get("password_enc"):
        password = get_keyring().decrypt_text(session, org_id, _RELAY_TABLE, _RELAY_COLUMN, org_id,
                                              base64.b64decode(stored["password_enc"]))
    return Relay(target, stored.get("username") or None, password, owner=org_id,
                 enforces_tls=bool(stored.get("enforces_tls")))


def relay_mode(settings, org_relay: dict | None) -> str | None:
    """What the policy knows of the relay (``policy.decide(relay=...)``): the organization's relay
    when it has one (a ``delivery_settings()["relay"]`` view or ``smtp.Relay`` plus its flag), else
    the installation's; None: direct MX delivery. Under the local mail capture of ``carepost run``
    the organization's relay is not used (nothing leaves the machine)."""
    from carepost.delivery.domains import local_capture

    if org_relay and not local_capture(settings):
        enforces = org_relay.get("enforces_tls") if isinstance(org_relay, dict) else org_relay.enforces_tls
        return "enforcing" if enforces else "plain"
    if settings.smtp_relay:
        return "enforcing" if settings.smtp_relay_enforces_tls else "plain"
    return None


def _check_relay(session: Session, org_id: str, value, current: dict | None) -> dict | None:
    """The stored form of a relay change: ``{"host", "username", "password" (None keeps the stored
    one, "" removes it), "enforces_tls"}``; None removes the organization's relay."""
    from carepost.core.crypto import get_keyring

    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationFailed("The relay is an object with host, username, password and enforces_tls.", field="relay")
    unknown = set(value) - {"host", "username", "password", "enforces_tls"}
    if unknown:
        raise ValidationFailed("Unknown relay setting.", field=f"relay.{min(unknown)}")
    host, _ = parse_org_relay(value.get("host"))
    username = value.get("username")
    if username is not None and not isinstance(username, str):
        raise ValidationFailed("The relay user name is text.", field="relay.username")
    username = (username or "").strip() or None
    if username and (len(username) > 255 or any(ord(ch) < 32 or ord(ch) == 127 for ch in username)):
        raise ValidationFailed("The relay user name is at most 255 characters, without control characters.",
                               field="relay.username")
    password = value.get("password")
    if password is not None and (not isinstance(password, str) or len(password) > 1024
                                 or any(ord(ch) < 32 or ord(ch) == 127 for ch in password)):
        raise ValidationFailed("The relay password is at most 1024 characters, without control characters.",
                               field="relay.password")
    enforces_tls = value.get("enforces_tls", False)
    if not isinstance(enforces_tls, bool):
        raise ValidationFailed("enforces_tls is true or false.", field="relay.enforces_tls")
    stored = {"host": host, "username": username, "password_enc": None, "enforces_tls": enforces_tls}
    current = current or {}
    if password:
        blob = get_keyring().encrypt(session, org_id, _RELAY_TABLE, _RELAY_COLUMN, org_id, password)
        stored["password_enc"] = base64.b64encode(blob).decode()
    elif password is None and current.get("password_enc"):
        if current.get("host") != host or current.get("username") != username:
            # A stored password is never sent to another server or for another user name.
            raise ValidationFailed("Enter the relay password again: the host or user name changed.",
                                   field="relay.password")
        stored["password_enc"] = current["password_enc"]
    if stored["password_enc"] and not username:
        raise ValidationFailed("A relay password needs a user name.", field="relay.username")
    return stored


def update_delivery_settings(session: Session, org_id: str, changes: dict) -> dict:
    """Change ``security_mode``, ``default_purpose`` (None clears the default purpose) and/or
    ``relay`` (None removes the organization's relay; see :func:`_check_relay`).
    Lowering the mode is allowed here: it is the organization's own decision, audited by the
    route; messages already accepted keep the mode they were accepted with, or a higher one."""
    from carepost.accounts.service import get_organization

    org = get_organization(session, org_id)
    values = dict(org.settings or {})
    for key, value in changes.items():
        if key == "security_mode":
            if value not in policy.MODES:
                raise ValidationFailed(f"Unknown security mode; use one of {', '.join(policy.MODES)}.", field=key)
            values[key] = value
        elif key == "default_purpose":
            if value is None:
                values.pop(key, None)
            else:
                values[key] = check_purpose(value, key)
        elif key == "relay":
            stored = _check_relay(session, org_id, value, values.get("relay"))
            if stored is None:
                values.pop(key, None)
            else:
                values[key] = stored
        elif key == "engagement_privacy":
            # Issue 13 item 1: aggregate engagement counts only (carepost.tracking.engagement).
            if not isinstance(value, bool):
                raise ValidationFailed("engagement_privacy is true or false.", field=key)
            values[key] = value
        else:
            raise ValidationFailed("Unknown delivery setting.", field=key)
    org.settings = values
    session.flush()
    return delivery_settings(session, org_id)
