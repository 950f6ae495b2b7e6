"""POST /api/v1/messages with a template id and data: rendered in the sandbox, stored encrypted,
errors naming the field."""

from __future__ import annotations

import pytest

from carepost.core.crypto import get_keyring
from carepost.delivery.models import Message

SECRET = "Your A1c result is ready"


@pytest.fixture
def key(sender, delivery_queue):
    return sender.key("messages:send", "messages:read", "templates:manage")


def make_template(client, key, **over) -> str:
    body = {"name": "Results ready", "subject": "A message from your care team",
            "html": "<p>Dear {{ first_name }}, {{ note }}</p>", "text": "Dear {{ first_name }}, {{ note }}"}
    body.update(over)
    r = client.post("/api/v1/templates", json=body, headers=key)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_message_from_template_is_rendered_and_stored_encrypted(client, sender, key, session):
    template_id = make_template(client, key)
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "care@bar.example", "to": ["pat@valid.test"], "template_id": template_id,
        "data": {"first_name": "Pat", "note": SECRET + " <b>now</b>"}})
    assert r.status_code == 202, r.text
    session.rollback()
    row = session.get(Message, r.json()["id"])
    assert SECRET.encode() not in (row.html_enc or b"") + (row.text_enc or b"")
    ring = get_keyring()
    html = ring.decrypt_text(session, row.org_id, "messages", "html", row.id, row.html_enc)
    text = ring.decrypt_text(session, row.org_id, "messages", "text", row.id, row.text_enc)
    assert html == f"<p>Dear Pat, {SECRET} &lt;b&gt;now&lt;/b&gt;</p>"  # escaped in HTML
    assert text == f"Dear Pat, {SECRET} <b>now</b>"
    assert row.contains_phi is True and row.purpose == "treatment"


def test_unknown_template_variable_names_the_field(client, sender, key):
    template_id = make_template(client, key)
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "care@bar.example", "to": ["pat@valid.test"], "template_id": template_id, "data": {"first_name": "Pat"}})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "data.note"
    assert "Pat" not in r.text


def test_template_and_inline_content_together_are_refused(client, sender, key):
    template_id = make_template(client, key)
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "care@bar.example", "to": ["pat@valid.test"], "template_id": template_id, "data": {},
        "subject": "x", "text": "y"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "template_id"


def test_template_of_another_organization_is_not_found(client, sender, key, session):
    from carepost.accounts.credentials import create_credential
    from carepost.accounts.service import create_organization

    template_id = make_template(client, key)
    other = create_organization(session, "Other Clinic")
    cred, secret = create_credential(session, other.id, name="o", scopes=["messages:send"])
    session.commit()
    r = client.post("/api/v1/messages", headers={"Authorization": f"Bearer {cred.key_id}.{secret}"}, json={
        "from": "care@bar.example", "to": ["pat@valid.test"], "template_id": template_id, "data": {}})
    assert r.status_code in (404, 422)
    assert r.json()["error"]["field"] in ("template_id", "from")
