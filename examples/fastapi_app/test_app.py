"""The example service over FakeOpenAI: two tenants on two plans, a streamed answer, a blocked
message as an HTTP error, quota headers, OpenAI's safety webhook and the operators' alerts.

Run by the project's suite (``testpaths``), or on its own: ``pytest examples/fastapi_app``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from app import PlanPolicy, Tenant, create_app
from fastapi.testclient import TestClient

from safe_openai import AsyncSafeClient, identifier_for
from safe_openai.alerts import Alert, WebhookAlertSink, verify_alert_signature
from safe_openai.testing import FakeOpenAI, signed_webhook
from safe_openai.web import CustomerMiddleware

IDENTIFIER_SECRET = "example-app-identifier-secret"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"example-app-webhook-secret-32by!").decode()
ALERT_SECRET = "example-app-alert-secret"
TENANTS = {"key-acme": Tenant("acme", "pro"), "key-globex": Tenant("globex", "free")}
ACME = {"authorization": "Bearer key-acme"}
GLOBEX = {"authorization": "Bearer key-globex"}


class AlertInbox:
    """The operators' endpoint, on loopback: it keeps each alert whose signature checks."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.arrived = threading.Condition()
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                alert = verify_alert_signature(body, self.headers, secret=ALERT_SECRET)
                with inbox.arrived:
                    inbox.alerts.append(alert)
                    inbox.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, kind: str, timeout: float = 10.0) -> Alert:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                found = [a for a in self.alerts if a.kind == kind]
                if found or time.monotonic() > deadline:
                    break
                self.arrived.wait(0.1)
        assert found, f"no {kind} alert arrived: {self.alerts}"
        return found[0]


@pytest.fixture
def inbox() -> Iterator[AlertInbox]:
    box = AlertInbox()
    yield box
    box.server.shutdown()
    box.server.server_close()


@pytest.fixture
def sink(inbox: AlertInbox) -> Iterator[WebhookAlertSink]:
    made = WebhookAlertSink(inbox.url, secret=ALERT_SECRET, backoff=0.05)
    yield made
    made.close()


def service(fake: FakeOpenAI, sink: WebhookAlertSink | None = None) -> TestClient:
    policy = PlanPolicy({t.id: t.plan for t in TENANTS.values()}, alerts=sink)
    ai = AsyncSafeClient(
        **fake.async_openai_kwargs(),
        identifier_secret=IDENTIFIER_SECRET,
        webhook_secret=WEBHOOK_SECRET,
        policy=policy,
        spool=False,
    )
    return TestClient(create_app(ai, TENANTS))


def texts(body: str) -> str:
    return "".join(json.loads(line[6:])["text"] for line in body.splitlines() if line)


def test_a_streamed_answer_arrives_with_the_tenants_quota_headers() -> None:
    fake = FakeOpenAI()
    with service(fake) as http:
        reply = http.post("/v1/answers/stream", json={"question": "Hi"}, headers=ACME)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert texts(reply.text) == "Echo: Hi"
    assert int(reply.headers["x-ratelimit-limit"]) > 0
    assert "x-ratelimit-remaining" in reply.headers


def test_a_stream_the_client_left_unread_is_closed_when_the_request_ends() -> None:
    """Starlette never closes a streamed body it stops sending; CustomerMiddleware closes the
    stream primed during the request, so its quota hold and connection are not left open."""
    app = service(FakeOpenAI()).app
    assert any(m.cls is CustomerMiddleware for m in app.user_middleware)  # type: ignore[attr-defined]


def test_two_plans_two_quotas_the_free_tenant_gets_429_with_retry_after() -> None:
    fake = FakeOpenAI()
    with service(fake) as http:
        free = [
            http.post("/v1/answers", json={"question": f"Q{n}"}, headers=GLOBEX) for n in range(6)
        ]
        pro = http.post("/v1/answers", json={"question": "Q"}, headers=ACME)
        usage = http.get("/v1/usage", headers=GLOBEX).json()

    assert [r.status_code for r in free] == [200] * 5 + [429]
    remaining = [int(r.headers["x-ratelimit-remaining"]) for r in free[:5]]
    assert remaining == sorted(remaining, reverse=True)
    assert remaining[-1] == 0
    refused = free[-1]
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit"] == "5"
    assert pro.status_code == 200  # the other plan's tenant is not held back
    assert usage["plan"] == "free"
    [rpm] = [u for u in usage["limits"] if u["name"] == "requests_per_minute"]
    assert (rpm["limit"], rpm["remaining"]) == (5, 0)


def test_a_blocked_message_is_a_422_and_nothing_reaches_the_model() -> None:
    fake = FakeOpenAI()
    with service(fake) as http:
        streamed = http.post(
            "/v1/answers/stream", json={"question": "I will kill him"}, headers=ACME
        )
        plain = http.post("/v1/answers", json={"question": "I will kill him"}, headers=ACME)
    for reply in (streamed, plain):
        assert reply.status_code == 422
        assert reply.json()["error"] == {
            "code": "moderation_blocked",
            "message": "Your message was blocked because it may violate our content policy.",
        }
    assert fake.model_requests == []


def test_an_unknown_key_is_401() -> None:
    with service(FakeOpenAI()) as http:
        assert (
            http.post(
                "/v1/answers", json={"question": "Hi"}, headers={"authorization": "x"}
            ).status_code
            == 401
        )


def test_openais_safety_webhook_strikes_the_tenant_and_forgeries_are_refused() -> None:
    fake = FakeOpenAI()
    identifier = identifier_for("acme", secret=IDENTIFIER_SECRET)
    body, headers = signed_webhook(
        WEBHOOK_SECRET, "safety_identifier.blocked", {"safety_identifier": identifier}
    )
    with service(fake) as http:
        http.post("/v1/answers", json={"question": "Hi"}, headers=ACME)  # acme's identifier
        delivered = http.post("/webhooks/openai", content=body, headers=headers)
        again = http.post("/webhooks/openai", content=body, headers=headers)
        forged = http.post("/webhooks/openai", content=body + b" ", headers=headers)
        usage = http.get("/v1/usage", headers=ACME).json()
    assert delivered.json() == {"action": "strike"}
    assert again.json() == {"action": "duplicate"}
    assert forged.status_code == 400
    assert usage["strikes"] == 1


def test_the_operators_hear_of_a_soft_limit_and_of_a_refusal(
    inbox: AlertInbox, sink: WebhookAlertSink
) -> None:
    fake = FakeOpenAI()
    with service(fake, sink) as http:
        for n in range(6):
            http.post("/v1/answers", json={"question": f"Q{n}"}, headers=GLOBEX)
    soft = inbox.wait_for("soft_limit")
    refused = inbox.wait_for("quota_exceeded")
    assert (soft.customer_id, soft.limit, soft.threshold) == ("globex", "requests_per_minute", 0.8)
    assert (refused.customer_id, refused.limit) == ("globex", "requests_per_minute")
