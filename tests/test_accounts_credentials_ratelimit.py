"""Per-credential rate limits: 429 with Retry-After, in-process and in Redis (shared by servers)."""

from __future__ import annotations

import os
import secrets
from datetime import timedelta

import pytest

from carepost.accounts import ratelimit
from carepost.core import clock
from tests.test_accounts_credentials import bearer, make_credential  # noqa: F401  (fixture)


def _redis_url() -> str:
    import redis

    url = os.environ.get("CAREPOST_TEST_REDIS_URL", "redis://127.0.0.1:6379/1")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        if os.environ.get("CAREPOST_TEST_REDIS_URL"):
            raise
        pytest.skip("Redis not reachable and CAREPOST_TEST_REDIS_URL not set")
    return url


@pytest.fixture
def limiter_backend(request, monkeypatch):
    """Run a test on the in-process limiter and on Redis."""
    from carepost.core.config import reset_settings

    if request.param == "redis":
        monkeypatch.setenv("CAREPOST_REDIS_URL", _redis_url())
    reset_settings()
    ratelimit.reset_limiter()
    yield request.param
    monkeypatch.delenv("CAREPOST_REDIS_URL", raising=False)
    reset_settings()
    ratelimit.reset_limiter()


@pytest.mark.parametrize("limiter_backend", ["in_process", "redis"], indirect=True)
def test_429_with_retry_after_then_recovers(client, make_credential, limiter_backend):
    expected = ratelimit._FallbackLimiter if limiter_backend == "redis" else ratelimit.InProcessLimiter
    assert isinstance(ratelimit.get_limiter(), expected)
    cred, secret = make_credential(rate_limit_per_minute=3)
    for _ in range(3):
        assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
    r = client.get("/api/v1/me", headers=bearer(cred, secret))
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 60
    # Another credential is not affected.
    other, other_secret = make_credential(name="Other", rate_limit_per_minute=3)
    assert client.get("/api/v1/me", headers=bearer(other, other_secret)).status_code == 200
    clock.advance(timedelta(seconds=retry))
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200


@pytest.mark.parametrize("limiter_backend", ["in_process", "redis"], indirect=True)
def test_default_limit_comes_from_settings(client, make_credential, monkeypatch, limiter_backend):
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_RATE_LIMIT_PER_MINUTE", "2")
    reset_settings()
    cred, secret = make_credential()
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).json()["rate_limit_per_minute"] == 2
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 429


@pytest.mark.parametrize("limiter_backend", ["in_process", "redis"], indirect=True)
def test_token_endpoint_counts_against_the_credential(client, make_credential, limiter_backend):
    import base64

    cred, secret = make_credential(rate_limit_per_minute=2)
    auth = {"Authorization": "Basic " + base64.b64encode(f"{cred.key_id}:{secret}".encode()).decode()}
    for _ in range(2):
        assert client.post("/api/v1/oauth/token", data={"grant_type": "client_credentials"}, headers=auth).status_code == 200
    r = client.post("/api/v1/oauth/token", data={"grant_type": "client_credentials"}, headers=auth)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_sliding_window_has_no_boundary_burst():
    limiter = ratelimit.InProcessLimiter()
    key = "k-" + secrets.token_hex(4)
    assert all(limiter.hit(key, 2).allowed for _ in range(2))
    clock.advance(timedelta(seconds=30))
    assert not limiter.hit(key, 2).allowed  # a fixed per-minute counter might have reset here
    decision = limiter.hit(key, 2)
    assert decision.retry_after == 30 or decision.retry_after == 31
    clock.advance(timedelta(seconds=31))
    assert limiter.hit(key, 2).allowed
    clock.reset()


def test_redis_windows_are_shared_between_processes():
    """Two servers = two Redis clients; they count against the same window."""
    import redis

    url = _redis_url()
    key = "shared-" + secrets.token_hex(6)
    first = ratelimit.RedisLimiter(redis.Redis.from_url(url))
    second = ratelimit.RedisLimiter(redis.Redis.from_url(url))
    assert first.hit(key, 3).allowed
    assert second.hit(key, 3).allowed
    assert first.hit(key, 3).remaining == 0
    refused = second.hit(key, 3)
    assert not refused.allowed and 1 <= refused.retry_after <= 60


def test_unreachable_redis_falls_back_to_in_process(client, make_credential, monkeypatch):
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    reset_settings()
    ratelimit.reset_limiter()
    try:
        cred, secret = make_credential(rate_limit_per_minute=1)
        assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
        assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 429
    finally:
        monkeypatch.delenv("CAREPOST_REDIS_URL")
        reset_settings()
        ratelimit.reset_limiter()
