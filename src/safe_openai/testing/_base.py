"""What every part of the fake shares: JSON and SSE framing, error bodies, the recorded
request, and :class:`_FakeBase`, the state and helpers the API families are written against."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import anyio
import httpx2

JSON = dict[str, Any]

_CREATED = 1_735_689_600  # 2025-01-01T00:00:00Z: a fixed clock keeps every body deterministic.
_API_PREFIX = "/v1"
_ECHO_CHARS = 80

_STATIC_HEADERS: tuple[tuple[str, str], ...] = (
    ("openai-version", "2020-10-01"),
    ("openai-organization", "fake-org"),
    ("openai-processing-ms", "1"),
)
_JSON_HEADERS = (*_STATIC_HEADERS, ("content-type", "application/json"))
_SSE_HEADERS = (
    *_STATIC_HEADERS,
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _tokens(chars: int) -> int:
    """Token count the fake reports for ``chars`` characters: about chars/4, at least 1."""
    return max(1, math.ceil(chars / 4))


_ERRORS: Mapping[int, tuple[str, str, str | None]] = {
    400: ("The request was invalid.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to perform this request.", "invalid_request_error", None),
    404: ("The requested resource was not found.", "invalid_request_error", None),
    409: ("The request conflicted with another request.", "invalid_request_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    502: ("Bad gateway.", "server_error", None),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
}


def _error_body(
    status: int, message: str | None = None, *, param: str | None = None, code: str | None = None
) -> JSON:
    default_message, kind, default_code = _ERRORS.get(
        status,
        (f"HTTP {status}.", "server_error" if status >= 500 else "invalid_request_error", None),
    )
    return {
        "error": {
            "message": message or default_message,
            "type": kind,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }


class _ApiError(Exception):
    """Raised inside a handler to answer with an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _error_body(status, message, param=param, code=code)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received.

    Attributes:
        method: The HTTP method, upper case (``"POST"``).
        path: The path relative to the API base, without ``/v1`` (``"/chat/completions"``).
        json: The decoded JSON body, or ``None`` for a request without a JSON object body.
        headers: The request headers with lower-case names; ``authorization`` is removed.
    """

    method: str
    path: str
    json: JSON | None
    headers: dict[str, str] = field(repr=False)


@dataclass
class _Failure:
    remaining: int
    status: int
    headers: Mapping[str, str] | None
    body: object
    exception: Exception | None


class OpenAIKwargs(TypedDict):
    """Keyword arguments that point ``openai.OpenAI`` (or ``SafeClient``) at a fake."""

    api_key: str
    base_url: str
    http_client: httpx2.Client


class AsyncOpenAIKwargs(TypedDict):
    """Keyword arguments that point ``openai.AsyncOpenAI`` (or ``AsyncSafeClient``) at a fake."""

    api_key: str
    base_url: str
    http_client: httpx2.AsyncClient


class _ChunkStream(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A response body delivered one SSE event at a time, like the real service."""

    def __init__(self, chunks: Sequence[bytes], delay: float = 0.0) -> None:
        self._chunks = chunks
        self._delay = delay

    def __iter__(self) -> Iterator[bytes]:
        for number, chunk in enumerate(self._chunks):
            if number and self._delay:
                time.sleep(self._delay)
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for number, chunk in enumerate(self._chunks):
            if number and self._delay:
                await anyio.sleep(self._delay)
            yield chunk


@dataclass
class _Reply:
    """What a handler produced, before it becomes an ``httpx2.Response``."""

    status: int = 200
    body: bytes = b""
    chunks: Sequence[bytes] | None = None
    headers: Sequence[tuple[str, str]] = _JSON_HEADERS


def _json_reply(value: object, status: int = 200) -> _Reply:
    return _Reply(status=status, body=_dumps(value).encode())


def _sse_data(value: object) -> bytes:
    return b"data: " + _dumps(value).encode() + b"\n\n"


def _sse_event(value: JSON) -> bytes:
    return b"event: " + str(value["type"]).encode() + b"\ndata: " + _dumps(value).encode() + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"


def _split_deltas(text: str, pieces: int = 4, size: int | None = None) -> list[str]:
    """Split ``text`` into at most ``pieces`` deltas of similar length, or into deltas of
    ``size`` characters when given (none for no text)."""
    size = size or max(1, math.ceil(len(text) / pieces))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _content_text(content: object) -> str:
    """The text of a message ``content``: a string, or the text of its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return " ".join(texts)
    return ""


def _json_schema_example(schema: Mapping[str, Any], defs: Mapping[str, Any], depth: int = 0) -> Any:
    """A minimal instance of a (strict, structured-output) JSON schema."""
    if depth > 12:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1], {})
        return _json_schema_example(target, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if options:
            usable = [o for o in options if o.get("type") != "null"] or options
            return _json_schema_example(usable[0], defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props: Mapping[str, Any] = schema.get("properties", {})
        return {name: _json_schema_example(sub, defs, depth + 1) for name, sub in props.items()}
    if kind == "array":
        item = schema.get("items", {})
        return [
            _json_schema_example(item, defs, depth + 1) for _ in range(schema.get("minItems", 0))
        ]
    if kind == "string":
        formats = {
            "date-time": "2025-01-01T00:00:00Z",
            "date": "2025-01-01",
            "time": "00:00:00",
            "uuid": "00000000-0000-0000-0000-000000000000",
            "email": "user@example.com",
            "uri": "https://example.com/",
        }
        return formats.get(schema.get("format", ""), "text")
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return False
    return None


def _schema_reply(schema: object) -> str | None:
    if not isinstance(schema, dict):
        return None
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    return _dumps(_json_schema_example(schema, defs))


class _FakeBase:
    """The fake's state, and the helpers more than one API family uses.

    :class:`~safe_openai.testing.FakeOpenAI` sets every attribute in its constructor; each API
    family is a mixin over this class.
    """

    flag_words: dict[str, str]
    scores: dict[str, dict[str, float]]
    reply: str | None
    cached_tokens: int
    reasoning_tokens: int
    delay: float
    tool_arguments: dict[str, Any] | None
    delta_chars: int | None
    event_delay: float
    files: dict[str, JSON]
    batches: dict[str, JSON]
    _lock: threading.Lock
    _requests: list[RecordedRequest]
    _counter: int
    _failures: dict[str, deque[_Failure]]

    if TYPE_CHECKING:
        # Defined by FakeOpenAI and the Responses family; declared here for the other mixins.
        def handle_request(self, request: httpx2.Request) -> httpx2.Response: ...
        def _route(self, method: str, path: str, body: JSON, number: int) -> _Reply: ...
        def _responses(self, body: JSON, number: int) -> _Reply: ...

    @staticmethod
    def _relative(path: str) -> str:
        path = "/" + path.lstrip("/")
        if path == _API_PREFIX or path.startswith(_API_PREFIX + "/"):
            path = path[len(_API_PREFIX) :] or "/"
        return path.rstrip("/") or "/"

    def _take_failure(self, path: str) -> _Failure | None:
        queue = self._failures.get(path)
        if not queue:
            return None
        failure = queue[0]
        failure.remaining -= 1
        if failure.remaining <= 0:
            queue.popleft()
        return failure

    @staticmethod
    def _require(body: JSON, *names: str) -> None:
        for name in names:
            if name not in body:
                raise _ApiError(
                    400,
                    f"Missing required parameter: '{name}'.",
                    param=name,
                    code="missing_required_parameter",
                )

    def _reply_text(self, user_text: str, schema: object, json_object: bool = False) -> str:
        if self.reply is not None:
            return self.reply
        if schema is not None:
            text = _schema_reply(schema)
            if text is not None:
                return text
        if json_object:
            return _dumps({"echo": user_text[:_ECHO_CHARS]})
        return "Echo: " + user_text[:_ECHO_CHARS]

    @staticmethod
    def _limit(text: str, limit: object) -> tuple[str, int, bool]:
        """Cut ``text`` to ``limit`` tokens: (text, output tokens, whether it was cut)."""
        tokens = _tokens(len(text))
        if isinstance(limit, int) and 0 < limit < tokens:
            return text[: limit * 4], limit, True
        return text, tokens, False

    def _usage_numbers(self, prompt_chars: int, output_tokens: int) -> tuple[int, int, int, int]:
        prompt = _tokens(prompt_chars)
        cached = max(0, min(self.cached_tokens, prompt))
        reasoning = max(0, self.reasoning_tokens)
        return prompt, cached, output_tokens + reasoning, reasoning

    def _chat_usage(self, prompt_chars: int, output_tokens: int) -> JSON:
        prompt, cached, completion, reasoning = self._usage_numbers(prompt_chars, output_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _tool_to_call(self, body: JSON, items: object, api: str) -> str | None:
        """The function tool to call instead of answering, if :attr:`tool_arguments` is set."""
        if self.tool_arguments is None or body.get("tool_choice") == "none":
            return None
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and (
                item.get("role") == "tool" or item.get("type") == "function_call_output"
            ):
                return None
        for tool in body.get("tools") or []:
            if isinstance(tool, dict) and tool.get("type") == "function":
                named = tool.get("function") if api == "chat" else tool
                if isinstance(named, dict) and isinstance(named.get("name"), str):
                    return str(named["name"])
        return None
