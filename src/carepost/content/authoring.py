"""Authoring: MJML compiled to HTML, CSS inlined, a text part from the HTML, a spam/size lint.

* **MJML** (``mjml`` on PyPI, the maintained Python port of MJML) compiles at save time; the
  version stores both the MJML source and the compiled HTML. Jinja tags are swapped for opaque
  tokens before compiling (so ``{% if a < b %}`` is not mangled as markup) and put back after.
  MJML drops text between its elements, so a Jinja tag must sit inside ``mj-text``,
  ``mj-button`` or ``mj-raw``; one that MJML dropped is refused naming the line. Links to web
  fonts MJML adds by default are removed: nothing in a message loads from another host unasked.
* **CSS** is inlined per rendered message with ``css-inline`` (remote stylesheets never loaded),
  because many mail clients ignore ``<style>``.
* **Text part**: when a template has no text, it is made from the rendered HTML (``nh3`` strips
  the markup; links become ``text (url)``).
* **Lint** (warnings, stored with the version): Gmail clips messages over 102 KB of HTML; images
  without alt text; an image-only message; too many links for the text.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from carepost.core.errors import ValidationFailed

GMAIL_CLIP_BYTES = 102 * 1024
_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
_FONT_LINK = re.compile(r'<link[^>]+href="https?://fonts\.[^"]*"[^>]*>\s*|@import url\(https?://fonts\.[^)]*\);\s*')
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr",
         "mj-image", "mj-divider", "mj-spacer", "mj-breakpoint", "mj-font", "mj-all", "mj-class", "mj-include",
         "mj-social-element", "mj-carousel-image"}


class _Balance(HTMLParser):
    """Tag balance of an MJML document (the compiler itself is lenient and would guess)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, int]] = []
        self.error: tuple[str, int] | None = None
        self.root: str | None = None

    def handle_starttag(self, tag, attrs):
        if self.root is None:
            self.root = tag
        if tag not in _VOID and not self.error:
            self.stack.append((tag, self.getpos()[0]))

    def handle_startendtag(self, tag, attrs):
        if self.root is None:
            self.root = tag

    def handle_endtag(self, tag):
        if self.error or tag in _VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            expected = f"</{self.stack[-1][0]}> (opened at line {self.stack[-1][1]})" if self.stack else "nothing"
            self.error = (f"</{tag}> does not close {expected}", self.getpos()[0])
            return
        self.stack.pop()


def compile_mjml(source: str, field: str = "mjml") -> str:
    """MJML → HTML with the Jinja tags intact; malformed MJML is a 422 naming ``field`` and the line."""
    from mjml import mjml_to_html

    tokens: dict[str, str] = {}
    lines: dict[str, int] = {}

    def swap(m: re.Match) -> str:
        key = f"cpjinja{len(tokens):05d}x"
        tokens[key] = m.group(0)
        lines[key] = source.count("\n", 0, m.start()) + 1
        return key

    protected = _JINJA.sub(swap, source)
    check = _Balance()
    check.feed(protected)
    check.close()
    if check.root != "mjml":
        raise ValidationFailed("MJML must start with <mjml> and hold an <mj-body>.", field=field)
    if check.error:
        raise ValidationFailed(f"Malformed MJML at line {check.error[1]}: {check.error[0]}.", field=field)
    if check.stack:
        tag, line = check.stack[-1]
        raise ValidationFailed(f"Malformed MJML: <{tag}> opened at line {line} is never closed.", field=field)
    try:
        result = mjml_to_html(protected)
    except Exception as exc:  # the compiler's own errors are internal types; report the kind only
        raise ValidationFailed(f"The MJML could not be compiled ({type(exc).__name__}).", field=field) from None
    if result.errors:
        raise ValidationFailed(f"The MJML could not be compiled: {str(result.errors[0])[:200]}", field=field)
    html = _FONT_LINK.sub("", result.html)
    for key, tag in tokens.items():
        if key not in html:
            raise ValidationFailed(
                f"The template tag at line {lines[key]} of the MJML is outside mj-text, mj-button or mj-raw; MJML "
                "would drop it. Put template tags inside those elements.", field=field)
        html = html.replace(key, tag)
    return html


def inline_css(html: str) -> str:
    if not html or "<style" not in html:
        return html
    import css_inline

    inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_style_tags=True)
    return inliner.inline(html)


_LINK = re.compile(r"<a\b[^>]*?\bhref\s*=\s*([\"'])(.*?)\1[^>]*>(.*?)</a\s*>", re.IGNORECASE | re.DOTALL)
_BREAK = re.compile(r"<br\s*/?>|</(?:p|div|tr|h[1-6]|table|blockquote|pre|ul|ol|section|article)\s*>", re.IGNORECASE)
_CELL = re.compile(r"</t[dh]\s*>", re.IGNORECASE)
_ITEM = re.compile(r"<li\b[^>]*>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")


def text_from_html(html: str) -> str:
    """A readable text part: paragraphs and rows on their own lines, links as ``text (url)``,
    no styles, scripts or head. ``nh3`` (Rust) strips the markup: it is far faster per message
    than a Python HTML-to-Markdown converter."""
    import html as htmllib

    import nh3

    def link(m: re.Match) -> str:
        url, label = htmllib.unescape(m.group(2)).strip(), m.group(3)
        shown = nh3.clean(label, tags=set()).strip()
        return f"{label} ({url})" if url and url not in htmllib.unescape(shown) and not url.startswith("#") else label

    marked = _ITEM.sub("\n- ", _BREAK.sub(lambda m: m.group(0) + "\n", _CELL.sub(" ", _LINK.sub(link, html))))
    text = htmllib.unescape(nh3.clean(marked, tags=set(), clean_content_tags={"style", "script", "head", "title"}))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


class _Shape(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.images = 0
        self.images_without_alt = 0
        self.links = 0
        self.text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images += 1
            if not (a.get("alt") or "").strip() and (a.get("role") != "presentation"):
                self.images_without_alt += 1
        elif tag == "a" and a.get("href"):
            self.links += 1
        elif tag in ("style", "script", "head", "title"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("style", "script", "head", "title") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def lint(html: str, field: str = "html") -> list[dict]:
    """Spam and size warnings for an HTML body (the template's source: placeholders count as text)."""
    if not html:
        return []
    out = []
    size = len(html.encode())
    if size > GMAIL_CLIP_BYTES:
        out.append({"field": field, "code": "gmail_clip",
                    "message": f"The HTML is {size // 1024} KB; Gmail clips messages over 102 KB (the rest, and the "
                               "unsubscribe link, hide behind 'View entire message')."})
    shape = _Shape()
    shape.feed(_JINJA.sub(" x ", html))
    words = len(" ".join(shape.text).split())
    if shape.images_without_alt:
        out.append({"field": field, "code": "image_without_alt",
                    "message": f"{shape.images_without_alt} image(s) have no alt text (screen readers and clients "
                               "that block images show nothing)."})
    if shape.images and words < 20:
        out.append({"field": field, "code": "image_only",
                    "message": "The message is mostly images with little text; spam filters distrust image-only mail."})
    if shape.links and words / shape.links < 10:
        out.append({"field": field, "code": "link_ratio",
                    "message": f"{shape.links} links for {words} words of text; many links in little text looks like spam."})
    return out
