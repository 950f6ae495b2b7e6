"""Logs never carry PHI or secrets: structlog events and standard-library records (uvicorn,
SQLAlchemy, Huey) go through the same redaction, proven by capturing the real output."""

from __future__ import annotations

import io
import json
import logging

import pytest

from carepost.core.logging import REDACTED, configure_logging, get_logger

EMAIL = "jane.doe@example.org"
SSN = "123-45-6789"
PHONE = "(555) 867-5309"
BIRTH_DATE = "1961-04-12"
NAME = "Jane Quinlan-Doe"
BEARER = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.sig"
API_SECRET = "cp_sk_9f8e7d6c5b4a39281706"
PHI_VALUES = [EMAIL, SSN, "867-5309", BIRTH_DATE, NAME, "Quinlan", "eyJhbGciOiJIUzI1NiJ9", API_SECRET]


@pytest.fixture
def captured():
    stream = io.StringIO()
    configure_logging("DEBUG", json=True, stream=stream)
    yield stream
    from carepost.core.config import get_settings

    configure_logging(get_settings().log_level, get_settings().log_json)


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def assert_clean(text: str) -> None:
    for value in PHI_VALUES:
        assert value not in text, f"{value!r} leaked into the log: {text}"


def test_sensitive_keys_are_dropped_whatever_their_value(captured):
    get_logger("t").info(
        "contact_imported",
        contact_id="0" * 32,
        email=EMAIL,
        given_name="Jane",
        family_name="Quinlan-Doe",
        display_name=NAME,
        ssn=SSN,
        phone=PHONE,
        birth_date=BIRTH_DATE,
        mrn="MRN-44812",
        subject="Your biopsy results",
        authorization=BEARER,
        password="correct horse battery staple",
        recipient_email=EMAIL,
        rows_count=3,
    )
    [line] = lines(captured)
    event = json.loads(line)
    assert_clean(line)
    for key in ("email", "given_name", "family_name", "display_name", "ssn", "phone", "birth_date", "mrn",
                "subject", "authorization", "password", "recipient_email"):
        assert event[key] == REDACTED, key
    assert "MRN-44812" not in line and "biopsy" not in line and "horse" not in line
    # References and counts stay: logs must still be useful.
    assert event["contact_id"] == "0" * 32 and event["rows_count"] == 3 and event["event"] == "contact_imported"


def test_phi_looking_values_are_scrubbed_under_innocent_keys(captured):
    get_logger("t").warning(
        "delivery_failed",
        reason=f"rejected {EMAIL}; callback {PHONE}; ssn {SSN}; born {BIRTH_DATE}",
        headers={"x-debug": BEARER, "x-key": API_SECRET},
        attempts=[f"to {EMAIL}", 2],
    )
    [line] = lines(captured)
    assert_clean(line)
    assert line.count(REDACTED) >= 6


def test_nested_structures_are_scrubbed_by_key_and_value(captured):
    get_logger("t").info("payload", patient={"name": {"given": "Jane"}, "telecom": [{"value": EMAIL}], "id": "p1"})
    [line] = lines(captured)
    assert_clean(line)
    assert json.loads(line)["patient"]["name"] == REDACTED
    assert json.loads(line)["patient"]["id"] == "p1"


def test_free_text_event_names_are_scrubbed(captured):
    get_logger("t").info(f"sent reminder to {EMAIL} at {PHONE}")
    assert_clean(captured.getvalue())


def test_exception_tracebacks_are_scrubbed_in_structlog(captured):
    try:
        raise ValueError(f"no contact with email {EMAIL} and ssn {SSN}")
    except ValueError:
        get_logger("t").exception("lookup_failed")
    text = captured.getvalue()
    assert "ValueError" in text
    assert_clean(text)


def test_standard_library_records_are_scrubbed(captured):
    logging.getLogger("uvicorn.error").warning("login failed for %s from %s", EMAIL, PHONE)
    logging.getLogger("sqlalchemy.engine").info("params: ('%s', '%s')", SSN, BIRTH_DATE)
    logging.getLogger("huey").info("Executing task with %s", BEARER)
    text = captured.getvalue()
    assert "login failed for" in text and "Executing task" in text
    assert_clean(text)


def test_standard_library_tracebacks_are_scrubbed(captured):
    try:
        raise RuntimeError(f"constraint failed for {EMAIL} ({SSN})")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    text = captured.getvalue()
    assert "RuntimeError" in text and "Exception in ASGI application" in text
    assert_clean(text)


def test_a_broken_format_string_does_not_crash_logging(captured):
    logging.getLogger("carepost.test").error("bad format %s %s", EMAIL)
    assert_clean(captured.getvalue())


def test_console_renderer_is_scrubbed_too():
    stream = io.StringIO()
    configure_logging("INFO", json=False, stream=stream)
    try:
        get_logger("t").info("sent", email=EMAIL, note=f"call {PHONE}")
    finally:
        from carepost.core.config import get_settings

        configure_logging(get_settings().log_level, get_settings().log_json)
    assert_clean(stream.getvalue())
    assert "sent" in stream.getvalue()


def test_request_errors_in_the_app_log_no_phi(db, captured):
    """An unhandled error in a route logs its type and route template, not the path or message."""
    from fastapi import APIRouter, Depends
    from fastapi.testclient import TestClient

    from carepost.accounts.access import public
    from carepost.app import create_app

    app = create_app()
    configure_logging("DEBUG", json=True, stream=captured)  # create_app reconfigures logging
    router = APIRouter()

    @router.get("/api/v1/_probe/contacts/{ref}", dependencies=[Depends(public("test probe"))])
    def fail(ref: str) -> dict:
        raise KeyError(f"{EMAIL} {SSN}")

    app.include_router(router)
    response = TestClient(app, raise_server_exceptions=False).get(f"/api/v1/_probe/contacts/{EMAIL}")
    assert response.status_code == 500
    text = captured.getvalue()
    assert "unhandled_error" in text and "/api/v1/_probe/contacts/{ref}" in text
    assert_clean(text)
