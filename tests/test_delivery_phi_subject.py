"""Issue 9 item 9: the PHI lint runs on every subject of a message marked as carrying PHI —
raw API messages and batches here, SMTP submission in tests/test_delivery_submission.py —
and the refusal names the kind of finding and the field, never the text."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from carepost.content import phi_lint
from carepost.delivery.models import Message

BODY = "Your HbA1c is 7.9 %; please call about your insulin dose."


@pytest.mark.parametrize("subject,kind", [
    ("Your biopsy result from Dr. Quill", "clinical term"),
    ("HIV test follow-up", "clinical term"),
    ("Pat, about your appointment", "recipient's name"),
    ("Note for jordan.vale@example.org", "email address"),
    ("Your visit on 03/12/2026", "a date"),
    ("Your visit on March 12", "a date"),
    ("Born 1980-01-02", "a date"),
    ("MRN 88441130", "identify a person"),
    ("Call us about 555-867-5309", "identify a person"),
    ("SSN 123-45-6789 on file", "identify a person"),
])
def test_lint_finds_phi_in_subjects(subject, kind):
    found = phi_lint.findings(subject, names=["Pat Doe"])
    assert any(kind in f for f in found), (subject, found)


@pytest.mark.parametrize("subject", [
    "Your lab result", "Your results are ready", "A message from your care team", "Your appointment",
    "Flu clinic opens in 2026", "Secure message", "From your care team",
])
def test_lint_allows_generic_subjects(subject):
    assert phi_lint.findings(subject, names=["Pat Doe", "Jordan Vale"]) == []


@pytest.fixture
def api(delivery_env, sender, delivery_queue, client):
    return client, sender.key()


def _body(**over):
    body = {"from": "Bar Clinic <care@bar.example>", "to": ["Pat Doe <pat@plain.test>"], "subject": "Your lab result",
            "text": BODY}
    body.update(over)
    return body


def test_raw_api_refuses_phi_in_the_subject_naming_the_field_not_the_text(api, session):
    client, key = api
    for subject in ("Your biopsy result", "Pat, your results", "Results for 03/12/2026", "MRN 88441130"):
        r = client.post("/api/v1/messages", json=_body(subject=subject), headers=key)
        assert r.status_code == 422, (subject, r.text)
        assert "subject" in r.text and "biopsy" not in r.text and "88441130" not in r.text and "03/12" not in r.text
    # Batches too, naming the message's index.
    r = client.post("/api/v1/messages/batch", json={"messages": [_body(), _body(subject="Your chemotherapy plan")]},
                    headers=key)
    assert r.status_code == 422 and "messages.1.subject" in r.text, r.text
    session.rollback()
    assert session.scalars(select(Message)).all() == []
    # A generic subject passes; a message marked as carrying no PHI is not linted.
    assert client.post("/api/v1/messages", json=_body(), headers=key).status_code == 202
    r = client.post("/api/v1/messages", json=_body(subject="Flu shots on 10/14", contains_phi=False, text="Walk in."),
                    headers=key)
    assert r.status_code == 202, r.text
