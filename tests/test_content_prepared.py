"""What rendering a version needs that depends only on its text is worked out once and kept
(``content.service.prepare_version``): a campaign's batch no longer parses the template for every
batch nor picks the language variant for every recipient. These tests hold the cache to the
behaviour it replaced: a new version (or changed text under the same id) is never served from an
older entry, languages and block sets still render per recipient, each render keeps its own
sandbox budget and output limit, the cache is bounded, and a version is parsed once. A part with
no template tag (a subject without merge fields) is not run through Jinja per recipient: its
text is what Jinja would have produced, limits and the single-line rule included."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carepost.content import rendering
from carepost.content import service as templates
from carepost.content.models import MessageTemplateVersion
from carepost.content.rendering import TemplateSecurityError
from carepost.content.schemas import TemplateIn

BLOCK = "{% block_if 'has condition icd10cm:E11.*' %}<p>Diabetes class in May.</p>{% endblock_if %}"


@pytest.fixture(autouse=True)
def _empty_cache():
    templates.clear_prepared_versions()
    yield
    templates.clear_prepared_versions()


def _contact(session, org_id, given, *, language=None):
    from carepost.patients import service as patients

    return patients.save_contact(session, org_id, {"given_name": given, "family_name": "Lee",
                                                   "preferred_language": language}).contact


def _body(**overrides) -> TemplateIn:
    body = {"name": "Reminder", "subject": "Your visit", "preheader": "", "text": "", "purpose": "treatment",
            "language": "en", "html": "<p>Hello {{ first_name }}.</p>" + BLOCK,
            "variants": {"es": {"subject": "Su visita",
                                "html": "<p>Hola {{ first_name }}.</p>" + BLOCK.replace("Diabetes class in May",
                                                                                       "Clase de diabetes")}}}
    body.update(overrides)
    return TemplateIn(**body)


def _version(**overrides) -> MessageTemplateVersion:
    values = dict(template_id="t", version=1, name="x", source_format="html", mjml="", subject="s", preheader="",
                  html="<p>{{ first_name }}</p>", text="", from_name="", portal_notice="", language="en",
                  variants={}, contains_phi=True, purpose="treatment", data_uses=None)
    values.update(overrides)
    return MessageTemplateVersion(**values)


def test_a_new_version_is_never_served_from_the_old_entry(session, org):
    ann = _contact(session, org.id, "Ann")
    template = templates.create_template(session, org.id, _body())
    v1 = templates.current_version(session, template)
    assert "Hello Ann." in templates.render_for_contacts(session, org.id, v1, [ann.id])[ann.id].html

    templates.update_template(session, template, _body(html="<p>Good morning {{ first_name }}.</p>"))
    v2 = templates.current_version(session, template)
    assert v2.id != v1.id
    html2 = templates.render_for_contacts(session, org.id, v2, [ann.id])[ann.id].html
    assert "Good morning Ann." in html2 and "Hello" not in html2
    # The old version still renders its own text (campaigns keep the version they were approved with).
    html1 = templates.render_for_contacts(session, org.id, v1, [ann.id])[ann.id].html
    assert "Hello Ann." in html1 and "Good morning" not in html1

    # Text different under the same id (an unsaved legacy version, a row changed behind our back):
    # the text hash is part of the key, so the changed text is what renders.
    session.expunge(v2)
    v2.html = "<p>Changed {{ last_name }}</p>"
    out = templates.render_for_contacts(session, org.id, v2, [ann.id])[ann.id]
    assert out.html.startswith("<p>Changed Lee</p>")
    assert "last_name" in templates.prepare_version(v2).needs.helpers  # (first_name: the es variant's)
    session.rollback()


def test_languages_and_block_sets_still_render_per_recipient(session, org):
    template = templates.create_template(session, org.id, _body())
    version = templates.current_version(session, template)
    people = {name: _contact(session, org.id, name, language=lang)
              for name, lang in (("Ann", "en-US"), ("Rosa", "es-MX"), ("Luz", "es"), ("Marc", "fr"), ("Bo", None),
                                 ("Eva", "es-MX"))}
    session.flush()
    ids = [c.id for c in people.values()]
    (key,) = templates.version_blocks(version)
    shown = {people["Rosa"].id, people["Bo"].id}
    visible = {cid: frozenset({key}) if cid in shown else frozenset() for cid in ids}
    out = templates.render_for_contacts(session, org.id, version, ids, visible=visible)

    want_lang = {"Ann": "en", "Rosa": "es", "Luz": "es", "Marc": "en", "Bo": "en", "Eva": "es"}
    for name, contact in people.items():
        r = out[contact.id]
        assert r.language == want_lang[name], name
        greeting = "Hola" if want_lang[name] == "es" else "Hello"
        assert f"{greeting} {name}." in r.html, name
        assert r.subject == ("Su visita" if want_lang[name] == "es" else "Your visit")
        block = "Clase de diabetes" if want_lang[name] == "es" else "Diabetes class in May"
        assert (block in r.html) == (contact.id in shown), name
    # Same language, different block sets: different bodies (Rosa sees it, Eva does not).
    assert "Clase de diabetes" in out[people["Rosa"].id].html and "Clase" not in out[people["Eva"].id].html
    # A fixed language for the whole call (preview) overrides each contact's.
    forced = templates.render_for_contacts(session, org.id, version, ids, visible=visible, language="es")
    assert {r.language for r in forced.values()} == {"es"}
    session.rollback()


def test_each_render_keeps_its_own_budget_and_output_limit(session, org):
    # Three nested loops over the name: 50 letters are 125,000 iterations, within one render's
    # budget of 200,000; three such contacts in one call must all render (the budget is per
    # render, not per prepared version), and 60 letters (216,000) must be refused.
    loops = ("{% for a in first_name %}{% for b in first_name %}{% for c in first_name %}x"
             "{% endfor %}{% endfor %}{% endfor %}")
    template = templates.create_template(session, org.id, _body(html=f"<p>{loops}</p>", variants={}))
    version = templates.current_version(session, template)
    fine = [_contact(session, org.id, "a" * 50) for _ in range(3)]
    runaway = _contact(session, org.id, "b" * 60)
    session.flush()
    out = templates.render_for_contacts(session, org.id, version, [c.id for c in fine])
    assert all(out[c.id].html.count("x") == 125_000 for c in fine)
    with pytest.raises(TemplateSecurityError) as exc:
        templates.render_for_contacts(session, org.id, version, [runaway.id])
    assert exc.value.field == "template.html" and "too much work" in exc.value.message

    # Output size: 10 letters print 10,000 names (100,000 characters); 40 letters would print
    # 2,560,000 names, past the HTML limit of 1 MiB: refused though the same version rendered before.
    big = ("{% for a in first_name %}{% for b in first_name %}{% for c in first_name %}{{ first_name }}"
           "{% endfor %}{% endfor %}{% endfor %}")
    template = templates.create_template(session, org.id, _body(name="Big", html=f"<p>{big}</p>", variants={}))
    version = templates.current_version(session, template)
    short, long = _contact(session, org.id, "c" * 10), _contact(session, org.id, "d" * 40)
    session.flush()
    assert len(templates.render_for_contacts(session, org.id, version, [short.id])[short.id].html) > 10_000
    with pytest.raises(TemplateSecurityError) as exc:
        templates.render_for_contacts(session, org.id, version, [long.id])
    assert exc.value.field == "template.html" and "longer than" in exc.value.message
    session.rollback()


def test_a_version_is_parsed_once_not_per_batch(session, org, monkeypatch):
    template = templates.create_template(session, org.id, _body())
    version = templates.current_version(session, template)
    ann = _contact(session, org.id, "Ann", language="es")
    session.flush()
    templates.render_for_contacts(session, org.id, version, [ann.id])  # prepares (and compiles) it
    calls = []
    real = rendering.parse
    monkeypatch.setattr(rendering, "parse", lambda part, source: calls.append(part) or real(part, source))
    for _ in range(3):
        out = templates.render_for_contacts(session, org.id, version, [ann.id])
        assert "Hola Ann." in out[ann.id].html
    assert calls == []
    session.rollback()


def test_the_cache_is_bounded_and_holds_read_only_text(monkeypatch):
    monkeypatch.setattr(templates, "PREPARED_VERSIONS", 2)
    versions = [_version(id=f"{i:032x}", html=f"<p>{i} {{{{ first_name }}}}</p>") for i in range(3)]
    prepared = [templates.prepare_version(v) for v in versions]
    assert len(templates._prepared) == 2
    assert all(key[0] != versions[0].id for key in templates._prepared)  # the least recently used went
    assert templates.prepare_version(versions[2]) is prepared[2]  # still kept: the same object
    assert templates.prepare_version(versions[0]) is not prepared[0]  # made again
    with pytest.raises(TypeError):
        prepared[2].languages["en"]["html"] = "<p>swapped</p>"  # shared by every render: never mutable
    with pytest.raises(TypeError):
        prepared[2].languages["fr"] = {}
    assert templates.render_version(versions[2], {"first_name": "Ann"}).html == "<p>2 Ann</p>"


def _through_jinja(part: str, source: str) -> str:
    """What the sandbox renders for ``source`` (the path every part took before)."""
    text = "".join(rendering._env(part).from_string(rendering.parse(part, source)).generate({}))
    return rendering._single_line(text) if part in rendering.HEADER_PARTS else text


@settings(max_examples=300, deadline=None)
@given(part=st.sampled_from(rendering.PARTS),
       source=st.text(alphabet=st.sampled_from(list("ab{}%#<>&\"' \r\n\té—\u2028")), max_size=40))
def test_a_part_without_tags_renders_as_jinja_would(part, source):
    static = rendering._static_text(part, source)
    if any(tag in source for tag in ("{{", "{%", "{#")):
        assert static is None
        return
    if part in rendering.HEADER_PARTS and ("\r" in source or "\n" in source):
        assert static is None  # the parser's refusal, naming the field, is kept
        with pytest.raises(rendering.ValidationFailed) as exc:
            rendering.render_part(part, source, {})
        assert exc.value.field == f"template.{part}"
        return
    assert static is not None
    assert rendering.render_part(part, source, {}) == (_through_jinja(part, source) if source else "")


def test_a_static_part_keeps_the_output_limit_and_is_not_rendered(monkeypatch):
    assert rendering.render_part("html", "<p>x</p>\r\n" * 3, {}) == "<p>x</p>\n" * 3
    assert rendering.render_part("subject", "  Flu shots this week ", {}) == "Flu shots this week"
    with pytest.raises(TemplateSecurityError) as exc:
        rendering.render_part("subject", "s" * (rendering.MAX_OUTPUT["subject"] + 1), {})
    assert exc.value.field == "template.subject" and "longer than" in exc.value.message
    with pytest.raises(TemplateSecurityError):
        rendering.render_part("text", "t" * (rendering.MAX_OUTPUT["text"] + 1), {})
    # A static part never reaches the sandbox; a part with a tag always does.
    monkeypatch.setattr(rendering, "_compiled", lambda part, source: pytest.fail("rendered through Jinja"))
    assert rendering.render_part("subject", "Your visit", {"first_name": "Ann"}) == "Your visit"
    monkeypatch.undo()
    assert rendering.render_part("subject", "Hi {{ first_name }}", {"first_name": "Ann"}) == "Hi Ann"
