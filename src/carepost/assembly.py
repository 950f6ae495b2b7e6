"""The composition root: the one function that assembles CarePost (ARCHITECTURE.md section 3).

Every entry point — ``carepost serve`` (through :func:`carepost.app.create_app`), ``worker``,
``smtp``, ``inbound``, ``run``, every other CLI command (through the CLI's callback), the
benchmarks and the test fixtures — calls :func:`assemble` and nothing else assembles behaviour:

1. **models**: every capability's tables, so metadata, Alembic and foreign keys see all of them;
2. **tasks**: every capability's ``tasks.py``, so the worker knows each task by name;
3. **ports**: what a lower capability calls upward is filled with the function of the owner —
   audit events for accounts; the delivery pipeline's eligibility, quiet hours, List-Unsubscribe
   and portal steps from consent and portal;
4. **events and registries**: reactions across capabilities (an organization created → default
   authorization texts; a recipient event → webhooks; a contact deleted → consent and forms
   forget it; contact page sections; right-of-access export sections);
5. **routers**: the modules whose ``router`` the ASGI app includes, in matching order, and what
   only their pages use (contact page sections, the message page's engagement, portal and
   legal-hold steps).

A process that serves no HTTP — ``worker``, ``smtp``, ``inbound``, ``mllp``, ``run``'s supervisor,
every CLI command but ``serve`` — calls ``assemble(http=False)``: steps 1–4 only, without
importing the 45 router modules (about 1 s of CPU per process; bench/startup.py).
Nothing outside the router modules, :mod:`carepost.app` and this module imports a router module
(``tests/test_assembly.py`` checks it), so such a process never holds a page's port unfilled or a
page's registry empty; :func:`carepost.app.create_app` calls ``assemble()``, which finishes the
HTTP part in a process that began without it.

Fail closed: if a capability cannot be imported or a declared port is left unfilled,
:func:`assemble` raises :class:`~carepost.core.ports.NotAssembled` and the process exits
non-zero; a port called in a process that never assembled raises the same. No default stands in
for a missing step, and nothing is wired by import side effects or by assigning module attributes.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field

from carepost.core.ports import NotAssembled, declared_ports, unfilled_ports

# Routers, in the order they are matched. Each capability contributes api.py and pages.py.
ROUTER_MODULES = [
    "carepost.dashboard.api",
    "carepost.dashboard.pages",
    "carepost.accounts.api",
    "carepost.accounts.pages",
    "carepost.accounts.branding_pages",
    "carepost.audit.api",
    "carepost.audit.pages",
    "carepost.patients.api",
    "carepost.patients.pages",
    "carepost.consent.api",
    "carepost.consent.pages",
    "carepost.forms.api",
    "carepost.forms.pages",
    "carepost.forms.hosted",
    "carepost.forms.texts_pages",
    "carepost.delivery.api",
    "carepost.delivery.pages",
    "carepost.delivery.compose_pages",
    "carepost.delivery.settings_pages",
    "carepost.portal.api",
    "carepost.portal.pages",
    "carepost.portal.sender_pages",
    "carepost.tracking.api",
    "carepost.tracking.pages",
    "carepost.tracking.analytics_api",
    "carepost.tracking.analytics_pages",
    "carepost.content.api",
    "carepost.content.pages",
    "carepost.delivery.template_tests",
    "carepost.segments.api",
    "carepost.segments.pages",
    "carepost.campaigns.api",
    "carepost.campaigns.pages",
    "carepost.compliance.api",
    "carepost.compliance.pages",
    "carepost.compliance.program_api",  # breaches, reports, business associates, policies (issue 16 items 5, 6, 9, 10)
    "carepost.compliance.program_pages",
    "carepost.ehr.api",  # FHIR Appointment/Encounter, the EHR error queue, MLLP connections (issue 15 item 3)
    "carepost.ehr.pages",  # the EHR error queue page (issue 15)
    "carepost.journeys.api",
    "carepost.journeys.pages",
    "carepost.archive.api",  # the message archive: search, production exports (issue 16 item 8)
    "carepost.archive.pages",
    "carepost.retention.api",  # schedules, legal holds, purges, destruction certificates (issue 16 items 1-4)
    "carepost.retention.pages",
]

# Queue tasks of each capability (the worker must know every task it may be handed).
TASK_MODULES = [
    "carepost.core.tasks",
    "carepost.accounts.tasks",
    "carepost.patients.tasks",
    "carepost.consent.tasks",
    "carepost.delivery.tasks",
    "carepost.portal.tasks",
    "carepost.tracking.tasks",
    "carepost.forms.tasks",
    "carepost.segments.tasks",
    "carepost.campaigns.tasks",
    "carepost.journeys.tasks",  # the tick and the advance after an event (issue 15 item 2)
    "carepost.compliance.tasks",
    "carepost.retention.tasks",  # the nightly purge (issue 16 item 1)
    "carepost.ehr.tasks",
]


@dataclass
class Assembly:
    """What :func:`assemble` put together (for the app, the worker and the tests that check it)."""

    models: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    ports: dict[str, str] = field(default_factory=dict)
    http: bool = False  # the router modules and what only their pages use are assembled too


_lock = threading.RLock()
_assembled: Assembly | None = None


def assemble(*, http: bool = True) -> Assembly:
    """Assemble this process (idempotent; cheap after the first call).

    ``http=False`` leaves out the router modules and what only their pages use (see the module
    docstring); a later ``assemble()`` adds them.
    """
    global _assembled
    with _lock:
        if _assembled is not None and (_assembled.http or not http):
            return _assembled
        try:
            if _assembled is None:
                _assembled = _assemble()
            if http:
                _assembled = _assemble_http(_assembled)
        except NotAssembled:
            raise
        except ImportError as exc:
            raise NotAssembled(f"a capability could not be loaded: {exc}") from exc
        return _assembled


def assembled() -> Assembly | None:
    return _assembled


def disassemble() -> None:
    """Empty every port and event handler (tests that prove a bypass fails closed)."""
    global _assembled
    from carepost.core import events

    with _lock:
        for port in declared_ports().values():
            port.empty()
        events.reset()
        _assembled = None


def _assemble() -> Assembly:
    from carepost.core import events
    from carepost.models import MODEL_MODULES, load_all_models

    load_all_models()
    for name in TASK_MODULES:
        importlib.import_module(name)

    _fill_ports()
    _wire_events()
    _wire_registries()

    _refuse_unfilled_ports()
    events.mark_assembled()
    return Assembly(
        models=list(MODEL_MODULES),
        tasks=list(TASK_MODULES),
        ports={name: repr(port) for name, port in sorted(declared_ports().items())},
    )


def _assemble_http(core: Assembly) -> Assembly:
    """The router modules, in matching order, and the ports and registries only pages use."""
    for name in ROUTER_MODULES:
        importlib.import_module(name)
    _fill_page_ports()
    _wire_page_registries()
    _refuse_unfilled_ports()
    return Assembly(
        models=core.models,
        tasks=core.tasks,
        routers=list(ROUTER_MODULES),
        ports={name: repr(port) for name, port in sorted(declared_ports().items())},
        http=True,
    )


def _refuse_unfilled_ports() -> None:
    missing = unfilled_ports()
    if missing:
        raise NotAssembled("ports left unfilled: " + ", ".join(missing))


def _fill_ports() -> None:
    from carepost.accounts import ports as accounts_ports
    from carepost.audit import service as audit
    from carepost.consent import eligibility
    from carepost.delivery import pipeline
    from carepost.portal import service as portal

    accounts_ports.record.fill(audit.record)
    accounts_ports.record_for.fill(audit.record_for)
    from carepost.compliance import training

    accounts_ports.phi_gate.fill(training.phi_gate)  # the training gate on unmasked PHI (issue 16 item 10)

    # The delivery pipeline's steps owned by capabilities above delivery.
    pipeline.eligibility.fill(eligibility.pipeline_eligibility)
    pipeline.quiet_hours.fill(eligibility.pipeline_quiet_hours)
    pipeline.list_unsubscribe.fill(eligibility.pipeline_list_unsubscribe)
    from carepost.delivery import inbound

    inbound.unsubscribe_request.fill(eligibility.mailto_unsubscribe)
    from carepost.tracking import feedback

    inbound.feedback_report.fill(feedback.read_feedback_report)
    from carepost.delivery import messages as delivery_messages

    delivery_messages.topic_of.fill(eligibility.resolve_message_topic)
    pipeline.portal_store.fill(portal.store_portal_message)
    pipeline.portal_notification.fill(portal.notification_email)
    from carepost.tracking import links as tracking_links

    pipeline.links.fill(tracking_links.pipeline_links)  # link guard, click redirects, open pixel (issue 13)
    # No PHI through an organization relay or to a PHI webhook without a BAA on record (issue 16 item 9).
    from carepost.compliance import associates
    from carepost.tracking import service as tracking_service

    pipeline.relay_baa.fill(associates.relay_refusal)
    tracking_service.webhook_baa.fill(associates.webhook_refusal)
    from carepost.tracking import message_engagement

    delivery_messages.engagement_summary.fill(message_engagement.summary)
    from carepost.archive import index as archive_index

    delivery_messages.archive_index.fill(archive_index.index_messages)  # keyed word index (issue 16 item 8)
    from carepost import doctor
    from carepost.compliance import evidence

    evidence.doctor_checks.fill(doctor.run_checks)  # the evidence pack's doctor findings (issue 16 item 11)
    from carepost.delivery import compose

    compose.topic_choices.fill(eligibility.compose_topics)
    # Templates: merge-field helpers read patients' data; dynamic blocks speak the segment language.
    from carepost.content import blocks as content_blocks
    from carepost.content import helpers as content_helpers
    from carepost.patients import merge as patient_merge
    from carepost.segments import blocks as segment_blocks

    content_helpers.load_merge_data.fill(patient_merge.load)
    from carepost.consent import merge as consent_merge

    content_helpers.load_consent_data.fill(consent_merge.load)
    content_blocks.check_condition.fill(segment_blocks.check)
    content_blocks.block_members.fill(segment_blocks.members)
    compose.recipient_eligibility.fill(eligibility.recipients_eligibility)
    compose.reason_text.fill(eligibility.reason_sentence)


def _fill_page_ports() -> None:
    """Steps of the message page (delivery) that higher capabilities supply."""
    from carepost.delivery import pages as delivery_pages
    from carepost.portal import service as portal
    from carepost.retention import pages as retention_pages
    from carepost.tracking import engagement

    delivery_pages.engagement_of.fill(engagement.message_engagement)
    delivery_pages.portal_state.fill(portal.portal_state)
    delivery_pages.legal_holds_of.fill(retention_pages.message_hold_rows)  # the held mark on the message page (issue 16)


def _wire_events() -> None:
    from carepost.consent import service as consent
    from carepost.core import events
    from carepost.delivery import notices
    from carepost.tracking import service as tracking

    events.subscribe("organization.created", consent.ensure_default_texts)
    events.subscribe("message.recipient_event", tracking.emit_message_event)
    events.subscribe("account.notice", notices.handle_account_notice)
    # Consent's changes become webhooks (consent is below tracking: it publishes, tracking hears).
    events.subscribe("consent.unsubscribed", tracking.emit_consent_unsubscribed)
    events.subscribe("consent.subscribed", tracking.emit_consent_subscribed)
    events.subscribe("authorization.signed", tracking.emit_authorization_signed)
    events.subscribe("authorization.revoked", tracking.emit_authorization_revoked)
    # Analytics rollups are fed by the same events (issue 13 item 5).
    from carepost.tracking import analytics

    events.subscribe("message.recipient_event", analytics.count_message_event)
    events.subscribe("consent.unsubscribed", analytics.count_unsubscribe)
    # Journeys (issue 15): events start runs, wake waiting runs and meet goals; unsubscribes and
    # revocations end runs.
    from carepost.journeys import entries as journey_entries

    events.subscribe("contact.event_recorded", journey_entries.on_contact_event)
    events.subscribe("contact.events_recorded", journey_entries.on_contact_events)
    events.subscribe("consent.unsubscribed", journey_entries.on_unsubscribed)
    events.subscribe("authorization.revoked", journey_entries.on_revoked)


def _wire_registries() -> None:
    """Registries owned by a lower capability, filled with the functions of higher ones."""
    from carepost.consent import service as consent
    from carepost.forms import service as forms
    from carepost.patients import service as patients
    from carepost.tracking import service as tracking

    patients.register_deletion_hook(consent.forget_contact, many=consent.forget_contacts)
    patients.register_export_section("consent", consent.export_section)
    patients.register_deletion_hook(forms.forget_contact, many=forms.forget_contacts)
    patients.register_export_section("form_submissions", forms.export_section)
    from carepost.tracking import conversions

    patients.register_deletion_hook(conversions.forget_contact, many=conversions.forget_contacts)  # custom events (issue 13 item 4)

    # The accounting of disclosures (audit) lists what higher capabilities derive (issue 16 item 4).
    from carepost.audit import disclosures
    from carepost.compliance import disclosure_sources

    disclosures.register_source("webhook", disclosure_sources.webhook_disclosures)

    tracking.register_event_types(forms.EVENT_TYPES)
    from carepost.tracking import engagement

    tracking.register_event_types(engagement.EVENT_TYPES)
    from carepost.tracking import deliverability

    tracking.register_event_types(deliverability.EVENT_TYPES)
    from carepost.tracking import conversions as tracking_conversions

    tracking.register_event_types(tracking_conversions.EVENT_TYPES)  # message.converted (issue 13 item 8)
    from carepost.journeys import steps as journey_steps

    tracking.register_event_types(journey_steps.WEBHOOK_EVENT_TYPES)  # journey.step (issue 15)


def _wire_page_registries() -> None:
    """The contact page's sections and the campaign calendar's journey sends, supplied by the
    capabilities that own them."""
    from carepost.consent import pages as consent_pages
    from carepost.delivery import pages as delivery_pages
    from carepost.journeys import pages as journey_pages
    from carepost.patients import pages as patient_pages
    from carepost.retention import pages as retention_pages

    patient_pages.register_contact_section("consent", "Consent and authorizations", consent_pages.consent_rows)
    patient_pages.register_contact_section("messages", "Message history", delivery_pages.contact_messages_rows)
    patient_pages.register_contact_section("keys", "Encryption keys", delivery_pages.contact_keys_rows)
    patient_pages.register_contact_section("journeys", "Journeys", journey_pages.contact_journey_rows)  # issue 15 item 6
    patient_pages.register_contact_section("legal_holds", "Legal holds", retention_pages.contact_hold_rows)  # issue 16
    # The campaign calendar shows the journeys' scheduled sends (issue 14 item 2; campaigns never imports journeys).
    from carepost.campaigns import pages as campaign_pages
    from carepost.journeys import calendar as journey_calendar

    campaign_pages.register_calendar_source("journeys", journey_calendar.calendar_entries)
