"""The transactional API: accepting messages (validation naming the field, idempotency, batches,
sandbox), reading them (masked addresses, audit), and the organization's delivery settings."""

from __future__ import annotations

import base64
import json

import pytest
from sqlalchemy import func, select

from carepost.audit.models import AuditEvent
from carepost.delivery.models import Message, MessageAttachment, MessageEvent, MessageRecipient

PHI = "Your HbA1c is 7.9 %; please call about your insulin dose."
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def body(**over) -> dict:
    data = {"from": "Bar Clinic <care@bar.example>", "to": ["Pat Doe <pat@valid.test>"], "subject": "A message from your care team",
            "text": PHI, "html": f"<p>{PHI}</p>"}
    data.update(over)
    return data


def audit(session, org_id, action):
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.org_id == org_id, AuditEvent.action == action)
                                .order_by(AuditEvent.chain, AuditEvent.seq)))


def count(session, model) -> int:
    session.rollback()
    return session.scalar(select(func.count()).select_from(model))


@pytest.fixture
def key(sender, delivery_queue):
    return sender.key()


def test_accept_then_read_with_masked_and_unmasked_addresses(client, sender, key, session):
    r = client.post("/api/v1/messages", json=body(cc=["lee@valid.test"], bcc=["ops@valid.test"], tags=["lab"]), headers=key)
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]

    got = client.get(f"/api/v1/messages/{message_id}", headers=key)
    assert got.status_code == 200, got.text
    data = got.json()
    assert data["id"] == message_id and data["purpose"] == "treatment" and data["security"] == "tls_required"
    assert data["contains_phi"] is True
    assert [(r["address"], r["kind"], r["status"]) for r in data["recipients"]] == sorted(
        [("pat@valid.test", "to", "queued"), ("lee@valid.test", "cc", "queued"), ("ops@valid.test", "bcc", "queued")],
        key=lambda t: [x["address"] for x in data["recipients"]].index(t[0]))
    assert all(r["events"][0]["type"] == "queued" for r in data["recipients"])

    reader = sender.key("messages:read")
    masked = client.get(f"/api/v1/messages/{message_id}", headers=reader).json()
    assert {r["address"] for r in masked["recipients"]} == {"p***@valid.test", "l***@valid.test", "o***@valid.test"}
    asked = client.get(f"/api/v1/messages/{message_id}?masked=true", headers=key).json()
    assert "pat@valid.test" not in json.dumps(asked)

    views = [e.details["view"] for e in audit(session, sender.org_id, "message.read")]
    assert views == ["unmasked", "masked", "masked"]
    [created] = audit(session, sender.org_id, "message.create")
    assert created.target_id == message_id and created.details["recipients_count"] == 3
    assert "pat@" not in json.dumps(created.details)

    # Stored encrypted: neither the address nor the content is in the database in clear.
    session.rollback()
    row = session.get(Message, message_id)
    assert PHI.encode() not in row.subject_enc + (row.html_enc or b"") + (row.text_enc or b"")
    for rec in session.scalars(select(MessageRecipient).where(MessageRecipient.message_id == message_id)):
        assert b"valid.test" not in rec.address_enc and len(rec.address_index) == 64


def test_list_messages_shows_counts_without_addresses(client, sender, key):
    ids = [client.post("/api/v1/messages", json=body(), headers=key).json()["id"] for _ in range(3)]
    page = client.get("/api/v1/messages?limit=2", headers=key).json()
    assert [m["id"] for m in page["data"]] == ids[::-1][:2] and page["next_cursor"] == ids[1]
    rest = client.get(f"/api/v1/messages?limit=2&cursor={page['next_cursor']}", headers=key).json()
    assert [m["id"] for m in rest["data"]] == [ids[0]] and rest["next_cursor"] is None
    assert page["data"][0]["statuses"] == {"queued": 1} and "valid.test" not in json.dumps(page)
    assert client.get("/api/v1/messages?status=delivered", headers=key).json()["data"] == []


BAD_INPUT = [
    ({"to": ["pat@valid.test", "not an address"]}, "to.1"),
    ({"to": ["pat@valid.test"], "cc": ["pat@@valid.test"]}, "cc.0"),
    ({"to": ["a..b@valid.test"]}, "to.0"),
    ({"to": ["pat@-bad-.test"]}, "to.0"),
    ({"to": ["pat@valid.test\r\nBcc: evil@attacker.test"]}, "to.0"),
    ({"subject": "Hello\r\nBcc: evil@attacker.test"}, "subject"),
    ({"subject": "Hello\nX-Injected: yes"}, "subject"),
    ({"from": "Bar\r\nBcc: x@y.test <care@bar.example>"}, "from"),
    ({"reply_to": "desk@bar.example\r\nX: y"}, "reply_to"),
    ({"headers": {"X-Ref": "a\r\nBcc: evil@attacker.test"}}, "x_ref"),
    ({"headers": {"Bcc": "evil@attacker.test"}}, "headers"),
    ({"headers": {"X-CarePost-Security": "opportunistic"}}, "headers"),
    ({"from": "care@elsewhere.example"}, "from"),
    ({"security": "opportunistic"}, "security"),
    ({"security": "opportunistic", "contains_phi": True}, "security"),
    ({"purpose": "advertising"}, "purpose"),
    ({"template_id": "0" * 32, "text": None, "html": None}, "template_id"),
    ({"unexpected": 1}, "unexpected"),
    ({"attachments": [{"filename": "run.exe", "content": base64.b64encode(b"MZ\x90\x00").decode()}]}, "attachments.0"),
    ({"attachments": [{"filename": "a.pdf", "content_type": "application/pdf",
                       "content": base64.b64encode(b"MZ\x90\x00 not a pdf").decode()}]}, "attachments.0"),
    ({"attachments": [{"filename": "scan.png", "content_type": "image/png",
                       "content": base64.b64encode(b"%PDF-1.4").decode()}]}, "attachments.0"),
    ({"attachments": [{"filename": "x.js", "content_type": "text/plain", "content": "YQ=="}]}, "attachments.0"),
    ({"attachments": [{"filename": "a/b.txt", "content_type": "text/plain", "content": "YQ=="}]}, "attachments"),
    ({"attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "not base64!"}]},
     "attachments.0.content"),
    ({"attachments": [{"filename": "i.txt", "content_type": "text/plain", "content_id": "logo", "content": "YQ=="}]},
     "attachments.0"),
]


def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(client, sender, key, session):
    for over, field in BAD_INPUT:
        r = client.post("/api/v1/messages", json=body(**over), headers=key)
        assert r.status_code == 422, (over, r.text)
        error = r.json()["error"]
        assert error["field"] == field, (over, error)
        assert "attacker" not in r.text and "evil" not in r.text and "pat@" not in r.text
    assert count(session, Message) == 0 and count(session, MessageRecipient) == 0


def test_purpose_defaults_to_the_organization_setting_and_is_required_without_one(client, sender, key, session, make_user):
    from tests.fixtures.accounts import login_client

    owner = make_user(sender.org_id, role="owner")
    csrf = login_client(client, owner)
    r = client.patch("/api/v1/delivery-settings", json={"default_purpose": None}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json() == {"security_mode": "tls_required", "default_purpose": None, "relay": None, "engagement_privacy": False}
    client.cookies.clear()
    r = client.post("/api/v1/messages", json=body(), headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "purpose"
    r = client.post("/api/v1/messages", json=body(purpose="payment"), headers=key)
    assert r.status_code == 202
    assert client.get(f"/api/v1/messages/{r.json()['id']}", headers=key).json()["purpose"] == "payment"


def test_internationalized_addresses(client, sender, key, session):
    r = client.post("/api/v1/messages", json=body(to=["pat@bücher.test", "josé@valid.test"]), headers=key)
    assert r.status_code == 202, r.text
    addresses = {x["address"] for x in client.get(f"/api/v1/messages/{r.json()['id']}", headers=key).json()["recipients"]}
    assert addresses == {"pat@xn--bcher-kva.test", "josé@valid.test"}


def test_oversized_attachments_are_refused(client, sender, key, session):
    from carepost.delivery.schemas import MAX_ATTACHMENT_BYTES

    big = base64.b64encode(b"a" * (MAX_ATTACHMENT_BYTES // 2 + 1)).decode()
    two = [{"filename": f"{i}.txt", "content_type": "text/plain", "content": big} for i in range(2)]
    r = client.post("/api/v1/messages", json=body(attachments=two), headers=key)
    assert r.status_code in (413, 422), r.text
    assert count(session, Message) == 0 and count(session, MessageAttachment) == 0


def test_attachments_and_inline_images_are_stored_encrypted(client, sender, key, session):
    files = [{"filename": "results.pdf", "content_type": "application/pdf", "content": base64.b64encode(b"%PDF-1.4 lab").decode()},
             {"filename": "logo.png", "content_type": "image/png", "content_id": "logo", "content": base64.b64encode(PNG).decode()}]
    r = client.post("/api/v1/messages", json=body(html='<p><img src="cid:logo"> results attached</p>', attachments=files),
                    headers=key)
    assert r.status_code == 202, r.text
    session.rollback()
    rows = session.scalars(select(MessageAttachment).where(MessageAttachment.message_id == r.json()["id"])).all()
    assert sorted((a.content_type, a.size, a.inline_cid) for a in rows) == [("application/pdf", 12, None), ("image/png", 40, "logo")]
    assert all(b"lab" not in a.content_enc and b"results" not in a.filename_enc for a in rows)


def test_security_override_only_raises_the_mode(client, sender, key, make_user):
    from tests.fixtures.accounts import login_client

    r = client.post("/api/v1/messages", json=body(security="secure"), headers=key)
    assert r.status_code == 202
    assert client.get(f"/api/v1/messages/{r.json()['id']}", headers=key).json()["security"] == "secure"
    r = client.post("/api/v1/messages", json=body(security="opportunistic", contains_phi=False), headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "security"  # below the organization's tls_required

    owner = make_user(sender.org_id, role="owner")
    csrf = login_client(client, owner)
    r = client.patch("/api/v1/delivery-settings", json={"security_mode": "opportunistic"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["security_mode"] == "opportunistic"
    client.cookies.clear()
    r = client.post("/api/v1/messages", json=body(security="opportunistic", contains_phi=False), headers=key)
    assert r.status_code == 202
    r = client.post("/api/v1/messages", json=body(contains_phi=True, security="opportunistic"), headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "security"  # PHI never goes opportunistic
    r = client.post("/api/v1/messages", json=body(), headers=key)  # PHI under an opportunistic floor: raised
    assert r.status_code == 202
    assert client.get(f"/api/v1/messages/{r.json()['id']}", headers=key).json()["security"] == "tls_required"


def test_delivery_settings_need_org_manage(client, sender, key, session, make_user):
    from tests.fixtures.accounts import login_client

    assert client.get("/api/v1/delivery-settings", headers=key).json() == {"security_mode": "tls_required",
                                                                         "default_purpose": "treatment", "relay": None, "engagement_privacy": False}
    assert client.patch("/api/v1/delivery-settings", json={"security_mode": "secure"}, headers=key).status_code == 403
    developer = make_user(sender.org_id, role="developer")
    csrf = login_client(client, developer)
    assert client.patch("/api/v1/delivery-settings", json={"security_mode": "secure"},
                        headers={"X-CSRF-Token": csrf}).status_code == 403
    client.cookies.clear()
    owner = make_user(sender.org_id, role="owner")
    csrf = login_client(client, owner)
    for bad, field in (({"security_mode": "loose"}, "security_mode"), ({"default_purpose": "Spam!"}, "default_purpose"),
                       ({"colour": "red"}, "colour")):
        r = client.patch("/api/v1/delivery-settings", json=bad, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    r = client.patch("/api/v1/delivery-settings", json={"security_mode": "secure"}, headers={"X-CSRF-Token": csrf})
    assert r.json()["security_mode"] == "secure"
    [event] = audit(session, sender.org_id, "delivery_settings.update")
    assert event.details["before"]["security_mode"] == "tls_required" and event.details["after"]["security_mode"] == "secure"


def test_idempotency_key(client, sender, key, session):
    headers = {**key, "Idempotency-Key": "order-4711"}
    first = client.post("/api/v1/messages", json=body(), headers=headers)
    again = client.post("/api/v1/messages", json=body(), headers=headers)
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    other = client.post("/api/v1/messages", json=body(subject="Something else"), headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert count(session, Message) == 1
    session.rollback()
    assert session.scalar(select(Message.idempotency_key)) != "order-4711"  # stored hashed
    fresh = client.post("/api/v1/messages", json=body(), headers={**key, "Idempotency-Key": "order-4712"})
    assert fresh.json()["id"] != first.json()["id"]
    bad = client.post("/api/v1/messages", json=body(), headers={**key, "Idempotency-Key": "x" * 201})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "Idempotency-Key"


def test_batch_all_or_nothing(client, sender, key, session):
    r = client.post("/api/v1/messages/batch", json={"messages": [body(), body(to=["lee@valid.test"])]}, headers=key)
    assert r.status_code == 202, r.text
    assert len(r.json()["ids"]) == 2 and count(session, Message) == 2

    bad = {"messages": [body(), body(to=["fine@valid.test", "broken"]), body()]}
    r = client.post("/api/v1/messages/batch", json=bad, headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "messages.1.to.1"
    r = client.post("/api/v1/messages/batch", json={"messages": [body(), body(subject="a\r\nb")]}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "messages.1.subject"
    r = client.post("/api/v1/messages/batch", json={"messages": [body(), body(bogus=True)]}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "messages.1.bogus"
    assert count(session, Message) == 2

    r = client.post("/api/v1/messages/batch", json={"messages": [body()] * 1001}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "messages"
    assert client.post("/api/v1/messages/batch", json={"messages": []}, headers=key).status_code == 422

    headers = {**key, "Idempotency-Key": "batch-1"}
    first = client.post("/api/v1/messages/batch", json={"messages": [body(), body()]}, headers=headers).json()
    assert client.post("/api/v1/messages/batch", json={"messages": [body(), body()]}, headers=headers).json() == first
    assert client.post("/api/v1/messages/batch", json={"messages": [body()]}, headers=headers).status_code == 409


def test_batch_of_a_thousand(client, sender, key, session):
    messages = [body(to=[f"patient{i}@valid.test"], text=f"Dear patient {i}", html=None) for i in range(1000)]
    r = client.post("/api/v1/messages/batch", json={"messages": messages}, headers=key)
    assert r.status_code == 202, r.text
    assert len(set(r.json()["ids"])) == 1000 and count(session, MessageRecipient) == 1000
    [event] = audit(session, sender.org_id, "message.create_batch")
    assert event.details["messages_count"] == 1000


def test_permissions(client, sender, session):
    reader = sender.key("messages:read")
    assert client.post("/api/v1/messages", json=body(), headers=reader).status_code == 403
    sender_only = sender.key("messages:send")
    r = client.post("/api/v1/messages", json=body(), headers=sender_only)
    assert r.status_code == 202
    assert client.get(f"/api/v1/messages/{r.json()['id']}", headers=sender_only).status_code == 403
    assert client.get(f"/api/v1/messages/{'0' * 32}", headers=reader).status_code == 404
    assert client.post("/api/v1/messages", json=body()).status_code == 401


def test_messages_of_another_organization_are_invisible(client, sender, key, session):
    from carepost.accounts.service import create_organization
    from tests.fixtures.delivery import Sender

    other = create_organization(session, "Foo Health")
    session.commit()
    theirs = Sender(other.id, "", session).key("messages:read", "messages:send")
    r = client.post("/api/v1/messages", json=body(), headers=key)
    assert client.get(f"/api/v1/messages/{r.json()['id']}", headers=theirs).status_code == 404
    assert client.get("/api/v1/messages", headers=theirs).json()["data"] == []
    # bar.example is not their sending domain
    r = client.post("/api/v1/messages", json=body(purpose="treatment"), headers=theirs)
    assert r.status_code == 422 and r.json()["error"]["field"] == "from"


def test_sandbox_credentials_mark_the_message(client, sender, session, delivery_queue):
    sandbox = sender.key(sandbox=True)
    r = client.post("/api/v1/messages", json=body(), headers=sandbox)
    assert r.status_code == 202
    session.rollback()
    assert session.get(Message, r.json()["id"]).sandbox is True


def test_accepting_queues_one_delivery_task(client, sender, key, delivery_queue):
    from carepost.core.queue import huey

    client.post("/api/v1/messages", json=body(), headers=key)
    client.post("/api/v1/messages/batch", json={"messages": [body(), body()]}, headers=key)
    assert huey.pending_count() == 2
    task = huey.dequeue()
    assert task.name == "delivery.deliver_messages" and len(task.args[0]) == 1


def test_no_phi_in_logs_or_errors(client, sender, key, capfd):
    client.post("/api/v1/messages", json=body(), headers=key)
    r = client.post("/api/v1/messages", json=body(to=["pat@valid.test", "broken pat@"]), headers=key)
    assert "pat@" not in r.text and "HbA1c" not in r.text
    out, err = capfd.readouterr()
    for text in ("pat@", "HbA1c", "insulin", "Pat Doe"):
        assert text not in out + err


def test_events_have_no_phi(client, sender, key, session):
    r = client.post("/api/v1/messages", json=body(), headers=key)
    session.rollback()
    for event in session.scalars(select(MessageEvent).where(MessageEvent.message_id == r.json()["id"])):
        assert "valid.test" not in json.dumps(event.details)
