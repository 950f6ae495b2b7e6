"""A/B/n tests of a campaign: the settings' schema, the deterministic split, the results with
their significance, and the automatic winner sent to the rest (issue 14 item 4).

Settings (``Campaign.ab_test``, checked by :func:`validate`)::

    {"variants": [{"key": "A"}, {"key": "B", "subject": "..."},
                  {"key": "C", "template_version_id": "...", "send_offset_minutes": 60}],
     "holdout": 0.05, "test_fraction": 0.2, "metric": "human_opens", "winner_after_hours": 4}

A hash of (campaign, contact) gives ``u`` in [0, 1): ``u < holdout`` -> the holdout (receives
nothing, row ``held_out``); ``u < holdout + test_fraction`` -> the test, one of the variants
(a second part of the hash); otherwise the rest, row ``awaiting`` (no variant) until the winner
is chosen. Without ``test_fraction`` everyone outside the holdout is in the test (no winner).

Once every test row is sent and ``winner_after_hours`` has passed since the last test send,
:func:`release` picks the variant with the best rate of ``metric`` (human opens, human clicks —
distinct recipients with a ``human`` engagement event — or attributed conversions) and turns the
waiting rows into ``planned`` rows of variant ``winner:<key>`` (sending applies that variant's
subject, template version and send offset). Significance: a chi-square test of homogeneity
across the n variants and a two-proportion z-test of the leader against the runner-up, with
95 % Wilson intervals per variant; below 0.05 is "significant", otherwise said plainly.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from carepost.campaigns.models import Campaign, CampaignEvent, CampaignRecipient
from carepost.core import clock
from carepost.core.errors import ValidationFailed

METRICS = ("human_opens", "human_clicks", "conversions")
AWAITING = "awaiting"
WINNER_PREFIX = "winner:"
HOLDOUT = "holdout"
MAX_VARIANTS = 10
ALPHA = 0.05
KEY_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


# --------------------------------------------------------------------------- schema


def _fraction(ab: dict, name: str, default: float | None) -> float | None:
    value = ab.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValidationFailed(f"{name} is a fraction between 0 and 1.", field=f"ab_test.{name}")
    return float(value)


def validate(session: Session | None, org_id: str, ab, *, purpose: str, template_id: str | None) -> dict:
    """The A/B settings, checked and normalized (variants as objects); a 422 names the field."""
    if not isinstance(ab, dict):
        raise ValidationFailed("The A/B test settings are an object.", field="ab_test")
    known = {"variants", "holdout", "test_fraction", "metric", "winner_after_hours"}
    for name in ab:
        if name not in known:
            raise ValidationFailed(f"Unknown A/B setting {str(name)[:40]!r}.", field=f"ab_test.{str(name)[:40]}")
    raw = ab.get("variants")
    if not isinstance(raw, list) or len(raw) < 2:
        raise ValidationFailed("An A/B test has at least two variants.", field="ab_test.variants")
    if len(raw) > MAX_VARIANTS:
        raise ValidationFailed(f"An A/B test has at most {MAX_VARIANTS} variants.", field="ab_test.variants")
    variants: list[dict] = []
    for i, v in enumerate(raw):
        field = f"ab_test.variants[{i}]"
        v = {"key": v} if isinstance(v, str) else v
        if not isinstance(v, dict):
            raise ValidationFailed("A variant is an object with a key.", field=field)
        for name in v:
            if name not in ("key", "subject", "template_version_id", "send_offset_minutes"):
                raise ValidationFailed(f"Unknown variant setting {str(name)[:40]!r}.",
                                       field=f"{field}.{str(name)[:40]}")
        key = v.get("key")
        if not isinstance(key, str) or not 1 <= len(key) <= 16 or not set(key) <= KEY_CHARS or key == HOLDOUT:
            raise ValidationFailed("A variant key is 1-16 letters, digits, _ or - (not 'holdout').",
                                   field=f"{field}.key")
        if any(x["key"] == key for x in variants):
            raise ValidationFailed(f"The variant key {key} is used twice.", field=f"{field}.key")
        out = {"key": key}
        if v.get("subject") is not None:
            subject = v["subject"]
            if not isinstance(subject, str) or not subject.strip() or len(subject) > 300 or "\n" in subject \
                    or "\r" in subject:
                raise ValidationFailed("A variant's subject is one line of 1-300 characters.", field=f"{field}.subject")
            out["subject"] = subject.strip()
        if v.get("template_version_id") is not None:
            from carepost.content.service import check_purpose_fit, get_version_by_id
            from carepost.core.errors import NotFound

            vid = v["template_version_id"]
            vfield = f"{field}.template_version_id"
            if not isinstance(vid, str) or not 1 <= len(vid) <= 32:
                raise ValidationFailed("Unknown template version.", field=vfield)
            try:
                version = get_version_by_id(session, org_id, vid)
            except NotFound:
                raise ValidationFailed("Unknown template version.", field=vfield) from None
            if template_id and version.template_id != template_id:
                raise ValidationFailed("A variant's version is a version of the campaign's template.", field=vfield)
            check_purpose_fit(session, org_id, version.id, purpose, field=vfield)
            out["template_version_id"] = vid
        if v.get("send_offset_minutes") is not None:
            off = v["send_offset_minutes"]
            if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= 7 * 24 * 60:
                raise ValidationFailed("send_offset_minutes is a whole number of minutes from 0 to 10080.",
                                       field=f"{field}.send_offset_minutes")
            out["send_offset_minutes"] = off
        variants.append(out)
    holdout = _fraction(ab, "holdout", 0.0) or 0.0
    test = _fraction(ab, "test_fraction", None)
    if test is not None and test == 0:
        raise ValidationFailed("test_fraction is above 0 (or left out: everyone gets a variant).",
                               field="ab_test.test_fraction")
    if test is not None and holdout + test > 1 + 1e-9:
        raise ValidationFailed("holdout plus test_fraction is at most 1.", field="ab_test.test_fraction")
    if holdout >= 1:
        raise ValidationFailed("holdout is below 1 (someone must receive the campaign).", field="ab_test.holdout")
    metric = ab.get("metric", "human_opens")
    if metric not in METRICS:
        raise ValidationFailed(f"metric must be one of {', '.join(METRICS)}.", field="ab_test.metric")
    out = {"variants": variants, "holdout": holdout, "metric": metric}
    if test is not None:
        out["test_fraction"] = test
    hours = ab.get("winner_after_hours")
    if test is not None and test + holdout < 1 - 1e-9 and hours is None:
        raise ValidationFailed("With a test fraction, say after how many hours the winner is chosen.",
                               field="ab_test.winner_after_hours")
    if hours is not None:
        if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 < hours <= 24 * 30:
            raise ValidationFailed("winner_after_hours is above 0 and at most 720.", field="ab_test.winner_after_hours")
        out["winner_after_hours"] = hours
    return out


# --------------------------------------------------------------------------- assignment


def assign(campaign_id: str, contact_id: str, ab: dict | None) -> tuple[str | None, str]:
    """``(variant, row status)`` of one contact: ``("holdout", "held_out")``, ``(key, "planned")``
    for the test, ``(None, "awaiting")`` for the rest. Deterministic (a re-plan agrees)."""
    if not ab:
        return None, "planned"
    digest = hashlib.sha256(f"{campaign_id}:{contact_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    holdout = float(ab.get("holdout") or 0)
    if u < holdout:
        return HOLDOUT, "held_out"
    variants = [v.get("key") if isinstance(v, dict) else str(v) for v in ab.get("variants") or []]
    if not variants:
        return None, "planned"
    test = ab.get("test_fraction")
    if test is not None and u >= holdout + float(test):
        return None, AWAITING
    return variants[int.from_bytes(digest[8:16], "big") % len(variants)], "planned"


def variant_settings(ab: dict | None, variant: str | None) -> dict:
    """The settings of a row's variant (``winner:B`` -> B's)."""
    if not variant or not ab:
        return {}
    key = variant.removeprefix(WINNER_PREFIX)
    for v in ab.get("variants") or []:
        if isinstance(v, dict) and v.get("key") == key:
            return v
    return {}


def send_offset(ab: dict | None, variant: str | None) -> timedelta:
    return timedelta(minutes=int(variant_settings(ab, variant).get("send_offset_minutes") or 0))


# --------------------------------------------------------------------------- statistics


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion (None without trials)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float] | None:
    """Pooled two-proportion z-test: ``(z, two-sided p)``; None when undefined."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None
    z = (x1 / n1 - x2 / n2) / se
    return z, 2 * (1 - normal_cdf(abs(z)))


def _gamma_p(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) (series / continued fraction)."""
    if x <= 0:
        return 0.0
    gln = math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return total * math.exp(-x + a * math.log(x) - gln)
    b = x + 1 - a
    c = 1 / 1e-300
    d = 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return 1 - math.exp(-x + a * math.log(x) - gln) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square distribution with ``df`` degrees of freedom."""
    return max(0.0, 1 - _gamma_p(df / 2, x / 2))


def chi_square(table: list[tuple[int, int]]) -> tuple[float, int, float] | None:
    """Chi-square test of homogeneity of ``[(successes, trials), ...]``: ``(statistic, df, p)``."""
    rows = [(s, n) for s, n in table if n > 0]
    if len(rows) < 2:
        return None
    total_s = sum(s for s, _ in rows)
    total_n = sum(n for _, n in rows)
    if total_s == 0 or total_s == total_n:
        return None
    stat = 0.0
    for s, n in rows:
        for observed, share in ((s, total_s / total_n), (n - s, 1 - total_s / total_n)):
            expected = n * share
            stat += (observed - expected) ** 2 / expected
    df = len(rows) - 1
    return stat, df, chi2_sf(stat, df)


# --------------------------------------------------------------------------- results


def _counts(session: Session, campaign: Campaign) -> dict[str, dict]:
    """Per variant (test rows only, plus ``winner:<key>`` rows separately): recipients, delivered,
    human opens and clicks (distinct recipients), conversions (attributed)."""
    from carepost.delivery.models import MessageRecipient
    from carepost.tracking.conversions import ContactEvent
    from carepost.tracking.models import EngagementEvent

    out: dict[str, dict] = {}
    for variant, status, n in session.execute(
            select(CampaignRecipient.variant, CampaignRecipient.status, func.count())
            .where(CampaignRecipient.org_id == campaign.org_id, CampaignRecipient.campaign_id == campaign.id)
            .group_by(CampaignRecipient.variant, CampaignRecipient.status)):
        key = variant or (AWAITING if status == AWAITING else "")
        entry = out.setdefault(key, {"recipients": 0, "sent": 0, "delivered": 0, "human_opens": 0, "human_clicks": 0,
                                     "conversions": 0})
        entry["recipients"] += n
        if status == "materialized":
            entry["sent"] += n
    base = (select(CampaignRecipient.variant, func.count(func.distinct(CampaignRecipient.contact_id)))
            .where(CampaignRecipient.org_id == campaign.org_id, CampaignRecipient.campaign_id == campaign.id,
                   CampaignRecipient.message_id.is_not(None)))
    delivered = base.join(MessageRecipient, MessageRecipient.message_id == CampaignRecipient.message_id).where(
        MessageRecipient.status.in_(("delivered", "portal_viewed"))).group_by(CampaignRecipient.variant)
    for variant, n in session.execute(delivered):
        out[variant or ""]["delivered"] = n
    for type_, metric in (("opened", "human_opens"), ("clicked", "human_clicks")):
        q = base.join(EngagementEvent, EngagementEvent.message_id == CampaignRecipient.message_id).where(
            EngagementEvent.org_id == campaign.org_id, EngagementEvent.type == type_,
            EngagementEvent.classification == "human").group_by(CampaignRecipient.variant)
        for variant, n in session.execute(q):
            out[variant or ""][metric] = n
    q = base.join(ContactEvent, ContactEvent.message_id == CampaignRecipient.message_id).where(
        ContactEvent.org_id == campaign.org_id, ContactEvent.goal_id.is_not(None)).group_by(CampaignRecipient.variant)
    for variant, n in session.execute(q):
        out[variant or ""]["conversions"] = n
    return out


def _holdout_lift(session: Session, campaign: Campaign, counts: dict[str, dict]) -> dict | None:
    """Conversions of the holdout (contacts with a goal's event after launch, no message) against
    those of everyone sent the campaign — the same definition for both."""
    from carepost.tracking.conversions import ContactEvent, Goal

    held = counts.get(HOLDOUT, {}).get("recipients", 0)
    if not held or campaign.launched_at is None:
        return None
    names = list(session.scalars(select(Goal.event_name).where(Goal.org_id == campaign.org_id)))
    if not names:
        return {"holdout_recipients": held, "note": "no conversion goal is defined"}

    def converted(held_out: bool) -> tuple[int, int]:
        rows = select(CampaignRecipient.contact_id).where(
            CampaignRecipient.org_id == campaign.org_id, CampaignRecipient.campaign_id == campaign.id,
            (CampaignRecipient.status == "held_out") if held_out else (CampaignRecipient.status == "materialized"))
        n = session.scalar(select(func.count()).select_from(rows.subquery())) or 0
        x = session.scalar(select(func.count(func.distinct(ContactEvent.contact_id))).where(
            ContactEvent.org_id == campaign.org_id, ContactEvent.name.in_(names),
            ContactEvent.occurred_at >= campaign.launched_at, ContactEvent.contact_id.in_(rows))) or 0
        return x, n

    hx, hn = converted(True)
    tx, tn = converted(False)
    test = two_proportion_z(tx, tn, hx, hn)
    h_rate = hx / hn if hn else None
    t_rate = tx / tn if tn else None
    return {"holdout_recipients": hn, "holdout_conversions": hx, "holdout_rate": h_rate,
            "holdout_ci95": wilson(hx, hn), "treated_recipients": tn, "treated_conversions": tx,
            "treated_rate": t_rate, "treated_ci95": wilson(tx, tn),
            "lift": (t_rate - h_rate) if h_rate is not None and t_rate is not None else None,
            "relative_lift": ((t_rate - h_rate) / h_rate) if h_rate else None,
            "p_value": test[1] if test else None,
            "significant": bool(test and test[1] < ALPHA)}


def results(session: Session, campaign: Campaign) -> dict | None:
    """The A/B report of a campaign (None without a test): per variant recipients, sent,
    delivered, human opens and clicks, conversions with rates and 95 % intervals; the chi-square
    across variants; the leader against the runner-up; the winner once chosen; the holdout lift."""
    ab = campaign.ab_test
    if not ab or not ab.get("variants"):
        return None
    metric = ab.get("metric", "human_opens")
    counts = _counts(session, campaign)
    keys = [v.get("key") if isinstance(v, dict) else str(v) for v in ab["variants"]]
    zero = {"recipients": 0, "sent": 0, "delivered": 0, "human_opens": 0, "human_clicks": 0, "conversions": 0}
    variants = []
    for key in keys:
        c = counts.get(key, zero)
        n = c["delivered"] or c["sent"]  # the denominator: delivered, else sent (sinks without DSNs)
        row = {"key": key, **c, "denominator": n}
        for m in METRICS:
            row[f"{m}_rate"] = c[m] / n if n else None
            row[f"{m}_ci95"] = wilson(c[m], n)
        variants.append(row)
    table = [(v[metric], v["denominator"]) for v in variants]
    chi = chi_square(table)
    ranked = sorted(variants, key=lambda v: (-(v[f"{metric}_rate"] or 0), keys.index(v["key"])))
    leader, runner = ranked[0], ranked[1]
    z = two_proportion_z(leader[metric], leader["denominator"], runner[metric], runner["denominator"])
    winner = next((k[len(WINNER_PREFIX):] for k in counts if k and k.startswith(WINNER_PREFIX)), None)
    significant = bool(z and z[1] < ALPHA)
    return {
        "metric": metric, "holdout": ab.get("holdout", 0), "test_fraction": ab.get("test_fraction"),
        "winner_after_hours": ab.get("winner_after_hours"), "variants": variants,
        "chi_square": {"statistic": chi[0], "df": chi[1], "p_value": chi[2]} if chi else None,
        "leader": leader["key"], "runner_up": runner["key"],
        "leader_vs_runner_up": {"z": z[0], "p_value": z[1]} if z else None,
        "significant": significant,
        "verdict": (f"{leader['key']} leads on {metric.replace('_', ' ')}; the difference is significant "
                    f"(p = {z[1]:.3g} < {ALPHA})") if significant else
                   (f"{leader['key']} leads on {metric.replace('_', ' ')}, but the difference is not significant"
                    + (f" (p = {z[1]:.3g})" if z else " (not enough data)")),
        "awaiting": counts.get(AWAITING, {}).get("recipients", 0),
        "holdout_recipients": counts.get(HOLDOUT, {}).get("recipients", 0),
        "winner": winner, "winner_due_at": _iso(winner_due_at(session, campaign)),
        "winner_recipients": counts.get(WINNER_PREFIX + winner, zero)["recipients"] if winner else 0,
        "holdout_lift": _holdout_lift(session, campaign, counts),
    }


def _iso(value: datetime | None) -> str | None:
    return clock.aware(value).isoformat() if value else None


# --------------------------------------------------------------------------- the winner


def winner_due_at(session: Session, campaign: Campaign) -> datetime | None:
    """When the winner may be chosen: ``winner_after_hours`` after the last test row's send time,
    once planning finished and every test row is sent (None: not yet, or nothing waits)."""
    ab = campaign.ab_test or {}
    if not ab.get("winner_after_hours") or campaign.plan_finished_at is None:
        return None
    q = select(CampaignRecipient.id).where(CampaignRecipient.campaign_id == campaign.id)
    if session.scalar(q.where(CampaignRecipient.status == AWAITING).limit(1)) is None:
        return None
    if session.scalar(q.where(CampaignRecipient.status == "planned").limit(1)) is not None:
        return None  # test rows still to send
    last = session.scalar(select(func.max(CampaignRecipient.send_after)).where(
        CampaignRecipient.campaign_id == campaign.id, CampaignRecipient.status == "materialized"))
    start = clock.aware(last or campaign.plan_finished_at)
    return start + timedelta(hours=float(ab["winner_after_hours"]))


def release(session: Session, campaign: Campaign, now: datetime | None = None) -> str | None:
    """If the test is over (:func:`winner_due_at`), choose the winner and make the waiting rows
    due with its variant (the caller commits and queues sending); the winner's key, else None."""
    now = clock.aware(now) if now else clock.now()
    if campaign.status != "sending":
        return None
    due = winner_due_at(session, campaign)
    if due is None or now < due:
        return None
    found = results(session, campaign)
    if found is None:
        return None
    key = found["leader"]
    when = (now + send_offset(campaign.ab_test, key)).astimezone(UTC)
    moved = session.execute(update(CampaignRecipient).where(
        CampaignRecipient.campaign_id == campaign.id, CampaignRecipient.status == AWAITING)
        .values(status="planned", variant=WINNER_PREFIX + key, send_after=when)
        .execution_options(synchronize_session=False)).rowcount
    if not moved:
        return None
    session.add(CampaignEvent(org_id=campaign.org_id, campaign_id=campaign.id, action="winner_chosen", actor=None))
    session.execute(update(Campaign).where(Campaign.id == campaign.id).values(worked_at=clock.now()))
    return key


def waiting_campaigns(session: Session) -> list[tuple[str, str]]:
    """``(org_id, campaign_id)`` of sending campaigns with rows awaiting a winner (every
    organization: the periodic task runs in a system session)."""
    return [tuple(r) for r in session.execute(
        select(Campaign.org_id, Campaign.id).where(Campaign.status == "sending", Campaign.id.in_(
            select(CampaignRecipient.campaign_id).where(CampaignRecipient.status == AWAITING))))]


COUNTS = ("recipients", "sent", "delivered", "human_opens", "human_clicks", "conversions", "denominator")


def mask_small_cells(out: dict) -> dict:
    """The results as shown to a caller without ``phi:read_unmasked``: counts of 1-10 people
    become ``"<11"`` (as the analytics API shows them) and the rates and intervals built on them
    are left out; the test statistics stay (they do not name anyone)."""
    from carepost.tracking.analytics import SMALL_CELL, SUPPRESSED

    def hide(n):
        return SUPPRESSED if isinstance(n, int) and 0 < n < SMALL_CELL else n

    variants = []
    for v in out["variants"]:
        row = dict(v)
        for m in METRICS:
            if isinstance(v[m], int) and 0 < v[m] < SMALL_CELL or 0 < v["denominator"] < SMALL_CELL:
                row[f"{m}_rate"] = row[f"{m}_ci95"] = None
        for c in COUNTS:
            row[c] = hide(v[c])
        variants.append(row)
    masked = {**out, "variants": variants, "awaiting": hide(out["awaiting"]),
              "holdout_recipients": hide(out.get("holdout_recipients", 0)),
              "winner_recipients": hide(out["winner_recipients"]), "masked": True}
    lift = out.get("holdout_lift")
    if lift:
        lift = dict(lift)
        for side in ("holdout", "treated"):
            small = any(isinstance(lift.get(f"{side}_{k}"), int) and 0 < lift[f"{side}_{k}"] < SMALL_CELL
                        for k in ("recipients", "conversions"))
            for k in ("recipients", "conversions"):
                if f"{side}_{k}" in lift:
                    lift[f"{side}_{k}"] = hide(lift[f"{side}_{k}"])
            if small:
                lift[f"{side}_rate"] = lift[f"{side}_ci95"] = None
                lift["lift"] = lift["relative_lift"] = None
        masked["holdout_lift"] = lift
    return masked
