"""Test sends of a template (issue 14 item 1): only to verified staff of the organization,
through the real delivery path (prepared, stored encrypted, queued), never with a patient's data."""

from __future__ import annotations

from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.core.crypto import get_keyring
from carepost.delivery.models import Message, MessageRecipient
from tests.fixtures.accounts import add_staff

TEMPLATE = {"name": "Visit", "subject": "Your upcoming visit", "purpose": "treatment",
            "html": "<p>Hello {{ first_name }}, see you {{ next_appointment.when }}.</p>"
                    "{% block_if 'has condition icd10cm:E11.*' %}<p>Diabetes class</p>{% endblock_if %}",
            "variants": {"es": {"subject": "Su próxima visita", "html": "<p>Hola {{ first_name }}.</p>"}}}


def test_test_sends_go_to_verified_staff_only_with_placeholders(client, sender, delivery_queue, session, org):
    from carepost.core.queue import huey
    from carepost.patients.service import save_contact

    key = sender.key("templates:manage")
    staff = add_staff(session, org.id, "marketer", email="marketer@staff.example")
    rosa = save_contact(session, org.id, {"given_name": "Rosa", "family_name": "Díaz", "preferred_language": "es"}).contact
    session.commit()
    tid = client.post("/api/v1/templates", json=TEMPLATE, headers=key).json()["id"]

    # A patient's or a stranger's address is refused naming the field; nothing is stored.
    r = client.post(f"/api/v1/templates/{tid}/test-sends", headers=key,
                    json={"from": "care@bar.example", "to": [staff.email, "rosa@valid.test"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "to.1"
    session.rollback()
    assert session.scalars(select(Message)).all() == []

    r = client.post(f"/api/v1/templates/{tid}/test-sends", headers=key,
                    json={"from": "care@bar.example", "to": [staff.email.upper()]})
    assert r.status_code == 202, r.text
    r2 = client.post(f"/api/v1/templates/{tid}/test-sends", headers=key,
                     json={"from": "care@bar.example", "to": [staff.email], "contact_id": rosa.id})
    assert r2.status_code == 202, r2.text
    session.rollback()
    ring = get_keyring()
    first = session.get(Message, r.json()["message_ids"][0])
    html = ring.decrypt_text(session, first.org_id, "messages", "html", first.id, first.html_enc)
    subject = ring.decrypt_text(session, first.org_id, "messages", "subject", first.id, first.subject_enc)
    assert subject == "[Test] Your upcoming visit"
    assert "Hello [first_name], see you [date and time]." in html and "Diabetes class" in html  # every block shown
    assert first.purpose == "transactional" and first.tags == ["template-test"]
    from carepost.content.models import MessageTemplate

    assert (first.template_id, first.template_version_id) == (tid, session.get(MessageTemplate, tid).current_version_id)
    masked = session.get(Message, r2.json()["message_ids"][0])
    html = ring.decrypt_text(session, masked.org_id, "messages", "html", masked.id, masked.html_enc)
    assert "Hola ***." in html and "Rosa" not in html  # the contact's language, data masked
    (rec, _) = session.scalars(select(MessageRecipient).order_by(MessageRecipient.message_id)).all()[:2]
    assert huey.pending_count() == 2
    events = session.scalars(select(AuditEvent).where(AuditEvent.action == "template.test_send")).all()
    assert len(events) == 2 and {e.target_id for e in events} == set(r.json()["message_ids"] + r2.json()["message_ids"])


def test_a_test_send_is_delivered_by_the_real_pipeline_to_a_real_smtp_peer(delivery_env, client, sender, delivery_queue,
                                                                              session, org):
    import email
    from email import policy as email_policy

    from carepost.delivery import pipeline

    key = sender.key("templates:manage")
    staff = add_staff(session, org.id, "marketer", email="nurse@valid.test")
    session.commit()
    tid = client.post("/api/v1/templates", json={**TEMPLATE, "variants": {}}, headers=key).json()["id"]
    r = client.post(f"/api/v1/templates/{tid}/test-sends", headers=key,
                    json={"from": "Bar Clinic <care@bar.example>", "to": [staff.email]})
    assert r.status_code == 202, r.text
    pipeline.deliver(r.json()["message_ids"])
    [received] = delivery_env.mx["valid"].recorder.messages
    assert received.rcpt_tos == ["nurse@valid.test"]
    msg = email.message_from_bytes(received.data, policy=email_policy.default)
    assert msg["Subject"] == "[Test] Your upcoming visit"
    html = msg.get_body(preferencelist=("html",)).get_content()
    assert "Hello [first_name], see you [date and time]." in html
    text = msg.get_body(preferencelist=("plain",)).get_content()
    assert "Hello [first_name]" in text  # the text part made from the HTML
