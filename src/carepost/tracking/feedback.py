"""Deliverability feedback from receivers: DMARC aggregate reports (RFC 7489 section 7.2) and SMTP
TLS reports (RFC 8460), received by ``carepost inbound`` at the ``dmarc@`` and ``tlsrpt@``
mailboxes of a return-path domain (the ``rua`` addresses published with the sending domain's
records) and kept per organization for the deliverability view.

How a report is read:

* the mail is walked for report parts — ``text/xml``, ``application/xml``, gzip and zip files
  (``application/gzip``, ``application/zip``, ``*.xml.gz``, ``*.zip``) and ``application/tlsrpt+gzip``
  / ``application/tlsrpt+json``; at most :data:`MAX_PARTS` parts;
* compressed parts are inflated here, never by a library, with a hard cap on the inflated size
  (:data:`MAX_INFLATED`) and on zip members (:data:`MAX_ZIP_MEMBERS`): a zip bomb stops at the
  cap and the report is recorded as refused, with the reason;
* the XML or JSON is parsed by parsedmarc (``offline=True``: no DNS or GeoIP look-ups, nothing
  fetched), whose schema handling covers the variants receivers send;
* a report is kept only when its policy domain is a sending domain whose ownership the
  organization has proven (anything else is junk sent to the mailbox), once per reporter and
  report id (receivers resend).

Nothing here is PHI: source IP addresses of sending servers, counts and authentication results.
"""

from __future__ import annotations

import email
import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy as email_policy

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carepost.core.logging import get_logger
from carepost.tracking.models import DmarcReport, DmarcReportRecord, TlsReport

log = get_logger("carepost.tracking.feedback")

MAX_PARTS = 20
MAX_INFLATED = 20 * 1024 * 1024  # bytes of XML or JSON one report may inflate to
MAX_ZIP_MEMBERS = 5
MAX_RECORDS = 100_000  # rows of one aggregate report


class FeedbackError(ValueError):
    """A report that cannot be read; the reason is safe to store and show."""


@dataclass
class Outcome:
    kind: str  # dmarc_aggregate | tls_report
    status: str  # applied | ignored
    reason: str | None = None
    stored_id: str | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "effect": self.kind, **({"reason": self.reason} if self.reason else {}),
                **({"stored_id": self.stored_id} if self.stored_id else {})}


# --------------------------------------------------------------------------- finding the payload


def _inflate_gzip(data: bytes) -> bytes:
    out, d = [], zlib.decompressobj(16 + zlib.MAX_WBITS)
    size, chunk = 0, data
    try:
        while chunk:
            piece = d.decompress(chunk, MAX_INFLATED + 1 - size)
            size += len(piece)
            out.append(piece)
            if size > MAX_INFLATED:
                raise FeedbackError(f"the gzip file inflates to more than {MAX_INFLATED // (1024 * 1024)} MB")
            chunk = d.unconsumed_tail
            if d.eof:
                break
    except zlib.error:
        raise FeedbackError("the gzip file is damaged") from None
    return b"".join(out)


def _inflate_zip(data: bytes) -> list[bytes]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError):
        raise FeedbackError("the zip file is damaged") from None
    if len(members) > MAX_ZIP_MEMBERS:
        raise FeedbackError(f"the zip file holds more than {MAX_ZIP_MEMBERS} files")
    out = []
    for member in members:
        try:
            with archive.open(member) as f:  # read with a cap: the sizes in the directory may lie
                body = f.read(MAX_INFLATED + 1)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError):
            raise FeedbackError("the zip file is damaged or encrypted") from None
        if len(body) > MAX_INFLATED:
            raise FeedbackError(f"the zip file inflates to more than {MAX_INFLATED // (1024 * 1024)} MB")
        out.append(body)
    return out


def _sniff(body: bytes) -> str | None:
    head = body[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<") and b"<feedback" in body[:65536]:
        return "dmarc"
    if head.startswith(b"{") and b"organization-name" in body[:65536]:
        return "tlsrpt"
    return None


def find_reports(raw: bytes) -> list[tuple[str, bytes]]:
    """The report payloads in a received mail: ``("dmarc", xml)`` or ``("tlsrpt", json)``."""
    msg = email.message_from_bytes(raw, policy=email_policy.default)
    found: list[tuple[str, bytes]] = []
    for n, part in enumerate(msg.walk()):
        if n >= MAX_PARTS:
            break
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        name = (part.get_filename() or "").lower()
        data = part.get_payload(decode=True) or b""
        if not data:
            continue
        if ctype in ("application/gzip", "application/x-gzip", "application/tlsrpt+gzip") or name.endswith(".gz") \
                or data[:2] == b"\x1f\x8b":
            bodies = [_inflate_gzip(data)]
        elif ctype in ("application/zip", "application/x-zip-compressed", "application/x-zip") or name.endswith(".zip") \
                or data[:4] == b"PK\x03\x04":
            bodies = _inflate_zip(data)
        elif ctype in ("text/xml", "application/xml", "application/tlsrpt+json", "application/json") \
                or name.endswith((".xml", ".json")):
            if len(data) > MAX_INFLATED:
                raise FeedbackError("the report is too large")
            bodies = [data]
        else:
            continue
        for body in bodies:
            kind = _sniff(body)
            if kind:
                found.append((kind, body))
    return found


# --------------------------------------------------------------------------- storing


def _owned_domains(session: Session, org_id: str) -> set[str]:
    from carepost.delivery.models import SendingDomain

    return {d.lower() for d in session.scalars(select(SendingDomain.domain).where(
        SendingDomain.org_id == org_id, SendingDomain.verified_at.is_not(None)))}


def _when(value) -> datetime:
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _short(value, n: int = 255) -> str | None:
    return None if value is None else str(value)[:n]


def store_dmarc(session: Session, org_id: str, xml: bytes, *, inbound_report_id: str | None) -> Outcome:
    import parsedmarc

    try:
        report = parsedmarc.parse_aggregate_report_xml(xml.decode("utf-8", "replace"), offline=True,
                                                       always_use_local_files=True)
    except Exception as exc:  # noqa: BLE001 - parsedmarc raises its own and xml errors: a bad report
        return Outcome("dmarc_aggregate", "ignored", f"not a valid DMARC aggregate report ({type(exc).__name__})")
    meta, published = report["report_metadata"], report["policy_published"]
    domain = str(published.get("domain") or "").lower().rstrip(".")
    if domain not in _owned_domains(session, org_id):
        return Outcome("dmarc_aggregate", "ignored", "the report is about a domain that is not a proven sending "
                                                     "domain of the organization")
    reporter, report_id = _short(meta.get("org_name")) or "unknown", _short(meta.get("report_id")) or ""
    existing = session.scalar(select(DmarcReport.id).where(DmarcReport.org_id == org_id, DmarcReport.reporter == reporter,
                                                           DmarcReport.report_id == report_id))
    if existing:
        return Outcome("dmarc_aggregate", "ignored", "a report with this reporter and id was received before", existing)
    records = report.get("records") or []
    if len(records) > MAX_RECORDS:
        return Outcome("dmarc_aggregate", "ignored", f"more than {MAX_RECORDS} records")
    row = DmarcReport(org_id=org_id, inbound_report_id=inbound_report_id, reporter=reporter,
                      reporter_email=_short(meta.get("org_email")), report_id=report_id, domain=domain,
                      policy={k: published.get(k) for k in ("p", "sp", "pct", "adkim", "aspf", "fo")},
                      begin_at=_when(meta["begin_date"]), end_at=_when(meta["end_date"]))
    session.add(row)
    session.flush()
    total = passed = 0
    for rec in records:
        align = rec.get("alignment") or {}
        count = int(rec.get("count") or 0)
        total += count
        passed += count if align.get("dmarc") else 0
        session.add(DmarcReportRecord(
            org_id=org_id, dmarc_report_id=row.id, source_ip=_short((rec.get("source") or {}).get("ip_address"), 64) or "",
            count=count, disposition=_short((rec.get("policy_evaluated") or {}).get("disposition"), 20) or "none",
            dkim_aligned=bool(align.get("dkim")), spf_aligned=bool(align.get("spf")), dmarc_pass=bool(align.get("dmarc")),
            header_from=_short((rec.get("identifiers") or {}).get("header_from")),
            envelope_from=_short((rec.get("identifiers") or {}).get("envelope_from")),
            auth_results=json.loads(json.dumps(rec.get("auth_results") or {}, default=str)),
        ))
    row.messages, row.dmarc_pass = total, passed
    session.flush()
    return Outcome("dmarc_aggregate", "applied", stored_id=row.id)


def store_tls(session: Session, org_id: str, body: bytes, *, inbound_report_id: str | None) -> Outcome:
    import parsedmarc

    try:
        report = parsedmarc.parse_smtp_tls_report_json(body.decode("utf-8", "replace"))
    except Exception as exc:  # noqa: BLE001 - a bad report
        return Outcome("tls_report", "ignored", f"not a valid SMTP TLS report ({type(exc).__name__})")
    owned = _owned_domains(session, org_id)
    from carepost.delivery.models import SendingDomain

    owned |= {d.lower() for d in session.scalars(select(SendingDomain.return_path_domain).where(
        SendingDomain.org_id == org_id, SendingDomain.verified_at.is_not(None)))}
    policies = []
    for p in report.get("policies") or []:
        domain = str(p.get("policy_domain") or "").lower().rstrip(".")
        if domain not in owned:
            continue
        policies.append({"policy_domain": domain, "policy_type": _short(p.get("policy_type"), 20),
                         "successful_sessions": int(p.get("successful_session_count") or 0),
                         "failed_sessions": int(p.get("failed_session_count") or 0),
                         "failures": [{k: _short(v) if not isinstance(v, int) else v for k, v in d.items()}
                                      for d in (p.get("failure_details") or [])[:100]]})
    if not policies:
        return Outcome("tls_report", "ignored", "the report names no proven domain of the organization")
    reporter, report_id = _short(report.get("organization_name")) or "unknown", _short(report.get("report_id")) or ""
    existing = session.scalar(select(TlsReport.id).where(TlsReport.org_id == org_id, TlsReport.reporter == reporter,
                                                         TlsReport.report_id == report_id))
    if existing:
        return Outcome("tls_report", "ignored", "a report with this reporter and id was received before", existing)
    row = TlsReport(org_id=org_id, inbound_report_id=inbound_report_id, reporter=reporter, report_id=report_id,
                    begin_at=_when(report["begin_date"]), end_at=_when(report["end_date"]), policies=policies,
                    successful_sessions=sum(p["successful_sessions"] for p in policies),
                    failed_sessions=sum(p["failed_sessions"] for p in policies))
    session.add(row)
    session.flush()
    return Outcome("tls_report", "applied", stored_id=row.id)


def read_feedback_report(session: Session, org_id: str, raw: bytes, report_id: str | None = None) -> dict | None:
    """The inbound port: read a received mail as DMARC or TLS reports. Returns the outcome (kind,
    status, details) or None when the mail holds neither."""
    try:
        payloads = find_reports(raw)
    except FeedbackError as exc:
        return {"kind": "feedback", "status": "ignored", "outcome": {"status": "ignored", "reason": str(exc)}}
    except Exception as exc:  # noqa: BLE001 - whatever arrives must not break the return path
        return {"kind": "feedback", "status": "ignored",
                "outcome": {"status": "ignored", "reason": f"unreadable mail ({type(exc).__name__})"}}
    if not payloads:
        return None
    outcomes = [store_dmarc(session, org_id, body, inbound_report_id=report_id) if kind == "dmarc"
                else store_tls(session, org_id, body, inbound_report_id=report_id) for kind, body in payloads]
    first = next((o for o in outcomes if o.status == "applied"), outcomes[0])
    log.info("feedback_report_read", report_id=report_id, org_id=org_id, report_kind=first.kind, status=first.status)
    return {"kind": first.kind, "status": first.status, "outcome": first.to_dict()}


# --------------------------------------------------------------------------- the deliverability view


def dmarc_sources(session: Session, org_id: str, *, domain: str | None = None, since: datetime | None = None,
                  until: datetime | None = None) -> list[dict]:
    """Per sending source (IP address) over the reports in the period: messages, how many passed
    DMARC, aligned DKIM and SPF, and what receivers did with the rest."""
    R, D = DmarcReportRecord, DmarcReport
    q = (select(R.source_ip, func.sum(R.count), R.dmarc_pass, R.dkim_aligned, R.spf_aligned, R.disposition,
                func.min(D.begin_at), func.max(D.end_at))
         .join(D, D.id == R.dmarc_report_id).where(R.org_id == org_id)
         .group_by(R.source_ip, R.dmarc_pass, R.dkim_aligned, R.spf_aligned, R.disposition))
    if domain:
        q = q.where(D.domain == domain.lower())
    if since:
        q = q.where(D.end_at >= since)
    if until:
        q = q.where(D.begin_at <= until)
    by_ip: dict[str, dict] = {}
    for ip, count, dmarc_ok, dkim_ok, spf_ok, disposition, first, last in session.execute(q):
        s = by_ip.setdefault(ip, {"source_ip": ip, "messages": 0, "dmarc_pass": 0, "dkim_aligned": 0,
                                  "spf_aligned": 0, "quarantined": 0, "rejected": 0, "first": first, "last": last})
        n = int(count or 0)
        s["messages"] += n
        s["dmarc_pass"] += n if dmarc_ok else 0
        s["dkim_aligned"] += n if dkim_ok else 0
        s["spf_aligned"] += n if spf_ok else 0
        s["quarantined"] += n if disposition == "quarantine" else 0
        s["rejected"] += n if disposition == "reject" else 0
        s["first"], s["last"] = min(s["first"], first), max(s["last"], last)
    out = sorted(by_ip.values(), key=lambda s: (-s["messages"], s["source_ip"]))
    for s in out:
        s["dmarc_pass_rate"] = round(s["dmarc_pass"] / s["messages"], 4) if s["messages"] else None
        s["first"], s["last"] = _when(s["first"]).isoformat(), _when(s["last"]).isoformat()
    return out


def dmarc_reports(session: Session, org_id: str, limit: int = 100) -> list[dict]:
    rows = session.scalars(select(DmarcReport).where(DmarcReport.org_id == org_id)
                           .order_by(DmarcReport.begin_at.desc()).limit(max(1, min(limit, 1000))))
    return [{"id": r.id, "reporter": r.reporter, "report_id": r.report_id, "domain": r.domain, "policy": r.policy,
             "begin": _when(r.begin_at).isoformat(), "end": _when(r.end_at).isoformat(), "messages": r.messages,
             "dmarc_pass": r.dmarc_pass} for r in rows]


def tls_reports(session: Session, org_id: str, limit: int = 100) -> list[dict]:
    rows = session.scalars(select(TlsReport).where(TlsReport.org_id == org_id)
                           .order_by(TlsReport.begin_at.desc()).limit(max(1, min(limit, 1000))))
    return [{"id": r.id, "reporter": r.reporter, "report_id": r.report_id, "begin": _when(r.begin_at).isoformat(),
             "end": _when(r.end_at).isoformat(), "successful_sessions": r.successful_sessions,
             "failed_sessions": r.failed_sessions, "policies": r.policies} for r in rows]
