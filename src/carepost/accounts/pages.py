"""UI routes of accounts: setup, sign-in, MFA, organization switch, people, API credentials."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/app", include_in_schema=False)

# --------------------------------------------------------------------------- setup, sign-in, MFA, people
# (owned by the accounts/authentication work)


# --------------------------------------------------------------------------- API credentials
# (owned by the API credentials work)
