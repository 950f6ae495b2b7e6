"""An organization's delivery settings (security mode, default purpose) and the purposes a message may name.

(Split out of ``delivery.service``, which still exports every public name.)
"""

from __future__ import annotations

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


def delivery_settings(session: Session, org_id: str) -> dict:
    from carepost.accounts.service import get_organization

    values = get_organization(session, org_id).settings or {}
    return {"security_mode": values.get("security_mode") or DEFAULT_SECURITY_MODE,
            "default_purpose": values.get("default_purpose")}


def update_delivery_settings(session: Session, org_id: str, changes: dict) -> dict:
    """Change ``security_mode`` and/or ``default_purpose`` (None clears the default purpose).
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
        else:
            raise ValidationFailed("Unknown delivery setting.", field=key)
    org.settings = values
    session.flush()
    return delivery_settings(session, org_id)
