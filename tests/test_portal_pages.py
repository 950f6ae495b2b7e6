"""The secure portal through HTTP (TestClient): code and question sign-in, lockout, reading,
attachments, replies, read receipt, expiry, recall, audit — and no PHI in URLs, headers,
notification or code emails. Codes travel by real email to the local MX test servers."""

from __future__ import annotations

import email
import re
from datetime import timedelta
from email import policy as email_policy

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.core import clock
from carepost.delivery.models import MessageEvent, MessageRecipient
from carepost.portal.models import PortalAttachment, PortalMessage, PortalReply, PortalSession
from tests.fixtures.accounts import csrf_from
from tests.fixtures.portal import ADDRESS, PHI_SUBJECT, PHI_TEXT, arrange

PHI_VALUES = (PHI_SUBJECT, "Jordan", "Vale", "biopsy", "88-4411", ADDRESS, "jordan.vale")


@pytest.fixture
def immediate_queue():
    from carepost.core.queue import huey

    huey.immediate = True
    yield huey
    huey.immediate = False


@pytest.fixture
def portal(session, org, delivery_env, immediate_queue):
    return arrange(session, org.id)


def _received(delivery_env, name="valid"):
    return [email.message_from_bytes(m.data, policy=email_policy.default) for m in delivery_env.mx[name].recorder.messages]


def _code_from(msg) -> str:
    body = msg.get_body(("plain",)).get_content()
    return "".join(re.search(r"(\d{4}) (\d{4})", body).groups())


def _assert_no_phi(response):
    for name, value in response.headers.items():
        for phi in PHI_VALUES:
            assert phi.lower() not in value.lower(), f"PHI in header {name}"
    location = response.headers.get("location", "")
    for phi in PHI_VALUES:
        assert phi.lower() not in location.lower()


def _sign_in_with_code(client, delivery_env, token: str) -> str:
    page = client.get(f"/p/{token}")
    assert page.status_code == 200 and "Email me a code" in page.text
    r = client.post(f"/p/{token}/code", data={"csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/p/{token}?sent=1"
    _assert_no_phi(r)
    code = _code_from(_received(delivery_env)[-1])
    page = client.get(r.headers["location"])
    assert "We sent a code" in page.text and "j•••@valid.test" in page.text
    r = client.post(f"/p/{token}/verify", data={"code": code, "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/p/{token}/message", r.text
    _assert_no_phi(r)
    return r.headers["set-cookie"]


def _events(session, pm_id, action=None):
    session.rollback()
    q = select(AuditEvent).where(AuditEvent.target_id == pm_id).order_by(AuditEvent.seq)
    rows = session.scalars(q).all()
    return [e for e in rows if action is None or e.action == action]


def test_code_sign_in_read_receipt_once_and_every_view_audited(client, session, portal, delivery_env):
    cookie = _sign_in_with_code(client, delivery_env, portal.token)
    assert "cp_portal=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Path=/p" in cookie
    [code_mail] = _received(delivery_env)
    assert code_mail["To"] == ADDRESS and "Bar Clinic" in code_mail["Subject"]
    for phi in (PHI_SUBJECT, "Jordan", "biopsy", "88-4411"):
        assert phi not in code_mail.as_string()

    page = client.get(f"/p/{portal.token}/message")
    assert page.status_code == 200 and PHI_SUBJECT in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "Content-Security-Policy" in page.headers and "'unsafe-inline'" not in page.headers["content-security-policy"]
    # The HTML is shown sanitized inside a sandboxed frame: no script, no remote image.
    frame = re.search(r'<iframe[^>]*sandbox="([^"]*)"[^>]*srcdoc="([^"]*)"', page.text)
    assert frame and "allow-scripts" not in frame.group(1)
    assert "benign" in frame.group(2) and "script" not in frame.group(2).replace("/static/portal", "")
    assert "tracker.example" not in page.text and "onclick" not in page.text and "javascript:" not in page.text
    client.get(f"/p/{portal.token}/message")

    session.rollback()
    rcpt = session.get(MessageRecipient, portal.recipient_id)
    assert rcpt.status == "portal_viewed"
    viewed = session.scalars(select(MessageEvent).where(MessageEvent.recipient_id == rcpt.id,
                                                        MessageEvent.type == "portal_viewed")).all()
    assert len(viewed) == 1
    pm = session.get(PortalMessage, portal.portal_message_id)
    assert pm.view_count == 2 and pm.first_viewed_at is not None and pm.code_hash is None
    reads = _events(session, pm.id, "portal.message.read")
    assert [e.details["first_view"] for e in reads] == [True, False]
    assert all(e.actor_type == "portal_recipient" and e.target_type == "portal_message" for e in reads)
    actions = [e.action for e in _events(session, pm.id)]
    for action in ("portal.link.open", "portal.code.request", "portal.code.sent", "portal.auth"):
        assert action in actions
    for e in _events(session, pm.id):
        text = repr(e.details) + (e.user_agent or "")
        assert not any(phi in text for phi in PHI_VALUES)


def test_code_works_once_and_a_second_browser_needs_its_own(client, app, session, portal, delivery_env):
    from fastapi.testclient import TestClient

    _sign_in_with_code(client, delivery_env, portal.token)
    code = _code_from(_received(delivery_env)[-1])
    with TestClient(app, base_url="http://localhost:8000") as other:
        page = other.get(f"/p/{portal.token}")
        r = other.post(f"/p/{portal.token}/verify", data={"code": code, "csrf_token": csrf_from(page.text)},
                       follow_redirects=False)
        assert r.status_code == 422 and "Ask for a code first" in r.text
        assert other.get(f"/p/{portal.token}/message", follow_redirects=False).status_code == 303


def test_question_sign_in(client, session, org, delivery_env):
    a = arrange(session, org.id, auth="question", question="What is the name of your first pet?", answer="Blue Heron")
    page = client.get(f"/p/{a.token}")
    assert "What is the name of your first pet?" in page.text and "Email me a code" not in page.text
    csrf = csrf_from(page.text)
    r = client.post(f"/p/{a.token}/verify", data={"answer": "green", "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 422 and "4 tries left" in r.text
    r = client.post(f"/p/{a.token}/verify", data={"answer": "  blue   HERON ", "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert PHI_TEXT.split(",")[0] in client.get(f"/p/{a.token}/message").text  # "Dear Jordan Vale" in the frame
    assert _received(delivery_env) == []  # no code email for the question method


def test_wrong_codes_lock_the_message(client, session, portal, delivery_env):
    page = client.get(f"/p/{portal.token}")
    csrf = csrf_from(page.text)
    client.post(f"/p/{portal.token}/code", data={"csrf_token": csrf})
    code = _code_from(_received(delivery_env)[-1])
    wrong = f"{(int(code) + 1) % 10 ** 8:08d}"
    for left in (4, 3, 2, 1):
        r = client.post(f"/p/{portal.token}/verify", data={"code": wrong, "csrf_token": csrf})
        assert r.status_code == 422 and f"{left} tr" in r.text
    r = client.post(f"/p/{portal.token}/verify", data={"code": wrong, "csrf_token": csrf})
    assert r.status_code == 423 and "locked" in r.text and "15 minutes" in r.text
    # The right code no longer helps, and no new code is sent while locked.
    r = client.post(f"/p/{portal.token}/verify", data={"code": code, "csrf_token": csrf})
    assert r.status_code == 423
    assert client.post(f"/p/{portal.token}/code", data={"csrf_token": csrf}).status_code == 423
    assert len(_received(delivery_env)) == 1
    assert _events(session, portal.portal_message_id, "portal.locked")
    # After the lockout a new code works.
    clock.advance(timedelta(minutes=16))
    _sign_in_with_code(client, delivery_env, portal.token)


def test_code_requests_are_spaced(client, portal, delivery_env):
    page = client.get(f"/p/{portal.token}")
    csrf = csrf_from(page.text)
    assert client.post(f"/p/{portal.token}/code", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    r = client.post(f"/p/{portal.token}/code", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 429 and "Wait" in r.text
    assert len(_received(delivery_env)) == 1


def test_forms_need_the_csrf_token_and_our_origin(client, portal, delivery_env):
    page = client.get(f"/p/{portal.token}")
    assert client.post(f"/p/{portal.token}/code", data={"csrf_token": "forged"}).status_code == 403
    r = client.post(f"/p/{portal.token}/code", data={"csrf_token": csrf_from(page.text)},
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = client.post(f"/p/{portal.token}/code", data={"csrf_token": csrf_from(page.text)},
                    headers={"Sec-Fetch-Site": "cross-site", "Origin": "null"})
    assert r.status_code == 403
    assert _received(delivery_env) == []


def test_forged_or_truncated_tokens_are_404_and_say_nothing(client, portal):
    assert client.get("/p/..%2f..%2fetc").status_code == 404
    for token in (portal.token[:-2], portal.token + "x", "A" * 43, portal.portal_message_id, "a.b"):
        r = client.get(f"/p/{token}")
        assert r.status_code == 404 and "This link is not valid" in r.text
        assert "Bar Clinic" not in r.text
    assert client.post(f"/p/{'B' * 43}/verify", data={"code": "12345678"}).status_code == 404


def test_attachments_download_with_no_store(client, session, portal, delivery_env):
    _sign_in_with_code(client, delivery_env, portal.token)
    page = client.get(f"/p/{portal.token}/message")
    href = re.search(r'href="(/p/[^"]+/attachments/[0-9a-f]{32})"', page.text).group(1)
    r = client.get(href)
    assert r.status_code == 200 and r.content == b"%PDF-1.4 biopsy"
    assert r.headers["content-disposition"].startswith('attachment; filename="result.pdf"')
    assert r.headers["cache-control"] == "no-store" and r.headers["content-type"] == "application/pdf"
    assert "sandbox" in r.headers["content-security-policy"]
    assert _events(session, portal.portal_message_id, "portal.attachment.download")
    # Another message's attachment id, or none at all, is a 404.
    other = arrange(session, portal.org_id, address="other@plain.test")
    other_att = session.scalar(select(PortalAttachment.id).where(PortalAttachment.portal_message_id == other.portal_message_id))
    assert client.get(f"/p/{portal.token}/attachments/{other_att}").status_code == 404
    # Without the portal session, a download goes back to sign-in.
    client.cookies.clear()
    assert client.get(href, follow_redirects=False).status_code == 303


def test_reply_is_encrypted_visible_to_the_sender_and_notifies_without_phi(client, session, org, make_user, delivery_env,
                                                                         immediate_queue):
    from carepost.accounts import credentials

    sender = make_user(org, role="developer", email="sender@valid.test")
    a = arrange(session, org.id, sender_id=sender.id)
    _sign_in_with_code(client, delivery_env, a.token)
    page = client.get(f"/p/{a.token}/message")
    reply = "Thank you. My glucose readings were 180 this week, Jordan Vale."
    r = client.post(f"/p/{a.token}/reply", data={"text": reply, "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("/message?replied=1")
    page = client.get(r.headers["location"])
    assert "Your reply was sent securely" in page.text and "glucose readings" in page.text

    session.rollback()
    row = session.scalars(select(PortalReply).where(PortalReply.portal_message_id == a.portal_message_id)).one()
    assert b"glucose" not in row.text_enc
    # The sender got a notice with a link into CarePost and nothing of the reply or the patient.
    [notice] = [m for m in _received(delivery_env, "valid") if m["To"] != ADDRESS]
    text = notice.get_body(("plain",)).get_content()
    assert f"/app/portal/{a.portal_message_id}" in text
    for phi in PHI_VALUES + ("glucose", "180"):
        assert phi not in notice.as_string()

    # The sender's organization reads it through the API (audited).
    cred, secret = credentials.create_credential(session, org.id, name="reader", scopes=["messages:read", "phi:read_masked"])
    session.commit()
    client.cookies.clear()
    auth = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    r = client.get(f"/api/v1/portal-messages/{a.portal_message_id}/replies", headers=auth)
    assert r.status_code == 200 and r.json()["items"][0]["text"] == reply
    [read] = _events(session, a.portal_message_id, "portal.reply.read")
    assert read.details["reply_ids"] == [row.id] and read.actor_type == "api_credential"
    # Without phi:read_masked the replies stay closed.
    cred2, secret2 = credentials.create_credential(session, org.id, name="meta", scopes=["messages:read"])
    session.commit()
    r = client.get(f"/api/v1/portal-messages/{a.portal_message_id}/replies",
                   headers={"Authorization": f"Bearer {cred2.key_id}.{secret2}"})
    assert r.status_code == 403
    state = client.get(f"/api/v1/portal-messages/{a.portal_message_id}",
                       headers={"Authorization": f"Bearer {cred2.key_id}.{secret2}"}).json()
    assert state["reply_count"] == 1 and state["first_viewed_at"] and "text" not in state


def test_empty_or_cross_site_reply_is_refused(client, session, portal, delivery_env):
    _sign_in_with_code(client, delivery_env, portal.token)
    page = client.get(f"/p/{portal.token}/message")
    csrf = csrf_from(page.text)
    r = client.post(f"/p/{portal.token}/reply", data={"text": "   ", "csrf_token": csrf})
    assert r.status_code == 422 and "Write a reply first" in r.text
    client.post(f"/p/{portal.token}/reply", data={"text": "hello", "csrf_token": "nope"})
    client.post(f"/p/{portal.token}/reply", data={"text": "hello", "csrf_token": csrf}, headers={"Origin": "http://evil.example"})
    session.rollback()
    assert session.scalar(select(PortalReply.id)) is None


def test_expiry_shows_the_expired_page_and_wipes_the_copy(client, session, org, delivery_env, immediate_queue):
    a = arrange(session, org.id, expires_at=clock.now() + timedelta(days=2))
    _sign_in_with_code(client, delivery_env, a.token)
    assert client.get(f"/p/{a.token}/message").status_code == 200
    clock.advance(timedelta(days=2, minutes=1))
    for path in ("", "/message"):
        r = client.get(f"/p/{a.token}{path}")
        assert r.status_code == 410 and "This message has expired" in r.text and PHI_SUBJECT not in r.text
    session.rollback()
    pm = session.get(PortalMessage, a.portal_message_id)
    assert pm.wiped_at and pm.html_enc is None and pm.text_enc is None and pm.subject_enc is None
    assert session.scalar(select(PortalAttachment.id).where(PortalAttachment.portal_message_id == pm.id)) is None
    assert session.get(MessageRecipient, a.recipient_id).status == "expired"
    assert all(s.revoked for s in session.scalars(select(PortalSession)).all())


def test_expiry_task_wipes_messages_nobody_opened(session, org, delivery_env):
    from carepost.core.database import system_session
    from carepost.portal.tasks import expire_due

    a = arrange(session, org.id, expires_at=clock.now() + timedelta(hours=1))
    keep = arrange(session, org.id, address="keep@plain.test")
    clock.advance(timedelta(hours=2))
    with system_session() as s:
        assert expire_due(s) == 1
        s.commit()
    session.rollback()
    assert session.get(PortalMessage, a.portal_message_id).wiped_at is not None
    assert session.get(PortalMessage, keep.portal_message_id).wiped_at is None
    assert session.get(MessageRecipient, a.recipient_id).status == "expired"


def test_recall_by_the_sender_through_the_api(client, session, org, portal, delivery_env):
    from carepost.accounts import credentials

    _sign_in_with_code(client, delivery_env, portal.token)
    cred, secret = credentials.create_credential(session, org.id, name="sender", scopes=["messages:send"])
    session.commit()
    auth = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    r = client.post(f"/api/v1/portal-messages/{portal.portal_message_id}/recall", headers=auth)
    assert r.status_code == 200 and r.json()["state"] == "recalled"
    assert client.post(f"/api/v1/portal-messages/{portal.portal_message_id}/recall", headers=auth).status_code == 200
    for path in ("", "/message"):
        r = client.get(f"/p/{portal.token}{path}")
        assert r.status_code == 410 and "This message was recalled" in r.text and PHI_SUBJECT not in r.text
    session.rollback()
    assert session.get(MessageRecipient, portal.recipient_id).status == "recalled"
    assert session.get(PortalMessage, portal.portal_message_id).html_enc is None
    recalls = _events(session, portal.portal_message_id, "portal.recall")
    assert [e.details["already_recalled"] for e in recalls] == [False, True]
    # messages:read alone may not recall.
    cred2, secret2 = credentials.create_credential(session, org.id, name="ro", scopes=["messages:read"])
    session.commit()
    r = client.post(f"/api/v1/portal-messages/{portal.portal_message_id}/unlock",
                    headers={"Authorization": f"Bearer {cred2.key_id}.{secret2}"})
    assert r.status_code == 403


def test_portal_cookie_is_not_a_staff_session_and_expires(client, session, portal, delivery_env):
    _sign_in_with_code(client, delivery_env, portal.token)
    assert client.get("/app", follow_redirects=False).status_code in (303, 401)
    assert client.get("/api/v1/portal-messages?message_id=" + portal.message_id).status_code == 401
    clock.advance(timedelta(minutes=16))  # idle timeout
    assert client.get(f"/p/{portal.token}/message", follow_redirects=False).status_code == 303


def test_ended_portal_sessions_are_purged(client, session, portal, delivery_env):
    from carepost.core.database import system_session
    from carepost.portal.tasks import purge_sessions

    _sign_in_with_code(client, delivery_env, portal.token)
    with system_session() as s:
        assert purge_sessions(s) == 0
    clock.advance(timedelta(minutes=21))
    with system_session() as s:
        assert purge_sessions(s) == 1
        s.commit()
    session.rollback()
    assert session.scalar(select(PortalSession.id)) is None


def test_signout_ends_the_portal_session(client, portal, delivery_env):
    _sign_in_with_code(client, delivery_env, portal.token)
    page = client.get(f"/p/{portal.token}/message")
    cookie = client.cookies.get("cp_portal")
    r = client.post(f"/p/{portal.token}/signout", data={"csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    client.cookies.set("cp_portal", cookie, path="/p")
    assert client.get(f"/p/{portal.token}/message", follow_redirects=False).status_code == 303


def test_notification_wording_through_the_api(client, session, org, make_user):
    from tests.fixtures.accounts import login_client

    owner = make_user(org, role="owner")
    csrf = login_client(client, owner)
    r = client.put("/api/v1/portal-settings", headers={"X-CSRF-Token": csrf},
                   json={"portal_notification_subject": "Message from {organization}", "portal_notification_body": "See {link}"})
    assert r.status_code == 200 and r.json()["portal_notification_subject"] == "Message from {organization}"
    r = client.put("/api/v1/portal-settings", headers={"X-CSRF-Token": csrf},
                   json={"portal_notification_subject": "Hi {first_name}"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "portal_notification_subject"
    assert client.get("/api/v1/portal-settings").json()["portal_notification_body"] == "See {link}"


def test_no_phi_in_logs(client, session, portal, delivery_env):
    import io

    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    stream = io.StringIO()
    configure_logging("DEBUG", json=True, stream=stream)
    try:
        _sign_in_with_code(client, delivery_env, portal.token)
        page = client.get(f"/p/{portal.token}/message")
        client.post(f"/p/{portal.token}/reply", data={"text": "Jordan Vale here, thanks", "csrf_token": csrf_from(page.text)})
        client.post(f"/p/{portal.token}/verify", data={"code": "00000000"})
    finally:
        configure_logging(get_settings().log_level, get_settings().log_json)
    logged = stream.getvalue()
    assert "portal_code" in logged  # the capture saw the work
    for phi in PHI_VALUES:
        assert phi not in logged, phi


def test_no_code_through_a_relay_that_does_not_enforce_tls(client, session, portal, delivery_env, monkeypatch):
    """Issue 9 item 3: a relay that does not promise verified TLS onward is an unverified path,
    so no code goes through it (the local capture of `carepost run` excepted: it is final)."""
    from carepost.core.config import reset_settings
    from carepost.portal.models import PortalMessage
    from carepost.portal.tasks import deliver_code

    monkeypatch.setenv("CAREPOST_SMTP_RELAY", "relay.test@127.0.0.1:9")
    reset_settings()
    pm = session.get(PortalMessage, portal.portal_message_id)
    pm.code_requested_at = pm.last_code_sent_at = clock.now()
    session.commit()
    assert deliver_code(session, portal.portal_message_id) == "tls_unavailable"
    session.rollback()
    pm = session.get(PortalMessage, portal.portal_message_id)
    assert pm.code_tls_unavailable and pm.code_hash is None and pm.code_requested_at is None
    [event] = _events(session, portal.portal_message_id, "portal.code.sent")
    assert event.details["status"] == "tls_unavailable" and event.details["relay"] is True
    page = client.get(f"/p/{portal.token}")
    assert 'data-testid="code-unavailable"' in page.text
