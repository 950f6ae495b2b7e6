"""A developer adds a webhook endpoint in headless Chromium, copies the secret shown once, sends a
test event, watches it in the delivery log and replays it; the receiver checks every signature."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.fixtures.accounts import ui_login
from tests.test_webhooks import _receiver, independent_verify, receiver  # noqa: F401

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def live_server_env() -> dict:
    # The receiver runs on 127.0.0.1; the live server's queue is its own (no worker consumes it:
    # the test makes the attempts itself, in this process, on the shared database).
    return {"CAREPOST_WEBHOOK_ALLOW_PRIVATE": "true", "CAREPOST_QUEUE_NAME": "w" + uuid.uuid4().hex[:12]}


@pytest.fixture
def attempts(monkeypatch):
    from carepost.core.config import reset_settings
    from carepost.tracking.service import attempt_delivery

    monkeypatch.setenv("CAREPOST_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings()
    yield attempt_delivery
    monkeypatch.undo()
    reset_settings()


def test_developer_adds_an_endpoint_tests_and_replays(page, live_server, org, make_user, receiver, attempts):  # noqa: F811
    developer = make_user(org, role="developer")
    ui_login(page, developer)
    page.get_by_role("link", name="Webhooks").click()
    page.wait_for_url(re.compile(r".*/app/webhooks$"))

    # A bad URL is refused with the reason next to the field.
    page.fill("#webhook-url", "ftp://files.example/hooks")
    page.get_by_label("message.bounced", exact=False).check()
    page.get_by_role("button", name="Add endpoint").click()
    assert "must start with https://" in page.locator("#url-error").inner_text()

    page.fill("#webhook-url", receiver.url())
    page.fill("#webhook-description", "EHR integration")
    page.get_by_label("message.complained", exact=False).check()
    page.get_by_role("button", name="Add endpoint").click()
    secret = page.get_by_test_id("created-secret").inner_text().strip()
    assert secret.startswith("whsec_")
    assert page.get_by_role("button", name="Copy secret").is_visible()

    page.get_by_role("link", name="Open the endpoint").click()
    page.wait_for_url(re.compile(r".*/app/webhooks/[0-9a-f]{32}$"))
    assert secret not in page.content()
    assert page.get_by_test_id("endpoint-url").inner_text() == receiver.url()

    page.get_by_role("button", name="Send a test event").click()
    row = page.locator("tr[data-delivery-id]").first
    row.wait_for()
    assert row.get_by_test_id("delivery-status").inner_text() == "pending"
    delivery_id = row.get_attribute("data-delivery-id")
    assert attempts(delivery_id) == "succeeded"
    [request] = receiver.wait(1)
    assert independent_verify(secret, request.headers, request.body)["type"] == "webhook.test"

    page.reload()
    row = page.locator(f"tr[data-delivery-id='{delivery_id}']")
    assert row.get_by_test_id("delivery-status").inner_text() == "succeeded"
    row.locator("summary").click()
    assert "HTTP 204" in row.inner_text()

    row.get_by_role("button", name=re.compile("^Replay")).click()
    page.wait_for_url(re.compile(r".*/app/webhooks/[0-9a-f]{32}$"))
    replay = page.locator("tr[data-delivery-id]").first
    replay_id = replay.get_attribute("data-delivery-id")
    assert replay_id != delivery_id and "replay" in replay.inner_text()
    assert attempts(replay_id) == "succeeded"
    second = receiver.wait(2)[1]
    assert second.headers["webhook-id"] == request.headers["webhook-id"]
    independent_verify(secret, second.headers, second.body)

    # Pausing stops test events from being offered.
    page.get_by_role("button", name="Pause").click()
    page.get_by_test_id("endpoint-status").filter(has_text="disabled").wait_for()
    assert page.get_by_role("button", name="Send a test event").count() == 0
