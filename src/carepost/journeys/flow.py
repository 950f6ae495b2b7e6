"""The journey page's flow diagram (issue 15 item 5): a Sankey-like step diagram drawn server-side
as SVG — no script, no CDN, nothing to vendor.

Columns: **Entered** (runs started), the steps of the shown version by their distance from the
start, then where runs ended (**Reached the goal** and each exit reason). Links carry runs:
entered -> the start step, step -> step (consecutive run-step rows, ``analytics`` edges), step ->
the reason runs ended there (``left_here``). Each node and link shows its count; counts of people
from 1 to 10 are shown as "<11" to a viewer without ``phi:read_unmasked`` (the caller's ``show``),
and such links are drawn at the minimum width (a width must not tell the count either).
"""

from __future__ import annotations

from collections.abc import Callable

from markupsafe import Markup, escape

COL_W, NODE_W, NODE_H, ROW_H, PAD = 200, 156, 50, 70, 16
REASON_WORDS = {"goal": "Reached the goal", "exit_step": "Finished (exit step)", "unsubscribe": "Unsubscribed",
                "revocation": "Authorization revoked", "timeout": "Timed out", "removed": "Removed"}


def _targets(step: dict, ids: set[str]) -> list[str]:
    """The steps a step can go to (any ``next``/``default``-like key, nested in cases and variants)."""
    out: list[str] = []

    def walk(value, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and value in ids and (key.endswith("next") or key == "default") \
                and value not in out:
            out.append(value)

    walk(step)
    return out


def _columns(definition: dict, extra: list[str]) -> list[list[str]]:
    steps = definition.get("steps") or {}
    ids = set(steps)
    depth: dict[str, int] = {}
    start = definition.get("start")
    queue = [start] if start in ids else []
    if queue:
        depth[start] = 0
    while queue:
        sid = queue.pop(0)
        for nxt in _targets(steps.get(sid) or {}, ids):
            if nxt not in depth:
                depth[nxt] = depth[sid] + 1
                queue.append(nxt)
    last = max(depth.values(), default=-1)
    for sid in list(steps) + extra:  # unreachable steps, steps of other versions: after the rest
        if sid not in depth:
            last += 1 if sid in ids or not depth else 0
            depth[sid] = max(last, 0)
    cols: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for sid in list(steps) + extra:
        if sid in depth and sid not in cols[depth[sid]]:
            cols[depth[sid]].append(sid)
    return cols


def flow_svg(out: dict, definition: dict, show: Callable[[int], object]) -> Markup:
    """The diagram for ``analytics.journey_analytics`` output ``out`` (unmasked figures) and the
    shown version's definition; ``show`` masks a count for the viewer."""
    steps = {s["id"]: s for s in out.get("steps") or []}
    step_defs = definition.get("steps") or {}
    extra = [sid for sid in steps if sid not in step_defs and sid]
    cols = _columns(definition, extra)
    reasons = sorted(out.get("exited") or {}, key=lambda r: (r != "goal", r))
    columns: list[list[tuple[str, str, str, int]]] = [[("entered", "Entered", "", int(out.get("entered") or 0))]]
    for col in cols:
        columns.append([(f"step:{sid}", sid, (step_defs.get(sid) or {}).get("type") or steps.get(sid, {}).get("type")
                         or "", int(steps.get(sid, {}).get("reached", 0))) for sid in col])
    if reasons:
        columns.append([(f"end:{r}", REASON_WORDS.get(r, r.replace("_", " ")), "ended",
                         int(out["exited"][r])) for r in reasons])
    pos: dict[str, tuple[float, float]] = {}
    rows = max(len(c) for c in columns)
    height = rows * ROW_H + 2 * PAD
    width = len(columns) * COL_W + 2 * PAD
    for ci, col in enumerate(columns):
        top = PAD + (rows - len(col)) * ROW_H / 2
        for ri, (key, *_rest) in enumerate(col):
            pos[key] = (PAD + ci * COL_W, top + ri * ROW_H)
    links: list[tuple[str, str, int]] = []
    start = definition.get("start")
    if start in step_defs and out.get("entered"):
        links.append(("entered", f"step:{start}", int(out["entered"])))
    for e in out.get("edges") or []:
        a, b = f"step:{e['from']}", f"step:{e['to']}"
        if a in pos and b in pos and e.get("runs"):
            links.append((a, b, int(e["runs"])))
    for sid, s in steps.items():
        for reason, n in (s.get("left_here") or {}).items():
            if n and f"step:{sid}" in pos and f"end:{reason}" in pos:
                links.append((f"step:{sid}", f"end:{reason}", int(n)))
    biggest = max([n for _, _, n in links] + [1])
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="journey-flow" data-testid="journey-flow" '
              f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
              f'aria-label="Runs through the journey: entered, at each step, and how they ended">')]
    for a, b, n in links:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        x1, y1, y2 = x1 + NODE_W, y1 + NODE_H / 2, y2 + NODE_H / 2
        label = show(n)
        w = 2 if isinstance(label, str) else max(2.0, 22 * n / biggest)
        mid = (x1 + x2) / 2
        parts.append(
            f'<g class="flow-link" data-from="{escape(a)}" data-to="{escape(b)}" data-count="{escape(label)}">'
            f'<title>{escape(a.split(":", 1)[-1])} → {escape(b.split(":", 1)[-1])}: {escape(label)}</title>'
            f'<path d="M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} {x2:.0f},{y2:.0f}" fill="none" '
            f'stroke="#7aa7d9" stroke-opacity="0.55" stroke-width="{w:.1f}"/>'
            f'<text x="{mid:.0f}" y="{(y1 + y2) / 2 - 4:.0f}" text-anchor="middle" font-size="11" '
            f'fill="#333">{escape(label)}</text></g>')
    for col in columns:
        for key, title, kind, n in col:
            x, y = pos[key]
            now = steps.get(key[5:], {}).get("now") if key.startswith("step:") else None
            sub = f"{kind} · " if kind and kind != "ended" else ""
            sub += f"reached {show(n)}" if key.startswith("step:") else f"{show(n)} runs"
            if now:
                sub += f" · now {show(now)}"
            fill = "#e8f3e8" if key == "end:goal" else "#f1f1f1" if key.startswith("end:") else "#eef4fb"
            parts.append(
                f'<g class="flow-node" data-node="{escape(key)}" data-count="{escape(show(n))}">'
                f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" '
                f'stroke="#8a9bb0"/>'
                f'<text x="{x + 8:.0f}" y="{y + 20:.0f}" font-size="13" font-weight="600" fill="#1d2b3a">'
                f'{escape(title[:22])}</text>'
                f'<text x="{x + 8:.0f}" y="{y + 38:.0f}" font-size="11" fill="#44515f">{escape(sub[:34])}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))
