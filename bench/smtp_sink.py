"""A fast SMTP sink with STARTTLS for delivery benchmarks: accepts and discards everything.

Runs in its own process (so it does not share the benchmark's interpreter lock):

    python bench/smtp_sink.py --port 2526 --cert sink.pem --key sink.key

Supports EHLO, STARTTLS, MAIL, RCPT, DATA, RSET, NOOP, QUIT; counts messages and prints the
count on SIGTERM. Not a test double for correctness (tests use aiosmtpd): only for speed.
``--record FILE`` appends each accepted message's Message-ID to FILE (one line each, flushed), so
a benchmark can count what arrived, and what arrived twice. ``--record-opens FILE`` appends each
message's open-pixel path (``/t/o/<token>.gif``, read from its HTML part as a mail client reads
it) to FILE, so a benchmark can open what was received (bench/campaign_million.py).
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import re
import signal
import ssl

COUNT = 0
RECORD = None
OPENS = None
_PIXEL = re.compile(r"/t/o/[A-Za-z0-9_\-]+\.gif")


async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext) -> None:
    global COUNT

    def send(data: bytes) -> None:
        writer.write(data)

    send(b"220 sink.bench ESMTP\r\n")
    tls = False
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = line[:4].upper()
            if cmd == b"EHLO":
                ext = b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                if not tls:
                    ext += b"250-STARTTLS\r\n"
                send(ext + b"250 SIZE 52428800\r\n")
            elif cmd == b"STAR":
                send(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                await writer.start_tls(ctx)
                tls = True
            elif cmd in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                send(b"250 2.0.0 OK\r\n")
            elif cmd == b"DATA":
                send(b"354 go ahead\r\n")
                await writer.drain()
                data = await reader.readuntil(b"\r\n.\r\n")
                COUNT += 1
                if RECORD is not None:
                    RECORD.write(_message_id(data) + "\n")
                    RECORD.flush()
                if OPENS is not None:
                    pixel = _open_pixel(data)
                    if pixel:
                        OPENS.write(pixel + "\n")
                        OPENS.flush()
                send(b"250 2.0.0 Ok: queued\r\n")
            elif cmd == b"QUIT":
                send(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                send(b"500 5.5.2 what\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        return
    finally:
        writer.close()


def _message_id(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode("ascii", "replace")
    return "-"


_PIXEL_RAW = re.compile(rb"/t/o/[A-Za-z0-9_\-]+\.gif")


def _open_pixel(data: bytes) -> str | None:
    """The open pixel's path in the message's HTML part (transfer encoding undone), if any: found
    in the raw message when no soft line break cuts it (quoted-printable; the cheap way), else
    through the parsed message."""
    found = _PIXEL_RAW.search(data)
    if found and b"=\r\n" not in data[max(0, found.start() - 80):found.end()]:
        return found.group(0).decode()
    message = email.message_from_bytes(data.replace(b"\r\n..", b"\r\n."), policy=email.policy.default)
    for part in message.walk():
        if part.get_content_type() == "text/html":
            found = _PIXEL.search(part.get_content())
            if found:
                return found.group(0)
    return None


async def main() -> None:
    global RECORD, OPENS
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--record", default=None, help="append each message's Message-ID to this file")
    parser.add_argument("--record-opens", default=None,
                        help="append each message's open-pixel path (/t/o/<token>.gif) to this file")
    args = parser.parse_args()
    if args.record:
        RECORD = open(args.record, "a")
    if args.record_opens:
        OPENS = open(args.record_opens, "a")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server = await asyncio.start_server(lambda r, w: client(r, w, ctx), "127.0.0.1", args.port, limit=1 << 22)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()
    import time

    print(f"cpu {time.process_time():.2f} received {COUNT}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
