"""The authorization-text editor (/app/consent/texts): structured elements per language, the
164.508(c) checklist, publishing refused while an element is missing, versions."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from tests.fixtures.accounts import login_client


@pytest.fixture
def officer(client, org, make_user):
    user = make_user(org, role="compliance_officer")
    csrf = login_client(client, user)
    return csrf


def texts(session, org_id, purpose="marketing"):
    from carepost.consent.models import AuthorizationText

    session.rollback()
    return list(session.scalars(select(AuthorizationText).where(AuthorizationText.org_id == org_id,
                                                                AuthorizationText.purpose == purpose)
                                .order_by(AuthorizationText.version)))


def new_draft(client, csrf, purpose="marketing"):
    r = client.post("/app/consent/texts/new", data={"csrf_token": csrf, "purpose": purpose}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["location"]


def form_values(html: str) -> dict:
    """Every element input of the editor with its current value."""
    values = {}
    for name, value in re.findall(r'<input id="(el-[a-z]+-[a-z_]+)" name="[^"]+" type="text" maxlength="200" value="([^"]*)"', html):
        values[name] = value
    for name, value in re.findall(r'<textarea id="(el-[a-z]+-[a-z_]+)"[^>]*>([^<]*)</textarea>', html, re.S):
        values[name] = value
    import html as h

    return {k: h.unescape(v) for k, v in values.items()}


def test_list_shows_default_texts_per_purpose(client, officer, org):
    page = client.get("/app/consent/texts")
    assert page.status_code == 200
    assert "Marketing with financial remuneration" in page.text and "Current: version 1" in page.text
    assert page.text.count("badge ok") == 2  # both defaults are published


def test_draft_checklist_and_publish_refused_while_incomplete(client, officer, org, session):
    url = new_draft(client, officer)
    page = client.get(url)
    assert page.status_code == 200 and "version 2" in page.text and "draft" in page.text
    values = form_values(page.text)
    assert values["el-en-right_to_revoke"] and values["el-es-right_to_revoke"]  # copied from version 1
    assert 'class="missing"' not in page.text
    # every input has a label
    ids = re.findall(r'<(?:input|textarea)\b[^>]*\bid="([^"]+)"', page.text)
    assert ids and set(ids) <= set(re.findall(r'<label for="([^"]+)"', page.text))

    values["el-en-right_to_revoke"] = ""
    values["el-es-conditioning"] = "corto"
    r = client.post(url, data={**values, "csrf_token": officer, "action": "publish"})
    assert r.status_code == 422
    assert "Not published" in r.text
    assert 'data-element="en-right_to_revoke"' in r.text and re.search(r'class="missing" data-element="en-right_to_revoke"', r.text)
    assert re.search(r'class="missing" data-element="es-conditioning"', r.text)
    assert re.search(r'class="present" data-element="en-redisclosure"', r.text)
    rows = texts(session, org.id)
    assert [(t.version, t.status) for t in rows] == [(1, "published"), (2, "draft")]
    # the draft kept what was typed
    assert "right_to_revoke" not in rows[1].elements["en"] and rows[1].elements["es"]["conditioning"] == "corto"


def test_complete_draft_publishes_and_retires_the_old_version(client, officer, org, session):
    url = new_draft(client, officer)
    values = form_values(client.get(url).text)
    values["el-en-title"] = "Authorization for marketing — 2026 edition"
    r = client.post(url, data={**values, "csrf_token": officer, "action": "save"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("?saved=1")
    r = client.post(url, data={**values, "csrf_token": officer, "action": "publish"}, follow_redirects=False)
    assert r.status_code == 303
    rows = texts(session, org.id)
    assert [(t.version, t.status) for t in rows] == [(1, "retired"), (2, "published")]
    assert rows[1].title == "Authorization for marketing — 2026 edition"
    # a published version is read-only; a change is refused and nothing moves
    page = client.get(url)
    assert "<textarea" not in page.text and "New draft from this version" in page.text
    r = client.post(url, data={**values, "el-en-title": "Changed", "csrf_token": officer, "action": "save"})
    assert r.status_code == 409 and "cannot change" in r.text
    assert texts(session, org.id)[1].title == "Authorization for marketing — 2026 edition"
    listing = client.get("/app/consent/texts").text
    assert "Current: version 2" in listing and "retired" in listing


def test_spanish_is_optional_but_complete_when_offered(client, officer, org, session):
    url = new_draft(client, officer, "marketing_remunerated")
    values = form_values(client.get(url).text)
    assert "el-en-remuneration" in values  # required for remunerated marketing
    spanish_only_title = {k: ("" if k.startswith("el-es-") else v) for k, v in values.items()}
    spanish_only_title["el-es-title"] = "Autorización"
    r = client.post(url, data={**spanish_only_title, "csrf_token": officer, "action": "publish"})
    assert r.status_code == 422 and re.search(r'class="missing" data-element="es-phi_description"', r.text)
    english_only = {k: ("" if k.startswith("el-es-") else v) for k, v in values.items()}
    r = client.post(url, data={**english_only, "csrf_token": officer, "action": "publish"}, follow_redirects=False)
    assert r.status_code == 303
    published = texts(session, org.id, "marketing_remunerated")[-1]
    assert published.status == "published" and sorted(published.elements) == ["en"]


def test_editor_escapes_what_was_typed(client, officer, org):
    url = new_draft(client, officer)
    values = form_values(client.get(url).text)
    values["el-en-phi_description"] = '<script>alert(1)</script> your name and email address'
    client.post(url, data={**values, "csrf_token": officer, "action": "save"})
    page = client.get(url).text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_only_consent_managers_edit_texts(client, org, make_user, session):
    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    assert client.get("/app/consent/texts").status_code == 403
    r = client.post("/app/consent/texts/new", data={"csrf_token": csrf, "purpose": "marketing"})
    assert r.status_code == 403
    assert [t.version for t in texts(session, org.id)] == [1]


def test_new_draft_refuses_a_purpose_without_authorization(client, officer, org):
    r = client.post("/app/consent/texts/new", data={"csrf_token": officer, "purpose": "treatment"})
    assert r.status_code == 422 and "needs an authorization" in r.text
    # asking twice for a draft opens the existing one
    first = new_draft(client, officer)
    assert new_draft(client, officer).startswith(first)
