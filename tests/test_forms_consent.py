"""Forms with consent: authorization blocks and consent check boxes record nothing until the
person confirms through the link sent to the address on file; then the consent capability holds
the signed authorization (with the evidence of the signing) and the subscriptions. Webhook
event, staff notification and the fallback confirmation email."""

from __future__ import annotations

import base64
import email
import email.policy
import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.core import clock
from tests.test_forms import SCOPES, api, fill, png, post_form, render_token, subs  # noqa: F401 - fixtures

CONSENT_SCOPES = SCOPES + ("consent:manage",)


@pytest.fixture(autouse=True)
def _fresh_limits():
    from carepost.accounts import ratelimit

    ratelimit.reset_limiter()
    yield
    ratelimit.reset_limiter()


@pytest.fixture
def key(session):
    from carepost.accounts import credentials as creds

    def make(org_id, scopes=CONSENT_SCOPES):
        cred, secret = creds.create_credential(session, org_id, name="Forms consent test", scopes=list(scopes))
        session.commit()
        return {"Authorization": f"Bearer {cred.key_id}.{secret}"}

    return make


@pytest.fixture
def topic(org, session):
    from carepost.consent import service as consent

    session.info["org_id"] = org.id
    t = consent.create_topic(session, org.id, key="screenings", name="Screening reminders")
    session.commit()
    session.info.pop("org_id")
    return t


def signup(topic_id, **auth):
    return {
        "name": "Join our wellness program",
        "fields": [
            {"key": "email", "type": "email", "label": "Email", "required": True, "contact_field": "email"},
            {"key": "name", "type": "text", "label": "Your name", "contact_field": "given_name"},
            {"key": "news", "type": "consent", "label": "Send me screening reminders", "topic_id": topic_id},
            {"key": "auth", "type": "authorization", "label": "Marketing authorization", "purpose": "marketing", **auth},
        ],
    }


def answers(hosted_html: str, **extra) -> dict:
    text_id = hosted_html.split('name="f_auth__text" value="', 1)[1].split('"', 1)[0]
    base = {"email": "pat@example.org", "name": "Pat", "news": "yes", "auth": "yes", "auth__name": "Pat Example",
            "auth__text": text_id}
    base.update(extra)
    return base


def submit(client, form, **extra):
    page = client.get(f"/f/{form['public_id']}")
    assert page.status_code == 200, page.text
    return fill(client, form, answers(page.text, **extra))


def scoped(session, org_id):
    session.rollback()
    session.info.pop("scope", None)
    session.info["org_id"] = org_id
    return session


def token_for(sub_id):
    from carepost.core.database import system_session
    from carepost.forms import service
    from carepost.forms.models import FormSubmission

    with system_session() as s:
        return service.confirmation_token(s, s.get(FormSubmission, sub_id))


def authorizations(session, org_id):
    from carepost.consent.models import Authorization

    return list(scoped(session, org_id).scalars(select(Authorization)))


def subscriptions(session, org_id):
    from carepost.consent.models import Subscription

    return list(scoped(session, org_id).scalars(select(Subscription)))


# --------------------------------------------------------------------------- definitions


def test_consent_blocks_are_checked_when_building(api, topic, session, org):
    r = api.post("/api/v1/forms", json=signup("no-such-topic"))
    assert r.status_code == 422 and r.json()["error"]["field"] == "fields.2.topic_id"
    r = api.post("/api/v1/forms", json={**signup(topic.id), "fields": signup(topic.id)["fields"][:3] + [
        {"key": "auth", "type": "authorization", "label": "x", "purpose": "treatment"}]})
    assert r.status_code == 422 and "needs no authorization" in r.json()["error"]["message"]
    r = api.post("/api/v1/forms", json=signup(topic.id, text_id="0" * 32))
    assert r.status_code == 422 and r.json()["error"]["field"] == "fields.3.text_id"
    two = signup(topic.id)
    two["fields"].append({"key": "auth2", "type": "authorization", "label": "y", "purpose": "marketing"})
    r = api.post("/api/v1/forms", json=two)
    assert r.status_code == 422 and "at most one authorization" in r.json()["error"]["message"]
    r = api.post("/api/v1/forms", json={**signup(topic.id), "fields": signup(topic.id)["fields"][2:]})
    assert r.status_code == 422 and "needs an email field" in r.json()["error"]["message"]
    # a text of another organization is "no such text"
    from carepost.accounts.service import create_organization
    from carepost.consent.authorizations import current_text

    other = create_organization(session, "Other Clinic")
    session.commit()
    foreign = current_text(scoped(session, other.id), other.id, "marketing").id
    session.info.pop("org_id")
    session.info["scope"] = "system"
    r = api.post("/api/v1/forms", json=signup(topic.id, text_id=foreign))
    assert r.status_code == 422 and r.json()["error"]["field"] == "fields.3.text_id"
    assert api.post("/api/v1/forms", json=signup(topic.id)).status_code == 201


def test_hosted_authorization_block_shows_the_text_in_the_form_language(api, topic, client):
    form = api.create({**signup(topic.id, drawn_signature=True), "language": "es"})
    page = client.get(f"/f/{form['public_id']}")
    html = page.text
    assert 'lang="es"' in html and "He leído esta autorización" in html
    assert "Su derecho a revocar" in html  # a heading of the Spanish text
    assert '<script src="/static/forms-signature.js" defer></script>' in html
    assert "<canvas" in html and 'name="f_auth__drawn"' in html
    assert 'name="f_auth__text"' in html and "Versión 1" in html


# --------------------------------------------------------------------------- new person


def test_new_person_signs_only_after_confirming(api, topic, client, session, org):
    from carepost.consent.eligibility import check_eligibility

    form = api.create(signup(topic.id))
    r = submit(client, form)
    assert r.status_code == 303, r.text
    [sub] = subs(session)
    assert sub.status == "pending_confirmation" and sub.contact_created and sub.effects == ["authorization", "subscriptions"]
    # the contact exists, but nothing was signed or subscribed on their behalf yet
    assert authorizations(session, org.id) == [] and subscriptions(session, org.id) == []
    assert check_eligibility(scoped(session, org.id), [sub.contact_id], "marketing")[sub.contact_id] == "no_authorization"

    token = token_for(sub.id)
    page = client.get(f"/f/confirm/{token}")
    assert page.status_code == 200
    assert "Screening reminders" in page.text and "marketing communications" in page.text  # what will be recorded
    assert authorizations(session, org.id) == []
    r = client.post(f"/f/confirm/{token}", headers={"user-agent": "Confirming browser"})
    assert r.status_code == 200 and "Confirmed" in r.text and "copy of the authorization" in r.text

    [auth] = authorizations(session, org.id)
    assert (auth.contact_id, auth.purpose, auth.method, auth.signature_kind) == (sub.contact_id, "marketing", "form", "typed")
    assert auth.created_by == f"form:{sub.id}"
    assert abs((clock.aware(auth.signed_at) - clock.aware(sub.created_at)).total_seconds()) < 2  # signed when sent
    from carepost.consent.authorizations import authorization_dict

    evidence = authorization_dict(scoped(session, org.id), auth, include_evidence=True)
    assert evidence["signature"] == "Pat Example" and evidence["ip"] == "testclient"
    # the form witnessed the signing: its IP address and user agent are the patient's (issue 9 item 12)
    assert evidence["evidence_of"] == "patient" and not evidence["backdated"] and evidence["scan"] is None
    [subscription] = subscriptions(session, org.id)
    assert (subscription.topic_id, subscription.status, subscription.source) == (topic.id, "subscribed", "form")
    assert check_eligibility(scoped(session, org.id), [sub.contact_id], "marketing")[sub.contact_id] == "eligible"
    [sub] = subs(session)
    assert sub.status == "confirmed" and sub.outcome["authorization_ids"] == [auth.id]
    assert sub.outcome["subscription_ids"] == [subscription.id]


def test_drawn_signature_and_personal_representative(api, topic, client, session, org):
    form = api.create(signup(topic.id, drawn_signature=True))
    drawn = "data:image/png;base64," + base64.b64encode(png(120, 40)).decode()
    r = submit(client, form, auth__drawn=drawn, auth__rep_name="Riley Example")
    assert r.status_code == 422 and "describe their authority" in r.text
    r = submit(client, form, auth__drawn=drawn, auth__rep_name="Riley Example", auth__rep_authority="Parent")
    assert r.status_code == 303
    [sub] = subs(session)
    assert sub.signature_png_enc is not None and png(120, 40) not in sub.signature_png_enc
    assert client.post(f"/f/confirm/{token_for(sub.id)}").status_code == 200
    [auth] = authorizations(session, org.id)
    from carepost.consent.authorizations import authorization_dict

    evidence = authorization_dict(scoped(session, org.id), auth, include_evidence=True)
    assert auth.signature_kind == "drawn" and evidence["signature"] == drawn
    assert evidence["representative"] == {"name": "Riley Example", "authority": "Parent"}


def test_authorization_and_consent_validation(api, topic, client, session):
    form = api.create(signup(topic.id))
    for extra, message in [
        ({"auth__name": ""}, "Type your full name"),
        ({"auth": "maybe"}, "Tick the box"),
        ({"auth": "", "auth__name": "Pat"}, "clear your name"),
        ({"auth__drawn": "data:image/png;base64,AAAA"}, "typed signature only"),
        ({"auth__text": "not-an-id"}, "could not be identified"),
        ({"news": "sure"}, "Tick the box or leave it empty"),
    ]:
        r = submit(client, form, **extra)
        assert r.status_code == 422 and message in r.text, extra
    assert subs(session) == []
    # not signing is allowed when the block is optional: only the subscription waits
    assert submit(client, form, auth="", auth__name="").status_code == 303
    [sub] = subs(session)
    assert sub.effects == ["subscriptions"]


def test_a_required_authorization_must_be_signed(api, topic, client, session):
    body = signup(topic.id)
    body["fields"][3]["required"] = True
    form = api.create(body)
    r = submit(client, form, auth="")
    assert r.status_code == 422 and "Tick the box and type your full name" in r.text


# --------------------------------------------------------------------------- existing person


def test_existing_contact_signs_nothing_until_confirmed(api, topic, client, session, org):
    r = api.post("/api/v1/contacts", json={"given_name": "Pat", "email": "pat@example.org"})
    contact_id = r.json()["id"]
    form = api.create(signup(topic.id))
    assert submit(client, form, name="Mallory").status_code == 303
    [sub] = subs(session)
    assert sub.contact_id == contact_id and not sub.contact_created
    assert sub.effects == ["update_contact", "authorization", "subscriptions"]
    assert authorizations(session, org.id) == [] and subscriptions(session, org.id) == []
    assert api.get(f"/api/v1/contacts/{contact_id}").json()["given_name"] == "Pat"
    # an expired link records nothing, ever
    clock.advance(timedelta(hours=80))
    assert client.post(f"/f/confirm/{token_for(sub.id)}").status_code == 410
    assert authorizations(session, org.id) == [] and subscriptions(session, org.id) == []
    assert api.get(f"/api/v1/contacts/{contact_id}").json()["given_name"] == "Pat"


# --------------------------------------------------------------------------- the text changes


def test_new_text_version_while_the_form_is_open_means_signing_again(api, topic, client, session, org):
    from carepost.consent import authorizations as auths

    form = api.create(signup(topic.id))
    page = client.get(f"/f/{form['public_id']}")
    shown = answers(page.text)
    s = scoped(session, org.id)
    current = auths.current_text(s, org.id, "marketing")
    new = auths.create_text(s, org.id, "marketing", current.elements)
    auths.publish_text(s, org.id, new.id)
    s.commit()
    clock.advance(timedelta(seconds=5))
    items = [("_rt", render_token(page.text)), ("website", "")] + [(f"f_{k}", v) for k, v in shown.items()]
    r = post_form(client, f"/f/{form['public_id']}", items)
    assert r.status_code == 422 and "was updated while the form was open" in r.text
    assert f'value="{new.id}"' in r.text  # the new version is shown for signing
    assert subs(session) == []


def test_text_retired_before_confirmation_records_nothing(api, topic, client, session, org):
    from carepost.consent import authorizations as auths

    form = api.create(signup(topic.id))
    assert submit(client, form).status_code == 303
    [sub] = subs(session)
    s = scoped(session, org.id)
    current = auths.current_text(s, org.id, "marketing")
    auths.publish_text(s, org.id, auths.create_text(s, org.id, "marketing", current.elements).id)
    s.commit()
    r = client.post(f"/f/confirm/{token_for(sub.id)}")
    assert r.status_code == 409 and "fill in the form again" in r.text
    assert authorizations(session, org.id) == [] and subscriptions(session, org.id) == []
    assert subs(session)[0].status == "pending_confirmation"


# --------------------------------------------------------------------------- webhook, emails


def test_form_submitted_webhook_event_carries_no_answers(api, topic, client, session, org, monkeypatch):
    from carepost.core.config import reset_settings
    from carepost.core.crypto import get_keyring
    from carepost.tracking import service as tracking
    from carepost.tracking.models import WebhookEvent

    monkeypatch.setenv("CAREPOST_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings()
    assert "form.submitted" in tracking.EVENT_TYPES and "form.confirmed" in tracking.EVENT_TYPES
    s = scoped(session, org.id)
    tracking.create_endpoint(s, org.id, url="http://127.0.0.1:9/hook", event_types=["form.submitted", "form.confirmed"])
    s.commit()
    form = api.create(signup(topic.id))
    assert submit(client, form).status_code == 303
    [sub] = subs(session)
    client.post(f"/f/confirm/{token_for(sub.id)}")
    s = scoped(session, org.id)
    events = list(s.scalars(select(WebhookEvent).order_by(WebhookEvent.created_at)))
    assert [e.type for e in events] == ["form.submitted", "form.confirmed"]
    payload = json.loads(get_keyring().decrypt(s, org.id, "webhook_events", "payload", events[0].id, events[0].payload_enc))
    assert payload["data"]["submission_id"] == sub.id and payload["data"]["status"] == "pending_confirmation"
    assert "pat@example.org" not in json.dumps(payload) and "Pat Example" not in json.dumps(payload)
    assert events[0].phi_enc is None  # the endpoint does not take PHI
    monkeypatch.delenv("CAREPOST_WEBHOOK_ALLOW_PRIVATE")
    reset_settings()


def test_worker_sends_confirmation_and_staff_notice_without_phi(api, topic, client, session, org, delivery_env):
    from carepost.forms import tasks

    body = signup(topic.id)
    body["notify_emails"] = ["frontdesk@valid.test"]
    form = api.create(body)
    page = client.get(f"/f/{form['public_id']}")
    r = fill(client, form, answers(page.text, email="pat@valid.test", name="Patricia"))
    assert r.status_code == 303
    [sub] = subs(session)
    done = tasks.process_submission(sub.id)
    assert done == {"confirmation": True, "staff": 1}
    assert tasks.process_submission(sub.id) == {"confirmation": False, "staff": 0}  # idempotent
    received = delivery_env.mx["valid"].recorder.messages
    by_rcpt = {m.rcpt_tos[0]: email.message_from_bytes(m.data, policy=email.policy.default) for m in received}
    assert set(by_rcpt) == {"pat@valid.test", "frontdesk@valid.test"}
    confirm = by_rcpt["pat@valid.test"]
    text = confirm.get_body(("plain",)).get_content()
    assert confirm["Subject"] == "Please confirm your request to Bar Clinic"
    link = next(line for line in text.splitlines() if "/f/confirm/" in line).strip()
    assert link.endswith(token_for(sub.id))
    assert "wellness" not in text.lower()  # the form's title is not in the email
    notice = by_rcpt["frontdesk@valid.test"]
    notice_text = notice.get_body(("plain",)).get_content()
    assert f"/app/forms/{form['id']}/submissions/{sub.id}" in notice_text
    for raw in (m.data for m in received):
        assert b"Patricia" not in raw and b"Pat Example" not in raw
    assert b"pat@valid.test" not in received[[m.rcpt_tos[0] for m in received].index("frontdesk@valid.test")].data
    # the link in the email works
    assert client.post(link.replace("http://localhost:8000", "")).status_code == 200
    assert len(authorizations(session, org.id)) == 1


def test_no_phi_in_logs_urls_or_error_pages(api, topic, client, session, org):
    import io

    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    stream = io.StringIO()
    configure_logging("DEBUG", json=True, stream=stream)
    try:
        form = api.create(signup(topic.id))
        page = client.get(f"/f/{form['public_id']}")
        person = dict(email="quintessa.m@example.org", name="Quintessa", auth__name="Quintessa Marlowe-Ybarra")
        bad = fill(client, form, answers(page.text, **person, news="maybe"))
        assert bad.status_code == 422 and "Quintessa" in bad.text  # shown back to the person, escaped
        r = submit(client, form, **person)
        assert r.status_code == 303 and "quintessa" not in r.headers["location"].lower()
        [sub] = subs(session)
        token = token_for(sub.id)
        assert sub.id in token and "quintessa" not in token.lower()
        client.post(f"/f/confirm/{token}")
        client.post("/f/confirm/forged.token.here")
    finally:
        configure_logging(get_settings().log_level, get_settings().log_json)
    logged = stream.getvalue()
    assert "form_submission_confirmed" in logged  # the capture saw the work
    for value in ("Quintessa", "Marlowe", "quintessa.m@example.org"):
        assert value not in logged, value


def test_builder_offers_topics_purposes_and_published_texts(client, org, make_user, topic):
    from tests.fixtures.accounts import login_client

    login_client(client, make_user(org, role="owner"))
    page = client.get("/app/forms/new").text
    assert f'<option value="{topic.id}">Screening reminders</option>' in page
    assert '<option value="marketing">Marketing</option>' in page
    assert "Marketing with financial remuneration — v1:" in page
