"""Failures in the user's words: what a person sees about a network failure names what went wrong
("the name does not resolve"), never a Python exception class (``gaierror``, ``ConnectError``).

Used wherever a look-up or connection failure reaches a page, an API answer, a delivery reason
or a webhook log: DNS checks of sending domains, MTA-STS and TLS probes, SMTP delivery, webhook
endpoints. Issue 10 item 16.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl


def describe_error(err: BaseException | None) -> str:
    """A short, PHI-free phrase for a failure; follows the cause chain of wrapper exceptions."""
    seen = 0
    while err is not None and seen < 5:
        phrase = _phrase(err)
        if phrase:
            return phrase
        err = err.__cause__ or err.__context__
        seen += 1
    return "an unexpected error"


def _phrase(err: BaseException) -> str | None:
    name = type(err).__name__
    module = type(err).__module__ or ""
    if module.startswith("dns."):  # dnspython
        return {
            "NXDOMAIN": "the name does not exist in DNS",
            "NoAnswer": "DNS has no record of that type for the name",
            "NoNameservers": "no DNS server could answer",
            "LifetimeTimeout": "the DNS server did not answer in time",
            "Timeout": "the DNS server did not answer in time",
        }.get(name, "the DNS look-up failed")
    if module.startswith("httpx") or module.startswith("httpcore"):
        if "Timeout" in name:
            return "no answer in time"
        return None  # look at the cause (a refused connection, an unknown name)
    if isinstance(err, socket.gaierror):
        return "the host name does not resolve (no such host)"
    if isinstance(err, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(err, ConnectionResetError):
        return "the connection was closed by the other side"
    if isinstance(err, (TimeoutError, asyncio.TimeoutError, socket.timeout)):
        return "no answer in time"
    if isinstance(err, ssl.SSLCertVerificationError):
        return "the certificate could not be verified"
    if isinstance(err, ssl.SSLError):
        return "the secure connection (TLS) failed"
    if isinstance(err, OSError) and err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "the host cannot be reached"
    if isinstance(err, OSError) and err.errno is not None:
        return "the connection failed"
    return None
