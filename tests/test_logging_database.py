"""Issue 9 item 5: SQL parameters (PHI) never reach a log line through a database error.

A failing statement carrying a diagnosis, a birth date and a city is forced on the real engine
(SQLCipher and PostgreSQL); its exception is logged the ways the product logs errors (structlog,
the standard library as uvicorn does, SQLAlchemy's own statement log) and every captured line
is scanned.
"""

from __future__ import annotations

import io
import logging
import re
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError

from carepost.core.logging import configure_logging, get_logger

DIAGNOSIS = "Hereditary angioedema type III flare"
CITY = "Poughkeepsie-Xanadu"
BIRTH = date(1961, 4, 12)
PHI = [DIAGNOSIS, "angioedema", CITY, "Xanadu", "1961-04-12", "1961, 4, 12", "datetime.date(1961"]


def _force_failing_insert() -> DBAPIError:
    """An INSERT whose parameters carry PHI and which the database refuses (unknown org)."""
    from carepost.core.database import system_session
    from carepost.core.ids import new_id
    from carepost.patients.models import Condition, Contact

    missing_org = "f" * 32
    with system_session() as s:
        contact = Contact(id=new_id(), org_id=missing_org, city=CITY, birth_date=BIRTH)
        s.add(contact)
        s.add(Condition(org_id=missing_org, contact_id=contact.id, code="D84.1", display=DIAGNOSIS,
                        code_system="icd10cm"))
        try:
            s.flush()
        except DBAPIError as exc:  # IntegrityError: the foreign key to organizations fails
            s.rollback()
            return exc
    raise AssertionError("the statement was expected to fail")


def test_every_engine_hides_parameters(db):
    from carepost.core.database import get_engine, make_engine

    assert get_engine().hide_parameters is True
    engine = make_engine()
    try:
        assert engine.hide_parameters is True
    finally:
        engine.dispose()


def test_no_engine_is_created_outside_make_engine():
    """migrations/env.py, doctor and the CLI all go through core.database.make_engine."""
    src = Path(__file__).resolve().parents[1] / "src" / "carepost"
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "database.py" and path.parent.name == "core":
            continue
        if re.search(r"\bcreate_(async_)?engine\(|engine_from_config\(", path.read_text()):
            offenders.append(str(path.relative_to(src)))
    assert offenders == []


def test_a_failing_statement_with_phi_leaves_no_phi_in_any_log_line(db):
    stream = io.StringIO()
    configure_logging("DEBUG", json=True, stream=stream)
    engine_logger = logging.getLogger("sqlalchemy.engine")
    previous = engine_logger.level
    engine_logger.setLevel(logging.INFO)  # SQLAlchemy's statement log ("echo") too
    try:
        exc = _force_failing_insert()
        assert isinstance(exc, IntegrityError)
        # The exception text itself no longer quotes the parameters.
        assert "parameters hidden" in str(exc)
        for value in PHI:
            assert value not in str(exc), value
        # As the product logs it: structlog with a traceback, uvicorn's "Exception in ASGI
        # application", and a plain message with the exception text.
        try:
            raise exc
        except DBAPIError:
            get_logger("carepost.test").exception("database_error")
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        logging.getLogger("carepost.test").error("write failed: %s", exc)
    finally:
        engine_logger.setLevel(previous)
    text = stream.getvalue()
    lines = [line for line in text.splitlines() if line.strip()]
    assert any("IntegrityError" in line for line in lines)
    assert any("INSERT INTO" in line for line in lines), "the statement log was captured"
    for line in lines:
        for value in PHI:
            assert value not in line, f"{value!r} leaked: {line}"


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    from carepost.core.config import get_settings

    configure_logging(get_settings().log_level, get_settings().log_json)
