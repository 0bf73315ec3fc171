"""safe_openai.web: refusals as HTTP errors, guarded streams that start before the answer, and
the customer bound per request in ASGI and WSGI applications."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from flask import Flask, Response, request
from starlette.requests import ClientDisconnect

from safe_openai import (
    AsyncSafeClient,
    BatchBlocked,
    ConfigurationError,
    CustomerRequired,
    CustomerSuspended,
    Decision,
    DefaultPolicy,
    ModerationBlocked,
    ModerationUnavailable,
    OutputBlocked,
    PolicyDenied,
    Quota,
    QuotaExceeded,
    SafeClient,
    StoreError,
    UnpricedModel,
    WebhookInProgress,
    WebhookVerificationError,
)
from safe_openai._identity import current_customer
from safe_openai.testing import FakeOpenAI
from safe_openai.web import (
    CustomerMiddleware,
    HTTPError,
    WSGICustomerMiddleware,
    aprimed,
    asse,
    carries_output,
    http_error,
    primed,
    sse,
)

SECRET = "web-tests-identifier-secret"
HI: Any = [{"role": "user", "content": "Hello"}]
FLAGGED_STORY = "Once upon a time. There was a dog. It was nice. Then I will kill it. The end."


def blocked() -> ModerationBlocked:
    return ModerationBlocked("acme", categories=("violence",), scores={}, endpoint="/x")


# -- http_error -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (blocked(), 422, "moderation_blocked"),
        (
            OutputBlocked("a", categories=("violence",), scores={}, endpoint="/x"),
            422,
            "moderation_blocked",
        ),
        (
            BatchBlocked("a", lines={1: ("violence",)}, scores={}, endpoint="/x"),
            422,
            "moderation_blocked",
        ),
        (QuotaExceeded("a", limit="requests_per_minute", retry_after=None), 429, "quota_exceeded"),
        (CustomerSuspended("a", until=None, reason="r"), 403, "customer_suspended"),
        (PolicyDenied("a", Decision.deny("no")), 403, "policy_denied"),
        (UnpricedModel("a", model="m"), 403, "model_not_available"),
        (ModerationUnavailable("down"), 503, "moderation_unavailable"),
        (StoreError("down"), 503, "service_unavailable"),
        (WebhookVerificationError("bad"), 400, "webhook_rejected"),
        (WebhookInProgress("evt"), 409, "webhook_in_progress"),
        (CustomerRequired("/chat/completions"), 500, "internal_error"),
        (ConfigurationError("wrong"), 500, "internal_error"),
        (ValueError("bug"), 500, "internal_error"),
    ],
)
def test_each_refusal_has_its_status_and_a_message_safe_to_show(
    error: BaseException, status: int, code: str
) -> None:
    answer = http_error(error)
    assert (answer.status, answer.code) == (status, code)
    shown = getattr(error, "user_message", "The request could not be processed.")
    assert answer.body() == {"error": {"code": code, "message": shown}}
    assert answer.headers == {}


def test_retry_after_is_whole_seconds_when_waiting_helps() -> None:
    soon = QuotaExceeded("a", limit="requests_per_minute", retry_after=12.2)
    assert http_error(soon).headers == {"Retry-After": "13"}
    assert http_error(QuotaExceeded("a", limit="x", retry_after=0.01)).headers == {
        "Retry-After": "1"
    }
    until = datetime.now(timezone.utc) + timedelta(minutes=10)
    left = int(http_error(CustomerSuspended("a", until=until, reason="r")).headers["Retry-After"])
    assert 590 <= left <= 600
    over = datetime.now(timezone.utc) - timedelta(minutes=1)
    assert http_error(CustomerSuspended("a", until=over, reason="r")).headers == {}


def test_a_quota_refusal_carries_the_rate_limit_headers_of_its_limit() -> None:
    refused = QuotaExceeded("a", limit="requests_per_minute", retry_after=30.5, used=60, allowed=60)
    assert http_error(refused).headers == {
        **refused.headers(),
        "Retry-After": "31",
        "X-RateLimit-Limit": "60",
        "X-RateLimit-Remaining": "0",
    }


def test_errors_from_openai_never_show_openais_message() -> None:
    request = httpx2.Request("POST", "http://t/v1/chat/completions")
    limited = openai.RateLimitError(
        "org limit sk-secret", response=httpx2.Response(429, request=request), body=None
    )
    server = openai.InternalServerError(
        "boom", response=httpx2.Response(500, request=request), body=None
    )
    gone = openai.APIConnectionError(request=request)
    assert [(e.status, e.code) for e in map(http_error, (limited, server, gone))] == [
        (503, "upstream_rate_limited"),
        (502, "upstream_error"),
        (503, "upstream_unavailable"),
    ]
    assert "sk-secret" not in str(http_error(limited).body())


def test_an_error_event_from_openai_mid_stream_is_an_upstream_error() -> None:
    """OpenAI ending a stream with an ``error`` event: the SDK raises a plain APIError (no
    status, no connection error). It is OpenAI's failure, not the application's: 502."""
    fake = FakeOpenAI()

    def chunk(text: str) -> str:
        event = {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
        return f"data: {json.dumps(event)}\n\n"

    def answer(request: httpx2.Request) -> httpx2.Response:
        if not request.url.path.endswith("/chat/completions"):
            return fake.handle_request(request)
        failed = 'data: {"error": {"message": "overloaded sk-secret", "type": "server_error"}}\n\n'
        return httpx2.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=(chunk("Hel") + chunk("lo") + failed).encode(),
        )

    ai = SafeClient(
        api_key="sk-test",
        base_url="http://fake.openai.test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
        identifier_secret=SECRET,
        spool=False,
    ).for_customer("acme")
    body = list(
        sse(primed(ai.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)))
    )
    assert len(body) == 3 and b"sk-secret" not in body[-1]
    assert body[-1].startswith(b"event: error\n") and b'"code": "upstream_error"' in body[-1]
    with pytest.raises(openai.APIError) as raised:
        list(ai.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True))
    assert (http_error(raised.value).status, http_error(raised.value).code) == (
        502,
        "upstream_error",
    )


def test_an_error_as_a_server_sent_event() -> None:
    assert http_error(blocked()).sse() == (
        b'event: error\ndata: {"error": {"code": "moderation_blocked", "message": '
        b'"Your message was blocked because it may violate our content policy."}}\n\n'
    )
    assert isinstance(http_error(blocked()), HTTPError)


# -- primed streams, sync ---------------------------------------------------------------------------


def client(fake: FakeOpenAI, **policy: Any) -> SafeClient:
    return SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=SECRET,
        spool=False,
        policy=DefaultPolicy(**policy),
    )


def text_of(chunk: Any) -> str:
    return str(chunk.choices[0].delta.content or "") if chunk.choices else ""


def test_priming_pulls_past_the_role_chunk_to_the_first_text() -> None:
    fake = FakeOpenAI(reply="Hello there", delta_chars=4)
    stream = (
        client(fake)
        .for_customer("acme")
        .chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    )
    events = primed(stream)
    assert "".join(map(text_of, events)) == "Hello there"


def test_a_first_window_withheld_is_raised_by_priming_not_while_streaming() -> None:
    """Under output moderation "block", a flag in the first window reaches the caller before
    any byte of the answer, so it can still be an HTTP error."""
    fake = FakeOpenAI(reply="I will kill it.", delta_chars=5)
    ai = client(fake, output_moderation="block").for_customer("acme")
    stream = ai.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    with pytest.raises(OutputBlocked):
        primed(stream)
    assert [r.outcome for r in ai.store.usage_records()] == ["ok"]


def test_a_window_withheld_mid_stream_ends_the_body_with_an_error_event() -> None:
    fake = FakeOpenAI(reply=FLAGGED_STORY, delta_chars=5)
    ai = client(fake, output_moderation="block").for_customer("acme")
    body = list(
        sse(
            primed(ai.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)),
            encode=text_of,
        )
    )
    assert body[0] == b"data: \n\n"  # the role chunk
    assert b"kill" not in b"".join(body)
    assert body[-1].startswith(b"event: error\ndata: ")
    assert b'"code": "moderation_blocked"' in body[-1]
    assert len(ai.store.usage_records()) == 1


def test_sse_frames_sdk_events_as_json_and_can_end_with_done() -> None:
    fake = FakeOpenAI(reply="Hi")
    ai = client(fake).for_customer("acme")
    body = list(
        sse(primed(ai.responses.create(model="gpt-4o-mini", input="Hello", stream=True)), done=True)
    )
    assert body[0].startswith(b'data: {"') and b'"type":"response.created"' in body[0]
    assert body[-1] == b"data: [DONE]\n\n"
    assert list(sse(["a\nb"])) == [b'data: "a\\nb"\n\n']
    assert list(sse(["x"], encode=lambda text: "one\ntwo")) == [b"data: one\ndata: two\n\n"]


def test_closing_a_primed_stream_early_closes_the_guarded_stream() -> None:
    """A client that hangs up: the framework closes the body, the stream records an estimate."""
    fake = FakeOpenAI(reply="word " * 40, delta_chars=5)
    ai = client(fake).for_customer("acme")
    events = primed(ai.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True))
    next(events)
    events.close()  # type: ignore[attr-defined]
    [record] = ai.store.usage_records()
    assert record.outcome == "estimated"


def test_a_body_closed_before_its_first_message_still_closes_the_guarded_stream() -> None:
    """A framework that drops a body it never began to send (the client left first) closes it
    unstarted: a generator closed so skips its own finally, which left the response open and
    the usage unrecorded until garbage collection."""
    fake = FakeOpenAI(reply="word " * 40, delta_chars=5)
    ai = client(fake).for_customer("acme")
    streams = [
        ai.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True) for _ in "ab"
    ]
    primed(streams[0]).close()  # type: ignore[attr-defined]
    sse(primed(streams[1])).close()  # type: ignore[attr-defined]
    assert [stream.response.is_closed for stream in streams] == [True, True]
    assert [r.outcome for r in ai.store.usage_records()] == ["estimated", "estimated"]


async def test_an_async_body_closed_before_its_first_message_closes_the_stream() -> None:
    fake = FakeOpenAI(reply="word " * 40, delta_chars=5)
    ai = AsyncSafeClient(
        **fake.async_openai_kwargs(), identifier_secret=SECRET, spool=False
    ).for_customer("acme")
    streams = [
        await ai.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
        for _ in "ab"
    ]
    await (await aprimed(streams[0])).aclose()  # type: ignore[attr-defined]
    await asse(await aprimed(streams[1])).aclose()  # type: ignore[attr-defined]
    assert [stream.response.is_closed for stream in streams] == [True, True]
    assert [r.outcome for r in await ai.store.usage_records()] == ["estimated", "estimated"]


def test_sse_breaks_lines_only_where_an_event_stream_does() -> None:
    """U+2028 and U+0085 are left raw in JSON and are line ends to str.splitlines(), not to
    EventSource: a model told to write them must not cut its JSON event in two."""
    text = "a\u2028b\x85c\x1cd"
    [message] = sse([{"text": text}], encode=lambda event: json.dumps(event, ensure_ascii=False))
    assert message.count(b"data: ") == 1
    assert json.loads(message.decode().removeprefix("data: ")) == {"text": text}
    assert list(sse(["x"], encode=lambda _: "one\r\ntwo\rthree")) == [
        b"data: one\ndata: two\ndata: three\n\n"
    ]


def test_carries_output_knows_the_opening_events() -> None:
    class Event:
        def __init__(self, **fields: Any) -> None:
            self.__dict__.update(fields)

    role = Event(
        choices=[Event(delta=Event(content="", refusal=None, tool_calls=None), finish_reason=None)]
    )
    usage_only = Event(choices=[])
    assert not carries_output(role) and not carries_output(usage_only)
    assert carries_output(Event(choices=[Event(delta=Event(content="a"), finish_reason=None)]))
    assert carries_output(Event(choices=[Event(text="a", finish_reason=None)]))
    assert not carries_output(Event(type="response.created"))
    assert carries_output(Event(type="response.output_text.delta"))
    assert carries_output(Event(type="response.completed"))
    assert carries_output("anything else")


def test_priming_an_empty_stream_or_a_failing_one() -> None:
    assert list(primed(iter([]))) == []

    def failing() -> Iterator[int]:
        raise StoreError("down")
        yield 1

    with pytest.raises(StoreError):
        primed(failing())
    assert list(primed([1, 2, 3], until=lambda n: True)) == [1, 2, 3]


# -- FastAPI, end to end ------------------------------------------------------------------------


def fastapi_app(fake: FakeOpenAI, **policy: Any) -> tuple[FastAPI, AsyncSafeClient]:
    ai = AsyncSafeClient(
        **fake.async_openai_kwargs(),
        identifier_secret=SECRET,
        spool=False,
        policy=DefaultPolicy(**policy),
    )
    app = FastAPI()

    @app.post("/chat")
    async def chat(question: str) -> Any:
        try:
            stream = await ai.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": question}], stream=True
            )
            events = await aprimed(stream)
        except openai.OpenAIError as exc:
            error = http_error(exc)
            return JSONResponse(error.body(), error.status, headers=error.headers)
        return StreamingResponse(asse(events, encode=text_of), media_type="text/event-stream")

    app.add_middleware(
        CustomerMiddleware,
        customer_for=lambda scope: dict(scope["headers"]).get(b"x-tenant", b"").decode() or None,
    )
    return app, ai


def test_fastapi_a_refused_stream_is_an_http_error_not_an_empty_200() -> None:
    fake = FakeOpenAI()
    app, _ = fastapi_app(fake, quota=Quota(requests_per_minute=2))
    with TestClient(app) as http:
        ok = http.post("/chat", params={"question": "Hi"}, headers={"x-tenant": "acme"})
        assert ok.status_code == 200
        assert ok.headers["content-type"].startswith("text/event-stream")
        assert ok.text.startswith("data: ") and ok.text.endswith("\n\n")
        assert "".join(line.removeprefix("data: ") for line in ok.text.split("\n\n")) == "Echo: Hi"

        no = http.post(
            "/chat", params={"question": "I will kill you"}, headers={"x-tenant": "acme"}
        )
        assert no.status_code == 422
        assert no.json()["error"]["code"] == "moderation_blocked"

        http.post("/chat", params={"question": "Hi"}, headers={"x-tenant": "acme"})
        over = http.post("/chat", params={"question": "Hi"}, headers={"x-tenant": "acme"})
        assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1

        anonymous = http.post("/chat", params={"question": "Hi"})
        assert anonymous.status_code == 500  # no customer: the app's mistake, not the caller's


def test_fastapi_a_suspended_customer_gets_403() -> None:
    fake = FakeOpenAI()
    app, ai = fastapi_app(fake)

    async def suspend() -> None:
        await ai.suspend("globex", reason="test", duration=timedelta(hours=1))

    import asyncio

    asyncio.run(suspend())
    with TestClient(app) as http:
        answer = http.post("/chat", params={"question": "Hi"}, headers={"x-tenant": "globex"})
    assert answer.status_code == 403 and 3500 <= int(answer.headers["retry-after"]) <= 3600
    assert answer.json()["error"]["message"] == CustomerSuspended.user_message
    assert fake.model_requests == []


def test_fastapi_a_window_withheld_mid_stream_is_an_error_event() -> None:
    fake = FakeOpenAI(reply=FLAGGED_STORY, delta_chars=5)
    app, _ = fastapi_app(fake, output_moderation="block")
    with TestClient(app) as http:
        answer = http.post("/chat", params={"question": "Hi"}, headers={"x-tenant": "acme"})
    assert answer.status_code == 200
    assert answer.text.startswith("data: ") and "kill" not in answer.text
    assert answer.text.endswith(
        '"code": "moderation_blocked", "message": "The answer was withheld because it may violate our content policy."}}\n\n'
    )


async def test_the_asgi_middleware_binds_async_and_sync_code_and_skips_lifespan() -> None:
    seen: list[tuple[str, str | None]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], current_customer()))

    async def who(scope: Any) -> str | None:
        return "acme" if scope.get("path") == "/acme" else None

    middleware = CustomerMiddleware(app, customer_for=who)
    for scope in (
        {"type": "http", "path": "/acme"},
        {"type": "websocket", "path": "/acme"},
        {"type": "http", "path": "/other"},
        {"type": "lifespan"},
    ):
        await middleware(scope, None, None)  # type: ignore[arg-type]
    assert seen == [("http", "acme"), ("websocket", "acme"), ("http", None), ("lifespan", None)]
    assert current_customer() is None


async def test_the_asgi_middleware_closes_a_stream_starlette_dropped_unsent() -> None:
    """The client leaves before the first message: Starlette's StreamingResponse raises at its
    first send and never closes its body. The middleware closes the stream primed during the
    request when the request ends, so its connection and quota hold are not left to the
    garbage collector."""
    quota = Quota(tokens_per_minute=100_000)
    fake = FakeOpenAI(reply="word " * 40, delta_chars=5)
    ai = AsyncSafeClient(
        **fake.async_openai_kwargs(),
        identifier_secret=SECRET,
        spool=False,
        policy=DefaultPolicy(quota=quota),
    )
    streams: list[Any] = []
    app = FastAPI()

    @app.post("/chat")
    async def chat() -> StreamingResponse:
        stream = await ai.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        streams.append(stream)
        return StreamingResponse(asse(await aprimed(stream)), media_type="text/event-stream")

    app.add_middleware(CustomerMiddleware)  # binds nothing: the endpoint names the customer

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        raise OSError("the client went away")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/chat",
        "raw_path": b"/chat",
        "query_string": b"",
        "headers": [],
        "scheme": "http",
        "server": ("test", 80),
        "client": ("test", 1),
        "root_path": "",
    }
    gc.disable()  # what is under test is the close, not the collector's timing
    try:
        with pytest.raises(ClientDisconnect):
            await app(scope, receive, send)
        [stream] = streams
        assert stream.response.is_closed
        assert [r.outcome for r in await ai.store.usage_records()] == ["estimated"]
        [tpm] = await ai.store.quota_usage("acme", quota)
        assert tpm.used < 100  # the estimate, not the 4,096-token hold of the call
    finally:
        gc.enable()


# -- Flask (WSGI), end to end -----------------------------------------------------------------


def test_wsgi_binding_holds_while_the_body_streams_and_ends_with_it() -> None:
    fake = FakeOpenAI(reply="Hello there", delta_chars=3)
    shared = client(fake)
    app = Flask(__name__)
    during: list[str | None] = []

    @app.post("/chat")
    def chat() -> Any:
        try:
            question = request.args.get("q", "Hello")
            events = primed(
                shared.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": question}],
                    stream=True,
                )
            )
        except openai.OpenAIError as exc:
            error = http_error(exc)
            return error.body(), error.status, error.headers

        def body() -> Iterator[bytes]:
            during.append(current_customer())
            yield from sse(events, encode=text_of)

        return Response(body(), mimetype="text/event-stream")

    def tenant(environ: Any) -> str | None:
        value = environ.get("HTTP_X_TENANT")
        return str(value) if value else None

    app.wsgi_app = WSGICustomerMiddleware(app.wsgi_app, customer_for=tenant)  # type: ignore[method-assign]
    http = app.test_client()
    ok = http.post("/chat", headers={"x-tenant": "acme"})
    assert ok.status_code == 200 and b"Hello there" in b"".join(
        line.removeprefix(b"data: ") for line in ok.data.split(b"\n\n")
    )
    assert during == ["acme"]
    assert [r.customer_id for r in shared.store.usage_records()] == ["acme"]
    refused = http.post(
        "/chat", query_string={"q": "I will kill you"}, headers={"x-tenant": "acme"}
    )
    assert refused.status_code == 422 and refused.json == http_error(blocked()).body()
    no_one = http.post("/chat")
    assert no_one.status_code == 500
    assert (no_one.json or {})["error"]["code"] == "internal_error"
    assert current_customer() is None


def test_wsgi_binding_does_not_leak_into_a_reused_thread() -> None:
    inner: list[str | None] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        inner.append(current_customer())
        start_response("200 OK", [])
        return [b"x"]

    middleware = WSGICustomerMiddleware(app, customer_for=lambda environ: environ.get("who"))
    body = middleware({"who": "acme"}, lambda *a: None)
    assert list(body) == [b"x"]
    body.close()  # type: ignore[attr-defined]
    middleware({}, lambda *a: None)
    assert inner == ["acme", None]
    assert current_customer() is None
