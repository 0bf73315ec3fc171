"""WebhookAlertSink against a real HTTP server on loopback: signed JSON, retried after a 5xx,
bounded, and never holding up the guarded call that raised the alert."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from structlog.testing import capture_logs

from safe_openai import (
    ConfigurationError,
    DefaultPolicy,
    Quota,
    QuotaExceeded,
    WebhookVerificationError,
)
from safe_openai.alerts import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Alert,
    WebhookAlertSink,
    sign_alert,
    verify_alert_signature,
)
from safe_openai.testing import FakeOpenAI

from .conftest import make_async_client, make_client

SECRET = "alert-signing-secret-0123456789"
ALERT = Alert(
    id="alert:quota_exceeded:acme:tokens_per_day:2026-12-04",
    kind="quota_exceeded",
    customer_id="acme",
    at=datetime(2026, 12, 4, 19, 10, tzinfo=timezone.utc),
    limit="tokens_per_day",
    used=0,
    allowed=200,
)


@dataclass
class Delivery:
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    """A loopback HTTP server: answers each POST with the next status of ``statuses`` (then
    200), after ``gate`` opens when one is set."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.entered.set()
            if state.gate is not None:
                state.gate.wait(30)
            state.deliveries.append(Delivery(body, dict(self.headers.items())))
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/alerts"
    try:
        yield state
    finally:
        if state.gate is not None:
            state.gate.set()
        server.shutdown()
        server.server_close()


def sink_for(receiver: Receiver, **options: Any) -> WebhookAlertSink:
    return WebhookAlertSink(receiver.url, secret=SECRET, backoff=0.01, max_backoff=0.05, **options)


def wait_for(condition: Callable[[], bool]) -> None:
    """Poll until ``condition`` holds (no timing asserted: a bound only against hanging)."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def test_an_alert_is_posted_as_signed_json_a_receiver_can_verify(receiver: Receiver) -> None:
    with sink_for(receiver) as sink:
        sink(ALERT)
        assert sink.flush(10)
    [delivery] = receiver.deliveries
    headers = {name.lower(): value for name, value in delivery.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers[ID_HEADER.lower()] == ALERT.id
    assert headers[SIGNATURE_HEADER.lower()] == sign_alert(
        delivery.body, secret=SECRET, timestamp=int(headers[TIMESTAMP_HEADER.lower()])
    )
    assert verify_alert_signature(delivery.body, delivery.headers, secret=SECRET) == ALERT
    assert sink.delivered == 1


def test_a_forged_tampered_or_stale_delivery_is_refused(receiver: Receiver) -> None:
    with sink_for(receiver) as sink:
        sink(ALERT)
        sink.flush(10)
    [delivery] = receiver.deliveries
    sent = int(delivery.headers[TIMESTAMP_HEADER])
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify_alert_signature(delivery.body, delivery.headers, secret="another-secret-0123456")
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify_alert_signature(delivery.body + b" ", delivery.headers, secret=SECRET)
    with pytest.raises(WebhookVerificationError, match="out of range"):
        verify_alert_signature(delivery.body, delivery.headers, secret=SECRET, now=sent + 301)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify_alert_signature(delivery.body, {}, secret=SECRET)


def test_a_delivery_answered_500_is_retried_until_accepted(receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    with sink_for(receiver) as sink:
        sink(ALERT)
        assert sink.flush(10)
        assert (sink.delivered, sink.failed) == (1, 0)
    assert len(receiver.deliveries) == 3
    # each attempt is signed afresh, and every one verifies
    for delivery in receiver.deliveries:
        verify_alert_signature(delivery.body, delivery.headers, secret=SECRET)


def test_attempts_are_bounded_and_a_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    with sink_for(receiver, attempts=3) as sink, capture_logs() as logs:
        sink(ALERT)
        assert sink.flush(10)
        assert (sink.delivered, sink.failed) == (0, 1)
    assert len(receiver.deliveries) == 3
    assert any(entry["event"] == "safe_openai.alert_failed" for entry in logs)
    receiver.statuses, receiver.deliveries = [400], []
    with sink_for(receiver) as sink:
        sink(ALERT)
        sink.flush(10)
        assert sink.failed == 1
    assert len(receiver.deliveries) == 1


def test_an_unreachable_receiver_is_retried_then_given_up(receiver: Receiver) -> None:
    url = receiver.url.replace(receiver.url.split(":")[2].split("/")[0], "9")  # nothing on :9
    with WebhookAlertSink(url, secret=SECRET, attempts=2, backoff=0.01, timeout=2) as sink:
        sink(ALERT)
        assert sink.flush(20)
        assert (sink.delivered, sink.failed) == (0, 1)


def test_a_hung_receiver_does_not_hold_up_the_guarded_call(
    receiver: Receiver, fake: FakeOpenAI
) -> None:
    """The refusal that raises the alert returns while the receiver still holds the post."""
    receiver.gate = threading.Event()
    sink = sink_for(receiver)
    policy = DefaultPolicy(quota=Quota(tokens_per_day=200), alerts=sink)
    with make_client(fake, policy=policy) as client:
        with pytest.raises(QuotaExceeded):
            client.for_customer("acme").chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1000
            )
        assert receiver.entered.wait(20)
        assert receiver.deliveries == [] and sink.delivered == 0  # still held by the receiver
    receiver.gate.set()
    assert sink.flush(20)
    assert sink.delivered == 1
    sink.close()


def test_the_async_client_queues_alerts_without_waiting(
    receiver: Receiver, fake: FakeOpenAI
) -> None:
    import asyncio

    receiver.gate = threading.Event()
    sink = sink_for(receiver)
    policy = DefaultPolicy(quota=Quota(tokens_per_day=200), alerts=sink)

    async def main() -> None:
        async with make_async_client(fake, policy=policy) as client:
            with pytest.raises(QuotaExceeded):
                await client.for_customer("acme").chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=1000,
                )

    asyncio.run(main())
    assert receiver.deliveries == []  # the loop never waited on the receiver
    receiver.gate.set()
    assert sink.flush(20) and sink.delivered == 1
    sink.close()


def test_a_full_queue_drops_with_a_warning_and_a_count(receiver: Receiver) -> None:
    receiver.gate = threading.Event()
    sink = sink_for(receiver, max_queue=1)
    with capture_logs() as logs:
        sink(ALERT)  # taken by the worker, held by the receiver
        assert receiver.entered.wait(20)
        sink(ALERT)  # waits in the queue
        sink(ALERT)  # no room
    assert sink.dropped == 1
    assert [e["reason"] for e in logs if e["event"] == "safe_openai.alert_dropped"] == [
        "queue_full"
    ]
    receiver.gate.set()
    assert sink.flush(20)
    assert sink.delivered == 2
    sink.close()
    sink(ALERT)  # after close: dropped, not queued
    assert sink.dropped == 2


def test_bad_settings_are_refused() -> None:
    for url, options in (
        ("ftp://x", {}),
        ("http://x", {"secret": "short"}),
        ("http://x", {"attempts": 0}),
        ("http://x", {"max_queue": 0}),
        ("http://x", {"timeout": 0}),
    ):
        with pytest.raises(ConfigurationError):
            WebhookAlertSink(url, **{"secret": SECRET, **options})


def test_a_redirect_is_not_followed_and_counts_as_no_delivery(receiver: Receiver) -> None:
    """A 302 (to another host, say) is neither followed with the signed body nor taken for a
    delivery: the alert is given up on, logged, like a 4xx."""
    receiver.statuses = [302]
    with sink_for(receiver) as sink, capture_logs() as logs:
        sink(ALERT)
        assert sink.flush(10)
        assert (sink.delivered, sink.failed) == (0, 1)
    assert len(receiver.deliveries) == 1
    [failed] = [e for e in logs if e["event"] == "safe_openai.alert_failed"]
    assert "302" in failed["error"]


def test_an_alert_whose_id_is_not_ascii_is_delivered(receiver: Receiver) -> None:
    """A customer id beyond ASCII (or with a line break) is in the alert id; the id header
    carries it percent-encoded, the body exactly."""
    odd = [
        Alert(id=f"alert:strike:{name}", kind="strike", customer_id=name, at=ALERT.at)
        for name in ("josé", "日本", "a\r\nX-Injected: 1")
    ]
    with sink_for(receiver) as sink:
        for alert in odd:
            sink(alert)
        assert sink.flush(10)
        assert (sink.delivered, sink.failed) == (3, 0)
    assert len(receiver.deliveries) == 3
    for delivery, alert in zip(receiver.deliveries, odd, strict=True):
        assert verify_alert_signature(delivery.body, delivery.headers, secret=SECRET) == alert
        assert delivery.headers[ID_HEADER].isascii()
        assert "X-Injected" not in {name for name in delivery.headers}
    assert receiver.deliveries[0].headers[ID_HEADER] == "alert:strike:jos%C3%A9"


def test_an_unexpected_failure_counts_as_failed() -> None:
    import httpx2

    class Broken(httpx2.BaseTransport):
        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            raise RuntimeError("a proxy of your own that breaks")

    with WebhookAlertSink("http://x", secret=SECRET, transport=Broken()) as sink:
        sink(ALERT)
        assert sink.flush(10)
        assert (sink.delivered, sink.failed) == (0, 1)


def test_a_verifier_refuses_a_short_secret_and_survives_a_non_ascii_signature() -> None:
    """An empty secret (an unset environment variable) would verify what anyone signs with
    it; a forged signature header beyond ASCII is a verification error, not a TypeError."""
    body = ALERT.to_json().encode()
    now = int(time.time())
    forged = {
        TIMESTAMP_HEADER: str(now),
        SIGNATURE_HEADER: sign_alert(body, secret="", timestamp=now),
    }
    with pytest.raises(ConfigurationError):
        verify_alert_signature(body, forged, secret="")
    odd = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: "v1=é"}
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify_alert_signature(body, odd, secret=SECRET)


EXIT_CHILD = """
import sys
from safe_openai import alerts
from safe_openai.alerts import Alert, WebhookAlertSink
from datetime import datetime, timezone
alerts.EXIT_TIMEOUT = float(sys.argv[2])
sink = WebhookAlertSink(sys.argv[1], secret="alert-signing-secret-0123456789", backoff=0.2)
sink(Alert("alert:strike:v1", "strike", "acme", datetime.now(timezone.utc)))
# the interpreter exits here, the sink never closed
"""


def test_alerts_queued_at_interpreter_exit_are_delivered(receiver: Receiver) -> None:
    """A script that exits right after an alert (a CLI, a job) does not lose it: the exit
    waits for the queue, here through a 503 and its retry."""
    import subprocess
    import sys

    receiver.statuses = [503]
    done = subprocess.run(
        [sys.executable, "-c", EXIT_CHILD, receiver.url, "20"], capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert len(receiver.deliveries) == 2  # the 503, then the retry that was accepted


def test_an_exit_with_the_receiver_hung_is_bounded_and_logged(receiver: Receiver) -> None:
    import subprocess
    import sys

    receiver.gate = threading.Event()
    done = subprocess.run(
        [sys.executable, "-c", EXIT_CHILD, receiver.url, "0.2"], capture_output=True, timeout=60
    )
    assert done.returncode == 0
    assert b"safe_openai.alerts_undelivered" in done.stderr


@pytest.mark.parametrize(
    "options",
    [{"tolerance": float("nan")}, {"now": float("nan")}, {"tolerance": -1.0}],
    ids=["nan-tolerance", "nan-now", "negative-tolerance"],
)
def test_a_verifier_refuses_a_tolerance_or_clock_that_cannot_compare(
    options: dict[str, float],
) -> None:
    """A NaN compares false with everything: ``tolerance=nan`` accepted a delivery stamped
    in 1970 (a replay of any age). Such settings are a configuration error."""
    alert = Alert(id="a1", kind="strike", customer_id="acme", at=datetime.now(timezone.utc))
    body = alert.to_json().encode()
    headers = {
        "X-Safe-OpenAI-Timestamp": "1",
        "X-Safe-OpenAI-Signature": sign_alert(body, secret=SECRET, timestamp=1),
    }
    with pytest.raises(ConfigurationError):
        verify_alert_signature(body, headers, secret=SECRET, **options)


@pytest.mark.parametrize("headers", [None, 42, ["not a pair"]])
def test_headers_that_are_no_headers_are_a_verification_error(headers: Any) -> None:
    with pytest.raises(WebhookVerificationError):
        verify_alert_signature(b"{}", headers, secret=SECRET)
