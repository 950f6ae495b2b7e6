"""REST routes of accounts: people, memberships, sessions, API credentials, OAuth tokens."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1", tags=["accounts"])

# --------------------------------------------------------------------------- people and sessions
# (owned by the accounts/authentication work)
# Imports of this section sit here so the two sections of this file can change independently.
from datetime import datetime as _datetime  # noqa: E402

from fastapi import Depends as _Depends, Request as _Request  # noqa: E402
from fastapi.responses import JSONResponse as _JSONResponse, Response as _Response  # noqa: E402
from pydantic import BaseModel as _BaseModel, ConfigDict as _ConfigDict, Field as _Field  # noqa: E402

from carepost.accounts import service as _people  # noqa: E402
from carepost.accounts.access import Principal as _Principal, request_context as _request_context, require as _require  # noqa: E402
from carepost.accounts.permissions import Permission as _Permission  # noqa: E402
from carepost.core import clock as _clock  # noqa: E402
from carepost.core.config import get_settings as _get_settings  # noqa: E402


class PersonOut(_BaseModel):
    id: str
    email: str
    display_name: str
    role: str
    is_active: bool
    mfa_enabled: bool = _Field(description="TOTP confirmed")
    enrolled: bool = _Field(description="The person has chosen a password")
    created_at: _datetime
    last_login_at: _datetime | None


class PersonCreate(_BaseModel):
    model_config = _ConfigDict(extra="forbid")
    email: str = _Field(max_length=320)
    role: str = _Field(max_length=40)
    display_name: str = _Field("", max_length=200)


class Invitation(_BaseModel):
    id: str = _Field(description="The invited person's id")
    email: str
    role: str
    status: str = _Field(description="invited: the one-time link was emailed to the person; they join by accepting it")


class PersonPatch(_BaseModel):
    model_config = _ConfigDict(extra="forbid")
    role: str = _Field(max_length=40)


def _person(user, membership) -> dict:
    return {
        "id": user.id, "email": user.email, "display_name": user.display_name, "role": membership.role,
        "is_active": user.is_active, "mfa_enabled": user.totp_confirmed_at is not None,
        "enrolled": user.password_hash is not None, "created_at": _clock.aware(user.created_at),
        "last_login_at": _clock.aware(user.last_login_at),
    }


def _who(principal: _Principal, request: _Request) -> dict:
    return {"actor_type": principal.kind, "actor_id": principal.actor_id, "on_behalf_of": principal.on_behalf_of,
            **_request_context(request)}


@router.get("/users", response_model=list[PersonOut], summary="People in the organization")
def api_list_users(request: _Request, principal: _Principal = _Depends(_require(_Permission.USERS_READ))):
    return [_person(u, m) for u, m in _people.list_members(request.state.db, principal.org_id)]


@router.get("/users/{user_id}", response_model=PersonOut, summary="One person")
def api_get_user(user_id: str, request: _Request, principal: _Principal = _Depends(_require(_Permission.USERS_READ))):
    return _person(*_people.get_member(request.state.db, principal.org_id, user_id))


@router.post("/users", response_model=Invitation, status_code=202,
             summary="Invite a person (the one-time link goes to their own mailbox)")
def api_create_user(body: PersonCreate, request: _Request,
                    principal: _Principal = _Depends(_require(_Permission.USERS_MANAGE))):
    """Issue 9 item 1: the caller never receives the link, a password or a second factor; the
    person joins the organization only when they accept the emailed invitation themselves."""
    session = request.state.db
    user = _people.invite_member(session, principal.org_id, email=body.email, role=body.role,
                                 display_name=body.display_name, base_url=_get_settings().base_url,
                                 actor_role=principal.role, audit=_who(principal, request))
    session.commit()
    return _JSONResponse(Invitation(id=user.id, email=user.email, role=body.role, status="invited").model_dump(),
                         status_code=202)


class MfaResetOut(_BaseModel):
    reset: bool = _Field(description="True once owners of every organization of the person approved: factors removed")


@router.post("/users/{user_id}/mfa-reset", response_model=MfaResetOut,
             summary="Approve resetting a person's second factor (owners of every organization of the person)")
def api_mfa_reset(user_id: str, request: _Request, principal: _Principal = _Depends(_require(_Permission.USERS_MANAGE))):
    session = request.state.db
    done = _people.approve_mfa_reset(session, principal.org_id, user_id, actor_id=principal.actor_id,
                                     actor_role=principal.role, audit=_who(principal, request))
    session.commit()
    return MfaResetOut(reset=done)


@router.patch("/users/{user_id}", response_model=PersonOut, summary="Change a person's role")
def api_update_user(user_id: str, body: PersonPatch, request: _Request,
                    principal: _Principal = _Depends(_require(_Permission.USERS_MANAGE))):
    session = request.state.db
    _people.change_role(session, principal.org_id, user_id, body.role, actor_role=principal.role, audit=_who(principal, request))
    session.commit()
    return _person(*_people.get_member(session, principal.org_id, user_id))


@router.delete("/users/{user_id}", status_code=204, summary="Remove a person from the organization")
def api_delete_user(user_id: str, request: _Request, principal: _Principal = _Depends(_require(_Permission.USERS_MANAGE))):
    session = request.state.db
    _people.remove_member(session, principal.org_id, user_id, actor_role=principal.role, audit=_who(principal, request))
    session.commit()
    return _Response(status_code=204)



# --------------------------------------------------------------------------- API credentials and OAuth
# (owned by the API credentials work)

from datetime import datetime  # noqa: E402

from fastapi import Depends, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from carepost.accounts import credentials as creds  # noqa: E402
from carepost.accounts.access import Principal, authenticated, db_session, public, request_context, require  # noqa: E402
from carepost.accounts.permissions import Permission  # noqa: E402
from carepost.accounts.ports import record_for  # noqa: E402


class WhoAmI(BaseModel):
    kind: str = Field(description="user or api_credential")
    org_id: str
    org_slug: str | None
    org_name: str | None
    actor_id: str
    user_id: str | None
    credential_id: str | None
    key_id: str | None
    auth_method: str | None = Field(description="session, api_key, basic, oauth_token or hmac")
    scopes: list[str] = Field(description="Permissions this caller holds in the organization")
    sandbox: bool
    rate_limit_per_minute: int | None


class ApiCredentialCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=creds.NAME_MAX, description="What the credential is for")
    scopes: list[str] = Field(default_factory=list, description="API scopes; never more than your own permissions. "
                              "`org:manage` (the organization's delivery and portal settings) only an owner may grant.")
    expires_in_days: int | None = Field(None, ge=1, le=creds.MAX_EXPIRY_DAYS, description="Empty: the installation default (CAREPOST_API_KEY_EXPIRY_DAYS, one year)")
    sandbox: bool = Field(False, description="Requests made with it are test traffic: nothing is delivered")
    rate_limit_per_minute: int | None = Field(None, ge=1, le=100_000, description="Empty: the server default")


class ApiCredentialOut(BaseModel):
    id: str
    key_id: str
    name: str
    scopes: list[str]
    sandbox: bool
    rate_limit_per_minute: int | None
    created_by: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    status: str = Field(description="active, suspended (scopes exceed the creator's current role), expired or revoked")
    suspended_at: datetime | None = None
    expires_soon: bool = Field(False, description="Active and expiring within 30 days: replace it")


class ApiCredentialCreated(ApiCredentialOut):
    secret: str = Field(description="Shown once. Store it now; CarePost keeps only a hash.")
    token: str = Field(description="`<key_id>.<secret>`, for `Authorization: Bearer`")


class ApiCredentialList(BaseModel):
    items: list[ApiCredentialOut]


@router.get("/me", response_model=WhoAmI, tags=["auth"])
def who_am_i(principal: Principal = Depends(authenticated()), session: Session = Depends(db_session)) -> WhoAmI:
    """Who is calling: kind, organization, scopes. Handy to check a credential."""
    org = creds.organization_of(session, principal.org_id)
    return WhoAmI(
        kind=principal.kind,
        org_id=principal.org_id,
        org_slug=org.slug if org else None,
        org_name=org.name if org else None,
        actor_id=principal.actor_id,
        user_id=principal.user_id,
        credential_id=principal.credential_id,
        key_id=principal.extra.get("key_id"),
        auth_method=principal.extra.get("auth_method") or ("session" if principal.via_cookie else None),
        scopes=sorted(str(p) for p in principal.permissions),
        sandbox=principal.sandbox,
        rate_limit_per_minute=principal.rate_limit_per_minute,
    )


@router.get("/api-credentials", response_model=ApiCredentialList, tags=["api credentials"])
def list_api_credentials(
    principal: Principal = Depends(require(Permission.APIKEYS_MANAGE)), session: Session = Depends(db_session)
) -> ApiCredentialList:
    now = creds.clock.now()
    return ApiCredentialList(items=[creds.credential_view(c, now) for c in creds.list_credentials(session, principal.org_id)])


@router.post("/api-credentials", response_model=ApiCredentialCreated, status_code=201, tags=["api credentials"])
def create_api_credential(
    body: ApiCredentialCreate,
    request: Request,
    principal: Principal = Depends(require(Permission.APIKEYS_MANAGE)),
    session: Session = Depends(db_session),
) -> ApiCredentialCreated:
    """Create an API credential. The secret is in this response only."""
    cred, secret = creds.create_credential(
        session,
        principal.org_id,
        name=body.name,
        scopes=body.scopes,
        creator_permissions=principal.permissions,
        creator_role=principal.role if principal.kind == "user" else None,
        created_by=principal.user_id or principal.actor_id,
        expires_in_days=body.expires_in_days,
        sandbox=body.sandbox,
        rate_limit_per_minute=body.rate_limit_per_minute,
    )
    record_for(
        session, principal, request, "api_credential.create", target_type="api_credential", target_id=cred.id,
        details={"key_id": cred.key_id, "scopes": list(cred.scopes), "sandbox": cred.sandbox},
    )
    session.commit()
    return ApiCredentialCreated(**creds.credential_view(cred), secret=secret, token=f"{cred.key_id}.{secret}")


@router.get("/api-credentials/{credential_id}", response_model=ApiCredentialOut, tags=["api credentials"])
def get_api_credential(
    credential_id: str, principal: Principal = Depends(require(Permission.APIKEYS_MANAGE)), session: Session = Depends(db_session)
) -> ApiCredentialOut:
    return ApiCredentialOut(**creds.credential_view(creds.get_credential(session, principal.org_id, credential_id)))


@router.delete("/api-credentials/{credential_id}", response_model=ApiCredentialOut, tags=["api credentials"])
def revoke_api_credential(
    credential_id: str,
    request: Request,
    principal: Principal = Depends(require(Permission.APIKEYS_MANAGE)),
    session: Session = Depends(db_session),
) -> ApiCredentialOut:
    """Revoke a credential; its OAuth access tokens stop working at once."""
    cred = creds.get_credential(session, principal.org_id, credential_id)
    tokens = creds.revoke_credential(session, cred)
    record_for(
        session, principal, request, "api_credential.revoke", target_type="api_credential", target_id=cred.id,
        details={"key_id": cred.key_id, "tokens_revoked": tokens},
    )
    session.commit()
    return ApiCredentialOut(**creds.credential_view(cred))


_OAUTH_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "grant_type": {"type": "string", "enum": ["client_credentials"]},
                        "scope": {"type": "string", "description": "Space-separated subset of the credential's scopes"},
                        "client_id": {"type": "string", "description": "Key id, when not sent by HTTP Basic"},
                        "client_secret": {"type": "string", "description": "Secret, when not sent by HTTP Basic"},
                    },
                    "required": ["grant_type"],
                }
            }
        },
    }
}
_OAUTH_REVOKE_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "token": {"type": "string"},
                        "token_type_hint": {"type": "string"},
                        "client_id": {"type": "string"},
                        "client_secret": {"type": "string"},
                    },
                    "required": ["token"],
                }
            }
        },
    }
}
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _oauth_error(exc: creds.OAuthError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers={**exc.headers, **_NO_STORE})


async def _oauth_form(request: Request):
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise creds.OAuthError("invalid_request", "Send the parameters as application/x-www-form-urlencoded.")
    return await request.form()


@router.post(
    "/oauth/token",
    dependencies=[Depends(public("OAuth 2.0 token endpoint: authenticates the client itself (RFC 6749 4.4)"))],
    tags=["oauth"],
    openapi_extra=_OAUTH_FORM,
)
async def oauth_token(request: Request, session: Session = Depends(db_session)) -> JSONResponse:
    """Client credentials grant: exchange a key id and secret for a short-lived access token."""
    try:
        form = await _oauth_form(request)
        body = await run_in_threadpool(
            creds.issue_token, session, form, form.getlist, request.headers.get("authorization", ""), request_context(request)
        )
    except creds.OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse(body, headers=_NO_STORE)


@router.post(
    "/oauth/revoke",
    dependencies=[Depends(public("OAuth 2.0 token revocation: authenticates the client itself (RFC 7009)"))],
    tags=["oauth"],
    openapi_extra=_OAUTH_REVOKE_FORM,
)
async def oauth_revoke(request: Request, session: Session = Depends(db_session)) -> JSONResponse:
    """Revoke an access token (RFC 7009). Unknown tokens are answered the same way."""
    try:
        form = await _oauth_form(request)
        await run_in_threadpool(
            creds.revoke_token, session, form, form.getlist, request.headers.get("authorization", ""), request_context(request)
        )
    except creds.OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse({}, headers=_NO_STORE)
