"""Secure forms: builder API, hosted rendering, submission validation, spam protection, encryption
at rest, pending-until-confirmed behaviour, confirmation links, survey results."""

from __future__ import annotations

import base64
import re
import struct
import zlib
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from carepost.accounts import credentials as creds
from carepost.audit.models import AuditEvent
from carepost.core import clock

SCOPES = ("forms:manage", "phi:read_masked", "phi:read_unmasked", "phi:write")

INTAKE = {
    "name": "New patient intake",
    "description": "Tell us about you.",
    "fields": [
        {"key": "email", "type": "email", "label": "Email", "required": True, "contact_field": "email"},
        {"key": "first", "type": "text", "label": "First name", "required": True, "contact_field": "given_name"},
        {"key": "last", "type": "text", "label": "Last name", "contact_field": "family_name"},
        {"key": "phone", "type": "phone", "label": "Phone", "contact_field": "phone"},
        {"key": "born", "type": "date", "label": "Birth date", "contact_field": "birth_date"},
        {"key": "reason", "type": "long_text", "label": "Reason for visit", "phi": True, "max_length": 500},
        {"key": "visit", "type": "choice", "label": "Visit type", "options": ["In person", "Video"], "required": True},
        {"key": "days", "type": "choice", "label": "Days", "options": ["Mon", "Tue", "Wed"], "multiple": True},
    ],
    "notify_emails": ["frontdesk@bar-clinic.test"],
}

SURVEY = {
    "name": "After your visit",
    "kind": "survey",
    "fields": [
        {"key": "overall", "type": "rating", "label": "Overall", "required": True},
        {"key": "wait", "type": "choice", "label": "Wait time", "options": ["Short", "OK", "Long"]},
        {"key": "liked", "type": "choice", "label": "What went well", "options": ["Staff", "Doctor", "Parking"], "multiple": True},
        {"key": "comment", "type": "long_text", "label": "Anything else?"},
        {"key": "private", "type": "choice", "label": "Condition", "options": ["A", "B"], "phi": True},
    ],
}


@pytest.fixture(autouse=True)
def _fresh_limits():
    from carepost.accounts import ratelimit

    ratelimit.reset_limiter()
    yield
    ratelimit.reset_limiter()


@pytest.fixture
def key(session):
    def make(org_id, scopes=SCOPES):
        cred, secret = creds.create_credential(session, org_id, name="Forms test", scopes=list(scopes))
        session.commit()
        return {"Authorization": f"Bearer {cred.key_id}.{secret}"}

    return make


@pytest.fixture
def api(client, org, key):
    headers = key(org.id)

    class Api:
        def create(self, body, publish=True):
            r = client.post("/api/v1/forms", json=body, headers=headers)
            assert r.status_code == 201, r.text
            form = r.json()
            if publish:
                r = client.post(f"/api/v1/forms/{form['id']}/publish", headers=headers)
                assert r.status_code == 200, r.text
                form = r.json()
            return form

        def get(self, path, **kw):
            return client.get(path, headers=headers, **kw)

        def post(self, path, **kw):
            return client.post(path, headers=headers, **kw)

        def put(self, path, **kw):
            return client.put(path, headers=headers, **kw)

        def delete(self, path, **kw):
            return client.delete(path, headers=headers, **kw)

    return Api()


def render_token(html: str) -> str:
    m = re.search(r'name="_rt" value="([^"]+)"', html)
    assert m, "no render token"
    return m.group(1)


def fill(client, form, data: dict, *, wait: float = 5, token: str | None = None, extra: list | None = None):
    """GET the hosted form, let time pass (the minimum fill time), POST the answers."""
    page = client.get(f"/f/{form['public_id']}")
    assert page.status_code == 200, page.text
    clock.advance(timedelta(seconds=wait))
    items = [("_rt", token or render_token(page.text)), ("website", "")]
    for k, v in data.items():
        for one in v if isinstance(v, list) else [v]:
            items.append((k if k.startswith("f_") else f"f_{k}", one))
    items += extra or []
    return post_form(client, f"/f/{form['public_id']}", items)


def post_form(client, url: str, items: list[tuple[str, str]]):
    """POST URL-encoded pairs, repeated names kept (what a browser sends)."""
    return client.post(url, content=urlencode(items), headers={"content-type": "application/x-www-form-urlencoded"},
                       follow_redirects=False)


JANE = {"email": "jane.doe@example.org", "first": "Jane", "last": "Doe", "phone": "555-123-4567", "born": "1980-05-17",
        "reason": "Knee pain since March", "visit": "Video", "days": ["Mon", "Wed"]}


def subs(session, form_id=None):
    from carepost.forms.models import FormSubmission

    session.rollback()
    q = select(FormSubmission).order_by(FormSubmission.created_at)
    if form_id:
        q = q.where(FormSubmission.form_id == form_id)
    return list(session.scalars(q))


def events(session, action):
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                .order_by(AuditEvent.chain, AuditEvent.seq)))


# --------------------------------------------------------------------------- builder API


def test_builder_crud_versions_and_publish(api, client, session):
    r = api.post("/api/v1/forms", json=INTAKE)
    assert r.status_code == 201, r.text
    form = r.json()
    assert form["status"] == "draft" and form["version"] == 1 and form["url"].endswith("/f/" + form["public_id"])
    assert [f["key"] for f in form["fields"]] == [f["key"] for f in INTAKE["fields"]]
    assert form["fields"][1]["phi"] is True  # a name field is PHI whatever the form says
    assert form["fields"][0]["max_length"] if "max_length" in form["fields"][0] else True
    # a draft is not public
    assert client.get(f"/f/{form['public_id']}").status_code == 404
    assert api.post(f"/api/v1/forms/{form['id']}/publish").json()["status"] == "published"
    assert client.get(f"/f/{form['public_id']}").status_code == 200

    changed = {**INTAKE, "name": "Intake", "slug": "intake"}
    r = api.put(f"/api/v1/forms/{form['id']}", json=changed)
    assert r.status_code == 200 and r.json()["version"] == 1  # name and slug are not the definition
    changed["fields"] = INTAKE["fields"][:3]
    r = api.put(f"/api/v1/forms/{form['id']}", json=changed)
    assert r.json()["version"] == 2 and len(r.json()["fields"]) == 3
    assert client.get("/f/intake").status_code == 200
    listed = api.get("/api/v1/forms").json()["data"]
    assert [f["id"] for f in listed] == [form["id"]]

    assert api.post(f"/api/v1/forms/{form['id']}/unpublish").json()["status"] == "unpublished"
    assert client.get("/f/intake").status_code == 404
    assert api.delete(f"/api/v1/forms/{form['id']}").status_code == 204
    assert api.get(f"/api/v1/forms/{form['id']}").status_code == 404
    assert [e.target_id for e in events(session, "form.publish")] == [form["id"]]


BAD_DEFINITIONS = [
    ({"fields": []}, "fields", "at least 1"),
    ({"fields": [{"key": "Bad Key", "type": "text", "label": "x"}]}, "fields.0.key", "lower-case"),
    ({"fields": [{"key": "a", "type": "choice", "label": "x"}]}, "fields.0", "needs options"),
    ({"fields": [{"key": "a", "type": "text", "label": "x", "options": ["1"]}]}, "fields.0", "only choice"),
    ({"fields": [{"key": "a", "type": "text", "label": "x"}, {"key": "a", "type": "text", "label": "y"}]}, "fields.1.key", "Two fields"),
    ({"fields": [{"key": "a", "type": "date", "label": "x", "contact_field": "email"}]}, "fields.0", "needs a field of type email"),
    ({"fields": [{"key": "a", "type": "text", "label": "x", "contact_field": "given_name"}]}, "fields.0.type", "email field"),
    ({"fields": [{"key": "e", "type": "email", "label": "x", "contact_field": "email"}]}, "fields.0.required", "must be required"),
    ({"kind": "survey", "fields": [{"key": "e", "type": "email", "label": "x", "contact_field": "email", "required": True}]},
     "fields.0.contact_field", "survey"),
    ({"fields": [{"key": "a", "type": "rating", "label": "x", "scale": 11}]}, "fields.0.scale", "less than or equal"),
    ({"unknown": 1}, "unknown", "Extra inputs"),
    ({"slug": "Not A Slug!"}, "slug", "lower-case"),
    ({"slug": "confirm"}, "slug", "reserved"),
    ({"notify_emails": ["not an address"]}, "notify_emails.0", "valid email"),
]


def test_builder_refuses_bad_definitions(api, session):
    from carepost.forms.models import Form

    for change, field, reason in BAD_DEFINITIONS:  # one test: each case stores nothing
        r = api.post("/api/v1/forms", json={**INTAKE, **change})
        assert r.status_code == 422, (change, r.text)
        err = r.json()["error"]
        assert err["field"] == field and reason in err["message"], (change, err)
    session.rollback()
    assert session.scalars(select(Form)).all() == []


def test_slugs_are_unique_across_organizations(api, client, session, key):
    from carepost.accounts.service import create_organization

    api.create({**INTAKE, "slug": "sign-up"})
    other = create_organization(session, "Other Clinic")
    session.commit()
    r = client.post("/api/v1/forms", json={**INTAKE, "slug": "sign-up"}, headers=key(other.id))
    assert r.status_code == 409 and r.json()["error"]["field"] == "slug"


def test_forms_api_needs_permission(client, org, key, api):
    form = api.create(INTAKE)
    reader = key(org.id, ("phi:read_masked",))
    assert client.get("/api/v1/forms", headers=reader).status_code == 403
    assert client.get(f"/api/v1/forms/{form['id']}/submissions", headers=key(org.id, ("forms:manage",))).status_code == 403


# --------------------------------------------------------------------------- hosted form


def test_hosted_form_is_accessible_and_strict(api, client):
    form = api.create(INTAKE)
    page = client.get(f"/f/{form['public_id']}")
    assert page.status_code == 200
    html = page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    assert "<script" not in html  # no drawn signature on this form: no script at all
    assert " style=" not in html and "http://" not in html.replace(form["url"], "")
    # every input, select and textarea has a label
    ids = re.findall(r'<(?:input|select|textarea)\b[^>]*\bid="([^"]+)"', html)
    types = re.findall(r'<input\b[^>]*\btype="([^"]+)"', html)
    labelled = set(re.findall(r'<label for="([^"]+)"', html))
    hidden = len([t for t in types if t == "hidden"])
    assert len(re.findall(r"<(?:input|select|textarea)\b", html)) == len(ids) + hidden
    assert set(ids) <= labelled, set(ids) - labelled
    # choice fields are fieldsets with a legend
    assert html.count("<fieldset") == 2 and html.count("<legend>") == 2
    assert 'lang="en"' in html and "Bar Clinic" in html


def test_rendering_escapes_form_text(api, client):
    body = {**INTAKE, "name": "<script>alert(1)</script>", "description": "<img src=x onerror=alert(2)>",
            "fields": [{**INTAKE["fields"][0], "label": '"><b onmouseover=alert(3)>', "help": "<i>hi</i>"},
                       {"key": "visit", "type": "choice", "label": "Visit", "options": ['<svg onload=alert(4)>', "B"]}]}
    form = api.create(body)
    html = client.get(f"/f/{form['public_id']}").text
    for raw in ("<script>alert(1)", "<img src=x", "<b onmouseover", "<i>hi", "<svg onload"):
        assert raw not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;svg onload=alert(4)&gt;" in html


def test_unknown_form_is_404_page(client, db):
    r = client.get("/f/does-not-exist")
    assert r.status_code == 404 and "does not exist" in r.text and "does-not-exist" not in r.text


# --------------------------------------------------------------------------- submissions


def test_new_contact_created_answers_encrypted_and_audited(api, client, session, storage):
    form = api.create(INTAKE)
    r = fill(client, form, JANE)
    assert r.status_code == 303 and r.headers["location"] == f"/f/{form['public_id']}/thanks"
    thanks = client.get(r.headers["location"])
    assert thanks.status_code == 200 and "Thank you" in thanks.text
    [sub] = subs(session)
    assert sub.status == "received" and sub.contact_created and sub.contact_id
    from carepost.patients import service as patients

    session.info.pop("scope", None)
    session.info["org_id"] = sub.org_id
    contact = patients.contact_dict(session, patients.get_contact(session, sub.contact_id))
    assert (contact["given_name"], contact["family_name"], contact["email"], contact["phone"], contact["birth_date"]) == (
        "Jane", "Doe", "jane.doe@example.org", "555-123-4567", "1980-05-17")
    assert contact["source"] == "form"
    # encrypted at rest: no answer appears in any stored row of any table
    assert_not_in_database(session, storage, ["Knee pain since March", "jane.doe@example.org", "555-123-4567", "Doe"])
    [event] = events(session, "form.submission.create")
    assert event.target_id == sub.id and event.actor_type == "anonymous"
    assert "Knee" not in str(event.details) and "jane" not in str(event.details)


def assert_not_in_database(session, storage, values: list[str]) -> None:
    from sqlalchemy import text

    from carepost.core.database import Base

    session.rollback()
    for table in Base.metadata.sorted_tables:
        for row in session.execute(text(f'SELECT * FROM "{table.name}"')):
            blob = " ".join(str(v) for v in row)
            for value in values:
                assert value not in blob, f"{value!r} stored in clear in {table.name}"
    if storage.backend == "sqlite":
        from tests.conftest import read_elsewhere

        raw = read_elsewhere(storage.data_dir / "carepost.db")
        for value in values:
            # Random ciphertext pages contain any given 3-byte string by chance; only values
            # long enough to be meaningful are looked for in the raw encrypted file.
            if len(value) >= 8:
                assert value.encode() not in raw


INVALID_ANSWERS = [
    ({"email": ""}, "email", "required"),
    ({"email": "not-an-address"}, "email", "valid email"),
    ({"first": ""}, "first", "required"),
    ({"first": "x" * 201}, "first", "at most 200"),
    ({"first": "Ja\x00ne"}, "first", "not allowed"),
    ({"phone": "call me"}, "phone", "phone number"),
    ({"born": "17/05/1980"}, "born", "YYYY-MM-DD"),
    ({"born": "2999-01-01"}, "born", "between 1880 and today"),
    ({"visit": "Phone"}, "visit", "options shown"),
    ({"visit": ["Video", "In person"]}, "visit", "more than once"),
    ({"days": ["Mon", "Sun"]}, "days", "options shown"),
    ({"reason": "x" * 501}, "reason", "at most 500"),
    ({"f_surprise": "hello"}, "_form", "does not have"),
]


def test_submission_validation_matrix(api, client, session):
    from carepost.patients.models import Contact

    form = api.create(INTAKE)
    for change, field, message in INVALID_ANSWERS:  # one test: a refused submission stores nothing
        r = fill(client, form, {**JANE, **change})
        assert r.status_code == 422, (change, r.status_code)
        assert message in r.text, change
        if field != "_form":
            # the error is tied to its input and listed in the summary with a link to it
            assert f'id="err-{field}"' in r.text
            assert re.search(rf'aria-describedby="[^"]*err-{field}', r.text)
            assert f'href="#fld-{field}"' in r.text
    assert subs(session) == []
    assert session.scalars(select(Contact)).all() == []


def test_script_in_text_is_stored_inert_and_escaped_everywhere(api, client, session):
    form = api.create(INTAKE)
    payload = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    r = fill(client, form, {**JANE, "reason": payload, "first": "<b>Jane</b>"})
    assert r.status_code == 303
    [sub] = subs(session)
    stored = api.get(f"/api/v1/forms/{form['id']}/submissions/{sub.id}").json()
    assert stored["answers"]["reason"] == payload  # kept exactly as typed, as data
    # an error page re-renders what was typed, escaped
    r = fill(client, form, {**JANE, "reason": payload, "email": "bad"})
    assert r.status_code == 422 and "<script>alert" not in r.text and "&lt;script&gt;alert(&#34;x&#34;)" in r.text


def test_missing_and_extra_fields_in_the_post(api, client, session):
    form = api.create(INTAKE)
    page = client.get(f"/f/{form['public_id']}")
    clock.advance(timedelta(seconds=5))
    # no render token at all
    r = client.post(f"/f/{form['public_id']}", data={"f_email": "a@b.example"}, follow_redirects=False)
    assert r.status_code == 422 and "could not be verified" in r.text
    # a field the form does not have
    r = client.post(f"/f/{form['public_id']}", data={"_rt": render_token(page.text), "f_email": "a@b.example",
                                                    "f_first": "A", "f_visit": "Video", "is_admin": "1"}, follow_redirects=False)
    assert r.status_code == 422 and "does not have: is_admin" in r.text
    # JSON or multipart is refused
    r = client.post(f"/f/{form['public_id']}", json={"f_email": "a@b.example"}, follow_redirects=False)
    assert r.status_code == 415
    r = client.post(f"/f/{form['public_id']}", files={"f_email": ("x.txt", b"a@b.example")}, follow_redirects=False)
    assert r.status_code == 415
    assert subs(session) == []


def test_oversized_submission_is_413(api, client, session, monkeypatch):
    from carepost.core.config import reset_settings

    form = api.create(INTAKE)
    monkeypatch.setenv("CAREPOST_FORM_MAX_SUBMISSION_BYTES", "2048")
    reset_settings()
    r = fill(client, form, {**JANE, "reason": "x" * 4000})
    assert r.status_code == 413 and "more data than it may" in r.text
    monkeypatch.delenv("CAREPOST_FORM_MAX_SUBMISSION_BYTES")
    reset_settings()
    assert subs(session) == []


# --------------------------------------------------------------------------- spam protection


def test_honeypot_answers_like_success_and_stores_nothing(api, client, session):
    form = api.create(INTAKE)
    page = client.get(f"/f/{form['public_id']}")
    clock.advance(timedelta(seconds=5))
    data = [("_rt", render_token(page.text)), ("website", "http://spam.example")] + [(f"f_{k}", v) for k, v in JANE.items() if k != "days"]
    r = post_form(client, f"/f/{form['public_id']}", data)
    assert r.status_code == 303 and r.headers["location"].endswith("/thanks")
    assert subs(session) == []


def test_too_fast_stale_and_forged_render_tokens(api, client, session):
    form = api.create(INTAKE)
    r = fill(client, form, JANE, wait=0.5)
    assert r.status_code == 422 and "faster than a person" in r.text
    assert 'name="_rt"' in r.text  # a fresh token comes with the form again
    r = fill(client, form, JANE, wait=25 * 3600)
    assert r.status_code == 422 and "open too long" in r.text
    page = client.get(f"/f/{form['public_id']}")
    stamp, _, mac = render_token(page.text).partition(".")
    forged = f"{int(stamp) - 60000}.{mac}"
    r = fill(client, form, JANE, token=forged)
    assert r.status_code == 422 and "could not be verified" in r.text
    other = api.create({**INTAKE, "name": "Other"})
    token_of_other = render_token(client.get(f"/f/{other['public_id']}").text)
    r = fill(client, form, JANE, token=token_of_other)
    assert r.status_code == 422 and "could not be verified" in r.text
    assert subs(session) == []


def test_rate_limit_per_ip(api, client, session, monkeypatch):
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_FORM_RATE_LIMIT_PER_IP", "3")
    reset_settings()
    form = api.create(SURVEY)
    for _ in range(3):
        assert fill(client, form, {"overall": "4"}).status_code == 303
    r = fill(client, form, {"overall": "4"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "Too many forms" in r.text
    clock.advance(timedelta(minutes=11))
    assert fill(client, form, {"overall": "4"}).status_code == 303
    monkeypatch.delenv("CAREPOST_FORM_RATE_LIMIT_PER_IP")
    reset_settings()
    assert len(subs(session)) == 4


# --------------------------------------------------------------------------- existing contacts wait for confirmation


@pytest.fixture
def jane(client, org, key):
    r = client.post("/api/v1/contacts", json={"given_name": "Jane", "family_name": "Doe", "email": "jane.doe@example.org",
                                              "phone": "555-000-1111"}, headers=key(org.id))
    assert r.status_code == 201
    return r.json()


def read_contact(api, contact_id):
    return api.get(f"/api/v1/contacts/{contact_id}").json()


def test_existing_contact_is_not_changed_until_confirmed(api, client, session, jane):
    form = api.create(INTAKE)
    r = fill(client, form, {**JANE, "first": "Mallory", "last": "Evil", "phone": "555-999-8888"})
    assert r.status_code == 303
    # the same thank-you page whether or not the address was known (this organization cannot send
    # emails yet, so the page says so rather than promising a confirmation link)
    assert "no confirmation link is on its way" in client.get(r.headers["location"]).text
    [sub] = subs(session)
    assert sub.status == "pending_confirmation" and sub.contact_id == jane["id"] and not sub.contact_created
    assert sub.effects == ["update_contact"]
    before = read_contact(api, jane["id"])
    assert (before["given_name"], before["family_name"], before["phones"]) == ("Jane", "Doe", [{"value": "555-000-1111", "use": None}])

    from carepost.core.database import system_session
    from carepost.forms import service

    with system_session() as s:
        token = service.confirmation_token(s, s.get(type(sub), sub.id))
    page = client.get(f"/f/confirm/{token}")
    assert page.status_code == 200 and "Confirm" in page.text
    assert read_contact(api, jane["id"])["given_name"] == "Jane"  # GET never acts (link scanners)
    r = client.post(f"/f/confirm/{token}")
    assert r.status_code == 200 and "Confirmed" in r.text
    after = read_contact(api, jane["id"])
    assert (after["given_name"], after["family_name"], after["email"]) == ("Mallory", "Evil", "jane.doe@example.org")
    assert [p["value"] for p in after["phones"]] == ["555-999-8888", "555-000-1111"]
    [sub] = subs(session)
    assert sub.status == "confirmed" and sub.outcome["contact_updated"] == ["birth_date", "family_name", "given_name", "phones"]
    # using the link again changes nothing and still answers
    assert client.post(f"/f/confirm/{token}").status_code == 200
    assert len(events(session, "form.submission.confirm")) == 1


def test_confirmation_links_refuse_forgery_and_expiry(api, client, session, jane):
    from carepost.core.database import system_session
    from carepost.forms import service
    from carepost.forms.models import FormSubmission

    form = api.create(INTAKE)
    fill(client, form, {**JANE, "first": "Mallory"})
    [sub] = subs(session)
    with system_session() as s:
        token = service.confirmation_token(s, s.get(FormSubmission, sub.id))
    sid, exp, mac = token.split(".")
    other_id = "0" * 32
    forged = [
        f"{sid}.{exp}.{'A' * len(mac)}",  # wrong MAC
        f"{sid}.{int(exp) + 86400}.{mac}",  # expiry pushed out
        f"{other_id}.{exp}.{mac}",  # another submission
        "garbage", f"{sid}..{mac}", f"{sid}.{exp}",
    ]
    for bad in forged:
        for method in (client.get, client.post):
            r = method(f"/f/confirm/{bad}")
            assert r.status_code == 404 and "not valid" in r.text, (bad, r.status_code)
    clock.advance(timedelta(hours=73))
    for method in (client.get, client.post):
        r = method(f"/f/confirm/{token}")
        assert r.status_code == 410 and "expired" in r.text
    assert read_contact(api, jane["id"])["given_name"] == "Jane"
    from carepost.forms import tasks

    assert tasks.sweep()["expired"] == 1
    assert subs(session)[0].status == "expired"
    assert client.post(f"/f/confirm/{token}").status_code == 410


# --------------------------------------------------------------------------- submissions API and masking


def test_submissions_masked_for_masked_readers_and_audited(api, client, session, org, key):
    masked_key = key(org.id, ("forms:manage", "phi:read_masked"))
    form = api.create(INTAKE)
    fill(client, form, JANE)
    [sub] = subs(session)
    full = api.get(f"/api/v1/forms/{form['id']}/submissions").json()["data"][0]
    assert full["answers"]["reason"] == "Knee pain since March" and full["answers"]["email"] == "jane.doe@example.org"
    assert full["masked"] is False
    masked = client.get(f"/api/v1/forms/{form['id']}/submissions/{sub.id}", headers=masked_key).json()
    assert masked["masked"] is True
    assert masked["answers"]["reason"] == "***" and masked["answers"]["email"] == "j***@example.org"
    assert masked["answers"]["first"] == "J***" and masked["answers"]["born"] == "1980"
    assert masked["answers"]["visit"] == "Video" and masked["answers"]["days"] == ["Mon", "Wed"]  # not PHI
    assert "Knee" not in str(masked)
    reads = events(session, "form.submission.read")
    assert [e.details["view"] for e in reads] == ["masked"]
    assert events(session, "form.submission.list")[0].details["submission_ids"] == [sub.id]


# --------------------------------------------------------------------------- surveys


def test_survey_creates_no_contact_and_aggregates(api, client, session):
    form = api.create(SURVEY)
    answers = [
        {"overall": "5", "wait": "Short", "liked": ["Staff", "Doctor"], "comment": "Great", "private": "A"},
        {"overall": "4", "wait": "OK", "liked": ["Staff"]},
        {"overall": "2", "wait": "Long", "comment": "Slow"},
        {"overall": "4", "wait": "Short", "liked": ["Parking", "Staff"]},
    ]
    for a in answers:
        assert fill(client, form, a).status_code == 303
    from carepost.forms.models import SurveyTally
    from carepost.patients.models import Contact

    assert session.scalars(select(Contact)).all() == []
    assert all(s.status == "received" and s.contact_id is None for s in subs(session))
    results = api.get(f"/api/v1/forms/{form['id']}/results").json()
    assert results["submissions"] == 4
    by_key = {f["key"]: f for f in results["fields"]}
    assert set(by_key) == {"overall", "wait", "liked"}  # free text and PHI-flagged fields are not tallied
    assert by_key["overall"]["average"] == 3.75 and by_key["overall"]["responses"] == 4
    assert [o["count"] for o in by_key["overall"]["distribution"]] == [0, 1, 0, 2, 1]
    assert {o["option"]: o["count"] for o in by_key["wait"]["options"]} == {"Short": 2, "OK": 1, "Long": 1}
    assert {o["option"]: o["count"] for o in by_key["liked"]["options"]} == {"Staff": 3, "Doctor": 1, "Parking": 1}
    # tallies cannot be joined back to a submission
    assert "submission_id" not in SurveyTally.__table__.c
    assert all(t.option != "A" for t in session.scalars(select(SurveyTally)))


# --------------------------------------------------------------------------- drawn signature parsing


def png(width: int, height: int) -> bytes:
    raw = b"".join(b"\x00" + b"\xff" * width * 3 for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_signature_png_checks():
    from carepost.core.errors import ValidationFailed
    from carepost.forms.service import decode_signature_png

    good = png(60, 16)
    assert decode_signature_png("data:image/png;base64," + base64.b64encode(good).decode()) == good
    for bad, reason in [
        ("data:image/jpeg;base64,AAAA", "not a PNG"),
        ("data:image/png;base64,!!!", "could not be read"),
        ("data:image/png;base64," + base64.b64encode(b"GIF89a" + b"\x00" * 40).decode(), "not a PNG"),
        ("data:image/png;base64," + base64.b64encode(png(5000, 1)).decode(), "unexpected size"),
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200_000).decode(), "too large"),
    ]:
        with pytest.raises(ValidationFailed, match=reason):
            decode_signature_png(bad)


def test_status_pages_of_a_form_carry_the_organization_brand(api, client, session, org, monkeypatch):
    """A rate-limited or unreadable submission answers in the organization's name, logo and
    colours, like the form itself (issue 10 item 16)."""
    from carepost.accounts.branding import set_branding, set_logo
    from carepost.core.config import reset_settings
    from carepost.core.database import org_session
    from tests.test_branding import png

    with org_session(org.id) as s:
        set_branding(s, org.id, display_name="Bar Family Clinic", primary_color="#7a1f5c", accent_color=None)
        set_logo(s, org.id, png())
        s.commit()
    monkeypatch.setenv("CAREPOST_FORM_RATE_LIMIT_PER_IP", "1")
    reset_settings()
    form = api.create(SURVEY)
    assert fill(client, form, {"overall": "4"}).status_code == 303
    limited = fill(client, form, {"overall": "4"})
    bad = client.post(f"/f/{form['public_id']}", content=b"x", headers={"Content-Type": "text/plain"})
    for r in (limited, bad):
        assert r.status_code in (429, 415) and "Bar Family Clinic" in r.text
        assert f"/b/{org.id}/logo?v=" in r.text and f"/b/{org.id}/brand.css?v=" in r.text
    monkeypatch.delenv("CAREPOST_FORM_RATE_LIMIT_PER_IP")
    reset_settings()
