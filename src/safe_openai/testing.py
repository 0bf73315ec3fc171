"""An offline stand-in for the OpenAI API, and pytest fixtures built on it.

:class:`FakeOpenAI` is an ``httpx2`` transport (sync and async) that answers the endpoints a
guarded application uses with JSON the ``openai`` SDK parses into its own types: moderations,
chat completions (plain, streamed, structured output), responses (plain and streamed),
legacy completions, embeddings, image generation, speech and the model list. Everything is
deterministic, so tests can assert on ids, scores and token counts::

    from safe_openai.testing import FakeOpenAI

    fake = FakeOpenAI(flag_words={"kill": "violence"})
    client = openai.OpenAI(**fake.openai_kwargs())
    client.moderations.create(model="omni-moderation-latest", input="I will kill it")
    assert fake.moderation_inputs == ["I will kill it"]

Failures are injected per path (:meth:`FakeOpenAI.fail`) and every request is recorded
(:attr:`FakeOpenAI.requests`) without its ``authorization`` header.

Code that builds its own client (a documentation snippet, an agent framework) reaches the fake
over real HTTP on loopback through :meth:`FakeOpenAI.serve`::

    with FakeOpenAI().serve() as base_url:
        os.environ["OPENAI_BASE_URL"] = base_url
        ...

Applications get a fresh fake per test from the ``fake_openai`` fixture by adding
``pytest_plugins = ["safe_openai.testing"]`` to their root ``conftest.py``. Importing this
module does not need pytest; the fixture is only defined when pytest is importable.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypedDict

import anyio
import httpx2

__all__ = [
    "DEFAULT_FLAG_WORDS",
    "FLAGGED_SCORE",
    "FLAG_THRESHOLD",
    "LOW_SCORE",
    "MODERATION_CATEGORIES",
    "PNG_BYTES",
    "AsyncOpenAIKwargs",
    "FakeOpenAI",
    "OpenAIKwargs",
    "RecordedRequest",
]

JSON = dict[str, Any]

MODERATION_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
"""The 13 categories of ``omni-moderation-latest``, in the SDK's order."""

# The omni model scores images in these categories only; the others apply to text alone.
_IMAGE_CATEGORIES = frozenset(
    {
        "self-harm",
        "self-harm/instructions",
        "self-harm/intent",
        "sexual",
        "violence",
        "violence/graphic",
    }
)

DEFAULT_FLAG_WORDS: Mapping[str, str] = {
    "kill": "violence",
    "bomb": "illicit/violent",
    "hate you": "harassment",
}
"""Words the fake flags when no ``flag_words`` are given (case-insensitive substrings)."""

FLAGGED_SCORE = 0.97
"""The score a ``flag_words`` match gives its category."""
LOW_SCORE = 0.001
"""The score of every category nothing matched."""
FLAG_THRESHOLD = 0.5
"""A category counts as flagged when its score is at least this."""

_CREATED = 1_735_689_600  # 2025-01-01T00:00:00Z: a fixed clock keeps every body deterministic.
_API_PREFIX = "/v1"
_MODERATION_MODEL = "omni-moderation-latest"
_ECHO_CHARS = 80

_STATIC_HEADERS: tuple[tuple[str, str], ...] = (
    ("openai-version", "2020-10-01"),
    ("openai-organization", "fake-org"),
    ("openai-processing-ms", "1"),
)
_JSON_HEADERS = (*_STATIC_HEADERS, ("content-type", "application/json"))
_BINARY_HEADERS = (*_STATIC_HEADERS, ("content-type", "application/octet-stream"))
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


def _png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA
    pixels = zlib.compress(b"\x00\x00\x00\x00\x00")  # filter byte + one transparent pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG_BYTES = _png_1x1()
"""The image every generation returns: a valid 1x1 transparent PNG."""
_PNG_B64 = base64.b64encode(PNG_BYTES).decode("ascii")


def _wav_silence(samples: int = 16) -> bytes:
    data = b"\x00\x00" * samples
    fmt = struct.pack("<HHIIHH", 1, 1, 24_000, 48_000, 2, 16)  # PCM mono 24 kHz 16-bit
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


_SPEECH: Mapping[str, tuple[str, bytes]] = {
    "mp3": ("audio/mpeg", b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xf3\x14\xc4" + bytes(16)),
    "opus": ("audio/ogg", b"OggS\x00\x02" + bytes(20)),
    "aac": ("audio/aac", b"\xff\xf1\x50\x80" + bytes(16)),
    "flac": ("audio/flac", b"fLaC" + bytes(20)),
    "wav": ("audio/wav", _wav_silence()),
    "pcm": ("audio/pcm", bytes(32)),
}

_MODELS: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "system"),
    ("gpt-4o-mini", "system"),
    ("gpt-4.1", "system"),
    ("gpt-4.1-mini", "system"),
    ("o4-mini", "system"),
    ("gpt-3.5-turbo-instruct", "system"),
    ("text-embedding-3-small", "system"),
    ("text-embedding-3-large", "system"),
    ("omni-moderation-latest", "system"),
    ("gpt-image-1", "system"),
    ("dall-e-3", "system"),
    ("tts-1", "system"),
    ("gpt-4o-mini-tts", "system"),
)
_MODEL_OBJECTS: Mapping[str, JSON] = {
    model_id: {"id": model_id, "object": "model", "created": _CREATED, "owned_by": owner}
    for model_id, owner in _MODELS
}
_MODEL_LIST_BODY = _dumps({"object": "list", "data": list(_MODEL_OBJECTS.values())}).encode()

_CLEAN_SCORES: Mapping[str, float] = dict.fromkeys(MODERATION_CATEGORIES, LOW_SCORE)
_TEXT_TYPES: Mapping[str, list[str]] = {c: ["text"] for c in MODERATION_CATEGORIES}
_IMAGE_TYPES: Mapping[str, list[str]] = {
    c: (["image"] if c in _IMAGE_CATEGORIES else []) for c in MODERATION_CATEGORIES
}
_MIXED_TYPES: Mapping[str, list[str]] = {
    c: (["text", "image"] if c in _IMAGE_CATEGORIES else ["text"]) for c in MODERATION_CATEGORIES
}


def _moderation_result(scores: Mapping[str, float], applied: Mapping[str, list[str]]) -> str:
    categories = {c: scores[c] >= FLAG_THRESHOLD for c in scores}
    return _dumps(
        {
            "flagged": any(categories.values()),
            "categories": categories,
            "category_scores": dict(scores),
            "category_applied_input_types": dict(applied),
        }
    )


# Most moderated text is clean: serialise that result once.
_CLEAN_TEXT_RESULT = _moderation_result(_CLEAN_SCORES, _TEXT_TYPES)

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


def _form_fields(content: bytes, content_type: str) -> JSON:
    """The fields of a ``multipart/form-data`` body; a file field becomes
    ``{"filename": ..., "content": bytes}``."""
    boundary = content_type.partition("boundary=")[2].strip('"').encode()
    fields: JSON = {}
    for part in content.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part[2:].partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        disposition = next(
            (
                line
                for line in head.decode().split("\r\n")
                if line.lower().startswith("content-disposition")
            ),
            "",
        )
        params = dict(
            item.strip().split("=", 1) for item in disposition.split(";")[1:] if "=" in item
        )
        name = params.get("name", "").strip('"')
        if "filename" in params:
            fields[name] = {"filename": params["filename"].strip('"'), "content": data}
        else:
            fields[name] = data.decode()
    return fields


def _error_event(status: int, message: str | None = None) -> JSON:
    """An ``error`` event of the Responses WebSocket."""
    return {"type": "error", "status": status, **_error_body(status, message)}


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


def _embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``, exact in float32 (so base64 round-trips)."""
    digest = b""
    counter = 0
    while len(digest) < dims:
        digest += hashlib.blake2b(f"{counter}:{text}".encode(), digest_size=64).digest()
        counter += 1
    raw = [(b - 127.5) / 127.5 for b in digest[:dims]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    packed = struct.pack(f"<{dims}f", *(x / norm for x in raw))
    return list(struct.unpack(f"<{dims}f", packed))


class FakeOpenAI(httpx2.BaseTransport, httpx2.AsyncBaseTransport):
    """An offline OpenAI API, usable as the transport of ``httpx2.Client`` / ``AsyncClient``.

    Paths are matched after the API base (a leading ``/v1`` is dropped), so any base URL works.
    Every response carries an ``x-request-id`` header (``req_0001``, ``req_0002``, ...), and the
    ids in bodies follow the same counter. The public attributes may be changed between calls.

    Moderation (``POST /moderations``): a string or a list of strings gets one result per
    string. A list of ``text`` / ``image_url`` objects is one multi-modal input and gets **one**
    combined result (the maximum score over its parts), as the real endpoint does; more than one
    image in a request is a 400 ``too_many_images`` error. A text scores :data:`FLAGGED_SCORE` in
    the category of each ``flag_words`` entry it contains (case-insensitive substring) and
    :data:`LOW_SCORE` elsewhere; ``scores`` pins exact scores for an exact text or image URL. A
    category is flagged at a score of :data:`FLAG_THRESHOLD` or more.

    Model endpoints reply ``"Echo: <last user text>"`` (cut to 80 characters) unless ``reply`` is
    set. A request for structured output (``response_format`` / ``text.format`` of type
    ``json_schema``, as sent by ``chat.completions.parse`` and ``responses.parse``) without a
    ``reply`` gets a minimal instance of the schema (strings ``"text"``, numbers 0, booleans
    false, empty arrays); set ``reply`` to the exact JSON the test needs. Token counts are
    about characters / 4 (at least 1); ``cached_tokens`` and ``reasoning_tokens`` are reported
    as configured (cached capped at the prompt, reasoning added to the output tokens). A
    ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` below the reply's size
    cuts the reply and ends with ``finish_reason="length"`` (Responses: status
    ``"incomplete"``).

    Args:
        flag_words: Substring -> moderation category. Defaults to :data:`DEFAULT_FLAG_WORDS`.
        scores: Exact text or image URL -> ``{category: score}``, overriding ``flag_words``.
        reply: The assistant text every model endpoint returns; ``None`` echoes the input.
        cached_tokens: Prompt tokens reported as cached.
        reasoning_tokens: Output tokens reported as reasoning.
        delay: Seconds to wait before each response (``anyio.sleep`` on the async path).
        tool_arguments: When set, a chat or Responses request that offers function tools (and
            whose ``tool_choice`` is not ``"none"``) and carries no tool output yet is answered
            with a call of its first function tool with these arguments, plain or streamed;
            once a tool output is in the request, the answer is text as usual. This drives an
            agent's tool loop.
        delta_chars: Streamed text comes in deltas of this many characters (default: the
            reply in four deltas), so a test can place a flagged word mid-stream: with
            ``reply="... kill ..."`` the fake's own moderation flags the answer's text (output
            moderation), as it flags any text containing a ``flag_words`` entry.
        event_delay: Seconds between the events of a streamed reply (``anyio.sleep`` on the
            async path), for time-to-first-token measurements.

    Raises:
        ValueError: A ``flag_words`` or ``scores`` entry names an unknown category.

    Example:
        >>> fake = FakeOpenAI(reply="Hi!")
        >>> client = openai.OpenAI(**fake.openai_kwargs())  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        flag_words: Mapping[str, str] | None = None,
        scores: Mapping[str, Mapping[str, float]] | None = None,
        reply: str | None = None,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        delay: float = 0.0,
        tool_arguments: Mapping[str, Any] | None = None,
        delta_chars: int | None = None,
        event_delay: float = 0.0,
    ) -> None:
        self.flag_words: dict[str, str] = dict(
            DEFAULT_FLAG_WORDS if flag_words is None else flag_words
        )
        self.scores: dict[str, dict[str, float]] = {
            key: dict(value) for key, value in (scores or {}).items()
        }
        unknown = (
            set(self.flag_words.values()) | {c for s in self.scores.values() for c in s}
        ) - set(MODERATION_CATEGORIES)
        if unknown:
            raise ValueError(f"unknown moderation categories: {sorted(unknown)}")
        self.reply = reply
        self.cached_tokens = cached_tokens
        self.reasoning_tokens = reasoning_tokens
        self.delay = delay
        self.tool_arguments = dict(tool_arguments) if tool_arguments is not None else None
        if delta_chars is not None and (isinstance(delta_chars, bool) or delta_chars < 1):
            raise ValueError(f"delta_chars must be >= 1 or None, got {delta_chars!r}")
        self.delta_chars = delta_chars
        self.event_delay = event_delay
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._counter = 0
        self._failures: dict[str, deque[_Failure]] = {}
        #: Uploaded files by id: ``{"filename", "purpose", "content"}`` (``content`` in bytes).
        self.files: dict[str, JSON] = {}
        #: Batches by id, as ``GET /batches/{id}`` returns them.
        self.batches: dict[str, JSON] = {}
        self._routes: Mapping[tuple[str, str], Callable[[JSON, int], _Reply]] = {
            ("POST", "/moderations"): self._moderations,
            ("POST", "/chat/completions"): self._chat_completions,
            ("POST", "/responses"): self._responses,
            ("POST", "/completions"): self._completions,
            ("POST", "/embeddings"): self._embeddings,
            ("POST", "/images/generations"): self._images,
            ("POST", "/audio/speech"): self._speech,
            ("POST", "/files"): self._upload_file,
            ("POST", "/batches"): self._create_batch,
        }

    # -- wiring ---------------------------------------------------------------------------

    def openai_kwargs(self) -> OpenAIKwargs:
        """Arguments for ``openai.OpenAI(**...)`` or ``SafeClient(**...)`` served by this fake.

        Returns:
            ``api_key``, ``base_url`` and a new ``httpx2.Client`` using this transport.
        """
        return {
            "api_key": "sk-test",
            "base_url": "http://fake.openai.test/v1",
            "http_client": httpx2.Client(transport=self),
        }

    def async_openai_kwargs(self) -> AsyncOpenAIKwargs:
        """Arguments for ``openai.AsyncOpenAI(**...)`` or ``AsyncSafeClient(**...)``.

        Returns:
            ``api_key``, ``base_url`` and a new ``httpx2.AsyncClient`` using this transport.
        """
        return {
            "api_key": "sk-test",
            "base_url": "http://fake.openai.test/v1",
            "http_client": httpx2.AsyncClient(transport=self),
        }

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve this fake over real HTTP on ``127.0.0.1``, for code that builds its own client.

        A ``ThreadingHTTPServer`` on an ephemeral port answers every request through
        :meth:`handle_request`, so recording, failure injection and ``delay`` work as with the
        transport. Streamed replies go out one SSE event per HTTP chunk, flushed as written.
        An injected ``exception`` closes the connection without an answer, which the SDK sees
        as a connection error. The server stops, and its open connections are closed, when the
        block ends.

        Yields:
            The API base URL, e.g. ``"http://127.0.0.1:54321/v1"``: pass it as ``base_url`` or
            set ``OPENAI_BASE_URL`` to it (with any ``OPENAI_API_KEY``).

        Example::

            with fake.serve() as base_url:
                client = openai.OpenAI(base_url=base_url, api_key="sk-test")
        """
        server = _FakeServer(self)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="safe_openai-fake-server",
            daemon=True,
        )
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}{_API_PREFIX}"
        finally:
            server.shutdown()
            server.close_connections()
            server.server_close()
            thread.join()

    @contextlib.contextmanager
    def serve_websocket(self) -> Iterator[str]:
        """Serve the Responses WebSocket (``responses.connect()``) on ``127.0.0.1``.

        Needs the ``websockets`` package (``openai[realtime]``). Each ``response.create`` is
        answered with the events of a streamed ``POST /responses`` (``response.created``, text
        deltas, ``response.completed`` with usage), echoing its ``stream_id``; each
        ``response.steer`` with ``response.steer.accepted`` and then a successor response
        (``previous_response_id`` set) that answers the steering input. Every event received
        is recorded in :attr:`requests` with method ``"WEBSOCKET"``, and a failure injected on
        ``/responses`` (:meth:`fail`) is answered with an ``error`` event. Only the
        ``/responses`` path is served; other paths are closed with code 1008.

        Yields:
            The WebSocket base URL: pass it as ``websocket_base_url`` to the client.
        """
        from websockets.sync.server import serve

        server = serve(self._websocket_session, "127.0.0.1", 0, compression=None)
        thread = threading.Thread(
            target=server.serve_forever, name="safe_openai-fake-websocket", daemon=True
        )
        thread.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}{_API_PREFIX}"
        finally:
            server.shutdown()
            thread.join()

    def _websocket_session(self, connection: Any) -> None:
        if self._relative(connection.request.path.split("?", 1)[0]) != "/responses":
            connection.close(code=1008, reason="only /responses is served")
            return
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):  # a client that hangs up ends its session
            self._answer_websocket(connection)

    def _answer_websocket(self, connection: Any) -> None:
        models: dict[str, str] = {}
        for message in connection:
            try:
                event = json.loads(message)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                connection.send(_dumps(_error_event(400, "Invalid JSON event.")))
                continue
            headers = dict(connection.request.headers.raw_items())
            headers = {k.lower(): v for k, v in headers.items() if k.lower() != "authorization"}
            with self._lock:
                self._requests.append(RecordedRequest("WEBSOCKET", "/responses", event, headers))
                self._counter += 1
                number = self._counter
                failure = self._take_failure("/responses")
            lane = event.get("stream_id")
            for reply in self._websocket_replies(event, number, failure, models):
                if lane is not None:
                    reply["stream_id"] = lane
                connection.send(_dumps(reply))

    def _websocket_replies(
        self, event: JSON, number: int, failure: _Failure | None, models: dict[str, str]
    ) -> list[JSON]:
        if failure is not None:
            return [_error_event(failure.status)]
        kind = event.get("type")
        if kind == "response.create":
            body = {k: v for k, v in event.items() if k not in ("type", "stream_id")}
        elif kind == "response.steer":
            previous = str(event.get("previous_response_id"))
            accepted = {"type": "response.steer.accepted", "previous_response_id": previous}
            body = {
                "model": models.get(previous, "gpt-4o-mini"),
                "input": event.get("input"),
                "previous_response_id": previous,
            }
            return [accepted, *self._websocket_response(body, number, models)]
        else:
            return [_error_event(400, f"Unknown event type {kind!r}.")]
        return self._websocket_response(body, number, models)

    def _websocket_response(self, body: JSON, number: int, models: dict[str, str]) -> list[JSON]:
        try:
            reply = self._responses({**body, "stream": True}, number)
        except _ApiError as error:
            return [{"type": "error", "status": error.status, **error.body}]
        events = [json.loads(chunk.split(b"data: ", 1)[1]) for chunk in reply.chunks or ()]
        models[f"resp_fake{number:04d}"] = str(body.get("model"))
        return events

    # -- inspection -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def model_requests(self) -> list[RecordedRequest]:
        """Every request except those to ``/moderations``."""
        return [r for r in self.requests if r.path != "/moderations"]

    @property
    def moderation_requests(self) -> list[RecordedRequest]:
        """Every request to ``/moderations``."""
        return [r for r in self.requests if r.path == "/moderations"]

    @property
    def moderation_inputs(self) -> list[str]:
        """Every input sent to moderation, flattened: texts as sent, images as their URL."""
        inputs: list[str] = []
        for request in self.moderation_requests:
            value = (request.json or {}).get("input")
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, str):
                    inputs.append(item)
                elif isinstance(item, dict):
                    if item.get("type") == "text" and isinstance(item.get("text"), str):
                        inputs.append(item["text"])
                    elif item.get("type") == "image_url":
                        inputs.append(str((item.get("image_url") or {}).get("url", "")))
        return inputs

    def reset(self) -> None:
        """Forget recorded requests and pending failures, and restart the id counter."""
        with self._lock:
            self._requests.clear()
            self._failures.clear()
            self._counter = 0

    # -- failure injection ----------------------------------------------------------------

    def fail(
        self,
        path: str,
        status: int = 503,
        *,
        times: int = 1,
        headers: Mapping[str, str] | None = None,
        body: object = None,
        exception: Exception | None = None,
    ) -> None:
        """Make the next ``times`` requests to ``path`` fail.

        Failures queue in call order, and the request is still recorded. The SDK retries 408,
        409, 429 and 5xx itself (twice by default, waiting ``retry-after`` / ``retry-after-ms``
        when given, else about 0.5 s, 1 s): pass ``headers={"retry-after-ms": "1"}`` or build
        the client with ``max_retries=0`` to keep tests fast.

        Args:
            path: The endpoint, e.g. ``"/moderations"`` (``/v1`` prefix optional).
            status: The HTTP status to answer with.
            times: How many consecutive requests fail.
            headers: Extra response headers, e.g. ``{"retry-after": "1"}``.
            body: The response body: a JSON-able value, ``str`` or ``bytes``. Defaults to an
                OpenAI-style ``{"error": {...}}`` for the status.
            exception: Raise this instead of answering (e.g. ``httpx2.ConnectError("down")``).
        """
        failure = _Failure(times, status, headers, body, exception)
        with self._lock:
            self._failures.setdefault(self._relative(path), deque()).append(failure)

    # -- transport ------------------------------------------------------------------------

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        """Answer one request of a sync ``httpx2.Client``."""
        request.read()
        outcome = self._handle(request)
        if self.delay > 0:
            time.sleep(self.delay)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Answer one request of an ``httpx2.AsyncClient``."""
        await request.aread()
        outcome = self._handle(request)
        if self.delay > 0:
            await anyio.sleep(self.delay)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @staticmethod
    def _relative(path: str) -> str:
        path = "/" + path.lstrip("/")
        if path == _API_PREFIX or path.startswith(_API_PREFIX + "/"):
            path = path[len(_API_PREFIX) :] or "/"
        return path.rstrip("/") or "/"

    def _handle(self, request: httpx2.Request) -> httpx2.Response | Exception:
        path = self._relative(request.url.path)
        body: JSON | None = None
        bad_json = False
        content_type = request.headers.get("content-type", "")
        if request.content and "json" in content_type:
            try:
                decoded = json.loads(request.content)
            except ValueError:
                bad_json = True
            else:
                body = decoded if isinstance(decoded, dict) else None
        elif request.content and content_type.startswith("multipart/form-data"):
            body = _form_fields(request.content, content_type)
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() != "authorization"}
        shown = {k: v for k, v in body.items() if k != "file"} if body is not None else None
        recorded = RecordedRequest(request.method, path, shown, headers)

        with self._lock:
            self._requests.append(recorded)
            self._counter += 1
            number = self._counter
            failure = self._take_failure(path)
        request_id = f"req_{number:04d}"

        if failure is not None:
            if failure.exception is not None:
                return failure.exception
            reply = self._failure_reply(failure)
        elif bad_json:
            reply = _json_reply(
                _error_body(400, "We could not parse the JSON body of your request."), 400
            )
        else:
            reply = self._route(request.method, path, body or {}, number)

        response_headers = [*reply.headers, ("x-request-id", request_id)]
        if failure is not None and failure.headers:
            response_headers.extend(failure.headers.items())
        if reply.chunks is not None:
            return httpx2.Response(
                reply.status,
                headers=response_headers,
                stream=_ChunkStream(reply.chunks, self.event_delay),
                request=request,
            )
        return httpx2.Response(
            reply.status, headers=response_headers, content=reply.body, request=request
        )

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
    def _failure_reply(failure: _Failure) -> _Reply:
        if failure.body is None:
            return _json_reply(_error_body(failure.status), failure.status)
        if isinstance(failure.body, bytes | str):
            raw = failure.body.encode() if isinstance(failure.body, str) else failure.body
            return _Reply(status=failure.status, body=raw)
        return _json_reply(failure.body, failure.status)

    def _route(self, method: str, path: str, body: JSON, number: int) -> _Reply:
        handler = self._routes.get((method, path))
        try:
            if handler is not None:
                return handler(body, number)
            if method == "GET" and path.startswith("/files/") and path.endswith("/content"):
                return self._file_content(path[len("/files/") : -len("/content")])
            if method == "GET" and path.startswith("/batches/"):
                return self._batch(path[len("/batches/") :])
            if method == "GET" and path == "/models":
                return _Reply(body=_MODEL_LIST_BODY)
            if method == "GET" and path.startswith("/models/"):
                return self._model(path[len("/models/") :])
        except _ApiError as error:
            return _json_reply(error.body, error.status)
        message = f"Invalid URL ({method} {_API_PREFIX}{path})"
        return _json_reply(_error_body(404, message), 404)

    # -- files and batches ----------------------------------------------------------------

    def run_batch(self, batch_id: str) -> JSON:
        """Run a batch now: answer each request of its input file as the endpoint would, write
        the output file (and an error file for requests that failed) and mark it completed.

        Returns:
            The batch, as ``batches.retrieve`` will now return it.

        Raises:
            KeyError: No such batch.
        """
        with self._lock:
            batch = self.batches[batch_id]
            content: bytes = self.files[batch["input_file_id"]]["content"]
        output: list[bytes] = []
        errors: list[bytes] = []
        for raw in content.splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            with self._lock:
                self._counter += 1
                number = self._counter
            reply = self._route("POST", self._relative(line["url"]), line["body"], number)
            answer = {
                "id": f"batch_req_fake{number:04d}",
                "custom_id": line.get("custom_id"),
                "response": {
                    "status_code": reply.status,
                    "request_id": f"req_{number:04d}",
                    "body": json.loads(reply.body),
                },
                "error": None,
            }
            (output if reply.status == 200 else errors).append(_dumps(answer).encode() + b"\n")
        with self._lock:
            batch["output_file_id"] = self._store_file("batch_output.jsonl", output)
            batch["error_file_id"] = (
                self._store_file("batch_errors.jsonl", errors) if errors else None
            )
            batch["status"] = "completed"
            batch["completed_at"] = _CREATED + 3600
            batch["request_counts"] = {
                "total": len(output) + len(errors),
                "completed": len(output),
                "failed": len(errors),
            }
            return dict(batch)

    def _store_file(
        self, filename: str, lines: Sequence[bytes], purpose: str = "batch_output"
    ) -> str:
        file_id = f"file-fake{len(self.files) + 1:04d}"
        self.files[file_id] = {"filename": filename, "purpose": purpose, "content": b"".join(lines)}
        return file_id

    @staticmethod
    def _file_object(file_id: str, entry: JSON) -> JSON:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(entry["content"]),
            "created_at": _CREATED,
            "filename": entry["filename"],
            "purpose": entry["purpose"],
            "status": "processed",
        }

    def _upload_file(self, body: JSON, number: int) -> _Reply:
        upload = body.get("file")
        if not isinstance(upload, dict) or not isinstance(body.get("purpose"), str):
            raise _ApiError(400, "A file and a purpose are required.", param="file")
        with self._lock:
            file_id = self._store_file(upload["filename"], [upload["content"]], body["purpose"])
            return _json_reply(self._file_object(file_id, self.files[file_id]))

    def _file_content(self, file_id: str) -> _Reply:
        with self._lock:
            entry = self.files.get(file_id)
        if entry is None:
            raise _ApiError(404, f"No such File object: {file_id}")
        return _Reply(body=entry["content"], headers=_BINARY_HEADERS)

    def _create_batch(self, body: JSON, number: int) -> _Reply:
        self._require(body, "input_file_id", "endpoint", "completion_window")
        with self._lock:
            if body["input_file_id"] not in self.files:
                raise _ApiError(404, f"No such File object: {body['input_file_id']}")
            batch_id = f"batch_fake{number:04d}"
            self.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "status": "in_progress",
                "created_at": _CREATED,
                "output_file_id": None,
                "error_file_id": None,
                "metadata": body.get("metadata"),
            }
            return _json_reply(self.batches[batch_id])

    def _batch(self, batch_id: str) -> _Reply:
        with self._lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            raise _ApiError(404, f"No such Batch object: {batch_id}")
        return _json_reply(batch)

    # -- helpers shared by the model endpoints ---------------------------------------------

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

    # -- endpoints ------------------------------------------------------------------------

    def _score(self, key: str, text: str | None) -> dict[str, float] | None:
        """Scores for one text or image URL, or ``None`` when it is entirely clean."""
        scores: dict[str, float] | None = None
        if text:
            lowered = text.lower()
            for word, category in self.flag_words.items():
                if word.lower() in lowered:
                    scores = scores or dict(_CLEAN_SCORES)
                    scores[category] = FLAGGED_SCORE
        pinned = self.scores.get(key)
        if pinned:
            scores = scores or dict(_CLEAN_SCORES)
            scores.update(pinned)
        return scores

    def _moderations(self, body: JSON, number: int) -> _Reply:
        self._require(body, "input")
        value = body["input"]
        model = body.get("model") or _MODERATION_MODEL
        results: list[str]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise _ApiError(400, "Invalid value for 'input'.", param="input")
        if all(isinstance(item, str) for item in value):
            results = []
            for text in value:
                scores = self._score(text, text)
                results.append(
                    _CLEAN_TEXT_RESULT
                    if scores is None
                    else _moderation_result(scores, _TEXT_TYPES)
                )
        elif all(isinstance(item, dict) for item in value):
            results = [self._multimodal_result(value)]
        else:
            raise _ApiError(400, "Invalid value for 'input'.", param="input")
        text = (
            f'{{"id":"modr-fake{number:04d}","model":{_dumps(model)},'
            f'"results":[{",".join(results)}]}}'
        )
        return _Reply(body=text.encode())

    def _multimodal_result(self, items: list[JSON]) -> str:
        images = [item for item in items if item.get("type") == "image_url"]
        if len(images) > 1:
            raise _ApiError(
                400,
                f"Number of images ({len(images)}) exceeds maximum of 1",
                param="input",
                code="too_many_images",
            )
        combined = dict(_CLEAN_SCORES)
        has_text = False
        for item in items:
            kind = item.get("type")
            if kind == "text" and isinstance(item.get("text"), str):
                has_text = True
                scores = self._score(item["text"], item["text"])
            elif kind == "image_url":
                url = (item.get("image_url") or {}).get("url")
                if not isinstance(url, str):
                    raise _ApiError(400, "Invalid value for 'image_url'.", param="input")
                scores = self._score(url, None)
            else:
                raise _ApiError(400, f"Invalid input type: {kind!r}.", param="input")
            for category, score in (scores or {}).items():
                combined[category] = max(combined.get(category, 0.0), score)
        if images and has_text:
            applied = _MIXED_TYPES
        elif images:
            applied = _IMAGE_TYPES
        else:
            applied = _TEXT_TYPES
        return _moderation_result(combined, applied)

    def _chat_completions(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model", "messages")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "Invalid value for 'messages'.", param="messages")
        prompt_chars = 0
        user_text = ""
        for message in messages:
            if not isinstance(message, dict):
                raise _ApiError(400, "Invalid value for 'messages'.", param="messages")
            text = _content_text(message.get("content"))
            prompt_chars += len(text)
            if message.get("role") == "user":
                user_text = text
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        json_object = isinstance(fmt, dict) and fmt.get("type") == "json_object"
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        text, output_tokens, cut = self._limit(
            self._reply_text(user_text, schema, json_object), limit
        )
        finish = "length" if cut else "stop"
        n = body.get("n") or 1
        model = body["model"]
        completion_id = f"chatcmpl-fake{number:04d}"
        tool = self._tool_to_call(body, messages, "chat")
        if tool is not None:
            arguments = _dumps(self.tool_arguments)
            usage = self._chat_usage(prompt_chars, _tokens(len(arguments)))
            return self._chat_tool_call(body, completion_id, tool, arguments, usage, number)
        usage = self._chat_usage(prompt_chars, output_tokens * n)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise _ApiError(400, "Invalid type for 'stream_options'.", param="stream_options")
            return self._chat_stream(
                completion_id, model, text, finish, n, usage, bool(options.get("include_usage"))
            )
        return _json_reply(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": _CREATED,
                "model": model,
                "choices": [
                    {
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for index in range(n)
                ],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
        )

    def _chat_stream(
        self,
        completion_id: str,
        model: str,
        text: str,
        finish: str,
        n: int,
        usage: JSON,
        include_usage: bool,
    ) -> _Reply:
        def chunk(choices: list[JSON]) -> bytes:
            value: JSON = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": _CREATED,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if include_usage:
                value["usage"] = None
            return _sse_data(value)

        def choice(index: int, delta: JSON, finish_reason: str | None = None) -> JSON:
            return {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }

        chunks: list[bytes] = []
        for index in range(n):
            first = {"role": "assistant", "content": "", "refusal": None}
            chunks.append(chunk([choice(index, first)]))
            chunks.extend(
                chunk([choice(index, {"content": piece})])
                for piece in _split_deltas(text, size=self.delta_chars)
            )
            chunks.append(chunk([choice(index, {}, finish)]))
        if include_usage:
            final: JSON = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": _CREATED,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": usage,
            }
            chunks.append(_sse_data(final))
        chunks.append(_SSE_DONE)
        return _Reply(chunks=chunks, headers=_SSE_HEADERS)

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

    @staticmethod
    def _chat_tool_call(
        body: JSON, completion_id: str, name: str, arguments: str, usage: JSON, number: int
    ) -> _Reply:
        call = {
            "id": f"call_fake{number:04d}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        head: JSON = {
            "id": completion_id,
            "created": _CREATED,
            "model": body["model"],
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
            return _json_reply(
                {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            )

        def chunk(delta: JSON, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse_data({**head, "object": "chat.completion.chunk", "choices": [choice]})

        opening = {**call, "index": 0, "function": {"name": name, "arguments": ""}}
        chunks = [
            chunk({"role": "assistant", "content": None, "tool_calls": [opening]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
            chunk({}, "tool_calls"),
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(
                _sse_data(
                    {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                )
            )
        return _Reply(chunks=[*chunks, _SSE_DONE], headers=_SSE_HEADERS)

    def _completions(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model", "prompt")
        prompt = body["prompt"]
        prompts: list[str]
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:  # token ids: one prompt, counted as tokens
            prompts = [" " * (4 * len(prompt) if isinstance(prompt, list) else 0)]
        completion_id = f"cmpl-fake{number:04d}"
        model = body["model"]
        choices: list[JSON] = []
        output_tokens = 0
        for index, text in enumerate(prompts):
            reply, tokens, cut = self._limit(
                self._reply_text(text.strip(), None), body.get("max_tokens")
            )
            output_tokens += tokens
            choices.append(
                {
                    "index": index,
                    "text": reply,
                    "logprobs": None,
                    "finish_reason": "length" if cut else "stop",
                }
            )
        usage = self._chat_usage(sum(len(p) for p in prompts), output_tokens)
        envelope: JSON = {
            "id": completion_id,
            "object": "text_completion",
            "created": _CREATED,
            "model": model,
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            return _json_reply({**envelope, "choices": choices, "usage": usage})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra: JSON = {"usage": None} if include_usage else {}
        chunks: list[bytes] = []
        for choice in choices:
            for piece in _split_deltas(choice["text"], size=self.delta_chars):
                delta = {"index": choice["index"], "text": piece, "logprobs": None}
                chunks.append(
                    _sse_data({**envelope, **extra, "choices": [{**delta, "finish_reason": None}]})
                )
            end = {"index": choice["index"], "text": "", "logprobs": None}
            chunks.append(
                _sse_data(
                    {
                        **envelope,
                        **extra,
                        "choices": [{**end, "finish_reason": choice["finish_reason"]}],
                    }
                )
            )
        if include_usage:
            chunks.append(_sse_data({**envelope, "choices": [], "usage": usage}))
        chunks.append(_SSE_DONE)
        return _Reply(chunks=chunks, headers=_SSE_HEADERS)

    def _responses(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model")
        instructions = body.get("instructions")
        prompt_chars = len(instructions) if isinstance(instructions, str) else 0
        user_text = ""
        value = body.get("input")
        if isinstance(value, str):
            prompt_chars += len(value)
            user_text = value
        elif isinstance(value, list):
            for item in value:
                if not isinstance(item, dict):
                    raise _ApiError(400, "Invalid value for 'input'.", param="input")
                text = _content_text(item.get("content"))
                if isinstance(item.get("output"), str):
                    text = item["output"]
                prompt_chars += len(text)
                if item.get("role") == "user":
                    user_text = text
        fmt = (body.get("text") or {}).get("format") or {}
        schema = fmt.get("schema") if fmt.get("type") == "json_schema" else None
        text, output_tokens, cut = self._limit(
            self._reply_text(user_text, schema, fmt.get("type") == "json_object"),
            body.get("max_output_tokens"),
        )
        prompt, cached, output, reasoning = self._usage_numbers(prompt_chars, output_tokens)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + output,
        }
        status = "incomplete" if cut else "completed"
        message_id = f"msg_fake{number:04d}"
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {
            "id": message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [part],
        }
        response: JSON = {
            "id": f"resp_fake{number:04d}",
            "object": "response",
            "created_at": _CREATED,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": instructions,
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": body["model"],
            "output": [item],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": fmt or {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []),
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": usage,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }
        tool = self._tool_to_call(body, value, "responses")
        if tool is not None:
            arguments = _dumps(self.tool_arguments)
            call: JSON = {
                "id": f"fc_fake{number:04d}",
                "type": "function_call",
                "call_id": f"call_fake{number:04d}",
                "name": tool,
                "arguments": arguments,
                "status": "completed",
            }
            tokens = _tokens(len(arguments))
            usage["output_tokens"], usage["total_tokens"] = tokens, prompt + tokens
            response.update(status="completed", incomplete_details=None, output=[call])
            if not body.get("stream"):
                return _json_reply(response)
            return self._responses_tool_stream(response, call)
        if not body.get("stream"):
            return _json_reply(response)
        return self._responses_stream(response, item, part)

    @staticmethod
    def _responses_tool_stream(response: JSON, call: JSON) -> _Reply:
        pending = {**response, "status": "in_progress", "output": [], "usage": None}
        where: JSON = {"item_id": call["id"], "output_index": 0}
        events: list[JSON] = [
            {"type": "response.created", "response": pending},
            {"type": "response.in_progress", "response": pending},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**call, "arguments": "", "status": "in_progress"},
            },
            {"type": "response.function_call_arguments.delta", **where, "delta": call["arguments"]},
            {
                "type": "response.function_call_arguments.done",
                **where,
                "name": call["name"],
                "arguments": call["arguments"],
            },
            {"type": "response.output_item.done", "output_index": 0, "item": call},
            {"type": "response.completed", "response": response},
        ]
        chunks = [_sse_event({**event, "sequence_number": n}) for n, event in enumerate(events)]
        return _Reply(chunks=chunks, headers=_SSE_HEADERS)

    def _responses_stream(self, response: JSON, item: JSON, part: JSON) -> _Reply:
        pending = {
            **response,
            "status": "in_progress",
            "output": [],
            "usage": None,
            "incomplete_details": None,
        }
        item_id = item["id"]
        where: JSON = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events: list[JSON] = [
            {"type": "response.created", "response": pending},
            {"type": "response.in_progress", "response": pending},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {
                "type": "response.content_part.added",
                **where,
                "part": {**part, "text": ""},
            },
        ]
        events.extend(
            {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
            for piece in _split_deltas(part["text"], size=self.delta_chars)
        )
        events += [
            {"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {
                "type": "response.incomplete"
                if response["status"] == "incomplete"
                else "response.completed",
                "response": response,
            },
        ]
        chunks = [
            _sse_event({**event, "sequence_number": sequence})
            for sequence, event in enumerate(events)
        ]
        return _Reply(chunks=chunks, headers=_SSE_HEADERS)

    def _embeddings(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model", "input")
        value = body["input"]
        texts: list[str]
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            texts = list(value)
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            texts = [_dumps(value)]
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            texts = [_dumps(v) for v in value]
        else:
            raise _ApiError(400, "Invalid value for 'input'.", param="input")
        dims = body.get("dimensions") or 8
        if not isinstance(dims, int) or dims < 1:
            raise _ApiError(400, "Invalid value for 'dimensions'.", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        data: list[JSON] = []
        for index, text in enumerate(texts):
            vector = _embedding(text, dims)
            encoded: object = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode("ascii")
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(_tokens(len(t)) for t in texts)
        return _json_reply(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _images(self, body: JSON, number: int) -> _Reply:
        self._require(body, "prompt")
        count = body.get("n") or 1
        as_url = body.get("response_format") == "url"
        image: JSON = (
            {"url": f"https://fake.openai.test/images/img_fake{number:04d}.png"}
            if as_url
            else {"b64_json": _PNG_B64}
        )
        prompt_tokens = _tokens(len(str(body["prompt"])))
        return _json_reply(
            {
                "created": _CREATED,
                "data": [dict(image) for _ in range(count)],
                "background": "opaque",
                "output_format": "png",
                "quality": "low",
                "size": body.get("size") or "1024x1024",
                "usage": {
                    "input_tokens": prompt_tokens,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt_tokens},
                    "output_tokens": 272 * count,
                    "output_tokens_details": {"image_tokens": 272 * count, "text_tokens": 0},
                    "total_tokens": prompt_tokens + 272 * count,
                },
            }
        )

    def _speech(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model", "input", "voice")
        fmt = body.get("response_format") or "mp3"
        if fmt not in _SPEECH:
            raise _ApiError(
                400, f"Invalid value for 'response_format': {fmt!r}.", param="response_format"
            )
        content_type, audio = _SPEECH[fmt]
        return _Reply(body=audio, headers=(*_STATIC_HEADERS, ("content-type", content_type)))

    @staticmethod
    def _model(model_id: str) -> _Reply:
        model = _MODEL_OBJECTS.get(model_id)
        if model is None:
            raise _ApiError(
                404,
                f"The model '{model_id}' does not exist or you do not have access to it.",
                param=None,
                code="model_not_found",
            )
        return _json_reply(model)


class _FakeServer(ThreadingHTTPServer):
    """The loopback HTTP server of :meth:`FakeOpenAI.serve`; it tracks its connections so
    they can be closed when the block ends (keep-alive threads would otherwise linger).
    """

    daemon_threads = True

    def __init__(self, fake: FakeOpenAI) -> None:
        super().__init__(("127.0.0.1", 0), _FakeRequestHandler)
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        # Without TCP_NODELAY, a reply written in pieces waits on the client's delayed ACK.
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (or the block ending) is not an error of the fake.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Unblock every handler thread still waiting on a kept-alive connection."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _FakeRequestHandler(BaseHTTPRequestHandler):
    """Turns one HTTP request into an ``httpx2.Request`` for the fake, and writes its answer."""

    protocol_version = "HTTP/1.1"
    server: _FakeServer
    # Hop-by-hop and framing headers: this handler sets its own.
    _SKIP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

    def do_GET(self) -> None:
        self._answer()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests read the fake's records, not an access log on stderr."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _answer(self) -> None:
        body = self._read_body()
        headers = [(name, value) for name, value in self.headers.items()]
        host = f"127.0.0.1:{self.server.server_address[1]}"
        request = httpx2.Request(
            self.command, f"http://{host}{self.path}", headers=headers, content=body
        )
        try:
            response = self.server.fake.handle_request(request)
        except Exception:
            # An injected exception: drop the connection, as a network failure would.
            self.close_connection = True
            return
        try:
            self._write(response)
        except ConnectionError:
            # The client went away mid-answer (an abandoned stream), or the block ended.
            self.close_connection = True
        finally:
            response.close()

    def _write(self, response: httpx2.Response) -> None:
        self.send_response(response.status_code)
        for name, value in response.headers.multi_items():
            if name.lower() not in self._SKIP_HEADERS:
                self.send_header(name, value)
        if "content-length" in response.headers:
            content = response.read()
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
            self.wfile.flush()
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for chunk in response.iter_raw():
            if chunk:
                self.wfile.write(b"%X\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional for non-fixture use
    pass
else:

    @pytest.fixture
    def fake_openai() -> FakeOpenAI:
        """A fresh :class:`FakeOpenAI` for one test.

        Register it with ``pytest_plugins = ["safe_openai.testing"]`` in the root
        ``conftest.py``, then build clients from ``fake_openai.openai_kwargs()``.
        """
        return FakeOpenAI()
