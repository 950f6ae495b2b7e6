"""The compose page's form handlers through HTTP (issue 10 item 5): one message per recipient
through the API's own service (stored encrypted, eligibility at acceptance, queued), merge fields
per recipient, the per-recipient security preview, the test to oneself, attachments under the
API's allow-list, the field named in every refusal, the Marketer role's limits, audit events."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.core.crypto import get_keyring
from carepost.delivery.models import ComposedSend, Message, MessageAttachment, MessageRecipient
from tests.fixtures.accounts import login_client

FROM = "care@bar.example"


@pytest.fixture
def ready(sender, delivery_queue, session):
    """The sender's domain may send (its ownership proven where the installation checks it)."""
    from carepost.core import clock
    from carepost.delivery.models import SendingDomain

    row = session.get(SendingDomain, sender.domain_id)
    if hasattr(row, "verified_at"):
        row.verified_at = clock.now()
    session.commit()
    return sender


def _client(client, org_id, make_user, role):
    user = make_user(org_id, role=role)
    client.csrf = login_client(client, user)
    client.user = user
    return client


@pytest.fixture
def owner(client, ready, make_user):
    return _client(client, ready.org_id, make_user, "owner")


@pytest.fixture
def pat(ready, session):
    """A patient with an email address on file."""
    from carepost.core.database import org_session
    from carepost.patients.service import save_contact

    with org_session(ready.org_id) as s:
        result = save_contact(s, ready.org_id, {"given_name": "Patricia", "family_name": "Doe", "email": "pat@valid.test"})
        s.commit()
        return result.contact.id


def form(**over) -> dict:
    data = {"from": FROM, "addresses": "", "template_id": "", "subject": "A message from your care team",
            "text": "Dear {{ first_name }}, your results are ready.", "html": "", "purpose": "treatment", "topic": "",
            "security": "", "contains_phi": "yes"}
    data.update(over)
    return data


def post(c, path, data, files=None, **kw):
    return c.post(path, data={**data, "csrf_token": c.csrf}, files=files, follow_redirects=False, **kw)


def _text(session, message) -> str:
    return get_keyring().decrypt_text(session, message.org_id, "messages", "text", message.id, message.text_enc)


def _subject(session, message) -> str:
    return get_keyring().decrypt_text(session, message.org_id, "messages", "subject", message.id, message.subject_enc)


def _address(session, r) -> str:
    return get_keyring().decrypt_text(session, r.org_id, "message_recipients", "address", r.id, r.address_enc)


def _audit(session, action):
    session.rollback()
    return session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all()


def test_page_is_in_the_navigation_with_merge_fields_and_choices(owner, session):
    page = owner.get("/app/compose")
    assert page.status_code == 200, page.text
    assert 'href="/app/compose"' in page.text and "<h1>Compose</h1>" in page.text
    for name in ("first_name", "last_name", "full_name", "name_prefix"):
        assert "{{ " + name + " }}" in page.text
    assert f'value="no-reply@bar.example"' in page.text  # a From in the organization's sending domain
    assert 'option value="treatment"' in page.text and 'option value="marketing"' in page.text
    assert 'name="attachments" type="file" multiple' in page.text


def test_send_free_text_to_a_patient_and_an_address_one_message_each(owner, pat, session):
    from carepost.core.queue import huey

    r = post(owner, "/app/compose/send", {**form(addresses="lee@valid.test"), "contact_id": pat})
    assert r.status_code == 303, r.text
    assert re.fullmatch(r"/app/compose/sent/[0-9a-f]{32}", r.headers["location"])
    session.rollback()
    batch = session.scalars(select(ComposedSend)).one()
    messages = [session.get(Message, i) for i in batch.message_ids]
    assert len(messages) == 2 and {m.source for m in messages} == {"ui"}
    by_address = {}
    for m in messages:
        (rec,) = session.scalars(select(MessageRecipient).where(MessageRecipient.message_id == m.id)).all()
        by_address[_address(session, rec)] = (m, rec)
        assert m.purpose == "treatment" and m.security == "tls_required" and m.contains_phi
        assert m.created_by == owner.user.id
    # Each recipient gets their own message, merge fields filled from the patient record.
    m, rec = by_address["pat@valid.test"]
    assert _text(session, m) == "Dear Patricia, your results are ready." and rec.contact_id == pat
    m, rec = by_address["lee@valid.test"]
    assert _text(session, m) == "Dear , your results are ready." and rec.contact_id is None
    assert all(rec.status == "queued" for _m, rec in by_address.values())
    # Queued for the worker (ids only), audited like the API's message.create.
    assert huey.pending_count() == 1
    task = huey.dequeue()
    assert task.name == "delivery.deliver_messages" and sorted(task.args[0]) == sorted(batch.message_ids)
    events = _audit(session, "message.create")
    assert {e.target_id for e in events} == set(batch.message_ids)
    assert all(e.details["via"] == "ui" and e.details["purpose"] == "treatment" for e in events)
    assert "pat@valid.test" not in str([e.details for e in events])

    page = owner.get(r.headers["location"])
    assert page.status_code == 200
    assert page.text.count('data-testid="sent-row"') == 2
    assert "pat@valid.test" in page.text and "lee@valid.test" in page.text  # an owner sees unmasked
    assert page.text.count('data-testid="status">queued') == 2
    assert all(f"/app/deliveries/{i}" in page.text for i in batch.message_ids)
    assert _audit(session, "message.list")[-1].details["page"] == "compose_sent"


def test_one_recipient_lands_on_the_message_page(owner, session):
    r = post(owner, "/app/compose/send", form(addresses="solo@valid.test"))
    assert r.status_code == 303, r.text
    session.rollback()
    message = session.scalars(select(Message)).one()
    assert r.headers["location"] == f"/app/deliveries/{message.id}"
    page = owner.get(r.headers["location"])
    assert page.status_code == 200 and "solo@valid.test" in page.text and 'data-testid="status">queued' in page.text


@pytest.mark.parametrize(("over", "field", "words"), [
    ({"addresses": "not-an-address"}, "addresses.0", "addresses.0"),
    ({"addresses": "ok@valid.test, bad@@valid.test"}, "addresses.1", "addresses.1"),
    ({"addresses": ""}, "recipients", "at least one patient"),
    ({"addresses": "a@valid.test", "from": "care@elsewhere.example"}, "from", "sending domain"),
    ({"addresses": "a@valid.test", "subject": ""}, "subject", "Enter a subject"),
    ({"addresses": "a@valid.test", "text": "Dear {{ age }}"}, "text", "Unknown merge field age"),
    ({"addresses": "a@valid.test", "text": "Dear {{ first_name"}, "text", "syntax"),
    ({"addresses": "a@valid.test", "subject": "Hi {{ first_name }}"}, "subject", "may not use template variables"),
    ({"addresses": "a@valid.test", "security": "opportunistic"}, "security", "never lowered"),
    ({"addresses": "a@valid.test", "purpose": "marketing"}, "topic", "topic"),
    ({"addresses": "a@valid.test", "purpose": "gossip"}, "purpose", "Unknown purpose"),
    ({"addresses": "pat@valid.test", "subject": "Results for Patricia Doe"}, "subject", "may not contain"),
])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(owner, pat, session, over, field, words):
    r = post(owner, "/app/compose/send", form(**over))
    assert r.status_code == 422, r.text
    assert f"<strong>{field}</strong>" in r.text and words in r.text
    assert 'aria-invalid="true"' in r.text
    session.rollback()
    assert session.scalars(select(Message)).first() is None


def test_unknown_patient_id_and_patient_without_email_name_the_contact(owner, ready, session):
    from carepost.core.database import org_session
    from carepost.patients.service import save_contact

    r = post(owner, "/app/compose/send", {**form(), "contact_id": "0" * 32})
    assert r.status_code == 422 and "<strong>contacts.0</strong>" in r.text and "No such patient" in r.text
    with org_session(ready.org_id) as s:
        no_email = save_contact(s, ready.org_id, {"given_name": "Noah"}).contact.id
        s.commit()
    r = post(owner, "/app/compose/send", {**form(), "contact_id": no_email})
    assert r.status_code == 422 and "no email address on file" in r.text


def test_preview_shows_the_secure_method_per_recipient_before_sending(owner, pat, session, delivery_env, gpg):
    from carepost.delivery import service

    cert = gpg.gen_key("Key Holder <key@plain.test>")
    service.add_recipient_key(session, owner.user.org_id, "key@plain.test", "pgp", cert)
    session.commit()
    r = post(owner, "/app/compose/preview", {**form(addresses="someone@valid.test\nnobody@plain.test, key@plain.test"),
                                             "contact_id": pat}, headers={"HX-Request": "true"})
    assert r.status_code == 200, r.text
    assert "<html" not in r.text  # the htmx fragment: the form (and its files) stays as typed
    rows = re.findall(r'<tr data-testid="preview-row"><td>([^<]+)</td><td><span class="badge method[^"]*" '
                      r'data-testid="preview-method">(\w+)</span></td><td>([^<]+)</td>', r.text)
    by = {label.replace("&lt;", "<").replace("&gt;", ">"): (method, why) for label, method, why in rows}
    assert by["Patricia Doe <pat@valid.test>"][0] == "tls"
    assert by["someone@valid.test"][0] == "tls" and "verified TLS" in by["someone@valid.test"][1]
    assert by["nobody@plain.test"][0] == "portal"
    assert by["key@plain.test"][0] == "pgp"
    session.rollback()
    assert session.scalars(select(Message)).first() is None  # nothing stored
    assert _audit(session, "security.preview")[-1].details["count"] == 4

    # A marketing message: the patient has no authorization, so the preview shows the exclusion.
    from carepost.consent.service import create_topic

    topic = create_topic(session, owner.user.org_id, key="news", name="Newsletter")
    session.commit()
    r = post(owner, "/app/compose/preview", {**form(purpose="marketing", topic=topic.id, contains_phi="no",
                                                    text="New classes this spring."), "contact_id": pat})
    assert r.status_code == 200 and "<html" in r.text  # without htmx: the whole page
    assert 'data-testid="preview-method">excluded</span>' in r.text
    assert "no_authorization: No signed authorization for this purpose" in r.text


def test_test_send_goes_to_the_signed_in_person_only(owner, pat, session):
    from carepost.core.queue import huey

    r = post(owner, "/app/compose/test", {**form(addresses="lee@valid.test"), "contact_id": pat},
             headers={"HX-Request": "true"})
    assert r.status_code == 200, r.text
    assert 'data-testid="test-sent"' in r.text and owner.user.email in r.text
    session.rollback()
    (message,) = session.scalars(select(Message)).all()
    (rec,) = session.scalars(select(MessageRecipient)).all()
    assert _address(session, rec) == owner.user.email
    assert _subject(session, message) == "[Test] A message from your care team"
    assert _text(session, message) == "Dear [first_name], your results are ready."  # never a patient's data
    assert message.purpose == "transactional" and message.tags == ["compose-test"] and message.security == "tls_required"
    assert huey.pending_count() == 1
    (event,) = _audit(session, "message.create")
    assert event.details["test"] is True and event.target_id == message.id


def test_template_with_merge_fields_and_attachments(owner, pat, session):
    from carepost.content.schemas import TemplateIn
    from carepost.content.service import create_template

    t = create_template(session, owner.user.org_id, TemplateIn(
        name="Results ready", subject="Your results", text="Hello {{ first_name }} {{ last_name }}", html="",
        contains_phi=True, purpose="treatment"))
    other = create_template(session, owner.user.org_id, TemplateIn(
        name="Appointment", subject="Appointment", text="See you {{ appt }}", html="", contains_phi=True, purpose="treatment"))
    session.commit()
    pdf = ("result.pdf", b"%PDF-1.4 results", "application/pdf")
    r = post(owner, "/app/compose/send", {**form(subject="", text="", purpose="", template_id=t.id), "contact_id": pat},
             files=[("attachments", pdf)])
    assert r.status_code == 303, r.text
    session.rollback()
    message = session.scalars(select(Message)).one()
    assert _text(session, message) == "Hello Patricia Doe" and message.purpose == "treatment"
    (att,) = session.scalars(select(MessageAttachment)).all()
    assert att.size == len(pdf[1]) and pdf[1] not in att.content_enc  # stored encrypted
    assert get_keyring().decrypt(session, att.org_id, "message_attachments", "content", att.id, att.content_enc) == pdf[1]

    # A program is refused by the API's allow-list, naming the attachment; nothing stored.
    r = post(owner, "/app/compose/send", form(addresses="a@valid.test"),
             files=[("attachments", pdf), ("attachments", ("setup.exe", b"MZ\x90\x00", "application/octet-stream"))])
    assert r.status_code == 422 and "<strong>attachments.1</strong>" in r.text
    # A template the page cannot fill, or a template and free text at once.
    r = post(owner, "/app/compose/send", form(addresses="a@valid.test", subject="", text="", template_id=other.id))
    assert r.status_code == 422 and "<strong>template_id</strong>" in r.text and "appt" in r.text
    r = post(owner, "/app/compose/send", form(addresses="a@valid.test", template_id=t.id))
    assert r.status_code == 422 and "not both" in r.text
    session.rollback()
    assert len(session.scalars(select(Message)).all()) == 1


def test_marketer_sends_marketing_only(client, ready, pat, make_user, session):
    from carepost.consent.service import create_topic

    topic = create_topic(session, ready.org_id, key="classes", name="Classes and events")
    session.commit()
    c = _client(client, ready.org_id, make_user, "marketer")
    page = c.get("/app/compose")
    assert page.status_code == 200 and 'data-testid="marketer-note"' in page.text
    assert 'option value="treatment"' not in page.text and 'option value="marketing"' in page.text
    assert 'id="contact_name"' not in page.text  # name search needs unmasked PHI

    # Treatment is refused (403 naming the purpose), audited, nothing stored.
    r = post(c, "/app/compose/send", {**form(), "contact_id": pat})
    assert r.status_code == 403 and "<strong>purpose</strong>" in r.text and "commercial" in r.text
    denied = _audit(session, "access.denied")[-1]
    assert denied.details["reason"] == "purpose_not_allowed:treatment" and denied.actor_id == c.user.id
    assert session.scalars(select(Message)).first() is None
    # The organization's default purpose (treatment) does not slip through either.
    r = post(c, "/app/compose/send", {**form(purpose=""), "contact_id": pat})
    assert r.status_code == 403

    # Marketing with its topic is accepted; the patient has no authorization: excluded at once.
    r = post(c, "/app/compose/send", {**form(purpose="marketing", topic=topic.id, contains_phi="no",
                                             text="Hi {{ first_name }}, yoga starts Monday."), "contact_id": pat})
    assert r.status_code == 303, r.text
    session.rollback()
    message = session.scalars(select(Message)).one()
    assert message.purpose == "marketing" and message.topic_id == topic.id
    rec = session.scalars(select(MessageRecipient)).one()
    assert rec.status == "excluded" and rec.reason.startswith("no_authorization")
    detail = c.get(r.headers["location"])
    assert detail.status_code == 200 and "p***@valid.test" in detail.text and "pat@valid.test" not in detail.text

    # The marketer's preview masks the addresses.
    r = post(c, "/app/compose/preview", {**form(purpose="marketing", topic=topic.id, contains_phi="no",
                                                text="Hi"), "contact_id": pat}, headers={"HX-Request": "true"})
    assert r.status_code == 200 and "p***@valid.test" in r.text and "Patricia" not in r.text


def test_a_role_that_cannot_send_is_refused_and_sees_no_compose_link(client, ready, make_user, session):
    c = _client(client, ready.org_id, make_user, "care_team")
    assert 'href="/app/compose"' not in c.get("/app").text
    assert c.get("/app/compose").status_code == 403
    r = post(c, "/app/compose/send", form(addresses="a@valid.test"))
    assert r.status_code == 403
    assert _audit(session, "access.denied")[-1].details["reason"] == "missing:messages:send|campaigns:send"
    session.rollback()
    assert session.scalars(select(Message)).first() is None


def test_csrf_is_required(owner, session):
    r = owner.post("/app/compose/send", data=form(addresses="a@valid.test"), follow_redirects=False)
    assert r.status_code == 403
    session.rollback()
    assert session.scalars(select(Message)).first() is None


def test_name_search_adds_patients_as_checkboxes(owner, pat, session):
    r = post(owner, "/app/compose/contacts", {"contact_name": "patricia"}, headers={"HX-Request": "true"})
    assert r.status_code == 200
    assert f'name="contact_id" value="{pat}"' in r.text and "Patricia Doe" in r.text
    assert _audit(session, "contact.search")[-1].details["via"] == "compose"
    # Without JavaScript the whole page comes back, keeping what was typed.
    r = post(owner, "/app/compose/contacts", {**form(subject="Kept subject"), "contact_name": "doe"})
    assert r.status_code == 200 and "<h1>Compose</h1>" in r.text
    assert f'name="contact_id" value="{pat}"' in r.text and 'value="Kept subject"' in r.text
    r = post(owner, "/app/compose/contacts", {**form(), "contact_name": ""})
    assert r.status_code == 422 and "<strong>contact_name</strong>" in r.text and "Enter a name" in r.text


def test_api_lists_messages_sent_from_the_ui(owner, ready, session):
    r = post(owner, "/app/compose/send", form(addresses="solo@valid.test"))
    assert r.status_code == 303
    listed = owner.get("/api/v1/messages?source=ui", headers={"Authorization": None, **ready.key("messages:read")})
    assert listed.status_code == 200, listed.text
    assert [m["source"] for m in listed.json()["data"]] == ["ui"]


def test_test_send_of_a_template_with_an_attachment(owner, pat, session):
    from carepost.content.schemas import TemplateIn
    from carepost.content.service import create_template

    t = create_template(session, owner.user.org_id, TemplateIn(
        name="Results", subject="Your results", text="Hello {{ full_name }}", html="<p>Hello {{ first_name }}</p>",
        contains_phi=True, purpose="treatment"))
    session.commit()
    r = post(owner, "/app/compose/test", {**form(subject="", text="", template_id=t.id), "contact_id": pat},
             files=[("attachments", ("leaflet.pdf", b"%PDF-1.4 leaflet", "application/pdf"))],
             headers={"HX-Request": "true"})
    assert r.status_code == 200 and 'data-testid="test-sent"' in r.text, r.text
    session.rollback()
    message = session.scalars(select(Message)).one()
    assert _subject(session, message) == "[Test] Your results" and _text(session, message) == "Hello [full_name]"
    assert message.contains_phi and message.purpose == "transactional"
    assert session.scalars(select(MessageAttachment)).one().message_id == message.id
