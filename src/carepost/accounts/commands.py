"""What every capability's command line needs from accounts: the organization an ``--org``
option names."""

from __future__ import annotations

from carepost.core.console import fail


def organization(org: str) -> tuple[str, str]:
    """The organization ``org`` names (its slug or id) as ``(id, slug)``; exits 1 with the
    reason when there is none."""
    from carepost.accounts.service import get_organization
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            found = get_organization(session, org)
        except CarePostError as exc:
            fail(exc.message)
        return found.id, found.slug


def organization_id(org: str) -> str:
    """The id of the organization ``org`` names (slug or id); exits 1 with the reason otherwise."""
    return organization(org)[0]
