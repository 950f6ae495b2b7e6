"""``carepost mllp``: the HL7 v2 listener (MLLP framing: ``0x0B`` message ``0x1C 0x0D``).

One asyncio event loop reads frames from any number of connections (plain TCP on a loopback
address, TLS 1.2+ elsewhere: ``CAREPOST_MLLP_CERT_FILE``/``CAREPOST_MLLP_KEY_FILE``; with
``CAREPOST_MLLP_CLIENT_CA_FILE`` a client certificate from those CAs is required, and its SHA-256
travels with each frame so a connection pinned to one certificate refuses any other); one
thread stores them. A frame is one message or an HL7 batch (FHS/BHS … BTS/FTS), answered with
an acknowledgement batch (:func:`carepost.ehr.service.ingest_frames`). The thread takes every message waiting (up to :data:`BATCH`), processes the
group in one transaction (:func:`carepost.ehr.service.ingest_batch`) and, once it committed,
hands each connection its ACKs in the order its messages came. An ACK therefore always means the
message is stored (AA: recorded; AE: kept in the error queue, or to be sent again) or was
refused (AR). Bytes before a start block are dropped; a frame larger than
``CAREPOST_MLLP_MAX_BYTES`` is answered AR and the connection closed; an idle connection is
closed after ``CAREPOST_MLLP_IDLE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import hashlib
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


def tls_context(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """TLS 1.2+ with the listener's certificate; with ``client_ca_file``, mutual TLS: a client
    must present a certificate issued by those CAs, and only those (the system's trust store is
    not loaded, so a certificate from a public CA is refused)."""
    if client_ca_file is None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_verify_locations(cafile=str(client_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
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
    """The one thread that writes: groups of waiting messages, one transaction per group.

    After a group commits, its audit checkpoint (an ``fsync``) is written and its ACKs sent by a
    second thread (:class:`Answers`) while this one already stores the next group: the ACKs of a
    group still go out only once its transaction committed *and* the checkpoint file covers its
    audit events (``carepost.audit.checkpoints``), in the order the groups committed."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(name="mllp-store", daemon=True)
        self.loop = loop
        self.inbox: queue.Queue = queue.Queue()
        self.answers = Answers(loop)

    def run(self) -> None:
        self.answers.start()
        try:
            self._run()
        finally:
            self.answers.stop()
            self.answers.join()

    def _run(self) -> None:
        from carepost.ehr.service import ingest_frames

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
            signed: list = []
            answers = ingest_frames([(data, peer) for data, peer, _, _ in group], [cert for *_, cert in group],
                                    checkpoints=signed)
            self.answers.outbox.put((signed, [reply for _, _, reply, _ in group], answers))

    def stop(self) -> None:
        self.inbox.put(None)


class Answers(threading.Thread):
    """Writes each committed group's audit checkpoints, then hands its connections their ACKs.

    At most two groups wait here (the store blocks on a third), so the checkpoint file is never
    more than two groups behind the database while their ACKs are held back."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(name="mllp-answers", daemon=True)
        self.loop = loop
        self.outbox: queue.Queue = queue.Queue(maxsize=2)

    def run(self) -> None:
        from carepost.audit.service import write_checkpoints

        while True:
            item = self.outbox.get()
            if item is None:
                return
            signed, replies, answers = item
            write_checkpoints(signed)  # before any ACK of the group (never raises)
            for reply, answer in zip(replies, answers, strict=True):
                self.loop.call_soon_threadsafe(reply, answer)

    def stop(self) -> None:
        self.outbox.put(None)


class MllpProtocol(asyncio.Protocol):
    def __init__(self, listener: Listener):
        self.listener = listener
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.cert_sha256: str | None = None  # SHA-256 of the TLS client certificate (mutual TLS), if any
        self.pending = 0
        self.closing = False
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.cert_sha256 = hashlib.sha256(der).hexdigest() if der else None
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
            self.listener.store.inbox.put((message, self.peer, self._reply, self.cert_sha256))

    def _reply(self, answer: bytes) -> None:
        self.pending -= 1
        if self.transport is not None and not self.transport.is_closing():
            # enhanced acknowledgement mode: the commit ACK and/or the application ACK, or none
            for part in getattr(answer, "frames", (answer,)):
                self.transport.write(hl7v2.frame(part))

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
            self.ssl = tls_context(settings.mllp_cert_file, settings.mllp_key_file, settings.mllp_client_ca_file)
        elif settings.mllp_client_ca_file:
            raise ValueError("Client certificates (CAREPOST_MLLP_CLIENT_CA_FILE) need TLS: set CAREPOST_MLLP_CERT_FILE "
                             "and CAREPOST_MLLP_KEY_FILE")
        elif not _is_loopback(self.host):
            raise ValueError("MLLP without TLS listens only on a loopback address: set CAREPOST_MLLP_CERT_FILE and "
                             "CAREPOST_MLLP_KEY_FILE to listen on " + self.host)

    async def serve(self, stop: asyncio.Event, *, reuse_port: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.store = Store(self.loop)
        self.store.start()
        server = await self.loop.create_server(lambda: MllpProtocol(self), self.host, self.port, ssl=self.ssl,
                                               reuse_address=True, reuse_port=reuse_port or None)
        log.info("mllp_started", host=self.host, port=self.port, tls=self.ssl is not None,
                 client_certificates=bool(self.ssl is not None and self.settings.mllp_client_ca_file))
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


def serve(settings: Settings, *, host: str | None = None, port: int | None = None, processes: int = 1) -> None:
    """Run until SIGTERM or SIGINT; with ``processes`` > 1, that many listener processes on one
    port (:func:`serve_processes`)."""
    if processes > 1:
        serve_processes(settings, host=host, port=port, processes=processes)
        return
    _serve_one(Listener(settings, host=host, port=port))


def _serve_one(listener: Listener, *, reuse_port: bool = False) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await listener.serve(stop, reuse_port=reuse_port)

    asyncio.run(main())


# --------------------------------------------------------------------------- several processes
#
# One listener process stores with one thread under one GIL: about one core. ``carepost mllp
# --processes N`` forks N listener processes that each bind the same address with SO_REUSEPORT
# (Linux): the kernel spreads new connections over them, each process groups and commits what
# its own connections sent, exactly as a single listener does (an ACK still follows the commit
# of its message). What they share is the database's: a control id is unique per organization
# (a message sent on two connections at once is stored once, the second group retried one by
# one), the audit chain head is locked by each group's append, the checkpoint file is written
# under an exclusive flock and only moves forward, and a revoked MLLP connection is refused by
# every process within ``service.CACHE_SECONDS``. SO_REUSEPORT lets only processes of the same
# user bind the port. The parent only watches: when one process ends by itself, it stops the
# others and reports the failure (a supervisor restarts the command); SIGTERM/SIGINT stop all,
# each answering what it already received.

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serve_processes(settings: Settings, *, host: str | None = None, port: int | None = None,
                    processes: int = 2) -> None:
    import multiprocessing
    import os
    import socket

    if not hasattr(socket, "SO_REUSEPORT") or not hasattr(os, "fork"):
        raise ValueError("--processes needs SO_REUSEPORT (Linux); run one process per port instead")
    Listener(settings, host=host, port=port)  # the TLS and address checks, before anything starts
    if not (port or settings.mllp_port):
        raise ValueError("--processes needs a fixed port (not 0)")
    from carepost.core.database import dispose_engine

    dispose_engine()  # no database connection is shared with the children
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_child, args=(settings, host, port), name=f"carepost-mllp-{n + 1}")
                for n in range(processes)]
    stopping = threading.Event()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # a child installs its own handlers first
    try:
        for child in children:
            child.start()
        for signum in _STOP_SIGNALS:
            signal.signal(signum, lambda *_: stopping.set())
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    ended = None
    while not stopping.is_set() and ended is None:
        ended = next((c for c in children if not c.is_alive()), None)
        stopping.wait(0.2)
    for child in children:
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    for child in children:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
    if ended is not None and ended.exitcode != 0 and not stopping.is_set():
        raise OSError(f"MLLP listener process {ended.name} ended (exit code {ended.exitcode}); all were stopped")
    log.info("mllp_processes_stopped", processes=processes)


def _child(settings: Settings, host: str | None, port: int | None) -> None:
    import sys

    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        _serve_one(Listener(settings, host=host, port=port), reuse_port=True)
    except (ValueError, OSError) as exc:
        log.error("mllp_process_failed", error_type=type(exc).__name__)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
