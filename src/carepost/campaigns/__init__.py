"""Campaigns: a message to a segment, approved by compliance, scheduled, planned and sent.

``models.py`` the tables; ``service.py`` the declarative part (create, update, validation, the
approval workflow and its state machine, the pre-launch compliance report, the calendar);
``api.py`` the REST routes. Planning and sending (``planning.py``, ``tasks.py``) turn an
approved, launched campaign into messages (ARCHITECTURE.md section 4).
"""
