"""Issue 10 item 16: failures reach people in their words, never as exception class names."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from carepost.core.plainwords import describe_error
from tests.fixtures.ui import free_port

CLASS_NAMES = ("gaierror", "ConnectError", "ConnectionRefusedError", "OSError", "SSLError", "TimeoutError")


def _raised(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing raised")


def test_real_failures_are_described_in_words():
    unknown = _raised(lambda: socket.getaddrinfo("no-such-host.invalid", 80))
    assert isinstance(unknown, socket.gaierror)
    assert describe_error(unknown) == "the host name does not resolve (no such host)"

    port = free_port()
    refused = _raised(lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
    assert describe_error(refused) == "the connection was refused"

    async def slow():
        await asyncio.wait_for(asyncio.sleep(1), 0.01)

    assert describe_error(_raised(lambda: asyncio.run(slow()))) == "no answer in time"

    wrapped = RuntimeError("outer")
    wrapped.__cause__ = unknown
    assert describe_error(wrapped) == "the host name does not resolve (no such host)"
    assert describe_error(ValueError("x")) == "an unexpected error"


def test_certificate_failure_in_words(tls_ca):
    """A real handshake against a server whose CA is not trusted."""
    import threading

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert_file, key_file = tls_ca.issue(["localhost"])
    server_ctx.load_cert_chain(str(cert_file), str(key_file))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        try:
            server_ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    client_ctx = ssl.create_default_context()  # the system store: the test CA is unknown
    with socket.create_connection(listener.getsockname(), timeout=5) as raw:
        err = _raised(lambda: client_ctx.wrap_socket(raw, server_hostname="localhost"))
    listener.close()
    assert describe_error(err) == "the certificate could not be verified"


def test_webhook_host_that_does_not_resolve_is_refused_in_words():
    from carepost.tracking import webhooks

    target = webhooks.parse_url("https://no-such-host.invalid/hook")
    with pytest.raises(webhooks.Refused) as info:
        webhooks.resolve(target)
    message = str(info.value)
    assert "does not resolve" in message and "no such host" in message
    assert not any(name in message for name in CLASS_NAMES)
