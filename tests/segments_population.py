"""A generated population for the segment tests, and a slow, obviously-correct Python evaluator.

``build_population(org_id, seed, n)`` writes contacts with demographics, clinical facts, custom
attributes, consent rows and message history straight into the tables; ``Reference`` loads the
same rows back as plain Python values and answers a query tree contact by contact, with the
definitions written out longhand (no code shared with the compiler).
"""

from __future__ import annotations

import calendar
import random
from datetime import date, datetime, time, timedelta, timezone

AT = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)

SEXES = ["female", "male", "other", "unknown", None]
CITIES = ["Boston", "boston", "Springfield", "Austin", None, ""]
ZIPS = ["02139", "02139-1234", "02108", "62701", "78701", "021", None]
STAGES = ["new", "active", "overdue", "at_risk"]
LANGS = ["en", "es", "EN", None]
COND_CODES = [("icd10cm", "E11.9"), ("icd10cm", "E119"), ("icd10cm", "E11.65"), ("icd10cm", "I10"), ("snomed", "44054006"),
              ("snomed", "38341003"), ("icd10", "E11.0"), ("icd10cm", "B20")]
COND_STATUS = ["active", "resolved", "inactive", "recurrence", None]
MED_CODES = [("rxnorm", "860975"), ("rxnorm", "197361"), ("rxnorm", "314076")]
OBS_CODES = [("loinc", "4548-4"), ("loinc", "24606-6"), ("loinc", "8480-6")]
IMM_CODES = [("cvx", "140"), ("cvx", "208"), ("cvx", "115")]
PROC_CODES = [("snomed", "73761001"), ("snomed", "71651007")]
ENC_CODES = [("snomed", "185349003"), ("snomed", "32485007")]
APPT_STATUS = ["booked", "fulfilled", "noshow", "cancelled"]
CP_CODES = [("snomed", "698360004"), ("snomed", "443402002")]
RECIPIENT_STATUS = ["sent", "delivered", "bounced", "failed", "portal_viewed", "queued"]
TOPICS = ["newsletter", "events"]


def _rand_day(rng, lo: int, hi: int) -> date:
    return AT.date() + timedelta(days=rng.randint(lo, hi))


def _rand_dt(rng, lo: int, hi: int) -> datetime:
    return AT + timedelta(days=rng.randint(lo, hi), hours=rng.randint(-12, 12))


def build_population(org_id: str, seed: int = 7, n: int = 60) -> list[str]:
    """Write ``n`` contacts with facts into ``org_id``; returns their ids."""
    from carepost.consent.models import Authorization, AuthorizationText, Subscription, Suppression, Topic
    from carepost.core.database import org_session
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.patients import models as pm

    rng = random.Random(seed)
    ids = []
    with org_session(org_id) as s:
        topics = {}
        for key in TOPICS:
            t = Topic(org_id=org_id, key=key, name=key.title())
            s.add(t)
            s.flush()
            topics[key] = t.id
        text = AuthorizationText(org_id=org_id, purpose="marketing", version=900, status="published", title="T",
                                 elements={}, rendered={}, content_hash="0" * 64)
        s.add(text)
        num_def = pm.CustomAttributeDefinition(org_id=org_id, key="risk", label="Risk", type="number", options=[])
        txt_def = pm.CustomAttributeDefinition(org_id=org_id, key="program", label="Program", type="text", options=[])
        s.add_all([num_def, txt_def])
        s.flush()
        msg = Message(org_id=org_id, from_address="clinic@example.test", subject_enc=b"x", security="tls",
                      created_at=AT - timedelta(days=10))
        old_msg = Message(org_id=org_id, from_address="clinic@example.test", subject_enc=b"x", security="tls",
                          created_at=AT - timedelta(days=200))
        s.add_all([msg, old_msg])
        s.flush()
        for i in range(n):
            birth = None if rng.random() < 0.08 else date(rng.randint(1930, 2020), rng.randint(1, 12), 1) + timedelta(days=rng.randint(0, 30))
            if i == 0:
                birth = date(1960, 2, 29)
            if i == 1:
                birth = AT.date().replace(year=1970) + timedelta(days=3)
            c = pm.Contact(org_id=org_id, birth_date=birth, sex=rng.choice(SEXES), city=rng.choice(CITIES),
                           postal_code=rng.choice(ZIPS), care_stage=rng.choice(STAGES), preferred_language=rng.choice(LANGS),
                           deceased=rng.random() < 0.1, care_stage_changed_at=rng.choice([None, _rand_dt(rng, -120, 0)]),
                           coverage_type=rng.choice(["HIP", "MCPOL", None]))
            s.add(c)
            s.flush()
            ids.append(c.id)
            for _ in range(rng.randint(0, 3)):
                system, code = rng.choice(COND_CODES)
                s.add(pm.Condition(org_id=org_id, contact_id=c.id, code_system=system, code=code,
                                   status=rng.choice(COND_STATUS), onset_date=rng.choice([None, _rand_day(rng, -900, 0)]),
                                   recorded_date=rng.choice([None, _rand_day(rng, -900, 0)])))
            for _ in range(rng.randint(0, 2)):
                system, code = rng.choice(MED_CODES)
                s.add(pm.Medication(org_id=org_id, contact_id=c.id, code_system=system, code=code,
                                    status=rng.choice(["active", "stopped", "completed"]),
                                    start_date=rng.choice([None, _rand_day(rng, -400, 0)]),
                                    authored_on=_rand_day(rng, -400, 0),
                                    next_refill_due=rng.choice([None, _rand_day(rng, -10, 40)])))
            for _ in range(rng.randint(0, 4)):
                system, code = rng.choice(OBS_CODES)
                s.add(pm.Observation(org_id=org_id, contact_id=c.id, code_system=system, code=code,
                                     effective_at=rng.choice([None, _rand_dt(rng, -800, 0), _rand_dt(rng, -800, 0)]),
                                     value_quantity=rng.choice([None, round(rng.uniform(4, 12), 1)])))
            for _ in range(rng.randint(0, 2)):
                system, code = rng.choice(IMM_CODES)
                s.add(pm.Immunization(org_id=org_id, contact_id=c.id, code_system=system, code=code,
                                      status=rng.choice(["completed", "not-done", None]),
                                      occurrence_date=rng.choice([None, _rand_day(rng, -800, 0)])))
            for _ in range(rng.randint(0, 1)):
                system, code = rng.choice(PROC_CODES)
                s.add(pm.Procedure(org_id=org_id, contact_id=c.id, code_system=system, code=code,
                                   performed_start=_rand_dt(rng, -1500, 0)))
            for _ in range(rng.randint(0, 3)):
                system, code = rng.choice(ENC_CODES)
                s.add(pm.Encounter(org_id=org_id, contact_id=c.id, code_system=system, code=code,
                                   start_at=rng.choice([None, _rand_dt(rng, -700, 0)]),
                                   is_hospitalization=rng.random() < 0.2))
            for _ in range(rng.randint(0, 3)):
                s.add(pm.Appointment(org_id=org_id, contact_id=c.id, code_system="snomed", code="185349003",
                                     status=rng.choice(APPT_STATUS), start_at=_rand_dt(rng, -300, 60)))
            if rng.random() < 0.3:
                system, code = rng.choice(CP_CODES)
                s.add(pm.CarePlan(org_id=org_id, contact_id=c.id, code_system=system, code=code,
                                  status=rng.choice(["active", "completed"]), period_start=_rand_day(rng, -900, 0),
                                  period_end=rng.choice([None, _rand_day(rng, -100, 100)])))
            if rng.random() < 0.6:
                s.add(pm.CustomAttributeValue(org_id=org_id, contact_id=c.id, definition_id=num_def.id,
                                              value_number=rng.choice([1.0, 2.5, 5.0, 9.0])))
            if rng.random() < 0.5:
                s.add(pm.CustomAttributeValue(org_id=org_id, contact_id=c.id, definition_id=txt_def.id,
                                              value_text=rng.choice(["Diabetes", "cardio", "DIABETES"])))
            if rng.random() < 0.5:
                index = f"bi-{org_id[-6:]}-{i}"
                s.add(pm.ContactIdentifier(org_id=org_id, contact_id=c.id, kind="email", blind_index=index))
                if rng.random() < 0.4:
                    s.add(Suppression(org_id=org_id, address_index=index, reason="manual",
                                      scope=rng.choice(["all", "marketing", "topic"]),
                                      scope_key=rng.choice(["all:", "marketing:", "topic:x"]),
                                      expires_at=rng.choice([None, AT - timedelta(days=1), AT + timedelta(days=5)])))
            for key in TOPICS + ["*"]:
                if rng.random() < 0.3:
                    status = rng.choice(["subscribed", "unsubscribed", "pending"])
                    s.add(Subscription(org_id=org_id, contact_id=c.id, topic_id=topics.get(key),
                                       topic_key=topics.get(key, "*"), status=status,
                                       unsubscribed_at=_rand_dt(rng, -90, 0) if status == "unsubscribed" else None))
            if rng.random() < 0.4:
                status = rng.choice(["active", "revoked"])
                s.add(Authorization(org_id=org_id, contact_id=c.id, purpose=rng.choice(["marketing", "own_products"]),
                                    text_id=text.id, text_version=1, text_hash="0" * 64, signature_kind="typed",
                                    signature_enc=b"x", signed_at=_rand_dt(rng, -400, 2), method="form",
                                    expires_at=rng.choice([None, _rand_dt(rng, -30, 300)]), status=status,
                                    revoked_at=_rand_dt(rng, -60, 10) if status == "revoked" else None))
            for _ in range(rng.randint(0, 3)):
                s.add(MessageRecipient(org_id=org_id, message_id=rng.choice([msg.id, old_msg.id]), address_enc=b"x",
                                       address_index="a", domain_index="d", contact_id=c.id,
                                       status=rng.choice(RECIPIENT_STATUS)))
        s.commit()
    return ids


# --------------------------------------------------------------------------- the reference evaluator


def _months_back(d: date, months: int) -> date:
    total = d.year * 12 + (d.month - 1) - months
    y, m = divmod(total, 12)
    m += 1
    return date(y, m, min(d.day, calendar.monthrange(y, m)[1]))


def _period_start(d: date, n: int, unit: str, forward: bool) -> date:
    sign = 1 if forward else -1
    if unit == "days":
        return d + timedelta(days=sign * n)
    if unit == "weeks":
        return d + timedelta(days=sign * 7 * n)
    months = n if unit == "months" else 12 * n
    return _months_back(d, -months if forward else months)


def in_window(value, t: dict, at: datetime, is_date: bool) -> bool:
    if value is None:
        return False
    if not is_date and value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    (key, v), = t.items()
    today = at.date()
    if key in ("within", "next"):
        other = _period_start(today, v[0], v[1], key == "next")
        if is_date:
            lo, hi = (other, today) if key == "within" else (today, other)
            return lo <= value <= hi
        other_dt = datetime.combine(other, at.timetz())
        lo, hi = (other_dt, at) if key == "within" else (at, other_dt)
        return lo <= value <= hi
    day_of = value if is_date else value.date()
    if key == "before":
        return day_of < date.fromisoformat(v)
    if key == "after":
        return day_of > date.fromisoformat(v)
    if key == "since":
        return day_of >= date.fromisoformat(v)
    a, b = date.fromisoformat(v[0]), date.fromisoformat(v[1])
    return a <= day_of <= b


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _code_match(system, code, lang_code: str) -> bool:
    lsys, _, val = lang_code.partition(":")
    systems = {"icd10": ("icd10cm", "icd10"), "sct": ("snomed",)}.get(lsys, (lsys,))
    if system not in systems or code is None:
        return False
    icd = lsys.startswith("icd10")
    norm = (lambda x: x.upper().replace(".", "")) if icd else (lambda x: x)
    if val.endswith("*"):
        return norm(code).startswith(norm(val[:-1].rstrip(".")))
    return norm(code) == norm(val)


class Reference:
    """Everything of one organization in Python lists, and a contact-by-contact evaluator."""

    def __init__(self, org_id: str):
        from sqlalchemy import select

        from carepost.consent.models import Authorization, Subscription, Suppression, Topic
        from carepost.core.database import read_only_session
        from carepost.delivery.models import Message, MessageRecipient
        from carepost.patients import models as pm

        with read_only_session(org_id) as s:
            self.contacts = list(s.scalars(select(pm.Contact)))
            self.facts = {k: list(s.scalars(select(m))) for k, m in (
                ("condition", pm.Condition), ("medication", pm.Medication), ("observation", pm.Observation),
                ("immunization", pm.Immunization), ("procedure", pm.Procedure), ("encounter", pm.Encounter),
                ("appointment", pm.Appointment), ("care_plan", pm.CarePlan))}
            defs = {d.id: d for d in s.scalars(select(pm.CustomAttributeDefinition))}
            self.attrs = [(v.contact_id, defs[v.definition_id], v) for v in s.scalars(select(pm.CustomAttributeValue))]
            self.idents = list(s.scalars(select(pm.ContactIdentifier)))
            self.suppressions = list(s.scalars(select(Suppression)))
            self.subs = list(s.scalars(select(Subscription)))
            self.topics = {t.key: t.id for t in s.scalars(select(Topic))}
            self.auths = list(s.scalars(select(Authorization)))
            msgs = {m.id: m for m in s.scalars(select(Message))}
            self.recipients = [(r, msgs[r.message_id]) for r in s.scalars(select(MessageRecipient))]

    def evaluate(self, tree: dict, at: datetime) -> set[str]:
        names_deceased = '"deceased"' in __import__("json").dumps(tree)
        return {c.id for c in self.contacts
                if (names_deceased or not c.deceased) and self.node(tree, c, at)}

    def node(self, n: dict, c, at: datetime) -> bool:
        if "and" in n:
            return all(self.node(ch, c, at) for ch in n["and"])
        if "or" in n:
            return any(self.node(ch, c, at) for ch in n["or"])
        if "not" in n:
            return not self.node(n["not"], c, at)
        return getattr(self, "c_" + n["type"])(n, c, at)

    # ---- fields
    def _value_of(self, name: str, c):
        if name == "zip":
            return c.postal_code[:5] if c.postal_code is not None else None
        if name == "zip3":
            return c.postal_code[:3] if c.postal_code is not None else None
        if name == "stage":
            return c.care_stage
        return getattr(c, name)

    def _cmp(self, v, op: str, target, text: bool) -> bool:
        if op == "is empty":
            return v is None or v == ""
        if op == "is not empty":
            return v is not None and v != ""
        if v is None:
            return False
        if text:
            v = v.lower()
            target = [t.lower() for t in target] if isinstance(target, list) else target.lower()
        return {"=": lambda: v == target, "!=": lambda: v != target, "<": lambda: v < target,
                "<=": lambda: v <= target, ">": lambda: v > target, ">=": lambda: v >= target,
                "between": lambda: target[0] <= v <= target[1], "in": lambda: v in target,
                "not in": lambda: v not in target}[op]()

    def c_field(self, n, c, at) -> bool:
        name, op = n["field"], n["op"]
        if name == "age":
            if c.birth_date is None:
                return op == "is empty"
            if op == "is not empty":
                return True
            if op == "is empty":
                return False
            day = date.fromisoformat(n["at"]) if n.get("at") else at.date()
            return self._cmp(age_on(c.birth_date, day), op, n.get("value"), False)
        if name.startswith("attr."):
            key = name[5:]
            vals = [v for cid, d, v in self.attrs if cid == c.id and d.key == key]
            col = [v.value_number if d_type == "number" else v.value_text
                   for v, d_type in ((v, "number" if key == "risk" else "text") for v in vals)]
            col = [x for x in col if x is not None]
            text = key != "risk"
            if op == "is empty":
                return not col
            if op == "is not empty":
                return bool(col)
            if op in ("!=", "not in"):
                pos = "=" if op == "!=" else "in"
                return bool(col) and not any(self._cmp(x, pos, n["value"], text) for x in col)
            return any(self._cmp(x, op, n["value"], text) for x in col)
        if name == "deceased":
            want = n["value"] if op == "=" else not n["value"]
            return bool(c.deceased) == want
        if name == "birth_date":
            if op == "time":
                return in_window(c.birth_date, n["time"], at, True)
            target = n.get("value")
            target = [date.fromisoformat(t) for t in target] if isinstance(target, list) else (
                date.fromisoformat(target) if target else None)
            return self._cmp(c.birth_date, op, target, False)
        text = name not in ("sex", "stage", "zip", "zip3")
        return self._cmp(self._value_of(name, c), op, n.get("value"), text)

    def c_birthday(self, n, c, at) -> bool:
        b = c.birth_date
        if b is None:
            return False
        for k in range(n["days"] + 1):
            d = at.date() + timedelta(days=k)
            if (d.month, d.day) == (b.month, b.day):
                return True
            if (b.month, b.day) == (2, 29) and (d.month, d.day) == (2, 28) and not calendar.isleap(d.year):
                return True
        return False

    def c_stage_changed(self, n, c, at) -> bool:
        return in_window(c.care_stage_changed_at, n["time"], at, False)

    # ---- clinical
    def _codes(self, n) -> list[str] | None:
        return n.get("codes")

    def _fact_ok(self, kind: str, f, n, at) -> bool:
        codes = self._codes(n)
        if codes is not None and not (getattr(f, "code_verified", True) is not False
                                      and any(_code_match(f.code_system, f.code, lc) for lc in codes)):
            return False
        q = n.get("qualifier")
        if kind == "condition":
            if q == "active" and f.status not in ("active", "recurrence", "relapse"):
                return False
            if q == "resolved" and f.status not in ("resolved", "inactive", "remission"):
                return False
        if kind == "medication" and q == "active" and f.status != "active":
            return False
        if kind == "care_plan" and q == "active" and not (f.status == "active" and (f.period_end is None or f.period_end >= at.date())):
            return False
        if kind == "immunization" and f.status == "not-done":
            return False
        if kind == "hospitalization" and not f.is_hospitalization:
            return False
        if kind == "appointment":
            if q == "upcoming" and not (f.status in ("booked", "pending", "proposed", "arrived", "checked-in", "waitlist")
                                        and f.start_at is not None and _aware(f.start_at) >= at):
                return False
            if q == "missed" and f.status != "noshow":
                return False
            if q in ("fulfilled", "cancelled") and f.status != q:
                return False
        if n.get("time"):
            when = {"condition": lambda: f.onset_date if f.onset_date is not None else f.recorded_date,
                    "medication": lambda: f.start_date if f.start_date is not None else f.authored_on,
                    "observation": lambda: f.effective_at, "immunization": lambda: f.occurrence_date,
                    "procedure": lambda: f.performed_start, "encounter": lambda: f.start_at,
                    "hospitalization": lambda: f.start_at, "appointment": lambda: f.start_at,
                    "care_plan": lambda: f.period_start}[kind]()
            if not in_window(when, n["time"], at, kind in ("condition", "medication", "immunization", "care_plan")):
                return False
        return True

    def _events(self, kind: str, n, c, at) -> int:
        statuses = {"message_received": ("sent", "delivered", "portal_viewed"),
                    "message_delivered": ("delivered", "portal_viewed"), "message_bounced": ("bounced",)}[kind]
        return sum(1 for r, m in self.recipients if r.contact_id == c.id and r.status in statuses and not m.sandbox
                   and (not n.get("time") or in_window(m.created_at, n["time"], at, False)))

    def c_has(self, n, c, at) -> bool:
        kind = n["kind"]
        if kind.startswith("message_"):
            k = self._events(kind, n, c, at)
        else:
            table = self.facts["encounter" if kind == "hospitalization" else kind]
            k = sum(1 for f in table if f.contact_id == c.id and self._fact_ok(kind, f, n, at))
        op, want = n.get("count") or [">=", 1]
        return {"=": k == want, ">=": k >= want, "<=": k <= want}[op]

    def c_last(self, n, c, at) -> bool:
        obs = [o for o in self.facts["observation"] if o.contact_id == c.id and o.effective_at is not None
               and any(_code_match(o.code_system, o.code, lc) for lc in n["codes"])
               and (not n.get("time") or in_window(o.effective_at, n["time"], at, False))]
        if not obs:
            return False
        latest = max(obs, key=lambda o: (_aware(o.effective_at), o.id))
        if latest.value_quantity is None:
            return False
        return self._cmp(latest.value_quantity, n["op"], n["value"], False)

    def c_refill_due(self, n, c, at) -> bool:
        today = at.date()
        return any(m.contact_id == c.id and m.status == "active" and m.next_refill_due is not None
                   and today <= m.next_refill_due <= today + timedelta(days=n["days"])
                   and (not n.get("codes") or any(_code_match(m.code_system, m.code, lc) for lc in n["codes"]))
                   for m in self.facts["medication"])

    # ---- consent
    def c_authorized(self, n, c, at) -> bool:
        for a in self.auths:
            if a.contact_id != c.id or a.purpose != n["purpose"] or _aware(a.signed_at) > at:
                continue
            if a.status == "revoked" and a.revoked_at is not None and _aware(a.revoked_at) <= at:
                continue
            if a.expires_at is not None and _aware(a.expires_at) <= at:
                continue
            return True
        return False

    def _topic(self, key):
        return "*" if key == "all" else self.topics[key]

    def c_subscribed(self, n, c, at) -> bool:
        return any(s.contact_id == c.id and s.topic_key == self._topic(n["topic"]) and s.status == "subscribed" for s in self.subs)

    def c_unsubscribed(self, n, c, at) -> bool:
        return any(s.contact_id == c.id and s.topic_key == self._topic(n["topic"]) and s.status == "unsubscribed"
                   and (not n.get("time") or in_window(s.unsubscribed_at, n["time"], at, False)) for s in self.subs)

    def c_suppressed(self, n, c, at) -> bool:
        mine = {i.blind_index for i in self.idents if i.contact_id == c.id and i.kind == "email"}
        return any(s.address_index in mine and s.scope_key in ("all:", "marketing:")
                   and (s.expires_at is None or _aware(s.expires_at) > at) for s in self.suppressions)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


_ = time  # datetime.time imported for readers of in_window
