"""Starter journeys for the common programs (issue 15 item 6): the "New from starter" picker of the
journeys page opens one of these in the editor as an unsaved draft.

Each starter is a definition in the shared journey format (docs/journeys.md) with its purpose
chosen by the rules of 45 CFR 164.501: reminders of care the patient is receiving are
*treatment*; refill reminders for a drug currently prescribed are *refill_reminder*;
population-based outreach that promotes nothing (flu season, onboarding) is *health care
operations*. None is marketing, so none needs an authorization or compliance approval.

What a starter cannot know — which of the organization's templates each send step uses, which
segment a segment entry means — is left empty (``template_id``/``segment_id`` ``None``) and listed
by :func:`slots`; the editor asks for it (the validation names the empty field until it is
chosen), and :func:`fill` puts chosen ids in (the tests use it to prove every starter valid).
The definitions hold no PHI: ids, field names, event names and codes only; staff notice texts
carry no merge fields.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Starter:
    key: str
    name: str
    description: str
    purpose: str
    definition: dict
    # send step id -> what its template should say (shown next to the template picker)
    template_hints: dict[str, str] = field(default_factory=dict)
    segment_hint: str | None = None


def _send(next_step: str | None) -> dict:
    step: dict = {"type": "send", "template_id": None, "template_version": None}
    if next_step:
        step["next"] = next_step
    return step


def _layout(definition: dict) -> dict:
    """Editor positions: the steps in order of discovery from the start, two to a row, so a
    starter fits the editor's canvas without zooming out."""
    steps = definition["steps"]
    order = [definition["start"]]
    for sid in order:
        for target in successors(steps[sid]):
            if target in steps and target not in order:
                order.append(target)
    return {sid: {"x": 40 + (i % 2) * 250, "y": 40 + (i // 2) * 140} for i, sid in enumerate(order)}


def successors(step: dict) -> list[str]:
    """The step ids a step can lead to, in the order of its outputs."""
    kind = step.get("type")
    if kind == "branch":
        return [c.get("next") for c in step.get("cases") or []] + [step.get("default")]
    if kind == "split":
        return [v.get("next") for v in step.get("variants") or []]
    if kind == "wait_event":
        return [step.get("next"), step.get("timeout_next")]
    if kind == "exit":
        return []
    return [step.get("next")]


def _definition(purpose: str, entry: dict, steps: dict, start: str, *, reentry: dict, goal: dict | None = None) -> dict:
    d = {"purpose": purpose, "topic_id": None, "entry": entry, "reentry": reentry,
         "exit_on": ["unsubscribe", "revocation"], "start": start, "steps": steps}
    if goal:
        d["goal"] = goal
    d["layout"] = _layout(d)
    return d


_STARTERS = [
    Starter(
        key="appointment_reminder",
        name="Appointment reminder (7 days, 2 days, 2 hours)",
        description="Three reminders before each appointment; a cancellation ends the run.",
        purpose="treatment",
        definition=_definition(
            "treatment",
            {"type": "date", "field": "appointment.start", "offset": "-7d"},
            {
                "remind_7d": _send("wait_2d"),
                "wait_2d": {"type": "wait_event", "event": "appointment.cancelled", "timeout": "5d",
                            "next": "cancelled", "timeout_next": "remind_2d"},
                "remind_2d": _send("wait_2h"),
                "wait_2h": {"type": "wait_event", "event": "appointment.cancelled", "timeout": "46h",
                            "next": "cancelled", "timeout_next": "remind_2h"},
                "remind_2h": _send("done"),
                "cancelled": {"type": "exit"},
                "done": {"type": "exit"},
            },
            "remind_7d", reentry={"mode": "always"}),
        template_hints={"remind_7d": "Reminder: your appointment is in a week",
                        "remind_2d": "Reminder: your appointment is in two days",
                        "remind_2h": "Reminder: your appointment is today"},
    ),
    Starter(
        key="post_discharge",
        name="Post-discharge follow-up",
        description="Discharge instructions the day after, a check-in survey two days later, the care "
                    "team notified when it is not answered; a booked follow-up visit is the goal.",
        purpose="treatment",
        definition=_definition(
            "treatment",
            {"type": "event", "event": "patient.discharged"},
            {
                "wait_1d": {"type": "wait", "duration": "1d", "next": "instructions"},
                "instructions": _send("wait_2d"),
                "wait_2d": {"type": "wait", "duration": "2d", "next": "check_in"},
                "check_in": _send("await_survey"),
                "await_survey": {"type": "wait_event", "event": "form.submitted", "timeout": "3d",
                                 "next": "done", "timeout_next": "notify_team"},
                "notify_team": {"type": "notify", "role": "care_team",
                                "text": "A patient discharged recently has not answered the follow-up check-in. "
                                        "Open the post-discharge journey to see the runs waiting.",
                                "next": "done"},
                "done": {"type": "exit"},
            },
            "wait_1d", reentry={"mode": "after", "days": 30},
            goal={"event": "appointment.booked", "within_days": 14}),
        template_hints={"instructions": "Your discharge instructions and whom to call",
                        "check_in": "How are you feeling? (link to the check-in form)"},
    ),
    Starter(
        key="refill_reminder",
        name="Refill reminder",
        description="A reminder a week before a refill is due, and a second one when the first was not opened.",
        purpose="refill_reminder",
        definition=_definition(
            "refill_reminder",
            {"type": "date", "field": "refill_due", "offset": "-7d", "at": "09:00"},
            {
                "remind": _send("wait_3d"),
                "wait_3d": {"type": "wait", "duration": "3d", "next": "opened"},
                "opened": {"type": "branch",
                           "cases": [{"when": {"kind": "engagement", "step": "remind", "is": "not_opened"},
                                      "next": "remind_again"}],
                           "default": "done"},
                "remind_again": _send("done"),
                "done": {"type": "exit"},
            },
            "remind", reentry={"mode": "always"}),
        template_hints={"remind": "Your prescription is due for a refill",
                        "remind_again": "A second reminder: your refill is due"},
    ),
    Starter(
        key="annual_wellness_visit",
        name="Annual wellness visit",
        description="An invitation eleven months after the last visit, a reminder two weeks later; "
                    "booking the visit is the goal.",
        purpose="treatment",
        definition=_definition(
            "treatment",
            {"type": "date", "field": "last_visit", "offset": "+11mo", "at": "09:00"},
            {
                "invite": _send("wait_14d"),
                "wait_14d": {"type": "wait", "duration": "2w", "next": "reminder"},
                "reminder": _send("done"),
                "done": {"type": "exit"},
            },
            "invite", reentry={"mode": "after", "days": 300},
            goal={"event": "appointment.booked", "within_days": 30}),
        template_hints={"invite": "It is time for your annual wellness visit",
                        "reminder": "A reminder to book your annual wellness visit"},
    ),
    Starter(
        key="flu_season",
        name="Flu season",
        description="Patients joining a segment (for example adults without this season's flu shot) are "
                    "invited on a weekday morning, and reminded a week later if they did not open it.",
        purpose="health_care_operations",
        definition=_definition(
            "health_care_operations",
            {"type": "segment", "segment_id": None},
            {
                "weekday_morning": {"type": "wait_until", "time": "09:00", "weekdays": [1, 2, 3, 4, 5],
                                    "next": "invite"},
                "invite": _send("wait_7d"),
                "wait_7d": {"type": "wait", "duration": "7d", "next": "opened"},
                "opened": {"type": "branch",
                           "cases": [{"when": {"kind": "engagement", "step": "invite", "is": "not_opened"},
                                      "next": "reminder"}],
                           "default": "done"},
                "reminder": _send("done"),
                "done": {"type": "exit"},
            },
            "weekday_morning", reentry={"mode": "after", "days": 300},
            goal={"event": "appointment.booked", "within_days": 60}),
        template_hints={"invite": "Flu shots are available — book yours", "reminder": "A reminder about your flu shot"},
        segment_hint="Patients due a flu shot this season",
    ),
    Starter(
        key="new_patient_onboarding",
        name="New-patient onboarding",
        description="A welcome at registration, the intake forms two days later, a reminder when they are "
                    "not submitted within five days.",
        purpose="health_care_operations",
        definition=_definition(
            "health_care_operations",
            {"type": "event", "event": "patient.registered"},
            {
                "welcome": _send("wait_2d"),
                "wait_2d": {"type": "wait", "duration": "2d", "next": "intake_forms"},
                "intake_forms": _send("await_forms"),
                "await_forms": {"type": "wait_event", "event": "form.submitted", "timeout": "5d",
                                "next": "done", "timeout_next": "forms_reminder"},
                "forms_reminder": _send("done"),
                "done": {"type": "exit"},
            },
            "welcome", reentry={"mode": "never"}),
        template_hints={"welcome": "Welcome to the practice: what to expect",
                        "intake_forms": "Please complete your intake forms",
                        "forms_reminder": "A reminder: your intake forms"},
    ),
]

STARTERS: dict[str, Starter] = {s.key: s for s in _STARTERS}


def list_starters() -> list[Starter]:
    return list(_STARTERS)


def get_starter(key: str) -> Starter | None:
    return STARTERS.get(key)


def starter_definition(key: str) -> dict:
    """A fresh copy of a starter's definition (the caller may change it)."""
    return copy.deepcopy(STARTERS[key].definition)


def slots(definition: dict) -> dict:
    """What must be chosen before a starter validates: send steps without a template and a
    segment entry without a segment."""
    sends = [sid for sid, step in (definition.get("steps") or {}).items()
             if step.get("type") == "send" and not step.get("template_id")]
    entry = definition.get("entry") or {}
    return {"templates": sends, "segment": entry.get("type") == "segment" and not entry.get("segment_id")}


def fill(definition: dict, templates: dict[str, tuple[str, int]], segment_id: str | None = None) -> dict:
    """``definition`` with each send step's template (``step id -> (template id, version)``) and the
    segment of a segment entry filled in; a copy."""
    out = copy.deepcopy(definition)
    for sid, (template_id, version) in templates.items():
        out["steps"][sid]["template_id"] = template_id
        out["steps"][sid]["template_version"] = version
    if segment_id and out.get("entry", {}).get("type") == "segment":
        out["entry"]["segment_id"] = segment_id
    return out
