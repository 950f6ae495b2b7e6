"""Header protection for PGP/MIME and S/MIME (RFC 9788, the LAMPS header-protection draft as
published; and the ``protected-headers="v1"`` convention Thunderbird reads).

An encrypted message used to leave its header section readable: the patient's name in the
``To:`` display name, the real Subject, and any custom header. Now:

* the **inner** MIME entity — what gets signed and encrypted — starts with the full original
  header section (From, To, Cc, Reply-To, Subject, Date, Message-ID, custom headers), then one
  ``HP-Outer`` field per header as it travels outside (RFC 9788 2.2), and its Content-Type
  carries ``hp="cipher"`` (RFC 9788) and ``protected-headers="v1"`` (Thunderbird, Enigmail);
* the **outer** header section keeps only what transport needs: From, To, Cc and Reply-To as
  bare addresses (no display name: a name outside the encryption is PHI), a neutral
  ``Subject: Secure message``, Date, Message-ID, In-Reply-To, References and the
  List-Unsubscribe pair (one-click unsubscribe must keep working). Every other header — custom
  ``X-`` headers included — exists only inside.

A reader that understands header protection shows the inner Subject and names; one that does
not shows "Secure message" and the bare addresses.
"""

from __future__ import annotations

import email.utils

from carepost.delivery.dkim import split_message

OUTER_SUBJECT = "Secure message"
ADDRESS_HEADERS = frozenset({b"from", b"to", b"cc", b"reply-to"})
KEPT_OUTSIDE = ADDRESS_HEADERS | {b"date", b"message-id", b"in-reply-to", b"references", b"list-unsubscribe",
                                  b"list-unsubscribe-post"}


def _bare_addresses(value: bytes) -> bytes:
    text = value.decode("utf-8", "replace").replace("\r\n", "").strip()
    addresses = [addr for _, addr in email.utils.getaddresses([text]) if addr]
    return (" " + ", ".join(addresses)).encode("utf-8") + b"\r\n"


def _with_hp_parameters(value: bytes) -> bytes:
    return value.rstrip(b"\r\n") + b';\r\n hp="cipher"; protected-headers="v1"\r\n'


def protect(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(outer header fields, inner MIME entity to sign and encrypt) for ``message``."""
    headers, body = split_message(message)
    content = [(n, v) for n, v in headers if n.strip().lower().startswith(b"content-")]
    if not content:
        content = [(b"Content-Type", b" text/plain; charset=us-ascii\r\n")]
    envelope = [(n, v) for n, v in headers
                if not n.strip().lower().startswith(b"content-") and n.strip().lower() != b"mime-version"]
    outer: list[tuple[bytes, bytes]] = []
    for name, value in envelope:
        key = name.strip().lower()
        if key == b"subject":
            outer.append((b"Subject", b" " + OUTER_SUBJECT.encode("ascii") + b"\r\n"))
        elif key in ADDRESS_HEADERS:
            outer.append((name, _bare_addresses(value)))
        elif key in KEPT_OUTSIDE:
            outer.append((name, value))
    inner_content = [(n, _with_hp_parameters(v) if n.strip().lower() == b"content-type" else v) for n, v in content]
    hp_outer = [(b"HP-Outer", b" " + n.strip() + b":" + v) for n, v in outer]
    section = envelope + hp_outer + inner_content
    entity = b"".join(n + b":" + v for n, v in section) + b"\r\n" + body
    return outer, entity
