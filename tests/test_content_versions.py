"""Templates grow up (issue 14 item 1): immutable versions and diffs, merge-field helpers with PHI
categories, the purpose lint, dynamic blocks planned set-wise, language variants, MJML, CSS
inlining, the text part, the spam/size lint, preview as a contact. Real rendering, the real MJML
compiler, real rows on both databases."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from sqlalchemy import func, select

from carepost.accounts.credentials import create_credential
from carepost.content import authoring, blocks, helpers
from carepost.content import service as templates
from carepost.content.models import MessageTemplate, MessageTemplateVersion
from carepost.content.schemas import TemplateIn
from carepost.core import clock
from carepost.core.errors import ValidationFailed

DIABETES_BLOCK = "{% block_if 'has condition icd10cm:E11.*' %}<p>Diabetes class in May.</p>{% endblock_if %}"
MJML = """<mjml>
  <mj-head><mj-style>.hello { color: #0a5; }</mj-style></mj-head>
  <mj-body>
    <mj-section><mj-column>
      <mj-text css-class="hello">Hello {{ first_name }}{% if next_appointment %}, see you {{ next_appointment.when }}{% endif %}.</mj-text>
      <mj-text>Please bring your insurance card and a list of the medicines you take. Call us if you need to change the time.</mj-text>
      <mj-image src="https://clinic.example/logo.png" alt="Clinic logo" />
    </mj-column></mj-section>
  </mj-body>
</mjml>"""


def _headers(session, org_id, scopes):
    cred, secret = create_credential(session, org_id, name="templates", scopes=scopes)
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def _template(**overrides) -> dict:
    body = {"name": "Visit reminder", "subject": "Your upcoming visit", "preheader": "Details inside",
            "html": "<p>Hello {{ first_name }}. {% if next_appointment %}See you {{ next_appointment.when }}."
                    "{% endif %}</p>" + DIABETES_BLOCK,
            "text": "", "purpose": "treatment", "language": "en",
            "variants": {"es": {"subject": "Su próxima visita",
                                "html": "<p>Hola {{ first_name }}. {% if next_appointment %}Le esperamos el "
                                        "{{ next_appointment.when }}.{% endif %}</p>" + DIABETES_BLOCK.replace(
                                            "Diabetes class in May", "Clase de diabetes en mayo")}}}
    body.update(overrides)
    return body


def _contact(session, org_id, given, family, *, language=None, tz=None):
    from carepost.patients import service as patients

    return patients.save_contact(session, org_id, {"given_name": given, "family_name": family,
                                                   "preferred_language": language, "time_zone": tz}).contact


def _fact(session, org_id, contact_id, kind, **values):
    from carepost.patients import service as patients
    from carepost.patients.schemas import FactIn

    return patients.create_fact(session, org_id, contact_id, kind, FactIn(**values))


def _count_versions(session, template_id=None) -> int:
    q = select(func.count()).select_from(MessageTemplateVersion)
    if template_id:
        q = q.where(MessageTemplateVersion.template_id == template_id)
    return int(session.scalar(q))


# --------------------------------------------------------------------------- versions


def test_every_edit_is_a_new_immutable_version_and_diffs_name_the_parts(client, session, org):
    manage = _headers(session, org.id, ["templates:manage"])
    r = client.post("/api/v1/templates", json=_template(), headers=manage)
    assert r.status_code == 201, r.text
    first = r.json()
    tid, v1_id = first["id"], first["version_id"]
    assert first["version"] == 1 and v1_id and first["helpers"] == [
        {"name": "first_name", "category": "demographics"}, {"name": "next_appointment", "category": "appointment"}]
    assert first["blocks"] == [{"key": first["blocks"][0]["key"], "condition": "has condition icd10cm:E11.*"}]
    assert set(first["variants"]) == {"es"}

    r = client.put(f"/api/v1/templates/{tid}", json=_template(subject="Your next visit"), headers=manage)
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["version_id"] != v1_id
    # The same content again: no new version.
    assert client.put(f"/api/v1/templates/{tid}", json=_template(subject="Your next visit"), headers=manage).json()["version"] == 2
    session.rollback()
    assert _count_versions(session, tid) == 2
    v1 = session.get(MessageTemplateVersion, v1_id)
    assert v1.subject == "Your upcoming visit" and v1.version == 1  # the old version is untouched

    versions = client.get(f"/api/v1/templates/{tid}/versions", headers=manage).json()["data"]
    assert [v["version"] for v in versions] == [2, 1] and versions[1]["languages"] == ["en", "es"]
    old = client.get(f"/api/v1/templates/{tid}/versions/1", headers=manage).json()
    assert old["subject"] == "Your upcoming visit" and old["version_id"] == v1_id
    diff = client.get(f"/api/v1/templates/{tid}/diff?from=1&to=2", headers=manage).json()
    assert list(diff["parts"]) == ["en.subject"]
    assert "-Your upcoming visit" in diff["parts"]["en.subject"] and "+Your next visit" in diff["parts"]["en.subject"]
    assert client.get(f"/api/v1/templates/{tid}/diff?from=1&to=9", headers=manage).json()["error"]["field"] == "to"

    # A failed edit stores nothing.
    r = client.put(f"/api/v1/templates/{tid}", json=_template(html="{{ ''.__class__ }}"), headers=manage)
    assert r.status_code == 422
    session.rollback()
    assert _count_versions(session, tid) == 2
    # A campaign or journey holds a version id, scoped to its organization.
    assert templates.get_version_by_id(session, org.id, v1_id).version == 1


def test_a_message_records_the_version_it_was_rendered_from(client, sender, delivery_queue, session):
    from carepost.delivery.models import Message

    key = sender.key("messages:send", "templates:manage")
    r = client.post("/api/v1/templates", json=_template(variants={}, html="<p>Hello {{ first_name }}</p>"), headers=key)
    tid, vid = r.json()["id"], r.json()["version_id"]
    r = client.post("/api/v1/messages", headers=key, json={"from": "care@bar.example", "to": ["pat@valid.test"],
                                                            "template_id": tid, "data": {"first_name": "Pat"}})
    assert r.status_code == 202, r.text
    session.rollback()
    row = session.get(Message, r.json()["id"])
    assert (row.template_id, row.template_version_id) == (tid, vid)


def test_a_message_may_not_give_a_template_a_purpose_its_helpers_exceed(client, sender, delivery_queue, session):
    key = sender.key("messages:send", "templates:manage")
    r = client.post("/api/v1/templates", json=_template(variants={}, html="<p>{{ next_appointment.when }}</p>"), headers=key)
    tid = r.json()["id"]
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "care@bar.example", "to": ["pat@valid.test"], "template_id": tid, "purpose": "marketing", "topic": "x",
        "data": {"next_appointment": {"when": "Tuesday"}}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "purpose", r.text
    assert r.json()["error"]["code"] == "phi_beyond_purpose" and "next_appointment" in r.json()["error"]["message"]
    session.rollback()
    from carepost.delivery.models import Message

    assert session.scalars(select(Message)).all() == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, field, code", [
    ({"html": "{{ ''.__class__.__mro__ }}"}, "template.html", "template_unsafe"),
    ({"html": "{{ cycler.__init__.__globals__ }}"}, "template.html", "template_unsafe"),
    ({"html": '{{ "{0.__class__}".format(first_name) }}'}, None, None),  # refused at render (sandboxed format)
    ({"html": "{{ lab_trend('x') }}"}, "template.html", "unknown_helper"),
    ({"html": "{{ last_observation(code) }}"}, "template.html", None),
    ({"purpose": "marketing", "html": '<p>{{ last_observation("loinc:4548-4").value }}</p>'}, "template.html",
     "phi_beyond_purpose"),
    ({"purpose": "marketing", "html": "{% for c in active_conditions %}{{ c.name }}{% endfor %}"}, "template.html",
     "phi_beyond_purpose"),
    ({"purpose": "marketing", "html": "<p>Hi {{ first_name }}</p>", "variants": {"es": {"html": "{{ care_stage }}"}}}, "variants.es.html", "phi_beyond_purpose"),
    ({"contains_phi": False, "subject": "Results: {{ last_observation('loinc:4548-4').value }}"}, "template.subject",
     "phi_beyond_purpose"),
    ({"subject": "Your diabetes check"}, "template.subject", None),
    ({"from_name": "Dr Smith oncology"}, "template.from_name", None),
    ({"portal_notice": "Your HIV test results are ready"}, "template.portal_notice", None),
    ({"portal_notice": "Hello {{ first_name }}"}, "template.portal_notice", None),
    ({"data_uses": ["first_name"]}, "template.html", "helper_not_declared"),
    ({"data_uses": ["lab_trend"]}, "data_uses.0", "unknown_helper"),
    ({"language": "xx-nowhere"}, "language", None),
    ({"variants": {"klingon": {"subject": "x"}}}, "variants.klingon", None),
    ({"variants": {"fr": {"subject": "x"}}}, "variants.fr", None),
    ({"source_format": "mjml", "html": "", "mjml": "<mjml><mj-body><mj-section></mjml>"}, "template.mjml", None),
    ({"source_format": "mjml", "html": "", "mjml": "<p>not mjml</p>"}, "template.mjml", None),
    ({"html": "{% block_if 'has condition (' %}x{% endblock_if %}"}, "template.html", "block_condition_invalid"),
    ({"html": "{% block_if first_name %}x{% endblock_if %}"}, "template.html", None),
])
def test_bad_templates_are_refused_naming_the_field_and_nothing_is_stored(client, session, org, overrides, field, code):
    manage = _headers(session, org.id, ["templates:manage"])
    body = _template(**{"variants": {}, **overrides})
    r = client.post("/api/v1/templates", json=body, headers=manage)
    if field is None:  # saved; refused when rendered
        assert r.status_code == 201, r.text
        r = client.post(f"/api/v1/templates/{r.json()['id']}/preview", json={"data": {"first_name": "Ann"}},
                        headers=manage)
        assert r.status_code == 422 and r.json()["error"]["field"] == "template.html"
        assert r.json()["error"]["code"] == "template_unsafe"
        return
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field, error
    if code:
        assert error["code"] == code
    session.rollback()
    assert session.scalar(select(func.count()).select_from(MessageTemplate).where(MessageTemplate.org_id == org.id)) == 0
    assert _count_versions(session) == 0


def test_runaway_loops_and_huge_output_are_refused():
    from carepost.content.rendering import TemplateSecurityError

    version = MessageTemplateVersion(template_id="t", version=1, name="x", source_format="html", mjml="",
                                     subject="s", preheader="", html="{% for a in s %}{% for b in s %}{{ a }}{% endfor %}{% endfor %}",
                                     text="", from_name="", portal_notice="", language="en", variants={},
                                     contains_phi=True, purpose="treatment", data_uses=None)
    with pytest.raises(TemplateSecurityError) as exc:
        templates.render_version(version, {"s": "x" * 3000})
    assert exc.value.field == "template.html"


# --------------------------------------------------------------------------- helpers, languages, blocks


def test_purpose_categories_follow_minimum_necessary():
    assert "diagnosis" not in helpers.PURPOSE_CATEGORIES["marketing"]
    assert "lab_result" not in helpers.PURPOSE_CATEGORIES["refill_reminder"]
    assert "medication" in helpers.PURPOSE_CATEGORIES["refill_reminder"]
    assert set(helpers.PURPOSE_CATEGORIES["treatment"]) == set(helpers.CATEGORIES)
    from carepost.core.purposes import PURPOSES

    assert set(helpers.PURPOSE_CATEGORIES) == set(PURPOSES)
    assert all(h.category in helpers.CATEGORIES for h in helpers.HELPERS.values())


def test_dates_in_the_patients_language_and_time_zone():
    when = datetime(2026, 12, 8, 15, 30, tzinfo=clock.UTC) if hasattr(clock, "UTC") else datetime.fromisoformat("2026-12-08T15:30:00+00:00")
    en = helpers.Formatter("en-US", "America/New_York")
    es = helpers.Formatter("es", "America/Mexico_City")
    assert en.when(when) == "Tuesday, December 8, 2026 10:30\u202fAM"
    assert es.when(when) == "martes, 8 de diciembre de 2026 9:30"
    assert es.date(date(2026, 5, 1)) == "1 de mayo de 2026"
    assert helpers.choose_language("es-MX", "en", ["en", "es"]) == "es"
    assert helpers.choose_language("fr", "en", ["en", "es"]) == "en"
    assert helpers.choose_language(None, "en", ["en", "es"]) == "en"


def test_render_for_contacts_binds_helpers_languages_and_set_wise_blocks(client, session, org):
    manage = _headers(session, org.id, ["templates:manage"])
    tid = client.post("/api/v1/templates", json=_template(), headers=manage).json()["id"]
    session.rollback()
    ann = _contact(session, org.id, "Ann", "Lee", language="en-US", tz="America/New_York")
    rosa = _contact(session, org.id, "Rosa", "Díaz", language="es-MX", tz="America/Mexico_City")
    bob = _contact(session, org.id, "Bob", "Ray", language="fr")  # no French variant: the default
    visit = clock.now() + timedelta(days=7)
    _fact(session, org.id, ann.id, "appointments", status="booked", start_at=visit, display="Check-up")
    _fact(session, org.id, rosa.id, "appointments", status="booked", start_at=visit, display="Control")
    _fact(session, org.id, rosa.id, "appointments", status="cancelled", start_at=visit - timedelta(days=1))
    _fact(session, org.id, rosa.id, "conditions", code_system="icd10cm", code="E11.9", status="active",
          display="Type 2 diabetes")
    session.commit()

    template = session.get(MessageTemplate, tid)
    version = templates.current_version(session, template)
    ids = [ann.id, rosa.id, bob.id]
    conditions = templates.version_blocks(version)
    plan = blocks.plan(session, org.id, conditions, ids)
    (key,) = conditions
    assert plan == {ann.id: frozenset(), rosa.id: frozenset({key}), bob.id: frozenset()}

    out = templates.render_for_contacts(session, org.id, version, ids, visible=plan)
    assert out[ann.id].language == "en" and out[ann.id].subject == "Your upcoming visit"
    assert "Hello Ann." in out[ann.id].html and "See you " in out[ann.id].html and "Diabetes" not in out[ann.id].html
    assert out[rosa.id].language == "es" and out[rosa.id].subject == "Su próxima visita"
    assert "Hola Rosa." in out[rosa.id].html and "Clase de diabetes en mayo" in out[rosa.id].html
    local = clock.aware(visit).astimezone(helpers.ZoneInfo("America/Mexico_City"))
    assert helpers.format_date(local.date(), format="full", locale="es") in out[rosa.id].html
    assert out[bob.id].language == "en" and "Hello Bob." in out[bob.id].html and "See you" not in out[bob.id].html
    # The text part is made from the HTML when the template has none.
    assert "Hola Rosa." in out[rosa.id].text and "<p>" not in out[rosa.id].text
    assert out[rosa.id].version_id == version.id

    # Masked for a viewer without phi:read_unmasked.
    masked = templates.render_for_contacts(session, org.id, version, [rosa.id], masked=True)
    assert "Rosa" not in masked[rosa.id].html and "***" in masked[rosa.id].html


def test_observations_and_medications(session, org):
    rosa = _contact(session, org.id, "Rosa", "Díaz", language="es", tz="America/Mexico_City")
    _fact(session, org.id, rosa.id, "observations", code_system="loinc", code="4548-4", value_quantity=7.9,
          value_unit="%", effective_at=clock.now() - timedelta(days=90))
    _fact(session, org.id, rosa.id, "observations", code_system="loinc", code="4548-4", value_quantity=6.8,
          value_unit="%", effective_at=clock.now() - timedelta(days=3))
    _fact(session, org.id, rosa.id, "medications", code_system="rxnorm", code="860975", display="Metformin 500 mg",
          status="active", next_refill_due=date(2027, 1, 15))
    session.flush()
    body = TemplateIn(**_template(variants={}, html='<p>{{ last_observation("loinc:4548-4").value }}'
                                  '{{ last_observation("loinc:4548-4").unit }} {{ refill_due.name }} {{ refill_due.date }}'
                                  '{% for m in active_medications %}[{{ m.name }}]{% endfor %}</p>'))
    template = templates.create_template(session, org.id, body)
    version = templates.current_version(session, template)
    assert templates.needs_of(version).observation_codes == {"loinc:4548-4"}
    out = templates.render_for_contacts(session, org.id, version, [rosa.id])[rosa.id]
    assert "6.8%" in out.html and "Metformin 500 mg" in out.html and "15 de enero de 2027" in out.html
    assert "[Metformin 500 mg]" in out.html
    session.rollback()


# --------------------------------------------------------------------------- MJML, CSS, lint


def test_mjml_compiles_inlines_css_and_keeps_template_tags(session, org):
    body = TemplateIn(**_template(variants={}, source_format="mjml", html="", mjml=MJML))
    template = templates.create_template(session, org.id, body)
    version = templates.current_version(session, template)
    assert version.mjml == MJML and "<mj-" not in version.html and "{{ first_name }}" in version.html
    assert "fonts.googleapis" not in version.html
    out = templates.render_version(version, {"first_name": "Ann", "next_appointment": None})
    assert "Hello Ann." in out.html and 'color: #0a5' in out.html.replace("color:#0a5", "color: #0a5")
    assert "Hello Ann." in out.text
    assert version.lint == []
    session.rollback()


def test_spam_and_size_lint():
    assert [w["code"] for w in authoring.lint('<img src="https://x.example/a.png">')] == ["image_without_alt", "image_only"]
    big = "<p>" + "word " * 25_000 + "</p>"
    assert [w["code"] for w in authoring.lint(big)] == ["gmail_clip"]
    links = "<p>Buy</p>" + "".join(f'<a href="https://x.example/{i}">x</a>' for i in range(10))
    assert "link_ratio" in [w["code"] for w in authoring.lint(links)]
    assert authoring.lint("<p>" + "Plain words of a caring message. " * 10 + '<a href="https://x.example">one link</a></p>') == []


# --------------------------------------------------------------------------- preview as a contact


def test_preview_as_a_contact_is_audited_and_masked_per_permission(client, session, org):
    from carepost.audit.models import AuditEvent

    manage = _headers(session, org.id, ["templates:manage"])
    tid = client.post("/api/v1/templates", json=_template(), headers=manage).json()["id"]
    session.rollback()
    rosa = _contact(session, org.id, "Rosa", "Díaz", language="es", tz="America/Mexico_City")
    session.commit()
    masked_viewer = _headers(session, org.id, ["templates:manage", "phi:read_masked"])
    full_viewer = _headers(session, org.id, ["templates:manage", "phi:read_unmasked"])

    r = client.post(f"/api/v1/templates/{tid}/preview", json={"contact_id": rosa.id}, headers=manage)
    assert r.status_code == 403 and r.json()["error"]["field"] == "contact_id"
    r = client.post(f"/api/v1/templates/{tid}/preview", json={"contact_id": rosa.id}, headers=masked_viewer)
    assert r.status_code == 200, r.text
    assert r.json()["masked"] is True and "Rosa" not in r.json()["html"] and r.json()["language"] == "es"
    r = client.post(f"/api/v1/templates/{tid}/preview", json={"contact_id": rosa.id, "language": "en"}, headers=full_viewer)
    assert r.json()["masked"] is False and "Hello Rosa." in r.json()["html"]
    r = client.post(f"/api/v1/templates/{tid}/preview", json={"contact_id": rosa.id, "language": "zz-bad"}, headers=full_viewer)
    assert r.status_code == 422 and r.json()["error"]["field"] == "language"
    r = client.post(f"/api/v1/templates/{tid}/preview", json={"contact_id": "0" * 32}, headers=full_viewer)
    assert r.status_code == 404 and r.json()["error"]["field"] == "contact_id"
    session.rollback()
    events = session.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id, AuditEvent.action == "template.preview")
                             .order_by(AuditEvent.seq)).all()
    assert [(e.target_id, e.details["masked"]) for e in events] == [(rosa.id, True), (rosa.id, False)]
    assert "Rosa" not in str([e.details for e in events])


def test_consent_helper_lists_the_topics_a_contact_subscribes_to(session, org):
    from carepost.consent import service as consent

    rosa = _contact(session, org.id, "Rosa", "Díaz", language="es")
    news = consent.create_topic(session, org.id, key="news", name="Clinic news", double_opt_in=False)
    consent.create_topic(session, org.id, key="events", name="Events", double_opt_in=False)
    consent.resubscribe_contact(session, org.id, rosa.id, news.id, source="api", confirmed=True)
    session.flush()
    body = TemplateIn(**_template(variants={}, purpose="marketing",
                                  html="<p>Hi {{ first_name }}: {% for t in subscribed_topics %}[{{ t.name }}]{% endfor %}</p>"))
    template = templates.create_template(session, org.id, body)
    version = templates.current_version(session, template)
    out = templates.render_for_contacts(session, org.id, version, [rosa.id])[rosa.id]
    assert "Hi Rosa: [Clinic news]</p>" in out.html
    session.rollback()


def test_the_text_part_made_from_html_keeps_paragraphs_lists_and_link_targets():
    html = ('<html><head><title>T</title><style>p{color:red}</style></head><body><p>Hello Ann &amp; Co,</p>'
            '<p>See <a href="https://x.example/a?b=1&amp;c=2">your portal</a>.</p><ul><li>One</li><li>Two</li></ul>'
            '<table><tr><td>A</td><td>B</td></tr></table>End <a href="https://y.example">https://y.example</a></body></html>')
    assert authoring.text_from_html(html) == ("Hello Ann & Co,\nSee your portal (https://x.example/a?b=1&c=2).\n\n"
                                              "- One\n- Two\nA B\n\nEnd https://y.example\n")
