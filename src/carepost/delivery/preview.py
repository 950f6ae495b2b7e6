"""The pre-send security preview: which secure method each address would get, and why.

(Split out of ``delivery.service``, which still exports every public name.)
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from sqlalchemy.orm import Session

from carepost.core.config import Settings, get_settings
from carepost.delivery import policy, tlsprobe
from carepost.delivery.mime import parse_address
from carepost.delivery.recipient_keys import recipient_keys

# --- security preview --------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewRow:
    address: str
    method: str
    reason: str
    mode: str

    def to_dict(self) -> dict:
        return asdict(self)


async def security_preview(session_keys: dict[str, dict[str, bool]], *, org_mode: str, override: str | None = None,
                           contains_phi: bool = True, settings: Settings | None = None,
                           org_relay: dict | None = None) -> list[PreviewRow]:
    """The method each address would get now, and why. ``session_keys`` maps each address to
    ``{"pgp": bool, "smime": bool}`` (from :func:`keys_on_file`); TLS facts come from the probe
    (cached). ``org_relay``: the organization's relay (``delivery_settings()["relay"]``), which
    takes the installation's place. Raises ValidationFailed for a mode the message may not use."""
    from carepost.delivery.settings import relay_mode

    settings = settings or get_settings()
    policy.effective_mode(org_mode, override)
    relay = relay_mode(settings, org_relay)
    domains = sorted({a.rsplit("@", 1)[1].lower() for a in session_keys})
    probes = {}
    if relay is None:
        # The same MTA-STS policies delivery uses: stored with their max_age (RFC 8461 5.1).
        store = tlsprobe.DatabasePolicyStore()
        found = await asyncio.gather(*(tlsprobe.probe_domain(d, settings=settings, store=store) for d in domains))
        probes = dict(zip(domains, found))
    rows = []
    for address, keys in session_keys.items():
        probe = probes.get(address.rsplit("@", 1)[1].lower())
        decision = policy.decide(
            org_mode=org_mode, override=override, contains_phi=contains_phi, pgp_key=keys.get("pgp", False),
            smime_key=keys.get("smime", False), verified_tls=probe.verified_tls if probe else None,
            tls_offered=any(m.starttls for m in probe.mx) if probe else None,
            tls_reason=probe.reason if probe else None, relay=relay,
        )
        rows.append(PreviewRow(address, decision.method, decision.reason, decision.mode))
    return rows


def keys_on_file(session: Session, org_id: str, addresses: list[str]) -> dict[str, dict[str, bool]]:
    """Normalized address -> which kinds of key are on file. Invalid addresses are refused."""
    out = {}
    for i, address in enumerate(addresses):
        addr = parse_address(address, field_name=f"addresses[{i}]", allow_display_name=False).addr_spec
        kinds = recipient_keys(session, org_id, addr)
        out[addr] = {"pgp": "pgp" in kinds, "smime": "smime" in kinds}
    return out
