"""Issue 9 item 24: link secrets in paths and query values never reach a log line.

Proven twice: in-process (the records uvicorn's access and error loggers make, CarePost's own
structlog events, the standard library) and with a real ``carepost serve`` subprocess whose access
log is switched on (``CAREPOST_ACCESS_LOG=true``), requested over HTTP at every secret-bearing
route of the product.
"""

from __future__ import annotations

import io
import logging
import secrets
import time

import httpx
import pytest

from carepost.core.logging import REDACTED, configure_logging, get_logger, scrub_text

SECRET_PATHS = [
    "/app/setup/{t}",
    "/app/enroll/{t}",
    "/p/{t}",
    "/p/{t}/message",
    "/f/{t}",
    "/f/confirm/{t}",
    "/t/u/{t}",
    "/t/preferences/{t}",
    "/t/confirm/{t}",
    "/t/revoke/{t}",
    "/t/authorizations/{t}",
]
QUERY_SECRETS = ["/healthz?token={t}", "/app/login?next=/p/{t}", "/api/v1/contacts?email=jane.doe%40example.org&cursor={t}"]


def _tokens(n: int) -> list[str]:
    return [secrets.token_urlsafe(32) for _ in range(n)]


def _consent_like() -> str:
    """The shape of a signed consent link token: base64url payload, a dot, a base64url MAC."""
    return secrets.token_urlsafe(20) + "." + secrets.token_urlsafe(32)


@pytest.mark.parametrize("template", SECRET_PATHS + QUERY_SECRETS)
def test_scrub_text_redacts_the_secret_of_every_link(template):
    token = _consent_like() if template.startswith("/t/") else secrets.token_urlsafe(32)
    line = f'127.0.0.1:50000 - "GET {template.format(t=token)} HTTP/1.1" 404'
    scrubbed = scrub_text(line)
    assert token not in scrubbed and REDACTED in scrubbed
    assert "GET /" in scrubbed and "HTTP/1.1" in scrubbed


def test_ids_words_and_file_paths_stay_readable():
    keep = [
        'GET /api/v1/contacts/0190f3a1b2c3d4e5f6a7b8c9d0e1f2a3/conditions HTTP/1.1',
        'GET /p/[redacted]/message',
        'File "/work/main/.venv/lib/python3.11/site-packages/starlette/routing.py", line 74',
        "content-type: application/json",
        "GET /f/flu-shot-signup HTTP/1.1",  # a form's chosen slug is public
    ]
    for text in keep:
        assert scrub_text(text) == text


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def test_every_log_path_in_process_is_scrubbed():
    stream = io.StringIO()
    configure_logging("DEBUG", json=True, stream=stream)
    try:
        tokens = _tokens(len(SECRET_PATHS))
        paths = [tpl.format(t=tok) for tpl, tok in zip(SECRET_PATHS, tokens, strict=True)]
        access = logging.getLogger("uvicorn.access")
        for path in paths:
            # uvicorn's own format and arguments (uvicorn/protocols/http/h11_impl.py)
            access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:50000", "GET", path, "1.1", 404)
        try:
            raise RuntimeError(f"failed on {paths[0]}")
        except RuntimeError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application (%s)", paths[1])
        get_logger("carepost.test").info("request_done", path=paths[2], url=f"http://localhost:8000{paths[3]}?code=123456",
                                         referer=f"https://clinic.example{paths[4]}")
        logging.getLogger("httpx").info("HTTP Request: GET http://localhost:8000%s \"HTTP/1.1 200 OK\"", paths[5])
    finally:
        from carepost.core.config import get_settings

        configure_logging(get_settings().log_level, get_settings().log_json)
    lines = _lines(stream)
    assert len(lines) >= len(SECRET_PATHS) + 3
    for line in lines:
        for token in tokens:
            assert token not in line, f"link secret leaked: {line}"
        assert "123456" not in line
    assert any('"GET /p/[redacted] HTTP/1.1" 404' in line for line in lines)


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def live_server_env():
    return {"CAREPOST_ACCESS_LOG": "true", "CAREPOST_LOG_LEVEL": "INFO"}


@pytest.mark.slow
def test_a_real_server_with_its_access_log_on_logs_no_link_secret(live_server):
    tokens = _tokens(len(SECRET_PATHS) + len(QUERY_SECRETS))
    templates = SECRET_PATHS + QUERY_SECRETS
    with httpx.Client(base_url=live_server.url, follow_redirects=False, timeout=10) as client:
        for template, token in zip(templates, tokens, strict=True):
            response = client.get(template.format(t=token))
            assert response.status_code < 500, (template, response.status_code)
        # A POST with the secret in the path too (portal code request, setup form).
        client.post(f"/p/{tokens[2]}/code", data={"csrf_token": "x"})
        client.post(f"/app/setup/{tokens[0]}", data={"csrf_token": "x"})
    deadline = time.time() + 10
    text = ""
    while time.time() < deadline:  # the access line is written after the response is sent
        text = open(live_server.log_path).read()
        if text.count('"GET /') >= len(templates):
            break
        time.sleep(0.2)
    access_lines = [line for line in text.splitlines() if '"GET /' in line or '"POST /' in line]
    assert len(access_lines) >= len(templates), text[-3000:]
    for line in text.splitlines():
        for token in tokens:
            assert token not in line, f"link secret leaked: {line}"
        assert "jane.doe" not in line
    assert any("GET /app/setup/[redacted]" in line for line in access_lines)
    assert any("GET /p/[redacted]/message" in line for line in access_lines)
