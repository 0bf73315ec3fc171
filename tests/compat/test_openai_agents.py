"""openai-agents runs on an AsyncSafeClient: every model call it makes is moderated first,
tagged with the customer's ``safety_identifier`` and metered, offline against FakeOpenAI.

Tracing is disabled for the whole module: agents exports traces with its own HTTP client to
``https://api.openai.com/v1/traces/ingest``, whatever base URL the model client has.
"""

from __future__ import annotations

import pytest

pytest.importorskip("agents")

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import openai
from agents import (
    Agent,
    Model,
    ModelRetrySettings,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIProvider,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    TracingProcessor,
    Usage,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_trace_processors,
    set_tracing_disabled,
)
from agents.models import _openai_shared
from agents.tracing import Span, Trace
from agents.tracing.processors import BackendSpanExporter, default_exporter
from agents.tracing.provider import DefaultTraceProvider
from agents.tracing.traces import NoOpTrace

import safe_openai
from safe_openai import AsyncSafeClient, ModerationBlocked
from safe_openai._identity import safety_identifier
from safe_openai.testing import FakeOpenAI

from ..conftest import SECRET, make_async_client

Api = Literal["responses", "chat"]
Mode = Literal["run", "streamed"]
APIS: tuple[Api, ...] = ("responses", "chat")
MODES: tuple[Mode, ...] = ("run", "streamed")

FAKE_URL = "http://fake.openai.test/v1"
# agents changes its requests for api.openai.com (store, prompt_cache_key, and usage on chat
# streams); the fake transport answers that URL too, so nothing leaves the process.
OFFICIAL_URL = "https://api.openai.com/v1"
URLS = (FAKE_URL, OFFICIAL_URL)


@pytest.fixture(autouse=True)
def _no_trace_export() -> None:
    """Never let agents start its exporter thread (it would POST to api.openai.com)."""
    set_tracing_disabled(True)


@pytest.fixture(params=URLS, ids=["fake-url", "official-url"])
def base_url(request: pytest.FixtureRequest) -> str:
    url: str = request.param
    return url


def safe_client(fake: FakeOpenAI, base_url: str = FAKE_URL) -> AsyncSafeClient:
    """An AsyncSafeClient on ``fake`` (an in-memory store), at ``base_url``."""
    kwargs = fake.async_openai_kwargs()
    kwargs["base_url"] = base_url
    return AsyncSafeClient(**kwargs, identifier_secret=SECRET, store="memory://", spool=False)


@pytest.fixture
async def safe(fake: FakeOpenAI, base_url: str) -> AsyncIterator[AsyncSafeClient]:
    async with safe_client(fake, base_url) as client:
        yield client


def model_for(api: Api, client: openai.AsyncOpenAI) -> Model:
    if api == "responses":
        return OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client)
    return OpenAIChatCompletionsModel(model="gpt-4o-mini", openai_client=client)


async def run_agent(agent: Agent[Any], text: str, mode: Mode, **kwargs: Any) -> tuple[Any, Usage]:
    """Run ``agent`` on ``text``, plain or streamed: (final output, agents' own usage)."""
    if mode == "run":
        result = await Runner.run(agent, text, **kwargs)
        return result.final_output, result.context_wrapper.usage
    streamed = Runner.run_streamed(agent, text, **kwargs)
    async for _ in streamed.stream_events():
        pass
    return streamed.final_output, streamed.context_wrapper.usage


def untrusted_texts(body: dict[str, Any]) -> list[str]:
    """The user and tool texts of a Responses or Chat Completions request body."""
    texts = []
    items: list[dict[str, Any]] = body["input"] if "input" in body else body["messages"]
    for item in items:
        if item.get("type") == "function_call_output":
            texts.append(item["output"])
        elif item.get("role") in ("user", "tool"):
            content = item["content"]
            texts.extend([content] if isinstance(content, str) else [p["text"] for p in content])
    return texts


def assert_guarded(fake: FakeOpenAI, customer: str, *, model_requests: int) -> None:
    """Every model request carries the customer's identifier, and each of its user and tool
    texts was moderated by an earlier request (the verdict cache moderates a text once).
    """
    expected = safety_identifier(SECRET.encode(), customer)
    moderated: list[str] = []
    seen = 0
    for request in fake.requests:
        assert request.json is not None
        if request.path == "/moderations":
            value = request.json["input"]
            moderated.extend([value] if isinstance(value, str) else value)
            continue
        seen += 1
        assert request.json.get("safety_identifier") == expected, request.path
        texts = untrusted_texts(request.json)
        assert texts, "a model request with no user text proves nothing"
        for text in texts:
            assert text in moderated, f"{text!r} reached {request.path} unmoderated"
    assert seen == model_requests


async def assert_metered(client: AsyncSafeClient, customer: str, endpoint: str, n: int) -> None:
    records = await client.store.usage_records(customer_id=customer)
    assert [r.outcome for r in records] == ["ok"] * n
    assert {r.endpoint for r in records} == {endpoint}
    assert all(r.tokens.input_tokens > 0 and r.tokens.output_tokens > 0 for r in records)
    [report] = await client.store.usage_report(customer_id=customer)
    assert report.requests == n and report.blocked == 0


ENDPOINT = {"responses": "/responses", "chat": "/chat/completions"}


# -- plain and streamed runs -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
async def test_a_run_is_moderated_tagged_and_metered(
    safe: AsyncSafeClient, fake: FakeOpenAI, api: Api, mode: Mode
) -> None:
    agent = Agent(
        name="support", instructions="Be brief.", model=model_for(api, safe.for_customer("acme"))
    )

    output, _ = await run_agent(agent, "Where is my parcel?", mode)

    assert output == "Echo: Where is my parcel?"
    assert [r.path for r in fake.requests] == ["/moderations", ENDPOINT[api]]
    assert fake.moderation_inputs == ["Where is my parcel?"]
    assert fake.model_requests[0].json is not None
    assert fake.model_requests[0].json.get("stream", False) is (mode == "streamed")
    assert_guarded(fake, "acme", model_requests=1)
    await assert_metered(safe, "acme", ENDPOINT[api], 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
async def test_agents_gets_the_same_result_and_usage_as_on_a_plain_client(
    safe: AsyncSafeClient, base_url: str, api: Api, mode: Mode
) -> None:
    """The guard is invisible to agents: same output, same token usage as openai.AsyncOpenAI.

    On a chat stream agents asks for usage only at api.openai.com; elsewhere SafeClient still
    asks for it (to meter) and hides the extra chunk, so agents sees no usage, as without it.
    """
    other = FakeOpenAI()
    plain_kwargs = other.async_openai_kwargs()
    plain_kwargs["base_url"] = base_url
    async with openai.AsyncOpenAI(**plain_kwargs) as plain:
        expected = await run_agent(Agent(name="a", model=model_for(api, plain)), "Hi", mode)
    got = await run_agent(
        Agent(name="a", model=model_for(api, safe.for_customer("acme"))), "Hi", mode
    )

    assert got[0] == expected[0] == "Echo: Hi"
    assert (got[1].requests, got[1].input_tokens, got[1].output_tokens) == (
        expected[1].requests,
        expected[1].input_tokens,
        expected[1].output_tokens,
    )
    hidden = api == "chat" and mode == "streamed" and base_url != OFFICIAL_URL
    assert (got[1].total_tokens == 0) is hidden


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
async def test_flagged_input_raises_moderation_blocked_and_sends_nothing(
    safe: AsyncSafeClient, fake: FakeOpenAI, api: Api, mode: Mode
) -> None:
    """agents does not wrap the error: the run raises ModerationBlocked itself."""
    agent = Agent(name="a", model=model_for(api, safe.for_customer("acme")))

    with pytest.raises(ModerationBlocked) as blocked:
        await run_agent(agent, "I will kill the courier.", mode)

    assert type(blocked.value) is ModerationBlocked
    assert "violence" in blocked.value.categories
    assert fake.model_requests == []
    assert fake.moderation_inputs == ["I will kill the courier."]
    [violation] = await safe.store.violations(customer_id="acme")
    assert violation.endpoint == ENDPOINT[api]
    [record] = await safe.store.usage_records(customer_id="acme")
    assert record.outcome == "blocked"


# -- tools -----------------------------------------------------------------------------------


def order_tool(reply: str, calls: list[str]) -> Any:
    @function_tool
    def lookup_order(order_id: str) -> str:
        """Look up an order by its id."""
        calls.append(order_id)
        return reply

    return lookup_order


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
async def test_a_function_tool_round_trip_moderates_the_tool_output(
    base_url: str, api: Api, mode: Mode
) -> None:
    fake = FakeOpenAI(tool_arguments={"order_id": "A-17"})
    calls: list[str] = []
    async with safe_client(fake, base_url) as safe:
        agent = Agent(
            name="a",
            model=model_for(api, safe.for_customer("acme")),
            tools=[order_tool("Order A-17 left the depot on Monday.", calls)],
        )

        output, _ = await run_agent(agent, "Where is order A-17?", mode)

        assert calls == ["A-17"]
        assert output == "Echo: Where is order A-17?"
        assert [r.path for r in fake.requests] == [
            "/moderations",
            ENDPOINT[api],
            "/moderations",  # the tool output, before it goes back to the model
            ENDPOINT[api],
        ]
        assert fake.moderation_inputs == [
            "Where is order A-17?",
            "Order A-17 left the depot on Monday.",
        ]
        second = fake.model_requests[1].json
        assert second is not None and "Order A-17 left the depot on Monday." in untrusted_texts(
            second
        )
        assert_guarded(fake, "acme", model_requests=2)
        await assert_metered(safe, "acme", ENDPOINT[api], 2)


@pytest.mark.parametrize("api", APIS)
async def test_a_flagged_tool_output_never_reaches_the_model(api: Api) -> None:
    fake = FakeOpenAI(tool_arguments={"order_id": "A-17"})
    async with safe_client(fake) as safe:
        agent = Agent(
            name="a",
            model=model_for(api, safe.for_customer("acme")),
            tools=[order_tool("Driver note: I will kill the next customer.", [])],
        )

        with pytest.raises(ModerationBlocked):
            await Runner.run(agent, "Where is order A-17?")

        assert len(fake.model_requests) == 1  # the call that asked for the tool
        assert fake.moderation_inputs[-1] == "Driver note: I will kill the next customer."
        assert [r.outcome for r in await safe.store.usage_records(customer_id="acme")] == [
            "blocked",
            "ok",
        ]


# -- how agents gets the client ---------------------------------------------------------------


def test_run_sync_with_the_customer_from_the_context(fake: FakeOpenAI) -> None:
    """Runner.run_sync on an unbound client, the customer set by safe_openai.customer()."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # run_sync runs on (and leaves open) the thread's default loop
    try:
        client = safe_client(fake)
        agent = Agent(name="a", model=model_for("responses", client))
        with safe_openai.customer("acme"):
            result = Runner.run_sync(agent, "Hello from a script")
        assert result.final_output == "Echo: Hello from a script"
        assert_guarded(fake, "acme", model_requests=1)
        records = loop.run_until_complete(client.store.usage_records(customer_id="acme"))
        assert [r.outcome for r in records] == ["ok"]
        loop.run_until_complete(client.close())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture
def restore_agents_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """set_default_openai_client/api are process-wide: put them back after the test."""
    monkeypatch.setattr(_openai_shared, "_default_openai_client", None)
    monkeypatch.setattr(_openai_shared, "_use_responses_by_default", True)


@pytest.mark.usefixtures("restore_agents_defaults")
@pytest.mark.parametrize("api", APIS)
async def test_set_default_openai_client_guards_agents_that_name_a_model(
    safe: AsyncSafeClient, fake: FakeOpenAI, api: Api
) -> None:
    set_default_openai_client(safe, use_for_tracing=False)
    if api == "chat":
        set_default_openai_api("chat_completions")
    agent = Agent(name="a", model="gpt-4o-mini")  # resolved by agents' default provider

    with safe_openai.customer("globex"):
        result = await Runner.run(agent, "Hello default client")

    assert result.final_output == "Echo: Hello default client"
    assert [r.path for r in fake.requests] == ["/moderations", ENDPOINT[api]]
    assert_guarded(fake, "globex", model_requests=1)
    await assert_metered(safe, "globex", ENDPOINT[api], 1)


@pytest.mark.parametrize("api", APIS)
async def test_a_per_run_provider_binds_the_customer(
    safe: AsyncSafeClient, fake: FakeOpenAI, api: Api
) -> None:
    """RunConfig(model_provider=OpenAIProvider(openai_client=...)) per customer, per run."""
    agent = Agent(name="a", model="gpt-4o-mini")
    for customer in ("acme", "globex"):
        provider = OpenAIProvider(
            openai_client=safe.for_customer(customer), use_responses=api == "responses"
        )
        await Runner.run(
            agent, f"Hello from {customer}", run_config=RunConfig(model_provider=provider)
        )

    sent = [(r.json or {}).get("safety_identifier") for r in fake.model_requests]
    assert sent == [safety_identifier(SECRET.encode(), c) for c in ("acme", "globex")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
async def test_the_with_options_copy_agents_makes_keeps_the_guard(
    safe: AsyncSafeClient, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, api: Api, mode: Mode
) -> None:
    """With runner-managed retries off (max_retries=0), agents calls the model through
    ``client.with_options(max_retries=0)``: the copy keeps the customer and the guard.
    """
    bound = safe.for_customer("acme")
    copies: list[dict[str, Any]] = []
    real_with_options = bound.with_options

    def spy(**kwargs: Any) -> AsyncSafeClient:
        copies.append(kwargs)
        return real_with_options(**kwargs)

    monkeypatch.setattr(bound, "with_options", spy)
    settings = ModelSettings(retry=ModelRetrySettings(max_retries=0))
    agent = Agent(name="a", model=model_for(api, bound), model_settings=settings)

    output, _ = await run_agent(agent, "Hello without retries", mode)

    assert output == "Echo: Hello without retries"
    assert copies and all(c == {"max_retries": 0} for c in copies)
    assert_guarded(fake, "acme", model_requests=1)
    await assert_metered(safe, "acme", ENDPOINT[api], 1)


# -- tracing: the facts the docs' warning rests on ---------------------------------------------


class Collector(TracingProcessor):
    """Keeps exported traces and spans in memory (in place of agents' network exporter)."""

    def __init__(self) -> None:
        self.exported: list[dict[str, Any]] = []

    def on_trace_start(self, trace: Trace) -> None:
        pass

    def on_trace_end(self, trace: Trace) -> None:
        self.exported.append(trace.export() or {})

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def on_span_end(self, span: Span[Any]) -> None:
        self.exported.append(span.export() or {})

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


async def test_with_tracing_on_a_blocked_chat_prompt_still_goes_into_a_trace(
    aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """Nothing reaches the model, but the generation span holds the blocked text, and agents'
    default exporter would send it to api.openai.com (here a collector replaces it).
    """
    collector = Collector()
    set_trace_processors([collector])  # drops agents' default (network) processor for good
    set_tracing_disabled(False)
    try:
        agent = Agent(name="a", model=model_for("chat", aclient.for_customer("acme")))
        with pytest.raises(ModerationBlocked):
            await Runner.run(agent, "I will kill the courier.")
    finally:
        set_tracing_disabled(True)
        set_trace_processors([])

    assert fake.model_requests == []
    spans = [s for s in collector.exported if s.get("object") == "trace.span"]
    generation = [s["span_data"] for s in spans if s["span_data"]["type"] == "generation"]
    assert generation and "I will kill the courier." in json.dumps(generation[0]["input"])


def test_the_trace_exporter_posts_to_api_openai_com_whatever_the_base_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", FAKE_URL)
    exporter = BackendSpanExporter()
    try:
        assert exporter.endpoint == "https://api.openai.com/v1/traces/ingest"
    finally:
        exporter.close()  # type: ignore[no-untyped-call]


def test_the_disable_env_var_is_read_once_per_trace_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OPENAI_AGENTS_DISABLE_TRACING is read at the first trace and then kept; set it before
    agents runs anything (or call set_tracing_disabled, which wins over it).
    """
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    provider = DefaultTraceProvider()
    assert isinstance(provider.create_trace("first"), NoOpTrace)
    monkeypatch.delenv("OPENAI_AGENTS_DISABLE_TRACING")
    assert isinstance(provider.create_trace("second"), NoOpTrace)
    provider.set_disabled(False)
    assert not isinstance(provider.create_trace("third"), NoOpTrace)


@pytest.mark.usefixtures("restore_agents_defaults")
def test_set_default_openai_client_hands_its_key_to_the_trace_exporter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = default_exporter()
    monkeypatch.setattr(exporter, "_api_key", None)
    client = openai.AsyncOpenAI(api_key="sk-for-tracing", base_url=FAKE_URL)

    set_default_openai_client(client, use_for_tracing=False)
    assert exporter._api_key is None
    set_default_openai_client(client)  # use_for_tracing defaults to True
    assert exporter._api_key == "sk-for-tracing"


# -- agents' own Responses WebSocket transport -----------------------------------------------


async def test_the_websocket_transport_is_refused_before_its_socket_opens(fake: FakeOpenAI) -> None:
    """agents' WebSocket model opens its own socket from the client's credentials, past
    ``responses.connect()``; SafeClient refuses to hand them over, so nothing is sent."""
    with fake.serve_websocket() as websocket_url:
        async with make_async_client(fake, websocket_base_url=websocket_url) as client:
            provider = OpenAIProvider(
                openai_client=client.for_customer("acme"), use_responses_websocket=True
            )
            agent = Agent(name="assistant", model="gpt-4o-mini")
            with pytest.raises(safe_openai.UnguardedPathError, match="wss:credentials"):
                await Runner.run(
                    agent, "I will kill him", run_config=RunConfig(model_provider=provider)
                )
    assert [r for r in fake.requests if r.method == "WEBSOCKET"] == []
    assert fake.model_requests == []


async def test_the_websocket_transport_opens_when_the_policy_allows_it(fake: FakeOpenAI) -> None:
    """Allowed on purpose, the socket opens and agents talks to the fake, unguarded."""

    class AllowForeignSockets(safe_openai.DefaultPolicy):
        def allow_unguarded(self, endpoint: str) -> bool:
            return endpoint == "wss:credentials"

    with fake.serve_websocket() as websocket_url:
        async with make_async_client(
            fake, websocket_base_url=websocket_url, policy=AllowForeignSockets()
        ) as client:
            provider = OpenAIProvider(
                openai_client=client.for_customer("acme"), use_responses_websocket=True
            )
            agent = Agent(name="assistant", model="gpt-4o-mini")
            result = await Runner.run(agent, "hello", run_config=RunConfig(model_provider=provider))
    assert result.final_output == "Echo: hello"
    [sent] = [r.json for r in fake.requests if r.method == "WEBSOCKET"]
    assert sent is not None and "safety_identifier" not in sent  # unguarded, as allowed
    assert fake.moderation_requests == []
