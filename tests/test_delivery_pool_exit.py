"""A worker process that ends gives back the shared per-domain connection places its SMTP pool
holds (CAREPOST_DOMAIN_MAX_CONNECTIONS counted in Redis across every worker).

Before, a worker stopped by SIGTERM right after sending (its connections idle for less than the
2 s after which an idle connection frees its place) left them taken for their whole lease, about
three minutes: bench/scale_out.py found 17 of the domain's 20 places held after every worker had
stopped, and the next workers ran on the 3 left. The child here is a real process taking places
through the pool, on a real Redis; it ends the way a worker does after Huey's graceful stop (the
interpreter exits normally).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

REDIS_URL = os.environ.get("CAREPOST_TEST_REDIS_URL")

CHILD = """
import asyncio, sys
from carepost.core.config import get_settings
from carepost.delivery.smtp import ConnectionPool

pool = ConnectionPool(get_settings(), 4, 100)

async def take():
    first = await pool._domain_slot("receiving.example")
    await pool._domain_slot("receiving.example")
    pool._release_slot(first)  # one given back as a connection closed in the run would

asyncio.run(take())
print("held", flush=True)
sys.stdin.readline()  # the worker's graceful stop; then the interpreter exits
"""


@pytest.mark.skipif(not REDIS_URL, reason="needs CAREPOST_TEST_REDIS_URL")
def test_an_exiting_worker_gives_back_its_places_among_the_domains_connections():
    import redis

    namespace = "poolexit" + uuid.uuid4().hex[:8]
    env = {**os.environ, "CAREPOST_QUEUE_URL": REDIS_URL, "CAREPOST_QUEUE_NAME": namespace,
           "CAREPOST_DOMAIN_MAX_CONNECTIONS": "3", "CAREPOST_LOG_LEVEL": "WARNING"}
    key = f"carepost:limits:{namespace}:slots:conn:receiving.example"
    client = redis.Redis.from_url(REDIS_URL)
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held", child.stderr.read()
        assert client.zcard(key) == 1  # taken while the process lives
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0, child.stderr.read()
        assert client.zcard(key) == 0, "the ended process still holds a place among the domain's connections"
    finally:
        if child.poll() is None:
            child.kill()
        client.delete(key)
        client.close()
