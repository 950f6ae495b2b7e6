"""The one attachment allow-list (issue 9 item 27), used wherever an attachment enters or leaves:
the messages API and batch, SMTP submission (both through ``messages.prepare_message``) and the
secure portal's downloads.

A deny-list let through what it did not name (``.html`` with script, ``.svg`` with ``onload``,
macro-enabled Office files); this lists what a healthcare message legitimately carries and
refuses everything else:

* the file name must end in an allowed extension, and the declared type must be one of that
  extension's types (or ``application/octet-stream``);
* the content must match: executables and scripts are refused whatever they claim, signatures of
  well-known formats are checked, Office Open XML must be a ZIP without a VBA project or a
  macro-enabled content type, text must not be markup.
"""

from __future__ import annotations

import io
import zipfile

from carepost.core.errors import ValidationFailed

_OOXML = {
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}
_ODF = {
    "odt": "application/vnd.oasis.opendocument.text",
    "ods": "application/vnd.oasis.opendocument.spreadsheet",
    "odp": "application/vnd.oasis.opendocument.presentation",
}
ALLOWED: dict[str, frozenset[str]] = {
    "pdf": frozenset({"application/pdf"}),
    "png": frozenset({"image/png"}),
    "jpg": frozenset({"image/jpeg"}),
    "jpeg": frozenset({"image/jpeg"}),
    "gif": frozenset({"image/gif"}),
    "webp": frozenset({"image/webp"}),
    "heic": frozenset({"image/heic"}),
    "tif": frozenset({"image/tiff"}),
    "tiff": frozenset({"image/tiff"}),
    "txt": frozenset({"text/plain"}),
    "csv": frozenset({"text/csv", "text/plain"}),
    "ics": frozenset({"text/calendar"}),
    "vcf": frozenset({"text/vcard", "text/x-vcard"}),
    "rtf": frozenset({"application/rtf", "text/rtf"}),
    **{ext: frozenset({ctype}) for ext, ctype in _OOXML.items()},
    **{ext: frozenset({ctype}) for ext, ctype in _ODF.items()},
}
ALLOWED_TYPES = frozenset().union(*ALLOWED.values())
_GENERIC = "application/octet-stream"

_SIGNATURES = {
    "image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",), "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",), "image/webp": (b"RIFF",), "image/tiff": (b"II*\x00", b"MM\x00*"),
    "application/rtf": (b"{\\rtf",), "text/rtf": (b"{\\rtf",),
}
_EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xca\xfe\xba\xbe", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"#!")
_MARKUP = (b"<script", b"<html", b"<svg", b"<!doctype", b"<iframe", b"<?xml", b"javascript:", b"onload=", b"onerror=")


def _refuse(message: str, field: str) -> None:
    raise ValidationFailed(message, field=field)


def check_attachment(filename: str | None, content_type: str | None, content: bytes, field: str, *,
                     inline: bool = False) -> str:
    """Refuse what the allow-list does not cover; returns the normalized content type."""
    name = (filename or "").strip()
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    ctype = (content_type or "").split(";")[0].strip().lower()
    allowed_types = ALLOWED.get(extension)
    if allowed_types is None:
        _refuse(f"Attachments of this kind (.{extension or '?'}) are not allowed; allowed: "
                + ", ".join(f".{e}" for e in sorted(ALLOWED)) + ".", field)
    if ctype and ctype != _GENERIC and ctype not in allowed_types:
        _refuse(f"The type {ctype or '?'} does not match a .{extension} file.", field)
    ctype = ctype if ctype and ctype != _GENERIC else sorted(allowed_types)[0]
    if content.startswith(_EXECUTABLE_MAGIC):
        _refuse("Executable and script attachments are not allowed.", field)
    if inline and not ctype.startswith("image/"):
        _refuse("An inline attachment (content_id) must be an image.", field)
    signatures = _SIGNATURES.get(ctype)
    if signatures and not content.startswith(signatures):
        _refuse(f"The content is not {ctype}.", field)
    if ctype.startswith("text/"):
        head = content[:65536].lower()
        if any(marker in head for marker in _MARKUP):
            _refuse("Text attachments may not contain markup or script.", field)
    if extension in _OOXML or extension in _ODF:
        _check_office(content, extension, field)
    return ctype


def _check_office(content: bytes, extension: str, field: str) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = [n.lower() for n in archive.namelist()]
        types = archive.read("[Content_Types].xml").lower() if "[content_types].xml" in names else b""
    except (zipfile.BadZipFile, KeyError, OSError, ValueError):
        if extension in _OOXML:
            _refuse(f"The content is not a .{extension} document.", field)
        _refuse(f"The content is not a .{extension} document.", field)
        return
    if any(n.endswith("vbaproject.bin") or n.startswith("basic/") or "/basic/" in n for n in names) \
            or b"macroenabled" in types or b"vbaproject" in types:
        _refuse("Macro-enabled documents are not allowed.", field)
