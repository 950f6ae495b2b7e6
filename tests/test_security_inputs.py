"""Issue 9 item 27: the remaining 500s and loose ends the fuzzing found, each through the real
routes on SQLCipher and PostgreSQL.

* chunked uploads over the limit answer 413 (``/imports``, ``/suppressions/import``);
* checking a sending domain that is deleted meanwhile answers 404 (was a StaleDataError 500);
* template timestamps keep their time zone when read back;
* one attachment allow-list: ``.html`` with script, ``.svg``, macro-enabled Office, ``.js`` are
  refused by the API; a PDF and a clean ``.docx`` pass;
* a subject with control characters is refused at acceptance (templates and messages);
* 401 answers carry ``WWW-Authenticate``.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
import zipfile
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from carepost.accounts import credentials as creds
from tests.test_delivery_api import body
from tests.test_delivery_submission import submission  # noqa: F401 - the real SMTP submission server fixture


def _api(app, session, org_id: str) -> TestClient:
    from carepost.accounts.permissions import API_SCOPES

    cred, secret = creds.create_credential(session, org_id, name="Inputs key", scopes=sorted(API_SCOPES),
                                           rate_limit_per_minute=100_000)
    session.commit()
    client = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {cred.key_id}.{secret}"
    return client


# --------------------------------------------------------------------------- 413 on streamed bodies


@pytest.mark.parametrize("path,content_type", [
    ("/api/v1/imports", "text/csv"),
    ("/api/v1/suppressions/import", "text/csv"),
])
def test_a_chunked_upload_over_the_limit_is_413(db, session, org, path, content_type):
    from carepost.app import create_app
    from carepost.core.config import Settings, get_settings

    app = create_app(Settings(**{**get_settings().model_dump(), "max_upload_bytes": 4096}))
    client = _api(app, session, org.id)

    def chunks():  # no Content-Length: the server only learns the size by counting
        yield b"email\n"
        for i in range(400):
            yield f"person{i}@example.org\n".encode()

    response = client.post(path, content=chunks(), headers={"content-type": content_type})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"


# --------------------------------------------------------------------------- a domain deleted during its check


class _SilentDns:
    """A UDP 'name server' that never answers: every look-up waits for CAREPOST_DNS_TIMEOUT."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


def test_checking_a_domain_deleted_meanwhile_is_404(db, session, org, monkeypatch):
    from carepost.app import create_app
    from carepost.core.config import reset_settings

    dns = _SilentDns()
    try:
        monkeypatch.setenv("CAREPOST_DNS_NAMESERVERS", f"127.0.0.1:{dns.port}")
        monkeypatch.setenv("CAREPOST_DNS_TIMEOUT", "3")
        reset_settings()
        app = create_app()
        client = _api(app, session, org.id)
        created = client.post("/api/v1/domains", json={"domain": "race.example"})
        assert created.status_code == 201, created.text
        domain_id = created.json()["id"]
        answer = {}

        def check():
            answer["response"] = client.post(f"/api/v1/domains/{domain_id}/check")

        worker = threading.Thread(target=check)
        worker.start()
        time.sleep(1.0)  # the check is waiting for DNS now
        assert client.delete(f"/api/v1/domains/{domain_id}").status_code == 204
        worker.join(60)
        assert answer["response"].status_code == 404, answer["response"].text
        assert answer["response"].json()["error"]["code"] == "not_found"
    finally:
        dns.close()
        reset_settings()


# --------------------------------------------------------------------------- template timestamps and subjects


def test_template_timestamps_keep_their_time_zone(app, session, org):
    client = _api(app, session, org.id)
    created = client.post("/api/v1/templates", json={"name": "Zone", "subject": "Hello", "text": "Hi"})
    assert created.status_code == 201, created.text
    for answer in (created.json(), client.get(f"/api/v1/templates/{created.json()['id']}").json(),
                   client.get("/api/v1/templates").json()["data"][0]):
        for key in ("created_at", "updated_at"):
            parsed = datetime.fromisoformat(answer[key].replace("Z", "+00:00"))
            assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0, answer[key]


@pytest.mark.parametrize("subject", ["Hello\r\nBcc: all@example.org", "Hello\nthere", "Tab\there", "Bell\x07"])
def test_a_template_subject_with_control_characters_is_refused_at_acceptance(app, session, org, subject):
    client = _api(app, session, org.id)
    response = client.post("/api/v1/templates", json={"name": "Bad", "subject": subject, "text": "Hi"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "subject"
    assert client.get("/api/v1/templates").json()["data"] == []


def test_a_message_subject_with_line_breaks_is_refused_at_acceptance(client, sender, delivery_queue, session):
    from sqlalchemy import func, select

    from carepost.delivery.models import Message

    response = client.post("/api/v1/messages", json=body(subject="Results\r\nBcc: all@example.org"), headers=sender.key())
    assert response.status_code == 422 and response.json()["error"]["field"] == "subject"
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Message)) == 0


# --------------------------------------------------------------------------- one attachment allow-list


def _docx(macro: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        ctype = ("application/vnd.ms-word.document.macroEnabled.main+xml" if macro
                 else "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml")
        archive.writestr("[Content_Types].xml", f'<Types><Override PartName="/word/document.xml" ContentType="{ctype}"/></Types>')
        archive.writestr("word/document.xml", "<w:document/>")
        if macro:
            archive.writestr("word/vbaProject.bin", b"\xd0\xcf\x11\xe0macro")
    return buffer.getvalue()


DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
REFUSED = [
    ("results.html", "text/html", b"<html><script>alert(1)</script></html>"),
    ("notes.txt", "text/plain", b"<script>fetch('//evil')</script>"),
    ("chart.svg", "image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>'),
    ("letter.docm", "application/vnd.ms-word.document.macroEnabled.12", _docx(macro=True)),
    ("letter.docx", DOCX, _docx(macro=True)),  # a macro-enabled document renamed
    ("sheet.xlsm", "application/vnd.ms-excel.sheet.macroEnabled.12", b"PK\x03\x04"),
    ("legacy.doc", "application/msword", b"\xd0\xcf\x11\xe0"),
    ("tool.js", "text/plain", b"alert(1)"),
    ("noextension", "application/pdf", b"%PDF-1.4"),
    ("scan.pdf", "text/html", b"%PDF-1.4"),  # the type does not match the name
]


@pytest.mark.parametrize("filename,ctype,content", REFUSED, ids=[r[0] for r in REFUSED])
def test_attachments_outside_the_allow_list_are_refused(client, sender, delivery_queue, filename, ctype, content):
    attachment = {"filename": filename, "content_type": ctype, "content": base64.b64encode(content).decode()}
    response = client.post("/api/v1/messages", json=body(attachments=[attachment]), headers=sender.key())
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "attachments.0"


@pytest.mark.parametrize("filename,ctype,content", [
    ("results.pdf", "application/pdf", b"%PDF-1.4 results"),
    ("letter.docx", DOCX, _docx()),
    ("visit.ics", "text/calendar", b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n"),
])
def test_attachments_on_the_allow_list_are_accepted(client, sender, delivery_queue, filename, ctype, content):
    attachment = {"filename": filename, "content_type": ctype, "content": base64.b64encode(content).decode()}
    response = client.post("/api/v1/messages", json=body(attachments=[attachment]), headers=sender.key())
    assert response.status_code in (200, 201, 202), response.text


@pytest.mark.parametrize("filename,maintype,subtype,content", [
    ("chart.svg", "image", "svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>'),
    ("letter.docm", "application", "vnd.ms-word.document.macroEnabled.12", _docx(macro=True)),
    ("results.html", "text", "html", b"<html><script>alert(1)</script></html>"),
])
def test_smtp_submission_uses_the_same_allow_list(submission, session, filename, maintype, subtype, content):
    import smtplib

    from sqlalchemy import select

    from carepost.delivery.models import Message
    from tests.test_delivery_submission import message

    key_id, secret = submission.credential()
    msg = message()
    msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    with submission.connect() as client:
        client.login(key_id, secret)
        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.send_message(msg, to_addrs=["pat@valid.test"])
    assert exc.value.smtp_code == 550 and b"attachments.0" in exc.value.smtp_error
    session.rollback()
    assert session.scalars(select(Message)).all() == []


def test_the_portal_serves_no_attachment_outside_the_allow_list():
    """A file stored before the allow-list is not served by the portal: the same check runs at
    download (portal/service.py ``attachment``)."""
    from carepost.core.errors import ValidationFailed
    from carepost.delivery.attachments import check_attachment

    with pytest.raises(ValidationFailed):
        check_attachment("chart.svg", "image/svg+xml", b"<svg onload=alert(1)>", "attachment")
    assert check_attachment("results.pdf", "application/pdf", b"%PDF-1.7", "attachment") == "application/pdf"


# --------------------------------------------------------------------------- 401 challenges


def test_401_answers_carry_www_authenticate(client):
    for path in ("/api/v1/contacts", "/api/v1/me", "/api/v1/templates"):
        response = client.get(path)
        assert response.status_code == 401
        challenge = response.headers.get("www-authenticate", "")
        assert challenge.startswith("Bearer ") and "Basic " in challenge
