"""Issue 10 item 11: a fresh install sends its own notices, and a notice that cannot go shows as
failed, with the reason, to staff (never "pending" forever while the patient is told it was sent)."""

from __future__ import annotations

import email
import email.policy

import pytest

from carepost.core.config import reset_settings
from tests.fixtures.accounts import login_client
from tests.test_forms import api, subs  # noqa: F401 - fixtures
from tests.test_forms_consent import _fresh_limits, key, signup, submit, topic  # noqa: F401 - fixtures


@pytest.fixture
def fresh_install(monkeypatch):
    """The HELO name of a laptop (`localhost`), no notice sender domain, no sending domain."""
    monkeypatch.setenv("CAREPOST_SMTP_HELO_NAME", "localhost")
    monkeypatch.delenv("CAREPOST_NOTICE_SENDER_DOMAIN", raising=False)
    reset_settings()
    yield
    monkeypatch.undo()
    reset_settings()


def test_without_a_sender_the_patient_is_not_told_and_staff_see_the_failure(fresh_install, api, topic, client, session, org,
                                                                             make_user):
    from carepost.core.config import get_settings
    from carepost.doctor import check_notice_sender
    from carepost.forms import tasks

    form = api.create(signup(topic.id))
    r = submit(client, form)
    assert r.status_code == 303
    thanks = client.get(r.headers["location"])
    assert 'data-testid="form-no-email"' in thanks.text and "cannot send emails yet" in thanks.text
    assert "we have sent an email" not in thanks.text
    [sub] = subs(session)
    assert sub.status == "pending_confirmation"

    done = tasks.process_submission(sub.id)  # no crash, no endless retry: a final failure
    assert done == {"confirmation": False, "staff": 0}
    [sub] = subs(session)
    outcome = sub.outcome["confirmation_email"]
    assert outcome["status"] == "failed" and "no sender" in outcome["reason"] and "CAREPOST_NOTICE_SENDER_DOMAIN" in outcome["reason"]
    assert "pat@example.org" not in str(sub.outcome)
    assert tasks.process_submission(sub.id) == {"confirmation": False, "staff": 0}  # not tried again

    session.rollback()
    login_client(client, make_user(org, role="owner"))
    listing = client.get(f"/app/forms/{form['id']}/submissions")
    assert listing.status_code == 200
    assert 'data-testid="no-sender-warning"' in listing.text
    assert 'data-testid="confirmation-failed"' in listing.text and "email failed" in listing.text
    page = client.get(f"/app/forms/{form['id']}/submissions/{sub.id}")
    assert 'data-testid="confirmation-email"' in page.text and "failed" in page.text and "no sender" in page.text

    [finding] = check_notice_sender(get_settings())
    assert finding.level == "warn" and "CAREPOST_NOTICE_SENDER_DOMAIN" in finding.message
    assert "1 organization(s)" in finding.message


def test_notice_sender_domain_lets_a_fresh_install_send(fresh_install, monkeypatch, api, topic, client, session, org,
                                                       delivery_env):
    """`carepost run` sets CAREPOST_NOTICE_SENDER_DOMAIN=carepost.localhost: the confirmation goes."""
    from carepost.core.config import get_settings
    from carepost.core.mailcapture import relay_environment
    from carepost.doctor import check_notice_sender
    from carepost.forms import tasks

    run_env = relay_environment(get_settings())
    monkeypatch.setenv("CAREPOST_SMTP_HELO_NAME", "localhost")
    monkeypatch.setenv("CAREPOST_NOTICE_SENDER_DOMAIN", run_env["CAREPOST_NOTICE_SENDER_DOMAIN"])
    reset_settings()
    assert check_notice_sender(get_settings())[0].level == "ok"

    form = api.create(signup(topic.id))
    r = submit(client, form, email="pat@valid.test")
    thanks = client.get(r.headers["location"])
    assert 'data-testid="form-no-email"' not in thanks.text
    [sub] = subs(session)
    assert tasks.process_submission(sub.id)["confirmation"] is True
    [sub] = subs(session)
    assert sub.outcome["confirmation_email"]["status"] == "sent"
    [received] = delivery_env.mx["valid"].recorder.messages
    msg = email.message_from_bytes(received.data, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == "no-reply@carepost.localhost"
    assert received.rcpt_tos == ["pat@valid.test"]
