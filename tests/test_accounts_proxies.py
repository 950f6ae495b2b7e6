"""Issue 9 item 15: ``CAREPOST_TRUSTED_PROXIES``. A real ``carepost serve`` believes
X-Forwarded-For only from the configured proxies; by default it believes nobody, so a client
cannot pose as another address (and dodge or aim the per-address throttles)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from tests.fixtures.ui import free_port


def _serve(storage, extra: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://localhost:{port}"
    env = {**os.environ, **storage.env, **extra, "CAREPOST_BASE_URL": url, "CAREPOST_PORT": str(port),
           "CAREPOST_HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def _failed_login_ip(storage, extra: dict, agent: str) -> str | None:
    from carepost.core.database import read_only_session

    proc, url = _serve(storage, extra)
    try:
        with httpx.Client(base_url=url) as c:
            page = c.get("/app/login")
            csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]
            c.post("/app/login", data={"email": "nobody@example.test", "password": "Whatever-password-123",
                                       "csrf_token": csrf},
                   headers={"X-Forwarded-For": "203.0.113.9", "User-Agent": agent})
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with read_only_session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "auth.login",
                                                   AuditEvent.user_agent == agent)).first()
        return event.ip


def test_forwarded_address_believed_only_from_trusted_proxies(storage, db):
    assert _failed_login_ip(storage, {}, "agent-untrusted") == "127.0.0.1"
    assert _failed_login_ip(storage, {"CAREPOST_TRUSTED_PROXIES": "127.0.0.1"}, "agent-trusted") == "203.0.113.9"
