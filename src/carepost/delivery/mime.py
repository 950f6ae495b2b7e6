"""MIME composition: one place where a message becomes bytes.

Why this module exists instead of ad-hoc ``EmailMessage`` use at every call site:

* Header injection must be impossible through any input. Every header value that comes from a
  caller is checked for CR/LF (and other control characters) *before* it reaches the email
  package, and the error names the header, so an API client learns which field was wrong.
* Addresses are parsed strictly (dot-atom local parts only; no comments, no quoted strings, no
  group syntax), because lenient parsers (``email.utils.parseaddr``) have a history of reading
  two addresses where the user wrote one.
* Internationalized addresses: an IDN domain is converted to its A-label (``xn--``) form, which
  needs nothing special from the receiving server. A non-ASCII local part (RFC 6531) needs the
  SMTPUTF8 extension; the message is then marked ``smtputf8`` and serialized with UTF-8 headers,
  and the SMTP client refuses to send it to a server that does not offer SMTPUTF8. A caller that
  cannot accept that passes ``allow_smtputf8=False`` and gets a clear error instead.

Structure (RFC 2045-2049, RFC 2387)::

    multipart/mixed                     (only when there are attachments)
      multipart/alternative             (only when there are both text and html)
        text/plain
        multipart/related               (only when there are inline images)
          text/html
          image/png  Content-ID: <cid>
      application/pdf  (attachment)
"""

from __future__ import annotations

import base64
import binascii
import email
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime
from urllib.parse import quote

from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.core.ids import new_id

# Serialization policies: CRLF line endings, 78-column folding. Bodies are always 7-bit clean
# (quoted-printable or base64), so 8BITMIME is never needed from the receiving server.
SMTP_POLICY = email_policy.SMTP.clone(cte_type="7bit")
SMTPUTF8_POLICY = email_policy.SMTPUTF8.clone(cte_type="7bit")

# RFC 5322 atext, for dot-atom local parts.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ASCII_LOCAL_RE = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
# RFC 6531: any UTF-8 character beyond ASCII is also allowed in the local part.
_UTF8_LOCAL_RE = re.compile(rf"^(?:{_ATEXT}|[^\x00-\x7f])+(?:\.(?:{_ATEXT}|[^\x00-\x7f])+)*$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_HEADER_NAME_RE = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'
_CID_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,200}$")
_CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")
_NAMED_ADDRESS_RE = re.compile(r"^\s*(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]+)>\s*$")
# C0/C1 controls and the Unicode line/paragraph separators (str.splitlines breaks on all of them).
_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")

# Headers compose() sets itself; a caller may not supply them through ``headers``.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From", "To", "Cc", "Bcc", "Reply-To", "Subject", "Date", "Message-ID", "MIME-Version",
        "Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "Content-ID",
        "Return-Path", "Sender", "DKIM-Signature", "List-Unsubscribe", "List-Unsubscribe-Post",
        "Received", "Resent-From", "Resent-To", "Resent-Date", "Resent-Message-ID",
    )
)

MAX_HEADER_VALUE_CHARS = 998 * 4  # folded; far beyond any legitimate subject or name
MAX_ADDRESS_CHARS = 254  # RFC 5321 path limit, minus the angle brackets


@dataclass(frozen=True)
class MailAddress:
    """A parsed mailbox. ``domain`` is always the ASCII (A-label) form."""

    local: str
    domain: str
    display_name: str = ""

    @property
    def addr_spec(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        return not self.local.isascii()


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class InlineImage:
    """An image the HTML refers to as ``<img src="cid:{cid}">``."""

    cid: str
    content: bytes
    content_type: str = "image/png"
    filename: str | None = None


@dataclass
class ComposedMessage:
    raw: bytes  # the wire form: CRLF line ends, 7-bit bodies, folded headers
    envelope_from: str
    recipients: list[str]
    message_id: str
    smtputf8: bool = False
    # Header names the DKIM signature must cover beyond the standard set (e.g. List-Unsubscribe).
    signed_extra_headers: list[str] = field(default_factory=list)

    @property
    def policy(self):
        return SMTPUTF8_POLICY if self.smtputf8 else SMTP_POLICY

    def as_bytes(self) -> bytes:
        return self.raw

    @property
    def message(self) -> EmailMessage:
        """The message parsed back (for inspection; composition never goes through it)."""
        return email.message_from_bytes(self.raw, policy=self.policy)


def check_header_value(name: str, value: str) -> str:
    """Refuse a header value that could end the header (CR, LF) or carries control characters.

    This is the single guard against header injection: compose() runs every caller-supplied
    header value through it, including display names, file names and List-Unsubscribe URIs."""
    if not isinstance(value, str):
        raise ValidationFailed(f"The {name} header must be text.", field=_field_name(name))
    if "\r" in value or "\n" in value or "\x85" in value or "\u2028" in value or "\u2029" in value:
        raise ValidationFailed(
            f"The {name} header may not contain line breaks (CR or LF).", field=_field_name(name)
        )
    if _CONTROL_RE.search(value):
        raise ValidationFailed(f"The {name} header may not contain control characters.", field=_field_name(name))
    if len(value) > MAX_HEADER_VALUE_CHARS:
        raise ValidationFailed(f"The {name} header is too long.", field=_field_name(name))
    return value


def _field_name(header: str) -> str:
    return header.lower().replace("-", "_")


def ascii_domain(domain: str, *, field_name: str = "address") -> str:
    """The A-label form of a domain (IDNA), validated label by label."""
    domain = domain.strip().rstrip(".")
    if not domain:
        raise ValidationFailed("The address has no domain.", field=field_name)
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValidationFailed("The address has an invalid internationalized domain.", field=field_name) from None
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL_RE.match(label) for label in labels) or len(domain) > 253:
        raise ValidationFailed("The address has an invalid domain.", field=field_name)
    return domain.lower()


def parse_address(value: str, *, field_name: str = "address", allow_display_name: bool = True,
                  allow_smtputf8: bool = True) -> MailAddress:
    """Parse ``addr@domain`` or ``Display Name <addr@domain>`` strictly.

    Errors name ``field_name`` and never echo the address (it may be PHI)."""
    if not isinstance(value, str):
        raise ValidationFailed("The address must be text.", field=field_name)
    check_header_value(field_name, value)
    display = ""
    raw = value.strip()
    named = _NAMED_ADDRESS_RE.match(raw)
    if named:
        if not allow_display_name:
            raise ValidationFailed("Give the bare address, without a display name.", field=field_name)
        display = named.group("name").strip()
        if len(display) >= 2 and display[0] == display[-1] == '"':
            display = display[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        raw = named.group("addr").strip()
    if raw.count("@") != 1:
        raise ValidationFailed("The address must have the form name@domain.", field=field_name)
    local, domain = raw.rsplit("@", 1)
    if not local or len(local) > 64:
        raise ValidationFailed("The address has an invalid local part.", field=field_name)
    if local.isascii():
        if not _ASCII_LOCAL_RE.match(local):
            raise ValidationFailed("The address has an invalid local part.", field=field_name)
    else:
        if not allow_smtputf8:
            raise ValidationFailed(
                "Addresses with non-ASCII characters before the @ need SMTPUTF8, which is not allowed here.",
                field=field_name,
                code="smtputf8_not_allowed",
            )
        if not _UTF8_LOCAL_RE.match(local) or any(not ch.isprintable() for ch in local):
            raise ValidationFailed("The address has an invalid local part.", field=field_name)
    domain = ascii_domain(domain, field_name=field_name)
    address = MailAddress(local=local, domain=domain, display_name=display)
    if len(address.addr_spec.encode()) > MAX_ADDRESS_CHARS:
        raise ValidationFailed("The address is too long.", field=field_name)
    return address


def message_id_for(domain: str) -> str:
    """A globally unique Message-ID in the sending domain (RFC 5322 3.6.4)."""
    return f"<{new_id()}@{ascii_domain(domain, field_name='from')}>"


# --- VERP ------------------------------------------------------------------------------------
# The return path names the recipient row (an opaque id, never the address) and a MAC over it,
# so a bounce arriving at the return-path domain is tied to the exact recipient and forged
# bounces (someone mailing b+<guessed id>@...) are recognised and ignored.

_BODY_END = re.compile(r"</body>", re.IGNORECASE)


def body_end(html: str) -> int:
    """Where the last ``</body>`` (in any case) of ``html`` starts, or -1: where a footer, a link or
    the open pixel goes. Searched in ``html`` itself, not in ``html.lower()``, which can be longer
    than ``html`` (``"İ".lower()`` is two characters: an index found there would point past the
    tag in a message to İbrahim), and which copies the whole body once more per message."""
    at = html.rfind("</body>")
    for m in _BODY_END.finditer(html, at + 1 if at != -1 else 0):  # a later </BODY> in another case wins
        at = m.start()
    return at


_VERP_RE = re.compile(r"^(?P<prefix>[a-z0-9-]+)\+(?P<id>[0-9a-f]{32})\.(?P<mac>[0-9a-f]{16})@(?P<domain>.+)$")


def _verp_mac(secret: bytes, recipient_id: str) -> str:
    return hmac.new(secret, f"verp:{recipient_id}".encode(), hashlib.sha256).hexdigest()[:16]


def verp_address(return_domain: str, recipient_id: str, secret: bytes, *, prefix: str = "b") -> str:
    """``b+<recipient id>.<mac>@<return domain>``: the envelope sender for one recipient."""
    if not re.fullmatch(r"[0-9a-f]{32}", recipient_id):
        raise ValueError("recipient_id must be a CarePost id")
    if not re.fullmatch(r"[a-z0-9-]+", prefix):
        raise ValueError("prefix must be lower-case letters, digits and hyphens")
    return f"{prefix}+{recipient_id}.{_verp_mac(secret, recipient_id)}@{ascii_domain(return_domain, field_name='return_path')}"


def parse_verp(address: str, secret: bytes, *, prefix: str = "b") -> str | None:
    """The recipient id a VERP address names, or None when it is not one of ours (or forged)."""
    m = _VERP_RE.match((address or "").strip().strip("<>").lower())
    if not m or m.group("prefix") != prefix:
        return None
    if not hmac.compare_digest(m.group("mac"), _verp_mac(secret, m.group("id"))):
        return None
    return m.group("id")


# --- composition -----------------------------------------------------------------------------


def _split_type(content_type: str, field_name: str) -> tuple[str, str]:
    if not isinstance(content_type, str) or not _CONTENT_TYPE_RE.match(content_type):
        raise ValidationFailed("The content type must look like type/subtype.", field=field_name)
    maintype, subtype = content_type.lower().split("/", 1)
    if maintype in ("multipart", "message"):
        raise ValidationFailed("Attachments may not be multipart or message types.", field=field_name)
    return maintype, subtype


def _unsubscribe_header(uris: list[str]) -> str:
    parts = []
    for uri in uris:
        check_header_value("List-Unsubscribe", uri)
        # RFC 2369: http(s) or mailto; one-click (RFC 8058) needs https, checked in compose.
        if not uri.startswith(("https://", "http://", "mailto:")):
            raise ValidationFailed("List-Unsubscribe URIs must be https:, http: or mailto:.", field="list_unsubscribe")
        if any(ch in uri for ch in "<> \t,") or not uri.isascii():
            raise ValidationFailed("A List-Unsubscribe URI has characters that are not allowed.", field="list_unsubscribe")
        parts.append(f"<{uri}>")
    return ", ".join(parts)


# --- serialization ----------------------------------------------------------------------------
# Headers and bodies are written directly as bytes (the email package's header registry costs
# about 2 ms a message, which would cap a worker near 400 messages a second). The tests parse
# every shape this produces back with the email package to prove it standard.

_PLAIN_PHRASE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+$")
_FILENAME_MAX = 255
MAX_LINE = 78


def _check_filename(filename, field_name: str) -> None:
    if not isinstance(filename, str) or not filename.strip():
        raise ValidationFailed("Each attachment needs a file name.", field=field_name)
    check_header_value("Content-Disposition", filename)
    if "/" in filename or "\\" in filename:
        raise ValidationFailed("Attachment file names may not contain path separators.", field=field_name)
    if len(filename) > _FILENAME_MAX:
        raise ValidationFailed("An attachment file name is too long.", field=field_name)


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 B-encoded words of at most 75 characters, never splitting a character."""
    words, chunk = [], b""
    for ch in text:
        data = ch.encode("utf-8")
        if len(chunk) + len(data) > 45:
            words.append(chunk)
            chunk = b""
        chunk += data
    if chunk or not words:
        words.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(w).decode('ascii')}?=" for w in words]


def _fold_words(name: str, words: list[str], sep: str = " ") -> bytes:
    """``Name: w1 w2...`` folded before a word when a line would pass 78 characters."""
    lines, line = [], f"{name}:"
    for i, word in enumerate(words):
        piece = (" " if i == 0 else sep) + word
        if len(line) + len(piece) > MAX_LINE and line.strip() != f"{name}:":
            lines.append(line + (sep.rstrip() if i else ""))
            line = " " + word
        else:
            line += piece
    lines.append(line)
    return "\r\n".join(lines).encode("utf-8") + b"\r\n"


def _text_header(name: str, value: str, utf8: bool) -> bytes:
    """An unstructured header (RFC 5322 3.2.5): folded at spaces; non-ASCII as encoded words
    unless the message travels as SMTPUTF8."""
    if not value:
        return f"{name}: \r\n".encode("ascii")
    if value.isascii() or utf8:
        words = value.split(" ")
        if max(len(w) for w in words) <= 900 and "=?" not in value:
            # Leading, trailing and repeated spaces survive: folding only inserts CRLF before a space.
            lines, line = [], f"{name}: {words[0]}"
            for word in words[1:]:
                if len(line) + 1 + len(word) > MAX_LINE and line.strip():
                    lines.append(line)
                    line = " " + word
                else:
                    line += " " + word
            lines.append(line)
            return "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return _fold_words(name, _encoded_words(value))


def _phrase(display: str, utf8: bool) -> str:
    if _PLAIN_PHRASE.match(display) and display.strip() == display and "  " not in display and "=?" not in display:
        return display
    if display.isascii() or utf8:
        return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return " ".join(_encoded_words(display))


def _mailbox(address: MailAddress, utf8: bool) -> str:
    if not address.display_name:
        return address.addr_spec
    return f"{_phrase(address.display_name, utf8)} <{address.addr_spec}>"


def _address_header(name: str, addresses: list[MailAddress], utf8: bool) -> bytes:
    return _fold_list(name, [_mailbox(a, utf8) for a in addresses])


def _fold_list(name: str, items: list[str]) -> bytes:
    """Comma-separated items, each kept whole, folded between items."""
    lines, line = [], f"{name}:"
    for i, item in enumerate(items):
        piece = (" " if i == 0 else ", ") + item
        if i and len(line) + len(piece) > MAX_LINE:
            lines.append(line + ",")
            line = " " + item
        else:
            line += piece
    lines.append(line)
    return "\r\n".join(lines).encode("utf-8") + b"\r\n"


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n").encode("utf-8")


def _qp(text: str) -> bytes:
    encoded = binascii.b2a_qp(_crlf(text), istext=True, header=False)
    # b2a_qp writes soft line breaks as "=\n" when the text before them held no CRLF (one long
    # line): make every line ending CRLF, or DKIM body hashes differ once the wire normalizes.
    encoded = re.sub(rb"(?<!\r)\n", b"\r\n", encoded)
    # b2a_qp keeps a lone final line unterminated; every part body ends with CRLF.
    return encoded if encoded.endswith(b"\r\n") else encoded + b"\r\n"


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(bytes(data)).replace(b"\n", b"\r\n")


def _param(name: str, value: str) -> str:
    """A MIME parameter, RFC 2231 encoded when it is not plain ASCII."""
    if value.isascii() and '"' not in value and "\\" not in value:
        return f'{name}="{value}"'
    return f"{name}*=utf-8''{quote(value, safe='')}"


def _text_part(subtype: str, text: str) -> bytes:
    return (f"Content-Type: text/{subtype}; charset=utf-8\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode("ascii") + _qp(text)


def _image_part(image: InlineImage, ctype: str) -> bytes:
    disposition = "inline" + (f"; {_param('filename', image.filename)}" if image.filename else "")
    return (f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\nContent-ID: <{image.cid}>\r\n"
            f"Content-Disposition: {disposition}\r\n\r\n").encode("ascii") + _b64(image.content)


def _attachment_part(attachment: Attachment, ctype: str) -> bytes:
    name = _param("filename", attachment.filename)
    return (f"Content-Type: {ctype}; {_param('name', attachment.filename)}\r\n"
            f"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment;\r\n {name}\r\n\r\n"
            ).encode("ascii") + _b64(attachment.content)


def _multipart(subtype: str, parts: list[bytes], params: str = "") -> bytes:
    # "=_" cannot occur in quoted-printable or base64 output, so the boundary never collides.
    boundary = f"=_cp_{secrets.token_hex(12)}"
    extra = f" {params};" if params else ""
    out = [f'Content-Type: multipart/{subtype};{extra}\r\n boundary="{boundary}"\r\n\r\n'.encode("ascii")]
    for part in parts:
        out.append(f"--{boundary}\r\n".encode("ascii") + part + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def compose(
    *,
    sender: str,
    to: list[str],
    subject: str,
    text: str | None = None,
    html: str | None = None,
    cc: list[str] | tuple = (),
    bcc: list[str] | tuple = (),
    reply_to: str | None = None,
    inline_images: list[InlineImage] | tuple = (),
    attachments: list[Attachment] | tuple = (),
    return_path: str | None = None,
    list_unsubscribe: list[str] | None = None,
    list_unsubscribe_post: bool = False,
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
    date: datetime | None = None,
    max_attachment_bytes: int | None = None,
    allow_smtputf8: bool = True,
) -> ComposedMessage:
    """Build a standards-compliant message. Bcc recipients are in the envelope, never a header."""
    if text is None and html is None:
        raise ValidationFailed("A message needs a text or an html body.", field="text")
    for name, body in (("text", text), ("html", html)):
        if body is not None and not isinstance(body, str):
            raise ValidationFailed(f"The {name} body must be text.", field=name)
    if not isinstance(subject, str):
        raise ValidationFailed("The subject must be text.", field="subject")
    check_header_value("Subject", subject)
    # Leading white space after "Subject:" is not part of the value (RFC 5322 2.2.3); drop it
    # here so plain and encoded subjects read back the same.
    subject = subject.lstrip(" \t")

    kw = {"allow_smtputf8": allow_smtputf8}
    from_addr = parse_address(sender, field_name="from", **kw)
    if not to and not cc and not bcc:
        raise ValidationFailed("A message needs at least one recipient.", field="to")
    to_addrs = [parse_address(a, field_name="to", **kw) for a in to]
    cc_addrs = [parse_address(a, field_name="cc", **kw) for a in cc]
    bcc_addrs = [parse_address(a, field_name="bcc", **kw) for a in bcc]
    reply_addr = parse_address(reply_to, field_name="reply_to", **kw) if reply_to else None
    envelope_from = (
        parse_address(return_path, field_name="return_path", allow_display_name=False, **kw).addr_spec
        if return_path
        else from_addr.addr_spec
    )
    everyone = [from_addr, *to_addrs, *cc_addrs, *bcc_addrs] + ([reply_addr] if reply_addr else [])
    smtputf8 = any(a.needs_smtputf8 for a in everyone) or not envelope_from.isascii()

    extra: list[tuple[str, str]] = []
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            raise ValidationFailed("A header name has characters that are not allowed.", field="headers")
        if name.lower() in RESERVED_HEADERS:
            raise ValidationFailed(f"The {name} header is set by CarePost and cannot be given.", field="headers")
        extra.append((name, check_header_value(name, value)))

    signed_extra: list[str] = []
    unsubscribe_value = None
    if list_unsubscribe:
        unsubscribe_value = _unsubscribe_header(list(list_unsubscribe))
        signed_extra.append("List-Unsubscribe")
        if list_unsubscribe_post:
            if not any(u.startswith("https://") for u in list_unsubscribe):
                raise ValidationFailed("One-click unsubscribe needs an https URI.", field="list_unsubscribe")
            signed_extra.append("List-Unsubscribe-Post")
    elif list_unsubscribe_post:
        raise ValidationFailed("List-Unsubscribe-Post needs a List-Unsubscribe URI.", field="list_unsubscribe")

    if message_id is None:
        message_id = message_id_for(from_addr.domain)
    elif not re.fullmatch(r"<[!-;=?-~]+@[A-Za-z0-9.-]+>", message_id):
        raise ValidationFailed("The Message-ID must look like <id@domain>.", field="message_id")

    # Validate every part first, so nothing is half-built when an input is refused.
    total = 0
    images: list[tuple[InlineImage, str]] = []
    if inline_images:
        if html is None:
            raise ValidationFailed("Inline images need an html body.", field="inline_images")
        seen: set[str] = set()
        for image in inline_images:
            if not isinstance(image.cid, str) or not _CID_RE.match(image.cid) or image.cid in seen:
                raise ValidationFailed("Each inline image needs a unique, simple content id.", field="inline_images")
            seen.add(image.cid)
            maintype, subtype = _split_type(image.content_type, "inline_images")
            if maintype != "image":
                raise ValidationFailed("Inline parts must be images.", field="inline_images")
            if image.filename is not None:
                _check_filename(image.filename, "inline_images")
            total += len(image.content)
            images.append((image, f"{maintype}/{subtype}"))
    files: list[tuple[Attachment, str]] = []
    for attachment in attachments:
        maintype, subtype = _split_type(attachment.content_type, "attachments")
        _check_filename(attachment.filename, "attachments")
        if not isinstance(attachment.content, (bytes, bytearray)):
            raise ValidationFailed("Attachment content must be bytes.", field="attachments")
        total += len(attachment.content)
        files.append((attachment, f"{maintype}/{subtype}"))
    if max_attachment_bytes is not None and total > max_attachment_bytes:
        raise ValidationFailed(f"Attachments exceed the limit of {max_attachment_bytes} bytes.", field="attachments")

    head = [
        _address_header("From", [from_addr], smtputf8),
    ]
    if to_addrs:
        head.append(_address_header("To", to_addrs, smtputf8))
    if cc_addrs:
        head.append(_address_header("Cc", cc_addrs, smtputf8))
    if reply_addr:
        head.append(_address_header("Reply-To", [reply_addr], smtputf8))
    head.append(_text_header("Subject", subject, smtputf8))
    head.append(b"Date: " + format_datetime(date or clock.now()).encode("ascii") + b"\r\n")
    head.append(b"Message-ID: " + message_id.encode("ascii") + b"\r\n")
    if unsubscribe_value:
        head.append(_fold_list("List-Unsubscribe", unsubscribe_value.split(", ")))
        if list_unsubscribe_post:
            head.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    for name, value in extra:
        head.append(_text_header(name, value, smtputf8))
    head.append(b"MIME-Version: 1.0\r\n")

    # Bodies: quoted-printable keeps them 7-bit and lines short (RFC 5322 998-octet limit).
    html_part = _text_part("html", html) if html is not None else None
    if images:
        html_part = _multipart("related", [html_part] + [_image_part(img, ctype) for img, ctype in images],
                               'type="text/html"')
    if text is not None and html_part is not None:
        body = _multipart("alternative", [_text_part("plain", text), html_part])
    else:
        body = html_part if html_part is not None else _text_part("plain", text)
    if files:
        body = _multipart("mixed", [body] + [_attachment_part(att, ctype) for att, ctype in files])
    raw = b"".join(head) + body

    recipients = [a.addr_spec for a in (*to_addrs, *cc_addrs, *bcc_addrs)]
    # One envelope recipient once, even when listed in To and Cc.
    recipients = list(dict.fromkeys(recipients))
    return ComposedMessage(
        raw=raw,
        envelope_from=envelope_from,
        recipients=recipients,
        message_id=message_id,
        smtputf8=smtputf8,
        signed_extra_headers=signed_extra,
    )
