"""SPF and DMARC record validation of a sending domain with ``checkdmarc`` (issue 13 item 7).

The live DNS check (:func:`carepost.delivery.domains.check_dns`) asks "is the record CarePost
told you to publish there?". This asks the receivers' question: "is what is published valid, and
does it do what Gmail and Yahoo expect?" — parsed and validated by checkdmarc (a maintained
checker: RFC 7208 syntax, the 10-look-up and 2-void-look-up limits, include and redirect loops,
DMARC tags, report-URI authorization of external destinations), then read for what CarePost needs:

* SPF, looked up at the **return-path domain** (the envelope sender receivers check SPF on; it is
  a subdomain of the From domain, so it aligns under relaxed DMARC): valid, at most 10 DNS
  look-ups, and it must authorize the addresses of this installation's mail host
  (``CAREPOST_SMTP_HELO_NAME``) — else every message fails SPF;
* DMARC at ``_dmarc.<domain>``: a record must exist (Gmail and Yahoo require one for bulk
  senders); ``p=none`` is allowed but only monitors, so it is a warning; ``rua`` must be present
  and should include CarePost's ``dmarc@<return-path domain>`` so aggregate reports reach the
  deliverability view (checkdmarc itself warns about ``pct``, dropped by DMARCbis, RFC 9989).

Every look-up goes through the servers of ``CAREPOST_DNS_NAMESERVERS`` (as ``delivery.dns``
does; the system's resolver when unset), so tests point it at a local authoritative server.
Nothing is stored: a validation runs on request, with checkdmarc's answer cache emptied first
("validate now" means now). Everything shown is public DNS data, no PHI.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field

from carepost.core.config import Settings, get_settings
from carepost.delivery import dns as cpdns

MAX_SPF_LOOKUPS = 10  # RFC 7208 section 4.6.4


@dataclass
class Finding:
    level: str  # error | warning
    message: str


@dataclass
class RecordValidation:
    kind: str  # spf | dmarc
    name: str  # where it was looked up
    record: str | None
    valid: bool
    findings: list[Finding] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "warning"]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["findings"] = [asdict(f) for f in self.findings]
        out["ok"] = self.valid and not self.errors
        return out


def nameservers(settings: Settings | None = None):
    """checkdmarc's ``nameservers`` argument: the servers of ``CAREPOST_DNS_NAMESERVERS`` (with
    their ports, as dnspython name servers), or None for the system's resolver."""
    import dns.nameserver

    servers = cpdns.parse_nameservers((settings or get_settings()).dns_nameservers)
    return [dns.nameserver.Do53Nameserver(host, port) for host, port in servers] or None


def _networks(parsed: dict | None, depth: int = 0) -> list:
    """Networks an SPF record (with its includes and redirect, as checkdmarc resolved them)
    passes. Only "pass" results count: ``~all`` or ``?ip4:`` does not authorize a sender."""
    out: list = []
    if not parsed or depth > 12:
        return out
    for m in parsed.get("mechanisms") or []:
        if m.get("action") != "pass":
            continue
        kind, value = m.get("mechanism"), str(m.get("value") or "")
        try:
            if kind in ("ip4", "ip6"):
                out.append(ipaddress.ip_network(value, strict=False))
            elif kind == "a":
                out += [ipaddress.ip_network(a) for a in m.get("addresses") or []]
            elif kind == "mx":
                for host in m.get("hosts") or []:
                    out += [ipaddress.ip_network(a) for a in (host.get("addresses") or [])]
            elif kind == "include":
                out += _networks(m.get("parsed"), depth + 1)
        except ValueError:
            continue
    redirect = parsed.get("redirect") or None
    if redirect:
        out += _networks(redirect.get("parsed"), depth + 1)
    return out


def _text(value) -> str:
    return str(value)[:500]


def validate_spf(domain: str, sending_addresses: list[str], *, ns=None, timeout: float = 5.0) -> RecordValidation:
    from checkdmarc.spf import check_spf

    result = check_spf(domain, nameservers=ns, timeout=timeout, retries=0)
    out = RecordValidation("spf", domain, result.get("record"), bool(result.get("valid")),
                           details={"dns_lookups": result.get("dns_lookups"),
                                    "void_dns_lookups": result.get("void_dns_lookups")})
    if result.get("error"):
        out.findings.append(Finding("error", _text(result["error"])))
    for w in result.get("warnings") or []:
        out.findings.append(Finding("warning", _text(w)))
    lookups = result.get("dns_lookups")
    if isinstance(lookups, int) and lookups > MAX_SPF_LOOKUPS and not any("lookup" in e.lower() for e in out.errors):
        out.findings.append(Finding("error", f"The SPF record needs {lookups} DNS look-ups; receivers stop at "
                                             f"{MAX_SPF_LOOKUPS} and fail SPF (RFC 7208 4.6.4)."))
    parsed = result.get("parsed")
    if parsed is not None and sending_addresses:
        networks = _networks(parsed)
        missing = [a for a in sending_addresses
                   if not any(ipaddress.ip_address(a) in n for n in networks if n.version == ipaddress.ip_address(a).version)]
        out.details["sending_addresses"] = sending_addresses
        out.details["unauthorized_addresses"] = missing
        if missing:
            out.findings.append(Finding("error", "The SPF record does not authorize this installation's mail server "
                                                 f"({', '.join(missing)}): add the include or a: mechanism shown in the "
                                                 "records above, else messages fail SPF."))
    if parsed is not None:
        out.details["all"] = parsed.get("all")
        if parsed.get("all") == "pass":
            out.findings.append(Finding("error", "The SPF record ends in +all: it authorizes every server on the "
                                                 "internet to send as this domain."))
    return out


def validate_dmarc(domain: str, report_address: str, *, ns=None, timeout: float = 5.0) -> RecordValidation:
    from checkdmarc.dmarc import check_dmarc

    result = check_dmarc(domain, nameservers=ns, timeout=timeout, retries=0)
    out = RecordValidation("dmarc", f"_dmarc.{domain}", result.get("record"), bool(result.get("valid")))
    if result.get("error"):
        out.findings.append(Finding("error", _text(result["error"])))
    for w in result.get("warnings") or []:
        out.findings.append(Finding("warning", _text(w)))
    tags = result.get("tags") or {}
    if tags:
        policy = str((tags.get("p") or {}).get("value") or "").lower()
        out.details["p"] = policy
        said = " ".join(out.warnings).lower()
        if policy == "none" and "value of none" not in said:
            out.findings.append(Finding("warning", "p=none only monitors: receivers deliver mail that fails DMARC. "
                                                   "It meets the Gmail and Yahoo minimum; move to p=quarantine once "
                                                   "the aggregate reports show only your own servers."))
        rua = [u.get("address", "") if isinstance(u, dict) else str(u) for u in (tags.get("rua") or {}).get("value") or []]
        out.details["rua"] = rua
        if not rua and "rua tag" not in said:
            out.findings.append(Finding("warning", "No rua= address: no receiver sends aggregate reports, so the "
                                                   "deliverability page cannot show who sends as this domain."))
        elif report_address.lower() not in [a.lower() for a in rua]:
            out.findings.append(Finding("warning", f"rua= does not include mailto:{report_address}: CarePost sees only "
                                                   "the reports that reach that mailbox."))
    return out


def validate_domain(domain: str, return_path_domain: str, settings: Settings | None = None) -> dict:
    """SPF (at the return-path domain) and DMARC (at the From domain) of a sending domain, as
    checkdmarc reads them now, with CarePost's own findings (names, not a row: no database
    work happens during the look-ups). Blocking DNS: call it outside a
    database transaction (the pages do), or in a thread."""
    import asyncio

    from checkdmarc import utils as cd_utils

    from carepost.delivery.domains import mail_host

    settings = settings or get_settings()
    ns = nameservers(settings)
    cd_utils.DNS_CACHE.clear()
    cpdns.reset()
    host = mail_host(settings)
    try:
        addresses = asyncio.run(cpdns.resolve_addresses(host))
    except cpdns.DnsError:
        addresses = []
    spf = validate_spf(return_path_domain, addresses, ns=ns, timeout=settings.dns_timeout)
    if not addresses:
        spf.findings.append(Finding("warning", f"The mail host {host} has no address in DNS, so whether SPF "
                                               "authorizes it cannot be checked (set CAREPOST_SMTP_HELO_NAME)."))
    dmarc = validate_dmarc(domain, f"dmarc@{return_path_domain}", ns=ns, timeout=settings.dns_timeout)
    results = [spf.to_dict(), dmarc.to_dict()]
    return {"domain": domain, "mail_host": host, "ok": all(r["ok"] for r in results), "records": results}
