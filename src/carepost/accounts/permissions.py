"""Roles and the explicit permissions they grant.

Routes name permissions, never roles, so a role can change without touching a route.
Viewing PHI masked and unmasked are separate permissions (minimum necessary, 164.502(b)).
"""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    ORG_MANAGE = "org:manage"
    USERS_READ = "users:read"
    USERS_MANAGE = "users:manage"
    APIKEYS_MANAGE = "apikeys:manage"
    KEYS_MANAGE = "keys:manage"
    AUDIT_READ = "audit:read"
    AUDIT_EXPORT = "audit:export"
    BREAKGLASS_USE = "breakglass:use"
    BREAKGLASS_REVIEW = "breakglass:review"
    PHI_READ_MASKED = "phi:read_masked"
    PHI_READ_UNMASKED = "phi:read_unmasked"
    PHI_WRITE = "phi:write"
    CONTACTS_IMPORT = "contacts:import"
    CONSENT_MANAGE = "consent:manage"
    SEGMENTS_READ = "segments:read"
    SEGMENTS_MANAGE = "segments:manage"
    TEMPLATES_MANAGE = "templates:manage"
    CAMPAIGNS_READ = "campaigns:read"
    CAMPAIGNS_MANAGE = "campaigns:manage"
    CAMPAIGNS_APPROVE = "campaigns:approve"
    CAMPAIGNS_SEND = "campaigns:send"
    JOURNEYS_READ = "journeys:read"
    JOURNEYS_MANAGE = "journeys:manage"
    MESSAGES_SEND = "messages:send"
    MESSAGES_READ = "messages:read"
    DOMAINS_MANAGE = "domains:manage"
    WEBHOOKS_MANAGE = "webhooks:manage"
    FORMS_MANAGE = "forms:manage"
    ANALYTICS_READ = "analytics:read"
    RETENTION_MANAGE = "retention:manage"
    # The compliance center (issue 16): de-identified exports, accounting-of-disclosures requests,
    # disclosures recorded by hand.
    COMPLIANCE_MANAGE = "compliance:manage"


P = Permission

ROLES: dict[str, frozenset[Permission]] = {
    "owner": frozenset(Permission),
    "admin": frozenset(Permission) - {P.BREAKGLASS_REVIEW},
    "compliance_officer": frozenset(
        {
            P.USERS_READ, P.AUDIT_READ, P.AUDIT_EXPORT, P.BREAKGLASS_REVIEW, P.PHI_READ_MASKED,
            P.PHI_READ_UNMASKED, P.CONSENT_MANAGE, P.CAMPAIGNS_APPROVE, P.MESSAGES_READ,
            P.ANALYTICS_READ, P.RETENTION_MANAGE, P.FORMS_MANAGE, P.SEGMENTS_READ, P.CAMPAIGNS_READ,
            P.COMPLIANCE_MANAGE, P.JOURNEYS_READ,
        }
    ),
    "marketer": frozenset(
        {
            P.PHI_READ_MASKED, P.CONTACTS_IMPORT, P.SEGMENTS_READ, P.SEGMENTS_MANAGE, P.TEMPLATES_MANAGE,
            P.CAMPAIGNS_READ, P.CAMPAIGNS_MANAGE, P.CAMPAIGNS_SEND, P.JOURNEYS_READ, P.JOURNEYS_MANAGE, P.FORMS_MANAGE,
            P.MESSAGES_READ, P.ANALYTICS_READ,
        }
    ),
    # People who care for patients (nurses, care coordinators): masked by default, with
    # break-glass for an emergency. Issue 9 item 8: only care and compliance duties hold it.
    "care_team": frozenset({P.PHI_READ_MASKED, P.MESSAGES_READ, P.BREAKGLASS_USE}),
    "analyst": frozenset({P.PHI_READ_MASKED, P.ANALYTICS_READ, P.MESSAGES_READ, P.SEGMENTS_READ, P.CAMPAIGNS_READ,
                          P.JOURNEYS_READ}),
    "developer": frozenset(
        {
            P.APIKEYS_MANAGE, P.MESSAGES_SEND, P.MESSAGES_READ, P.DOMAINS_MANAGE, P.WEBHOOKS_MANAGE,
            P.PHI_READ_MASKED, P.PHI_WRITE, P.CONTACTS_IMPORT,
        }
    ),
    "read_only": frozenset({P.PHI_READ_MASKED, P.ANALYTICS_READ, P.SEGMENTS_READ}),
}

ROLE_LABELS = {
    "owner": "Owner",
    "admin": "Administrator",
    "compliance_officer": "Compliance officer",
    "marketer": "Marketer",
    "care_team": "Care team",
    "analyst": "Analyst",
    "developer": "Developer",
    "read_only": "Read-only",
}

# Roles with a care or compliance duty: the only ones that may invoke break-glass (issue 9 item 8).
BREAK_GLASS_ROLES = frozenset({"owner", "admin", "compliance_officer", "care_team"})

# Roles whose holders administer the organization; they may never work without MFA.
ADMIN_ROLES = frozenset({"owner", "admin", "compliance_officer"})

# Permissions an API credential may be scoped to (a credential never exceeds its creator's role).
API_SCOPES = frozenset(
    {
        P.PHI_READ_MASKED, P.PHI_READ_UNMASKED, P.PHI_WRITE, P.CONTACTS_IMPORT, P.CONSENT_MANAGE,
        P.MESSAGES_SEND, P.MESSAGES_READ, P.DOMAINS_MANAGE, P.WEBHOOKS_MANAGE, P.SEGMENTS_READ, P.SEGMENTS_MANAGE,
        P.TEMPLATES_MANAGE, P.CAMPAIGNS_READ, P.CAMPAIGNS_MANAGE, P.JOURNEYS_READ, P.JOURNEYS_MANAGE, P.ANALYTICS_READ,
        P.AUDIT_READ, P.FORMS_MANAGE, P.ORG_MANAGE, P.COMPLIANCE_MANAGE,
    }
)

# Scopes only an owner may put on a credential (issue 10 item 9): ``org:manage`` changes the
# organization's delivery settings (security mode, default purpose) for a deployment that
# automates its setup. An administrator holds the permission but cannot hand it to a key, and a
# key holding it is suspended when its creator stops being an owner.
OWNER_ONLY_SCOPES = frozenset({P.ORG_MANAGE})


def may_grant_scope(scope: str, permissions, role: str | None) -> bool:
    """Whether a person with ``permissions`` and ``role`` may put ``scope`` on a credential."""
    if scope in OWNER_ONLY_SCOPES and role != "owner":
        return False
    return scope in permissions

# Permissions that reveal or change PHI: they need MFA in a web session, and break-glass grants them.
PHI_PERMISSIONS = frozenset({P.PHI_READ_MASKED, P.PHI_READ_UNMASKED, P.PHI_WRITE, P.CONTACTS_IMPORT})
BREAK_GLASS_GRANTS = frozenset({P.PHI_READ_MASKED, P.PHI_READ_UNMASKED})


def permissions_for(role: str) -> frozenset[Permission]:
    try:
        return ROLES[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}") from None
