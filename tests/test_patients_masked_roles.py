"""Issue 9 item 7: masked roles (read_only, analyst, marketer) cannot re-identify patients.

Before: a masked viewer searched by exact email, phone or MRN (a hit confirms who is a patient
here), read initials, an email domain and the last digits of phone and MRN, the full city and
ZIP, exact timestamps, free-text attributes, and every clinical fact with its code text and exact
dates. Now: identifier search needs ``phi:read_unmasked``; the masked contact shows no direct
identifier, the year at most, ZIP3 and state, no free text; facts only as counts per category.
"""

from __future__ import annotations

import json

from carepost.accounts.permissions import ROLES, Permission
from tests.fixtures.accounts import login_client
from tests.test_patients_api import ALL, MASKED, key  # noqa: F401

JANE = {"external_id": "EHR-77", "given_name": "Jane", "family_name": "Doe", "email": "jane.doe@example.org",
        "birth_date": "1980-05-17", "phone": "555-123-4567", "mrn": "M-10077", "city": "Madison", "state": "WI",
        "postal_code": "53703"}


def test_masked_viewers_cannot_search_by_identifier_nor_read_identifying_details(client, org, key, app,  # noqa: F811
                                                                                 make_user):
    from fastapi.testclient import TestClient

    full, masked = key(org.id), key(org.id, MASKED)
    cid = client.post("/api/v1/contacts", json=JANE, headers=full).json()["id"]
    r = client.post(f"/api/v1/contacts/{cid}/conditions",
                    json={"code_system": "icd10cm", "code": "F32.9", "display": "Major depressive disorder",
                          "onset_date": "2021-03-04"}, headers=full)
    assert r.status_code == 201, r.text
    # Exact identifiers: refused for the masked scope, each naming its field.
    for body, field in (({"email": "jane.doe@example.org"}, "email"), ({"phone": "555-123-4567"}, "phone"),
                        ({"mrn": "M-10077"}, "mrn")):
        r = client.post("/api/v1/contacts/search", json=body, headers=masked)
        assert r.status_code == 403 and r.json()["error"]["field"] == field, r.text
        assert client.post("/api/v1/contacts/search", json=body, headers=full).json()["data"][0]["id"] == cid
    # The masked contact: nothing that identifies.
    hidden = client.get(f"/api/v1/contacts/{cid}", headers=masked).json()
    text = json.dumps(hidden)
    for leak in ("Jane", "Doe", "J***", "example.org", "4567", "10077", "Madison", "53703", "05-17", "EHR"):
        assert leak not in text, leak
    assert hidden["birth_date"] == "1980" and hidden["postal_code"] == "537" and hidden["state"] == "WI"
    assert len(hidden["created_at"]) == 4 and len(hidden["updated_at"]) == 4
    # Clinical facts: a count per category, no code text, no date.
    facts = client.get(f"/api/v1/contacts/{cid}/conditions", headers=masked).json()
    assert facts["data"] == [] and facts["masked"] is True and facts["count"] == 1
    assert list(facts["categories"].values()) == [1] and next(iter(facts["categories"])).startswith("icd10cm")
    assert "F32" not in json.dumps(facts) and "depress" not in json.dumps(facts).lower() and "2021" not in json.dumps(facts)
    assert client.get(f"/api/v1/contacts/{cid}/conditions", headers=full).json()["data"][0]["code"] == "F32.9"
    # The same through a signed-in person of each masked role.
    for role in ("read_only", "analyst", "marketer"):
        assert Permission.PHI_READ_UNMASKED not in ROLES[role]
        c = TestClient(app)
        csrf = login_client(c, make_user(org, role=role))
        r = c.post("/api/v1/contacts/search", json={"email": "jane.doe@example.org"}, headers={"x-csrf-token": csrf})
        assert r.status_code == 403, role
        assert "Jane" not in c.get(f"/api/v1/contacts/{cid}").text


def test_contact_page_sections_show_a_masked_viewer_the_year_at_most():
    """Issue 9 item 7: the lines other capabilities add to the contact page (message history,
    consent, keys) lose exact dates, times and key fingerprints in the masked view."""
    from carepost.patients.masking import mask_summary

    assert mask_summary("2026-03-04 09:15 — treatment: delivered by tls") == "2026 — treatment: delivered by tls"
    assert mask_summary("Marketing authorization — active, signed 2025-11-30") == "Marketing authorization — active, signed 2025"
    assert mask_summary("OpenPGP key 0123ABCD4567EF89…, expires 2027-01-02") == "OpenPGP key ***…, expires 2027"
    assert mask_summary("Unsubscribed from all marketing") == "Unsubscribed from all marketing"
