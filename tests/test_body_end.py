"""Where a footer, a tracked link or the open pixel goes in a message body: before its last
``</body>``, found in the body itself. Found in ``html.lower()`` before, the place moved one
character right for every "İ" ahead of it ("İ".lower() is two characters), so a message to
İbrahim got ``<`` + footer + ``/body>``: a broken body."""

from __future__ import annotations

import pytest

from carepost.delivery.mime import body_end
from carepost.delivery.pipeline import with_unsubscribe_footer
from carepost.tracking.links import _before_body_end

URL = ("https://carepost.example/t/u/u1.token",)


@pytest.mark.parametrize("html, want", [
    ("<html><body><p>Hi</p></body></html>", 21),
    ("<html><body><p>Hello İbrahim İİ</p></body></html>", 35),
    ("<HTML><BODY><p>Hi</p></BODY></HTML>", 21),
    ("<body>a</body>b</BoDy>c", 15),  # the last one, whatever its case
    ("<body>a</BODY>b</body>c", 15),
    ("<p>a fragment</p>", -1),
    ("", -1),
])
def test_body_end_is_an_index_into_the_body_itself(html, want):
    assert body_end(html) == want
    if want != -1:
        assert html[want:want + 7].lower() == "</body>"


def test_the_footer_and_the_pixel_go_before_the_end_of_body_whatever_the_names_in_it():
    html = "<html><body><p>Hello İbrahim Yılmaz</p></body></html>"
    _text, footed = with_unsubscribe_footer("Hello", html, URL, ("Bar Clinic", "1 Main St"))
    assert footed.startswith("<html><body><p>Hello İbrahim Yılmaz</p><p class=\"carepost-unsubscribe\">")
    assert footed.endswith('<p class="carepost-postal-address">Bar Clinic<br>1 Main St</p></body></html>')
    assert _before_body_end(html, "<img>") == "<html><body><p>Hello İbrahim Yılmaz</p><img></body></html>"
    # No body element: appended, as before.
    assert _before_body_end("<p>İ</p>", "<img>") == "<p>İ</p><img>"
    assert with_unsubscribe_footer(None, "<p>İ</p>", URL)[1].startswith("<p>İ</p><p class=\"carepost-unsubscribe\">")
