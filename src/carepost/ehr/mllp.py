"""``carepost mllp``: the HL7 v2 listener (MLLP framing: ``0x0B`` message ``0x1C 0x0D``).

One asyncio event loop reads frames from any number of connections (plain TCP on a loopback
address, TLS 1.2+ elsewhere: ``CAREPOST_MLLP_CERT_FILE``/``CAREPOST_MLLP_KEY_FILE``); one
thread stores them. The thread takes every message waiting (up to :data:`BATCH`), processes the
group in one transaction (:func:`carepost.ehr.service.ingest_batch`) and, once it committed,
hands each connection its ACKs in the order its messages came. An ACK therefore always means the
message is stored (AA: recorded; AE: kept in the error queue, or to be sent again) or was
refused (AR). Bytes before a start block are dropped; a frame larger than
``CAREPOST_MLLP_MAX_BYTES`` is answered AR and the connection closed; an idle connection is
closed after ``CAREPOST_MLLP_IDLE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import queue
import signal
import ssl
import threading
from pathlib import Path

import structlog

from carepost.core.config import Settings
from carepost.ehr import hl7v2

log = structlog.get_logger("carepost.ehr.mllp")
BATCH = 200


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Store(threading.Thread):
    """The one thread that writes: groups of waiting messages, one transaction per group."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(name="mllp-store", daemon=True)
        self.loop = loop
        self.inbox: queue.Queue = queue.Queue()

    def run(self) -> None:
        from carepost.ehr.service import ingest_batch

        while True:
            item = self.inbox.get()
            if item is None:
                return
            group = [item]
            while len(group) < BATCH:
                try:
                    more = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.inbox.put(None)
                    break
                group.append(more)
            answers = ingest_batch([(data, peer) for data, peer, _ in group])
            for (_, _, reply), answer in zip(group, answers, strict=True):
                self.loop.call_soon_threadsafe(reply, answer)

    def stop(self) -> None:
        self.inbox.put(None)


class MllpProtocol(asyncio.Protocol):
    def __init__(self, listener: Listener):
        self.listener = listener
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.pending = 0
        self.closing = False
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        self.listener.connections.add(self)
        self._touch()

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.listener.connections.discard(self)
        if self.idle:
            self.idle.cancel()

    def _touch(self) -> None:
        if self.idle:
            self.idle.cancel()
        self.idle = self.listener.loop.call_later(self.listener.idle_seconds, self._idle_timeout)

    def _idle_timeout(self) -> None:
        if self.pending == 0 and self.transport and not self.closing:
            self.transport.close()
        elif not self.closing:
            self._touch()

    def data_received(self, data: bytes) -> None:
        self._touch()
        self.buffer.extend(data)
        while True:
            start = self.buffer.find(hl7v2.START_BLOCK)
            if start == -1:
                self.buffer.clear()  # bytes outside a frame
                return
            if start:
                del self.buffer[:start]
            end = self.buffer.find(hl7v2.END_BLOCK, 1)
            if end == -1:
                if len(self.buffer) > self.listener.max_bytes:
                    self._too_large(bytes(self.buffer[1:4097]))
                return
            message = bytes(self.buffer[1:end])
            del self.buffer[: end + 2]
            if len(message) > self.listener.max_bytes:
                self._too_large(message[:4096])
                return
            self.pending += 1
            self.listener.store.inbox.put((message, self.peer, self._reply))

    def _reply(self, answer: bytes) -> None:
        self.pending -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(hl7v2.frame(answer))

    def _too_large(self, head: bytes) -> None:
        from carepost.ehr.service import _best_effort_header

        header = _best_effort_header(head)
        problem = hl7v2.Hl7Problem("AR", hl7v2.DATA_TYPE, f"The message is larger than {self.listener.max_bytes} bytes.",
                                   reason_code="too_large")
        self.buffer.clear()
        if self.transport is not None:
            self.transport.write(hl7v2.frame(hl7v2.ack(code="AR", problem=problem, **header).encode()))
            self.transport.close()
        self.closing = True


class Listener:
    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None):
        self.settings = settings
        self.host = host or settings.mllp_host
        self.port = port or settings.mllp_port
        self.max_bytes = settings.mllp_max_bytes
        self.idle_seconds = settings.mllp_idle_seconds
        self.connections: set[MllpProtocol] = set()
        self.ssl = None
        if settings.mllp_cert_file or settings.mllp_key_file:
            if not (settings.mllp_cert_file and settings.mllp_key_file):
                raise ValueError("TLS for MLLP needs both CAREPOST_MLLP_CERT_FILE and CAREPOST_MLLP_KEY_FILE")
            self.ssl = tls_context(settings.mllp_cert_file, settings.mllp_key_file)
        elif not _is_loopback(self.host):
            raise ValueError("MLLP without TLS listens only on a loopback address: set CAREPOST_MLLP_CERT_FILE and "
                             "CAREPOST_MLLP_KEY_FILE to listen on " + self.host)

    async def serve(self, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.store = Store(self.loop)
        self.store.start()
        server = await self.loop.create_server(lambda: MllpProtocol(self), self.host, self.port, ssl=self.ssl,
                                               reuse_address=True)
        log.info("mllp_started", host=self.host, port=self.port, tls=self.ssl is not None)
        try:
            await stop.wait()
        finally:
            server.close()
            await server.wait_closed()
            # let the messages already received be stored and answered
            for _ in range(100):
                if not any(c.pending for c in self.connections):
                    break
                await asyncio.sleep(0.05)
            for conn in list(self.connections):
                if conn.transport:
                    conn.transport.close()
            self.store.stop()
            await self.loop.run_in_executor(None, self.store.join, 10)
            log.info("mllp_stopped")


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Run until SIGTERM or SIGINT."""
    listener = Listener(settings, host=host, port=port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await listener.serve(stop)

    asyncio.run(main())
