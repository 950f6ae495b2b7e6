"""The link guard at template save (issue 13 item 3): a template whose links would carry a
per-patient value (a merge field anywhere in a URL) or an email address is refused when it is
created or changed — API and UI — with a 422 naming the link, never echoing the URL; nothing is
stored."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect
from sqlalchemy import func, select

from carepost.content.models import MessageTemplate, MessageTemplateVersion
from carepost.core.database import system_session
from tests.fixtures.accounts import add_staff, ui_login


@pytest.fixture
def key(sender):
    return sender.key("templates:manage")


def template(**over) -> dict:
    body = {"name": "Visit reminder", "subject": "Your upcoming visit", "purpose": "treatment",
            "html": '<p>Hello {{ first_name }}. <a href="https://bar.example/visits">Your visits</a></p>',
            "text": "Hello {{ first_name }}. https://bar.example/visits"}
    body.update(over)
    return body


@pytest.mark.parametrize(("over", "field"), [
    ({"html": '<a href="https://bar.example/">a</a> <a href="https://bar.example/r?mrn={{ mrn }}">b</a>'},
     "template.html.links[1]"),
    ({"html": '<a href="https://bar.example/p/{{ first_name }}/x">a</a>'}, "template.html.links[0]"),
    ({"html": '<a href="https://{{ first_name }}.bar.example/">a</a>'}, "template.html.links[0]"),
    ({"html": '<a href="{{ link }}">a</a>'}, "template.html.links[0]"),
    ({"html": '<a href="https://bar.example/x#{% if first_name %}y{% endif %}">a</a>'}, "template.html.links[0]"),
    ({"html": '<a href="https://bar.example/u?e=ann.lee%40mail.test">a</a>'}, "template.html.links[0]"),
    ({"text": "See https://bar.example/r?dob={{ birth_date }} now"}, "template.text.links[0]"),
    ({"text": "See https://bar.example/ and https://bar.example/r?who=ann@mail.test"}, "template.text.links[1]"),
    ({"variants": {"es": {"subject": "Su visita", "html": '<a href="https://bar.example/es?n={{ first_name }}">x</a>'}}},
     "variants.es.html.links[0]"),
])
def test_api_refuses_a_template_with_phi_in_a_link_naming_it(client, key, session, over, field):
    r = client.post("/api/v1/templates", json=template(**over), headers=key)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["code"] == "link_phi"
    assert "mail.test" not in r.text and "{{" not in error["message"]
    session.rollback()
    assert session.scalar(select(func.count()).select_from(MessageTemplate)) == 0


def test_api_refuses_the_change_and_keeps_the_saved_version(client, key, session):
    r = client.post("/api/v1/templates", json=template(), headers=key)
    assert r.status_code == 201, r.text
    template_id = r.json()["id"]
    # Merge fields in link text, elsewhere in the body, mailto: without variables: all fine.
    ok = template(html='<p><a href="https://bar.example/visits">Hi {{ first_name }}</a> '
                       '<a href="mailto:care@bar.example">Write</a></p>')
    assert client.put(f"/api/v1/templates/{template_id}", json=ok, headers=key).status_code == 200
    bad = template(html='<p><a href="https://bar.example/visits?who={{ first_name }}">Hi</a></p>')
    r = client.put(f"/api/v1/templates/{template_id}", json=bad, headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "template.html.links[0]"
    session.rollback()
    versions = session.scalars(select(MessageTemplateVersion).where(
        MessageTemplateVersion.template_id == template_id)).all()
    assert len(versions) == 2 and all("who=" not in (v.html or "") for v in versions)


@pytest.fixture(scope="module")
def marketer(live_server):
    from carepost.accounts.service import create_organization

    with system_session() as s:
        org = create_organization(s, f"Link guard UI {secrets.token_hex(3)}")
        user = add_staff(s, org.id, "marketer")
        s.commit()
        return user


@pytest.mark.ui
def test_template_form_refuses_a_merge_field_in_a_link(page, marketer):
    ui_login(page, marketer)
    page.goto("/app/templates/new")
    page.fill("input[name=name]", "Lab results")
    page.select_option("select[name=purpose]", "treatment")
    page.fill("input[name=subject]", "Your results are ready")
    page.fill("textarea[name=html]", '<p>Hello {{ first_name }}, <a href="https://bar.example/labs">see</a> or '
                                     '<a href="https://bar.example/labs?patient={{ first_name }}">here</a>.</p>')
    page.click("[data-testid=save]")
    error = page.locator("[data-testid=error]")
    expect(error).to_contain_text("template.html.links[1]")
    expect(error).to_contain_text("may not carry template variables")
    assert "/app/templates/new" in page.url
    # The form keeps what was typed; a clean link saves.
    page.fill("textarea[name=html]", '<p>Hello {{ first_name }}, <a href="https://bar.example/labs">see</a>.</p>')
    page.click("[data-testid=save]")
    expect(page.locator("h1")).to_contain_text("version 1")
