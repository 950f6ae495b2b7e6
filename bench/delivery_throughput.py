"""Delivery throughput: personalized, DKIM-signed messages through one worker process to a
local TLS sink, over verified TLS (the path a protected message takes).

    .venv/bin/python bench/delivery_throughput.py --count 20000 --concurrency 16
    .venv/bin/python bench/delivery_throughput.py --count 200000 --ed25519   # memory flatness

Per message: compose (multipart/alternative, personalized text and html, List-Unsubscribe),
DKIM-sign (RSA-2048 via OpenSSL; with --ed25519 also Ed25519), deliver through the pooled
DeliveryClient with require_verified_tls=True to bench/smtp_sink.py in its own process (found
through CAREPOST_MX_OVERRIDES, certificate from a throw-away CA via CAREPOST_EXTRA_CA_FILE).
Prints JSON: messages per second, and resident memory sampled during the run.

Speed is measured here, never asserted in tests (ARCHITECTURE.md section 7).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CarePost bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
          .not_valid_after(now + timedelta(days=2)).add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.sink.test")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.sink.test")]), False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "sink.pem", directory / "sink.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file


TEXT = """Dear {name},

this is a reminder of your appointment with {doctor} on {date} at the Bar Clinic.
Please bring your insurance card and a list of the medicines you take.

Kind regards,
Bar Clinic
"""
HTML = """<!doctype html><html><body><p>Dear {name},</p>
<p>this is a reminder of your appointment with <strong>{doctor}</strong> on {date} at the Bar Clinic.
Please bring your insurance card and a list of the medicines you take.</p>
<p>Kind regards,<br>Bar Clinic</p>
<p><a href="https://bar.example/t/u/{token}">Unsubscribe</a></p></body></html>"""


async def run(args) -> dict:
    from carepost.delivery import dkim
    from carepost.delivery.mime import compose
    from carepost.delivery.smtp import DeliveryClient, Envelope

    keys = [dkim.DkimKey("bar.example", "cpbench", dkim.generate_rsa_key())]
    if args.ed25519:
        keys.append(dkim.DkimKey("bar.example", "cpbenche", dkim.generate_ed25519_key()))

    def build(i: int) -> Envelope:
        address = f"patient{i}@sink.test"
        composed = compose(
            sender="Bar Clinic <news@bar.example>", to=[f"Patient {i} <{address}>"], subject="Your appointment",
            text=TEXT.format(name=f"Patient {i}", doctor="Dr. Lee", date="March 3"),
            html=HTML.format(name=f"Patient {i}", doctor="Dr. Lee", date="March 3", token=f"{i:032x}"),
            list_unsubscribe=[f"https://bar.example/t/u/{i:032x}"], list_unsubscribe_post=True,
        )
        signed = dkim.sign(composed.as_bytes(), keys)
        return Envelope(sender=f"b+{i:032x}.0000000000000000@bounces.bar.example", recipients=composed.recipients,
                        message=signed, require_verified_tls=True)

    counts = {"delivered": 0, "other": 0}
    samples: list[tuple[int, float]] = []
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=args.concurrency * 4)

    async def producer():
        for i in range(args.count):
            await queue.put(i)
        for _ in range(args.concurrency):
            await queue.put(None)

    async with DeliveryClient(pool_size=args.connections, max_messages_per_connection=1000) as client:
        async def worker():
            while (i := await queue.get()) is not None:
                [result] = await client.deliver(build(i))
                counts["delivered" if result.status == "delivered" else "other"] += 1
                done = counts["delivered"] + counts["other"]
                if done % max(1, args.count // 20) == 0:
                    samples.append((done, round(rss_mib(), 1)))

        # Warm up the pool and the TLS session before timing.
        [warm] = await client.deliver(build(args.count))
        assert warm.status == "delivered", warm.reason
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(producer(), *(worker() for _ in range(args.concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        opened = client.pool.opened
    return {
        "messages": args.count, "seconds": round(elapsed, 2), "messages_per_second": round(args.count / elapsed, 1), "cpu_ms_per_message": round(cpu * 1000 / args.count, 2),
        "delivered": counts["delivered"], "other": counts["other"], "signatures": [k.algorithm for k in keys],
        "concurrency": args.concurrency, "connections": args.connections, "connections_opened": opened,
        "rss_mib": samples,
    }


def main() -> None:
    from carepost.assembly import assemble

    assemble()  # the one composition root, as every entry point
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--connections", type=int, default=8, help="pooled connections to the sink")
    parser.add_argument("--ed25519", action="store_true", help="add the second (Ed25519) DKIM signature")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca_file, cert_file, key_file = make_certificates(Path(tmp))
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        sink = subprocess.Popen([sys.executable, str(Path(__file__).with_name("smtp_sink.py")), "--port", str(port),
                                 "--cert", str(cert_file), "--key", str(key_file)], stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout.readline().strip() == "ready"
            os.environ.update({
                "CAREPOST_MX_OVERRIDES": f"sink.test=mx.sink.test@127.0.0.1:{port}",
                "CAREPOST_EXTRA_CA_FILE": str(ca_file),
                "CAREPOST_SMTP_HELO_NAME": "bench.carepost.example",
                "CAREPOST_LOG_LEVEL": "WARNING",
            })
            from carepost.core.config import reset_settings

            reset_settings()
            result = asyncio.run(run(args))
        finally:
            sink.terminate()
            out, _ = sink.communicate(timeout=10)
        result["sink_received"] = int(out.split()[-1]) if out.strip() else None
        result["sink_cpu_seconds"] = float(out.split()[-3]) if out.strip() else None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
