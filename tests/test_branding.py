"""Organization branding (issue 10 item 16): the settings API refuses a bad logo (wrong magic
bytes, too big) and a bad colour with a 422 naming the field and changes nothing; colours can
never inject CSS; the assets are served by organization id with the right types and caching;
patient pages (unsubscribe, preferences, portal, forms) carry the organization's name, logo
and colours; every change is audited; the staff page works for an owner and is refused to
roles without org:manage."""

from __future__ import annotations

import struct
import zlib

import pytest
from sqlalchemy import select

from carepost.accounts import branding
from carepost.audit.models import AuditEvent
from carepost.core.errors import ValidationFailed
from tests.fixtures.accounts import csrf_from, login_client


def png(width: int = 40, height: int = 20, rgb: bytes = b"\x0b\x5c\xad") -> bytes:
    raw = b"".join(b"\x00" + rgb * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def owner_client(client, org, make_user):
    user = make_user(org, role="owner")
    csrf = login_client(client, user)
    client.headers["X-CSRF-Token"] = csrf
    return client


def _actions(session, org_id):
    session.rollback()
    return [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.org_id == org_id).order_by(AuditEvent.seq))]


def test_defaults_then_set_name_and_colours_audited(owner_client, org, session):
    r = owner_client.get("/api/v1/organization/branding")
    assert r.status_code == 200, r.text
    assert r.json() == {"display_name": "", "shown_name": "Bar Clinic", "primary_color": None, "accent_color": None,
                        "logo_url": None, "logo_type": None, "logo_bytes": 0}
    r = owner_client.put("/api/v1/organization/branding",
                         json={"display_name": "Bar Family Clinic", "primary_color": "#7A1F5C", "accent_color": "#e0a800"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shown_name"] == "Bar Family Clinic"
    assert body["primary_color"] == "#7a1f5c" and body["accent_color"] == "#e0a800"
    assert "organization.branding.update" in _actions(session, org.id)


@pytest.mark.parametrize("field,value", [
    ("primary_color", "red"),
    ("primary_color", "#12345"),
    ("primary_color", "#1234567"),
    ("accent_color", "#12g456"),
    ("accent_color", "#fff;}"),
    ("accent_color", "#000000}body{background:url(x)"),
])
def test_bad_colour_is_refused_naming_the_field(owner_client, field, value):
    before = owner_client.get("/api/v1/organization/branding").json()
    r = owner_client.put("/api/v1/organization/branding", json={"display_name": "X", field: value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert value not in r.text  # the submitted value is never echoed
    assert owner_client.get("/api/v1/organization/branding").json() == before  # nothing half-written


def test_display_name_is_one_line(owner_client):
    r = owner_client.put("/api/v1/organization/branding", json={"display_name": "Bar\nClinic"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "display_name"


def test_logo_upload_and_assets(owner_client, org, session, client):
    logo = png()
    r = owner_client.put("/api/v1/organization/branding/logo", content=logo, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json()["logo_type"] == "image/png" and r.json()["logo_bytes"] == len(logo)
    url = r.json()["logo_url"]
    assert url.startswith(f"/b/{org.id}/logo?v=")
    assert "organization.branding.logo_update" in _actions(session, org.id)

    anonymous = client.__class__(client.app, base_url="http://localhost:8000")
    got = anonymous.get(url)
    assert got.status_code == 200 and got.content == logo
    assert got.headers["content-type"] == "image/png"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "max-age" in got.headers["cache-control"]
    assert anonymous.get(url, headers={"If-None-Match": got.headers["etag"]}).status_code == 304

    owner_client.put("/api/v1/organization/branding", json={"primary_color": "#7a1f5c", "accent_color": "#e0a800"})
    css = anonymous.get(f"/b/{org.id}/brand.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "--brand: #7a1f5c;" in css.text and "--accent: #e0a800;" in css.text
    assert "--brand-fg: #ffffff;" in css.text  # white reads better on a dark primary

    r = owner_client.delete("/api/v1/organization/branding/logo")
    assert r.status_code == 200 and r.json()["logo_url"] is None
    assert anonymous.get(url).status_code == 404
    assert anonymous.get("/b/unknownorg/brand.css").status_code == 200  # defaults: an empty :root


@pytest.mark.parametrize("data,reason", [
    (b"GIF89a" + b"\x00" * 100, "not PNG or JPEG"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "SVG"),
    (b"\x89PNX\r\n\x1a\n" + b"\x00" * 40, "wrong magic bytes"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "PNG without its header chunk"),
    (b"", "empty"),
])
def test_bad_logo_is_refused_naming_the_field(owner_client, data, reason):
    r = owner_client.put("/api/v1/organization/branding/logo", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 422, (reason, r.text)
    assert r.json()["error"]["field"] == "logo"
    assert owner_client.get("/api/v1/organization/branding").json()["logo_url"] is None


def test_too_big_logo_is_refused(owner_client):
    big = png(200, 200) + b"\x00" * (branding.MAX_LOGO_BYTES + 1)
    r = owner_client.put("/api/v1/organization/branding/logo", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "logo"
    assert "200 KB" in r.json()["error"]["message"]


def test_jpeg_is_recognised_by_its_bytes():
    assert branding.logo_type_of(b"\xff\xd8\xff\xe0" + b"\x00" * 20 + b"\xff\xd9") == "image/jpeg"
    with pytest.raises(ValidationFailed):
        branding.logo_type_of(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # truncated: no end-of-image marker


def test_stylesheet_is_built_from_numbers_only():
    row = branding.OrganizationBranding(org_id="x", primary_color="#ffffff", accent_color="#000000}")
    css = branding.stylesheet(row)
    assert "}" not in css.split(":root {", 1)[1].rstrip().rstrip("}")  # one block, nothing injected
    assert "--accent" not in css  # an invalid stored value is dropped, never echoed
    assert "--brand-fg: #1c2430;" in css  # dark text on a white primary
    # links darken until they read on white (4.5:1)
    text = css.split("--brand-text: ")[1][:7]
    assert branding._contrast(branding._rgb(text), (255, 255, 255)) >= 4.5


def test_staff_page_saves_and_shows_errors(owner_client, org, session):
    page = owner_client.get("/app/branding")
    assert page.status_code == 200 and "Name shown to patients" in page.text
    csrf = csrf_from(page.text)
    r = owner_client.post("/app/branding", data={"csrf_token": csrf, "display_name": "Bar Care", "primary_color": "#zzzzzz",
                                                  "accent_color": ""}, files={"logo": ("logo.png", png(), "image/png")})
    assert r.status_code == 422 and 'id="primary_color"' in r.text and "six hexadecimal digits" in r.text
    assert owner_client.get("/api/v1/organization/branding").json()["logo_url"] is None  # nothing half-written
    r = owner_client.post("/app/branding", data={"csrf_token": csrf, "display_name": "Bar Care", "primary_color": "#0f766e",
                                                  "accent_color": "#f59e0b"}, files={"logo": ("logo.png", png(), "image/png")},
                          follow_redirects=False)
    assert r.status_code == 303, r.text
    data = owner_client.get("/api/v1/organization/branding").json()
    assert data["shown_name"] == "Bar Care" and data["primary_color"] == "#0f766e" and data["logo_type"] == "image/png"
    r = owner_client.post("/app/branding", data={"csrf_token": csrf, "display_name": "Bar Care", "primary_color": "#0f766e"},
                          files={"logo": ("logo.gif", b"GIF89a" + b"\x00" * 30, "image/png")})
    assert r.status_code == 422 and "PNG or JPEG" in r.text


def test_roles_without_org_manage_are_refused(client, org, make_user):
    marketer = make_user(org, role="marketer")
    login_client(client, marketer)
    assert client.get("/app/branding").status_code == 403
    assert client.get("/api/v1/organization/branding").status_code == 403


def test_unsubscribe_page_carries_the_organization_brand(owner_client, org, session, client):
    from carepost.consent import service
    from carepost.core.database import system_session
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.patients import service as patients

    owner_client.put("/api/v1/organization/branding", json={"display_name": "Bar Family Clinic", "primary_color": "#7a1f5c"})
    owner_client.put("/api/v1/organization/branding/logo", content=png(), headers={"Content-Type": "image/png"})
    with system_session() as s:
        s.info.pop("scope")
        s.info["org_id"] = org.id
        c = patients.save_contact(s, org.id, {"given_name": "Ada", "email": "ada@example.org"}).contact
        m = Message(org_id=org.id, from_address="care@bar.example", subject_enc=b"x", security="tls_required",
                    purpose="marketing")
        s.add(m)
        s.flush()
        r = MessageRecipient(org_id=org.id, message_id=m.id, address_enc=b"x", domain_index="d", contact_id=c.id,
                             address_index=service.address_index(s, org.id, "ada@example.org"), status="delivered")
        s.add(r)
        s.flush()
        unsub = service.unsubscribe_url(s, org.id, r.id, None).split("localhost:8000")[-1]
        s.commit()
    anonymous = client.__class__(client.app, base_url="http://localhost:8000")
    html = anonymous.get(unsub).text
    assert "Bar Family Clinic" in html and f"/b/{org.id}/logo?v=" in html and f"/b/{org.id}/brand.css?v=" in html
    assert "CarePost" not in html.split("<body", 1)[1]  # not CarePost's name on a patient page
