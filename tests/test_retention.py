"""Retention (issue 16 items 1-4): schedules with the HIPAA six-year floor, legal holds with
second-person approval, the purge (chunked, one per organization, dry run, holds win, resumable
after a real kill -9), crypto-shredding of emptied months' keys (a backup copy of a ciphertext
no longer opens) and the signed destruction certificate (verified offline; tampering detected)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from carepost.core import clock
from carepost.core.crypto import PERIOD_KEY_KIND, KeyUnavailable, OrgKey, get_keyring, period_key_version
from carepost.core.database import org_session, read_only_session
from carepost.core.errors import Conflict, PermissionDenied, ValidationFailed
from carepost.core.ids import new_id
from carepost.retention import purge, service
from carepost.retention.models import PurgeRun
from carepost.retention.service import Actor


def _headers(session, org_id, scopes=("compliance:manage",), name="officer"):
    from carepost.accounts.credentials import create_credential

    cred, secret = create_credential(session, org_id, name=name, scopes=list(scopes))
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def _month_start(months_ago: int) -> datetime:
    now = clock.now()
    y, m = now.year, now.month - months_ago
    while m < 1:
        y, m = y - 1, m + 12
    return datetime(y, m, 1, tzinfo=timezone.utc)


def make_messages(s, org_id: str, created: datetime, n: int, *, contact_id: str | None = None,
                  campaign_id: str | None = None) -> list[str]:
    """``n`` stored messages created at ``created``, each with one recipient and two events, the
    content sealed under the messages key of that month (as ``store_messages`` does)."""
    from carepost.delivery.models import Message, MessageEvent, MessageRecipient

    ring = get_keyring()
    enc = ring.encryptor(s, org_id, period=("messages", created))
    ids = []
    for i in range(n):
        mid, rid = new_id(), new_id()
        s.add(Message(id=mid, org_id=org_id, source="api", from_address="clinic@example.test", security="tls_required",
                      subject_enc=enc("messages", "subject", mid, f"Your results {i}"),
                      text_enc=enc("messages", "text", mid, "Your A1c was 6.1"), created_at=created + timedelta(minutes=i),
                      campaign_id=campaign_id))
        s.flush()
        s.add(MessageRecipient(id=rid, org_id=org_id, message_id=mid, address_enc=enc("message_recipients", "address", rid,
                                                                                  f"p{i}@example.test"),
                               address_index=f"idx{i}", domain_index="dom", contact_id=contact_id, status="delivered"))
        s.flush()
        for t in ("queued", "delivered"):
            s.add(MessageEvent(org_id=org_id, message_id=mid, recipient_id=rid, type=t, created_at=created))
        ids.append(mid)
    s.flush()
    return ids


def _counts(org_id: str, ids: list[str]) -> tuple[int, int, int]:
    from carepost.delivery.models import Message, MessageEvent, MessageRecipient

    with read_only_session(org_id) as s:
        return tuple(s.scalar(select(func.count()).select_from(t).where(col.in_(ids)))
                     for t, col in ((Message, Message.id), (MessageRecipient, MessageRecipient.message_id),
                                    (MessageEvent, MessageEvent.message_id)))


def _contact(s, org_id, email):
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    return save_contact(s, org_id, ContactIn(given_name="Pat", family_name="Doe", email=email)).contact.id


SYSTEM = Actor("system", "test")


def test_schedule_below_the_legal_minimum_is_refused_naming_the_field(client, org, session):
    with org_session(org.id) as s:
        for cls in ("authorizations", "policies", "audit"):
            with pytest.raises(ValidationFailed) as e:
                service.set_schedule(s, org.id, cls, min_days=365, max_days=3000, actor=SYSTEM)
            assert e.value.field == "min_days" and "6 years" in str(e.value)
            with pytest.raises(ValidationFailed) as e:
                service.set_schedule(s, org.id, cls, min_days=service.HIPAA_MIN_DAYS, max_days=2000, actor=SYSTEM)
            assert e.value.field == "max_days"
        with pytest.raises(ValidationFailed) as e:
            service.set_schedule(s, org.id, "messages", min_days=400, max_days=300, actor=SYSTEM)
        assert e.value.field == "min_days"
        with pytest.raises(ValidationFailed) as e:
            service.set_schedule(s, org.id, "contacts", min_days=0, max_days=300, actor=SYSTEM)
        assert e.value.field == "inactive_months"
        service.set_schedule(s, org.id, "audit", min_days=service.HIPAA_MIN_DAYS, max_days=3650, actor=SYSTEM)
        s.commit()
    h = _headers(session, org.id)
    r = client.put("/api/v1/retention/schedules/authorizations", json={"min_days": 30, "max_days": 90}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "min_days", r.text
    r = client.put("/api/v1/retention/schedules/nonsense", json={"min_days": 30, "max_days": 90}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "record_class"
    r = client.put("/api/v1/retention/schedules/messages", json={"min_days": 30, "max_days": 90}, headers=h)
    assert r.status_code == 200 and r.json()["max_days"] == 90
    rows = {x["record_class"]: x for x in client.get("/api/v1/retention/schedules", headers=h).json()["data"]}
    assert rows["audit"]["max_days"] == 3650 and rows["messages"]["configured"] and not rows["forms"]["configured"]
    assert rows["audit"]["legal_min_days"] == service.HIPAA_MIN_DAYS


def test_holds_need_a_second_compliance_officer_to_approve_and_to_release(client, org, session, make_user):
    from carepost.audit.models import AuditEvent

    placer = make_user(org, "compliance_officer")
    officer = make_user(org, "compliance_officer")
    admin = make_user(org, "admin")
    me, other, adm = (Actor("user", u.id, u.role) for u in (placer, officer, admin))
    with org_session(org.id) as s:
        pid = _contact(s, org.id, "held.patient@example.test")
        with pytest.raises(ValidationFailed) as e:
            service.place_hold(s, org.id, scope="patient", matter="Doe v. Clinic", reason="litigation", actor=me)
        assert e.value.field == "contact_id"
        with pytest.raises(ValidationFailed) as e:
            service.place_hold(s, org.id, scope="patient", contact_id=pid, matter=" ", reason="x", actor=me)
        assert e.value.field == "matter"
        hold = service.place_hold(s, org.id, scope="patient", contact_id=pid, matter="Doe v. Clinic",
                                  reason="Litigation notice received", actor=me)
        assert hold.status == "pending" and service.holds_for_contact(s, org.id, pid)  # protects at once
        with pytest.raises(PermissionDenied):
            service.approve_hold(s, org.id, hold.id, me)  # the same person
        with pytest.raises(PermissionDenied):
            service.approve_hold(s, org.id, hold.id, adm)  # not a compliance officer
        service.approve_hold(s, org.id, hold.id, other)
        assert hold.status == "active" and hold.approved_by == officer.id
        with pytest.raises(Conflict):  # releasing without a release request and approval
            service.approve_release(s, org.id, hold.id, other)
        with pytest.raises(ValidationFailed) as e:
            service.request_release(s, org.id, hold.id, "", me)
        assert e.value.field == "reason"
        service.request_release(s, org.id, hold.id, "Matter settled", me)
        assert hold.status == "release_pending" and service.holds_for_contact(s, org.id, pid)  # still protecting
        with pytest.raises(PermissionDenied):
            service.approve_release(s, org.id, hold.id, me)
        service.approve_release(s, org.id, hold.id, other)
        assert hold.status == "released" and not service.holds_for_contact(s, org.id, pid)
        s.commit()
        actions = [a for (a,) in s.execute(select(AuditEvent.action).where(AuditEvent.target_id == hold.id)
                                            .order_by(AuditEvent.occurred_at))] \
            if hasattr(AuditEvent, "occurred_at") else [a for (a,) in s.execute(
                select(AuditEvent.action).where(AuditEvent.target_id == hold.id))]
    for a in ("retention.hold_placed", "retention.hold_approved", "retention.hold_release_requested",
              "retention.hold_released"):
        assert a in actions
    # the API: an API key is not a person with the compliance officer role
    h = _headers(session, org.id)
    r = client.post("/api/v1/retention/holds", headers=h, json={"scope": "date_range", "matter": "Audit 2026",
                                                                "reason": "OCR audit", "starts_on": "2026-01-01"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "ends_on", r.text
    r = client.post("/api/v1/retention/holds", headers=h, json={"scope": "organization", "matter": "Audit 2026",
                                                                "reason": "OCR audit"})
    assert r.status_code == 201 and r.json()["status"] == "pending"
    hid = r.json()["id"]
    assert client.post(f"/api/v1/retention/holds/{hid}/approve", headers=h).status_code == 403
    assert client.post(f"/api/v1/retention/holds/{hid}/release/approve", headers=h).status_code == 409
    r = client.get(f"/api/v1/retention/contacts/{pid}/holds", headers=h)
    assert r.status_code == 200 and r.json()["held"] is True  # the organization-wide hold covers everyone


def test_purge_deletes_the_expired_keeps_the_held_shreds_emptied_months(client, org, session, tmp_path):
    from carepost.audit.models import AuditEvent
    from carepost.delivery.models import Message

    org_id = org.id
    m_old, m_held, recent = _month_start(20), _month_start(16), clock.now() - timedelta(days=10)
    with org_session(org_id) as s:
        pid = _contact(s, org_id, "kept.patient@example.test")
        old = make_messages(s, org_id, m_old + timedelta(days=3), 7)
        held_month = make_messages(s, org_id, m_held + timedelta(days=3), 4)
        held = make_messages(s, org_id, m_held + timedelta(days=5), 1, contact_id=pid)
        new = make_messages(s, org_id, recent, 3)
        backup = s.scalar(select(Message.subject_enc).where(Message.id == old[0]))  # a "backup" copy
        service.set_schedule(s, org_id, "messages", min_days=30, max_days=365, actor=Actor("user", "configurer", None))
        service.place_hold(s, org_id, scope="patient", contact_id=pid, matter="Doe v. Clinic", reason="litigation",
                           actor=SYSTEM)
        s.commit()
        plan = purge.plan(s, org_id)
    entry = next(c for c in plan["classes"] if c["record_class"] == "messages")
    assert entry["count"] == 11 and entry["held"] == 1
    old_key = f"messages {m_old:%Y-%m}"
    assert entry["keys_to_destroy"] == [old_key]
    assert _counts(org_id, old + held_month) == (11, 11, 22)  # the dry run deleted nothing
    h = _headers(session, org_id)
    assert client.post("/api/v1/retention/purges", json={"dry_run": True}, headers=h).json()["classes"][0]["count"] == 11

    run = purge.run_purge(org_id, Actor("user", "runner", None), chunk=3)
    assert run["status"] == "finished" and run["progress"]["messages"]["count"] == 11
    assert _counts(org_id, old + held_month) == (0, 0, 0)
    assert _counts(org_id, held + new) == (4, 4, 8)
    with read_only_session(org_id) as s:
        # the emptied month's key is destroyed: the backup copy no longer opens; the held month's stays
        versions = dict(s.execute(select(OrgKey.version, OrgKey.retired_at).where(
            OrgKey.org_id == org_id, OrgKey.kind == PERIOD_KEY_KIND)).all())
        assert versions[period_key_version("messages", m_old)] is not None
        assert versions[period_key_version("messages", m_held)] is None
        with pytest.raises(KeyUnavailable):
            get_keyring().decrypt(s, org_id, "messages", "subject", old[0], backup)
        kept = s.scalar(select(Message.subject_enc).where(Message.id == held[0]))
        assert get_keyring().decrypt_text(s, org_id, "messages", "subject", held[0], kept) == "Your results 0"
        audit = s.execute(select(AuditEvent.details).where(AuditEvent.action == "retention.purged")).scalars().all()
    assert any(d["count"] == 11 and d["method"] == "deleted and crypto-shredded" and d["configured_by"] == "configurer"
               for d in audit)
    # held records are marked in the API
    r = client.get(f"/api/v1/retention/messages/{held[0]}/holds", headers=h)
    assert r.json()["held"] is True
    assert client.get(f"/api/v1/retention/messages/{new[0]}/holds", headers=h).json()["held"] is False
    # the certificate: signed, verifiable offline, tampering detected
    r = client.get(f"/api/v1/retention/purges/{run['id']}/certificate", headers=h)
    assert r.status_code == 200
    bundle = r.json()
    cls = bundle["certificate"]["classes"][0]
    assert (cls["count"], cls["schedule"]["configured_by"], cls["keys_destroyed"]) == (11, "configurer", [old_key])
    assert cls["date_from"].startswith(f"{m_old:%Y-%m}") and cls["date_to"].startswith(f"{m_held:%Y-%m}")
    key = client.get("/api/v1/retention/certificate-key", headers=h).json()["public_key"]
    assert purge.verify_bundle(bundle, key) == (True, "signature valid")
    path = tmp_path / "cert.json"
    path.write_text(json.dumps(bundle))
    from typer.testing import CliRunner

    from carepost.cli import app

    ok = CliRunner().invoke(app, ["retention", "verify-certificate", str(path), "--public-key", key])
    assert ok.exit_code == 0 and "valid" in ok.output
    bundle["canonical_json"] = bundle["canonical_json"].replace('"count":11', '"count":1')
    bundle["certificate"]["classes"][0]["count"] = 1
    path.write_text(json.dumps(bundle))
    bad = CliRunner().invoke(app, ["retention", "verify-certificate", str(path), "--public-key", key])
    assert bad.exit_code == 3 and "NOT VALID" in bad.output
    # an organization-wide hold stops everything
    with org_session(org_id) as s:
        service.place_hold(s, org_id, scope="organization", matter="Everything", reason="subpoena", actor=SYSTEM)
        s.commit()
    with org_session(org_id) as s:
        s.execute(Message.__table__.update().where(Message.id.in_(new)).values(created_at=m_old))
        s.commit()
    run = purge.run_purge(org_id, SYSTEM)
    assert run["progress"]["messages"]["count"] == 0 and _counts(org_id, new)[0] == 3


def test_two_purges_at_once_are_refused(client, org, session):
    with org_session(org.id) as s:
        service.set_schedule(s, org.id, "messages", min_days=0, max_days=30, actor=SYSTEM)
        s.commit()
    run_id, _owner = purge.start_run(org.id, SYSTEM)
    with pytest.raises(Conflict) as e:
        purge.run_purge(org.id, SYSTEM)
    assert "already running" in str(e.value) and e.value.field == "purge"
    h = _headers(session, org.id)
    r = client.post("/api/v1/retention/purges", json={"dry_run": False}, headers=h)
    assert r.status_code == 409 and "already running" in r.json()["error"]["message"], r.text
    from carepost.audit.models import AuditEvent

    with read_only_session(org.id) as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "retention.purge_started", AuditEvent.outcome == "denied")) == 1
        assert s.get(PurgeRun, run_id).status == "running"


@pytest.mark.slow
def purge_progress(org_id: str, record_class: str) -> int:
    """How many records of ``record_class`` the organization's purge run has counted as deleted."""
    with read_only_session(org_id) as s:
        run = s.scalars(select(PurgeRun).where(PurgeRun.org_id == org_id)).first()
        return 0 if run is None else (run.progress or {}).get(record_class, {}).get("count", 0)


def kill_purge_midway(storage, org_id: str, tmp_path, record_class: str, *, chunk: int, after: int) -> int:
    """Start a real ``carepost retention purge`` process, wait until it has deleted at least
    ``after`` records of ``record_class`` (it must still be running), kill -9 it; returns the
    count its run had committed."""
    env = {**os.environ, **storage.env}
    log_path = tmp_path / "purge.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "retention", "purge", "--org", org_id,
                                 "--chunk", str(chunk), "--pause", "0.05"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while purge_progress(org_id, record_class) < after and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, log_path.read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return purge_progress(org_id, record_class)


def test_kill_9_mid_purge_resumes_and_nothing_is_half_deleted(storage, org, tmp_path):
    from carepost.delivery.models import Message, MessageEvent, MessageRecipient

    org_id = org.id
    created = _month_start(14)
    with org_session(org_id) as s:
        ids = make_messages(s, org_id, created, 240)
        service.set_schedule(s, org_id, "messages", min_days=0, max_days=200, actor=SYSTEM)
        s.commit()
    done = kill_purge_midway(storage, org_id, tmp_path, "messages", chunk=4, after=40)
    left, recipients, events = _counts(org_id, ids)
    assert 0 < done < 240 and left == 240 - done  # the counts are exact: chunk and progress commit together
    assert (recipients, events) == (left, 2 * left)  # every message left is whole
    with read_only_session(org_id) as s:
        run = s.scalars(select(PurgeRun).where(PurgeRun.org_id == org_id)).first()
        assert run.status == "running"
        # no orphan: every recipient and event left belongs to a message left
        assert s.scalar(select(func.count()).select_from(MessageRecipient).where(
            MessageRecipient.org_id == org_id, MessageRecipient.message_id.not_in(select(Message.id)))) == 0
        assert s.scalar(select(func.count()).select_from(MessageEvent).where(
            MessageEvent.org_id == org_id, MessageEvent.message_id.not_in(select(Message.id)))) == 0
    # the dead run holds the lock until it is stale; then the next purge resumes it
    with pytest.raises(Conflict):
        purge.run_purge(org_id, SYSTEM, stale_seconds=3600)
    resumed = purge.run_purge(org_id, SYSTEM, stale_seconds=0)
    assert resumed["id"] == run.id and resumed["resumed"] == 1 and resumed["status"] == "finished"
    assert resumed["progress"]["messages"]["count"] == 240
    assert _counts(org_id, ids) == (0, 0, 0)
    assert resumed["progress"]["messages"]["keys"] == [f"messages {created:%Y-%m}"]
