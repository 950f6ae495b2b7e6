"""The delivery API shapes: the public field names and their limits."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from carepost.delivery import service
from carepost.delivery.schemas import (
    MessageBatchIn,
    MessageIn,
    RecipientKeyIn,
    SecurityPreviewIn,
    SecurityPreviewRowOut,
)


def test_message_contract_field_names():
    msg = MessageIn.model_validate({
        "from": "Bar Clinic <news@bar.example>", "to": ["pat@example.org"], "subject": "Results",
        "html": "<p>x</p>", "text": "x", "contains_phi": True, "security": "tls_required", "purpose": "care",
        "attachments": [{"filename": "a.pdf", "content_type": "application/pdf",
                         "content": base64.b64encode(b"%PDF").decode()}],
    })
    assert msg.sender == "Bar Clinic <news@bar.example>" and msg.attachments[0].content == b"%PDF"
    assert MessageIn.model_validate({"from": "a@bar.example", "to": ["b@example.org"], "subject": "s", "text": "x"}).contains_phi


@pytest.mark.parametrize(
    "change,field",
    [
        ({"to": []}, None),
        ({"security": "paranoid"}, "security"),
        ({"html": None, "text": None}, None),
        ({"subject": None}, None),
        ({"attachments": [{"filename": "a", "content": "not base64!"}]}, "attachments"),
        ({"surprise": 1}, "surprise"),
        ({"tags": [""]}, "tags"),
        ({"to": ["x@example.org"] * 1001}, "to"),
    ],
)
def test_message_refusals_name_the_field(change, field):
    body = {"from": "a@bar.example", "to": ["b@example.org"], "subject": "s", "text": "x"} | change
    with pytest.raises(ValidationError) as err:
        MessageIn.model_validate(body)
    locs = [e["loc"] for e in err.value.errors()]
    if field:
        assert any(loc and loc[0] == field for loc in locs)
    assert "not base64!" not in str(err.value.errors()[0]["msg"])


def test_template_message_needs_no_body():
    assert MessageIn.model_validate({"from": "a@bar.example", "to": ["b@example.org"], "template_id": "t" * 32})


def test_batch_limits():
    one = {"from": "a@bar.example", "to": ["b@example.org"], "subject": "s", "text": "x"}
    assert len(MessageBatchIn.model_validate({"messages": [one] * 1000}).messages) == 1000
    with pytest.raises(ValidationError):
        MessageBatchIn.model_validate({"messages": [one] * 1001})
    with pytest.raises(ValidationError):
        MessageBatchIn.model_validate({"messages": []})


def test_recipient_key_and_preview_shapes():
    assert RecipientKeyIn.model_validate({"address": "pat@example.org", "kind": "pgp", "key": "x"}).kind == "pgp"
    with pytest.raises(ValidationError):
        RecipientKeyIn.model_validate({"address": "pat@example.org", "kind": "x509", "key": "x"})
    assert SecurityPreviewIn.model_validate({"addresses": ["a@b.example"]}).contains_phi is True
    row = service.PreviewRow("a@b.example", "portal", "why", "secure")
    assert SecurityPreviewRowOut.model_validate(row.to_dict()).method == "portal"
