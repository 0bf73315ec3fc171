"""The :class:`FakeOpenAI` transport: wiring, inspection, failure injection and routing; each
API family lives in its own module and is mixed in here."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import httpx2

from safe_openai.policy import MODERATION_CATEGORIES

from ._base import (
    _API_PREFIX,
    JSON,
    AsyncOpenAIKwargs,
    OpenAIKwargs,
    RecordedRequest,
    _ApiError,
    _ChunkStream,
    _error_body,
    _Failure,
    _json_reply,
    _Reply,
)
from ._chat import _ChatAPI
from ._files import _FilesAPI, _form_fields
from ._media import _MODEL_LIST_BODY, _MediaAPI
from ._moderation import DEFAULT_FLAG_WORDS, _ModerationAPI
from ._responses import _ResponsesAPI
from ._server import _LoopbackServer
from ._websocket import _WebSocketAPI


class FakeOpenAI(
    _ModerationAPI,
    _ChatAPI,
    _ResponsesAPI,
    _FilesAPI,
    _MediaAPI,
    _LoopbackServer,
    _WebSocketAPI,
    httpx2.BaseTransport,
    httpx2.AsyncBaseTransport,
):
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
