"""Issue 9 item 28, patterns on constrained strings: the live OpenAPI document states the format
of ids, topic references, form keys and addresses, and colours as ``pattern``, and the API refuses
a value that does not match with 422 naming the field (the schemathesis run in
tests/test_openapi_fuzz.py then generates values from these patterns)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from carepost.accounts import credentials as creds
from carepost.core.ids import ID_PATTERN, TOPIC_REF_PATTERN, new_id


@pytest.fixture
def document(app):
    return TestClient(app).get("/api/v1/openapi.json").json()


def _string(schema: dict) -> dict:
    """The string branch of a property (``anyOf: [string, null]`` for optional fields)."""
    if schema.get("type") == "array":
        return _string(schema["items"])
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            return branch
    raise AssertionError(schema)


STATED = {
    ("AuthorizationIn", "contact_id"): ID_PATTERN,
    ("AuthorizationIn", "text_id"): ID_PATTERN,
    ("AuthorizationIn", "topic_id"): TOPIC_REF_PATTERN,
    ("EligibilityIn", "contact_ids"): ID_PATTERN,
    ("EligibilityIn", "topic"): TOPIC_REF_PATTERN,
    ("FieldDef", "key"): r"^[a-z][a-z0-9_]{0,39}$",
    ("FieldDef", "topic_id"): TOPIC_REF_PATTERN,
    ("FormIn", "slug"): None,
    ("BrandingIn", "primary_color"): None,
    ("BrandingIn", "accent_color"): None,
    ("TopicIn", "key"): None,
    ("ValueSetIn", "key"): None,
    ("AttributeDefinitionIn", "key"): None,
}


def test_the_document_states_patterns_on_constrained_strings(document):
    schemas = document["components"]["schemas"]
    for (model, field), expected in STATED.items():
        prop = schemas[model]["properties"][field]
        # On the string itself, or beside anyOf [string, null] (JSON Schema applies it to strings only).
        stated = _string(prop).get("pattern") or prop.get("pattern")
        assert stated, (model, field)
        if expected:
            assert stated == expected, (model, field)
        re.compile(stated)  # a pattern Python (and ECMA-262) reads
    colour = re.compile(_string(schemas["BrandingIn"]["properties"]["primary_color"])["pattern"])
    assert colour.match("#0b5cad") and colour.match("#0B5CAD") and colour.match("")
    assert not colour.match("red") and not colour.match("#0b5ca")
    slug = re.compile(schemas["FormIn"]["properties"]["slug"]["pattern"])
    assert slug.match("flu-shots-2026") and not slug.match("-bad") and not slug.match("a b")


@pytest.fixture
def api(app, session, org):
    cred, secret = creds.create_credential(session, org.id, name="Patterns", scopes=["consent:manage", "forms:manage",
                                                                                      "org:manage"])
    session.commit()
    client = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {cred.key_id}.{secret}"
    return client


@pytest.mark.parametrize("path, body, field", [
    ("/api/v1/eligibility", {"contact_ids": [new_id(), "../../etc/passwd"], "purpose": "treatment"}, "contact_ids.1"),
    ("/api/v1/eligibility", {"contact_ids": [new_id()], "purpose": "treatment", "topic": "Flu Shots!"}, "topic"),
    ("/api/v1/authorizations", {"contact_id": "Z" * 32, "purpose": "marketing", "method": "api"}, "contact_id"),
])
def test_a_value_that_breaks_the_stated_pattern_is_refused_naming_the_field(api, path, body, field):
    response = api.post(path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field, response.json()


def test_a_colour_that_breaks_the_pattern_is_refused_and_a_matching_one_is_kept(api):
    refused = api.put("/api/v1/organization/branding", json={"display_name": "Bar", "primary_color": "red"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "primary_color", refused.text
    kept = api.put("/api/v1/organization/branding", json={"display_name": "Bar", "primary_color": "#0B5CAD"})
    assert kept.status_code == 200, kept.text
    assert kept.json()["primary_color"] == "#0b5cad"
