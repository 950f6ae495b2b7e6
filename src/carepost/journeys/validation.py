"""Validation of a journey definition: every problem, each with the JSON path that names it.

Contract (used by the API, the CLI, the editor and publishing alike):

* :func:`validate_definition(session, org_id, definition) -> list[dict]` — pure (reads the
  organization's templates, segments, topics, people, custom attributes and event names; writes
  nothing, logs nothing). Returns ``[{"path": "steps.s4.timeout", "message": "..."}, ...]``, empty
  when the definition is valid. Paths are dotted from the definition's root, list items as
  ``[i]`` (``steps.s5.cases[0].next``); ``""`` is the definition itself. Messages name what is
  wrong, never a value that could be PHI (a notice's text is never echoed).
* :func:`parse_definition(definition) -> Definition` — the typed form the engine reads; call it
  only on a definition that validated (raises :class:`DefinitionInvalid` otherwise).
* :func:`check_definition(session, org_id, definition) -> Definition` — both; raises
  :class:`DefinitionInvalid` (a 422 whose ``field`` is the first path, prefixed by ``prefix``,
  and whose ``errors`` list all of them) when anything is wrong.
* :func:`references(definition)` — the segment, template and topic ids a definition uses (for
  approval rules: a sensitive segment needs approval).

Refused (docs/journeys.md): malformed or unknown fields; an unknown step type; a missing or
unknown ``next`` target; unreachable steps; a cycle that contains no wait/wait_until/wait_event
step; steps from which no exit can be reached (a loop without a way out); a wait of zero or less;
a wait for an event without a timeout; unknown contact fields and events; a branch without a
default; split weights not summing to 100; an engagement condition on a step that is not a send
step; a template, version, segment, topic or person not in the organization; a template whose
helpers reveal more than the purpose allows (content's PHI lint per purpose); a staff notice with
merge fields or text that looks like PHI; more than :data:`~carepost.journeys.schemas.MAX_STEPS`
steps.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core.errors import NotFound, ValidationFailed
from carepost.core.purposes import PURPOSES
from carepost.journeys import schemas as S

# Events a journey may start on, wait for, or count as its goal, besides the organization's own
# (any name it has recorded through POST /api/v1/events or named as a goal).
EHR_EVENTS = {
    "appointment.booked": "An appointment was booked (EHR: HL7 SIU S12, FHIR Appointment booked).",
    "appointment.rescheduled": "An appointment was moved (HL7 SIU S13/S14).",
    "appointment.cancelled": "An appointment was cancelled (HL7 SIU S15, FHIR Appointment cancelled).",
    "appointment.discontinued": "An appointment series was discontinued (HL7 SIU S16).",
    "appointment.deleted": "An appointment was deleted as entered in error (HL7 SIU S17).",
    "appointment.resource_added": "A service or resource was added to an appointment (HL7 SIU S18).",
    "appointment.resource_modified": "A service or resource of an appointment changed (HL7 SIU S19).",
    "appointment.resource_cancelled": "A service or resource of an appointment was cancelled (HL7 SIU S20).",
    "appointment.resource_discontinued": "A service or resource of an appointment was discontinued (HL7 SIU S21).",
    "appointment.resource_deleted": "A service or resource of an appointment was deleted (HL7 SIU S22).",
    "appointment.noshow": "The patient did not come to an appointment (HL7 SIU S26, FHIR Appointment noshow).",
    "patient.admitted": "The patient was admitted (HL7 ADT A01, FHIR Encounter in-progress inpatient).",
    "patient.transferred": "The patient was transferred to another location (HL7 ADT A02).",
    "patient.admission_cancelled": "An admission was cancelled (HL7 ADT A11).",
    "patient.discharged": "The patient was discharged (HL7 ADT A03, FHIR Encounter finished).",
    "patient.discharge_cancelled": "A discharge was cancelled (HL7 ADT A13).",
    "patient.merged": "Another patient record was merged into the patient's (HL7 ADT A40).",
    "patient.registered": "The patient was registered (HL7 ADT A04).",
    "patient.updated": "The patient's information changed (HL7 ADT A08).",
    "lab_result.available": "A lab result is available.",
}
TRACKING_EVENTS = {
    "message.clicked": "The patient clicked a link in a message (a human click: scanners are left out).",
    "message.opened": "The patient opened a message (a human open: proxies are left out).",
}
EXIT_REASON_EVENTS = ("unsubscribe", "revocation")
_MERGE = re.compile(r"\{\{|\{%|\}\}|%\}")
_ATTR = re.compile(r"^attr\.[A-Za-z_][A-Za-z0-9_]{0,63}$")
SETTABLE_FIELDS = ("stage", "preferred_language", "time_zone")
ORDER_OPS = ("lt", "le", "gt", "ge")


class DefinitionInvalid(ValidationFailed):
    """A 422 listing every problem of a definition (``errors``), the first one as ``field``."""

    code = "invalid_definition"

    def __init__(self, errors: list[dict], prefix: str = ""):
        self.errors = [{"path": _join(prefix, e["path"]), "message": e["message"]} for e in errors]
        first = self.errors[0] if self.errors else {"path": prefix or None, "message": "invalid"}
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(f"{first['path'] or 'definition'}: {first['message']}{more}", field=first["path"] or None)

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["errors"] = [{"field": e["path"], "reason": e["message"], "type": "journey_definition"} for e in self.errors]
        return body


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def _loc(parts) -> str:
    out = ""
    for p in parts:
        out = f"{out}[{p}]" if isinstance(p, int) else (f"{out}.{p}" if out else str(p))
    return out


def _pydantic_errors(exc: ValidationError, prefix: str) -> list[dict]:
    out = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = [p for p in err.get("loc", ()) if p not in ("function-after",)]
        kind = err.get("type", "")
        msg = err.get("msg", "invalid")
        if kind == "extra_forbidden":
            msg = "Unknown field."
        elif kind == "missing":
            msg = {"default": "A branch needs a default: the step taken when no case matches.",
                   "next": "The next step is missing.", "timeout_next": "The step taken on timeout is missing.",
                   "timeout": "A wait for an event needs a timeout.",
                   }.get(str(loc[-1]) if loc else "", "This field is required.")
        elif kind == "literal_error":
            msg = msg.replace("Input should be", "Must be")
        elif kind == "string_pattern_mismatch":
            msg = "Not in the expected form."
        out.append({"path": _join(prefix, _loc(loc)), "message": msg})
    return out


def _shape(model: type[BaseModel], data: Any, prefix: str, errors: list[dict]) -> BaseModel | None:
    if not isinstance(data, dict):
        errors.append({"path": prefix, "message": "Must be an object."})
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors.extend(_pydantic_errors(exc, prefix))
        return None


# --------------------------------------------------------------------------- the graph

def targets(step: BaseModel) -> list[tuple[str, str]]:
    """(path relative to the step, target step id) of every edge leaving ``step``."""
    if isinstance(step, S.BranchStep):
        return [(f"cases[{i}].next", c.next) for i, c in enumerate(step.cases)] + [("default", step.default)]
    if isinstance(step, S.SplitStep):
        return [(f"variants[{i}].next", v.next) for i, v in enumerate(step.variants)]
    if isinstance(step, S.WaitEventStep):
        return [("next", step.next), ("timeout_next", step.timeout_next)]
    if isinstance(step, S.ExitStep):
        return []
    return [("next", step.next)]


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (a 200-step definition must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            edges = graph[node]
            if i < len(edges):
                work.append((node, i + 1))
                nxt = edges[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                out.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out


def _graph_errors(steps: dict[str, BaseModel], start: str, errors: list[dict]) -> None:
    graph = {sid: [t for _, t in targets(step) if t in steps] for sid, step in steps.items()}
    for sid, step in steps.items():
        for rel, target in targets(step):
            if target not in steps:
                errors.append({"path": f"steps.{sid}.{rel}", "message": "No step has this id."})
    if start not in steps:
        errors.append({"path": "start", "message": "No step has this id."})
        return
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    for sid in steps:
        if sid not in seen:
            errors.append({"path": f"steps.{sid}", "message": "This step cannot be reached from the start."})
    for component in _strongly_connected({k: graph[k] for k in graph if k in seen}):
        looped = len(component) > 1 or component[0] in graph[component[0]]
        if looped and not any(steps[s].type in S.WAIT_TYPES for s in component):
            ordered = sorted(component)
            errors.append({"path": f"steps.{ordered[0]}", "message": "These steps form a cycle without a wait "
                           f"(wait, wait_until or wait_event): {', '.join(ordered)}."})
    # From every reachable step an exit must be reachable (a loop without a way out never ends).
    reverse: dict[str, list[str]] = {s: [] for s in steps}
    for sid, outs in graph.items():
        for t in outs:
            reverse[t].append(sid)
    can_exit = {s for s, step in steps.items() if step.type == "exit"}
    todo = list(can_exit)
    while todo:
        for prev in reverse[todo.pop()]:
            if prev not in can_exit:
                can_exit.add(prev)
                todo.append(prev)
    trapped = sorted(s for s in seen if s not in can_exit)
    if trapped:
        errors.append({"path": f"steps.{trapped[0]}", "message": "No path from these steps reaches an exit step: "
                       f"{', '.join(trapped)}."})


# --------------------------------------------------------------------------- references

def known_events(session: Session | None, org_id: str | None) -> set[str]:
    """Event names a journey may use: the documented ones, the EHR's, tracking's, and every name
    the organization has recorded or named as a goal."""
    from carepost.tracking.conversions import KNOWN_EVENTS, ContactEvent, Goal

    names = set(KNOWN_EVENTS) | set(EHR_EVENTS) | set(TRACKING_EVENTS)
    if session is not None and org_id:
        names |= set(session.scalars(select(Goal.event_name).where(Goal.org_id == org_id)))
        names |= set(session.scalars(select(ContactEvent.name).where(ContactEvent.org_id == org_id).distinct()))
    return names


def _exists(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except (NotFound, ValidationFailed):
        return False


class _Refs:
    """Look-ups cached for one validation (a definition may name one segment many times)."""

    def __init__(self, session: Session | None, org_id: str | None):
        self.session, self.org_id = session, org_id
        self._events: set[str] | None = None
        self._attrs: set[str] | None = None
        self._cache: dict[tuple, Any] = {}

    def events(self) -> set[str]:
        if self._events is None:
            self._events = known_events(self.session, self.org_id)
        return self._events

    def attributes(self) -> set[str]:
        if self._attrs is None:
            if self.session is None:
                self._attrs = set()
            else:
                from carepost.patients.service import list_attribute_definitions

                self._attrs = {d.key for d in list_attribute_definitions(self.session, self.org_id)}
        return self._attrs

    def _once(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def segment(self, segment_id: str):
        from carepost.segments.service import get_segment

        def find():
            try:
                return get_segment(self.session, self.org_id, segment_id)
            except NotFound:
                return None
        return self._once(("segment", segment_id), find)

    def topic(self, topic_id: str) -> bool:
        from carepost.consent.service import get_topic

        return self._once(("topic", topic_id), lambda: _topic_exists(self.session, self.org_id, topic_id, get_topic))

    def member(self, user_id: str) -> bool:
        from carepost.accounts.service import get_member

        return self._once(("member", user_id), lambda: _exists(get_member, self.session, self.org_id, user_id))


def _topic_exists(session, org_id, topic_id, get_topic) -> bool:
    try:
        get_topic(session, org_id, topic_id, "topic_id", by_key=False)
        return True
    except NotFound:
        return False


def _check_event(name: str, path: str, refs: _Refs, errors: list[dict]) -> None:
    if refs.session is not None and name not in refs.events():
        errors.append({"path": path, "message": "Unknown event: not a documented, EHR or tracking event, and this "
                       "organization has never recorded it nor named it as a goal."})


def _check_field(field: str, path: str, refs: _Refs, errors: list[dict]) -> str | None:
    """The type of a contact field (segments' language), or None after an error."""
    from carepost.segments.language import CONTACT_FIELDS

    if field in CONTACT_FIELDS:
        return CONTACT_FIELDS[field][0]
    if _ATTR.match(field):
        if refs.session is not None and field[5:] not in refs.attributes():
            errors.append({"path": path, "message": "No custom attribute has this key in this organization."})
            return None
        return "attr"
    errors.append({"path": path, "message": "Unknown contact field; use a field of the segment language "
                   "(sex, age, birth_date, preferred_language, city, stage, ...) or attr.<key>."})
    return None


def _check_template(step: S.SendStep, path: str, purpose: str | None, refs: _Refs, errors: list[dict]) -> None:
    if refs.session is None:
        return
    from carepost.content.service import check_purpose_fit, get_template, get_version

    try:
        template = get_template(refs.session, refs.org_id, step.template_id)
    except NotFound:
        errors.append({"path": f"{path}.template_id", "message": "No such template in this organization."})
        return
    try:
        version = get_version(refs.session, template, step.template_version)
    except NotFound:
        errors.append({"path": f"{path}.template_version", "message": "The template has no such version."})
        return
    if purpose in PURPOSES:
        try:
            check_purpose_fit(refs.session, refs.org_id, version.id, purpose, field=f"{path}.template_version")
        except ValidationFailed as exc:
            errors.append({"path": f"{path}.template_version", "message": exc.message})


def _check_condition(when: dict, path: str, steps: dict[str, BaseModel], refs: _Refs, errors: list[dict]) -> None:
    kind = when.get("kind") if isinstance(when, dict) else None
    model = S.CONDITION_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        errors.append({"path": f"{path}.kind", "message": "Must be attribute, segment or engagement."})
        return
    cond = _shape(model, when, path, errors)
    if cond is None:
        return
    if isinstance(cond, S.AttributeCondition):
        ftype = _check_field(cond.field, f"{path}.field", refs, errors)
        if cond.op in ("is_empty", "is_not_empty"):
            if cond.value is not None:
                errors.append({"path": f"{path}.value", "message": f"{cond.op} takes no value."})
        elif cond.op in ("in", "not_in"):
            if not isinstance(cond.value, list) or not cond.value or len(cond.value) > 100:
                errors.append({"path": f"{path}.value", "message": f"{cond.op} takes a list of 1 to 100 values."})
        elif cond.value is None or isinstance(cond.value, list):
            errors.append({"path": f"{path}.value", "message": f"{cond.op} takes one value."})
        if cond.op in ORDER_OPS and ftype not in (None, "number", "date", "attr"):
            errors.append({"path": f"{path}.op", "message": f"{cond.op} compares numbers and dates; this field is "
                           f"{ftype}."})
    elif isinstance(cond, S.SegmentCondition):
        if refs.session is not None and refs.segment(cond.segment_id) is None:
            errors.append({"path": f"{path}.segment_id", "message": "No such segment in this organization."})
    elif isinstance(cond, S.EngagementCondition):
        target = steps.get(cond.step)
        if target is None:
            errors.append({"path": f"{path}.step", "message": "No step has this id."})
        elif not isinstance(target, S.SendStep):
            errors.append({"path": f"{path}.step", "message": "Engagement is measured on a send step."})


def _check_step(sid: str, step: BaseModel, purpose: str | None, steps: dict, refs: _Refs, errors: list[dict]) -> None:
    path = f"steps.{sid}"
    if isinstance(step, S.SendStep):
        _check_template(step, path, purpose, refs, errors)
    elif isinstance(step, S.WaitStep):
        try:
            S.parse_duration(step.duration)
        except ValueError as exc:
            errors.append({"path": f"{path}.duration", "message": str(exc)})
    elif isinstance(step, S.WaitUntilStep):
        if len(set(step.weekdays)) != len(step.weekdays):
            errors.append({"path": f"{path}.weekdays", "message": "A weekday is named twice."})
    elif isinstance(step, S.WaitEventStep):
        _check_event(step.event, f"{path}.event", refs, errors)
        try:
            S.parse_duration(step.timeout)
        except ValueError as exc:
            errors.append({"path": f"{path}.timeout", "message": str(exc)})
    elif isinstance(step, S.BranchStep):
        for i, case in enumerate(step.cases):
            _check_condition(case.when, f"{path}.cases[{i}].when", steps, refs, errors)
    elif isinstance(step, S.SplitStep):
        total = sum(v.weight for v in step.variants)
        if total != 100:
            errors.append({"path": f"{path}.variants", "message": f"The weights add up to {total}, not 100."})
        names = [v.name for v in step.variants]
        if len(set(names)) != len(names):
            errors.append({"path": f"{path}.variants", "message": "Two variants have the same name."})
    elif isinstance(step, S.UpdateStep):
        if step.action == "set_field":
            if step.field is None:
                errors.append({"path": f"{path}.field", "message": "set_field names the field."})
            elif step.field not in SETTABLE_FIELDS and not _ATTR.match(step.field):
                errors.append({"path": f"{path}.field", "message": "Unknown field: a journey may set "
                               f"{', '.join(SETTABLE_FIELDS)} or attr.<key>."})
            elif _ATTR.match(step.field) and refs.session is not None and step.field[5:] not in refs.attributes():
                errors.append({"path": f"{path}.field", "message": "No custom attribute has this key in this "
                               "organization."})
            if step.topic_id is not None:
                errors.append({"path": f"{path}.topic_id", "message": "set_field takes no topic."})
        else:
            if step.topic_id is None:
                errors.append({"path": f"{path}.topic_id", "message": f"{step.action} names the topic."})
            elif refs.session is not None and not refs.topic(step.topic_id):
                errors.append({"path": f"{path}.topic_id", "message": "No such topic in this organization."})
            if step.field is not None or step.value is not None:
                errors.append({"path": f"{path}.field", "message": f"{step.action} takes no field or value."})
    elif isinstance(step, S.NotifyStep):
        if (step.role is None) == (step.user_id is None):
            errors.append({"path": f"{path}.role", "message": "Name either a role or a person (user_id)."})
        elif step.role is not None and step.role not in S.NOTIFY_ROLES:
            errors.append({"path": f"{path}.role", "message": f"Must be one of {', '.join(S.NOTIFY_ROLES)}."})
        elif step.user_id is not None and refs.session is not None and not refs.member(step.user_id):
            errors.append({"path": f"{path}.user_id", "message": "No such person in this organization."})
        if _MERGE.search(step.text):
            errors.append({"path": f"{path}.text", "message": "A staff notice may not use merge fields: it is sent "
                           "outside the protected content."})
        else:
            from carepost.content.phi_lint import findings

            found = findings(step.text)
            if found:
                errors.append({"path": f"{path}.text", "message": "A staff notice may hold no PHI; it contains "
                               f"{' and '.join(found)}."})
    elif isinstance(step, S.WebhookStep) and not step.event.startswith("journey."):
        errors.append({"path": f"{path}.event", "message": "A journey's webhook event is named journey.<what>, "
                       "e.g. journey.step."})


def _check_entry(entry, refs: _Refs, errors: list[dict]) -> None:
    if isinstance(entry, S.EventEntry):
        _check_event(entry.event, "entry.event", refs, errors)
    elif isinstance(entry, S.SegmentEntry):
        if refs.session is not None and refs.segment(entry.segment_id) is None:
            errors.append({"path": "entry.segment_id", "message": "No such segment in this organization."})
    elif isinstance(entry, S.DateEntry):
        try:
            S.parse_offset(entry.offset)
        except ValueError as exc:
            errors.append({"path": "entry.offset", "message": str(exc)})
        if entry.anniversary and entry.field not in ("birth_date", "last_visit"):
            errors.append({"path": "entry.anniversary", "message": "Only birth_date and last_visit recur yearly."})
        if entry.field.startswith("screening_due:"):
            from carepost.journeys.entries import screening_value_set

            if screening_value_set(entry.field.partition(":")[2]) is None:
                errors.append({"path": "entry.field", "message": "screening_due:<value set> names a shipped value set "
                               "of procedures or observations (mammography, colorectal_cancer_screening, hba1c...)."})
            try:
                amount, _unit = S.parse_offset(entry.offset)
            except ValueError:
                amount = 1
            if amount <= 0:
                errors.append({"path": "entry.offset", "message": "For screening_due the offset is the screening "
                               "interval after the last one, such as 1y or 2y (positive)."})


# --------------------------------------------------------------------------- the functions

def _validate(session: Session | None, org_id: str | None, definition: Any) -> tuple[list[dict], dict | None]:
    errors: list[dict] = []
    if not isinstance(definition, dict):
        return [{"path": "", "message": "A definition is a JSON object."}], None
    shape = _shape(S.DefinitionShape, definition, "", errors)
    raw_steps = definition.get("steps")
    if isinstance(raw_steps, dict) and len(raw_steps) > S.MAX_STEPS:
        return errors + [{"path": "steps", "message": f"At most {S.MAX_STEPS} steps."}], None
    if isinstance(raw_steps, dict) and not raw_steps:
        errors.append({"path": "steps", "message": "A journey needs at least one step."})
    refs = _Refs(session, org_id)
    purpose = definition.get("purpose")
    if isinstance(purpose, str) and purpose not in PURPOSES:
        errors.append({"path": "purpose", "message": f"Must be one of {', '.join(PURPOSES)}."})
    if shape is not None and shape.topic_id and session is not None and not refs.topic(shape.topic_id):
        errors.append({"path": "topic_id", "message": "No such topic in this organization."})
    if shape is not None and shape.reentry.mode == "after" and shape.reentry.days is None:
        errors.append({"path": "reentry.days", "message": "Re-entry after a number of days names the days."})
    if shape is not None and shape.reentry.mode != "after" and shape.reentry.days is not None:
        errors.append({"path": "reentry.days", "message": "Days are for re-entry mode after."})
    if shape is not None and len(set(shape.exit_on)) != len(shape.exit_on):
        errors.append({"path": "exit_on", "message": "A reason is named twice."})
    if shape is not None and shape.goal is not None:
        _check_event(shape.goal.event, "goal.event", refs, errors)
    entry = None
    raw_entry = definition.get("entry")
    if isinstance(raw_entry, dict):
        kind = raw_entry.get("type")
        model = S.ENTRY_MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            errors.append({"path": "entry.type", "message": "Must be event, segment or date."})
        else:
            entry = _shape(model, raw_entry, "entry", errors)
            if entry is not None:
                _check_entry(entry, refs, errors)
    steps: dict[str, BaseModel] = {}
    step_errors = False
    if isinstance(raw_steps, dict):
        for sid, raw in raw_steps.items():
            path = f"steps.{sid}"
            if not S.STEP_ID.match(sid):
                errors.append({"path": path, "message": "A step id is a letter, then letters, digits, _ or -, "
                               "at most 32 characters."})
                step_errors = True
                continue
            kind = raw.get("type") if isinstance(raw, dict) else None
            model = S.STEP_MODELS.get(kind) if isinstance(kind, str) else None
            if not isinstance(raw, dict):
                errors.append({"path": path, "message": "A step is an object."})
            elif model is None:
                errors.append({"path": f"{path}.type", "message": "Unknown step type; must be one of "
                               f"{', '.join(S.STEP_MODELS)}."})
            else:
                step = _shape(model, raw, path, errors)
                if step is not None:
                    steps[sid] = step
                    continue
            step_errors = True
        clean_purpose = purpose if isinstance(purpose, str) else None
        for sid, step in steps.items():
            _check_step(sid, step, clean_purpose, steps, refs, errors)
        if not step_errors and shape is not None:
            _graph_errors(steps, shape.start, errors)
        elif shape is not None:
            # Targets can still be checked against the ids that exist, valid or not.
            for sid, step in steps.items():
                for rel, target in targets(step):
                    if target not in raw_steps:
                        errors.append({"path": f"steps.{sid}.{rel}", "message": "No step has this id."})
            if shape.start not in raw_steps:
                errors.append({"path": "start", "message": "No step has this id."})
    if shape is not None and shape.layout:
        for sid in shape.layout:
            if not isinstance(raw_steps, dict) or sid not in raw_steps:
                errors.append({"path": f"layout.{sid}", "message": "No step has this id."})
    seen, unique = set(), []
    for e in errors:
        key = (e["path"], e["message"])
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return unique, (definition if not unique else None)


def validate_definition(session: Session | None, org_id: str | None, definition: Any) -> list[dict]:
    """Every problem of ``definition`` as ``{"path", "message"}`` (empty: valid). With
    ``session=None`` only the shape and the graph are checked (no look-ups: an offline lint)."""
    return _validate(session, org_id, definition)[0]


def parse_definition(definition: Any) -> S.Definition:
    """The typed definition (for the engine). Only the shape is checked here: call it on a
    definition that :func:`validate_definition` accepted."""
    errors = validate_definition(None, None, definition)
    if errors:
        raise DefinitionInvalid(errors)
    data = dict(definition)
    data["entry"] = S.ENTRY_MODELS[definition["entry"]["type"]].model_validate(definition["entry"])
    data["steps"] = {sid: S.STEP_MODELS[raw["type"]].model_validate(raw) for sid, raw in definition["steps"].items()}
    shape = S.DefinitionShape.model_validate(definition)
    data["reentry"], data["goal"], data["exit_on"], data["layout"] = shape.reentry, shape.goal, shape.exit_on, shape.layout
    return S.Definition.model_construct(**{k: data.get(k) for k in S.Definition.model_fields})


def check_definition(session: Session, org_id: str, definition: Any, *, prefix: str = "definition") -> S.Definition:
    """Validate and parse, or raise :class:`DefinitionInvalid` naming every path (under ``prefix``)."""
    errors = validate_definition(session, org_id, definition)
    if errors:
        raise DefinitionInvalid(errors, prefix)
    return parse_definition(definition)


def references(definition: dict) -> dict[str, set[str]]:
    """Ids a (valid) definition names: ``segments``, ``templates`` (template id), ``topics``,
    ``events``."""
    out: dict[str, set[str]] = {"segments": set(), "templates": set(), "topics": set(), "events": set()}
    entry = definition.get("entry") or {}
    if entry.get("type") == "segment" and entry.get("segment_id"):
        out["segments"].add(entry["segment_id"])
    if entry.get("type") == "event" and entry.get("event"):
        out["events"].add(entry["event"])
    if definition.get("topic_id"):
        out["topics"].add(definition["topic_id"])
    if (definition.get("goal") or {}).get("event"):
        out["events"].add(definition["goal"]["event"])
    for step in (definition.get("steps") or {}).values():
        if not isinstance(step, dict):
            continue
        if step.get("type") == "send" and step.get("template_id"):
            out["templates"].add(step["template_id"])
        if step.get("type") == "wait_event" and step.get("event"):
            out["events"].add(step["event"])
        if step.get("type") == "update" and step.get("topic_id"):
            out["topics"].add(step["topic_id"])
        if step.get("type") == "branch":
            for case in step.get("cases") or []:
                when = case.get("when") if isinstance(case, dict) else None
                if isinstance(when, dict) and when.get("kind") == "segment" and when.get("segment_id"):
                    out["segments"].add(when["segment_id"])
    return out
