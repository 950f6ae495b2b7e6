"""The forms UI (/app/forms): builder without JavaScript (rows, add, remove, errors at the row),
preview, publish, submissions (masked, audited) and survey results."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from tests.fixtures.accounts import login_client
from tests.test_forms import JANE, SURVEY, fill, subs  # noqa: F401

ROW = re.compile(r'name="fields-([a-z0-9_]+)-type"')


@pytest.fixture(autouse=True)
def _fresh_limits():
    from carepost.accounts import ratelimit

    ratelimit.reset_limiter()
    yield
    ratelimit.reset_limiter()


@pytest.fixture
def owner(client, org, make_user):
    return login_client(client, make_user(org, role="owner"))


def rows_of(html: str) -> list[str]:
    return [uid for uid in ROW.findall(html) if uid != "__UID__"]


def row(uid: str, **values) -> dict:
    out = {}
    for k, v in values.items():
        out[f"fields-{uid}-{k}"] = v
    return out


def test_builder_without_javascript(client, owner, session, org):
    page = client.get("/app/forms/new")
    assert page.status_code == 200
    [email_row] = rows_of(page.text)  # a new form starts with the email field
    assert '<script src="/static/forms-builder.js" defer></script>' in page.text
    # "Add a field" round trip keeps what was typed and adds an empty row
    base = {"csrf_token": owner, "name": "Flu shot sign-up", "kind": "form", "language": "en",
            **row(email_row, type="email", key="email", label="Email", required="1", contact_field="email")}
    r = client.post("/app/forms/new", data={**base, "action": "add_field"})
    assert r.status_code == 200 and 'value="Flu shot sign-up"' in r.text
    uids = rows_of(r.text)
    assert len(uids) == 2 and uids[0] == email_row
    new = uids[1]
    # an error is shown at the row it belongs to
    bad = {**base, **row(new, type="choice", key="when", label="When?", options=""), "action": "save"}
    r = client.post("/app/forms/new", data=bad)
    assert r.status_code == 422 and f'id="r-{new}-error"' in r.text and "needs options" in r.text
    from carepost.forms.models import Form

    assert session.scalars(select(Form)).all() == []
    good = {**base, **row(new, type="choice", key="when", label="When?", options="Morning\nAfternoon", required="1"), "action": "save"}
    r = client.post("/app/forms/new", data=good, follow_redirects=False)
    assert r.status_code == 303
    session.rollback()
    [form] = session.scalars(select(Form)).all()
    assert [f["key"] for f in form.fields] == ["email", "when"] and form.fields[1]["options"] == ["Morning", "Afternoon"]
    assert form.fields[0]["phi"] is True
    editor = client.get(r.headers["location"])
    assert "The form was saved." in editor.text and 'data-testid="form-status">draft' in editor.text
    # removing a row without JavaScript
    uids = rows_of(editor.text)
    data = {"csrf_token": owner, "name": "Flu shot sign-up", "kind": "form", "language": "en", "action": "save",
            **row(uids[0], type="email", key="email", label="Email", required="1", contact_field="email"),
            **row(uids[1], type="choice", key="when", label="When?", options="Morning", remove="1")}
    assert client.post(f"/app/forms/{form.id}", data=data, follow_redirects=False).status_code == 303
    session.rollback()
    assert [f["key"] for f in session.get(Form, form.id).fields] == ["email"]
    # every builder input is labelled
    html = client.get(f"/app/forms/{form.id}").text
    ids = [i for i in re.findall(r'<(?:input|select|textarea)\b[^>]*\bid="([^"]+)"', html) if "__UID__" not in i]
    assert set(ids) <= set(re.findall(r'<label for="([^"]+)"', html))


def test_preview_publish_and_submissions(client, owner, session, org):
    uid = "a1"
    data = {"csrf_token": owner, "name": "Intake", "kind": "form", "language": "en", "action": "save",
            **row(uid, type="email", key="email", label="Email", required="1", contact_field="email"),
            **row("b2", type="long_text", key="reason", label="Reason", phi="1"),
            **row("c3", type="choice", key="visit", label="Visit", options="Video\nIn person")}
    r = client.post("/app/forms/new", data=data, follow_redirects=False)
    form_id = r.headers["location"].split("/")[3].split("?")[0]
    preview = client.get(f"/app/forms/{form_id}/preview")
    assert preview.status_code == 200 and 'data-testid="preview-banner"' in preview.text and "disabled" in preview.text
    assert "default-src 'none'" in preview.headers["content-security-policy"]
    r = client.post(f"/app/forms/{form_id}/publish", data={"csrf_token": owner}, follow_redirects=False)
    assert r.status_code == 303
    editor = client.get(r.headers["location"]).text
    assert "The form is published." in editor and 'data-testid="public-url"' in editor
    from carepost.forms.models import Form

    session.rollback()
    form = session.get(Form, form_id)
    fill(client, {"public_id": form.public_id}, {"email": "jane.doe@example.org", "reason": "<b>Chest pain</b>", "visit": "Video"})
    listing = client.get(f"/app/forms/{form_id}/submissions")
    assert listing.status_code == 200 and "jane.doe@example.org" in listing.text
    assert "&lt;b&gt;Chest pain&lt;/b&gt;" in listing.text and "<b>Chest pain" not in listing.text
    [sub] = subs(session)
    detail = client.get(f"/app/forms/{form_id}/submissions/{sub.id}")
    assert detail.status_code == 200 and "new contact" not in detail.text and "created by this submission" in detail.text
    # a form with submissions cannot be deleted
    assert "Delete" not in client.get(f"/app/forms/{form_id}").text
    r = client.post(f"/app/forms/{form_id}/delete", data={"csrf_token": owner})
    assert r.status_code == 409 and "unpublish it instead" in r.text


def test_masked_reader_sees_masked_answers(client, org, make_user, session):
    from carepost.accounts import credentials as creds

    cred, secret = creds.create_credential(session, org.id, name="t", scopes=["forms:manage"])
    session.commit()
    headers = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    body = {"name": "Intake", "fields": [
        {"key": "email", "type": "email", "label": "Email", "required": True, "contact_field": "email"},
        {"key": "reason", "type": "long_text", "label": "Reason", "phi": True}]}
    form = client.post("/api/v1/forms", json=body, headers=headers).json()
    client.post(f"/api/v1/forms/{form['id']}/publish", headers=headers)
    fill(client, form, {"email": "jane.doe@example.org", "reason": "Chest pain"})
    login_client(client, make_user(org, role="marketer"))  # forms:manage, PHI masked only
    page = client.get(f"/app/forms/{form['id']}/submissions")
    assert page.status_code == 200 and "Chest pain" not in page.text and "j***@example.org" in page.text
    assert "masked for your role" in page.text
    [sub] = subs(session)
    assert client.get(f"/app/forms/{form['id']}/submissions/{sub.id}/signature.png").status_code == 403
    from carepost.audit.models import AuditEvent

    session.rollback()
    [event] = session.scalars(select(AuditEvent).where(AuditEvent.action == "form.submission.list")).all()
    assert event.details["view"] == "masked" and event.details["submission_ids"] == [sub.id]


def test_results_page(client, owner, session, org):
    from carepost.accounts import credentials as creds

    cred, secret = creds.create_credential(session, org.id, name="t", scopes=["forms:manage"])
    session.commit()
    headers = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    form = client.post("/api/v1/forms", json=SURVEY, headers=headers).json()
    client.post(f"/api/v1/forms/{form['id']}/publish", headers=headers)
    for rating in ("5", "3"):
        fill(client, form, {"overall": rating, "wait": "OK"})
    page = client.get(f"/app/forms/{form['id']}/results")
    assert page.status_code == 200 and 'data-testid="average-overall">4.00' in page.text
    assert "<meter" in page.text and " style=" not in page.text
