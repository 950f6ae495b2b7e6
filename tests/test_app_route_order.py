"""The app includes the web UI's routers after the others (``app.matching_order``) so an API
request is matched after fewer routes (issue 11 item 6) — and no request path, with any method,
is answered by another route than in the composition root's order."""

from __future__ import annotations

import importlib
import re
import uuid

from fastapi import APIRouter
from starlette.routing import Match

from carepost.app import HOT_ROUTERS, matching_order


def _sample_path(route) -> str:
    """A concrete path this route matches (each parameter filled with a value its convertor takes)."""
    def fill(m: re.Match) -> str:
        convertor = route.param_convertors[m.group(1)]
        kind = type(convertor).__name__
        if kind == "IntegerConvertor":
            return "7"
        if kind == "FloatConvertor":
            return "7.5"
        if kind == "UUIDConvertor":
            return str(uuid.UUID(int=7))
        if kind == "PathConvertor":
            return "a/b.txt"
        if kind == "StringConvertor":
            return "x7"
        return convertor.regex.split("|")[0]  # an alternation such as fact_kind

    return re.sub(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-zA-Z_][a-zA-Z0-9_]*)?}", fill, route.path)


def _answering(routes, path: str, method: str):
    """The route that answers (first full match, else first partial match: 405), as a router does."""
    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "query_string": b""}
    partial = None
    for route in routes:
        match, _ = route.matches(dict(scope))
        if match == Match.FULL:
            return route
        if match == Match.PARTIAL and partial is None:
            partial = route
    return partial


def test_the_reordered_routers_answer_every_path_as_the_composition_root_orders_them():
    from carepost.assembly import assemble

    routers = [importlib.import_module(name).router for name in assemble().routers]
    ordered = matching_order(routers, first=tuple(importlib.import_module(name).router for name in HOT_ROUTERS))
    assert sorted(map(id, ordered)) == sorted(map(id, routers))
    before = [route for r in routers for route in r.routes]
    after = [route for r in ordered for route in r.routes]
    checked = 0
    for route in before:
        path = _sample_path(route)
        for method in sorted(getattr(route, "methods", None) or {"GET"}) + ["DELETE", "PUT"]:
            assert _answering(after, path, method) is _answering(before, path, method), (method, path)
            checked += 1
    assert checked > 1000
    # The contact read is now matched after far fewer routes than in the composition root's order.
    def position(routes):
        return next(i for i, r in enumerate(routes) if r.path == "/api/v1/contacts/{contact_id}" and "GET" in r.methods)

    assert position(after) < position(before) - 30
    # The transactional send (issue 17: 200 requests/s) is the first route tried.
    assert (after[0].path, after[0].methods) == ("/api/v1/messages", {"POST"})


def test_a_router_never_moves_ahead_of_one_whose_paths_it_may_share():
    def router(*paths):
        r = APIRouter()
        for p in paths:
            r.add_api_route(p, lambda: None, methods=["GET"])
        return r

    ui_catch_all = router("/app/{page:path}")
    ui = router("/app/contacts", "/app/contacts/{contact_id}")
    api = router("/api/v1/contacts/{contact_id}")
    root = router("/{anything:path}")  # may share a path with everything after it
    late_api = router("/api/v1/messages")
    assert matching_order([ui_catch_all, ui, api]) == [api, ui_catch_all, ui]
    # The order between those two decides the answer, so it stays.
    first, second = (_answering([*a.routes, *b.routes], "/app/contacts", "GET") for a, b in ((ui_catch_all, ui), (ui, ui_catch_all)))
    assert first is ui_catch_all.routes[0] and second is ui.routes[0]
    assert matching_order([ui, root, late_api]) == [ui, root, late_api]
    home, exact_ui = router("/", "/healthz"), router("/app", "/app/x")
    assert matching_order([home, exact_ui, api]) == [home, api, exact_ui]  # "/" is one path, not a prefix
