"""The API read path (issue 11 item 6): remembered API keys stop working within their bound,
and audited reads appended by group commit are each committed, chained and checkpointed
before the caller goes on."""

from __future__ import annotations

import shutil
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from carepost.accounts import credentials as creds
from carepost.accounts.models import ApiCredential
from carepost.audit import checkpoints
from carepost.audit.models import AuditEvent
from carepost.audit.service import AuditAppendFailed, record_committed
from carepost.audit.verify import verify
from carepost.core import clock
from carepost.core.database import org_session, read_only_session, system_session
from tests.test_accounts_credentials import audit_events, bearer, fresh, make_credential  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def fresh_checkpoints(db):
    shutil.rmtree(checkpoints.checkpoint_dir(), ignore_errors=True)
    yield


def _revoke_elsewhere(cred_id: str) -> None:
    """Revoke the way another process would: a plain UPDATE, no ORM object of this process."""
    with system_session() as s:
        s.execute(update(ApiCredential.__table__).where(ApiCredential.__table__.c.id == cred_id).values(revoked_at=clock.now()))
        s.commit()


def test_key_revoked_by_another_process_is_refused_within_the_bound(client, session, make_credential):
    cred, secret = make_credential(scopes=["messages:read"])
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200  # verified and remembered
    _revoke_elsewhere(cred.id)
    clock.advance(timedelta(seconds=creds.VERIFIED_KEY_SECONDS))
    r = client.get("/api/v1/me", headers=bearer(cred, secret))
    assert r.status_code == 401
    failures = audit_events(session, "api_credential.auth_failed")
    assert [e.details["reason"] for e in failures] == ["revoked"] and failures[0].target_id == cred.id


def test_key_revoked_in_this_process_is_refused_at_once(client, session, make_credential):
    cred, secret = make_credential(scopes=["messages:read"])
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
    creds.revoke_credential(session, fresh(session).get(ApiCredential, cred.id))
    session.commit()
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 401


def test_a_remembered_key_still_refuses_a_wrong_secret(client, session, make_credential):
    cred, secret = make_credential(scopes=["messages:read"])
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert client.get("/api/v1/me", headers=bearer(cred, wrong)).status_code == 401
    assert [e.details["reason"] for e in audit_events(session, "api_credential.auth_failed")] == ["wrong_secret"]
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200


def test_last_use_is_still_written_when_due(client, session, make_credential):
    cred, secret = make_credential(scopes=["messages:read"])
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
    first = fresh(session).get(ApiCredential, cred.id).last_used_at
    clock.advance(creds.LAST_USED_RESOLUTION)
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
    assert clock.aware(fresh(session).get(ApiCredential, cred.id).last_used_at) > clock.aware(first)


def test_concurrent_grouped_appends_are_each_committed_and_chained(org):
    results: dict[int, str] = {}
    start = threading.Barrier(12)

    def read(i: int) -> None:
        start.wait()
        for j in range(5):
            results[i * 10 + j] = record_committed(org_id=org.id, actor_type="api_credential", actor_id="k1",
                                                   action="contact.read", target_type="contact", target_id=f"c{i}",
                                                   details={"view": "masked"})

    threads = [threading.Thread(target=read, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results.values())) == 60
    with read_only_session() as s:
        seqs = sorted(s.scalars(select(AuditEvent.seq).where(AuditEvent.chain == org.id, AuditEvent.id.in_(results.values()))))
        assert seqs == list(range(seqs[0], seqs[0] + 60))
    cp = checkpoints.read_local(org.id)
    assert cp is not None and cp.seq >= seqs[-1]
    with read_only_session() as s:
        report = verify(s, org_id=org.id)
    assert report.ok, report.to_dict()


def test_a_failed_append_fails_only_its_caller(org):
    with pytest.raises(AuditAppendFailed):
        record_committed(org_id=org.id, action="contact.read")  # no actor_type: cannot be recorded
    event_id = record_committed(org_id=org.id, actor_type="user", actor_id="u1", action="contact.read")
    with read_only_session() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.id == event_id)) == 1


def test_contact_read_is_audited_before_the_answer(client, session, org):
    from carepost.patients.demo import load_demo
    from carepost.patients.models import Contact

    cred, secret = creds.create_credential(session, org.id, name="reader", scopes=["phi:read_masked"])
    session.commit()
    with org_session(org.id) as s:
        load_demo(s, org.id, count=1, seed=3)
        cid = s.scalar(select(Contact.id).where(Contact.org_id == org.id))
    r = client.get(f"/api/v1/contacts/{cid}", headers=bearer(cred, secret))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and r.headers["cache-control"] == "no-store"
    assert r.json()["id"] == cid and r.json()["masked"] is True and r.json()["given_name"] == "***"
    reads = audit_events(session, "contact.read")
    assert len(reads) == 1 and reads[0].target_id == cid and reads[0].details == {"view": "masked"}
    assert reads[0].actor_id == cred.id and reads[0].request_id
    assert client.get("/api/v1/contacts/01" + "0" * 30, headers=bearer(cred, secret)).status_code == 404
    assert len(audit_events(session, "contact.read")) == 1  # nothing read, nothing recorded as read


def _request(authorization: str, path: str = "/api/v1/me"):
    from starlette.requests import Request

    return Request({"type": "http", "method": "GET", "path": path, "root_path": "", "query_string": b"",
                    "headers": [(b"authorization", authorization.encode())]})


def test_only_a_remembered_key_is_decided_on_the_event_loop(client, session, make_credential, monkeypatch):
    """``principal_from_memory`` (no database, no thread hand-off) answers only for a key pair
    verified moments ago with its own secret and an in-process rate limit; everything else is
    left to ``principal_from_authorization`` (None), which checks and audits it. A request it
    answers is counted once against the limit."""
    from carepost.accounts import ratelimit
    from carepost.core.config import reset_settings
    from carepost.core.errors import RateLimited

    monkeypatch.delenv("CAREPOST_REDIS_URL", raising=False)
    reset_settings()
    ratelimit.reset_limiter()
    assert ratelimit.limiter_in_process()
    cred, secret = make_credential(scopes=["messages:read"], rate_limit_per_minute=3)
    good = f"Bearer {cred.key_id}.{secret}"
    assert creds.principal_from_memory(_request(good)) is None  # not verified in this process yet
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200  # verified: hit 1
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert creds.principal_from_memory(_request(f"Bearer {cred.key_id}.{wrong}")) is None
    assert creds.principal_from_memory(_request(f"Bearer {cred.key_id}")) is None
    assert creds.principal_from_memory(_request("Bearer cp_at_" + "a" * 43)) is None  # OAuth: the database
    assert creds.principal_from_memory(_request(f"Signature keyId={cred.key_id}")) is None
    principal = creds.principal_from_memory(_request(good))  # hit 2
    assert (principal.kind, principal.credential_id, principal.org_id) == ("api_credential", cred.id, cred.org_id)
    assert principal.permissions == frozenset({"messages:read"}) and principal.extra["auth_method"] == "api_key"
    import base64

    basic_value = base64.b64encode(f"{cred.key_id}:{secret}".encode()).decode()
    assert creds.principal_from_memory(_request(f"Basic {basic_value}")).extra["auth_method"] == "basic"  # hit 3
    with pytest.raises(RateLimited):
        creds.principal_from_memory(_request(good))
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 429
    # Revoked here: forgotten at once; the request goes to the database and is refused (audited).
    clock.advance(timedelta(seconds=61))
    creds.revoke_credential(session, fresh(session).get(ApiCredential, cred.id))
    session.commit()
    assert creds.principal_from_memory(_request(good)) is None
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 401
    # Only the database path decides (and audits) a failure.
    assert [e.details["reason"] for e in audit_events(session, "api_credential.auth_failed")] == ["revoked"]


def test_a_rate_limit_kept_in_redis_is_never_counted_on_the_event_loop(client, session, make_credential, monkeypatch):
    from carepost.accounts import ratelimit
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_REDIS_URL", "redis://127.0.0.1:1/0")  # Redis configured: a round trip per hit
    reset_settings()
    ratelimit.reset_limiter()
    try:
        assert not ratelimit.limiter_in_process()
        cred, secret = make_credential(scopes=["messages:read"])
        assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200  # verified, remembered
        assert creds._recall_verified(cred.key_id, secret) is not None
        assert creds.principal_from_memory(_request(f"Bearer {cred.key_id}.{secret}")) is None
    finally:
        monkeypatch.delenv("CAREPOST_REDIS_URL")
        reset_settings()
        ratelimit.reset_limiter()


def test_a_grouped_append_starts_a_chain_that_has_no_head_yet(org):
    """The group commit locks a chain head with ``SELECT ... FOR UPDATE`` alone where that locks
    (PostgreSQL; SQLite's IMMEDIATE transaction); a chain without a head row gets one first."""
    from carepost.audit.models import AuditChainHead

    with system_session() as s:
        s.execute(AuditChainHead.__table__.delete().where(AuditChainHead.__table__.c.chain == org.id))
        s.execute(AuditEvent.__table__.delete().where(AuditEvent.__table__.c.chain == org.id))
        s.commit()
    shutil.rmtree(checkpoints.checkpoint_dir(), ignore_errors=True)
    first = record_committed(org_id=org.id, actor_type="user", actor_id="u1", action="contact.read")
    second = record_committed(org_id=org.id, actor_type="user", actor_id="u1", action="contact.read")
    with read_only_session() as s:
        rows = s.execute(select(AuditEvent.id, AuditEvent.seq).where(AuditEvent.chain == org.id).order_by(AuditEvent.seq)).all()
        assert [tuple(r) for r in rows] == [(first, 1), (second, 2)]
        assert s.get(AuditChainHead, org.id).seq == 2
    with read_only_session() as s:
        report = verify(s, org_id=org.id)
    assert report.ok, report.to_dict()
    assert checkpoints.read_local(org.id).seq == 2
