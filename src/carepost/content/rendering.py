"""Sandboxed rendering of message templates.

Templates are written by staff and filled with data that may be PHI, so rendering assumes the
template can be hostile and the data can be anything:

* **Sandbox.** Jinja2's ``ImmutableSandboxedEnvironment``: no attribute starting with ``_``
  (``{{ ''.__class__ }}`` and friends), no unsafe callables, no mutation of the data. The
  default globals (``range``, ``cycler``, ``joiner``, ``namespace``, ``lipsum``, ``dict``) are
  removed and only an allow-list of filters is kept (no ``safe``, which would let data bypass
  escaping; no ``center``/``indent``/``wordwrap``/``format``, which can allocate without bound).
* **Budgets.** Every loop iteration, call and arithmetic operation spends from a per-render
  budget; ``*`` and ``**`` refuse results that would be huge; output is capped per part. A
  template that exceeds a budget is refused with a 422 naming the part, never a hang or a 500.
* **Errors name the field.** An unknown variable raises ``ValidationFailed("Unknown template
  variable 'x' in html", field="data.x")``; a syntax error names ``template.<part>`` and the line;
  a sandbox violation raises :class:`TemplateSecurityError` (422, ``template_unsafe``). Messages
  never contain data values: only names that appear in the template.
* **Escaping.** HTML is autoescaped; text, subject and preheader are not (they are not HTML).
  Subject and preheader are single header-like lines: CR and LF in the output become spaces.
"""

from __future__ import annotations

import contextvars
import functools
import operator
from dataclasses import dataclass

import hashlib
import re

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.ext import Extension
from jinja2.exceptions import TemplateError, UndefinedError
from jinja2.filters import FILTERS
from jinja2.meta import find_undeclared_variables
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import missing

from carepost.core.errors import ValidationFailed

PARTS = ("subject", "preheader", "html", "text")
HEADER_PARTS = ("subject", "preheader")

MAX_OUTPUT = {"subject": 998, "preheader": 1000, "html": 1024 * 1024, "text": 512 * 1024}
MAX_OPERATIONS = 200_000  # loop iterations + calls + intercepted arithmetic, per part
MAX_SEQUENCE_RESULT = 100_000  # longest string or list ``*`` may build
MAX_EXPONENT = 64

ALLOWED_FILTERS = (
    "abs", "attr", "batch", "capitalize", "count", "d", "default", "dictsort", "e", "escape",
    "first", "float", "filesizeformat", "groupby", "int", "items", "join", "last", "length", "list",
    "lower", "map", "max", "min", "reject", "rejectattr", "reverse", "round", "select",
    "selectattr", "slice", "sort", "string", "striptags", "sum", "title", "tojson", "trim",
    "truncate", "unique", "upper", "urlencode", "wordcount",
)

_ITER_FILTER = "carepost_budgeted_iter"
_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("carepost_template_budget")
# The dynamic content blocks this render shows (keys from :func:`block_key`); None: none.
_visible: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("carepost_visible_blocks",
                                                                                  default=None)
MAX_BLOCK_CONDITION = 2000


def block_key(condition: str) -> str:
    """A dynamic block's stable name: a hash of its condition (the same condition, the same key)."""
    return hashlib.sha256(" ".join(condition.split()).encode()).hexdigest()[:16]


class BlockIf(Extension):
    """``{% block_if "segment condition" %}...{% endblock_if %}``: a dynamic content block.

    The condition is a literal string in the segment language. Rendering never evaluates it: the
    planner (``content.blocks.plan``) evaluates every block's condition set-wise for a chunk of
    contacts and the render is told which blocks its contact sees.
    """

    tags = {"block_if"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        condition = parser.parse_expression()
        if not isinstance(condition, nodes.Const) or not isinstance(condition.value, str) or not condition.value.strip():
            parser.fail("block_if needs its segment condition as a literal string", lineno)
        if len(condition.value) > MAX_BLOCK_CONDITION:
            parser.fail(f"a block_if condition is at most {MAX_BLOCK_CONDITION} characters", lineno)
        body = parser.parse_statements(("name:endblock_if",), drop_needle=True)
        test = self.call_method("_shown", [nodes.Const(block_key(condition.value))], lineno=lineno)
        node = nodes.If(test, body, [], [], lineno=lineno)
        node.carepost_condition = condition.value
        return node

    def _shown(self, key: str) -> bool:
        visible = _visible.get()
        return bool(visible) and key in visible


class TemplateSecurityError(ValidationFailed):
    """The template tried to leave the sandbox or exhaust resources."""

    code = "template_unsafe"


class _Undefined(StrictUndefined):
    """StrictUndefined that remembers whether the sandbox made it (an unsafe attribute)."""

    __slots__ = ()

    def _fail_with_undefined_error(self, *args, **kwargs):
        if self._undefined_exception is SecurityError:
            raise SecurityError(f"access to attribute {self._undefined_name!r} is not allowed")
        raise _UnknownVariable(self._undefined_name, self._undefined_obj)

    __str__ = __iter__ = __len__ = __eq__ = __ne__ = __bool__ = __hash__ = __contains__ = _fail_with_undefined_error  # type: ignore[assignment]
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __div__ = __rdiv__ = _fail_with_undefined_error  # type: ignore[assignment]
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _fail_with_undefined_error  # type: ignore[assignment]
    __pos__ = __neg__ = __call__ = __getitem__ = __lt__ = __le__ = __gt__ = __ge__ = __int__ = _fail_with_undefined_error  # type: ignore[assignment]
    __float__ = __complex__ = __pow__ = __rpow__ = _fail_with_undefined_error  # type: ignore[assignment]


class _UnknownVariable(UndefinedError):
    def __init__(self, name: str | None, obj):
        super().__init__(f"{name!r} is undefined")
        self.name = name
        self.is_attribute = obj is not missing


def _spend(amount: int = 1) -> None:
    budget = _budget.get(None)
    if budget is None:
        return
    budget[0] -= amount
    if budget[0] < 0:
        raise SecurityError("the template does too much work (too many loop iterations or calls)")


def _budgeted_iter(value):
    """Wraps the iterable of every ``{% for %}``: each iteration spends from the budget."""
    if isinstance(value, StrictUndefined):
        iter(value)  # raises the helpful error
    for item in value:
        _spend()
        yield item


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "//", "%", "/", "+"})

    def __init__(self, *, autoescape: bool):
        super().__init__(autoescape=autoescape, undefined=_Undefined, keep_trailing_newline=True,
                         extensions=[BlockIf])
        self.globals.clear()
        self.filters = {name: FILTERS[name] for name in ALLOWED_FILTERS}
        self.filters[_ITER_FILTER] = _budgeted_iter

    def is_safe_attribute(self, obj, attr, value) -> bool:
        if attr.startswith("_"):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _ITER_FILTER, [], [], None, None, lineno=loop.lineno)
        return tree

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
        _spend()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator_name, left, right):
        _spend()
        if operator_name == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_SEQUENCE_RESULT:
                    raise SecurityError("the template builds a string or list that is too long")
        if operator_name == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponents above {MAX_EXPONENT} are not allowed")
        return _BINOPS[operator_name](left, right)


_BINOPS = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "**": operator.pow, "%": operator.mod,
}

_HTML_ENV = _Sandbox(autoescape=True)
_TEXT_ENV = _Sandbox(autoescape=False)


def _env(part: str) -> _Sandbox:
    return _HTML_ENV if part == "html" else _TEXT_ENV


def _security(part: str, why: str) -> TemplateSecurityError:
    return TemplateSecurityError(f"Template {part} is not allowed: {why}.", field=f"template.{part}")


def parse(part: str, source: str) -> nodes.Template:
    """Parses one part; syntax errors and statically visible sandbox escapes name the field."""
    if part in HEADER_PARTS and ("\r" in source or "\n" in source):
        raise ValidationFailed(f"The {part} must be a single line (no line breaks).", field=f"template.{part}")
    env = _env(part)
    try:
        tree = env.parse(source)
    except TemplateSyntaxError as exc:
        raise ValidationFailed(
            f"Template syntax error in {part} at line {exc.lineno}: {exc.message}", field=f"template.{part}"
        ) from None
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(key, str) and key.startswith("_"):
            raise _security(part, f"access to {key!r} (names starting with an underscore) at line {node.lineno}")
    for node in tree.find_all(nodes.Filter):
        if node.name not in env.filters:
            raise ValidationFailed(
                f"Template {part} uses the filter {node.name!r} at line {node.lineno}, which is not available; "
                f"available filters: {', '.join(ALLOWED_FILTERS)}.",
                field=f"template.{part}",
            )
    for node in tree.find_all(nodes.Test):
        if node.name not in env.tests:
            raise ValidationFailed(f"Template {part} uses the unknown test {node.name!r} at line {node.lineno}.", field=f"template.{part}")
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        raise ValidationFailed(f"Template {part} may not include, import or extend other templates (line {node.lineno}).", field=f"template.{part}")
    for node in tree.find_all(nodes.Name):
        if node.name.startswith("_"):
            raise _security(part, f"the name {node.name!r} (names starting with an underscore) at line {node.lineno}")
    return tree


def block_conditions(part: str, source: str) -> dict[str, str]:
    """``{key: condition}`` of the dynamic blocks in one part."""
    if not source or "block_if" not in source:
        return {}
    return {block_key(n.carepost_condition): n.carepost_condition
            for n in parse(part, source).find_all(nodes.If) if hasattr(n, "carepost_condition")}


def helper_calls(part: str, source: str) -> list[tuple[str, list, int]]:
    """``(name, literal args, line)`` of every call of a top-level name (``last_observation("loinc:1")``)."""
    out = []
    for node in parse(part, source).find_all(nodes.Call):
        if isinstance(node.node, nodes.Name):
            args = [a.value if isinstance(a, nodes.Const) else None for a in node.args]
            out.append((node.node.name, args, node.lineno))
    return out


def variables(part: str, source: str) -> set[str]:
    """Top-level data names a part uses."""
    return set(find_undeclared_variables(parse(part, source)))


def check_template(parts: dict[str, str], *, contains_phi: bool) -> None:
    """Save-time checks: every part parses, and with PHI the header parts use no variables.

    The subject and preheader travel in clear in headers and inbox previews even when the body is
    encrypted or held in the portal, so PHI never goes there (ARCHITECTURE.md section 5).
    """
    for part in PARTS:
        used = variables(part, parts.get(part) or "")
        if part in HEADER_PARTS and contains_phi and used:
            names = ", ".join(sorted(used))
            raise ValidationFailed(
                f"The {part} of a template that contains PHI may not use template variables ({names}): "
                "subjects and preheaders are never protected, so PHI never goes there.",
                field=f"template.{part}",
            )


@dataclass(frozen=True)
class RenderedParts:
    subject: str
    preheader: str
    html: str
    text: str


@functools.lru_cache(maxsize=512)
def _compiled(part: str, source: str):
    """Compiled templates are reused: a batch renders one template many times."""
    return _env(part).from_string(parse(part, source))


_TEMPLATE_TAGS = ("{{", "{%", "{#")
_NEWLINES = re.compile(r"\r\n|\r")


@functools.lru_cache(maxsize=512)
def _static_text(part: str, source: str) -> str | None:
    """What a part without any template tag renders to, for every recipient alike: its own text,
    line breaks normalized as Jinja's lexer does (``\r\n`` and ``\r`` become ``\n``). None when the
    part has a tag, or is a header part with a line break (the parser refuses it, naming the field)."""
    if any(tag in source for tag in _TEMPLATE_TAGS):
        return None
    if part in HEADER_PARTS and ("\r" in source or "\n" in source):
        return None
    return _NEWLINES.sub("\n", source)


def render_part(part: str, source: str, data: dict, *, visible_blocks=None) -> str:
    if not source:
        return ""
    limit = MAX_OUTPUT[part]
    static = _static_text(part, source)
    if static is not None:  # nothing to render per recipient (a subject without merge fields)
        if len(static) > limit:
            raise _security(part, f"the rendered {part} is longer than {limit} characters")
        return _single_line(static) if part in HEADER_PARTS else static
    token = _budget.set([MAX_OPERATIONS])
    shown = _visible.set(frozenset(visible_blocks) if visible_blocks is not None else None)
    try:
        template = _compiled(part, source)
        out: list[str] = []
        size = 0
        for chunk in template.generate(data):
            size += len(chunk)
            if size > limit:
                raise _security(part, f"the rendered {part} is longer than {limit} characters")
            out.append(chunk)
    except _UnknownVariable as exc:
        where = "data." + (exc.name or "")
        kind = "attribute" if exc.is_attribute else "variable"
        raise ValidationFailed(f"Unknown template {kind} '{exc.name}' in {part}", field=where) from None
    except SecurityError as exc:
        raise _security(part, str(exc)) from None
    except RecursionError:
        raise _security(part, "recursion is too deep") from None
    except TemplateError as exc:
        raise ValidationFailed(f"Template error in {part}: {type(exc).__name__}", field=f"template.{part}") from None
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, OverflowError) as exc:
        # The exception text may quote a data value (e.g. int('Jane')): only its kind is reported.
        raise ValidationFailed(
            f"Template error in {part}: the data does not fit the template ({type(exc).__name__})",
            field=f"template.{part}",
        ) from None
    finally:
        _budget.reset(token)
        _visible.reset(shown)
    text = "".join(out)
    return _single_line(text) if part in HEADER_PARTS else text


def _single_line(text: str) -> str:
    return " ".join(text.replace("\r", "\n").split("\n")).strip()


def render_parts(parts: dict[str, str], data: dict, *, visible_blocks=None) -> RenderedParts:
    return RenderedParts(**{part: render_part(part, parts.get(part) or "", data, visible_blocks=visible_blocks)
                            for part in PARTS})
