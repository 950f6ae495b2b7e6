"""SPF and DMARC validation with checkdmarc on the sending-domain page (issue 13 item 7), against
Debian's ``nsd`` serving real zones on 127.0.0.1 (``CAREPOST_DNS_NAMESERVERS``): a domain
published right, one published wrong (11 SPF includes, mail server not authorized, DMARC p=none
without rua, DMARC report address elsewhere) and one publishing nothing. No look-up leaves the
machine: checkdmarc is handed the local server as its nameserver."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from carepost.core.config import reset_settings
from carepost.delivery import record_validation
from tests.fixtures.accounts import login_client
from tests.fixtures.nsd import NsdServer

MAIL_HOST = "mail.carepost.test"
MAIL_IP = "192.0.2.25"

GOOD = ['_dmarc IN TXT "v=DMARC1; p=quarantine; rua=mailto:dmarc@bounces.good.test"',
        f'bounces IN TXT "v=spf1 a:{MAIL_HOST} -all"', f"bounces IN MX 10 {MAIL_HOST}."]
BROKEN = [
    '_dmarc IN TXT "v=DMARC1; p=none"',
    # 12 includes (12 look-ups; receivers stop at 10), none authorizing the mail server; split in
    # two character-strings as a DNS host does with a record longer than 255 characters.
    'bounces IN TXT "v=spf1 ' + " ".join(f"include:inc{i}.broken.test" for i in range(6)) + ' " "'
    + " ".join(f"include:inc{i}.broken.test" for i in range(6, 12)) + ' ~all"',
    *[f'inc{i} IN TXT "v=spf1 ip4:198.51.100.{i} -all"' for i in range(12)],
]
ELSEWHERE = ['_dmarc IN TXT "v=DMARC1; p=reject; pct=50; rua=mailto:reports@elsewhere.test"',
             f'bounces IN TXT "v=spf1 ip4:{MAIL_IP}/32 +all"']
ZONES = {"good.test": GOOD, "broken.test": BROKEN, "elsewhere.test": ELSEWHERE, "empty.test": [],
         "carepost.test": [f"mail IN A {MAIL_IP}"]}


@pytest.fixture(scope="module")
def nsd(tmp_path_factory):
    server = NsdServer(tmp_path_factory.mktemp("nsd"), ZONES)
    yield server
    server.stop()


@pytest.fixture
def local_dns(nsd, monkeypatch):
    monkeypatch.setenv("CAREPOST_DNS_NAMESERVERS", nsd.nameservers)
    monkeypatch.setenv("CAREPOST_SMTP_HELO_NAME", MAIL_HOST)
    reset_settings()
    yield nsd
    monkeypatch.undo()
    reset_settings()


def _by_kind(result: dict) -> dict:
    return {r["kind"]: r for r in result["records"]}


def _levels(record: dict) -> list[tuple[str, str]]:
    return [(f["level"], f["message"]) for f in record["findings"]]


def test_nameservers_come_from_the_setting(local_dns):
    [ns] = record_validation.nameservers()
    assert (ns.address, ns.port) == ("127.0.0.1", local_dns.port)


def test_good_records_validate(local_dns):
    result = record_validation.validate_domain("good.test", "bounces.good.test")
    spf, dmarc = _by_kind(result)["spf"], _by_kind(result)["dmarc"]
    assert result["ok"] is True and result["mail_host"] == MAIL_HOST
    assert spf["record"] == f"v=spf1 a:{MAIL_HOST} -all" and spf["ok"] and spf["findings"] == []
    assert spf["details"]["dns_lookups"] == 1 and spf["details"]["unauthorized_addresses"] == []
    assert dmarc["record"].startswith("v=DMARC1; p=quarantine") and dmarc["ok"] and dmarc["details"]["p"] == "quarantine"
    assert dmarc["details"]["rua"] == ["dmarc@bounces.good.test"] and dmarc["findings"] == []


def test_broken_records_are_named(local_dns):
    result = record_validation.validate_domain("broken.test", "bounces.broken.test")
    spf, dmarc = _by_kind(result)["spf"], _by_kind(result)["dmarc"]
    assert result["ok"] is False and spf["ok"] is False
    assert spf["details"]["dns_lookups"] == 12
    errors = [m for level, m in _levels(spf) if level == "error"]
    assert any("12/10" in m for m in errors), errors  # checkdmarc's own error
    assert any(MAIL_IP in m and "does not authorize" in m for m in errors), errors
    assert spf["details"]["unauthorized_addresses"] == [MAIL_IP]
    # DMARC p=none without rua: valid (Gmail's minimum) but two warnings.
    assert dmarc["ok"] is True and dmarc["details"]["p"] == "none"
    warnings = " ".join(m for level, m in _levels(dmarc) if level == "warning")
    assert "none" in warnings and "rua" in warnings


def test_report_address_elsewhere_pct_and_plus_all(local_dns):
    result = record_validation.validate_domain("elsewhere.test", "bounces.elsewhere.test")
    spf, dmarc = _by_kind(result)["spf"], _by_kind(result)["dmarc"]
    assert spf["details"]["unauthorized_addresses"] == []  # ip4 covers the mail server...
    assert any("+all" in m for level, m in _levels(spf) if level == "error")  # ...but so does +all for everyone
    warnings = [m for level, m in _levels(dmarc) if level == "warning"]
    assert any("mailto:dmarc@bounces.elsewhere.test" in m for m in warnings), warnings
    assert any("pct" in m for m in warnings), warnings  # checkdmarc: pct is gone from DMARCbis (RFC 9989)


def test_nothing_published(local_dns):
    result = record_validation.validate_domain("empty.test", "bounces.empty.test")
    spf, dmarc = _by_kind(result)["spf"], _by_kind(result)["dmarc"]
    assert spf["ok"] is False and spf["record"] is None and spf["findings"][0]["level"] == "error"
    assert dmarc["ok"] is False and dmarc["record"] is None and dmarc["findings"][0]["level"] == "error"


def test_sending_domain_page_validates_and_audits(local_dns, session, org, make_user, client):
    from carepost.audit.models import AuditEvent
    from carepost.delivery.service import create_sending_domain

    admin = make_user(org, role="owner")
    good = create_sending_domain(session, org.id, "good.test", ed25519=False)
    broken = create_sending_domain(session, org.id, "broken.test", ed25519=False)
    session.commit()
    csrf = login_client(client, admin)
    page = client.get(f"/app/domains/{good.id}")
    assert page.status_code == 200 and 'data-testid="validate-records"' in page.text

    r = client.post(f"/app/domains/{good.id}/validate", data={"csrf_token": csrf}, headers={"HX-Request": "true"})
    assert r.status_code == 200, r.text
    assert "SPF and DMARC are valid." in r.text and r.text.count('data-testid="validation-status">Valid') == 2

    r = client.post(f"/app/domains/{broken.id}/validate", data={"csrf_token": csrf})
    assert r.status_code == 200 and "<html" in r.text.lower()  # the whole page without htmx
    assert "Some records need attention" in r.text and "12/10" in r.text and MAIL_IP in r.text
    assert 'data-level="warning"' in r.text

    session.expire_all()
    events = session.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id,
                                                      AuditEvent.action == "domain.validate_records")
                             .order_by(AuditEvent.seq)).all()
    assert [(e.target_id, e.details["ok"]) for e in events] == [(good.id, True), (broken.id, False)]
    assert events[1].details["failing"] == ["spf"]
