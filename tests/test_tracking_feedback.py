"""DMARC aggregate reports (RFC 7489 7.2) and SMTP TLS reports (RFC 8460) through the real return
path: mailed over SMTP to ``dmarc@`` / ``tlsrpt@`` of the return-path domain, read by parsedmarc,
kept only for the domain's proven owner, shown per sending source in the deliverability API.
Bad input: damaged archives, zip bombs, malformed XML, reports about other domains, resent reports.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from email import policy as email_policy
from email.message import EmailMessage

from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from tests.test_bounces import FROM_DOMAIN, RETURN_DOMAIN, make_sent
from tests.test_bounces_inbound import _client, _reports, inbound  # noqa: F401 - the fixture

AGGREGATE = """<?xml version="1.0" encoding="UTF-8" ?>
<feedback>
  <version>1.0</version>
  <report_metadata>
    <org_name>{reporter}</org_name>
    <email>noreply-dmarc-support@{reporter}</email>
    <report_id>{report_id}</report_id>
    <date_range><begin>1764633600</begin><end>1764719999</end></date_range>
  </report_metadata>
  <policy_published>
    <domain>{domain}</domain><adkim>r</adkim><aspf>r</aspf><p>none</p><sp>none</sp><pct>100</pct>
  </policy_published>
  <record>
    <row><source_ip>192.0.2.10</source_ip><count>120</count>
      <policy_evaluated><disposition>none</disposition><dkim>pass</dkim><spf>pass</spf></policy_evaluated></row>
    <identifiers><header_from>{domain}</header_from></identifiers>
    <auth_results><dkim><domain>{domain}</domain><result>pass</result><selector>cp1</selector></dkim>
      <spf><domain>{return_domain}</domain><result>pass</result></spf></auth_results>
  </record>
  <record>
    <row><source_ip>198.51.100.7</source_ip><count>3</count>
      <policy_evaluated><disposition>quarantine</disposition><dkim>fail</dkim><spf>fail</spf></policy_evaluated></row>
    <identifiers><header_from>{domain}</header_from></identifiers>
    <auth_results><spf><domain>spammer.example</domain><result>fail</result></spf></auth_results>
  </record>
</feedback>
"""


def aggregate(report_id="r-1", domain=FROM_DOMAIN, reporter="google.com") -> bytes:
    return AGGREGATE.format(report_id=report_id, domain=domain, reporter=reporter, return_domain=RETURN_DOMAIN).encode()


def tls_report(report_id="2026-12-02T00:00:00Z_bounces") -> bytes:
    return json.dumps({
        "organization-name": "Google Inc.", "contact-info": "smtp-tls-reporting@google.com", "report-id": report_id,
        "date-range": {"start-datetime": "2026-12-02T00:00:00Z", "end-datetime": "2026-12-02T23:59:59Z"},
        "policies": [{
            "policy": {"policy-type": "sts", "policy-string": ["version: STSv1", "mode: enforce"],
                       "policy-domain": RETURN_DOMAIN, "mx-host": ["mx.carepost.example"]},
            "summary": {"total-successful-session-count": 97, "total-failure-session-count": 3},
            "failure-details": [{"result-type": "certificate-expired", "sending-mta-ip": "203.0.113.5",
                                 "receiving-mx-hostname": "mx.carepost.example", "failed-session-count": 3}],
        }],
    }).encode()


def mail(to: str, payload: bytes, *, ctype: str, filename: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "noreply-dmarc-support@google.example"
    msg["To"] = to
    msg["Subject"] = f"Report domain: {FROM_DOMAIN} Submitter: google.com"
    msg.set_content("This is an aggregate report.")
    maintype, subtype = ctype.split("/")
    msg.add_attachment(payload, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=email_policy.SMTP)


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def _key(session, org_id):
    cred, secret = create_credential(session, org_id, name="analyst", scopes=["analytics:read"])
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def test_aggregate_reports_by_smtp_are_kept_per_source_for_the_owner(session, org, inbound, client):  # noqa: F811
    make_sent(session, org.id)  # the organization's proven sending domain
    with _client(inbound) as smtp:
        smtp.sendmail("", [f"dmarc@{RETURN_DOMAIN}"],
                      mail(f"dmarc@{RETURN_DOMAIN}", zipped("google.com!bar.xml", aggregate("r-1")),
                           ctype="application/zip", filename=f"google.com!{FROM_DOMAIN}!1764633600!1764719999.zip"))
        smtp.sendmail("", [f"dmarc@{RETURN_DOMAIN}"],
                      mail(f"dmarc@{RETURN_DOMAIN}", gzip.compress(aggregate("r-2", reporter="yahoo.com")),
                           ctype="application/gzip", filename="yahoo.xml.gz"))
        # the same report again (receivers resend): kept once
        smtp.sendmail("", [f"dmarc@{RETURN_DOMAIN}"],
                      mail(f"dmarc@{RETURN_DOMAIN}", aggregate("r-1"), ctype="text/xml", filename="again.xml"))
    reports = _reports(session)
    assert [(r.kind, r.status) for r in reports] == [("dmarc_aggregate", "applied")] * 2 + [("dmarc_aggregate", "ignored")]
    assert "received before" in reports[2].outcome["reason"]

    headers = _key(session, org.id)
    sources = client.get("/api/v1/deliverability/dmarc/sources", headers=headers).json()["data"]
    assert [(s["source_ip"], s["messages"], s["dmarc_pass"], s["quarantined"]) for s in sources] == [
        ("192.0.2.10", 240, 240, 0), ("198.51.100.7", 6, 0, 6)]
    assert sources[0]["dmarc_pass_rate"] == 1.0 and sources[1]["spf_aligned"] == 0
    listed = client.get("/api/v1/deliverability/dmarc/reports", headers=headers).json()["data"]
    assert {r["reporter"] for r in listed} == {"google.com", "yahoo.com"} and listed[0]["messages"] == 123
    assert client.get("/api/v1/deliverability/dmarc/sources?domain=other.example", headers=headers).json()["data"] == []
    cred, secret = create_credential(session, org.id, name="sender", scopes=["messages:send"])
    session.commit()
    r = client.get("/api/v1/deliverability/dmarc/sources", headers={"Authorization": f"Bearer {cred.key_id}.{secret}"})
    assert r.status_code == 403


def test_tls_reports_by_smtp(session, org, inbound, client):  # noqa: F811
    make_sent(session, org.id)
    with _client(inbound) as smtp:
        smtp.sendmail("", [f"tlsrpt@{RETURN_DOMAIN}"],
                      mail(f"tlsrpt@{RETURN_DOMAIN}", gzip.compress(tls_report()), ctype="application/tlsrpt+gzip",
                           filename="google.com!bounces.bar.example!1764633600!1764719999.json.gz"))
    [report] = _reports(session)
    assert (report.kind, report.status) == ("tls_report", "applied")
    [tls] = client.get("/api/v1/deliverability/tls-reports", headers=_key(session, org.id)).json()["data"]
    assert (tls["successful_sessions"], tls["failed_sessions"]) == (97, 3)
    assert tls["policies"][0]["policy_type"] == "sts"
    assert tls["policies"][0]["failures"][0]["result_type"] == "certificate-expired"


def test_bad_reports_are_refused_with_a_reason_and_nothing_is_kept(session, org, inbound):  # noqa: F811
    from carepost.tracking.models import DmarcReport, TlsReport

    make_sent(session, org.id)
    bomb = zipped("report.xml", b"<feedback>" + b" " * (30 * 1024 * 1024))  # 30 MB of blanks, ~30 kB zipped
    gzip_bomb = gzip.compress(b"<" + b"a" * (25 * 1024 * 1024))
    cases = [
        mail("x", bomb, ctype="application/zip", filename="bomb.zip"),
        mail("x", gzip_bomb, ctype="application/gzip", filename="bomb.xml.gz"),
        mail("x", b"PK\x03\x04 not really a zip", ctype="application/zip", filename="broken.zip"),
        mail("x", b"<feedback><report_metadata><org_name>x</org_name>", ctype="text/xml", filename="cut.xml"),
        mail("x", aggregate("r-9", domain="someone-else.example"), ctype="text/xml", filename="other.xml"),
        mail("x", b'{"organization-name": "x", "policies": 7}', ctype="application/tlsrpt+json", filename="bad.json"),
    ]
    with _client(inbound) as smtp:
        for raw in cases:
            smtp.sendmail("", [f"dmarc@{RETURN_DOMAIN}"], raw)
    reports = _reports(session)
    assert [r.status for r in reports] == ["ignored"] * len(cases)
    reasons = [r.outcome.get("reason", "") for r in reports]
    assert "inflates to more than" in reasons[0] and "inflates to more than" in reasons[1]
    assert "damaged" in reasons[2]
    assert "not a valid DMARC aggregate report" in reasons[3]
    assert "not a proven sending domain" in reasons[4]
    assert "not a valid SMTP TLS report" in reasons[5] or "names no proven domain" in reasons[5]
    session.rollback()
    assert session.scalars(select(DmarcReport)).all() == [] and session.scalars(select(TlsReport)).all() == []


def test_reports_for_a_domain_claimed_but_not_proven_are_not_received(session, org, inbound):  # noqa: F811
    """Another organization claiming the domain gets nothing: the return path accepts mail only
    for the proven owner's return-path domain."""
    import smtplib

    import pytest

    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session
    from carepost.delivery.service import create_sending_domain

    other = create_organization(session, "Claimant Clinic")
    session.commit()
    with org_session(other.id) as s:
        create_sending_domain(s, other.id, "claimed.example", ed25519=False)
        s.commit()
    with _client(inbound) as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("", ["dmarc@bounces.claimed.example"],
                          mail("x", aggregate("r-3", domain="claimed.example"), ctype="text/xml", filename="a.xml"))
    assert _reports(session) == []
