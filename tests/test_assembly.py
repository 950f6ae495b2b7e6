"""The composition root and the layers (ARCHITECTURE.md section 3; docs/development.md).

* The import graph of ``src/carepost`` follows the layers: a capability imports only
  capabilities below it, never one above, never in a loop. A new upward import fails here.
* Every entry point assembles through ``carepost.assembly.assemble`` and nothing else wires
  behaviour: no module-level registration, no module attributes replaced.
* A process that bypasses the root fails closed: the pipeline, the audit port and domain events
  refuse to run; ``assemble`` refuses to finish with a port unfilled.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "carepost"
ROOT = SRC.parents[1]

# The layers, bottom up (docs/development.md "Layers"). A package may import packages of a lower
# layer; within a layer, only the pairs named in SAME_LAYER_DOWNWARD (one direction each).
LAYERS = [
    {"core"},
    {"web"},
    {"accounts"},
    {"audit"},
    {"patients", "content"},
    {"delivery"},
    {"portal", "consent"},
    {"segments", "tracking"},
    {"campaigns", "journeys", "forms", "retention", "ehr"},  # ehr: events in from clinical systems (issue 15)
    {"compliance", "archive"},  # the compliance center reads several capabilities; nothing below imports it (issue 16)
    {"dashboard"},  # what shows several capabilities at once, beside app.py, cli.py, assembly.py, doctor.py
]
SAME_LAYER_DOWNWARD = {
    ("consent", "portal"),  # consent's pages link to the portal, never the reverse
    ("journeys", "campaigns"),  # a journey's send uses campaigns' eligibility and bulk writer, never the reverse
}
TOP_LEVEL_MODULES = {"app", "cli", "assembly", "doctor", "models", "__init__"}


def _layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"package {package!r} is in no layer: add it to LAYERS and docs/development.md")


def _imported_names(path: Path) -> list[tuple[str, int]]:
    """Every dotted name an absolute import of ``path`` names (``from a.b import c``: ``a.b`` and
    ``a.b.c``), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in names]
    return found


def _imports(path: Path) -> list[tuple[str, int]]:
    """The CarePost packages ``path`` imports, with the line of each import."""
    return [(bits[1], line) for name, line in _imported_names(path)
            if (bits := name.split("."))[0] == "carepost" and len(bits) > 1]


def _package_edges() -> dict[tuple[str, str], list[str]]:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    edges: dict[tuple[str, str], list[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).parts
        if len(parts) < 2 or parts[0] not in packages or parts[0] == "migrations":
            continue
        for target, line in _imports(path):
            if target in packages and target != parts[0]:
                edges.setdefault((parts[0], target), []).append(f"{path.relative_to(SRC)}:{line}")
    return edges


def test_every_import_points_down_the_layers():
    wrong = []
    for (source, target), where in sorted(_package_edges().items()):
        if target in TOP_LEVEL_MODULES:
            wrong.append(f"{source} imports the top-level module {target} ({where[0]})")
            continue
        s, t = _layer_of(source), _layer_of(target)
        if t > s or (t == s and (source, target) not in SAME_LAYER_DOWNWARD):
            wrong.append(f"{source} -> {target} points up or sideways ({', '.join(where[:3])})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_capability_imports_a_top_level_module():
    """app, cli, assembly and doctor sit above every capability."""
    offenders = [w for (source, target), where in _package_edges().items() if target in TOP_LEVEL_MODULES
                 for w in where]
    assert not offenders, offenders


def test_the_layer_checker_notices_an_upward_import(tmp_path):
    """The check above is not vacuous: an edge from delivery up to consent is reported."""
    assert _layer_of("consent") > _layer_of("delivery")
    assert ("delivery", "consent") not in SAME_LAYER_DOWNWARD
    edges = _package_edges()
    assert ("consent", "delivery") in edges  # a real downward edge exists and is allowed
    assert ("delivery", "consent") not in edges


# --------------------------------------------------------------------------- no wiring by side effects

_REGISTRARS = ("register_deletion_hook", "register_export_section", "register_contact_section", "subscribe",
               "fill", "register_event_types", "register_mailer", "register_unsubscribe_listener")


def test_no_module_wires_behaviour_at_import_time():
    """Registration calls at module level (outside a function) would make behaviour depend on
    which modules a process happened to import. Only the composition root calls them."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "assembly.py" and path.parent == SRC:
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            call = node.value if isinstance(node, ast.Expr) else None
            if isinstance(call, ast.Call):
                func = call.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in _REGISTRARS or name.startswith(("install_", "_register")):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {name}()")
    # tracking registers its own event types in its own registry: not wiring across capabilities
    offenders = [o for o in offenders if not o.startswith("tracking/service.py")]
    assert not offenders, offenders


def _module_aliases(tree: ast.AST) -> set[str]:
    """Names a file binds to CarePost modules (``from carepost.delivery import pipeline``)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("carepost"):
            base = SRC.parent.joinpath(*node.module.split("."))
            for a in node.names:
                if (base / f"{a.name}.py").exists() or (base / a.name / "__init__.py").exists():
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name.startswith("carepost") and a.asname)
    return aliases


def test_no_module_replaces_another_modules_attribute():
    """``pipeline.X = ...`` from outside the module is how consent used to reach delivery."""
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id in aliases:
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {target.value.id}.{target.attr}")
    assert not offenders, offenders


# --------------------------------------------------------------------------- every entry point assembles


def test_every_entry_point_calls_the_composition_root():
    cli = (SRC / "cli.py").read_text()
    callback = cli[cli.index("@app.callback()"):cli.index("def fail(")]
    assert "assemble(http=" in callback, "every `carepost` command runs through the CLI callback, which assembles"
    app = (SRC / "app.py").read_text()
    create = app[app.index("def create_app("):]
    assert "assemble()" in create and "assembly.routers" in create
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert "assemble()" in conftest
    for bench in sorted((ROOT / "bench").glob("*.py")):
        text = bench.read_text()
        if "from carepost" in text:  # directly, or through bench/_scratch.py's bench_organization, which assembles
            assert "assemble()" in text or "bench_organization(" in text, f"{bench.name} uses CarePost without assembling it"
    assert "assemble()" in (ROOT / "bench" / "_scratch.py").read_text()


def test_the_assembly_names_every_router_task_and_model_module():
    from carepost import assembly
    from carepost.models import MODEL_MODULES

    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    for package in packages:
        for kind, listed in (("api", assembly.ROUTER_MODULES), ("pages", assembly.ROUTER_MODULES),
                             ("tasks", assembly.TASK_MODULES), ("models", MODEL_MODULES)):
            if (SRC / package / f"{kind}.py").exists():
                assert f"carepost.{package}.{kind}" in listed, f"carepost.{package}.{kind} is not assembled"


def test_assembly_fills_every_declared_port():
    from carepost.assembly import assemble
    from carepost.core.ports import declared_ports, unfilled_ports

    result = assemble()
    assert unfilled_ports() == []
    assert {"delivery.eligibility", "delivery.quiet_hours", "delivery.list_unsubscribe", "delivery.portal_store",
            "accounts.audit_record"} <= set(declared_ports())
    assert "pipeline_eligibility" in result.ports["delivery.eligibility"]


def test_only_the_app_and_the_root_import_a_router_module():
    """A process that serves no HTTP assembles without the router modules (``assemble(http=False)``):
    it can only stay whole if nothing else reaches a router module — one imported on the side would
    hold its ports unfilled and the contact page's registry empty."""
    from carepost.assembly import ROUTER_MODULES

    routers = set(ROUTER_MODULES)
    offenders = []
    for path in SRC.rglob("*.py"):
        module = ".".join(("carepost", *path.relative_to(SRC).with_suffix("").parts))
        if module in routers or module in ("carepost.app", "carepost.assembly"):
            continue
        offenders += [f"{path.relative_to(SRC)}:{line} {name}" for name, line in _imported_names(path) if name in routers]
    assert not offenders, offenders


def test_a_process_without_http_assembles_without_the_router_modules(tmp_path):
    """``assemble(http=False)`` fills every port declared in the process and imports no router
    module; a later ``assemble()`` (``create_app``) adds the routers, the page ports and the
    contact page's sections, and leaves nothing unfilled."""
    result = _python("""
        import sys
        from carepost.assembly import ROUTER_MODULES, assemble, assembled
        from carepost.core.ports import declared_ports, unfilled_ports

        core = assemble(http=False)
        loaded = [name for name in ROUTER_MODULES if name in sys.modules]
        print("core", core.http, core.routers, loaded, unfilled_ports(), "delivery.eligibility" in declared_ports())
        print("not imported:", [m for m in ("fastapi", "alembic", "dns") if m not in sys.modules])  # start-up cost
        assert assemble(http=False) is core and assembled() is core
        full = assemble()
        from carepost.delivery import pages as delivery_pages
        from carepost.patients import pages as patient_pages
        print("full", full.http, full.routers == ROUTER_MODULES, all(name in sys.modules for name in ROUTER_MODULES),
              unfilled_ports(), delivery_pages.engagement_of.filled, delivery_pages.legal_holds_of.filled,
              sorted(patient_pages._SECTIONS))
        print("again", assemble() is full, assemble(http=False) is full)
    """, {"CAREPOST_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "core False [] [] [] True",
        "not imported: ['fastapi', 'alembic', 'dns']",
        "full True True True [] True True ['consent', 'journeys', 'keys', 'legal_holds', 'messages']",
        "again True True",
    ], result.stdout


# --------------------------------------------------------------------------- fail closed


def _python(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREPOST_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_a_process_that_bypasses_the_root_cannot_deliver_audit_or_publish(tmp_path):
    result = _python("""
        from carepost.core.ports import NotAssembled
        from carepost.delivery import pipeline
        from carepost.accounts import ports
        from carepost.core import events
        import carepost.consent.eligibility  # importing consent no longer wires anything
        outcomes = []
        for attempt in (lambda: pipeline.deliver(["0" * 32]),
                        lambda: ports.record(None, action="x"),
                        lambda: events.publish("organization.created", None, "org")):
            try:
                attempt()
                outcomes.append("ran")
            except NotAssembled:
                outcomes.append("refused")
        print(",".join(outcomes))
    """, {"CAREPOST_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused,refused,refused"


def test_assemble_refuses_to_finish_with_a_port_unfilled(tmp_path):
    result = _python("""
        from carepost.core.ports import NotAssembled, Port
        extra = Port("test.required_step", "a step nobody supplies")
        from carepost.assembly import assemble
        try:
            assemble()
            print("assembled")
        except NotAssembled as exc:
            print("refused:", exc)
    """, {"CAREPOST_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:") and "test.required_step" in result.stdout


def test_a_command_exits_non_zero_when_assembly_fails(tmp_path):
    """The CLI stops at start-up with a clear error and exit code 70 when a part is missing."""
    result = _python("""
        import sys
        from carepost.core.ports import Port
        Port("test.missing_capability", "a step nobody supplies")
        from carepost.cli import main
        sys.argv = ["carepost", "doctor"]
        main()
    """, {"CAREPOST_DATA_DIR": str(tmp_path)})
    assert result.returncode == 70, (result.returncode, result.stdout, result.stderr)
    assert "could not be assembled" in result.stdout + result.stderr
    assert "test.missing_capability" in result.stdout + result.stderr


@pytest.mark.parametrize("command, http", [(["worker", "--help"], False), (["inbound", "--help"], False),
                                           (["smtp", "--help"], False), (["serve", "--help"], True)])
def test_entry_points_start_through_the_root(command, http, tmp_path):
    """Even ``--help`` of each long-running command goes through the callback that assembles;
    only ``serve`` assembles the router modules in its own process."""
    result = _python(f"""
        import sys
        from carepost import assembly
        from carepost.cli import main
        sys.argv = ["carepost", *{command!r}]
        try:
            main()
        except SystemExit:
            pass
        done = assembly.assembled()
        print("not assembled" if done is None else f"assembled http={{done.http}}")
        print("routers loaded:", sum(name in sys.modules for name in assembly.ROUTER_MODULES))
    """, {"CAREPOST_DATA_DIR": str(tmp_path)})
    lines = result.stdout.strip().splitlines()
    assert lines[-2:] == [f"assembled http={http}", f"routers loaded: {len(_router_modules()) if http else 0}"], \
        result.stdout + result.stderr


def _router_modules() -> list[str]:
    from carepost.assembly import ROUTER_MODULES

    return ROUTER_MODULES
