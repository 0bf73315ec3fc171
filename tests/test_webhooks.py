"""OpenAI safety webhooks: signed like OpenAI signs them, traced to customers, acted on once.

Deliveries are signed the Standard Webhooks way OpenAI uses (HMAC-SHA256 over
``{webhook-id}.{webhook-timestamp}.{body}`` under the base64-decoded part of a ``whsec_``
secret) and checked by the real SDK. Case and alert look-ups, moderation and chat calls are
served over ``httpx2.MockTransport`` through a real SafeClient.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx2
import openai
import pytest
from structlog.testing import capture_logs

from safe_openai import (
    AsyncSafeClient,
    ConfigurationError,
    CustomerSuspended,
    DefaultPolicy,
    ModerationBlocked,
    Policy,
    SafeClient,
    StoreError,
    WebhookInProgress,
    WebhookVerificationError,
)
from safe_openai._identity import safety_identifier
from safe_openai.alerts import Alert
from safe_openai.policy import SafetyAction
from safe_openai.stores._memory import MemoryStore
from safe_openai.stores._types import EVENT_LEASE
from safe_openai.webhooks import AsyncSafetyWebhookHandler, SafetyEvent, SafetyWebhookHandler

IDENTIFIER_SECRET = "webhook-test-identifier-secret"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()


# --- signing and payloads ----------------------------------------------------------------------


def signed(
    body: str | bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    webhook_id: str = "wh_test_1",
    timestamp: int | None = None,
) -> dict[str, str]:
    """Headers of a delivery of ``body`` signed exactly as OpenAI signs it."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    text = body.decode() if isinstance(body, bytes) else body
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{webhook_id}.{stamp}.{text}".encode(), hashlib.sha256).digest()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": stamp,
        "webhook-signature": f"v1,{base64.b64encode(mac).decode()}",
    }


def event_body(
    event_type: str, data: dict[str, Any], *, event_id: str = "evt_1", created_at: int | None = None
) -> str:
    """An event as OpenAI posts it."""
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "created_at": int(time.time()) - 5 if created_at is None else created_at,
            "type": event_type,
            "data": data,
        }
    )


def ident(customer_id: str) -> str:
    return safety_identifier(IDENTIFIER_SECRET.encode(), customer_id)


def blocked(
    customer_id: str = "acme",
    *,
    event_id: str = "evt_1",
    created_at: int | None = None,
    **extra: Any,
) -> str:
    data = {"safety_identifier": ident(customer_id), "safety_category": "cyber", **extra}
    return event_body("safety_identifier.blocked", data, event_id=event_id, created_at=created_at)


def case_event(kind: str, case_id: str = "C-1", *, event_id: str = "evt_case") -> str:
    return event_body(f"safety.{kind}_issued", {"id": case_id}, event_id=event_id)


def alert_event(
    alert_id: str = "alert_1", *, event_type: str = "safety.alert.created", event_id: str = "evt_a"
) -> str:
    return event_body(event_type, {"id": alert_id}, event_id=event_id)


# --- a fake API over MockTransport ---------------------------------------------------------------


class Api:
    """Moderation, chat, safety cases and alerts, answered from dicts; requests are recorded."""

    def __init__(self) -> None:
        self.cases: dict[str, dict[str, Any]] = {}
        self.alerts: dict[str, dict[str, Any]] = {}
        self.lookup_status: int | None = None
        self.paths: list[str] = []
        self.chat_bodies: list[dict[str, Any]] = []

    def add_case(
        self, case_id: str, customer_id: str, notice: str, reason: str = "cyber_abuse"
    ) -> None:
        self.cases[case_id] = {
            "id": case_id,
            "object": "safety.case",
            "created_at": int(time.time()) - 60,
            "entity_identifier": ident(customer_id),
            "notice": {"type": notice},
            "reason": reason,
        }

    def add_alert(self, alert_id: str, request_id: str) -> None:
        self.alerts[alert_id] = {
            "id": alert_id,
            "object": "safety.alert",
            "created_at": int(time.time()) - 60,
            "error_type": "potentially_unintended_data_access",
            "model": "gpt-4o-mini",
            "reason": "Potentially unintended data access",
            "request_id": request_id,
            "request_paused": True,
            "response_id": "resp_1",
        }

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.paths.append(f"{request.method} {path}")
        if path == "/v1/moderations":
            texts = json.loads(request.content)["input"]
            return httpx2.Response(200, json={"id": "modr", "model": "m", "results": [
                {"flagged": "kill" in t, "categories": {"violence": "kill" in t},
                 "category_scores": {"violence": 0.99 if "kill" in t else 0.01}}
                for t in texts
            ]})  # fmt: skip
        if path == "/v1/chat/completions":
            self.chat_bodies.append(json.loads(request.content))
            request_id = f"req_{len(self.chat_bodies)}"
            return httpx2.Response(
                200,
                headers={"x-request-id": request_id},
                json={
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "gpt-4o-mini",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                },
            )
        for prefix, table in (
            ("/v1/safety/cases/", self.cases),
            ("/v1/safety/alerts/", self.alerts),
        ):
            if path.startswith(prefix):
                if self.lookup_status is not None:
                    return httpx2.Response(self.lookup_status, json={"error": {"message": "no"}})
                found = table.get(path.removeprefix(prefix))
                if found is None:
                    return httpx2.Response(404, json={"error": {"message": "not found"}})
                return httpx2.Response(200, json=found)
        return httpx2.Response(404, json={"error": {"message": f"unexpected {path}"}})


def make_client(api: Api, *, policy: Policy | None = None, store: Any = "memory://") -> SafeClient:
    return SafeClient(
        api_key="k",
        base_url="http://t/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(api)),
        identifier_secret=IDENTIFIER_SECRET,
        store=store,
        spool=False,
        webhook_secret=WEBHOOK_SECRET,
        max_retries=0,
        policy=policy,
    )


def make_async_client(api: Api, *, policy: Policy | None = None) -> AsyncSafeClient:
    return AsyncSafeClient(
        api_key="k",
        base_url="http://t/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(api)),
        identifier_secret=IDENTIFIER_SECRET,
        store="memory://",
        spool=False,
        webhook_secret=WEBHOOK_SECRET,
        max_retries=0,
        policy=policy,
    )


@pytest.fixture
def api() -> Api:
    return Api()


@pytest.fixture
def safe(api: Api) -> Iterator[SafeClient]:
    with make_client(api) as client:
        yield client


@pytest.fixture
def handler(safe: SafeClient) -> SafetyWebhookHandler:
    return SafetyWebhookHandler(safe)


def know(client: SafeClient, *customers: str) -> None:
    for customer_id in customers:
        client.store.remember_identifier(ident(customer_id), customer_id)


def deliver(handler: SafetyWebhookHandler, body: str, **sign: Any) -> SafetyEvent:
    return handler.handle(body.encode(), signed(body, **sign))


def standing(client: SafeClient, customer_id: str = "acme") -> tuple[int, Any]:
    """(violation count, suspension) of a customer: what a delivery may change."""
    store = client.store
    now = datetime.now(timezone.utc)
    return len(store.violations(customer_id=customer_id)), store.suspension(customer_id, now=now)


def claim_args() -> dict[str, Any]:
    return {"token": "probe", "now": datetime.now(timezone.utc), "lease": timedelta(minutes=5)}


def unclaimed(store: Any, event_id: str) -> bool:
    """Whether nothing holds or finished the event (claiming it to find out)."""
    return bool(store.claim_event(event_id, **claim_args()) == "claimed")


def chat(client: SafeClient, customer_id: str, text: str = "hello") -> Any:
    return client.for_customer(customer_id).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
    )


# --- one test per event type ---------------------------------------------------------------------


def test_blocked_event_strikes_the_customer_whose_guarded_call_carried_the_identifier(
    api: Api, safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """The identifier the guard sent on a chat call is traced back to that customer."""
    chat(safe, "acme")
    sent_identifier = api.chat_bodies[0]["safety_identifier"]
    body = event_body(
        "safety_identifier.blocked",
        {"safety_identifier": sent_identifier, "safety_category": "bio", "model": "gpt-4o-mini",
         "request_id": "req_x"},
        event_id="evt_blk",
    )  # fmt: skip

    event = deliver(handler, body)

    assert event.action == "strike"
    assert event.customer_id == "acme"
    assert (event.event_id, event.type, event.category) == (
        "evt_blk",
        "safety_identifier.blocked",
        "bio",
    )
    assert (event.identifier, event.request_id) == (sent_identifier, "req_x")
    [violation] = safe.store.violations(customer_id="acme")
    assert violation.source == "safety_identifier.blocked"
    assert violation.categories == ("bio",)
    assert violation.detail.startswith("evt_blk")
    assert safe.store.suspension("acme", now=datetime.now(timezone.utc)) is None


def test_warning_event_retrieves_its_case_and_strikes_the_entity_identifier(
    api: Api, safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """safety.warning_issued: data.id is a case; the case's entity_identifier names the customer."""
    know(safe, "acme", "globex")
    api.add_case("C-42", "globex", "warning", reason="harassment")

    event = deliver(handler, case_event("warning", "C-42"))

    assert "GET /v1/safety/cases/C-42" in api.paths
    assert (event.action, event.customer_id, event.case_id) == ("strike", "globex", "C-42")
    assert event.category == "harassment"
    assert event.identifier == ident("globex")
    assert standing(safe, "globex")[0] == 1
    assert standing(safe, "acme") == (0, None)
    [violation] = safe.store.violations(customer_id="globex")
    assert violation.source == "safety.warning_issued"
    assert "C-42" in violation.detail


def test_deactivation_event_suspends_the_customer_at_once_until_lifted(
    api: Api, safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """safety.deactivation_issued suspends with no end date; the next guarded call is refused."""
    know(safe, "acme")
    api.add_case("C-9", "acme", "deactivation")

    event = deliver(handler, case_event("deactivation", "C-9"))

    assert (event.action, event.customer_id) == ("suspended", "acme")
    suspension = safe.store.suspension("acme", now=datetime.now(timezone.utc) + timedelta(days=365))
    assert suspension is not None
    assert suspension.until is None
    assert "safety.deactivation_issued" in suspension.reason
    assert "C-9" in suspension.reason
    assert [v.source for v in safe.store.violations(customer_id="acme")] == [
        "safety.deactivation_issued"
    ]
    with pytest.raises(CustomerSuspended):
        chat(safe, "acme")


def test_alert_is_traced_through_the_request_id_and_ignored_by_default(
    api: Api, safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """safety.alert.created: the alert's request_id maps to the customer; the default policy
    only logs alerts, so standing is unchanged.
    """
    chat(safe, "acme")  # the guard remembers req_1 -> acme
    api.add_alert("alert_7", "req_1")

    event = deliver(handler, alert_event("alert_7"))

    assert "GET /v1/safety/alerts/alert_7" in api.paths
    assert (event.action, event.customer_id) == ("ignored", "acme")
    assert (event.alert_id, event.request_id) == ("alert_7", "req_1")
    assert event.category == "potentially_unintended_data_access"
    assert standing(safe) == (0, None)


class StrikeOnAlerts(Policy):
    def action_for_safety_event(self, event_type: str) -> SafetyAction:
        if event_type in ("safety.alert.created", "safety.org_alert.created"):
            return "strike"
        return super().action_for_safety_event(event_type)


@pytest.mark.parametrize("event_type", ["safety.alert.created", "safety.org_alert.created"])
def test_alert_strikes_when_the_policy_says_so(api: Api, event_type: str) -> None:
    """A policy may act on project and org alerts; both are traced by request id."""
    with make_client(api, policy=StrikeOnAlerts()) as safe:
        chat(safe, "acme")
        api.add_alert("alert_1", "req_1")
        event = deliver(SafetyWebhookHandler(safe), alert_event(event_type=event_type))
        assert (event.type, event.action, event.customer_id) == (event_type, "strike", "acme")
        assert standing(safe)[0] == 1


def test_unknown_event_type_is_ignored_without_lookup_or_claim(
    api: Api, safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """Events the handler does not act on (batch.completed) are returned as ignored, not errors."""
    body = event_body("batch.completed", {"id": "batch_1"}, event_id="evt_b")

    first, second = deliver(handler, body), deliver(handler, body)

    assert (first.action, first.customer_id, first.type) == ("ignored", None, "batch.completed")
    assert "batch.completed" in first.reason
    assert second.action == "ignored"  # never claimed, so never a duplicate
    assert api.paths == []


# --- strikes and suspension ----------------------------------------------------------------------


def test_strikes_reaching_the_limit_suspend_the_customer(api: Api) -> None:
    """Blocked identifiers count toward the policy's strike limit like moderation blocks."""
    policy = DefaultPolicy(strike_limit=2, suspension=timedelta(hours=1))
    with make_client(api, policy=policy) as safe:
        know(safe, "acme")
        handler = SafetyWebhookHandler(safe)

        first = deliver(handler, blocked(event_id="evt_1"))
        second = deliver(handler, blocked(event_id="evt_2"))

        assert (first.action, second.action) == ("strike", "suspended")
        suspension = safe.store.suspension("acme", now=datetime.now(timezone.utc))
        assert suspension is not None
        assert suspension.until is not None  # the policy's strike suspension, not indefinite


def test_webhook_strikes_and_moderation_blocks_share_one_strike_count(api: Api) -> None:
    """One moderation block plus one blocked-identifier event reach a limit of two."""
    with make_client(api, policy=DefaultPolicy(strike_limit=2)) as safe:
        with pytest.raises(ModerationBlocked):
            chat(safe, "acme", "I will kill it")
        know(safe, "acme")

        event = deliver(SafetyWebhookHandler(safe), blocked())

        assert event.action == "suspended"
        sources = sorted(v.source for v in safe.store.violations(customer_id="acme"))
        assert sources == ["moderation", "safety_identifier.blocked"]


def test_a_strike_never_shortens_a_deactivation_suspension(api: Api) -> None:
    """After a deactivation (until lifted), a strike at the limit records a strike and leaves
    the indefinite suspension in force (the shorter strike suspension is not applied)."""
    policy = DefaultPolicy(strike_limit=1, suspension=timedelta(hours=1))
    with make_client(api, policy=policy) as safe:
        know(safe, "acme")
        api.add_case("C-1", "acme", "deactivation")
        handler = SafetyWebhookHandler(safe)
        deliver(handler, case_event("deactivation", "C-1", event_id="evt_d"))

        event = deliver(handler, blocked(event_id="evt_b"))

        assert event.action == "strike"
        later = datetime.now(timezone.utc) + timedelta(days=2)
        suspension = safe.store.suspension("acme", now=later)
        assert suspension is not None
        assert suspension.until is None
        assert "deactivation" in suspension.reason


DAY = 86400


def test_a_late_event_counts_in_its_own_strike_window_not_todays(api: Api) -> None:
    """Three strikes, but no three within 24 hours: an event OpenAI delivers three days late
    does not join today's two strikes (it counts where it happened)."""
    with make_client(api, policy=DefaultPolicy(strike_limit=3)) as safe:
        know(safe, "acme")
        handler = SafetyWebhookHandler(safe)
        now = int(time.time())
        recent = [
            deliver(handler, blocked(event_id=f"evt_{i}", created_at=now - 60 * i)) for i in (2, 1)
        ]
        late = deliver(handler, blocked(event_id="evt_late", created_at=now - 3 * DAY))

        assert [e.action for e in [*recent, late]] == ["strike", "strike", "strike"]
        assert standing(safe) == (3, None)


def test_a_late_event_that_fills_its_own_window_suspends_until_lifted(api: Api) -> None:
    """Two strikes three days ago, then the late event that happened just before them: three
    within 24 hours of each other, so the customer is suspended (indefinite suspension)."""
    with make_client(api, policy=DefaultPolicy(strike_limit=3)) as safe:
        know(safe, "acme")
        handler = SafetyWebhookHandler(safe)
        then = int(time.time()) - 3 * DAY
        for i, offset in enumerate((3600, 7200)):
            deliver(handler, blocked(event_id=f"evt_{i}", created_at=then + offset))
        late = deliver(handler, blocked(event_id="evt_late", created_at=then))

        assert late.action == "suspended"
        count, suspension = standing(safe)
        assert count == 3
        assert suspension is not None
        assert suspension.until is None
        assert suspension.since == datetime.fromtimestamp(then + 7200, timezone.utc)


def test_a_timed_suspension_a_late_window_earned_is_not_served_again(api: Api) -> None:
    """The same late window with a one-hour strike suspension: it ended three days ago, so
    nothing is suspended now."""
    policy = DefaultPolicy(strike_limit=3, suspension=timedelta(hours=1))
    with make_client(api, policy=policy) as safe:
        know(safe, "acme")
        handler = SafetyWebhookHandler(safe)
        then = int(time.time()) - 3 * DAY
        for i, offset in enumerate((3600, 7200)):
            deliver(handler, blocked(event_id=f"evt_{i}", created_at=then + offset))
        late = deliver(handler, blocked(event_id="evt_late", created_at=then))

        assert late.action == "strike"
        assert standing(safe) == (3, None)


# --- unmatched, duplicate, rejected --------------------------------------------------------------


def test_unknown_identifier_is_logged_and_returned_unmatched(
    safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """Nobody is guessed: no violation for anyone, and a webhook_unmatched log line."""
    know(safe, "acme")
    with capture_logs() as logs:
        event = deliver(handler, blocked("stranger"))

    assert (event.action, event.customer_id) == ("unmatched", None)
    assert event.identifier == ident("stranger")
    assert safe.store.violations() == []
    [line] = [entry for entry in logs if entry["event"] == "safe_openai.webhook_unmatched"]
    assert line["identifier"] == ident("stranger")
    assert line["event_id"] == "evt_1"


def test_blocked_event_falls_back_to_its_request_id(
    safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """An identifier the store lacks is still traced when the request id is known."""
    chat(safe, "acme")  # req_1 -> acme
    event = deliver(handler, blocked("nobody-knows", request_id="req_1"))
    assert (event.action, event.customer_id) == ("strike", "acme")


def test_replayed_delivery_is_a_duplicate_and_changes_nothing(
    safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """The same event id delivered twice (new signature, same body) acts once."""
    know(safe, "acme")
    body = blocked()
    first = deliver(handler, body, webhook_id="wh_1")
    after_first = standing(safe)

    second = deliver(handler, body, webhook_id="wh_2")

    assert (first.action, second.action) == ("strike", "duplicate")
    assert second.customer_id == "acme"
    assert "handled before" in second.reason
    assert standing(safe) == after_first == (1, None)


def test_replayed_deactivation_does_not_resuspend_after_an_operator_lifted_it(
    api: Api, safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """A duplicate changes nothing, not even a suspension lifted in between."""
    know(safe, "acme")
    api.add_case("C-1", "acme", "deactivation")
    body = case_event("deactivation", "C-1")
    deliver(handler, body)
    assert safe.store.unsuspend("acme")

    assert deliver(handler, body).action == "duplicate"
    assert safe.store.suspension("acme", now=datetime.now(timezone.utc)) is None


def test_duplicate_of_an_unmatched_event_is_reported_as_duplicate(
    handler: SafetyWebhookHandler,
) -> None:
    body = blocked("stranger")
    assert [deliver(handler, body).action for _ in range(2)] == ["unmatched", "duplicate"]


def assert_rejected(
    handler: SafetyWebhookHandler,
    safe: SafeClient,
    body: str | bytes,
    headers: dict[str, str],
    reason: str,
) -> None:
    """The delivery raises a clear WebhookVerificationError and leaves standing unchanged."""
    before = standing(safe)
    with pytest.raises(WebhookVerificationError, match=reason) as caught:
        handler.handle(body, headers)
    assert str(caught.value).startswith("Webhook delivery rejected: ")
    assert standing(safe) == before


def test_forged_signature_is_rejected_and_the_event_stays_unclaimed(
    safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """Signed with another secret: rejected; the genuine delivery later still acts."""
    know(safe, "acme")
    body = blocked()
    assert_rejected(handler, safe, body, signed(body, secret=OTHER_SECRET), "does not match")

    assert deliver(handler, body).action == "strike"


def test_tampered_body_is_rejected(safe: SafeClient, handler: SafetyWebhookHandler) -> None:
    """A body changed after signing (another customer's identifier) fails the signature."""
    know(safe, "acme", "globex")
    headers = signed(blocked("acme"))
    assert_rejected(handler, safe, blocked("globex"), headers, "does not match")
    assert standing(safe, "globex") == (0, None)


def test_stale_timestamp_is_rejected(safe: SafeClient, handler: SafetyWebhookHandler) -> None:
    """A correctly signed delivery older than five minutes is a replay: rejected."""
    know(safe, "acme")
    body = blocked()
    headers = signed(body, timestamp=int(time.time()) - 301)
    assert_rejected(handler, safe, body, headers, "too old")


def test_future_timestamp_is_rejected(safe: SafeClient, handler: SafetyWebhookHandler) -> None:
    know(safe, "acme")
    body = blocked()
    assert_rejected(handler, safe, body, signed(body, timestamp=int(time.time()) + 600), "too new")


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_rejected_naming_it(
    safe: SafeClient, handler: SafetyWebhookHandler, missing: str
) -> None:
    know(safe, "acme")
    body = blocked()
    headers = signed(body)
    del headers[missing]
    assert_rejected(handler, safe, body, headers, missing)


def test_header_names_match_case_insensitively(
    safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """Frameworks spell headers differently (Webhook-Id, WEBHOOK-SIGNATURE)."""
    know(safe, "acme")
    body = blocked()
    headers = {name.title(): value for name, value in signed(body).items()}
    assert handler.handle(body, headers).action == "strike"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"id": "evt_1", "type": ', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"type": "safety_identifier.blocked", "data": {}}', "no id or no type"),
        (
            '{"id": "evt_1", "type": "safety_identifier.blocked", "created_at": 1, "data": {}}',
            "no safety_identifier",
        ),
        (
            '{"id": "evt_1", "type": "safety.warning_issued", "data": {"id": "C-1"}}',
            "no created_at",
        ),
        (
            '{"id": "evt_1", "type": "safety.warning_issued", "created_at": 1, "data": {}}',
            "no data.id",
        ),
    ],
)
def test_malformed_body_is_rejected_even_when_signed(
    safe: SafeClient, handler: SafetyWebhookHandler, body: str, reason: str
) -> None:
    assert_rejected(handler, safe, body, signed(body), reason)


def test_body_that_is_not_utf8_is_rejected(safe: SafeClient, handler: SafetyWebhookHandler) -> None:
    body = b'{"id": "\xff"}'
    headers = signed(body.decode("latin-1"))
    assert_rejected(handler, safe, body, headers, "not UTF-8")


def test_logs_carry_ids_but_no_payload_text(
    safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """Handled and rejected deliveries log dotted event names and ids, never the body."""
    know(safe, "acme")
    secret_text = "PRIVATE-PAYLOAD-TEXT"
    with capture_logs() as logs:
        deliver(handler, blocked(note=secret_text))
        with pytest.raises(WebhookVerificationError):
            deliver(handler, blocked(event_id="evt_2", note=secret_text), secret=OTHER_SECRET)
        with pytest.raises(WebhookVerificationError):
            deliver(handler, f'{{"id": "{secret_text}"')
    assert len(logs) >= 3
    assert all("safe_openai." in entry["event"] for entry in logs)
    assert secret_text not in repr(logs)


# --- failures: nothing claimed, a redelivery acts once -----------------------------------------


class FlakyStore(MemoryStore):
    """A memory store whose named method fails once (for the webhook's own event: claims of
    alert ids go through)."""

    def __init__(self, fail_on: str) -> None:
        super().__init__()
        self.fail_on: str | None = fail_on

    def __getattribute__(self, name: str) -> Any:
        if name != "fail_on" and name == self.fail_on:
            method = super().__getattribute__(name)

            def broken(*args: Any, **kwargs: Any) -> Any:
                if args and str(args[0]).startswith("alert:"):
                    return method(*args, **kwargs)
                self.fail_on = None
                raise OSError("disk gone")

            return broken
        return super().__getattribute__(name)


@pytest.mark.parametrize("fail_on", ["claim_event", "violations", "record_violation"])
def test_store_failure_leaves_the_event_unclaimed_and_a_redelivery_strikes_once(
    api: Api, fail_on: str
) -> None:
    """Whichever store call fails, the delivery errors, and its redelivery ends with one strike."""
    store = FlakyStore(fail_on)
    with make_client(api, store=store) as safe:
        know(safe, "acme")
        handler = SafetyWebhookHandler(safe)
        body = blocked()
        with pytest.raises(StoreError):
            deliver(handler, body)

        retried = deliver(handler, body)

        assert retried.action == "strike"
        assert standing(safe)[0] == 1
        assert deliver(handler, body).action == "duplicate"
        assert standing(safe)[0] == 1


@pytest.mark.parametrize("fail_on", ["suspend", "record_violation", "claim_event"])
def test_deactivation_redelivered_after_a_store_failure_still_suspends(
    api: Api, fail_on: str
) -> None:
    store = FlakyStore(fail_on)
    with make_client(api, store=store) as safe:
        know(safe, "acme")
        api.add_case("C-1", "acme", "deactivation")
        handler = SafetyWebhookHandler(safe)
        body = case_event("deactivation", "C-1")
        with pytest.raises(StoreError):
            deliver(handler, body)

        assert deliver(handler, body).action == "suspended"
        count, suspension = standing(safe)
        assert (count, suspension is not None) == (1, True)


def test_a_delivery_while_another_holds_the_claim_changes_nothing_and_asks_for_a_retry(
    safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """A live claim of another delivery: WebhookInProgress (answer 5xx), no violation."""
    know(safe, "acme")
    now = datetime.now(timezone.utc)
    assert safe.store.claim_event("evt_1", token="other", now=now, lease=EVENT_LEASE) == "claimed"

    with capture_logs() as logs, pytest.raises(WebhookInProgress) as raised:
        deliver(handler, blocked())

    assert raised.value.event_id == "evt_1"
    assert standing(safe) == (0, None)
    assert any(entry["event"] == "safe_openai.webhook_concurrent_delivery" for entry in logs)
    safe.store.finish_event("evt_1", token="other")
    assert deliver(handler, blocked()).action == "duplicate"


def test_a_claim_whose_holder_died_lapses_after_its_lease(
    safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """A delivery that died holding the claim (never released) blocks redeliveries only for
    EVENT_LEASE; the first one after that acts."""
    know(safe, "acme")
    died_at = datetime.now(timezone.utc) - EVENT_LEASE - timedelta(seconds=1)
    assert safe.store.claim_event("evt_1", token="dead", now=died_at, lease=EVENT_LEASE) == (
        "claimed"
    )

    assert deliver(handler, blocked()).action == "strike"
    assert standing(safe)[0] == 1


def test_acted_but_not_marked_done_is_answered_and_never_acts_twice(api: Api) -> None:
    """finish_event fails after the strike was written: the delivery still answers (the
    action happened), and a redelivery after the lease finds the strike and adds none."""
    store = FlakyStore("finish_event")
    with make_client(api, store=store) as safe:
        know(safe, "acme")
        handler = SafetyWebhookHandler(safe)
        with capture_logs() as logs:
            assert deliver(handler, blocked()).action == "strike"
        assert any(entry["event"] == "safe_openai.webhook_claim_not_finished" for entry in logs)
        with pytest.raises(WebhookInProgress):  # the claim lives until its lease ends
            deliver(handler, blocked())
        lapsed = datetime.now(timezone.utc) + EVENT_LEASE + timedelta(seconds=1)
        assert store.claim_event("evt_1", token="later", now=lapsed, lease=EVENT_LEASE) == (
            "claimed"
        )
        store.release_event("evt_1", token="later")

        redelivered = deliver(handler, blocked())
        assert redelivered.action == "strike"
        assert "already recorded" in redelivered.reason
        assert deliver(handler, blocked()).action == "duplicate"
        assert standing(safe)[0] == 1


def test_failed_case_lookup_raises_and_a_redelivery_acts(
    api: Api, safe: SafeClient, handler: SafetyWebhookHandler
) -> None:
    """The SDK's error propagates (answer 5xx) and nothing is claimed."""
    know(safe, "acme")
    api.add_case("C-1", "acme", "warning")
    api.lookup_status = 500
    body = case_event("warning", "C-1")
    with pytest.raises(openai.InternalServerError):
        deliver(handler, body)
    assert standing(safe) == (0, None)

    api.lookup_status = None
    assert deliver(handler, body).action == "strike"


def test_failed_lookup_of_an_ignored_alert_is_tolerated(
    api: Api, handler: SafetyWebhookHandler
) -> None:
    """An alert the policy ignores is answered even if it cannot be retrieved (org alert, 404)."""
    with capture_logs() as logs:
        event = deliver(handler, alert_event("alert_gone", event_type="safety.org_alert.created"))
    assert (event.action, event.customer_id) == ("ignored", None)
    assert any(entry["event"] == "safe_openai.webhook_lookup_failed" for entry in logs)


# --- configuration -------------------------------------------------------------------------------


def test_no_webhook_secret_is_a_configuration_error(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_WEBHOOK_SECRET", raising=False)
    client = SafeClient(
        api_key="k",
        base_url="http://t/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(api)),
        identifier_secret=IDENTIFIER_SECRET,
        store="memory://",
        spool=False,
    )
    with pytest.raises(ConfigurationError, match="OPENAI_WEBHOOK_SECRET"):
        SafetyWebhookHandler(client)


def test_secret_defaults_to_openai_webhook_secret_and_can_be_overridden(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", OTHER_SECRET)
    client = SafeClient(
        api_key="k",
        base_url="http://t/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(api)),
        identifier_secret=IDENTIFIER_SECRET,
        store="memory://",
        spool=False,
    )
    know(client, "acme")
    body = blocked()
    from_env = SafetyWebhookHandler(client)
    assert from_env.handle(body, signed(body, secret=OTHER_SECRET)).action == "strike"
    explicit = SafetyWebhookHandler(client, secret=WEBHOOK_SECRET)
    with pytest.raises(WebhookVerificationError):
        explicit.handle(body, signed(body, secret=OTHER_SECRET))


class Misspelled(Policy):
    def action_for_safety_event(self, event_type: str) -> SafetyAction:
        return "suspended"  # type: ignore[return-value]


def test_a_policy_returning_an_unknown_action_fails_loudly_and_claims_nothing(api: Api) -> None:
    with make_client(api, policy=Misspelled()) as safe:
        know(safe, "acme")
        with pytest.raises(ConfigurationError, match="'suspended'"):
            deliver(SafetyWebhookHandler(safe), blocked())
        assert unclaimed(safe.store, "evt_1")


def test_safety_event_is_frozen(handler: SafetyWebhookHandler) -> None:
    event = deliver(handler, blocked("stranger"))
    with pytest.raises(AttributeError):
        event.action = "strike"  # type: ignore[misc]
    assert isinstance(event.created_at, datetime)
    assert event.created_at.tzinfo is not None


# --- the async twin ------------------------------------------------------------------------------


async def adeliver(handler: AsyncSafetyWebhookHandler, body: str, **sign: Any) -> SafetyEvent:
    return await handler.handle(body.encode(), signed(body, **sign))


async def test_async_blocked_event_strikes_and_a_replay_is_a_duplicate(api: Api) -> None:
    async with make_async_client(api) as safe:
        await safe.store.remember_identifier(ident("acme"), "acme")
        handler = AsyncSafetyWebhookHandler(safe)
        body = blocked()

        first, second = await adeliver(handler, body), await adeliver(handler, body)

        assert (first.action, first.customer_id) == ("strike", "acme")
        assert second.action == "duplicate"
        assert len(await safe.store.violations(customer_id="acme")) == 1


async def test_async_deactivation_retrieves_the_case_and_suspends(api: Api) -> None:
    async with make_async_client(api) as safe:
        await safe.store.remember_identifier(ident("acme"), "acme")
        api.add_case("C-5", "acme", "deactivation")

        event = await adeliver(AsyncSafetyWebhookHandler(safe), case_event("deactivation", "C-5"))

        assert "GET /v1/safety/cases/C-5" in api.paths
        assert (event.action, event.customer_id, event.case_id) == ("suspended", "acme", "C-5")
        suspension = await safe.store.suspension("acme", now=datetime.now(timezone.utc))
        assert suspension is not None
        assert suspension.until is None


async def test_async_alert_is_traced_by_the_request_id_of_a_guarded_call(api: Api) -> None:
    async with make_async_client(api, policy=StrikeOnAlerts()) as safe:
        await safe.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        api.add_alert("alert_1", "req_1")
        event = await adeliver(AsyncSafetyWebhookHandler(safe), alert_event("alert_1"))
        assert (event.action, event.customer_id) == ("strike", "acme")


async def test_async_forged_and_stale_deliveries_are_rejected(api: Api) -> None:
    async with make_async_client(api) as safe:
        await safe.store.remember_identifier(ident("acme"), "acme")
        handler = AsyncSafetyWebhookHandler(safe)
        body = blocked()
        with pytest.raises(WebhookVerificationError, match="does not match"):
            await handler.handle(body, signed(body, secret=OTHER_SECRET))
        with pytest.raises(WebhookVerificationError, match="too old"):
            await handler.handle(body, signed(body, timestamp=int(time.time()) - 3600))
        assert await safe.store.violations() == []
        assert await safe.store.claim_event("evt_1", **claim_args()) == "claimed"


async def test_async_failed_case_lookup_raises_and_claims_nothing(api: Api) -> None:
    async with make_async_client(api) as safe:
        await safe.store.remember_identifier(ident("acme"), "acme")
        api.add_case("C-1", "acme", "warning")
        api.lookup_status = 503
        handler = AsyncSafetyWebhookHandler(safe)
        with pytest.raises(openai.APIStatusError):
            await adeliver(handler, case_event("warning", "C-1"))
        api.lookup_status = None
        assert (await adeliver(handler, case_event("warning", "C-1"))).action == "strike"


async def test_async_delivery_cancelled_while_acting_releases_its_claim(api: Api) -> None:
    """A client disconnect (the handler's task cancelled) during the strike gives the claim
    back, so the redelivery acts at once instead of waiting out the lease."""
    import asyncio

    async with make_async_client(api) as safe:
        store = safe.store
        await store.remember_identifier(ident("acme"), "acme")
        started = asyncio.Event()
        original = store.record_violation

        async def stalled(violation: Any) -> Any:
            started.set()
            await asyncio.sleep(3600)
            return await original(violation)

        store.record_violation = stalled
        handler = AsyncSafetyWebhookHandler(safe)
        task = asyncio.ensure_future(adeliver(handler, blocked()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        store.record_violation = original
        assert (await adeliver(handler, blocked())).action == "strike"
        assert len(await store.violations(customer_id="acme")) == 1


def test_sync_delivery_interrupted_while_acting_releases_its_claim(api: Api) -> None:
    """A BaseException (a gevent timeout, KeyboardInterrupt) during the strike releases the
    claim on its way out."""

    class Interrupted(MemoryStore):
        interrupt = True

        def record_violation(self, violation: Any) -> bool:
            if self.interrupt:
                self.interrupt = False
                raise KeyboardInterrupt
            return super().record_violation(violation)

    with make_client(api, store=Interrupted()) as safe:
        know(safe, "acme")
        handler = SafetyWebhookHandler(safe)
        with pytest.raises(KeyboardInterrupt):
            deliver(handler, blocked())
        assert deliver(handler, blocked()).action == "strike"
        assert standing(safe)[0] == 1


def test_a_strike_stored_before_the_limit_could_be_applied_suspends_on_redelivery(
    api: Api,
) -> None:
    """The strike reaches the limit but suspending fails: the redelivery finds the strike
    already stored, writes no second one, and applies the limit it missed."""
    store = FlakyStore("suspend")
    with make_client(api, store=store, policy=DefaultPolicy(strike_limit=1)) as safe:
        know(safe, "acme")
        handler = SafetyWebhookHandler(safe)
        with pytest.raises(StoreError):
            deliver(handler, blocked())

        retried = deliver(handler, blocked())

        assert retried.action == "suspended"
        count, suspension = standing(safe)
        assert (count, suspension is not None) == (1, True)


# --- alerts --------------------------------------------------------------------------------------


def _alerting(api: Api, **settings: Any) -> tuple[SafeClient, list[Alert]]:
    received: list[Alert] = []
    client = make_client(api, policy=DefaultPolicy(alerts=received.append, **settings))
    know(client, "acme")
    return client, received


def test_a_blocked_identifier_alerts_its_strike_and_the_event_once(api: Api) -> None:
    """The event traced to its customer raises an openai_event alert (after its strike's); a
    redelivery of the same event raises none."""
    client, received = _alerting(api)
    with client:
        handler = SafetyWebhookHandler(client)
        assert deliver(handler, blocked()).action == "strike"
        assert deliver(handler, blocked()).action == "duplicate"
    strike, event = received
    assert (strike.kind, strike.id) == ("strike", "alert:strike:webhook:evt_1")
    assert (event.kind, event.id, event.customer_id) == (
        "openai_event",
        "alert:openai_event:evt_1",
        "acme",
    )
    assert (event.event_type, event.categories) == ("safety_identifier.blocked", ("cyber",))
    assert event.reason == "safety_identifier.blocked recorded as a violation"


def test_a_deactivation_alerts_the_suspension_and_the_event(api: Api) -> None:
    client, received = _alerting(api)
    api.add_case("C-9", "acme", "deactivation")
    with client:
        deliver(SafetyWebhookHandler(client), case_event("deactivation", "C-9"))
    assert [a.kind for a in received] == ["suspension", "openai_event"]
    suspension, event = received
    assert suspension.event_type == "safety.deactivation_issued"
    assert "case C-9" in suspension.reason
    assert event.event_type == "safety.deactivation_issued"


def test_a_warning_the_policy_ignores_still_alerts_and_unmatched_events_do_not(api: Api) -> None:
    class IgnoreWarnings(DefaultPolicy):
        def action_for_safety_event(self, event_type: str) -> SafetyAction:
            return "ignore"

    received: list[Alert] = []
    api.add_case("C-1", "acme", "warning")
    with make_client(api, policy=IgnoreWarnings(alerts=received.append)) as client:
        know(client, "acme")
        handler = SafetyWebhookHandler(client)
        assert deliver(handler, case_event("warning", "C-1")).action == "ignored"
        assert deliver(handler, blocked("stranger", event_id="evt_2")).action == "unmatched"
    assert [(a.kind, a.event_type) for a in received] == [("openai_event", "safety.warning_issued")]


def test_the_async_handler_alerts_the_same(api: Api) -> None:
    received: list[Alert] = []

    async def main() -> None:
        async with make_async_client(api, policy=DefaultPolicy(alerts=received.append)) as client:
            await client.store.remember_identifier(ident("acme"), "acme")
            handler = AsyncSafetyWebhookHandler(client)
            body = blocked()
            await handler.handle(body.encode(), signed(body))

    asyncio.run(main())
    assert [a.kind for a in received] == ["strike", "openai_event"]
