"""pydantic-ai on an AsyncSafeClient: its OpenAI models (chat and Responses) run guarded.

pydantic-ai takes the client as ``OpenAIProvider(openai_client=...)`` and calls
``chat.completions.create`` / ``responses.create`` on it (plain and ``stream=True``), or on a
``with_options`` copy when a run sets ``max_retries``. Each test checks what reached the fake
API: the user's text moderated before the model request that carries it, every model request
tagged with the customer's ``safety_identifier``, and usage recorded in the store.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import warnings
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import pytest

pytest.importorskip("pydantic_ai")

import httpx2
from pydantic import BaseModel
from pydantic_ai import Agent, BinaryContent, ModelResponse, NativeOutput
from pydantic_ai.capabilities import BatchModelRequests
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.models.openai import (
    OpenAIChatModel,
    OpenAIResponsesModel,
    OpenAIResponsesModelSettings,
    _responses_model,
)
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.run import AgentRunResultEvent

import safe_openai
from safe_openai import AsyncSafeClient, CustomerRequired, ModerationBlocked
from safe_openai._identity import safety_identifier
from safe_openai.testing import PNG_BYTES, FakeOpenAI
from safe_openai.usage import UsageRecord

from ..conftest import SECRET, make_async_client

MODEL = "gpt-4o-mini"
Kind = Literal["chat", "responses"]
KINDS: tuple[Kind, ...] = ("chat", "responses")
ENDPOINT: dict[Kind, str] = {"chat": "/chat/completions", "responses": "/responses"}


class City(BaseModel):
    name: str
    population: int


class AgentFake(FakeOpenAI):
    """FakeOpenAI plus two answers pydantic-ai needs and FakeOpenAI does not give (on the async
    transport, after FakeOpenAI has recorded and answered the request):

    - a tool call: a non-streamed chat or Responses request that offers tools gets the next
      call queued in :attr:`tool_calls` (FakeOpenAI only answers text, so a model asked for
      pydantic-ai's default structured output, a ``final_result`` tool call, never makes one);
    - a background response: ``POST /responses`` with ``background`` answers ``queued``, with
      no output and no usage, and ``GET /responses/{id}`` the finished response (FakeOpenAI
      answers every response at once and has no retrieve).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tool_calls: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(1)
        self._finished: dict[str, dict[str, Any]] = {}

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        path = request.url.path.removeprefix("/v1")
        if request.method == "GET" and path.removeprefix("/responses/") in self._finished:
            return self._json(request, self._finished[path.removeprefix("/responses/")], response)
        if (
            path not in ("/chat/completions", "/responses")
            or response.status_code != 200
            or "json" not in response.headers.get("content-type", "")  # streams are text
        ):
            return response
        body = json.loads(request.content)
        if body.get("background"):
            payload = {**response.json(), "background": True}
            self._finished[payload["id"]] = payload
            queued = {**payload, "status": "queued", "output": [], "usage": None}
            return self._json(request, queued, response)
        if not self.tool_calls or not body.get("tools"):
            return response
        name, arguments = self.tool_calls.pop(0)
        call_id = f"call_fake{next(self._ids):04d}"
        payload = response.json()
        if path == "/chat/completions":
            payload["choices"][0]["finish_reason"] = "tool_calls"
            payload["choices"][0]["message"] = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps(arguments)},
                    }
                ],
            }
        else:
            payload["output"] = [
                {
                    "type": "function_call",
                    "id": f"fc_{call_id}",
                    "call_id": call_id,
                    "name": name,
                    "arguments": json.dumps(arguments),
                    "status": "completed",
                }
            ]
        return self._json(request, payload, response)

    @staticmethod
    def _json(
        request: httpx2.Request, payload: dict[str, Any], answered: httpx2.Response
    ) -> httpx2.Response:
        headers = {"x-request-id": answered.headers.get("x-request-id", "")}
        return httpx2.Response(200, headers=headers, json=payload, request=request)


@pytest.fixture
def fake() -> AgentFake:
    """Replaces the conftest fake, so the ``aclient`` fixture is built on this one."""
    return AgentFake()


def sid(customer: str) -> str:
    return safety_identifier(SECRET.encode(), customer)


def model_for(client: AsyncSafeClient, kind: Kind) -> OpenAIChatModel | OpenAIResponsesModel:
    provider = OpenAIProvider(openai_client=client)
    if kind == "chat":
        return OpenAIChatModel(MODEL, provider=provider)
    return OpenAIResponsesModel(MODEL, provider=provider)


def assert_guarded(fake: FakeOpenAI, texts: Sequence[str], customer: str = "acme") -> None:
    """Each text was moderated before the first model request carrying it, and every model
    request carries the customer's safety identifier.
    """
    requests = fake.requests
    model_at = [i for i, r in enumerate(requests) if r.path != "/moderations" and r.method != "GET"]
    assert model_at, "no model request was sent"
    for i in model_at:
        assert (requests[i].json or {}).get("safety_identifier") == sid(customer), requests[i]
    for text in texts:
        moderated_at = [
            i
            for i, r in enumerate(requests)
            if r.path == "/moderations" and text in (r.json or {}).get("input", [])
        ]
        sent_at = [i for i in model_at if text in json.dumps(requests[i].json, ensure_ascii=False)]
        assert moderated_at, f"{text!r} was never moderated"
        assert sent_at, f"{text!r} never reached the model"
        assert moderated_at[0] < sent_at[0], f"{text!r} was sent before it was moderated"


async def records(client: AsyncSafeClient) -> list[UsageRecord]:
    """The client's usage records, oldest first."""
    return list(reversed(await client.store.usage_records()))


def assert_metered(
    found: Sequence[UsageRecord], kind: Kind, input_tokens: int, output_tokens: int
) -> None:
    """One ``ok`` record of the endpoint whose tokens are those pydantic-ai reported."""
    assert [(r.customer_id, r.endpoint, r.outcome) for r in found] == [
        ("acme", ENDPOINT[kind], "ok")
    ]
    assert found[0].request_id
    assert (found[0].tokens.input_tokens, found[0].tokens.output_tokens) == (
        input_tokens,
        output_tokens,
    )
    assert input_tokens > 0 and output_tokens > 0


# -- chat and Responses, plain and streamed ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_run_is_moderated_tagged_and_metered(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    agent = Agent(model_for(aclient.for_customer("acme"), kind), instructions="Be brief.")

    result = await agent.run("Summarise our Q3 notes.")

    assert result.output == "Echo: Summarise our Q3 notes."
    assert [r.path for r in fake.requests] == ["/moderations", ENDPOINT[kind]]
    assert fake.moderation_inputs == ["Summarise our Q3 notes."]  # instructions are not moderated
    assert_guarded(fake, ["Summarise our Q3 notes."])
    usage = result.usage
    assert_metered(await records(aclient), kind, usage.input_tokens, usage.output_tokens)


@pytest.mark.parametrize("kind", KINDS)
async def test_run_stream_is_guarded_and_metered(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    agent = Agent(model_for(aclient.for_customer("acme"), kind))

    async with agent.run_stream("Count to five.") as stream:
        text = "".join([delta async for delta in stream.stream_text(delta=True)])
    usage = stream.usage

    assert text == "Echo: Count to five."
    [sent] = fake.model_requests
    assert sent.json is not None and sent.json["stream"] is True
    if kind == "chat":  # pydantic-ai asks for the usage chunk itself, and gets it
        assert sent.json["stream_options"] == {"include_usage": True}
    assert_guarded(fake, ["Count to five."])
    assert_metered(await records(aclient), kind, usage.input_tokens, usage.output_tokens)


@pytest.mark.parametrize("kind", KINDS)
async def test_run_stream_events_is_guarded(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    agent = Agent(model_for(aclient.for_customer("acme"), kind))

    async with agent.run_stream_events("Name three colours.") as events:
        seen = [event async for event in events]

    final = seen[-1]
    assert isinstance(final, AgentRunResultEvent)
    assert final.result.output == "Echo: Name three colours."
    assert_guarded(fake, ["Name three colours."])
    usage = final.result.usage
    assert_metered(await records(aclient), kind, usage.input_tokens, usage.output_tokens)


async def test_a_stream_left_early_is_recorded_once_as_an_estimate(
    aclient: AsyncSafeClient, fake: AgentFake
) -> None:
    fake.reply = "one two three four five six seven eight nine ten " * 4
    agent = Agent(model_for(aclient.for_customer("acme"), "chat"))

    async with agent.run_stream("Count to fifty.") as stream:
        async for _ in stream.stream_text(delta=True, debounce_by=None):
            break

    [record] = await records(aclient)
    assert (record.endpoint, record.outcome) == ("/chat/completions", "estimated")
    assert record.tokens.input_tokens > 0


def test_run_sync_works_on_an_async_client(fake: AgentFake) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # run_sync drives the current event loop
    try:
        aclient = AsyncSafeClient(
            **fake.async_openai_kwargs(), identifier_secret=SECRET, store="memory://", spool=False
        )
        agent = Agent(model_for(aclient.for_customer("acme"), "chat"))

        first = agent.run_sync("Hello there")
        second = agent.run_sync("And again")

        assert (first.output, second.output) == ("Echo: Hello there", "Echo: And again")
        assert_guarded(fake, ["Hello there", "And again"])
        found = loop.run_until_complete(records(aclient))
        assert [(r.endpoint, r.outcome) for r in found] == [("/chat/completions", "ok")] * 2
        loop.run_until_complete(aclient.close())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_conversation_is_not_moderated_again_each_turn(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    agent = Agent(model_for(aclient.for_customer("acme"), kind))

    first = await agent.run("Hello there")
    second = await agent.run("And now?", message_history=first.all_messages())

    assert second.output == "Echo: And now?"
    assert fake.moderation_inputs == ["Hello there", "And now?"]  # the cache held the first turn
    later = fake.model_requests[-1]
    assert "Hello there" in json.dumps(later.json)  # though the history was sent again
    assert_guarded(fake, ["Hello there", "And now?"])
    assert [r.outcome for r in await records(aclient)] == ["ok", "ok"]


@pytest.mark.parametrize("kind", KINDS)
async def test_an_image_in_the_prompt_is_moderated(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
    fake.scores[url] = {"violence/graphic": 0.99}
    agent = Agent(model_for(aclient.for_customer("acme"), kind))

    with pytest.raises(ModerationBlocked) as caught:
        await agent.run(["Describe this.", BinaryContent(data=PNG_BYTES, media_type="image/png")])

    assert caught.value.categories == ("violence/graphic",)
    assert fake.moderation_inputs == ["Describe this.", url]
    assert fake.model_requests == []


# -- customers --------------------------------------------------------------------------------


async def test_the_customer_context_reaches_a_shared_client(
    aclient: AsyncSafeClient, fake: AgentFake
) -> None:
    agent = Agent(model_for(aclient, "responses"))  # unbound: the context names the customer

    with pytest.raises(CustomerRequired):
        await agent.run("Hello there")
    assert fake.requests == []

    with safe_openai.customer("globex"):
        await agent.run("Hello there")
        async with agent.run_stream_events("Hello again") as events:  # a background task
            _ = [event async for event in events]

    assert_guarded(fake, ["Hello there", "Hello again"], customer="globex")
    assert {r.customer_id for r in await records(aclient)} == {"globex"}

    async def ask(customer: str) -> None:
        with safe_openai.customer(customer):
            await asyncio.sleep(0)
            await agent.run(f"Question from {customer}")

    fake.reset()
    await asyncio.gather(*(ask(f"c{i}") for i in range(4)))
    for i in range(4):
        [sent] = [r for r in fake.model_requests if f"Question from c{i}" in json.dumps(r.json)]
        assert sent.json is not None and sent.json["safety_identifier"] == sid(f"c{i}")


@pytest.mark.parametrize("kind", KINDS)
async def test_max_retries_setting_copies_the_client_and_keeps_the_guard(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    # With model_settings max_retries, pydantic-ai sends through
    # client.with_options(http_client=client._client, max_retries=..., _extra_kwargs={}).
    agent = Agent(model_for(aclient.for_customer("acme"), kind))
    fake.fail(ENDPOINT[kind], 503, times=3, headers={"retry-after-ms": "1"})

    result = await agent.run("Retry me.", model_settings={"max_retries": 3})  # the SDK's is 2

    assert result.output == "Echo: Retry me."
    assert [r.path for r in fake.requests] == ["/moderations"] + [ENDPOINT[kind]] * 4
    assert_guarded(fake, ["Retry me."])
    assert [r.outcome for r in await records(aclient)] == ["ok"]  # one logical call


# -- structured output ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_native_structured_output(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    agent = Agent(model_for(aclient.for_customer("acme"), kind), output_type=NativeOutput(City))

    result = await agent.run("Tell me about Paris.")

    assert result.output == City(name="text", population=0)  # the fake's schema instance
    [sent] = fake.model_requests
    assert sent.json is not None
    fmt = sent.json["response_format"] if kind == "chat" else sent.json["text"]["format"]
    assert fmt["type"] == "json_schema"
    assert_guarded(fake, ["Tell me about Paris."])
    usage = result.usage
    assert_metered(await records(aclient), kind, usage.input_tokens, usage.output_tokens)


@pytest.mark.parametrize("kind", KINDS)
async def test_native_structured_output_streamed(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    agent = Agent(model_for(aclient.for_customer("acme"), kind), output_type=NativeOutput(City))

    async with agent.run_stream("Tell me about Lyon.") as stream:
        output = await stream.get_output()
    usage = stream.usage

    assert output == City(name="text", population=0)
    assert_guarded(fake, ["Tell me about Lyon."])
    assert_metered(await records(aclient), kind, usage.input_tokens, usage.output_tokens)


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_mode_structured_output(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    # pydantic-ai's default for output_type=City is a forced `final_result` tool call.
    fake.tool_calls.append(("final_result", {"name": "Paris", "population": 2_100_000}))
    agent = Agent(model_for(aclient.for_customer("acme"), kind), output_type=City)

    result = await agent.run("Tell me about Marseille.")

    assert result.output == City(name="Paris", population=2_100_000)
    [sent] = fake.model_requests
    assert sent.json is not None and sent.json["tool_choice"] == "required"
    assert_guarded(fake, ["Tell me about Marseille."])
    usage = result.usage
    assert_metered(await records(aclient), kind, usage.input_tokens, usage.output_tokens)


# -- tools ------------------------------------------------------------------------------------


def weather_agent(client: AsyncSafeClient, kind: Kind, forecast: str) -> Agent[None, str]:
    agent = Agent(model_for(client, kind))

    @agent.tool_plain
    def weather(city: str) -> str:
        """The forecast for a city."""
        return f"{forecast} in {city}"

    return agent


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_results_are_moderated_before_they_reach_the_model(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    fake.tool_calls.append(("weather", {"city": "Paris"}))
    agent = weather_agent(aclient.for_customer("acme"), kind, "Sunny")

    result = await agent.run("Weather in Paris?")

    assert result.output == "Echo: Weather in Paris?"
    assert [r.path for r in fake.requests] == ["/moderations", ENDPOINT[kind]] * 2
    assert fake.moderation_inputs == ["Weather in Paris?", "Sunny in Paris"]
    assert_guarded(fake, ["Weather in Paris?", "Sunny in Paris"])
    assert [r.outcome for r in await records(aclient)] == ["ok", "ok"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_flagged_tool_result_stops_the_run(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind
) -> None:
    fake.tool_calls.append(("weather", {"city": "Paris"}))
    agent = weather_agent(aclient.for_customer("acme"), kind, "A plan to kill the mayor")

    with pytest.raises(ModerationBlocked) as caught:
        await agent.run("Weather in Paris?")

    assert caught.value.categories == ("violence",)
    assert len(fake.model_requests) == 1  # the tool result never reached the model
    assert [r.outcome for r in await records(aclient)] == ["ok", "blocked"]


async def test_a_retry_prompt_echoing_flagged_model_output_is_blocked_as_the_customers(
    aclient: AsyncSafeClient, fake: AgentFake
) -> None:
    # The model answers text where a tool call was required; pydantic-ai's retry prompt quotes
    # that text back as a user message, so it is moderated as the customer's content.
    fake.reply = "The villain will kill the king."
    agent = Agent(model_for(aclient.for_customer("acme"), "chat"), output_type=City)

    with pytest.raises(ModerationBlocked):
        await agent.run("Summarise Hamlet.")

    assert len(fake.model_requests) == 1
    assert [r.outcome for r in await records(aclient)] == ["ok", "blocked"]
    [violation] = await aclient.store.violations(customer_id="acme")
    assert violation.categories == ("violence",)


# -- refusals ---------------------------------------------------------------------------------


async def _run(agent: Agent[None, str], how: str, prompt: str) -> None:
    if how == "run":
        await agent.run(prompt)
    elif how == "run_stream":
        async with agent.run_stream(prompt) as stream:
            await stream.get_output()
    elif how == "run_stream_events":
        async with agent.run_stream_events(prompt) as events:
            _ = [event async for event in events]
    else:
        async with agent.iter(prompt) as run:
            _ = [node async for node in run]


@pytest.mark.parametrize("how", ["run", "run_stream", "run_stream_events", "iter"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_flagged_prompt_raises_moderation_blocked_unwrapped(
    aclient: AsyncSafeClient, fake: AgentFake, kind: Kind, how: str
) -> None:
    agent = Agent(model_for(aclient.for_customer("acme"), kind))

    with pytest.raises(ModerationBlocked) as caught:
        await _run(agent, how, "I will kill my neighbour.")

    assert type(caught.value) is ModerationBlocked  # not a ModelAPIError or an exception group
    assert caught.value.categories == ("violence",)
    assert caught.value.endpoint == ENDPOINT[kind]
    assert fake.moderation_inputs == ["I will kill my neighbour."]
    assert fake.model_requests == []
    assert [(r.endpoint, r.outcome) for r in await records(aclient)] == [
        (ENDPOINT[kind], "blocked")
    ]


async def test_a_block_is_not_retried_nor_sent_to_a_fallback_model(
    aclient: AsyncSafeClient, fake: AgentFake
) -> None:
    acme = aclient.for_customer("acme")
    agent = Agent(
        FallbackModel(model_for(acme, "chat"), model_for(acme, "responses")),
        model_settings={"max_retries": 3},
    )

    with pytest.raises(ModerationBlocked):
        await agent.run("I will kill my neighbour.")

    # Every guarded attempt records a refusal: one record means one attempt.
    assert fake.model_requests == []
    assert len(fake.moderation_requests) == 1
    assert [(r.endpoint, r.outcome) for r in await records(aclient)] == [
        ("/chat/completions", "blocked")
    ]
    assert len(await aclient.store.violations(customer_id="acme")) == 1

    # The same agent does fall back on a model error: the fallback above was live.
    fake.fail("/chat/completions", 400)
    result = await agent.run("Hello there")
    assert result.output == "Echo: Hello there"
    assert [r.path for r in fake.model_requests][-2:] == ["/chat/completions", "/responses"]


# -- paths around the guard -------------------------------------------------------------------


async def test_the_responses_websocket_transport_is_guarded(fake: AgentFake) -> None:
    # openai_transport="websocket" sends each request as a response.create event on
    # client.responses.connect(), which safe-openai guards like POST /responses.
    with fake.serve_websocket() as websocket_url:
        async with make_async_client(fake, websocket_base_url=websocket_url) as aclient:
            agent = Agent(
                model_for(aclient.for_customer("acme"), "responses"),
                model_settings=OpenAIResponsesModelSettings(openai_transport="websocket"),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fall back to HTTP
                async with agent:
                    result = await agent.run("Hello there")
                    async with agent.run_stream("Hello again") as stream:
                        streamed = await stream.get_output()
                    with pytest.raises(ModerationBlocked):
                        await agent.run("I will kill my neighbour.")
            found = await records(aclient)

    assert (result.output, streamed) == ("Echo: Hello there", "Echo: Hello again")
    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", "/moderations"),
        ("WEBSOCKET", "/responses"),
    ] * 2 + [("POST", "/moderations")]
    assert_guarded(fake, ["Hello there", "Hello again"])
    assert [(r.endpoint, r.outcome) for r in found] == [
        ("/responses", "ok"),
        ("/responses", "ok"),
        ("/responses", "blocked"),
    ]
    usage = result.usage
    assert (found[0].tokens.input_tokens, found[0].tokens.output_tokens) == (
        usage.input_tokens,
        usage.output_tokens,
    )


@pytest.fixture
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-ai polls a background response every 2 s."""
    monkeypatch.setattr(_responses_model, "_OPENAI_BACKGROUND_POLL_INTERVAL", 0.001)


@pytest.mark.usefixtures("fast_polling")
async def test_background_responses_are_guarded(aclient: AsyncSafeClient, fake: AgentFake) -> None:
    settings = OpenAIResponsesModelSettings(openai_background=True)
    agent = Agent(model_for(aclient.for_customer("acme"), "responses"), model_settings=settings)

    result = await agent.run("Write a long essay.")

    assert result.output == "Echo: Write a long essay."
    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", "/moderations"),
        ("POST", "/responses"),
        ("GET", "/responses/resp_fake0002"),  # polled until done: passes the guard untouched
    ]
    assert_guarded(fake, ["Write a long essay."])


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="a background response's usage only comes with responses.retrieve, a GET the guard "
    "passes through: the call is recorded as an estimate with no output tokens",
)
@pytest.mark.usefixtures("fast_polling")
async def test_background_responses_are_metered_with_their_usage(
    aclient: AsyncSafeClient,
) -> None:
    settings = OpenAIResponsesModelSettings(openai_background=True)
    agent = Agent(model_for(aclient.for_customer("acme"), "responses"), model_settings=settings)

    result = await agent.run("Write a long essay.")

    usage = result.usage
    assert_metered(await records(aclient), "responses", usage.input_tokens, usage.output_tokens)


def batching() -> BatchModelRequests:
    """Batches of one request, submitted and checked at once."""
    return BatchModelRequests(
        max_requests=1,
        max_wait=timedelta(milliseconds=1),
        poll_interval=timedelta(milliseconds=5),
        max_poll_interval=timedelta(milliseconds=20),
    )


async def test_batch_requests_are_moderated_and_tagged_before_the_upload(
    aclient: AsyncSafeClient, fake: AgentFake
) -> None:
    # BatchModelRequests sends each request as a line of a Batch API input file
    # (files.create, batches.create), then polls batches.retrieve and reads the output file.
    agent = Agent(model_for(aclient.for_customer("acme"), "responses"), capabilities=[batching()])

    async def submitted() -> str:
        while not fake.batches:
            await asyncio.sleep(0.005)
        [batch_id] = fake.batches
        return batch_id

    run = asyncio.create_task(agent.run("Summarise the ledger."))
    batch_id = await asyncio.wait_for(submitted(), 5)
    fake.run_batch(batch_id)
    result = await asyncio.wait_for(run, 5)

    assert result.output == "Echo: Summarise the ledger."
    paths = [(r.method, r.path) for r in fake.requests]
    assert paths[:3] == [("POST", "/moderations"), ("POST", "/files"), ("POST", "/batches")]
    assert fake.moderation_inputs == ["Summarise the ledger."]
    [line] = fake.files[fake.batches[batch_id]["input_file_id"]]["content"].splitlines()
    assert json.loads(line)["body"]["safety_identifier"] == sid("acme")

    # pydantic-ai never asks for the batch's usage: it is recorded when the application does.
    reported = result.all_messages()[-1]
    assert isinstance(reported, ModelResponse) and reported.provider_details is not None
    [record] = await aclient.record_batch_usage(reported.provider_details["batch"]["id"])
    assert (record.customer_id, record.outcome) == ("acme", "ok")
    assert (record.tokens.input_tokens, record.tokens.output_tokens) == (
        result.usage.input_tokens,
        result.usage.output_tokens,
    )


async def test_a_flagged_batch_request_is_never_uploaded(
    aclient: AsyncSafeClient, fake: AgentFake
) -> None:
    agent = Agent(model_for(aclient.for_customer("acme"), "responses"), capabilities=[batching()])

    with pytest.raises(ModerationBlocked) as caught:
        await asyncio.wait_for(agent.run("I will kill my neighbour."), 5)

    assert caught.value.categories == ("violence",)
    assert [(r.method, r.path) for r in fake.requests] == [("POST", "/moderations")]
    assert fake.files == {}


async def test_realtime_models_cannot_take_the_clients_key(aclient: AsyncSafeClient) -> None:
    """pydantic-ai's realtime models read the client's API key to open their own socket, which
    the guard cannot watch: the client refuses to hand it over."""
    from pydantic_ai.realtime._openai_protocol import openai_websocket_auth_headers

    with pytest.raises(safe_openai.UnguardedPathError, match="wss:credentials"):
        await openai_websocket_auth_headers(aclient)
