"""Secure replies both ways (issue 10 item 13), through HTTP: staff see which patient wrote a
portal reply (masked or unmasked by role), answer in the same thread (stored encrypted, audited,
the patient notified by a real email without PHI), and the patient reads the answer in the
portal. Who may answer: those who may send messages with PHI."""

from __future__ import annotations

import email
from email import policy as email_policy

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.delivery.models import MessageEvent, MessageRecipient
from carepost.portal.models import PortalMessage, PortalReply
from tests.fixtures.accounts import csrf_from, login_client
from tests.fixtures.portal import ADDRESS, PHI_SUBJECT, arrange
from tests.test_portal_pages import _sign_in_with_code

PATIENT_REPLY = "My glucose was 190 again this morning, is that bad?"
ANSWER = "Please take the evening dose an hour earlier and call us Friday."


@pytest.fixture
def immediate_queue():
    from carepost.core.queue import huey

    huey.immediate = True
    yield huey
    huey.immediate = False


@pytest.fixture
def thread(session, org, delivery_env, immediate_queue):
    """A portal message to a contact (Jordan Vale) who has replied once."""
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact
    from carepost.portal import service

    a = arrange(session, org.id)
    contact = save_contact(session, org.id, ContactIn(given_name="Jordan", family_name="Vale", email=ADDRESS)).contact
    session.get(MessageRecipient, a.recipient_id).contact_id = contact.id
    pm = session.get(PortalMessage, a.portal_message_id)
    service.add_reply(session, pm, PATIENT_REPLY, None)
    session.commit()
    a.contact_id = contact.id
    return a


def _login(client, user) -> None:
    client.cookies.clear()
    client.headers.pop("X-CSRF-Token", None)
    client.headers["X-CSRF-Token"] = login_client(client, user)


def _audit(session, action):
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def _mail(delivery_env):
    return [email.message_from_bytes(m.data, policy=email_policy.default) for m in delivery_env.mx["valid"].recorder.messages]


def test_staff_see_which_patient_wrote_masked_or_unmasked(client, session, org, make_user, thread):
    _login(client, make_user(org, role="admin"))  # phi:read_unmasked
    page = client.get(f"/app/portal/{thread.portal_message_id}")
    assert page.status_code == 200
    assert 'data-testid="patient-name">Jordan Vale<' in page.text and ADDRESS in page.text
    assert f'href="/app/contacts/{thread.contact_id}"' in page.text and PATIENT_REPLY in page.text
    assert "Jordan Vale</strong> wrote" in page.text
    _login(client, make_user(org, role="marketer"))  # phi:read_masked only: the reply, never the name
    page = client.get(f"/app/portal/{thread.portal_message_id}")
    assert page.status_code == 200 and PATIENT_REPLY in page.text
    assert "Jordan" not in page.text and "Vale" not in page.text and "valid.test" not in page.text
    assert f'href="/app/contacts/{thread.contact_id}"' in page.text and "a patient (open the contact record)" in page.text
    assert 'data-testid="answer-form"' not in page.text  # a marketer does not answer patients
    views = [e.details["view"] for e in _audit(session, "portal.reply.read")]
    assert views == ["unmasked", "masked"]
    assert all(e.details["contact_id"] == thread.contact_id for e in _audit(session, "portal.reply.read"))


def test_staff_answer_is_encrypted_notified_without_phi_and_read_in_the_portal(client, session, org, make_user, thread,
                                                                              delivery_env):
    owner = make_user(org, role="owner")
    _login(client, owner)
    page = client.get(f"/app/portal/{thread.portal_message_id}")
    delivery_env.mx["valid"].recorder.reset()
    r = client.post(f"/app/portal/{thread.portal_message_id}/answer",
                    data={"text": ANSWER, "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/app/portal/{thread.portal_message_id}?done=answered#thread"
    page = client.get(r.headers["location"])
    assert ANSWER in page.text and "not seen yet" in page.text

    session.rollback()
    rows = session.scalars(select(PortalReply).where(PortalReply.portal_message_id == thread.portal_message_id)
                           .order_by(PortalReply.created_at)).all()
    assert [r.author for r in rows] == ["recipient", "staff"] and rows[1].author_id == owner.id
    assert b"evening dose" not in rows[1].text_enc and rows[1].notified_at is not None
    [created] = _audit(session, "portal.staff_reply.create")
    assert created.actor_id == owner.id and created.details == {"reply_id": rows[1].id, "via": "ui"}
    assert ANSWER not in str(created.details)
    assert session.scalars(select(MessageEvent.type).where(MessageEvent.recipient_id == thread.recipient_id)).all() \
        .count("portal_answer") == 1

    # The patient's notice: the organization's name and the portal link, nothing of the answer.
    [notice] = [m for m in _mail(delivery_env) if m["To"] == ADDRESS]
    raw = notice.as_string()
    assert f"/p/{thread.token}" in notice.get_body(("plain",)).get_content()
    for phi in ("evening dose", "glucose", "Jordan", "Vale", PHI_SUBJECT, "biopsy"):
        assert phi not in raw
    assert org.name in notice["Subject"]

    # The patient signs in and sees both sides of the conversation; the answer gets its receipt.
    client.cookies.clear()
    client.headers.pop("X-CSRF-Token", None)
    _sign_in_with_code(client, delivery_env, thread.token)
    page = client.get(f"/p/{thread.token}/message")
    assert PATIENT_REPLY in page.text and ANSWER in page.text and f"{org.name} answered" in page.text
    session.rollback()
    assert session.get(PortalReply, rows[1].id).read_at is not None
    reads = _audit(session, "portal.message.read")
    assert reads[-1].details["answers_seen"] == [rows[1].id]


def test_answer_through_the_api_and_the_thread_lists_authors(client, session, org, thread):
    from carepost.accounts import credentials

    cred, secret = credentials.create_credential(session, org.id, name="ehr",
                                                 scopes=["messages:send", "messages:read", "phi:read_masked"])
    session.commit()
    auth = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    r = client.post(f"/api/v1/portal-messages/{thread.portal_message_id}/answers", json={"text": ANSWER}, headers=auth)
    assert r.status_code == 201, r.text
    assert r.json()["author"] == "staff" and r.json()["text"] == ANSWER
    items = client.get(f"/api/v1/portal-messages/{thread.portal_message_id}/replies", headers=auth).json()["items"]
    assert [(i["author"], i["text"]) for i in items] == [("recipient", PATIENT_REPLY), ("staff", ANSWER)]
    assert items[1]["read_at"] is None  # staff reading the thread is not the patient's receipt
    state = client.get(f"/api/v1/portal-messages/{thread.portal_message_id}", headers=auth).json()
    assert state["reply_count"] == 1 and state["answer_count"] == 1
    # Bad input names the field.
    r = client.post(f"/api/v1/portal-messages/{thread.portal_message_id}/answers", json={"text": "  "}, headers=auth)
    assert r.status_code == 422 and r.json()["error"]["field"] == "text"
    r = client.post(f"/api/v1/portal-messages/{thread.portal_message_id}/answers", json={"text": "x", "cc": "y"}, headers=auth)
    assert r.status_code == 422


def test_who_may_answer(client, session, org, make_user, thread):
    from carepost.accounts import credentials

    for role in ("marketer", "care_team", "analyst", "compliance_officer"):
        _login(client, make_user(org, role=role))
        r = client.post(f"/app/portal/{thread.portal_message_id}/answer", data={"text": ANSWER})
        assert r.status_code == 403, role
    cred, secret = credentials.create_credential(session, org.id, name="no-phi", scopes=["messages:send"])
    session.commit()
    client.cookies.clear()
    client.headers.pop("X-CSRF-Token", None)
    r = client.post(f"/api/v1/portal-messages/{thread.portal_message_id}/answers", json={"text": ANSWER},
                    headers={"Authorization": f"Bearer {cred.key_id}.{secret}"})
    assert r.status_code == 403
    session.rollback()
    assert [r.author for r in session.scalars(select(PortalReply)).all()] == ["recipient"]


def test_answer_refused_when_empty_without_csrf_or_after_recall(client, session, org, make_user, thread):
    from carepost.portal import service

    _login(client, make_user(org, role="developer"))
    page = client.get(f"/app/portal/{thread.portal_message_id}")
    csrf = csrf_from(page.text)
    r = client.post(f"/app/portal/{thread.portal_message_id}/answer", data={"text": "   ", "csrf_token": csrf})
    assert r.status_code == 422 and 'data-testid="answer-error"' in r.text and "Write an answer first" in r.text
    client.headers.pop("X-CSRF-Token")
    r = client.post(f"/app/portal/{thread.portal_message_id}/answer", data={"text": ANSWER})
    assert r.status_code == 403
    session.rollback()
    service.recall(session, session.get(PortalMessage, thread.portal_message_id), None)
    session.commit()
    r = client.post(f"/app/portal/{thread.portal_message_id}/answer", data={"text": ANSWER, "csrf_token": csrf})
    assert r.status_code == 409 and "recalled" in r.text
    session.rollback()
    assert [r.author for r in session.scalars(select(PortalReply)).all()] == ["recipient"]
