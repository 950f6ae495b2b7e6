"""Message templates: sandboxed rendering, the PHI policy lint, the templates API."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from carepost.content import rendering
from carepost.content.rendering import TemplateSecurityError, check_template, render_part, render_parts
from carepost.core.errors import NotFound, ValidationFailed

# --------------------------------------------------------------------------- rendering (no database)


def test_html_is_escaped_and_text_is_not():
    data = {"name": "<b>Ann & Co</b>", "items": ["a<", "b"], "appt": {"when": "Tuesday"}}
    out = render_parts(
        {"subject": "Your visit", "preheader": "Details inside",
         "html": "<p>Hi {{ name }}</p><ul>{% for i in items %}<li>{{ i }}</li>{% endfor %}</ul>{{ appt.when }}",
         "text": "Hi {{ name }}, {{ items|join(', ') }} {{ appt['when'] }}"},
        data,
    )
    assert out.html == "<p>Hi &lt;b&gt;Ann &amp; Co&lt;/b&gt;</p><ul><li>a&lt;</li><li>b</li></ul>Tuesday"
    assert out.text == "Hi <b>Ann & Co</b>, a<, b Tuesday"
    assert out.subject == "Your visit" and out.preheader == "Details inside"


def test_unknown_variables_name_the_variable():
    with pytest.raises(ValidationFailed) as exc:
        render_part("html", "<p>{{ first_name }}</p>", {})
    assert exc.value.message == "Unknown template variable 'first_name' in html"
    assert exc.value.field == "data.first_name" and exc.value.status_code == 422
    with pytest.raises(ValidationFailed) as exc:
        render_part("text", "{{ appt.room }}", {"appt": {"when": "x"}})
    assert exc.value.field == "data.room" and "'room' in text" in exc.value.message
    # Defaults and tests still work with strict undefined.
    assert render_part("text", "{{ x|default('none') }} {{ x is defined }}", {}) == "none False"


def test_syntax_errors_name_the_field_and_line():
    with pytest.raises(ValidationFailed) as exc:
        render_part("html", "<p>ok</p>\n<p>{{ name }</p>", {"name": "A"})
    assert exc.value.field == "template.html" and "line 2" in exc.value.message
    with pytest.raises(ValidationFailed) as exc:
        check_template({"subject": "s", "text": "{% if %}"}, contains_phi=False)
    assert exc.value.field == "template.text" and "line 1" in exc.value.message


@pytest.mark.parametrize(
    "source, data",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}),
        ("{{ cycler.__init__.__globals__.os }}", {}),
        ("{{ lipsum.__globals__['os'].popen('id').read() }}", {}),
        ("{{ x['__class__'] }}", {"x": "a"}),
        ("{{ x[k] }}", {"x": "a", "k": "__class__"}),
        ("{{ x|attr('__class__') }}", {"x": 1}),
        ("{{ x|attr(k) }}", {"x": 1, "k": "__init__"}),
        ("{{ self.__init__.__globals__ }}", {}),
        ("{{ _x }}", {}),
        ("{{ items.append(1) }}", {"items": []}),
        ("{{ d.pop('a') }}", {"d": {"a": 1}}),
        ("{{ 'a' * 1000000000 }}", {}),
        ("{{ 2 ** 1000000000 }}", {}),
        ("{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", {"s": "x" * 5000}),
        ("{% macro m(n) %}{% if n %}{{ m(n-1) }}{{ m(n-1) }}{% endif %}{% endmacro %}{{ m(60) }}", {}),
        ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", {}),
    ],
)
def test_sandbox_escapes_are_refused_with_422(source, data):
    with pytest.raises(ValidationFailed) as exc:
        render_part("html", source, data)
    assert exc.value.status_code == 422
    assert exc.value.field == "template.html" or exc.value.field.startswith("data.")
    if exc.value.field == "template.html":
        assert isinstance(exc.value, TemplateSecurityError) or "not available" in exc.value.message


def test_disallowed_filters_and_includes_are_refused_at_save():
    for source in ("{{ x|safe }}", "{{ x|center(100000000) }}", "{{ '%999999999s'|format(x) }}", "{% include 'a' %}"):
        with pytest.raises(ValidationFailed) as exc:
            check_template({"subject": "s", "html": source}, contains_phi=True)
        assert exc.value.field == "template.html"


def test_output_is_capped():
    with pytest.raises(TemplateSecurityError) as exc:
        render_part("text", "{% for i in l %}{{ s }}{% endfor %}", {"l": list(range(200)), "s": "y" * 5000})
    assert "longer than" in exc.value.message and exc.value.field == "template.text"


def test_errors_never_quote_data_values():
    with pytest.raises(ValidationFailed) as exc:
        render_part("text", "{{ (mrn|int) + 'x' }}", {"mrn": "Jane-Doe-4411"})
    assert "Jane" not in exc.value.message and exc.value.field == "template.text"


def test_subject_and_preheader_lint():
    # PHI never goes into headers: variables in subject/preheader are refused when contains_phi.
    for part in ("subject", "preheader"):
        parts = {"subject": "Hello", "preheader": "", "html": "<p>{{ name }}</p>", part: "Hi {{ name }}"}
        with pytest.raises(ValidationFailed) as exc:
            check_template(parts, contains_phi=True)
        assert exc.value.field == f"template.{part}" and "name" in exc.value.message
        check_template(parts, contains_phi=False)  # a template without PHI may personalize
        with pytest.raises(ValidationFailed) as exc:
            check_template({**parts, part: "Hello\r\nBcc: x@example.test"}, contains_phi=False)
        assert exc.value.field == f"template.{part}"
    # Data with line breaks never breaks a header line.
    assert render_part("subject", "Hi {{ n }}", {"n": "A\r\nBcc: evil@example.test"}) == "Hi A  Bcc: evil@example.test"


# --------------------------------------------------------------------------- API


def _headers(session, org_id, scopes):
    cred, secret = create_credential(session, org_id, name="templates", scopes=scopes)
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


TEMPLATE = {
    "name": "Appointment reminder",
    "subject": "Your appointment",
    "preheader": "Details inside",
    "html": "<p>Dear {{ first_name }}, see you {{ appt.when }}.</p>",
    "text": "Dear {{ first_name }}, see you {{ appt.when }}.",
    "purpose": "treatment",
}


def test_templates_api_crud_preview_and_audit(client, session, org):
    from carepost.accounts.service import create_organization
    from carepost.audit.models import AuditEvent
    from carepost.content import service

    manage = _headers(session, org.id, ["templates:manage"])
    sender = _headers(session, org.id, ["messages:send"])
    reader = _headers(session, org.id, ["messages:read"])

    r = client.post("/api/v1/templates", json=TEMPLATE, headers=manage)
    assert r.status_code == 201, r.text
    body = r.json()
    tid = body["id"]
    assert body["version"] == 1 and body["contains_phi"] is True and body["variables"] == ["appt", "first_name"]

    # Duplicate name, PHI in subject, bad purpose, bad syntax: clear errors naming the field.
    assert client.post("/api/v1/templates", json=TEMPLATE, headers=manage).json()["error"]["field"] == "name"
    r = client.post("/api/v1/templates", json={**TEMPLATE, "name": "b", "subject": "Hi {{ first_name }}"}, headers=manage)
    assert r.status_code == 422 and r.json()["error"]["field"] == "template.subject"
    r = client.post("/api/v1/templates", json={**TEMPLATE, "name": "c", "purpose": "nope"}, headers=manage)
    assert r.status_code == 422 and r.json()["error"]["field"] == "purpose"
    r = client.post("/api/v1/templates", json={**TEMPLATE, "name": "d", "html": "{{ ''.__class__ }}"}, headers=manage)
    assert r.status_code == 422 and (r.json()["error"]["field"], r.json()["error"]["code"]) == ("template.html", "template_unsafe")

    # Reading: templates:manage or messages:send; messages:read alone is refused, writing too.
    assert client.get(f"/api/v1/templates/{tid}", headers=sender).status_code == 200
    assert [t["id"] for t in client.get("/api/v1/templates", headers=sender).json()["data"]] == [tid]
    assert client.get("/api/v1/templates", headers=reader).status_code == 403
    assert client.post("/api/v1/templates", json={**TEMPLATE, "name": "e"}, headers=sender).status_code == 403

    # Preview renders, escapes, and names missing data; nothing is stored.
    data = {"first_name": "<Ann>", "appt": {"when": "Tuesday 9:00"}}
    r = client.post(f"/api/v1/templates/{tid}/preview", json={"data": data}, headers=sender)
    assert r.status_code == 200, r.text
    assert r.json()["html"] == "<p>Dear &lt;Ann&gt;, see you Tuesday 9:00.</p>"
    assert r.json()["text"] == "Dear <Ann>, see you Tuesday 9:00." and r.json()["purpose"] == "treatment"
    r = client.post(f"/api/v1/templates/{tid}/preview", json={"data": {"first_name": "Ann"}}, headers=sender)
    assert r.status_code == 422 and r.json()["error"]["field"] == "data.appt"
    r = client.post(f"/api/v1/templates/{tid}/preview", json={"data": {"x": "y" * 70_000}}, headers=sender)
    assert r.status_code == 422 and r.json()["error"]["field"] == "data" and "y" * 20 not in r.text
    r = client.post(f"/api/v1/templates/{tid}/preview", json={"data": ["Ann"]}, headers=sender)
    assert r.status_code == 422 and r.json()["error"]["field"] == "data"

    # Update: a new version only when something changed.
    r = client.put(f"/api/v1/templates/{tid}", json={**TEMPLATE, "text": "Hello {{ first_name }}"}, headers=manage)
    assert r.status_code == 200 and r.json()["version"] == 2
    assert client.put(f"/api/v1/templates/{tid}", json={**TEMPLATE, "text": "Hello {{ first_name }}"}, headers=manage).json()["version"] == 2
    r = client.put(f"/api/v1/templates/{tid}", json={**TEMPLATE, "subject": "Hi {{ first_name }}"}, headers=manage)
    assert r.status_code == 422 and r.json()["error"]["field"] == "template.subject"

    # render_template is what the messages API calls; it is scoped to the organization.
    other = create_organization(session, "Other Clinic")
    session.commit()
    rendered = service.render_template(session, org.id, tid, data)
    assert rendered.text == "Hello <Ann>" and rendered.contains_phi and rendered.version == 2
    with pytest.raises(NotFound) as exc:
        service.render_template(session, other.id, tid, data)
    assert exc.value.status_code == 404 and exc.value.field == "template_id"
    session.rollback()

    # Another organization's credential sees nothing and changes nothing.
    foreign = _headers(session, other.id, ["templates:manage", "messages:send"])
    assert client.get(f"/api/v1/templates/{tid}", headers=foreign).status_code == 404
    assert client.post(f"/api/v1/templates/{tid}/preview", json={"data": data}, headers=foreign).status_code == 404
    assert client.put(f"/api/v1/templates/{tid}", json=TEMPLATE, headers=foreign).status_code == 404
    assert client.delete(f"/api/v1/templates/{tid}", headers=foreign).status_code == 404
    assert client.get("/api/v1/templates", headers=foreign).json()["data"] == []

    assert client.delete(f"/api/v1/templates/{tid}", headers=manage).status_code == 204
    assert client.get(f"/api/v1/templates/{tid}", headers=manage).status_code == 404

    session.rollback()
    actions = session.scalars(
        select(AuditEvent.action).where(AuditEvent.org_id == org.id, AuditEvent.target_id == tid).order_by(AuditEvent.seq)
    ).all()
    # The read after deletion found nothing in the organization: audited as a denied lookup
    # (issue 9 item 25); the foreign organization's probes are in its own chain.
    assert actions == ["template.create", "template.update", "template.delete", "access.denied"]
    denied = session.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id, AuditEvent.action == "access.denied")).all()
    assert denied, "refusals are audited"


def test_render_data_checks_name_the_field():
    from carepost.content.service import check_data

    for bad, field in [({"a": {"b": {1, 2}}}, "data.a.b"), ({"a": [1, object()]}, "data.a[1]"), ({"_x": 1}, "data._x"),
                       ({"a": float("nan")}, "data.a"), ("text", "data")]:
        with pytest.raises(ValidationFailed) as exc:
            check_data(bad)
        assert exc.value.field == field
    assert check_data({"a": [1, 2.5, None, True, {"b": "c"}]}) == {"a": [1, 2.5, None, True, {"b": "c"}]}
    assert rendering.variables("html", "{{ a }}{% for x in b %}{{ x }}{% endfor %}") == {"a", "b"}
