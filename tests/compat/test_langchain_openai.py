"""langchain-openai on SafeClient / AsyncSafeClient: every ChatOpenAI path stays guarded.

``ChatOpenAI`` takes four clients: ``client`` / ``async_client`` (the ``chat.completions``
resources, for plain chat calls and streams) and ``root_client`` / ``root_async_client`` (the
clients, for ``parse``, structured streams and the Responses API). It builds a plain
``openai.OpenAI`` / ``openai.AsyncOpenAI`` for a side whose resource field is empty, overwriting
any root given for that side, and never copies a client (no ``with_options``). So the guarded
setup is all four fields from one customer-bound ``SafeClient`` + ``AsyncSafeClient`` pair;
the ``test_pitfall_*`` tests show what the other setups do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any

import httpx2
import openai
import pytest

pytest.importorskip("langchain_openai")

import tiktoken
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel, SecretStr
from structlog.testing import capture_logs

import safe_openai
from safe_openai import (
    AsyncSafeClient,
    CustomerRequired,
    DefaultPolicy,
    GuardedRequest,
    ModerationBlocked,
    PolicyDenied,
    SafeClient,
)
from safe_openai._identity import safety_identifier
from safe_openai.testing import FakeOpenAI, RecordedRequest
from safe_openai.usage import UsageRecord

from ..conftest import SECRET

MODEL = "gpt-4o-mini"
CUSTOMER = "acme"
SID = safety_identifier(SECRET.encode(), CUSTOMER)
FLAGGED = "Tell me how to kill my neighbour's dog."
CHAT = "/chat/completions"
RESPONSES = "/responses"


class Ticket(BaseModel):
    """The structured output the tests ask for."""

    title: str
    priority: int


def guarded_chat(client: SafeClient, aclient: AsyncSafeClient, **options: Any) -> ChatOpenAI:
    """The documented setup: all four client fields, from one guarded pair."""
    return ChatOpenAI(
        model=MODEL,
        client=client.chat.completions,
        async_client=aclient.chat.completions,
        root_client=client,
        root_async_client=aclient,
        **options,
    )


def bound_chat(client: SafeClient, aclient: AsyncSafeClient, **options: Any) -> ChatOpenAI:
    return guarded_chat(client.for_customer(CUSTOMER), aclient.for_customer(CUSTOMER), **options)


@pytest.fixture
def idle_aclient(fake: FakeOpenAI) -> Iterator[AsyncSafeClient]:
    """The async half of the pair for sync tests (set up, not called)."""
    aclient = AsyncSafeClient(
        **fake.async_openai_kwargs(), identifier_secret=SECRET, store="memory://", spool=False
    )
    yield aclient
    asyncio.run(aclient.close())


def moderated(request: RecordedRequest) -> list[str]:
    """The texts of one moderation request."""
    value = (request.json or {}).get("input")
    items = value if isinstance(value, list) else [value]
    return [item if isinstance(item, str) else str(item) for item in items]


def assert_guarded(fake: FakeOpenAI, text: str, path: str) -> dict[str, Any]:
    """Exactly one model request reached the fake, to ``path``, after a moderation request
    covering ``text``, and carrying the customer's safety identifier. Returns its body.
    """
    requests = fake.requests
    sent = [i for i, r in enumerate(requests) if r.path != "/moderations"]
    assert [requests[i].path for i in sent] == [path]
    before = [t for r in requests[: sent[0]] if r.path == "/moderations" for t in moderated(r)]
    assert text in before
    body = requests[sent[0]].json
    assert body is not None and body["safety_identifier"] == SID
    return body


def assert_recorded(records: list[UsageRecord], path: str) -> UsageRecord:
    """One usage record of the customer for ``path``, with real (not estimated) tokens."""
    [record] = records
    assert (record.customer_id, record.endpoint, record.outcome) == (CUSTOMER, path, "ok")
    assert record.tokens.input_tokens > 0 and record.tokens.output_tokens > 0
    return record


# -- the calls, sync and async, on either API ----------------------------------------------

SyncCall = Callable[[ChatOpenAI, str], Any]
AsyncCall = Callable[[ChatOpenAI, str], Awaitable[Any]]


def _stream(llm: ChatOpenAI, text: str) -> str:
    return "".join(chunk.text for chunk in llm.stream(text))


async def _astream(llm: ChatOpenAI, text: str) -> str:
    return "".join([chunk.text async for chunk in llm.astream(text)])


async def _ainvoke(llm: ChatOpenAI, text: str) -> Any:
    return await llm.ainvoke(text)


async def _aparse(llm: ChatOpenAI, text: str) -> Any:
    return await llm.with_structured_output(Ticket, method="json_schema").ainvoke(text)


SYNC_CALLS: dict[str, SyncCall] = {
    "invoke": lambda llm, text: llm.invoke(text),
    "stream": _stream,
    "parse": lambda llm, text: llm.with_structured_output(Ticket, method="json_schema").invoke(
        text
    ),
}
ASYNC_CALLS: dict[str, AsyncCall] = {"ainvoke": _ainvoke, "astream": _astream, "aparse": _aparse}
APIS = {"chat": (False, CHAT), "responses": (True, RESPONSES)}


def check_result(how: str, result: Any, text: str) -> None:
    if how.endswith("parse"):
        assert isinstance(result, Ticket)
    elif how.endswith("stream"):
        assert result == f"Echo: {text}"
    else:
        assert isinstance(result, AIMessage) and result.text == f"Echo: {text}"


def check_body(how: str, api: str, body: dict[str, Any]) -> None:
    """Structured output went out as a json_schema request (``parse``), streams as streams."""
    if how.endswith("parse"):
        if api == "chat":
            fmt = body["response_format"]
            assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Ticket"
        else:
            fmt = body["text"]["format"]
            assert fmt["type"] == "json_schema" and fmt["name"] == "Ticket"
    assert body.get("stream", False) is how.endswith("stream")


# -- guarded calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", SYNC_CALLS)
@pytest.mark.parametrize("api", APIS)
def test_sync_calls_are_moderated_tagged_and_metered(
    how: str, api: str, client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    use_responses, path = APIS[api]
    llm = bound_chat(client, idle_aclient, use_responses_api=use_responses)
    text = f"Summarise ticket 42 ({how}, {api})."

    result = SYNC_CALLS[how](llm, text)

    check_result(how, result, text)
    check_body(how, api, assert_guarded(fake, text, path))
    record = assert_recorded(client.store.usage_records(), path)
    if how == "invoke":  # the store holds what the API reported
        assert isinstance(result, AIMessage) and result.usage_metadata is not None
        assert record.tokens.input_tokens == result.usage_metadata["input_tokens"]
        assert record.tokens.output_tokens == result.usage_metadata["output_tokens"]


@pytest.mark.parametrize("how", ASYNC_CALLS)
@pytest.mark.parametrize("api", APIS)
async def test_async_calls_are_moderated_tagged_and_metered(
    how: str, api: str, client: SafeClient, aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    use_responses, path = APIS[api]
    llm = bound_chat(client, aclient, use_responses_api=use_responses)
    text = f"Summarise ticket 43 ({how}, {api})."

    result = await ASYNC_CALLS[how](llm, text)

    check_result(how, result, text)
    check_body(how, api, assert_guarded(fake, text, path))
    assert_recorded(await aclient.store.usage_records(), path)
    assert client.store.usage_records() == []  # the sync side was not used


# langchain model_dumps the SDK's stream events, whose ``parsed`` field warns (plain SDK too).
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
def test_a_structured_stream_goes_through_the_sdk_stream_helper(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """Chat structured output streamed: ``root_client.beta.chat.completions.stream``."""
    structured = bound_chat(client, idle_aclient).with_structured_output(
        Ticket, method="json_schema"
    )
    assert list(structured.stream("Stream the ticket.")) == [Ticket(title="text", priority=0)]
    body = assert_guarded(fake, "Stream the ticket.", CHAT)
    assert body["stream"] is True and body["response_format"]["type"] == "json_schema"
    assert_recorded(client.store.usage_records(), CHAT)


def test_chat_stream_usage_is_recorded_whether_or_not_langchain_asks(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """With custom clients ChatOpenAI leaves ``stream_usage`` off: safe-openai still asks for
    usage and hides the extra chunk. With ``stream_usage=True`` langchain gets its chunk."""
    llm = bound_chat(client, idle_aclient)
    assert llm.stream_usage is None

    silent = list(llm.stream("First streamed question."))
    assert all(chunk.usage_metadata is None for chunk in silent)
    body = assert_guarded(fake, "First streamed question.", CHAT)
    assert body["stream_options"] == {"include_usage": True}
    assert_recorded(client.store.usage_records(), CHAT)

    fake.reset()
    asked = list(llm.stream("Second streamed question.", stream_usage=True))
    usage = [chunk.usage_metadata for chunk in asked if chunk.usage_metadata]
    assert len(usage) == 1
    assert_guarded(fake, "Second streamed question.", CHAT)
    record = client.store.usage_records()[0]
    assert record.outcome == "ok"
    assert (record.tokens.input_tokens, record.tokens.output_tokens) == (
        usage[0]["input_tokens"],
        usage[0]["output_tokens"],
    )


@pytest.mark.parametrize("api", APIS)
def test_streams_read_through_raw_responses_record_usage_once(
    api: str, client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """``include_response_headers`` streams through ``with_raw_response`` + ``parse()``."""
    use_responses, path = APIS[api]
    llm = bound_chat(
        client, idle_aclient, use_responses_api=use_responses, include_response_headers=True
    )
    chunks = list(llm.stream("Headers too, please."))
    assert chunks[0].response_metadata["headers"]["x-request-id"] == "req_0002"
    assert "".join(c.text for c in chunks) == "Echo: Headers too, please."
    assert_guarded(fake, "Headers too, please.", path)
    assert assert_recorded(client.store.usage_records(), path).request_id == "req_0002"


def test_an_abandoned_stream_records_an_estimate(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    chunks = bound_chat(client, idle_aclient).stream("Stream a long answer, please.")
    assert isinstance(chunks, Generator)
    next(chunks)
    chunks.close()
    [record] = client.store.usage_records()
    assert (record.outcome, record.tokens.output_tokens) == ("estimated", 0)
    assert record.tokens.input_tokens > 0


# -- refused calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", SYNC_CALLS)
@pytest.mark.parametrize("api", APIS)
def test_sync_flagged_input_raises_moderation_blocked_and_sends_nothing(
    how: str, api: str, client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    use_responses, path = APIS[api]
    llm = bound_chat(client, idle_aclient, use_responses_api=use_responses)

    with pytest.raises(ModerationBlocked) as caught:  # langchain lets it through unwrapped
        SYNC_CALLS[how](llm, FLAGGED)

    assert type(caught.value) is ModerationBlocked
    assert caught.value.endpoint == path and caught.value.categories == ("violence",)
    assert fake.model_requests == [] and fake.moderation_inputs == [FLAGGED]
    [record] = client.store.usage_records()
    assert record.outcome == "blocked"
    assert len(client.store.violations(customer_id=CUSTOMER)) == 1


@pytest.mark.parametrize("how", ASYNC_CALLS)
@pytest.mark.parametrize("api", APIS)
async def test_async_flagged_input_raises_moderation_blocked_and_sends_nothing(
    how: str, api: str, client: SafeClient, aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    use_responses, path = APIS[api]
    llm = bound_chat(client, aclient, use_responses_api=use_responses)

    with pytest.raises(ModerationBlocked) as caught:
        await ASYNC_CALLS[how](llm, FLAGGED)

    assert type(caught.value) is ModerationBlocked and caught.value.endpoint == path
    assert fake.model_requests == [] and fake.moderation_inputs == [FLAGGED]
    assert [r.outcome for r in await aclient.store.usage_records()] == ["blocked"]


@pytest.mark.parametrize("api", APIS)
def test_a_flagged_tool_result_is_blocked(
    api: str, client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """langchain sends ToolMessages as ``tool`` messages / ``function_call_output`` items."""
    use_responses, path = APIS[api]
    llm = bound_chat(client, idle_aclient, use_responses_api=use_responses)
    messages: list[BaseMessage] = [
        HumanMessage("What does the forum say?"),
        AIMessage("", tool_calls=[{"name": "forum", "args": {}, "id": "call_1"}]),
        ToolMessage(FLAGGED, tool_call_id="call_1"),
    ]
    with pytest.raises(ModerationBlocked) as caught:
        llm.invoke(messages)
    assert caught.value.endpoint == path
    assert fake.model_requests == []
    assert fake.moderation_inputs == ["What does the forum say?", FLAGGED]


def test_a_conversation_moderates_each_text_once(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """langchain resends the history every turn; the verdict cache moderates only what is new."""
    llm = bound_chat(client, idle_aclient)
    first = llm.invoke([HumanMessage("Where is my order?")])
    llm.invoke([HumanMessage("Where is my order?"), first, HumanMessage("And the invoice?")])

    assert [r.path for r in fake.requests] == ["/moderations", CHAT, "/moderations", CHAT]
    assert [moderated(r) for r in fake.moderation_requests] == [
        ["Where is my order?"],
        ["And the invoice?"],
    ]
    assert [(r.json or {})["safety_identifier"] for r in fake.model_requests] == [SID, SID]
    assert len(client.store.usage_records()) == 2


def test_the_customer_can_come_from_the_context_even_in_batch_threads(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """One ChatOpenAI on unbound clients; ``batch`` runs in threads that copy the context."""
    llm = guarded_chat(client, idle_aclient)
    with pytest.raises(CustomerRequired):
        llm.invoke("Nobody is bound.")
    assert fake.requests == []

    with safe_openai.customer("globex"):
        replies = llm.batch(["One?", "Two?", "Three?"])

    assert [r.text for r in replies] == ["Echo: One?", "Echo: Two?", "Echo: Three?"]
    globex = safety_identifier(SECRET.encode(), "globex")
    assert [(r.json or {})["safety_identifier"] for r in fake.model_requests] == [globex] * 3
    assert {r.customer_id for r in client.store.usage_records()} == {"globex"}


# -- the setups: the documented one and the pitfalls ----------------------------------------


def test_the_documented_setup_keeps_all_four_clients(
    client: SafeClient,
    idle_aclient: AsyncSafeClient,
    fake: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # no key needed: nothing is built
    acme, aacme = client.for_customer(CUSTOMER), idle_aclient.for_customer(CUSTOMER)
    llm = guarded_chat(acme, aacme)
    assert llm.root_client is acme and llm.client is acme.chat.completions
    assert llm.root_async_client is aacme and llm.async_client is aacme.chat.completions


async def test_pitfall_the_sync_pair_alone_leaves_async_calls_unguarded(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    """Only ``client`` + ``root_client``: ChatOpenAI builds a plain AsyncOpenAI for the async
    side (from OPENAI_API_KEY in production; here pointed at the fake), so ``ainvoke`` sends a
    flagged text unmoderated and untagged while ``invoke`` on the same model blocks it."""
    acme = client.for_customer(CUSTOMER)
    async with httpx2.AsyncClient(transport=fake) as plain_http:
        llm = ChatOpenAI(
            model=MODEL,
            client=acme.chat.completions,
            root_client=acme,
            api_key=SecretStr("sk-test"),
            base_url="http://fake.openai.test/v1",
            http_async_client=plain_http,
        )
        assert type(llm.root_async_client) is openai.AsyncOpenAI
        assert not isinstance(llm.root_async_client, AsyncSafeClient)

        with pytest.raises(ModerationBlocked):
            llm.invoke(FLAGGED)
        assert fake.model_requests == []

        await llm.ainvoke(FLAGGED)

    assert [r.path for r in fake.requests] == ["/moderations", CHAT]  # no moderation for it
    assert "safety_identifier" not in (fake.model_requests[0].json or {})


def test_pitfall_root_clients_alone_are_replaced_by_plain_ones(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """``root_client`` without ``client``: ChatOpenAI builds and assigns a new plain root."""
    acme, aacme = client.for_customer(CUSTOMER), idle_aclient.for_customer(CUSTOMER)
    with httpx2.Client(transport=fake) as plain_http:
        llm = ChatOpenAI(
            model=MODEL,
            root_client=acme,
            root_async_client=aacme,
            api_key=SecretStr("sk-test"),
            base_url="http://fake.openai.test/v1",
            http_client=plain_http,
        )
        assert llm.root_client is not acme and type(llm.root_client) is openai.OpenAI
        assert type(llm.root_async_client) is openai.AsyncOpenAI

        llm.invoke(FLAGGED)

    assert [r.path for r in fake.requests] == [CHAT]
    assert "safety_identifier" not in (fake.requests[0].json or {})


def test_pitfall_resources_alone_break_parse_and_responses(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """``client`` + ``async_client`` without roots: plain chat works (guarded); ``parse`` and
    the Responses API need the roots and fail before sending anything."""
    acme, aacme = client.for_customer(CUSTOMER), idle_aclient.for_customer(CUSTOMER)
    resources: dict[str, Any] = {
        "client": acme.chat.completions,
        "async_client": aacme.chat.completions,
    }
    llm = ChatOpenAI(model=MODEL, **resources)
    assert llm.root_client is None and llm.root_async_client is None

    llm.invoke("Plain chat still works.")
    assert_guarded(fake, "Plain chat still works.", CHAT)

    fake.reset()
    with pytest.raises(AttributeError, match="NoneType"):
        llm.with_structured_output(Ticket, method="json_schema").invoke("Structured.")
    with pytest.raises(AttributeError, match="NoneType"):
        ChatOpenAI(model=MODEL, use_responses_api=True, **resources).invoke("Responses.")
    assert fake.requests == []


# -- langchain's own retries and fallbacks -------------------------------------------------


def test_with_retry_retries_a_block_but_it_is_one_strike(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """``with_retry()`` retries every exception 3 times by default; the same blocked text from
    the same customer within ``Policy.repeat_strike_window`` is one strike, so the retries do
    not suspend the customer."""
    llm = bound_chat(client, idle_aclient)
    with pytest.raises(ModerationBlocked):
        llm.with_retry(wait_exponential_jitter=False).invoke(FLAGGED)
    assert len(client.store.violations(customer_id=CUSTOMER)) == 1
    blocked = [r for r in client.store.usage_records() if r.outcome == "blocked"]
    assert len(blocked) == 3  # it was retried: three refusals
    assert fake.model_requests == [] and len(fake.moderation_requests) == 1  # cached verdict
    assert llm.invoke("An innocent question.").text == "Echo: An innocent question."


def test_retrying_only_api_errors_keeps_one_violation(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """safe-openai's refusals are ``openai.OpenAIError`` but not ``openai.APIError``."""
    llm = bound_chat(client, idle_aclient).with_retry(
        retry_if_exception_type=(openai.APIError,), wait_exponential_jitter=False
    )
    with pytest.raises(ModerationBlocked):
        llm.invoke(FLAGGED)
    assert len(client.store.violations(customer_id=CUSTOMER)) == 1

    # An API error is still retried: the SDK's 3 attempts fail, langchain's second run passes.
    fake.fail(CHAT, 500, times=3, headers={"retry-after-ms": "1"})
    assert llm.invoke("Try again.").text == "Echo: Try again."
    assert [r.path for r in fake.model_requests] == [CHAT] * 4


def test_pitfall_with_fallbacks_sends_the_blocked_text_to_the_fallback(
    client: SafeClient, idle_aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    """``with_fallbacks()`` handles every exception by default: a blocked message goes on to
    the fallback model, unguarded if that model is not on a SafeClient."""
    with httpx2.Client(transport=fake) as plain_http:
        plain = openai.OpenAI(
            api_key="sk-test", base_url="http://fake.openai.test/v1", http_client=plain_http
        )
        backup = ChatOpenAI(
            model="gpt-4o",
            client=plain.chat.completions,
            root_client=plain,
            api_key=SecretStr("sk-test"),
        )
        llm = bound_chat(client, idle_aclient)

        with pytest.raises(ModerationBlocked):
            llm.with_fallbacks([backup], exceptions_to_handle=(openai.APIError,)).invoke(FLAGGED)
        assert fake.model_requests == []

        llm.with_fallbacks([backup]).invoke(FLAGGED)

    [sent] = fake.model_requests
    assert sent.json is not None and sent.json["model"] == "gpt-4o"
    assert "safety_identifier" not in sent.json


# -- embeddings ------------------------------------------------------------------------------


async def test_embeddings_of_text_are_moderated_and_tagged_with_user(
    client: SafeClient, aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    acme, aacme = client.for_customer(CUSTOMER), aclient.for_customer(CUSTOMER)
    embeddings = OpenAIEmbeddings(
        model="text-embedding-3-small",
        client=acme.embeddings,
        async_client=aacme.embeddings,
        check_embedding_ctx_length=False,  # send text, not token ids (see the next test)
    )
    assert len(embeddings.embed_query("quarterly report")) > 0
    assert len(await embeddings.aembed_documents(["notes one", "notes two"])) == 2
    with pytest.raises(ModerationBlocked):
        embeddings.embed_query(FLAGGED)

    assert [r.path for r in fake.requests] == [
        "/moderations",
        "/embeddings",
        "/moderations",
        "/embeddings",
        "/moderations",
    ]
    assert [moderated(r) for r in fake.moderation_requests] == [
        ["quarterly report"],
        ["notes one", "notes two"],
        [FLAGGED],
    ]
    assert [(r.json or {})["user"] for r in fake.model_requests] == [SID, SID]
    assert [r.endpoint for r in client.store.usage_records() if r.outcome == "ok"] == [
        "/embeddings"
    ]
    assert [r.endpoint for r in await aclient.store.usage_records()] == ["/embeddings"]


class _StubEncoding:
    """Stands in for a tiktoken encoding (the real ones are downloaded on first use)."""

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode())


class _NoTokenIds(DefaultPolicy):
    def allow_unmoderatable(self, request: GuardedRequest, kinds: Any) -> bool:
        return "token_ids" not in kinds


def test_default_embeddings_send_token_ids_which_pass_unmoderated(
    fake: FakeOpenAI, idle_aclient: AsyncSafeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAIEmbeddings tokenizes by default and sends token ids, which cannot be moderated:
    the default policy lets them through (logged); a policy can refuse them."""
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda model: _StubEncoding())
    with SafeClient(
        **fake.openai_kwargs(), identifier_secret=SECRET, store="memory://", spool=False
    ) as plain_policy:
        embeddings = OpenAIEmbeddings(
            model="text-embedding-3-small",
            client=plain_policy.for_customer(CUSTOMER).embeddings,
            async_client=idle_aclient.for_customer(CUSTOMER).embeddings,
        )
        with capture_logs() as logs:
            embeddings.embed_query(FLAGGED)
    assert [r.path for r in fake.requests] == ["/embeddings"]  # sent, never moderated
    assert (fake.requests[0].json or {})["input"] == [list(FLAGGED.encode())]
    assert [e["kinds"] for e in logs if e["event"] == "safe_openai.unmoderated_content"] == [
        ["token_ids"]
    ]

    fake.reset()
    with SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=SECRET,
        store="memory://",
        spool=False,
        policy=_NoTokenIds(),
    ) as strict:
        embeddings = OpenAIEmbeddings(
            model="text-embedding-3-small",
            client=strict.for_customer(CUSTOMER).embeddings,
            async_client=idle_aclient.for_customer(CUSTOMER).embeddings,
        )
        with pytest.raises(PolicyDenied):
            embeddings.embed_query(FLAGGED)
    assert fake.requests == []
