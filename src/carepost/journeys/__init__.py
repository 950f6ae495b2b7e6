"""Journeys (issue 15): automated patient workflows triggered by events, segments and dates.

A journey (``models.Journey``) has immutable published versions (``models.JourneyVersion``)
whose ``definition`` is the JSON of /docs/journeys.md (ids, field names and codes only — no PHI).
Each patient in a journey is one ``models.JourneyRun`` row (current step, next wake-up) advanced
set-wise by the engine's periodic tick; ``models.JourneyRunStep`` keeps one row per step executed,
unique per (run, step, seq), so a step re-executed after a crash cannot send twice.

* ``entries`` — who enters: event entries (``core.events``: custom events, EHR events), segment
  joins and date-relative entries (evaluated by the tick), re-entry rules, goals, exits on
  unsubscribe / revocation;
* ``engine`` — the tick: claims due runs in chunks and runs their steps;
* ``steps`` — what each step type does (send through delivery's message store with campaigns'
  eligibility; waits in the patient's time zone; branches; splits; updates; notices; webhooks);
* ``tasks`` — the periodic Huey task;
* definitions, versions, publishing, API, CLI and analytics: ``schemas``, ``validation``,
  ``service``; the editor: ``pages``.
"""
