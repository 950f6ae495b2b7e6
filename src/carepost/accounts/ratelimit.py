"""Per-credential rate limits: a sliding window of requests per minute.

With Redis configured (``CAREPOST_REDIS_URL``, or a Redis queue URL) the window lives in Redis,
so every ``carepost serve`` process behind a load balancer counts against the same limit.
Without Redis an in-process window is used (one machine, one process is the embedded default).

The window is a log of request times (a Redis sorted set), not a fixed per-minute counter: a
fixed counter lets a client send twice its limit across a minute boundary. Refused requests are
not logged, so a client that keeps retrying recovers as soon as its oldest request ages out.
Time comes from :mod:`carepost.core.clock`, so tests move it instead of sleeping.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.errors import RateLimited
from carepost.core.logging import get_logger

log = get_logger("carepost.ratelimit")

WINDOW_SECONDS = 60
REDIS_PREFIX = "carepost:ratelimit:"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: int  # whole seconds until a request would be allowed (0 when allowed)
    remaining: int


class Limiter(Protocol):
    def hit(self, key: str, limit: int, window: int = WINDOW_SECONDS) -> Decision: ...


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class InProcessLimiter:
    """Sliding-window log per key, in this process's memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key: str, limit: int, window: int = WINDOW_SECONDS) -> Decision:
        now = clock.now().timestamp()
        with self._lock:
            times = self._hits.setdefault(key, deque())
            while times and times[0] <= now - window:
                times.popleft()
            if len(times) < limit:
                times.append(now)
                return Decision(True, 0, limit - len(times))
            return Decision(False, _retry_after(times[0] + window - now), 0)

    def clear(self) -> None:
        with self._lock:
            self._hits.clear()


# Atomic in Redis: drop entries older than the window, count, add this request if under the limit.
_SLIDING_WINDOW_LUA = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, window)
  return {1, 0, limit - count - 1}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now, 0}
"""


class RedisLimiter:
    """Sliding-window log per key in a Redis sorted set, shared by every server process."""

    def __init__(self, client) -> None:
        self.client = client
        self._script = client.register_script(_SLIDING_WINDOW_LUA)

    def hit(self, key: str, limit: int, window: int = WINDOW_SECONDS) -> Decision:
        now_ms = int(clock.now().timestamp() * 1000)
        member = f"{now_ms}-{secrets.token_hex(6)}"
        allowed, wait_ms, remaining = self._script(
            keys=[REDIS_PREFIX + key], args=[now_ms, window * 1000, limit, member]
        )
        if int(allowed):
            return Decision(True, 0, int(remaining))
        return Decision(False, _retry_after(int(wait_ms) / 1000), 0)


class _FallbackLimiter:
    """Redis first; when Redis cannot be reached, the in-process window (logged, not fatal:
    an outage of the rate-limit store must not take the API down)."""

    def __init__(self, primary: RedisLimiter, fallback: InProcessLimiter) -> None:
        self.primary = primary
        self.fallback = fallback

    def hit(self, key: str, limit: int, window: int = WINDOW_SECONDS) -> Decision:
        import redis

        try:
            return self.primary.hit(key, limit, window)
        except redis.RedisError as exc:
            log.warning("ratelimit_redis_unavailable", error_type=type(exc).__name__)
            return self.fallback.hit(key, limit, window)


_lock = threading.Lock()
_limiter: Limiter | None = None
_limiter_url: str | None = None
_local = InProcessLimiter()
_redis_clients: dict[str, object] = {}


def redis_client(url: str | None = None):
    """A shared Redis client for ``url`` (default: the configured Redis), or None."""
    url = url or get_settings().effective_redis_url
    if not url:
        return None
    with _lock:
        client = _redis_clients.get(url)
        if client is None:
            import redis

            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            _redis_clients[url] = client
        return client


def get_limiter() -> Limiter:
    """The limiter for the current configuration (Redis when configured, else in-process)."""
    global _limiter, _limiter_url
    url = get_settings().effective_redis_url
    with _lock:
        if _limiter is not None and _limiter_url == url:
            return _limiter
    limiter: Limiter = _FallbackLimiter(RedisLimiter(redis_client(url)), _local) if url else _local
    with _lock:
        _limiter, _limiter_url = limiter, url
    return limiter


def limiter_in_process() -> bool:
    """Is a hit counted in this process's memory (no Redis round trip)? Then it may be counted on
    the event loop (``credentials.principal_from_memory``)."""
    return isinstance(get_limiter(), InProcessLimiter)


def reset_limiter() -> None:
    """Forget the chosen backend and the in-process windows (tests change the configuration)."""
    global _limiter, _limiter_url
    with _lock:
        _limiter = None
        _limiter_url = None
        for client in _redis_clients.values():
            client.close()
        _redis_clients.clear()
    _local.clear()


def enforce(key: str, limit: int) -> Decision:
    """Count one request for ``key``; raise :class:`RateLimited` (429 + Retry-After) when over."""
    decision = get_limiter().hit(key, limit)
    if not decision.allowed:
        raise RateLimited("Too many requests. Retry later.", retry_after=decision.retry_after)
    return decision
