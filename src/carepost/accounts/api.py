"""REST routes of accounts: people, memberships, sessions, API credentials, OAuth tokens."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1", tags=["accounts"])

# --------------------------------------------------------------------------- people and sessions
# (owned by the accounts/authentication work)


# --------------------------------------------------------------------------- API credentials and OAuth
# (owned by the API credentials work)
