"""Tenant isolation (ARCHITECTURE.md section 5, issue item 10): organization A's API credential
and A's signed-in owner can neither read nor change anything of organization B, through any route.

The sweep is generic so routes added later are covered without touching this file:

1. B is filled through B's own routes: every POST route without a path parameter is called by
   B's owner with a body generated from the route's schema (whatever succeeds adds B rows), on
   top of the rows made directly (people, credentials, an OAuth token, audit events).
2. Every row of B is snapshotted: each table with an ``org_id`` column (or an audit ``chain``,
   or a ``user_id`` of B's people), and the ids found in those rows become candidates.
3. Every non-public route of the app is called by A (credential and cookie session) with each
   candidate id in every path parameter and in every string field of its body. Routes with a
   path parameter must answer 403/404 (or reject the input); no answer to A may contain B's
   marker text, list answers may not contain B's ids, A must stay in organization A.
4. B's rows are compared with the snapshot: nothing changed.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from contextlib import ExitStack

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select

from carepost.accounts import credentials as creds
from carepost.accounts.access import declared_access
from carepost.accounts.models import ApiCredential
from carepost.accounts.permissions import API_SCOPES
from tests.fixtures.accounts import login_client

MARKER = "zeta"  # every B value a human would recognise contains it; A must never see it
_ID = re.compile(r"^[0-9a-f]{32}$|^[0-9a-f]{64}$")
REJECTED = {400, 403, 404, 409, 410, 422}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


# --------------------------------------------------------------------------- helpers


def _routes(app):
    for context in iter_route_contexts(app.routes):
        route = context.route
        if not isinstance(route, APIRoute):
            continue
        kind = (declared_access(route) or ("none",))[0]
        for method in sorted(context.methods or ()):
            if method in METHODS:
                yield method, context.path, route, kind


def _resolve(schema: dict, doc: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        schema = doc["components"]["schemas"][name]
    return schema


def _sample(schema: dict, doc: dict, fill: str, counter=itertools.count()):
    """A value matching ``schema`` (required fields only), strings set to ``fill``."""
    schema = _resolve(schema, doc)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if _resolve(s, doc).get("type") != "null"] or schema[key]
            return _sample(options[0], doc, fill, counter)
    if "allOf" in schema:
        merged: dict = {}
        for part in schema["allOf"]:
            merged.update(_resolve(part, doc))
        return _sample(merged, doc, fill, counter)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {name: _sample(props[name], doc, fill, counter) for name in schema.get("required", []) if name in props}
    if kind == "array":
        if schema.get("minItems", 0) > 0:
            return [_sample(schema.get("items", {}), doc, fill, counter)]
        return []
    if kind == "integer":
        return max(int(schema.get("minimum", 1)), 1)
    if kind == "number":
        return max(schema.get("minimum", 1), 1)
    if kind == "boolean":
        return False
    fmt = schema.get("format")
    if fmt == "email":
        return f"{fill[:12]}-{next(counter)}@example.test"
    if fmt == "date":
        return "2020-01-01"
    if fmt == "date-time":
        return "2020-01-01T00:00:00Z"
    return fill


def _request_kwargs(method: str, path: str, route: APIRoute, doc: dict, fill: str) -> dict:
    """Body for a route: JSON from the OpenAPI document, form fields from the route's parameters."""
    if method in ("GET", "DELETE"):
        return {}
    op = doc["paths"].get(path, {}).get(method.lower(), {})
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        return {"json": _sample(content["application/json"]["schema"], doc, fill)}
    body_params = route.dependant.body_params
    if not body_params:
        return {}
    from fastapi import params

    if any(isinstance(p.field_info, params.Form) for p in body_params):
        return {"data": {p.alias: fill for p in body_params}}
    if len(body_params) == 1:
        return {"json": {}}
    return {"json": {p.alias: {} if "credential" in p.alias else fill for p in body_params}}


def _scoped_tables():
    from carepost.core.database import Base
    from carepost.models import load_all_models

    load_all_models()
    return list(Base.metadata.sorted_tables)


def _org_rows(org_id: str, user_ids: list[str]) -> dict[str, list[str]]:
    """Every stored row belonging to the organization, canonically rendered."""
    from carepost.core.database import read_only_session

    snapshot: dict[str, list[str]] = {}
    with read_only_session() as s:
        for table in _scoped_tables():
            cols = table.c
            if "org_id" in cols:
                cond = cols.org_id == org_id
            elif "chain" in cols:
                cond = cols.chain == org_id
            elif "user_id" in cols:
                cond = cols.user_id.in_(user_ids)
            elif table.name == "users":
                cond = cols.id.in_(user_ids)
            else:
                continue
            rows = s.execute(select(table).where(cond)).mappings().all()
            snapshot[table.name] = sorted(
                json.dumps({k: (v.hex() if isinstance(v, bytes) else repr(v)) for k, v in row.items()}, sort_keys=True)
                for row in rows
            )
    return snapshot


def _candidate_ids(snapshot: dict[str, list[str]], org_id: str) -> list[str]:
    """One id per table column of B's rows (a route's parameter names one of them), plus B's organization id."""
    found: dict[tuple[str, str], list[str]] = {}
    for table, rows in snapshot.items():
        for text in rows:
            for column, value in json.loads(text).items():
                if not (column == "id" or column.endswith("_id") or column == "chain"):
                    continue
                raw = value.strip("'")
                if _ID.match(raw):
                    bucket = found.setdefault((table, column), [])
                    if raw not in bucket and len(bucket) < 1:
                        bucket.append(raw)
    ids = {org_id}
    for bucket in found.values():
        ids.update(bucket)
    return sorted(ids)


class Caller:
    """One of A's identities (an API credential, or the owner's cookie session)."""

    def __init__(self, name: str, client: TestClient, reauth):
        self.name = name
        self.client = client
        self.reauth = reauth

    def request(self, method: str, url: str, **kw):
        return self.client.request(method, url, **kw)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def tenants(app, session, org, make_user):
    """Organization A (``org``) and B ("Zeta ..."), each with an owner, a credential and a token.

    The three clients are entered (as ``with TestClient(...)``): an entered client keeps one
    event loop thread for all its requests, where one not entered starts a new thread, loop and
    worker thread for every request — about a tenth of a sweep shard's 1,200-1,300 requests."""
    from carepost.accounts.service import create_organization

    b_org = create_organization(session, "Zeta Isolation Clinic")
    session.commit()
    a_owner = make_user(org, role="owner")
    b_owner = make_user(b_org, role="owner", email="zeta-owner@example.test")
    b_analyst = make_user(b_org, role="analyst", email="zeta-analyst@example.test")
    a_cred, a_secret = creds.create_credential(session, org.id, name="Alpha key", scopes=sorted(API_SCOPES),
                                               rate_limit_per_minute=100_000)
    b_cred, b_secret = creds.create_credential(session, b_org.id, name="Zeta sync", scopes=sorted(API_SCOPES),
                                               rate_limit_per_minute=100_000)
    session.commit()

    clients = ExitStack()
    b_client = clients.enter_context(TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False))
    b_token = b_client.post("/api/v1/oauth/token", data={"grant_type": "client_credentials"},
                            auth=(b_cred.key_id, b_secret)).json()["access_token"]
    b_client.headers["X-CSRF-Token"] = login_client(b_client, b_owner)

    a_key_client = clients.enter_context(TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False))
    a_key_client.headers["Authorization"] = f"Bearer {a_cred.key_id}.{a_secret}"
    a_web_client = clients.enter_context(TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False))

    def login_a():
        a_web_client.cookies.clear()
        a_web_client.headers.pop("X-CSRF-Token", None)
        a_web_client.headers["X-CSRF-Token"] = login_client(a_web_client, a_owner)

    login_a()
    with clients:
        yield {
            "a_org": org, "b_org": b_org, "a_owner": a_owner, "b_users": [b_owner.id, b_analyst.id],
            "a_cred": a_cred, "b_cred": b_cred, "b_secret": b_secret, "b_token": b_token, "b_client": b_client,
            "callers": [Caller("A api credential", a_key_client, None), Caller("A owner session", a_web_client, login_a)],
        }


def _seed_through_b_routes(app, b_client: TestClient) -> int:
    """B's owner calls every POST route without a path parameter with a generated body."""
    doc = app.openapi()
    created = 0
    for method, path, route, kind in _routes(app):
        if method != "POST" or "{" in path or kind == "public" or path in ("/app/logout", "/app/switch-org"):
            continue
        if not path.startswith(("/api/v1", "/app")):
            continue
        r = b_client.request(method, path, **_request_kwargs(method, path, route, doc, f"{MARKER} seed value"))
        created += r.status_code in (200, 201, 202, 303)
    return created


# --------------------------------------------------------------------------- the sweep
#
# The sweep is split into SHARDS tests, each taking whole route families (the first path segment
# after /api/v1/ or /app/), so pytest-xdist can run them on both workers (one test was 100-160 s,
# the suite's longest). The families are dealt out when the test runs, from the app's own routes:
# a route added later lands in some shard without touching this file, and test_shards_cover_every
# _route checks that every route is swept by exactly one shard. Each shard arranges A and B afresh
# (B filled through all of B's routes, as before) and checks B's rows afterwards.

SHARDS = 6


def _family(path: str) -> str:
    for prefix in ("/api/v1/", "/app/"):
        if path.startswith(prefix):
            return path[len(prefix):].split("/", 1)[0].split("{", 1)[0] or "/"
    return path.strip("/").split("/", 1)[0] or "/"


def _shard_families(app) -> list[set[str]]:
    """The route families dealt into SHARDS groups of similar size (requests the sweep makes:
    a listing is one request, any other route one per candidate id), largest family first."""
    weight: dict[str, int] = {}
    for method, path, route, kind in _routes(app):
        if kind == "public" or path == "/app/logout":
            continue
        listing = method == "GET" and not route.dependant.path_params
        weight[_family(path)] = weight.get(_family(path), 0) + (1 if listing else 12)
    shards: list[tuple[int, set[str]]] = [(0, set()) for _ in range(SHARDS)]
    for family in sorted(weight, key=lambda f: (-weight[f], f)):
        i = min(range(SHARDS), key=lambda k: (shards[k][0], k))
        shards[i] = (shards[i][0] + weight[family], shards[i][1] | {family})
    return [families for _, families in shards]


def _sweep_routes(app, callers, families: set[str] | None = None):
    return [
        (caller, method, path, route)
        for caller in callers
        for method, path, route, kind in _routes(app)
        # Public routes carry their own tokens; logout only ends A's own session. API
        # credentials are for /api/v1; the owner's session is swept over /api/v1 and /app.
        if kind != "public" and path != "/app/logout"
        and path.startswith(("/api/v1",) if caller.reauth is None else ("/api/v1", "/app"))
        and (families is None or _family(path) in families)
    ]


def test_shards_cover_every_route(app):
    """Every route the sweep concerns is in exactly one shard; none is empty."""
    callers = [Caller("api", None, None), Caller("web", None, lambda: None)]
    shards = _shard_families(app)
    assert all(shards) and len(set().union(*shards)) == sum(len(f) for f in shards)
    everything = _sweep_routes(app, callers)
    swept = [r for families in shards for r in _sweep_routes(app, callers, families)]
    assert len(everything) > 300
    key = lambda r: (r[0].name, r[1], r[2])
    assert sorted(map(key, swept)) == sorted(map(key, everything))


@pytest.mark.slow  # 25-55 s a shard
@pytest.mark.parametrize("shard", range(SHARDS), ids=lambda i: f"shard{i + 1}of{SHARDS}")
def test_no_route_lets_a_read_or_change_b(app, tenants, session, shard):
    a_org, b_org = tenants["a_org"], tenants["b_org"]
    _seed_through_b_routes(app, tenants["b_client"])
    b_users = tenants["b_users"]
    before = _org_rows(b_org.id, b_users)
    assert before["api_credentials"] and before["oauth_tokens"] and before["memberships"] and before["audit_events"]
    candidates = _candidate_ids(before, b_org.id)
    assert tenants["b_cred"].id in candidates and b_users[0] in candidates

    doc = app.openapi()
    problems: list[str] = []
    crashes: list[str] = []
    families = _shard_families(app)[shard]
    sweep = _sweep_routes(app, tenants["callers"], families)

    # Listings first, while A's own data holds no copy of a B id (A's later attempts are audited
    # in A's log with B's ids as targets, which is correct).
    for caller, method, path, route in sweep:
        if method == "GET" and not route.dependant.path_params:
            r = caller.request(method, path)
            leaked = [c for c in candidates if c in r.text]
            if leaked or MARKER in r.text.lower():
                problems.append(f"{caller.name}: GET {path} -> shows B's data {leaked}")

    checked = 0
    for caller, method, path, route in sweep:
        params = [p.alias for p in route.dependant.path_params]
        if not params and method == "GET":
            continue
        for value in candidates:
            url = path
            for name in params:
                url = url.replace("{" + name + "}", value)
            r = caller.request(method, url, **_request_kwargs(method, path, route, doc, value))
            checked += 1
            where = f"{caller.name}: {method} {path} with B id {value}"
            if params and r.status_code not in REJECTED:
                problems.append(f"{where} -> {r.status_code} (expected 403/404)")
            elif r.status_code >= 500:
                crashes.append(f"{method} {path} -> {r.status_code}")
            if MARKER in r.text.lower():
                problems.append(f"{where} -> response contains B's data")
            if r.status_code == 403 and '"permission_denied"' in r.text:
                break  # refused before any look-up: the same for every id
        if method != "GET":
            # Still A, in organization A (a route that switched A into B would show here).
            me = caller.request("GET", "/api/v1/me")
            if me.status_code == 401 and caller.reauth:
                caller.reauth()  # e.g. the route revoked A's own session: sign in again
                me = caller.request("GET", "/api/v1/me")
            if me.status_code != 200 or me.json()["org_id"] != a_org.id:
                problems.append(f"{caller.name}: {method} {path} -> A's identity became {me.status_code} {me.text[:200]}")
                if caller.reauth:
                    caller.reauth()
    for crash in sorted(set(crashes)):
        # Not an isolation breach (nothing was written), but bad input must not crash a route.
        warnings.warn(f"tenant sweep: {crash}", stacklevel=1)
    assert checked > 100, checked
    print(f"tenant sweep, shard {shard + 1} of {SHARDS} ({', '.join(sorted(families))}): "
          f"{checked} requests, {len(candidates)} candidate ids")
    assert not problems, "\n".join(problems)
    after = _org_rows(b_org.id, b_users)
    changed = sorted(t for t in before if before[t] != after.get(t))
    assert not changed, f"B's rows changed in: {changed}"


# --------------------------------------------------------------------------- explicit cases


def test_a_credential_cannot_reach_b_credentials(app, tenants, session):
    """The same routes with A's own id work (the sweep's 404s are not a broken route)."""
    key, web = tenants["callers"]
    b_cred, a_cred = tenants["b_cred"], tenants["a_cred"]
    assert web.request("GET", f"/api/v1/api-credentials/{a_cred.id}").status_code == 200
    assert web.request("GET", f"/api/v1/api-credentials/{b_cred.id}").status_code == 404
    assert web.request("DELETE", f"/api/v1/api-credentials/{b_cred.id}").status_code == 404
    assert web.request("POST", f"/app/api-credentials/{b_cred.id}/revoke").status_code == 404
    listing = web.request("GET", "/api/v1/api-credentials").json()["items"]
    assert [c["id"] for c in listing] == [a_cred.id]
    assert key.request("GET", f"/api/v1/api-credentials/{b_cred.id}").status_code == 403  # not even the permission
    session.rollback()
    session.expire_all()
    assert session.get(ApiCredential, b_cred.id).revoked_at is None
    # B's key still works, for B only.
    me = TestClient(app, base_url="http://localhost:8000").get(
        "/api/v1/me", headers={"Authorization": f"Bearer {b_cred.key_id}.{tenants['b_secret']}"})
    assert me.json()["org_id"] == tenants["b_org"].id


def test_a_cannot_revoke_b_oauth_token(app, tenants):
    """RFC 7009 revocation with A's client credentials leaves B's token working."""
    a_cred = tenants["a_cred"]
    a_client = TestClient(app, base_url="http://localhost:8000")
    # A authenticates with a fresh credential of its own (the fixture's secret is not kept).
    from carepost.core.database import system_session

    with system_session() as s:
        cred, secret = creds.create_credential(s, a_cred.org_id, name="Alpha revoker", scopes=[])
        s.commit()
    r = a_client.post("/api/v1/oauth/revoke", data={"token": tenants["b_token"]}, auth=(cred.key_id, secret))
    assert r.status_code == 200
    me = a_client.get("/api/v1/me", headers={"Authorization": f"Bearer {tenants['b_token']}"})
    assert me.status_code == 200 and me.json()["org_id"] == tenants["b_org"].id


def test_a_owner_cannot_switch_into_b(tenants):
    _, web = tenants["callers"]
    r = web.request("POST", "/app/switch-org", data={"org_id": tenants["b_org"].id}, follow_redirects=False)
    assert r.status_code in REJECTED
    assert web.request("GET", "/api/v1/me").json()["org_id"] == tenants["a_org"].id


def test_a_session_of_a_cannot_insert_a_row_of_b(db, session):
    """Issue 9 item 14: the tenant scope refuses INSERT statements that write another
    organization's ``org_id`` — one row, many rows (executemany) or a table-level insert — and
    ORM objects at flush; the organization's own rows still go in."""
    from sqlalchemy import insert

    from carepost.accounts.models import Membership, User
    from carepost.accounts.service import create_organization
    from carepost.core.database import TenantScopeError, org_session
    from carepost.core.ids import new_id

    a = create_organization(session, "Alpha Clinic")
    b = create_organization(session, "Zeta Health")
    user = User(email="someone@example.test", display_name="")
    session.add(user)
    session.commit()
    attempts = [
        lambda s: s.execute(insert(Membership).values(id=new_id(), org_id=b.id, user_id=user.id, role="owner")),
        lambda s: s.execute(insert(Membership), [{"id": new_id(), "org_id": b.id, "user_id": user.id, "role": "owner"}]),
        lambda s: s.execute(Membership.__table__.insert().values(id=new_id(), org_id=b.id, user_id=user.id,
                                                                  role="owner", created_at=clock_now())),
        lambda s: s.execute(insert(Membership).values([{"id": new_id(), "org_id": a.id, "user_id": user.id, "role": "analyst"},
                                                       {"id": new_id(), "org_id": b.id, "user_id": user.id, "role": "owner"}])),
    ]
    for attempt in attempts:
        with org_session(a.id) as s:
            with pytest.raises(TenantScopeError):
                attempt(s)
                s.flush()
            s.rollback()
    with org_session(a.id) as s:
        s.add(Membership(org_id=b.id, user_id=user.id, role="owner"))
        with pytest.raises(TenantScopeError):
            s.flush()
        s.rollback()
    # Nothing reached B; A's own insert works.
    with org_session(a.id) as s:
        s.execute(insert(Membership).values(id=new_id(), org_id=a.id, user_id=user.id, role="analyst"))
        s.commit()
    with org_session(b.id) as s:
        assert s.scalars(select(Membership)).all() == []
    with org_session(a.id) as s:
        assert [m.role for m in s.scalars(select(Membership))] == ["analyst"]


def clock_now():
    from carepost.core import clock

    return clock.now()


def test_insert_select_and_bulk_inserts_stay_in_the_sessions_organization(db, session):
    """Issue 9 item 14, the rest of it: ``INSERT ... SELECT`` and the Session's bulk inserts.
    An ``INSERT ... SELECT`` whose ``org_id`` is another organization's is refused; the SELECT
    inside reads only the session's organization (so B's rows cannot be copied into A either);
    ``bulk_insert_mappings`` and ``bulk_save_objects`` of B's rows are refused."""
    from sqlalchemy import insert, literal

    from carepost.accounts.models import Membership, User
    from carepost.accounts.service import create_organization
    from carepost.core.database import TenantScopeError, org_session
    from carepost.core.ids import new_id

    a = create_organization(session, "Alpha Clinic")
    b = create_organization(session, "Zeta Health")
    users = [User(email=f"person{i}@example.test", display_name="") for i in range(3)]
    session.add_all(users)
    session.flush()
    session.add(Membership(org_id=b.id, user_id=users[0].id, role="owner"))
    session.add(Membership(org_id=a.id, user_id=users[1].id, role="analyst"))
    session.commit()
    names = ["id", "org_id", "user_id", "role", "created_at"]

    def copy_select(org_value):
        return (select(literal(new_id()), org_value, literal(users[2].id), literal("owner"), Membership.created_at)
                .where(Membership.user_id == users[0].id))  # B's membership

    refused = [
        # B's org_id as a literal in the SELECT.
        lambda s: s.execute(insert(Membership).from_select(names, copy_select(literal(b.id)))),
        # B's user id read through a subquery of organization data.
        lambda s: s.execute(insert(Membership).from_select(names, select(
            literal(new_id()), literal(a.id),
            select(Membership.user_id).where(Membership.user_id == users[0].id).scalar_subquery(),
            literal("owner"), literal(clock_now())))),
        lambda s: s.bulk_insert_mappings(Membership, [{"id": new_id(), "org_id": b.id, "user_id": users[2].id,
                                                       "role": "owner", "created_at": clock_now()}]),
        lambda s: s.bulk_save_objects([Membership(id=new_id(), org_id=b.id, user_id=users[2].id, role="owner",
                                                  created_at=clock_now())]),
    ]
    for attempt in refused:
        with org_session(a.id) as s:
            with pytest.raises(TenantScopeError):
                attempt(s)
                s.flush()
            s.rollback()
    # A's org_id, or the org_id of the rows read, but the SELECT reads B's membership: the scope
    # hides B's row, nothing is copied.
    with org_session(a.id) as s:
        s.execute(insert(Membership).from_select(names, copy_select(literal(a.id))))
        s.execute(insert(Membership).from_select(names, copy_select(Membership.org_id)))
        s.commit()
    with org_session(a.id) as s:
        assert {m.user_id for m in s.scalars(select(Membership))} == {users[1].id}
    # The organization's own INSERT ... SELECT works (a copy of A's own row).
    with org_session(a.id) as s:
        s.execute(insert(Membership).from_select(names, select(
            literal(new_id()), Membership.org_id, literal(users[2].id), Membership.role, Membership.created_at)
            .where(Membership.user_id == users[1].id)))
        s.commit()
    with org_session(a.id) as s:
        assert {m.user_id for m in s.scalars(select(Membership))} == {users[1].id, users[2].id}
    with org_session(b.id) as s:
        assert [m.user_id for m in s.scalars(select(Membership))] == [users[0].id]
