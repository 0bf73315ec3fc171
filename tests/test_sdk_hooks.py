"""Every private part of the openai SDK the guard overrides or calls, with the shape it relies on.

These are not public contracts: a release may rename, re-sign or stop calling any of them. Each
test states one hook's shape (signature, class, attribute) and exercises it on the plain SDK over
a mock transport, so a release that changes one fails here, in CI, and not for a user.

| Hook (openai SDK)                                        | Used by safe_openai in                 |
| -------------------------------------------------------- | -------------------------------------- |
| ``SyncAPIClient.request(cast_to, options, *, stream,      | ``_client``: ``SafeClient.request``,   |
|   stream_cls)``, once per logical call                   |   the guard's entry for HTTP calls     |
| ``AsyncAPIClient.request`` (the same, awaited)           | ``_client``: ``AsyncSafeClient``       |
| ``_build_request(options, *, retries_taken)`` per        | ``_client``: ``_with_tap`` (the stream |
|   attempt, returning a request with ``extensions``        |   tap rides in ``extensions``)         |
| ``FinalRequestOptions``: ``method``, ``url``,             | ``_client``: ``_fold_body``, batch     |
|   ``json_data``, ``content``, ``files``, ``extra_json``,  |   uploads, ``_api_path``               |
|   ``model_copy()``                                       |                                        |
| ``_prepare_url(url) -> URL``; ``base_url``               | ``_client``: ``_api_path``             |
| ``copy(..., _extra_kwargs=)``; ``with_options = copy``;  | ``_copies.signed_copy``,               |
|   ``copy`` builds ``self.__class__(**..., **_extra_kwargs)`` |   ``_Guarded._safe_copy``           |
| ``_refresh_api_key()``                                   | ``_client``: refuse foreign credentials|
| ``_websocket_query_params(url, extra_query)``, asked by   | ``_client``: ``refuse_websocket``;     |
|   every socket, ``lib.realtime_translation`` included    |   ``_BASE_URL_SOCKETS``                |
| ``_response.APIResponse`` / ``AsyncAPIResponse`` /        | ``_client``: usage and ids of raw      |
|   ``_legacy_response.LegacyAPIResponse``: ``http_response``, |   responses, ``_bodies.meter_body``   |
|   ``request_id``; parsed models' ``_request_id``         |                                        |
| ``_utils._json.openapi_dumps``                           | ``_client``: multipart fields as sent  |
| ``_streaming.Stream`` / ``AsyncStream``: ``__init__(*,    | ``_streams.GuardedStream`` and its     |
|   cast_to, response, client, options)``, ``_iterator``,   |   async twin                           |
|   ``close()``; ``extract_stream_chunk_type``             | ``_streams.guarded_stream_cls``        |
| resources' ``_post`` reaching ``request`` (``parse``)    | the guard on ``request``, not ``create``|
| ``_send_queue.SendQueue.mark_unsent``; connections'       | ``_connections``: frames left unsent   |
|   ``_send_queue``                                        |   on close                             |
| ``_utils.maybe_transform(event, param_type)``            | ``_connections``: frames as sent       |
| ``resources.responses`` and ``resources.beta.responses``: | ``_connections``: the guarded          |
|   ``ResponsesConnection{,Manager}`` (and ``Async``):     |   WebSocket twins                      |
|   ``_send``, ``recv_bytes``, ``_iter_events``, ``close``, |                                        |
|   ``send``, ``__enter__``, ``_connect_ws``; ``connect``   |                                        |
| ``OpenAI.responses`` / ``OpenAI.beta`` / ``Beta.responses`` | ``_client``, ``_connections``:      |
|   as cached properties; resources' ``_client``           |   overridden to return guarded twins   |
| ``client.post(path, body=, cast_to=object,                | ``_moderation``: the moderation call,  |
|   options={"max_retries": 0})`` gives the decoded JSON   |   retried by tenacity instead          |
| ``types.safety.SafetyCase`` / ``SafetyAlert``;            | ``webhooks``                           |
|   ``safety.cases.retrieve``, ``safety.alerts.retrieve``; |                                        |
|   ``webhooks.verify_signature``                          |                                        |
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
from openai._base_client import AsyncAPIClient, SyncAPIClient
from openai._legacy_response import LegacyAPIResponse
from openai._models import FinalRequestOptions
from openai._response import APIResponse, AsyncAPIResponse
from openai._streaming import AsyncStream, Stream, extract_stream_chunk_type
from openai._utils import maybe_transform
from openai._utils._json import openapi_dumps
from openai.types.chat import ChatCompletionChunk

CHAT = {
    "id": "c1",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
CHUNK = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}
MESSAGES = [{"role": "user", "content": "hello"}]


def params(function: Callable[..., Any]) -> list[tuple[str, Any]]:
    """Parameter names and kinds, ``self`` left out."""
    signature = inspect.signature(function)
    return [(p.name, p.kind) for p in signature.parameters.values() if p.name != "self"]


POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY


def answer(request: httpx2.Request) -> httpx2.Response:
    """The API: a chat completion (streamed when asked), with a request id."""
    body = json.loads(request.content or b"{}")
    headers = {"x-request-id": "req_1"}
    if body.get("stream"):
        events = f"data: {json.dumps(CHUNK)}\n\ndata: [DONE]\n\n"
        headers["content-type"] = "text/event-stream"
        return httpx2.Response(200, content=events.encode(), headers=headers)
    return httpx2.Response(200, json=CHAT, headers=headers)


class Spy(openai.OpenAI):
    """The plain SDK client, counting the hooks the guard overrides."""

    def __init__(self, *, marker: object = None, **kwargs: Any) -> None:
        self.marker = marker
        self.requests: list[tuple[FinalRequestOptions, bool, Any]] = []
        self.built: list[httpx2.Request] = []
        super().__init__(**kwargs)

    def request(
        self,
        cast_to: Any,
        options: FinalRequestOptions,
        *,
        stream: bool = False,
        stream_cls: Any = None,
    ) -> Any:  # type: ignore[override]
        self.requests.append((options.model_copy(deep=True), stream, stream_cls))
        return super().request(cast_to, options, stream=stream, stream_cls=stream_cls)

    def _build_request(
        self, options: FinalRequestOptions, *, retries_taken: int = 0
    ) -> httpx2.Request:
        request = super()._build_request(options, retries_taken=retries_taken)
        self.built.append(request)
        return request


def spy(handler: Callable[[httpx2.Request], httpx2.Response] = answer, **kwargs: Any) -> Spy:
    transport = httpx2.MockTransport(handler)
    return Spy(
        api_key="k",
        base_url="http://test/v1",
        http_client=httpx2.Client(transport=transport),
        **kwargs,
    )


# --- the HTTP path: request(), _build_request(), the options -------------------------------


@pytest.mark.parametrize("base", [SyncAPIClient, AsyncAPIClient])
def test_request_and_build_request_have_the_signatures_the_guard_overrides(base: type) -> None:
    assert params(base.request) == [
        ("cast_to", POS),
        ("options", POS),
        ("stream", KW),
        ("stream_cls", KW),
    ]
    assert params(base._build_request) == [("options", POS), ("retries_taken", KW)]
    assert issubclass(openai.OpenAI, SyncAPIClient) and issubclass(
        openai.AsyncOpenAI, AsyncAPIClient
    )
    assert inspect.iscoroutinefunction(base.request) is (base is AsyncAPIClient)


def test_request_runs_once_per_call_and_build_request_once_per_attempt() -> None:
    """A 500 then a 200 with one retry: one request(), two built requests, each with a mutable
    ``extensions`` (where the guard's stream tap rides)."""
    replies = iter([httpx2.Response(500, json={"error": {"message": "x"}}), None])

    def flaky(request: httpx2.Request) -> httpx2.Response:
        return next(replies) or answer(request)

    client = spy(flaky, max_retries=1)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, timeout=5)  # type: ignore[arg-type]
    assert len(client.requests) == 1
    assert len(client.built) == 2
    assert all(isinstance(r.extensions, dict) for r in client.built)
    client.built[0].extensions["probe"] = 1  # writable


def test_the_options_carry_the_body_unserialized_and_extra_body_apart() -> None:
    client = spy()
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_body={"smuggled": "text"},
    )
    options, stream, _ = client.requests[0]
    assert (options.method, options.url) == ("post", "/chat/completions")
    assert isinstance(options.json_data, dict) and options.json_data["messages"] == MESSAGES
    assert options.extra_json == {"smuggled": "text"}
    assert options.content is None and options.files is None
    assert stream is False
    assert json.loads(client.built[0].content)["smuggled"] == "text"  # extra_json wins, merged late
    assert {"method", "url", "json_data", "content", "files", "extra_json"} <= set(
        FinalRequestOptions.model_fields
    )


def test_options_set_by_the_guard_are_what_is_sent() -> None:
    """The guard rewrites ``json_data`` and clears ``extra_json`` in ``request()``: the SDK
    builds the request from the options it was given, not from a copy taken earlier."""

    class Rewriting(Spy):
        def request(self, cast_to: Any, options: FinalRequestOptions, **kwargs: Any) -> Any:  # type: ignore[override]
            assert isinstance(options.json_data, dict) and isinstance(options.extra_json, dict)
            options.json_data = {
                **options.json_data,
                **options.extra_json,
                "safety_identifier": "h",
            }
            options.extra_json = None
            return super().request(cast_to, options, **kwargs)

    client = Rewriting(
        api_key="k",
        base_url="http://test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
    )
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_body={"x": 1})  # type: ignore[arg-type]
    sent = json.loads(client.built[0].content)
    assert sent["safety_identifier"] == "h" and sent["x"] == 1


def test_parse_reaches_request_through_the_resource_post() -> None:
    """``chat.completions.parse`` calls the resource's ``_post``, not ``create``: the guard sits
    on ``request()``, which both reach."""
    client = spy()
    client.chat.completions.parse(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert [o.url for o, _, _ in client.requests] == ["/chat/completions"]
    assert callable(client.chat.completions._post)


def test_prepare_url_gives_the_url_the_sdk_requests() -> None:
    client = spy()
    assert params(openai.OpenAI._prepare_url) == [("url", POS)]
    url = client._prepare_url("/chat/completions")
    assert isinstance(url, httpx2.URL) and url.path == "/v1/chat/completions"
    assert client._prepare_url("http://test/v1/./responses").path.endswith("responses")
    assert isinstance(client.base_url, httpx2.URL) and client.base_url.path == "/v1/"


def test_refresh_api_key_returns_the_key() -> None:
    assert params(openai.OpenAI._refresh_api_key) == []
    assert spy()._refresh_api_key() == "k"
    assert params(openai.AsyncOpenAI._refresh_api_key) == []
    assert inspect.iscoroutinefunction(openai.AsyncOpenAI._refresh_api_key)
    assert asyncio.run(openai.AsyncOpenAI(api_key="k")._refresh_api_key()) == "k"


# --- copies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", [openai.OpenAI, openai.AsyncOpenAI])
def test_copy_takes_extra_kwargs_and_with_options_is_the_base_copy(sdk: type) -> None:
    signature = inspect.signature(sdk.copy)
    assert signature.parameters["_extra_kwargs"].kind is KW
    assert all(p.kind is KW for name, p in signature.parameters.items() if name != "self")
    assert {"api_key", "base_url", "http_client", "max_retries", "timeout"} <= set(
        signature.parameters
    )
    # The class body binds with_options to its own copy: a subclass must rebind it.
    assert sdk.with_options is sdk.copy


def test_copy_rebuilds_the_subclass_with_extra_kwargs() -> None:
    client = spy(marker="root")
    copied = client.copy(max_retries=0, _extra_kwargs={"marker": "copied"})
    assert type(copied) is Spy and copied.marker == "copied" and copied.max_retries == 0
    assert copied.with_options(timeout=3).marker is None  # not kept unless passed again


# --- responses: raw, streaming, parsed --------------------------------------------------------


def test_raw_and_streaming_responses_expose_the_http_response_and_request_id() -> None:
    client = spy()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert isinstance(raw, (LegacyAPIResponse, APIResponse))
    assert isinstance(raw.http_response, httpx2.Response) and raw.request_id == "req_1"
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
    ) as streamed:
        assert isinstance(streamed, APIResponse)
        assert isinstance(streamed.http_response.stream, httpx2.SyncByteStream)
        assert streamed.request_id == "req_1"
    assert client.requests[-1][0].headers["X-Stainless-Raw-Response"] == "stream"
    for cls in (LegacyAPIResponse, APIResponse, AsyncAPIResponse):
        assert isinstance(
            inspect.getattr_static(cls, "request_id"), property
        )  # http_response: set in __init__


def test_a_parsed_answer_carries_its_request_id() -> None:
    reply = spy().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply._request_id == "req_1"


def test_post_cast_to_object_gives_the_json_and_max_retries_0_does_not_retry() -> None:
    """The moderator's call: the decoded body as plain JSON; tenacity retries, not the SDK."""
    replies = [httpx2.Response(200, json={"results": [{"flagged": False}]})]
    client = spy(lambda request: replies.pop(0) if replies else httpx2.Response(503, json={}))
    body = {"model": "omni-moderation-latest", "input": ["hi"]}
    raw = client.post("/moderations", body=body, cast_to=object, options={"max_retries": 0})
    assert raw == {"results": [{"flagged": False}]}
    with pytest.raises(openai.APIStatusError):
        client.post("/moderations", body=body, cast_to=object, options={"max_retries": 0})
    assert len(client.built) == 2  # one attempt each


def test_openapi_dumps_gives_json_bytes() -> None:
    assert json.loads(openapi_dumps({"a": [1, "b"]})) == {"a": [1, "b"]}


# --- streams ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Stream, AsyncStream])
def test_stream_init_takes_the_keywords_the_guarded_stream_passes(cls: type) -> None:
    assert params(cls.__init__) == [
        ("cast_to", KW),
        ("response", KW),
        ("client", KW),
        ("options", KW),
    ]
    assert inspect.signature(cls.__init__).parameters["options"].default is None
    assert openai.Stream is Stream and openai.AsyncStream is AsyncStream
    assert params(cls.close) == []  # the guarded stream's close records an estimate
    assert inspect.iscoroutinefunction(cls.close) is (cls is AsyncStream)


def test_a_stream_reads_its_events_from_iterator_and_gets_its_class_from_request() -> None:
    client = spy()
    seen: list[str] = []

    class Tapped(Stream[ChatCompletionChunk]):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            inner = self._iterator

            def tapped() -> Any:
                for item in inner:
                    seen.append(type(item).__name__)
                    yield item

            self._iterator = tapped()

    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    _, streamed, stream_cls = client.requests[0]
    assert streamed is True and extract_stream_chunk_type(stream_cls) is ChatCompletionChunk
    assert [c.choices[0].delta.content for c in stream] == ["hi"]
    stream.close()
    # the class the guard substitutes is built by the SDK the same way
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )  # type: ignore[arg-type]
    response = raw.http_response
    tapped = Tapped(cast_to=ChatCompletionChunk, response=response, client=client)
    assert [c.id for c in tapped] == ["c1"] and seen == ["ChatCompletionChunk"]
    tapped.close()


# --- WebSockets -------------------------------------------------------------------------------


def test_websocket_query_params_is_asked_by_every_socket() -> None:
    assert params(openai.OpenAI._websocket_query_params) == [("url", POS), ("extra_query", POS)]
    assert params(openai.AsyncOpenAI._websocket_query_params) == [
        ("url", POS),
        ("extra_query", POS),
    ]
    query = spy()._websocket_query_params(httpx2.URL("wss://test/v1/responses"), {"a": "b"})
    assert isinstance(query, httpx2.QueryParams) and query["a"] == "b"
    # The translation session builds its query from the base URL: the guard names it by module.
    from openai.lib import realtime_translation

    assert realtime_translation.__name__ == "openai.lib.realtime_translation"
    assert "_websocket_query_params" in inspect.getsource(realtime_translation)


def _connection_classes() -> list[tuple[type, type, bool]]:
    from openai.resources.beta.responses import responses as beta
    from openai.resources.responses import responses

    return [
        (module.ResponsesConnectionManager, module.ResponsesConnection, False)
        for module in (responses, beta)
    ] + [
        (module.AsyncResponsesConnectionManager, module.AsyncResponsesConnection, True)
        for module in (responses, beta)
    ]


@pytest.mark.parametrize(("manager", "connection", "is_async"), _connection_classes())
def test_responses_websocket_classes_have_the_methods_the_twins_override(
    manager: type, connection: type, is_async: bool
) -> None:
    assert params(connection._send) == [("data", POS)]
    assert params(connection.recv_bytes) == []
    assert params(connection._iter_events) == []
    assert params(connection.close) == [("code", KW), ("reason", KW)]
    assert "send_queue" in inspect.signature(connection.__init__).parameters
    assert params(manager.send) == [("event", POS)]
    assert params(manager._connect_ws) == [("extra_query", POS), ("extra_headers", POS)]
    enter = manager.__aenter__ if is_async else manager.__enter__
    assert params(enter) == []
    assert inspect.iscoroutinefunction(connection.recv_bytes) is is_async


def test_the_send_queue_gives_back_what_was_not_sent() -> None:
    from openai._send_queue import SendQueue

    queue = SendQueue()
    assert queue.enqueue('{"type": "response.create"}')
    assert params(SendQueue.mark_unsent) == [("clear", KW)]
    assert queue.mark_unsent(clear=True) == ['{"type": "response.create"}']


def test_maybe_transform_gives_the_frame_as_sent() -> None:
    from openai.types.responses.responses_client_event_param import ResponsesClientEventParam

    event = {"type": "response.create", "model": "gpt-4o-mini", "input": "hi"}
    assert maybe_transform(event, ResponsesClientEventParam) == event


def test_responses_and_beta_are_cached_properties_over_resources_with_a_client() -> None:
    from openai.resources.beta.beta import AsyncBeta, Beta
    from openai.resources.responses import responses

    for owner, name in (
        (openai.OpenAI, "responses"),
        (openai.OpenAI, "beta"),
        (openai.AsyncOpenAI, "responses"),
        (openai.AsyncOpenAI, "beta"),
        (Beta, "responses"),
        (AsyncBeta, "responses"),
    ):
        assert isinstance(inspect.getattr_static(owner, name), functools.cached_property), name
    client = spy()
    assert isinstance(client.responses, responses.Responses) and client.responses._client is client
    assert client.beta.responses._client is client
    assert "extra_query" in inspect.signature(responses.Responses.connect).parameters


# --- safety events ------------------------------------------------------------------------------


def test_safety_types_and_the_webhook_verifier() -> None:
    from openai.types.safety import SafetyAlert, SafetyCase

    assert {"entity_identifier", "notice", "reason"} <= set(SafetyCase.model_fields)
    assert "request_id" in SafetyAlert.model_fields
    client = spy()
    assert params(client.safety.cases.retrieve)[0] == ("id", POS)
    assert params(client.safety.alerts.retrieve)[0] == ("id", POS)
    verify = inspect.signature(client.webhooks.verify_signature).parameters
    assert list(verify)[:2] == ["payload", "headers"] and verify["secret"].kind is KW
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(
            "{}",
            {"webhook-id": "1", "webhook-timestamp": "0", "webhook-signature": "v1,x"},
            secret="whsec_" + "QUJD" * 8,
        )


# --- the floor: an SDK without a hook is refused, not guarded partly ---------------------------


@pytest.mark.parametrize("hook", ["_websocket_query_params", "_build_request", "_refresh_api_key"])
def test_an_sdk_without_a_required_hook_is_refused_at_import(hook: str) -> None:
    """As on openai releases before the floor (3.0 has no ``_websocket_query_params``: its
    sockets would open unasked): importing the client fails and says what to install."""
    import subprocess
    import sys

    code = (
        "import openai\n"
        "for cls in {*openai.OpenAI.__mro__, *openai.AsyncOpenAI.__mro__}:\n"
        f"    if {hook!r} in vars(cls): delattr(cls, {hook!r})\n"
        "from safe_openai import SafeClient\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: safe-openai needs openai>=") and f".{hook}," in last


def test_the_floor_is_the_same_everywhere() -> None:
    """pyproject's dependency, the dev pin, .ci/lowest.txt and the client's check agree."""
    import re
    from pathlib import Path

    from safe_openai._client import SDK_FLOOR

    root = Path(__file__).parent.parent
    pyproject = (root / "pyproject.toml").read_text()
    assert f'"openai>={SDK_FLOOR},<4"' in pyproject
    assert f'"openai[realtime]>={SDK_FLOOR},<4"' in pyproject
    assert re.findall(r"^openai==(\S+)$", (root / ".ci/lowest.txt").read_text(), re.M) == [
        SDK_FLOOR
    ]


@pytest.mark.parametrize(
    ("module", "cls", "hook"),
    [
        ("openai.resources.responses.responses", "ResponsesConnection", "_send"),
        ("openai.resources.responses.responses", "AsyncResponsesConnection", "recv_bytes"),
        ("openai.resources.beta.responses.responses", "ResponsesConnectionManager", "send"),
    ],
)
def test_an_sdk_without_a_method_a_websocket_twin_overrides_is_refused(
    module: str, cls: str, hook: str
) -> None:
    """A release that renamed the connection's ``_send`` would send every frame through the new
    name, past the guarded override, without an error: ``client.responses`` (where the guarded
    WebSocket classes load) raises instead, saying what to install."""
    import subprocess
    import sys

    code = (
        f"import importlib; sdk = getattr(importlib.import_module({module!r}), {cls!r})\n"
        "for owner in sdk.__mro__:\n"
        f"    if {hook!r} in vars(owner): delattr(owner, {hook!r})\n"
        "from safe_openai import SafeClient\n"
        "client = SafeClient(api_key='k', store='memory://', identifier_secret='s' * 32,"
        " spool=False)\n"
        "client.responses\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: safe-openai needs openai>=") and f"{cls}.{hook}," in last
