"""An organization's branding on patient-facing pages: display name, logo and two colours.

Patients open unsubscribe links, the preference center, the secure portal and hosted forms
from a clinic's email; those pages should look like the clinic's, not CarePost's (issue 10
item 16). The branding is public by nature (it is shown to anyone holding a link), so it is
served by organization id only, at ``/b/<org_id>/brand.css`` and ``/b/<org_id>/logo``.

Nothing submitted reaches a stylesheet unchecked: a colour is exactly ``#rrggbb`` (six hex
digits, nothing else), and the stylesheet is written by :func:`stylesheet` from the parsed
numbers, never from the submitted text. A logo is a PNG or JPEG recognised by its magic bytes
(and the PNG header chunk), at most :data:`MAX_LOGO_BYTES`; SVG is refused (it can carry
script). The table is keyed by the organization's id, like ``organizations`` itself: one row
per organization, read only by that key.
"""

from __future__ import annotations

import hashlib
import re
import struct
from datetime import datetime

from sqlalchemy import ForeignKey, LargeBinary, String
from sqlalchemy.orm import Mapped, Session, mapped_column

from carepost.core import clock
from carepost.core.database import Base
from carepost.core.errors import ValidationFailed

MAX_LOGO_BYTES = 200 * 1024
MAX_LOGO_SIDE = 4096  # pixels; a logo is shown at most 48 px high, this only stops absurd headers
COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class OrganizationBranding(Base):
    __tablename__ = "organization_branding"

    org_id: Mapped[str] = mapped_column(String(32), ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    primary_color: Mapped[str | None] = mapped_column(String(7))
    accent_color: Mapped[str | None] = mapped_column(String(7))
    logo: Mapped[bytes | None] = mapped_column(LargeBinary)
    logo_type: Mapped[str | None] = mapped_column(String(20))
    version: Mapped[str] = mapped_column(String(16), default="0")  # in asset URLs: a change is a new URL
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


# --------------------------------------------------------------------------- validation

def parse_colour(value: str | None, field: str) -> str | None:
    """``#rrggbb`` lower-cased, or None for "use the default". Anything else is refused whole."""
    if value is None or value.strip() == "":
        return None
    value = value.strip()
    if not COLOUR.fullmatch(value):
        raise ValidationFailed("Give a colour as # followed by six hexadecimal digits, e.g. #0b5cad.", field=field)
    return value.lower()


def parse_display_name(value: str | None) -> str:
    value = (value or "").strip()
    if len(value) > 200:
        raise ValidationFailed("The display name is at most 200 characters.", field="display_name")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValidationFailed("The display name is one line of text.", field="display_name")
    return value


def logo_type_of(data: bytes) -> str:
    """The logo's media type, recognised by its bytes, not by a file name or a declared type."""
    if not data:
        raise ValidationFailed("The logo file is empty.", field="logo")
    if len(data) > MAX_LOGO_BYTES:
        raise ValidationFailed(f"The logo is larger than {MAX_LOGO_BYTES // 1024} KB; choose a smaller image.", field="logo")
    if data.startswith(PNG_MAGIC):
        # the first chunk of every PNG is IHDR: width and height, big-endian
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValidationFailed("The logo is not a valid PNG image.", field="logo")
        width, height = struct.unpack(">II", data[16:24])
        if not (0 < width <= MAX_LOGO_SIDE and 0 < height <= MAX_LOGO_SIDE):
            raise ValidationFailed(f"The logo is at most {MAX_LOGO_SIDE} pixels on each side.", field="logo")
        return "image/png"
    if data.startswith(JPEG_MAGIC) and data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "image/jpeg"
    raise ValidationFailed("The logo must be a PNG or JPEG image.", field="logo")


# --------------------------------------------------------------------------- storage

def get_branding(session: Session, org_id: str) -> OrganizationBranding | None:
    return session.get(OrganizationBranding, org_id)


def _row(session: Session, org_id: str) -> OrganizationBranding:
    row = session.get(OrganizationBranding, org_id)
    if row is None:
        row = OrganizationBranding(org_id=org_id, display_name="")
        session.add(row)
    return row


def _bump(row: OrganizationBranding) -> None:
    digest = hashlib.sha256(
        b"|".join([(row.display_name or "").encode(), (row.primary_color or "").encode(), (row.accent_color or "").encode(),
                   row.logo or b"", clock.now().isoformat().encode()])
    ).hexdigest()
    row.version = digest[:12]


def set_branding(session: Session, org_id: str, *, display_name: str | None, primary_color: str | None,
                 accent_color: str | None) -> tuple[OrganizationBranding, list[str]]:
    """Validates every field before changing any; returns the row and the names of changed fields."""
    name = parse_display_name(display_name)
    primary = parse_colour(primary_color, "primary_color")
    accent = parse_colour(accent_color, "accent_color")
    row = _row(session, org_id)
    changed = [f for f, new in (("display_name", name), ("primary_color", primary), ("accent_color", accent))
               if (getattr(row, f) or None) != (new or None)]
    row.display_name, row.primary_color, row.accent_color = name, primary, accent
    _bump(row)
    session.flush()
    return row, changed


def set_logo(session: Session, org_id: str, data: bytes) -> OrganizationBranding:
    media_type = logo_type_of(data)
    row = _row(session, org_id)
    row.logo, row.logo_type = data, media_type
    _bump(row)
    session.flush()
    return row


def remove_logo(session: Session, org_id: str) -> OrganizationBranding | None:
    row = session.get(OrganizationBranding, org_id)
    if row is not None and row.logo is not None:
        row.logo, row.logo_type = None, None
        _bump(row)
        session.flush()
    return row


# --------------------------------------------------------------------------- what pages show

def brand_for(session: Session, org_id: str | None) -> dict | None:
    """What a patient-facing page needs: the name to show, and asset URLs (ids only)."""
    if not org_id:
        return None
    from carepost.accounts.models import Organization

    org = session.get(Organization, org_id)
    if org is None:
        return None
    row = session.get(OrganizationBranding, org_id)
    name = (row.display_name if row is not None and row.display_name else "") or org.name
    version = row.version if row is not None else "0"
    has_colours = row is not None and bool(row.primary_color or row.accent_color)
    has_logo = row is not None and row.logo is not None
    return {
        "org_id": org_id,
        "name": name,
        "css_url": f"/b/{org_id}/brand.css?v={version}" if has_colours else None,
        "logo_url": f"/b/{org_id}/logo?v={version}" if has_logo else None,
    }


def branding_dict(session: Session, org_id: str) -> dict:
    """The settings as the API and the staff page show them."""
    from carepost.accounts.models import Organization

    org = session.get(Organization, org_id)
    row = session.get(OrganizationBranding, org_id)
    brand = brand_for(session, org_id) or {}
    return {
        "display_name": row.display_name if row is not None else "",
        "shown_name": brand.get("name") or (org.name if org else ""),
        "primary_color": row.primary_color if row is not None else None,
        "accent_color": row.accent_color if row is not None else None,
        "logo_url": brand.get("logo_url"),
        "logo_type": row.logo_type if row is not None else None,
        "logo_bytes": len(row.logo) if row is not None and row.logo is not None else 0,
    }


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c))):02x}" for c in rgb)


def _luminance(rgb: tuple[float, float, float]) -> float:
    def channel(c: float) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _darken(rgb: tuple[float, float, float], factor: float) -> tuple[float, float, float]:
    return tuple(c * factor for c in rgb)  # type: ignore[return-value]


def stylesheet(row: OrganizationBranding | None) -> str:
    """CSS custom properties from validated colours, re-formatted from numbers (never echoed text).

    Button text is white or near-black, whichever reads better on the primary colour; link text
    is the primary colour darkened until it reaches 4.5:1 on white (WCAG AA)."""
    lines = ["/* Organization branding (CarePost): colours only. */", ":root {"]
    white, ink = (255, 255, 255), (28, 36, 48)
    primary = _rgb(row.primary_color) if row is not None and row.primary_color and COLOUR.fullmatch(row.primary_color) else None
    accent = _rgb(row.accent_color) if row is not None and row.accent_color and COLOUR.fullmatch(row.accent_color) else None
    if primary is not None:
        link = primary
        while _contrast(link, white) < 4.5:
            link = _darken(link, 0.9)
        lines += [
            f"  --brand: {_hex(primary)};",
            f"  --brand-dark: {_hex(_darken(primary, 0.82))};",
            f"  --brand-fg: {_hex(white) if _contrast(primary, white) >= _contrast(primary, ink) else _hex(ink)};",
            f"  --brand-text: {_hex(link)};",
        ]
    if accent is not None:
        lines.append(f"  --accent: {_hex(accent)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
