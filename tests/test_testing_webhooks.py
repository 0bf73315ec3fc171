"""safe_openai.testing.signed_webhook: deliveries the library's own handlers accept as OpenAI's."""

from __future__ import annotations

import base64
import json
import time

import pytest

from safe_openai import AsyncSafeClient, SafeClient, WebhookVerificationError, identifier_for
from safe_openai.testing import FakeOpenAI, SignedWebhook, signed_webhook
from safe_openai.webhooks import AsyncSafetyWebhookHandler, SafetyWebhookHandler

SECRET = "whsec_" + base64.b64encode(b"testing-webhook-secret-32-bytes!").decode()
IDENTIFIER_SECRET = "testing-webhooks-identifier-secret"


def sync_client(fake: FakeOpenAI) -> SafeClient:
    return SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=IDENTIFIER_SECRET,
        webhook_secret=SECRET,
        spool=False,
    )


def blocked(
    customer_id: str, *, event_id: str = "evt_test", timestamp: int | None = None
) -> SignedWebhook:
    identifier = identifier_for(customer_id, secret=IDENTIFIER_SECRET)
    return signed_webhook(
        SECRET,
        "safety_identifier.blocked",
        {"safety_identifier": identifier, "safety_category": "cyber"},
        event_id=event_id,
        timestamp=timestamp,
    )


def test_a_signed_delivery_passes_the_sdks_own_check() -> None:
    body, headers = signed_webhook(SECRET, "safety_identifier.blocked", {"x": 1})
    event = json.loads(body)
    assert event["type"] == "safety_identifier.blocked" and event["data"] == {"x": 1}
    assert headers["webhook-signature"].startswith("v1,")
    SafeClient(
        api_key="k", identifier_secret=IDENTIFIER_SECRET, spool=False
    ).webhooks.verify_signature(body, headers, secret=SECRET)


def test_the_sync_handler_acts_on_a_signed_blocked_identifier() -> None:
    """The delivery is verified, traced to the customer through the store, and struck."""
    fake = FakeOpenAI()
    client = sync_client(fake)
    acme = client.for_customer("acme")
    acme.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    body, headers = blocked("acme", event_id="evt_1")
    event = SafetyWebhookHandler(client).handle(body, headers)
    assert (event.action, event.customer_id, event.event_id) == ("strike", "acme", "evt_1")
    again = SafetyWebhookHandler(client).handle(*blocked("acme", event_id="evt_1"))
    assert again.action == "duplicate"


async def test_the_async_handler_accepts_it_too() -> None:
    fake = FakeOpenAI()
    client = AsyncSafeClient(
        **fake.async_openai_kwargs(),
        identifier_secret=IDENTIFIER_SECRET,
        webhook_secret=SECRET,
        spool=False,
    )
    await client.for_customer("globex").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    event = await AsyncSafetyWebhookHandler(client).handle(*blocked("globex"))
    assert (event.action, event.customer_id) == ("strike", "globex")


def test_a_tampered_body_or_another_secret_is_rejected() -> None:
    handler = SafetyWebhookHandler(sync_client(FakeOpenAI()))
    body, headers = blocked("acme")
    with pytest.raises(WebhookVerificationError, match="signature check failed"):
        handler.handle(body.replace(b"cyber", b"other"), headers)
    forged = signed_webhook(
        "whsec_" + base64.b64encode(b"another-secret-of-thirty-two-by!").decode(),
        "safety_identifier.blocked",
        {"safety_identifier": "x"},
    )
    with pytest.raises(WebhookVerificationError, match="signature check failed"):
        handler.handle(*forged)


def test_timestamp_ids_and_created_at_can_be_set() -> None:
    """A stale timestamp makes a delivery the handler refuses; the ids and created_at are
    the caller's."""
    handler = SafetyWebhookHandler(sync_client(FakeOpenAI()))
    with pytest.raises(WebhookVerificationError, match="too old"):
        handler.handle(*blocked("acme", timestamp=int(time.time()) - 600))
    body, headers = signed_webhook(
        SECRET,
        "safety.warning_issued",
        {"id": "case_1"},
        event_id="evt_9",
        webhook_id="wh_x",
        created_at=1_700_000_000,
    )
    assert headers["webhook-id"] == "wh_x"
    assert json.loads(body)["id"] == "evt_9" and json.loads(body)["created_at"] == 1_700_000_000


def test_an_unknown_customer_is_unmatched_not_guessed() -> None:
    event = SafetyWebhookHandler(sync_client(FakeOpenAI())).handle(*blocked("nobody"))
    assert event.action == "unmatched"


def test_two_deliveries_built_without_an_id_are_two_events() -> None:
    """Two events built without an ``event_id`` get ids of their own: the handler acts on both
    (a fixed default id made the second a silent duplicate)."""
    client = sync_client(FakeOpenAI())
    handler = SafetyWebhookHandler(client)
    actions = []
    for customer in ("first", "second"):
        client.for_customer(customer).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        identifier = identifier_for(customer, secret=IDENTIFIER_SECRET)
        body, headers = signed_webhook(
            SECRET, "safety_identifier.blocked", {"safety_identifier": identifier}
        )
        actions.append(handler.handle(body, headers).action)
    assert actions == ["strike", "strike"]
