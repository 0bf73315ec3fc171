"""OpenTelemetry: a span per guarded call with its outcome and GenAI attributes, a child span
for moderation, metrics by outcome; nothing when no provider is configured; never a broken call.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx2
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from safe_openai import (
    CustomerRequired,
    CustomerSuspended,
    DefaultPolicy,
    ModerationBlocked,
    ModerationUnavailable,
    OutputBlocked,
    Policy,
    PolicyDenied,
    Quota,
    QuotaExceeded,
    StoreError,
    UnguardedPathError,
    telemetry,
)
from safe_openai.policy import Decision, GuardedRequest
from safe_openai.testing import FakeOpenAI

from .conftest import make_async_client, make_client

HELLO = [{"role": "user", "content": "hello there"}]
PROMPT = "I will kill the build"


class Otel:
    """An SDK tracer and meter provider with in-memory exporters, given to the library."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name_prefix: str = "") -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith(name_prefix)]

    def call_spans(self) -> list[ReadableSpan]:
        return [
            s
            for s in self.spans()
            if s.instrumentation_scope.name == "safe_openai" and s.name != "safe_openai.moderation"
        ]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        found.extend(m.data.data_points)
        return found

    def count(self, metric: str, **attributes: Any) -> float:
        return sum(
            p.value
            for p in self.points(metric)
            if all(p.attributes.get(k) == v for k, v in attributes.items())
        )


@pytest.fixture
def otel() -> Iterator[Otel]:
    providers = Otel()
    telemetry.configure(
        tracer_provider=providers.tracer_provider, meter_provider=providers.meter_provider
    )
    yield providers
    telemetry.configure()


class HttpSpans(httpx2.BaseTransport):
    """Stands in for an HTTP instrumentation: a span around each request, child of whatever
    span is current when the SDK sends it."""

    def __init__(self, fake: FakeOpenAI, tracer_provider: TracerProvider) -> None:
        self.fake = fake
        self.tracer = tracer_provider.get_tracer("http-instrumentation")

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        with self.tracer.start_as_current_span(f"POST {request.url.path}"):
            return self.fake.handle_request(request)


def test_a_call_has_one_span_with_genai_attributes_parent_of_the_sdk_request(
    otel: Otel, fake: FakeOpenAI
) -> None:
    http = httpx2.Client(transport=HttpSpans(fake, otel.tracer_provider))
    with make_client(fake, http_client=http) as client:
        reply = client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=HELLO
        )
    [span] = otel.call_spans()
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == trace.SpanKind.CLIENT
    attrs = dict(span.attributes or {})
    assert attrs["safe_openai.outcome"] == "ok"
    assert attrs["safe_openai.customer_id"] == "acme"
    assert attrs["safe_openai.endpoint"] == "/chat/completions"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == reply.model
    assert attrs["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens  # type: ignore[union-attr]
    assert attrs["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert attrs["safe_openai.request_id"] == reply._request_id
    assert attrs["safe_openai.cost_usd"] > 0

    [moderation] = otel.spans("safe_openai.moderation")
    assert moderation.parent is not None and moderation.parent.span_id == span.context.span_id
    [model_http] = otel.spans("POST /v1/chat/completions")
    assert model_http.parent is not None and model_http.parent.span_id == span.context.span_id
    [moderation_http] = otel.spans("POST /v1/moderations")
    assert moderation_http.parent is not None
    assert moderation_http.parent.span_id == moderation.context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


class Denies(Policy):
    def review_request(self, request: GuardedRequest) -> Decision:
        return (
            Decision.deny("no images")
            if request.endpoint == "/images/generations"
            else super().review_request(request)
        )


class Unavailable:
    model = "omni-moderation-latest"

    def moderate(self, inputs: list[Any]) -> list[Any]:
        raise RuntimeError("moderation is down")


def test_each_refusal_kind_has_its_outcome_on_the_span_and_in_the_counter(
    otel: Otel, fake: FakeOpenAI
) -> None:
    quota = DefaultPolicy(quota=Quota(requests_per_minute=1))
    with make_client(fake, policy=quota) as client:
        acme = client.for_customer("acme")
        acme.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        with pytest.raises(QuotaExceeded):
            acme.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        with pytest.raises(ModerationBlocked):
            client.for_customer("globex").chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
            )
        client.suspend("initech", reason="testing")
        with pytest.raises(CustomerSuspended):
            client.for_customer("initech").chat.completions.create(
                model="gpt-4o-mini", messages=HELLO
            )
        with pytest.raises(CustomerRequired):
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    with make_client(fake, policy=Denies()) as client, pytest.raises(PolicyDenied):
        client.for_customer("acme").images.generate(model="gpt-image-1", prompt="a cat")
    with make_client(fake, moderator=Unavailable()) as client, pytest.raises(ModerationUnavailable):
        client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    fake.fail("/chat/completions", 500)
    with make_client(fake, max_retries=0) as client, pytest.raises(Exception, match="500"):
        client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=HELLO)

    outcomes = [s.attributes["safe_openai.outcome"] for s in otel.call_spans()]  # type: ignore[index]
    assert outcomes == [
        "ok",
        "quota_exceeded",
        "blocked",
        "suspended",
        "customer_required",
        "denied",
        "moderation_unavailable",
        "error",
    ]
    spans = {s.attributes["safe_openai.outcome"]: s for s in otel.call_spans()}  # type: ignore[index]
    assert spans["blocked"].attributes["safe_openai.customer_id"] == "globex"  # type: ignore[index]
    assert spans["blocked"].attributes["safe_openai.categories"] == ("violence",)  # type: ignore[index]
    assert spans["blocked"].status.status_code == trace.StatusCode.UNSET  # the guard did its job
    assert spans["error"].status.status_code == trace.StatusCode.ERROR
    assert spans["error"].attributes["error.type"] == "InternalServerError"  # type: ignore[index]
    assert spans["moderation_unavailable"].status.status_code == trace.StatusCode.ERROR
    assert spans["denied"].name == "images.generate gpt-image-1"
    assert spans["denied"].attributes["gen_ai.operation.name"] == "images.generate"  # type: ignore[index]
    assert any(
        p.attributes.get("error.type") == "ModerationUnavailable"
        for p in otel.points("safe_openai.moderation.duration")
    )
    [failed_moderation] = [
        s
        for s in otel.spans("safe_openai.moderation")
        if s.status.status_code == trace.StatusCode.ERROR
    ]
    assert failed_moderation.attributes["error.type"] == "ModerationUnavailable"  # type: ignore[index]

    for outcome in set(outcomes):
        assert otel.count("safe_openai.requests", **{"safe_openai.outcome": outcome}) == 1, outcome
    assert (
        otel.count(
            "safe_openai.requests",
            **{
                "safe_openai.outcome": "ok",
                "gen_ai.request.model": "gpt-4o-mini",
                "safe_openai.endpoint": "/chat/completions",
            },
        )
        == 1
    )
    assert otel.count("safe_openai.tokens", **{"gen_ai.token.type": "input"}) > 0
    assert otel.count("safe_openai.tokens", **{"gen_ai.token.type": "output"}) > 0
    assert otel.count("safe_openai.cost") > 0
    [overhead] = [
        p
        for p in otel.points("safe_openai.guard.duration")
        if p.attributes["safe_openai.outcome"] == "ok"
    ]
    assert overhead.count == 1 and overhead.sum > 0
    assert sum(p.count for p in otel.points("safe_openai.moderation.duration")) >= 3


def test_strikes_and_suspensions_are_events_of_the_span(otel: Otel, fake: FakeOpenAI) -> None:
    policy = DefaultPolicy(strike_limit=1, suspension=timedelta(hours=1))
    with make_client(fake, policy=policy) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
        )
    [span] = otel.call_spans()
    events = {e.name: dict(e.attributes or {}) for e in span.events}
    assert events["safe_openai.strike_recorded"]["categories"] == ("violence",)
    assert events["safe_openai.customer_suspended"]["customer_id"] == "acme"
    assert "safe_openai.request_blocked" in events
    assert "safe_openai.request_allowed" not in events  # debug events stay out


def test_no_prompt_or_output_text_in_any_attribute(otel: Otel, fake: FakeOpenAI) -> None:
    policy = DefaultPolicy(strike_limit=1)
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")
        acme.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "secret plans"}]
        )
        with pytest.raises(ModerationBlocked):
            acme.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
            )
    text = repr([(s.attributes, [(e.name, e.attributes) for e in s.events]) for s in otel.spans()])
    text += repr(otel.reader.get_metrics_data())
    for secret in ("secret plans", "Echo", "kill the build"):
        assert secret not in text


def test_customers_are_on_metrics_only_when_asked(fake: FakeOpenAI) -> None:
    for opted in (False, True):
        providers = Otel()
        telemetry.configure(
            tracer_provider=providers.tracer_provider,
            meter_provider=providers.meter_provider,
            customer_metrics=opted,
        )
        try:
            with make_client(fake) as client:
                client.for_customer("acme").chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO
                )
        finally:
            telemetry.configure()
        keys = {k for p in providers.points("safe_openai.requests") for k in p.attributes}
        assert ("safe_openai.customer_id" in keys) is opted


def test_a_stream_has_its_usage_on_the_span_when_it_ends(otel: Otel, fake: FakeOpenAI) -> None:
    with make_client(fake) as client:
        stream = client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True
        )
        assert otel.call_spans() == []  # still open while the stream is read
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    [span] = otel.call_spans()
    attrs = dict(span.attributes or {})
    assert text and attrs["safe_openai.outcome"] == "ok"
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini"


def test_an_abandoned_stream_ends_its_span_with_an_estimate(otel: Otel, fake: FakeOpenAI) -> None:
    with make_client(fake) as client:
        stream = client.for_customer("acme").responses.create(
            model="gpt-4o-mini", input="hello there", stream=True
        )
        next(iter(stream))
        stream.close()
    [span] = otel.call_spans()
    assert span.name == "chat gpt-4o-mini"
    assert span.attributes["safe_openai.outcome"] == "estimated"  # type: ignore[index]


async def test_the_async_client_has_the_same_spans(otel: Otel, fake: FakeOpenAI) -> None:
    async with make_async_client(fake) as client:
        acme = client.for_customer("acme")
        await acme.embeddings.create(model="text-embedding-3-small", input="hello")
        with pytest.raises(ModerationBlocked):
            await acme.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
            )
        stream = await acme.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True
        )
        async for _ in stream:
            pass
    spans = otel.call_spans()
    assert [(s.name, s.attributes["safe_openai.outcome"]) for s in spans] == [  # type: ignore[index]
        ("embeddings text-embedding-3-small", "ok"),
        ("chat gpt-4o-mini", "blocked"),
        ("chat gpt-4o-mini", "ok"),
    ]
    assert spans[2].attributes["gen_ai.usage.output_tokens"] > 0  # type: ignore[index,operator]
    assert len(otel.spans("safe_openai.moderation")) == 3


class Raising(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        raise RuntimeError("broken processor")

    def on_end(self, span: Any) -> None:
        raise RuntimeError("broken exporter")


def test_a_raising_span_processor_never_breaks_a_call(fake: FakeOpenAI) -> None:
    provider = TracerProvider()
    provider.add_span_processor(Raising())
    telemetry.configure(tracer_provider=provider)
    try:
        with make_client(fake) as client:
            acme = client.for_customer("acme")
            reply = acme.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            with pytest.raises(ModerationBlocked):
                acme.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
                )
            stream = acme.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream)
            assert len(client.store.usage_records(customer_id="acme")) == 3
    finally:
        telemetry.configure()
    assert reply.choices[0].message.content


def test_without_a_provider_nothing_is_recorded(fake: FakeOpenAI) -> None:
    """The global providers are the API's proxies here: no watch is made for a call."""
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        flow = acme._begin(  # type: ignore[attr-defined]
            _options(), "/chat/completions"
        )
        assert flow is not None and flow[1].__name__ == "begin"  # the guard's own flow, unwrapped


def _options() -> Any:
    from openai._models import FinalRequestOptions

    return FinalRequestOptions.construct(
        method="post", url="/chat/completions", json_data={"model": "m", "messages": HELLO}
    )


def _run(*parts: str) -> subprocess.CompletedProcess[str]:
    """Run the parts (each dedented) as one program in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SAFE_OPENAI_", "OTEL_"))}
    source = "\n".join(textwrap.dedent(part) for part in parts)
    return subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=False,
    )


APP = """
from safe_openai import SafeClient
from safe_openai.testing import FakeOpenAI

fake = FakeOpenAI()
client = SafeClient(**fake.openai_kwargs(), identifier_secret="test-identifier-secret", store="memory://", spool=False)
reply = client.for_customer("acme").chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
)
print(reply.choices[0].message.content)
"""


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ModerationBlocked("acme", categories=("violence",), scores={}, endpoint="/x"), "blocked"),
        (CustomerSuspended("acme", until=None, reason="r"), "suspended"),
        (QuotaExceeded("acme", limit="requests_per_minute", retry_after=None), "quota_exceeded"),
        (PolicyDenied("acme", Decision.deny("no")), "denied"),
        (ModerationUnavailable("down"), "moderation_unavailable"),
        (CustomerRequired("/chat/completions"), "customer_required"),
        (StoreError("down"), "store_unavailable"),
        (UnguardedPathError("no"), "unguarded"),
        (asyncio.CancelledError(), "cancelled"),
        (GeneratorExit(), "cancelled"),
        (RuntimeError("boom"), "error"),
    ],
)
def test_each_error_has_its_outcome(error: BaseException, outcome: str) -> None:
    assert telemetry.outcome_of(error) == outcome


def test_a_stream_dropped_unread_ends_its_span(otel: Otel, fake: FakeOpenAI) -> None:
    with make_client(fake) as client:
        stream = client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True
        )
        del stream
        gc.collect()
        [span] = otel.call_spans()
    assert span.attributes["safe_openai.outcome"] == "estimated"  # type: ignore[index]


def test_a_global_tracer_provider_is_found_on_its_own() -> None:
    done = _run(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        """,
        APP,
        """
        print(sorted(s.name for s in exporter.get_finished_spans()))
        data = reader.get_metrics_data()
        names = {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
        print(sorted(names))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "Echo: hello\n['chat gpt-4o-mini', 'safe_openai.moderation']\n"
        "['safe_openai.cost', 'safe_openai.guard.duration', 'safe_openai.moderation.duration', "
        "'safe_openai.requests', 'safe_openai.tokens']\n"
    )


def test_without_opentelemetry_installed_calls_work_and_nothing_imports_it() -> None:
    done = _run(
        """
        import sys

        class NoOtel:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, NoOtel())
        """,
        APP,
        'print(any(m.startswith("opentelemetry") for m in sys.modules))',
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Echo: hello\nFalse\n"


def test_a_call_the_sdk_refuses_before_sending_ends_its_span_as_an_error(
    otel: Otel, fake: FakeOpenAI
) -> None:
    with make_client(fake) as client, pytest.raises(ValueError, match="JSON"):
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, temperature=float("nan")
        )
    [span] = otel.call_spans()
    assert span.attributes["safe_openai.outcome"] == "error"  # type: ignore[index]
    assert span.attributes["error.type"] == "ValueError"  # type: ignore[index]
    assert "gen_ai.usage.input_tokens" not in span.attributes  # type: ignore[operator]


async def test_a_cancelled_call_ends_its_span(otel: Otel) -> None:
    slow = FakeOpenAI(delay=0.5)
    async with make_async_client(slow) as client:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                client.for_customer("acme").chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO
                ),
                0.05,
            )
    [span] = otel.call_spans()
    assert span.attributes["safe_openai.outcome"] == "cancelled"  # type: ignore[index]
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.parametrize("stream", [False, True])
def test_blocked_output_is_the_outcome_with_its_moderation_span(otel: Otel, stream: bool) -> None:
    fake = FakeOpenAI(reply="Sure. I will kill you.")
    policy = DefaultPolicy(output_moderation="block")
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")

        def ask() -> None:
            if stream:
                chunks = acme.chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO, stream=True
                )
                for _ in chunks:
                    pass
            else:
                acme.chat.completions.create(model="gpt-4o-mini", messages=HELLO)

        with pytest.raises(OutputBlocked):
            ask()
    [span] = otel.call_spans()
    attrs = dict(span.attributes or {})
    assert attrs["safe_openai.outcome"] == "output_blocked"
    assert attrs["safe_openai.categories"] == ("violence",)
    assert attrs["gen_ai.usage.output_tokens"] > 0  # the answer was paid for
    assert span.status.status_code == trace.StatusCode.UNSET
    moderations = otel.spans("safe_openai.moderation")
    assert len(moderations) == 2  # the input, then the output
    assert all(
        m.parent is not None and m.parent.span_id == span.context.span_id for m in moderations
    )
    assert "safe_openai.output_flagged" in {e.name for e in span.events}
    assert otel.count("safe_openai.requests", **{"safe_openai.outcome": "output_blocked"}) == 1


def test_a_websocket_response_has_its_span_until_it_completes(otel: Otel, fake: FakeOpenAI) -> None:
    with fake.serve_websocket() as url, make_client(fake, websocket_base_url=url) as client:
        acme = client.for_customer("acme")
        with acme.responses.connect() as connection:
            connection.response.create(model="gpt-4o-mini", input="hello over the socket")
            for event in connection:
                if event.type == "response.completed":
                    break
            with pytest.raises(ModerationBlocked):
                connection.response.create(model="gpt-4o-mini", input=PROMPT)
    spans = otel.call_spans()
    assert [(s.name, s.attributes["safe_openai.outcome"]) for s in spans] == [  # type: ignore[index]
        ("chat gpt-4o-mini", "ok"),
        ("chat gpt-4o-mini", "blocked"),
    ]
    assert spans[0].attributes["safe_openai.customer_id"] == "acme"  # type: ignore[index]
    assert spans[0].attributes["gen_ai.usage.output_tokens"] > 0  # type: ignore[index,operator]


async def test_moderation_overlapped_with_the_store_has_its_span(
    otel: Otel, fake: FakeOpenAI
) -> None:
    """The async client runs the store's first round trip beside moderation (``Together``)."""
    quota = DefaultPolicy(quota=Quota(requests_per_minute=10))
    async with make_async_client(fake, policy=quota) as client:
        await client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=HELLO
        )
    async with make_async_client(fake, policy=quota, moderator=Unavailable()) as client:
        with pytest.raises(ModerationUnavailable):
            await client.for_customer("acme").chat.completions.create(
                model="gpt-4o-mini", messages=HELLO
            )
    ok, unavailable = otel.call_spans()
    assert ok.attributes["safe_openai.outcome"] == "ok"  # type: ignore[index]
    assert unavailable.attributes["safe_openai.outcome"] == "moderation_unavailable"  # type: ignore[index]
    first, second = otel.spans("safe_openai.moderation")
    assert first.parent.span_id == ok.context.span_id  # type: ignore[union-attr]
    assert first.status.status_code == trace.StatusCode.UNSET
    assert second.parent.span_id == unavailable.context.span_id  # type: ignore[union-attr]
    assert second.status.status_code == trace.StatusCode.ERROR
