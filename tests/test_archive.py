"""The message archive (issue 16 item 8; docs/archive.md): messages stored through the API are
indexed by keyed word tokens in the same transaction (no word in clear in the index); searches by
words, patient, address, sender, dates, purpose, secure method; bad input refused naming the
field; unauthorised roles refused; sensitive searches and exports (whole organization, over a
year) wait for a second person with the compliance officer role (not the requester, not another
role, not an API key); the production ZIP holds EML files, an MBOX that Python's ``mailbox``
reads, per-message records, a manifest whose hashes match and a chain of custody; every search,
decision and download is audited without words or addresses; the backfill indexes old
messages."""

from __future__ import annotations

import base64
import email
import hashlib
import io
import json
import mailbox
import zipfile
from datetime import date, timedelta

import pytest
from sqlalchemy import delete, select, update

from carepost.accounts.credentials import create_credential
from tests.fixtures.accounts import csrf_from, login_client

PATIENT = "ophelia.marchbanks@example.org"
OTHER = "bertram.oakes@example.org"
PDF = b"%PDF-1.4\n% archive test\n"


def _key(session, org_id, scopes, name):
    cred, secret = create_credential(session, org_id, name=name, scopes=scopes)
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


@pytest.fixture
def archive(client, sender, session):
    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    org_id = sender.org_id
    with org_session(org_id) as s:
        contact = save_contact(s, org_id, ContactIn(given_name="Ophelia", family_name="Marchbanks", email=PATIENT)).contact
        s.commit()
        contact_id = contact.id
    send = sender.key()
    sent = {}
    for name, body in {
        "lab": {"from": "care@bar.example", "to": [PATIENT], "subject": "Your visit summary",
                "text": "Your Hemoglobin A1c result is ready. Café hours changed.",
                "attachments": [{"filename": "summary.pdf", "content_type": "application/pdf",
                                 "content": base64.b64encode(PDF).decode()}]},
        "other": {"from": "billing@bar.example", "to": [OTHER], "bcc": [PATIENT], "subject": "Statement",
                  "html": "<p>Your <b>statement</b> is attached; no lab news.</p><script>ignored()</script>",
                  "purpose": "payment"},
    }.items():
        r = client.post("/api/v1/messages", json=body, headers=send)
        assert r.status_code == 202, r.text
        sent[name] = r.json()["id"]
    officer = _key(session, org_id, ["compliance:manage", "phi:read_unmasked"], "officer key")
    return {"org_id": org_id, "contact_id": contact_id, "sent": sent, "officer": officer, "sender": sender}


def _search(client, headers, **criteria):
    criteria.setdefault("date_from", (date.today() - timedelta(days=7)).isoformat())
    return client.post("/api/v1/archive/search", json=criteria, headers=headers)


def test_words_are_indexed_as_keyed_tokens_and_searched(client, archive, session):
    from carepost.archive import index
    from carepost.archive.models import ArchiveTerm
    from carepost.core.database import org_session

    h, sent = archive["officer"], archive["sent"]
    with org_session(archive["org_id"]) as s:
        rows = s.execute(select(ArchiveTerm.message_id, ArchiveTerm.token)).all()
        key = index.search_key(s, archive["org_id"])[1]
    tokens = {t for _m, t in rows}
    assert {m for m, _t in rows} == set(sent.values())
    for word in ("hemoglobin", "a1c", "visit", "café", "statement"):
        assert index.token(key, word) in tokens
    assert index.token(key, "ignored") not in tokens  # script content is not text
    assert not any(w in t for t in tokens for w in ("hemoglobin", "visit", "statement"))
    # the clear words appear nowhere in the index table's bytes
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)

    r = _search(client, h, words="HEMOGLOBIN result")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and [m["id"] for m in body["data"]] == [sent["lab"]]
    assert body["data"][0]["subject"] == "Your visit summary"
    assert body["data"][0]["recipients"][0]["address"] != PATIENT  # masked in lists
    assert [m["id"] for m in _search(client, h, words="cafe").json()["data"]] == []  # whole words, exact
    assert [m["id"] for m in _search(client, h, words="Café").json()["data"]] == [sent["lab"]]
    assert [m["id"] for m in _search(client, h, words="lab statement").json()["data"]] == [sent["other"]]
    assert _search(client, h, words="hemoglobin statement").json()["data"] == []  # every word must occur
    # metadata criteria
    both = {sent["lab"], sent["other"]}
    assert {m["id"] for m in _search(client, h, address=PATIENT.upper()).json()["data"]} == both  # to and bcc
    assert {m["id"] for m in _search(client, h, contact_id=archive["contact_id"]).json()["data"]} == both
    assert [m["id"] for m in _search(client, h, sender="billing@bar.example").json()["data"]] == [sent["other"]]
    assert [m["id"] for m in _search(client, h, address=OTHER, purpose="payment").json()["data"]] == [sent["other"]]
    assert _search(client, h, address=OTHER, purpose="treatment").json()["data"] == []
    tomorrow = (date.today() + timedelta(days=1)).isoformat()
    assert _search(client, h, address=PATIENT, date_from=tomorrow).status_code == 422  # future start
    yesterday = (date.today() - timedelta(days=1)).isoformat()
    assert _search(client, h, address=PATIENT, date_from=yesterday, date_to=yesterday).json()["data"] == []
    with org_session(archive["org_id"]) as s:
        from carepost.delivery.models import MessageRecipient

        s.execute(update(MessageRecipient).where(MessageRecipient.message_id == sent["lab"]).values(method="pgp"))
        s.commit()
    assert [m["id"] for m in _search(client, h, address=PATIENT, method="pgp").json()["data"]] == [sent["lab"]]
    # every search is audited, with criteria names and counts only
    from carepost.audit.models import AuditEvent

    with org_session(archive["org_id"]) as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "archive.search")).all()
    assert len(events) >= 10
    text = json.dumps([e.details for e in events])
    for secret in ("hemoglobin", "HEMOGLOBIN", PATIENT, PATIENT.upper(), "billing@bar.example", archive["contact_id"]):
        assert secret not in text
    assert any(e.details["criteria"] == ["date_from", "words"] and e.details["word_count"] == 2 for e in events)


@pytest.mark.parametrize("criteria, field", [
    ({"words": "hemo*"}, "words"),
    ({"words": "a1c OR %lab%"}, "words"),
    ({"words": "x"}, "words"),
    ({"words": "a" * 41}, "words"),
    ({"words": " ".join(f"w{i}" for i in range(13))}, "words"),
    ({"words": "lab", "date_from": "2026-03-01", "date_to": "2026-02-01"}, "date_to"),
    ({"words": "lab", "date_from": "03/01/2026"}, "date_from"),
    ({"contact_id": "0" * 32}, "contact_id"),
    ({"address": "not an address"}, "address"),
    ({"sender": "care@"}, "sender"),
    ({"campaign_id": "nope"}, "campaign_id"),
    ({"journey_id": "f" * 32}, "journey_id"),
    ({"words": "lab", "purpose": "Not A Purpose"}, "purpose"),
    ({"words": "lab", "method": "carrier_pigeon"}, "method"),
    ({"words": "lab", "limit": 0}, "limit"),
    ({"words": "lab", "unknown": 1}, "unknown"),
])
def test_bad_input_is_refused_naming_the_field(client, archive, criteria, field):
    r = _search(client, archive["officer"], **criteria)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error.get("field") == field or field in error["message"], error
    for echoed in ("hemo*", "not an address", "%lab%"):  # the refused value is never echoed
        assert echoed not in r.text


def test_unauthorised_roles_are_refused(client, archive, session, make_user):
    org_id = archive["org_id"]
    for scopes in (["messages:read", "phi:read_unmasked"], ["compliance:manage"]):
        h = _key(session, org_id, scopes, "narrow " + scopes[0])
        assert _search(client, h, words="lab").status_code == 403
        assert client.get("/api/v1/archive/requests", headers=h).status_code == 403
    marketer = make_user(org_id, "marketer")
    login_client(client, marketer)
    assert client.get("/app/archive").status_code == 403


def _zip_checks(data: bytes, sent_ids: set[str]) -> dict:
    z = zipfile.ZipFile(io.BytesIO(data))
    names = set(z.namelist())
    assert {"README.txt", "messages.mbox", "manifest.json", "manifest.sha256", "chain_of_custody.json"} <= names
    manifest = json.loads(z.read("manifest.json"))
    listed = {f["path"] for f in manifest["files"]}
    assert listed == names - {"manifest.json", "manifest.sha256"}
    for f in manifest["files"]:
        blob = z.read(f["path"])
        assert hashlib.sha256(blob).hexdigest() == f["sha256"] and len(blob) == f["bytes"], f["path"]
    sums = dict(reversed(line.split("  ", 1)) for line in z.read("manifest.sha256").decode().splitlines())
    assert sums["manifest.json"] == hashlib.sha256(z.read("manifest.json")).hexdigest()
    emls = sorted(n for n in names if n.startswith("messages/") and n.endswith(".eml"))
    assert {n.rsplit("_", 1)[1][:-4] for n in emls} == sent_ids
    return {"zip": z, "emls": emls, "manifest": manifest, "custody": json.loads(z.read("chain_of_custody.json"))}


def test_export_eml_mbox_manifest_and_custody(client, archive, tmp_path):
    from carepost.audit.models import AuditEvent
    from carepost.core.database import org_session

    h, sent = archive["officer"], archive["sent"]
    body = {"address": PATIENT, "date_from": (date.today() - timedelta(days=30)).isoformat(),
            "purpose_of_export": "patient_request", "reason": "Right of access request #77"}
    r = client.post("/api/v1/archive/exports", json=body, headers=h)
    assert r.status_code == 201, r.text
    req = r.json()
    assert req["status"] == "completed" and req["message_count"] == 2 and not req["sensitive"]
    dl = client.get(f"/api/v1/archive/requests/{req['id']}/download", headers=h)
    assert dl.status_code == 200 and dl.headers["content-type"] == "application/zip"
    assert hashlib.sha256(dl.content).hexdigest() == req["sha256"]
    got = _zip_checks(dl.content, set(sent.values()))
    z = got["zip"]
    lab = next(n for n in got["emls"] if n.endswith(f"_{sent['lab']}.eml"))
    msg = email.message_from_bytes(z.read(lab), policy=email.policy.default)
    assert msg["Subject"] == "Your visit summary" and PATIENT in msg["To"]
    assert "Hemoglobin A1c" in msg.get_body(("plain",)).get_content()
    att = next(msg.iter_attachments())
    assert att.get_filename() == "summary.pdf" and att.get_content() == PDF
    other = email.message_from_bytes(z.read(next(n for n in got["emls"] if sent["other"] in n)), policy=email.policy.default)
    assert PATIENT in other["Bcc"]
    (tmp_path / "all.mbox").write_bytes(z.read("messages.mbox"))
    box = mailbox.mbox(str(tmp_path / "all.mbox"))
    assert sorted(m["X-CarePost-Archive-Id"] for m in box) == sorted(sent.values())
    record = json.loads(z.read(f"records/{sent['lab']}.json"))
    assert record["recipients"][0]["address"] == PATIENT and record["recipients"][0]["events"][0]["type"] == "queued"
    assert record["attachments"][0]["sha256"] == hashlib.sha256(PDF).hexdigest()
    custody = got["custody"]
    assert custody["request_id"] == req["id"] and custody["reason"] == "Right of access request #77"
    assert custody["message_count"] == 2 and custody["audit_events"]
    with org_session(archive["org_id"]) as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).where(AuditEvent.target_id == req["id"])
                                              .order_by(AuditEvent.seq))]
        details = json.dumps([e.details for e in s.scalars(select(AuditEvent).where(AuditEvent.target_id == req["id"]))])
    assert actions == ["archive.export_requested", "archive.export_built", "archive.export_downloaded"]
    assert PATIENT not in details and "Right of access" not in details
    # one message as EML
    one = client.get(f"/api/v1/archive/messages/{sent['lab']}.eml", headers=h)
    assert one.status_code == 200 and b"Your visit summary" in one.content
    assert client.get(f"/api/v1/archive/messages/{'0' * 32}.eml", headers=h).status_code == 404


def test_sensitive_requests_need_a_second_compliance_officer(client, archive, make_user, session):
    from carepost.archive.models import ArchiveRequest
    from carepost.core.database import org_session

    org_id, h = archive["org_id"], archive["officer"]
    # over a year, narrowed by address: sensitive; the reason is required
    long = {"address": PATIENT, "date_from": (date.today() - timedelta(days=400)).isoformat()}
    r = client.post("/api/v1/archive/search", json=long, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "reason", r.text
    r = client.post("/api/v1/archive/search", json={**long, "reason": "Smith v. Clinic"}, headers=h)
    assert r.status_code == 202, r.text
    pending = r.json()["request"]
    assert pending["status"] == "pending_approval" and "more than a year" in pending["sensitive_why"]
    assert client.get(f"/api/v1/archive/requests/{pending['id']}/results", headers=h).status_code == 409
    # an API key is not a person with the compliance officer role
    assert client.post(f"/api/v1/archive/requests/{pending['id']}/approve", headers=h).status_code == 403
    # whole organization: an export with only a date range
    r = client.post("/api/v1/archive/exports", headers=h, json={
        "date_from": date.today().isoformat(), "purpose_of_export": "legal_discovery", "reason": "Smith v. Clinic"})
    assert r.status_code == 202 and "whole organization" in r.json()["sensitive_why"]
    export_id = r.json()["id"]
    assert client.get(f"/api/v1/archive/requests/{export_id}/download", headers=h).status_code == 409

    requester = make_user(org_id, "compliance_officer")
    admin = make_user(org_id, "admin")
    approver = make_user(org_id, "compliance_officer")
    with org_session(org_id) as s:  # the requester is a person for the same-person rule
        s.execute(update(ArchiveRequest).where(ArchiveRequest.id == export_id).values(requested_by=requester.id))
        s.commit()

    def decide(user, request_id, action="approve"):
        client.cookies.clear()
        login_client(client, user)
        page = client.get("/app/archive")
        assert page.status_code == 200
        return client.post(f"/app/archive/requests/{request_id}/{action}", data={"csrf_token": csrf_from(page.text)},
                           follow_redirects=False)

    r = decide(requester, export_id)
    assert r.status_code == 403 and "different person" in r.text
    r = decide(admin, export_id)
    assert r.status_code == 403 and "compliance officer" in r.text
    r = decide(approver, export_id)
    assert r.status_code == 303, r.text
    assert decide(approver, export_id).status_code == 409  # decided once
    dl = client.get(f"/app/archive/requests/{export_id}/download")
    assert dl.status_code == 200
    _zip_checks(dl.content, set(archive["sent"].values()))
    assert decide(approver, pending["id"], "reject").status_code == 303
    client.cookies.clear()
    r = client.get(f"/api/v1/archive/requests/{pending['id']}/results", headers=h)
    assert r.status_code == 409 and "rejected" in r.text
    r = client.get(f"/api/v1/archive/requests/{export_id}", headers=h)
    body = r.json()
    assert body["decided_by"] == approver.id and body["criteria"]["date_from"] == date.today().isoformat()


def test_backfill_indexes_messages_stored_before_the_index(client, archive):
    from typer.testing import CliRunner

    from carepost.accounts.models import Organization
    from carepost.archive.models import ArchiveTerm
    from carepost.cli import app
    from carepost.core.database import org_session, system_session

    with org_session(archive["org_id"]) as s:
        s.execute(delete(ArchiveTerm))
        s.commit()
    assert _search(client, archive["officer"], words="hemoglobin").json()["data"] == []
    with system_session() as s:
        slug = s.get(Organization, archive["org_id"]).slug
    result = CliRunner().invoke(app, ["archive", "backfill", "--org", slug, "--batch", "1"])
    assert result.exit_code == 0, result.output
    assert "Indexed 2 messages" in result.output
    assert [m["id"] for m in _search(client, archive["officer"], words="hemoglobin").json()["data"]] == \
        [archive["sent"]["lab"]]
    again = CliRunner().invoke(app, ["archive", "backfill", "--org", slug])
    assert "Indexed 0 messages" in again.output  # resumable: nothing left to do
