"""Portal service: storing a copy encrypted, the notification without PHI, codes, answers, lockout."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.portal import service
from carepost.portal.models import PortalAttachment, PortalMessage
from tests.fixtures.portal import ADDRESS, PHI_HTML, PHI_SUBJECT, PHI_TEXT, arrange, make_message


def _scoped(session, org_id):
    session.info.pop("scope", None)
    session.info["org_id"] = org_id
    return session


def test_store_encrypts_everything_and_binds_it_to_the_row(session, org):
    a = arrange(session, org.id)
    pm = session.get(PortalMessage, a.portal_message_id)
    raw = b"".join(filter(None, [pm.subject_enc, pm.html_enc, pm.text_enc, pm.address_enc]))
    for clear in (PHI_SUBJECT, "Jordan Vale", "88-4411", ADDRESS):
        assert clear.encode() not in raw
    att = session.scalars(select(PortalAttachment).where(PortalAttachment.portal_message_id == pm.id)).one()
    assert b"biopsy" not in att.content_enc and b"result.pdf" not in att.filename_enc
    # The token is not stored, only its hash; the hash finds the row.
    assert a.token not in pm.token_hash and len(pm.token_hash) == 64
    # Ciphertext moved to another row does not decrypt.
    from carepost.core.crypto import DecryptionFailed, get_keyring

    with pytest.raises(DecryptionFailed):
        get_keyring().decrypt(session, org.id, "portal_messages", "html", "0" * 32, pm.html_enc)
    content = service.message_content(_scoped(session, org.id), pm)
    assert content["subject"] == PHI_SUBJECT and content["text"] == PHI_TEXT
    assert content["attachments"][0]["filename"] == "result.pdf"


def test_store_is_idempotent_per_recipient(session, org):
    a = arrange(session, org.id)
    again = service.store_portal_message(session, org_id=org.id, message_id=a.message_id, recipient_id=a.recipient_id,
                                         recipient_address=ADDRESS, subject="x", html=None, text="y")
    assert again.id == a.portal_message_id
    assert session.scalar(select(PortalMessage.id).where(PortalMessage.recipient_id == a.recipient_id)) == again.id


@pytest.mark.parametrize("kw, field", [
    ({"auth": "sms"}, "auth"),
    ({"auth": "question", "question": "", "answer": "blue heron"}, "question"),
    ({"auth": "question", "question": "First pet?", "answer": " "}, "answer"),
    ({"recipient_address": "not an address"}, "to"),
    ({"html": None, "text": None}, "text"),
    ({"expires_at": "past"}, "expires_at"),
    ({"attachments": [{"filename": "a\r\nBcc: x@y.z", "content": b"1"}]}, "attachment filename"),
])
def test_store_refuses_bad_input_naming_the_field(session, org, kw, field):
    msg, rcpt = make_message(session, org.id)
    session.commit()
    args = dict(org_id=org.id, message_id=msg.id, recipient_id=rcpt.id, recipient_address=ADDRESS, subject="s",
                html="<p>x</p>", text="x")
    if kw.get("expires_at") == "past":
        kw = {"expires_at": clock.now() - timedelta(minutes=1)}
    args.update(kw)
    with pytest.raises(ValidationFailed) as err:
        service.store_portal_message(session, **args)
    assert err.value.field == field
    session.rollback()
    assert session.scalar(select(PortalMessage.id)) is None


def test_notification_email_has_no_phi_and_the_link(session, org, monkeypatch):
    a = arrange(session, org.id)
    pm = session.get(PortalMessage, a.portal_message_id)
    subject, text, html = service.notification_email(session, pm)
    assert subject == "You have a secure message from Bar Clinic"
    link = f"http://localhost:8000/p/{a.token}"
    assert link in text and f'href="{link}"' in html
    for phi in (PHI_SUBJECT, "Jordan", "Vale", "biopsy", "88-4411", ADDRESS, "jordan.vale"):
        assert phi not in subject and phi not in text and phi not in html
    # The link reveals no id: neither the message's, the recipient's nor the organization's.
    for ident in (a.portal_message_id, a.message_id, a.recipient_id, org.id):
        assert ident not in link
    # Retried notifications carry the same link (derived, not re-drawn).
    assert service.notification_email(session, pm)[1] == text


def test_notification_uses_the_organizations_wording(session, org):
    from carepost.accounts.models import Organization

    row = session.get(Organization, org.id)
    row.settings = {**(row.settings or {}), "portal_notification_subject": "{organization}: a message is waiting",
                    "portal_notification_body": "Hello,\n\nplease pick up your message: {link}\n\nUntil {expires}."}
    session.commit()
    a = arrange(session, org.id)
    subject, text, html = service.notification_email(session, session.get(PortalMessage, a.portal_message_id))
    assert subject == "Bar Clinic: a message is waiting"
    assert text.startswith("Hello,") and f"/p/{a.token}" in text and "{expires}" not in text
    assert "<p>Hello,</p>" in html


def test_notification_templates_are_checked():
    service.check_notification_templates("Message from {organization}", "Open {link}")
    with pytest.raises(ValidationFailed) as err:
        service.check_notification_templates("Hi {patient_name}", None)
    assert err.value.field == "portal_notification_subject"
    with pytest.raises(ValidationFailed) as err:
        service.check_notification_templates("Hi\r\nBcc: a@b.c", None)
    assert err.value.field == "portal_notification_subject"
    with pytest.raises(ValidationFailed) as err:
        service.check_notification_templates(None, "{link.__class__}")
    assert err.value.field == "portal_notification_body"


def test_find_by_token_scopes_the_session_and_refuses_forgeries(db, org, session):
    from carepost.core.database import session_factory

    a = arrange(session, org.id)
    with session_factory()() as s:
        assert service.find_by_token(s, a.token[:-1] + ("A" if a.token[-1] != "A" else "B")) is None
        assert service.find_by_token(s, "../../etc") is None
        pm = service.find_by_token(s, a.token)
        assert pm.id == a.portal_message_id and s.info["org_id"] == org.id


def test_code_is_hashed_single_use_and_expires(session, org):
    a = arrange(session, org.id)
    pm = session.get(PortalMessage, a.portal_message_id)
    code = service.issue_code(session, pm)
    assert len(code) == 8 and code.isdigit() and code not in pm.code_hash and pm.code_hash.startswith("$argon2id$")
    assert service.verify_code(_scoped(session, org.id), pm, f"{code[:4]} {code[4:]}").ok
    assert not service.verify_code(session, pm, code).ok  # once only
    code = service.issue_code(session, pm)
    clock.advance(timedelta(minutes=11))
    result = service.verify_code(session, pm, code)
    assert not result.ok and "expired" in result.reason


def test_answer_ignores_case_and_spacing(session, org):
    a = arrange(session, org.id, auth="question", question="Name of your first pet?", answer="Blue  Heron")
    pm = session.get(PortalMessage, a.portal_message_id)
    assert pm.answer_hash.startswith("$argon2id$") and "heron" not in pm.answer_hash.lower()
    _scoped(session, org.id)
    assert service.verify_answer(session, pm, "  blue heron ").ok
    assert service.verify_answer(session, pm, "BLUE HERON").ok
    assert not service.verify_answer(session, pm, "blue herons").ok


def test_lockout_after_five_wrong_tries_voids_the_code_and_escalates(session, org):
    a = arrange(session, org.id)
    pm = session.get(PortalMessage, a.portal_message_id)
    _scoped(session, org.id)
    for round_ in range(service.MAX_LOCKOUTS):
        code = service.issue_code(session, pm)
        wrong = f"{(int(code) + 1) % 10 ** 8:08d}"
        for i in range(4):
            r = service.verify_code(session, pm, wrong)
            assert not r.ok and r.attempts_left == 4 - i
        r = service.verify_code(session, pm, wrong)
        assert not r.ok and r.attempts_left == 0 and service.state(pm) == "locked"
        assert not service.verify_code(session, pm, code).ok  # even the right code fails while locked
        if round_ < service.MAX_LOCKOUTS - 1:
            assert "15 minutes" in r.reason
            clock.advance(timedelta(minutes=16))
            assert service.state(pm) == "open"
            assert not service.verify_code(session, pm, code).ok  # the old code was voided
            assert "Ask for a code first" in service.verify_code(session, pm, code).reason
    assert "ask the sender" in r.reason and service.permanently_locked(pm)
    clock.advance(timedelta(hours=5))
    assert service.state(pm) == "locked"
    service.unlock(session, pm)
    assert service.state(pm) == "open"


def test_code_requests_are_rate_limited(session, org):
    a = arrange(session, org.id)
    pm = session.get(PortalMessage, a.portal_message_id)
    service.check_code_request(pm)
    service.issue_code(session, pm)
    with pytest.raises(service.CodeNotSent) as err:
        service.check_code_request(pm)
    assert "Wait" in err.value.message
    clock.advance(timedelta(seconds=31))
    service.check_code_request(pm)


def test_sanitizer_strips_scripts_handlers_and_remote_images():
    clean = service.sanitize_html(PHI_HTML + '<iframe src="https://x.example"></iframe><form action="/x"><input></form>'
                                  '<div style="background:url(https://t.example/x)">s</div>'
                                  '<a href="https://ok.example/info">info</a>')
    assert "<script" not in clean and "alert(1)" not in clean
    assert "tracker.example" not in clean and "onclick" not in clean and "javascript:" not in clean
    assert 'alt="pixel"' not in clean  # a remote image goes whole, no broken-image icon
    assert "<iframe" not in clean and "<form" not in clean and "t.example" not in clean
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in clean
    assert 'href="https://ok.example/info"' in clean and 'rel="noopener noreferrer nofollow"' in clean
    assert "<b>benign</b>" in clean


def test_inline_images_show_as_data_uris_not_as_attachments(session, org):
    from carepost.delivery.mime import InlineImage

    png = b"\x89PNG\r\n\x1a\nfake-logo"
    a = arrange(session, org.id, html='<p>Hello</p><img src="cid:logo@bar" alt="Bar Clinic"><img src="cid:missing">',
                inline_images=[InlineImage("logo@bar", png, "image/png")])
    pm = session.get(PortalMessage, a.portal_message_id)
    content = service.message_content(_scoped(session, org.id), pm)
    import base64

    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in content["html"]
    assert "cid:" not in content["html"]  # an unknown cid is dropped by the sanitizer
    assert [x["filename"] for x in content["attachments"]] == ["result.pdf"]
    with pytest.raises(ValidationFailed) as err:
        service.store_portal_message(session, org_id=org.id, message_id=a.message_id, recipient_id=None,
                                     recipient_address=ADDRESS, subject="s", html="<p>x</p>", text=None,
                                     inline_images=[{"cid": "bad cid>", "content": png}])
    assert err.value.field == "inline"
