"""Imports every capability's tables so metadata (and Alembic) sees all of them."""

from __future__ import annotations

import importlib

MODEL_MODULES = [
    "carepost.core.crypto",
    "carepost.accounts.models",
    "carepost.accounts.sessions",  # LoginThrottle
    "carepost.accounts.mfa",  # RecoveryCode
    "carepost.accounts.branding",  # OrganizationBranding
    "carepost.audit.models",
    "carepost.patients.models",
    "carepost.delivery.models",
    "carepost.portal.models",
    "carepost.consent.models",
    "carepost.forms.models",
    "carepost.tracking.models",
    "carepost.tracking.rollups",  # AnalyticsRollup
    "carepost.tracking.deliverability",  # DeliverabilityAlert
    "carepost.tracking.conversions",  # Goal, ContactEvent
    "carepost.content.models",
    "carepost.segments.models",
    "carepost.campaigns.models",
    "carepost.compliance.models",
    "carepost.ehr.models",  # MllpConnection, EhrMessage (issue 15 item 3)
    "carepost.journeys.models",
    "carepost.archive.models",  # ArchiveTerm, ArchiveRequest (issue 16 item 8)
    "carepost.retention.models",  # RetentionSchedule, LegalHold, PurgeRun, DestructionCertificate (issue 16 items 1-4)
]


def load_all_models() -> None:
    for name in MODEL_MODULES:
        importlib.import_module(name)
