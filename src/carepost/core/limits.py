"""Limits that hold across processes: rate reservations, counted slots and short locks.

One interface, two implementations, chosen by the configuration:

* **Redis** (``CAREPOST_REDIS_URL``, or a Redis queue URL): every ``carepost worker`` and
  ``carepost serve`` process on every machine shares the same buckets, slots and locks. Each
  operation is one Lua script (atomic in Redis) and takes the time from Redis itself (``TIME``),
  so the machines' clocks need not agree.
* **in-process** (the embedded single-process default): the same operations on this process's
  memory, behind a thread lock.

What uses it (docs/deployment.md, "Limits across workers"):

``reserve(key, rate, burst)``
    A token bucket that lends: it always takes the token and answers how long the caller must
    wait before using it (0 while the bucket has tokens). Callers that would wait longer than
    ``max_wait`` are refused (nothing taken) and defer instead. Per receiving domain: messages
    per minute (``CAREPOST_DOMAIN_RATE_PER_MINUTE``).
``acquire_slot(key, limit, lease)`` / ``release_slot`` / ``renew_slot``
    A counting semaphore whose slots are leases: a process killed while holding one loses it
    when the lease runs out. Per receiving domain: open SMTP connections
    (``CAREPOST_DOMAIN_MAX_CONNECTIONS``).
``lock(key, ttl)``
    Mutual exclusion for a short read-then-write (a campaign's hourly throttle is counted from
    the database and the batch claimed under it, so two workers never both take the last
    allowance). A lock expires after ``ttl`` seconds, so a killed holder cannot block forever.
``admit_many(items, now, windows)``
    Counted admissions in sliding windows: each item ``(key, member, score)`` is admitted when
    ``member`` already holds a place under ``key``, or when every window ``(seconds, cap)`` holds
    fewer than ``cap`` members scored after ``now - seconds``; the items are decided in order
    (two for one key in one call: the first may take the last place). Scores and ``now`` are
    the caller's clock (epoch seconds), so the windows agree with the database's own count.
    ``admitted(key)`` lists the members holding places, ``forget(key, members)`` frees places
    (a member whose message was never committed). The frequency cap per contact
    (``consent.eligibility``).

Keys name ids and domains, never PHI. When Redis cannot be reached the Redis implementation
raises :class:`LimitsUnavailable`; callers defer (delivery) or wait, they never go unlimited.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from carepost.core.config import get_settings
from carepost.core.logging import get_logger

log = get_logger("carepost.limits")

PREFIX = "carepost:limits:"


class LimitsUnavailable(RuntimeError):
    """The shared limit store (Redis) could not be reached."""


class LockBusy(RuntimeError):
    """Another process holds the lock for longer than the caller would wait."""


class Limits(Protocol):
    shared: bool

    def reserve(self, key: str, rate: float, burst: float, n: float = 1, max_wait: float | None = None) -> float | None: ...

    def acquire_slot(self, key: str, limit: int, lease: float) -> str | None: ...

    def renew_slot(self, key: str, token: str, lease: float) -> None: ...

    def release_slot(self, key: str, token: str) -> None: ...

    def try_lock(self, key: str, ttl: float) -> str | None: ...

    def unlock(self, key: str, token: str) -> None: ...

    def admit_many(self, items: list[tuple[str, str, float]], now: float,
                   windows: list[tuple[float, int]]) -> list[bool]: ...

    def admitted(self, key: str) -> dict[str, float]: ...

    def forget(self, key: str, members: list[str]) -> None: ...


# --------------------------------------------------------------------------- in-process


class LocalLimits:
    """The same operations on this process's memory (one machine, one process)."""

    shared = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._slots: dict[str, dict[str, float]] = {}  # key -> {token: expires}
        self._locks: dict[str, tuple[str, float]] = {}
        self._admitted: dict[str, dict[str, float]] = {}  # key -> {member: score}
        self._admissions = 0

    def reserve(self, key, rate, burst, n=1, max_wait=None):
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + max(0.0, now - at) * rate)
            wait = max(0.0, (n - tokens) / rate)
            if max_wait is not None and wait > max_wait:
                self._buckets[key] = (tokens, now)
                return None
            self._buckets[key] = (tokens - n, now)
            return wait

    def acquire_slot(self, key, limit, lease):
        now = time.monotonic()
        with self._lock:
            held = {t: exp for t, exp in self._slots.get(key, {}).items() if exp > now}
            self._slots[key] = held
            if len(held) >= limit:
                return None
            token = secrets.token_hex(8)
            held[token] = now + lease
            return token

    def renew_slot(self, key, token, lease):
        with self._lock:
            held = self._slots.get(key, {})
            if token in held:
                held[token] = time.monotonic() + lease

    def release_slot(self, key, token):
        with self._lock:
            self._slots.get(key, {}).pop(token, None)

    def try_lock(self, key, ttl):
        now = time.monotonic()
        with self._lock:
            holder = self._locks.get(key)
            if holder and holder[1] > now:
                return None
            token = secrets.token_hex(8)
            self._locks[key] = (token, now + ttl)
            return token

    def unlock(self, key, token):
        with self._lock:
            if self._locks.get(key, ("",))[0] == token:
                del self._locks[key]

    def admit_many(self, items, now, windows):
        keep = max(w for w, _ in windows)
        out = []
        with self._lock:
            self._admissions += len(items)
            if self._admissions >= 10_000:  # now and then, forget the contacts whose places all left the window
                self._admissions = 0
                self._admitted = {k: held for k, held in self._admitted.items()
                                  if any(sc > now - keep for sc in held.values())}
            for key, member, score in items:
                held = {m: sc for m, sc in self._admitted.get(key, {}).items() if sc > now - keep}
                self._admitted[key] = held
                if member in held:
                    out.append(True)
                elif all(sum(1 for sc in held.values() if sc > now - w) < cap for w, cap in windows):
                    held[member] = score
                    out.append(True)
                else:
                    out.append(False)
        return out

    def admitted(self, key):
        with self._lock:
            return dict(self._admitted.get(key, {}))

    def forget(self, key, members):
        with self._lock:
            for m in members:
                self._admitted.get(key, {}).pop(m, None)

    def slots_held(self, key: str) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for exp in self._slots.get(key, {}).values() if exp > now)


# --------------------------------------------------------------------------- Redis

# A lending token bucket: refill, then take n (the balance may go below zero: the debt is the
# queue of reservations ahead); the answer is how long the caller waits. Refused (-1) without
# taking anything when the wait would exceed max_wait (ARGV[4], negative: no bound).
_RESERVE_LUA = """
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local data = redis.call('HMGET', key, 'tokens', 'at')
local tokens = tonumber(data[1])
local at = tonumber(data[2])
if tokens == nil then tokens = burst; at = now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = math.max(0, (n - tokens) / rate)
if max_wait >= 0 and wait > max_wait then
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst + n) / rate * 1000) + 60000)
  return '-1'
end
tokens = tokens - n
redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 60000)
return tostring(wait)
"""

# A counting semaphore of leases: expired leases are dropped, then a slot is taken if one is free.
_ACQUIRE_LUA = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if redis.call('ZCARD', key) >= limit then return 0 end
redis.call('ZADD', key, now + lease_ms, ARGV[3])
redis.call('PEXPIRE', key, lease_ms + 1000)
return 1
"""

_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease_ms, ARGV[2]) == 1 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < lease_ms + 1000 then redis.call('PEXPIRE', KEYS[1], lease_ms + 1000) end
end
return 1
"""

# Counted admissions in sliding windows (see admit_many): ARGV = member, score, now, ttl (ms),
# then (window ms, cap) pairs. Scores are the caller's clock in ms; members older than the
# longest window are dropped first. 1: admitted (or already held), 0: a window is full.
_ADMIT_LUA = """
local key = KEYS[1]
local member = ARGV[1]
local now = tonumber(ARGV[3])
local keep = 0
for i = 5, #ARGV, 2 do keep = math.max(keep, tonumber(ARGV[i])) end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - keep)
if redis.call('ZSCORE', key, member) then return 1 end
for i = 5, #ARGV, 2 do
  if redis.call('ZCOUNT', key, '(' .. (now - tonumber(ARGV[i])), '+inf') >= tonumber(ARGV[i + 1]) then return 0 end
end
redis.call('ZADD', key, tonumber(ARGV[2]), member)
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
return 1
"""

_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLimits:
    """The operations as Lua scripts in Redis: shared by every process on every machine."""

    shared = True

    def __init__(self, client, namespace: str = "carepost") -> None:
        self.client = client
        self.prefix = f"{PREFIX}{namespace}:"  # installations sharing a Redis keep apart by queue name
        self._reserve = client.register_script(_RESERVE_LUA)
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._unlock = client.register_script(_UNLOCK_LUA)
        self._admit = client.register_script(_ADMIT_LUA)

    def _call(self, fn, *args, **kwargs):
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            log.warning("limits_redis_unavailable", error_type=type(exc).__name__)
            raise LimitsUnavailable(f"the shared limit store is unreachable ({type(exc).__name__})") from exc

    def reserve(self, key, rate, burst, n=1, max_wait=None):
        out = self._call(self._reserve, keys=[self.prefix + "rate:" + key],
                         args=[repr(float(rate)), repr(float(burst)), repr(float(n)),
                               repr(float(-1 if max_wait is None else max_wait))])
        wait = float(out)
        return None if wait < 0 else wait

    def acquire_slot(self, key, limit, lease):
        token = secrets.token_hex(8)
        got = self._call(self._acquire, keys=[self.prefix + "slots:" + key], args=[int(limit), int(lease * 1000), token])
        return token if int(got) else None

    def renew_slot(self, key, token, lease):
        self._call(self._renew, keys=[self.prefix + "slots:" + key], args=[int(lease * 1000), token])

    def release_slot(self, key, token):
        self._call(self.client.zrem, self.prefix + "slots:" + key, token)

    def try_lock(self, key, ttl):
        token = secrets.token_hex(8)
        ok = self._call(self.client.set, self.prefix + "lock:" + key, token, nx=True, px=int(ttl * 1000))
        return token if ok else None

    def unlock(self, key, token):
        self._call(self._unlock, keys=[self.prefix + "lock:" + key], args=[token])

    def admit_many(self, items, now, windows):
        if not items:
            return []
        keep_ms = int(max(w for w, _ in windows) * 1000)
        # The key outlives the longest window by a day: a score from a clock ahead of Redis's
        # still counts until the window has passed it.
        ttl_ms = keep_ms + 86_400_000
        pairs = [x for w, cap in windows for x in (int(w * 1000), int(cap))]

        def run():
            pipe = self.client.pipeline(transaction=False)
            for key, member, score in items:
                self._admit(keys=[self.prefix + "admit:" + key],
                            args=[member, int(score * 1000), int(now * 1000), ttl_ms, *pairs], client=pipe)
            return pipe.execute()

        return [bool(int(x)) for x in self._call(run)]

    def admitted(self, key):
        pairs = self._call(self.client.zrange, self.prefix + "admit:" + key, 0, -1, withscores=True)
        return {(m.decode() if isinstance(m, bytes) else m): sc / 1000 for m, sc in pairs}

    def forget(self, key, members):
        if members:
            self._call(self.client.zrem, self.prefix + "admit:" + key, *members)

    def slots_held(self, key: str) -> int:
        now_s, now_us = self._call(self.client.time)
        return int(self._call(self.client.zcount, self.prefix + "slots:" + key, now_s * 1000 + now_us // 1000, "+inf"))


# --------------------------------------------------------------------------- choice


_choice_lock = threading.Lock()
_chosen: tuple[tuple | None, Limits] | None = None
_local = LocalLimits()


def _redis_client(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)


def get_limits() -> Limits:
    """Redis when a Redis URL is configured, else this process's memory."""
    global _chosen
    settings = get_settings()
    url = settings.effective_redis_url
    choice = (url, settings.queue_name) if url else None
    with _choice_lock:
        if _chosen is None or _chosen[0] != choice:
            _chosen = (choice, RedisLimits(_redis_client(url), settings.queue_name) if url else _local)
        return _chosen[1]


def reset_limits() -> None:
    """Forget the chosen store and the in-process state (tests change the configuration)."""
    global _chosen, _local
    with _choice_lock:
        if _chosen is not None and isinstance(_chosen[1], RedisLimits):
            _chosen[1].client.close()
        _chosen = None
        _local = LocalLimits()


@contextmanager
def lock(key: str, ttl: float = 30.0, wait: float = 10.0) -> Iterator[None]:
    """Hold ``key`` across processes (Redis) or threads (in-process) for a short critical
    section; waits up to ``wait`` seconds, then raises :class:`LockBusy`."""
    limits = get_limits()
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        token = limits.try_lock(key, ttl)
        if token is not None:
            break
        if time.monotonic() >= deadline:
            raise LockBusy(f"lock {key} is held elsewhere")
        time.sleep(delay)
        delay = min(0.2, delay * 2)
    try:
        yield
    finally:
        try:
            limits.unlock(key, token)
        except LimitsUnavailable:
            pass  # the lock expires on its own after ttl
