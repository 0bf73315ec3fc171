"""Web applications: the customer bound per request, refusals as HTTP errors, guarded streams.

Nothing here imports a web framework; the pieces fit any of them (docs/web.md shows FastAPI,
Flask and Django end to end):

- :class:`CustomerMiddleware` (ASGI) and :class:`WSGICustomerMiddleware` bind
  :func:`safe_openai.customer` for the whole request, streamed body included, from a function
  of the request that names its customer (from your authentication, never from a value the
  caller picks).
- :func:`http_error` maps what a guarded call raised to an HTTP status, the refusal's
  ``user_message`` (safe to show the end customer) and headers (``Retry-After``).
- :func:`primed` / :func:`aprimed` start a guarded stream and pull its first event before the
  application answers, so a refusal raised there (a block, a quota, a suspension, a first
  window of output withheld) becomes that HTTP error instead of a ``200`` with an empty body.
- :func:`sse` / :func:`asse` write the events as server-sent events; a refusal in the middle of
  the stream (output moderation withholding a window, the connection to OpenAI failing), after
  the ``200`` went out, ends it with one ``event: error`` whose data is :meth:`HTTPError.body`.

A sketch with FastAPI::

    @app.post("/chat")
    async def chat(question: str) -> StreamingResponse:
        try:
            stream = await aprimed(await ai.chat.completions.create(..., stream=True))
        except openai.OpenAIError as exc:
            error = http_error(exc)
            return JSONResponse(error.body(), error.status, headers=error.headers)
        return StreamingResponse(asse(stream), media_type="text/event-stream")
"""

from __future__ import annotations

import contextvars
import inspect
import json
import re
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    MutableMapping,
)
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

import openai

from ._identity import _customer, customer, validate_customer_id
from ._log import get_logger
from .errors import (
    BatchFileError,
    CustomerSuspended,
    ModerationBlocked,
    ModerationUnavailable,
    PolicyDenied,
    QuotaExceeded,
    SafeOpenAIError,
    StoreError,
    UnpricedModel,
    WebhookInProgress,
    WebhookVerificationError,
    wait_seconds,
)

__all__ = [
    "CustomerMiddleware",
    "HTTPError",
    "WSGICustomerMiddleware",
    "aprimed",
    "asse",
    "carries_output",
    "http_error",
    "primed",
    "sse",
]

log = get_logger()

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

T = TypeVar("T")
U = TypeVar("U")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# -- errors as HTTP answers ---------------------------------------------------------------------


@dataclass(frozen=True)
class HTTPError:
    """How to answer a refused or failed guarded call.

    Attributes:
        status: The HTTP status (see :func:`http_error`).
        code: A stable name of the refusal (``"moderation_blocked"``, ``"quota_exceeded"``...),
            for the application's clients to branch on.
        message: A sentence safe to show the end customer (the error's ``user_message``).
        headers: ``Retry-After`` (whole seconds) when waiting helps, and for a quota refusal
            the ``X-RateLimit-*`` headers of the limit that refused
            (:meth:`~safe_openai.QuotaExceeded.headers`).
    """

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON body: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}

    def sse(self) -> bytes:
        """The error as one server-sent event: ``event: error`` with :meth:`body` as data."""
        return b"event: error\ndata: " + json.dumps(self.body()).encode() + b"\n\n"


_UNAVAILABLE = "The service is temporarily unavailable. Please try again shortly."

# Most specific first: OutputBlocked and BatchBlocked are ModerationBlocked, UnpricedModel is a
# ConfigurationError.
_STATUS: tuple[tuple[type[SafeOpenAIError], int, str], ...] = (
    (ModerationBlocked, 422, "moderation_blocked"),
    (QuotaExceeded, 429, "quota_exceeded"),
    (CustomerSuspended, 403, "customer_suspended"),
    (PolicyDenied, 403, "policy_denied"),
    (UnpricedModel, 403, "model_not_available"),
    (ModerationUnavailable, 503, "moderation_unavailable"),
    (StoreError, 503, "service_unavailable"),
    (WebhookVerificationError, 400, "webhook_rejected"),
    (WebhookInProgress, 409, "webhook_in_progress"),
    (BatchFileError, 400, "invalid_batch_file"),
)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": wait_seconds(seconds)}


def http_error(exc: BaseException) -> HTTPError:
    """The HTTP answer to an error a guarded call raised.

    ======================================== ====== =========================================
    error                                    status notes
    ======================================== ====== =========================================
    ``ModerationBlocked`` (``OutputBlocked``) 422    the content, not the request, is refused
    ``QuotaExceeded``                        429    ``Retry-After``, ``X-RateLimit-*``
    ``CustomerSuspended``                    403    ``Retry-After`` when it ends at a time
    ``PolicyDenied``, ``UnpricedModel``      403
    ``ModerationUnavailable``, ``StoreError`` 503   fail closed: nothing was sent
    ``WebhookVerificationError``             400    not from OpenAI, or not usable
    ``WebhookInProgress``                    409    OpenAI retries and finds it done
    ``BatchFileError``                       400
    any other ``SafeOpenAIError``            500    a set-up error (no customer bound, ...)
    ``openai.RateLimitError`` (from OpenAI)  503    the organisation's limit, not the customer's
    ``openai.APIStatusError`` (from OpenAI)  502
    ``openai.APIConnectionError``, timeout   503
    other ``openai.APIError`` (from OpenAI)  502    an ``error`` event in a stream
    anything else                            500
    ======================================== ====== =========================================

    The message is the error's ``user_message`` for the library's errors and a generic
    sentence for the SDK's: never the prompt, the API key, or OpenAI's own message.

    Args:
        exc: What the call raised.

    Returns:
        The status, code, message and headers to answer with.
    """
    if isinstance(exc, SafeOpenAIError):
        status, code = next(
            ((status, code) for kind, status, code in _STATUS if isinstance(exc, kind)),
            (500, "internal_error"),
        )
        headers: dict[str, str] = {}
        if isinstance(exc, QuotaExceeded):
            headers = exc.headers()  # Retry-After when waiting helps, X-RateLimit-* when known
        elif isinstance(exc, CustomerSuspended) and exc.until is not None:
            left = (exc.until - datetime.now(timezone.utc)).total_seconds()
            headers = _retry_after(left) if left > 0 else {}
        return HTTPError(status, code, exc.user_message, headers)
    if isinstance(exc, openai.RateLimitError):
        return HTTPError(503, "upstream_rate_limited", _UNAVAILABLE)
    if isinstance(exc, openai.APIStatusError):
        return HTTPError(502, "upstream_error", _UNAVAILABLE)
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return HTTPError(503, "upstream_unavailable", _UNAVAILABLE)
    if isinstance(exc, openai.APIError):  # an error event OpenAI sent in a stream
        return HTTPError(502, "upstream_error", _UNAVAILABLE)
    return HTTPError(500, "internal_error", "The request could not be processed.")


# -- streams ------------------------------------------------------------------------------------


def _close(stream: object) -> None:
    close = getattr(stream, "close", None)
    if callable(close):
        close()


async def _aclose(stream: object) -> None:
    close = getattr(stream, "close", None) or getattr(stream, "aclose", None)
    if callable(close):
        result = close()
        if inspect.isawaitable(result):
            await result


#: The streams primed during the request :class:`CustomerMiddleware` is running, which it closes
#: when the request ends: Starlette drops a body it stops sending (the client left) unclosed.
_request_streams: contextvars.ContextVar[weakref.WeakSet[Any] | None] = contextvars.ContextVar(
    "safe_openai_request_streams", default=None
)


def _owned_by_request(events: U) -> U:
    streams = _request_streams.get()
    if streams is not None:
        streams.add(events)
    return events


class _Closing(Iterator[T]):
    """A generator whose ``close()`` also closes what it reads, even before its first step: a
    generator closed unstarted (a framework dropping a body it never began to send) skips its
    own ``finally``."""

    def __init__(self, events: Generator[T, None, None], owned: object) -> None:
        self._events = events
        self._owned = owned

    def __next__(self) -> T:
        return next(self._events)

    def close(self) -> None:
        try:
            self._events.close()
        finally:
            _close(self._owned)


class _AClosing(AsyncIterator[T]):
    """The async twin of :class:`_Closing` (``aclose()``)."""

    def __init__(self, events: AsyncGenerator[T, None], owned: object) -> None:
        self._events = events
        self._owned = owned

    def __anext__(self) -> Awaitable[T]:
        return self._events.__anext__()

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            await _aclose(self._owned)


_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})


def carries_output(event: object) -> bool:
    """Whether a stream event carries the model's output (the default of ``primed(until=)``).

    A chat or completions chunk with text, a refusal, a tool call or a finish reason in a
    choice; a Responses event that is a ``*.delta`` or ends the response; anything else that
    is not one of these shapes. Role chunks, usage-only chunks and ``response.created`` do not.
    """
    choices = getattr(event, "choices", None)
    if isinstance(choices, list):
        for choice in choices:
            delta = getattr(choice, "delta", None)
            if getattr(choice, "finish_reason", None) or getattr(choice, "text", None):
                return True
            if delta is not None and any(
                getattr(delta, name, None) for name in ("content", "refusal", "tool_calls")
            ):
                return True
        return False
    kind = getattr(event, "type", None)
    if isinstance(kind, str):
        return kind.endswith(".delta") or kind in _END_EVENTS
    return True


def _rest(held: list[T], iterator: Iterator[T], stream: object) -> Generator[T, None, None]:
    try:
        yield from held
        held.clear()
        yield from iterator
    finally:
        _close(stream)  # a client that went away: the stream records its usage estimate


def primed(stream: Iterable[T], *, until: Callable[[T], bool] | None = None) -> Iterator[T]:
    """Start a guarded stream now: pull its events up to the first that carries output.

    Call it before the application sends its response headers (before returning the
    ``StreamingResponse``): whatever those first pulls raise is raised here, where it can
    still become an HTTP error (:func:`http_error`): ``OutputBlocked`` when output moderation
    withholds the first window (under ``"block"``, text is held until its window is judged), a
    connection error. Refusals of the request itself (``ModerationBlocked``,
    ``QuotaExceeded``, ``CustomerSuspended``, ...) are raised earlier still, by the call that
    created the stream. Closing the result (a framework does when the client goes away)
    closes the stream, which records its usage.

    Args:
        stream: What ``create(..., stream=True)`` returned, or any iterable of events.
        until: The event to pull up to (included); default :func:`carries_output`, so the
            opening events (a chat role chunk, ``response.created``) do not end the wait.
            ``lambda event: True`` pulls just the first event.

    Returns:
        An iterator of every event, those pulled already included.
    """
    ready = carries_output if until is None else until
    iterator = iter(stream)
    held: list[T] = []
    try:
        for event in iterator:
            held.append(event)
            if ready(event):
                break
    except BaseException:
        _close(stream)
        raise
    return _owned_by_request(_Closing(_rest(held, iterator, stream), stream))


async def _arest(
    held: list[T], iterator: AsyncIterator[T], stream: object
) -> AsyncGenerator[T, None]:
    try:
        for event in held:
            yield event
        held.clear()
        async for event in iterator:
            yield event
    finally:
        await _aclose(stream)


async def aprimed(
    stream: AsyncIterable[T], *, until: Callable[[T], bool] | None = None
) -> AsyncIterator[T]:
    """The async twin of :func:`primed`: ``events = await aprimed(stream)``."""
    ready = carries_output if until is None else until
    iterator = aiter(stream)
    held: list[T] = []
    try:
        async for event in iterator:
            held.append(event)
            if ready(event):
                break
    except BaseException:
        await _aclose(stream)
        raise
    return _owned_by_request(_AClosing(_arest(held, iterator, stream), stream))


def _encode(event: object) -> str:
    dump = getattr(event, "model_dump_json", None)
    if callable(dump):
        return str(dump(exclude_unset=True))
    return json.dumps(event)


# What ends a line in an event stream; str.splitlines() also splits at U+2028, U+0085 and other
# characters that JSON leaves unescaped, which would cut a string of the model's text in two.
_SSE_LINE_END = re.compile("\r\n|\r|\n")


def _frame(data: str) -> bytes:
    lines = _SSE_LINE_END.split(data)
    return b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"


def sse(
    events: Iterable[T],
    *,
    encode: Callable[[T], str] = _encode,
    done: bool = False,
) -> Iterator[bytes]:
    """Server-sent events of a (primed) guarded stream, for a streaming response body.

    Each event becomes one ``data:`` message. A refusal or failure while streaming (an
    ``OutputBlocked`` window, ``ModerationUnavailable`` under output moderation, the
    connection to OpenAI dropping) cannot change the status any more: it ends the stream with
    one ``event: error`` message (:meth:`HTTPError.sse`) instead of cutting the body short
    without a word. The library has logged and recorded it already. Other exceptions (bugs)
    propagate.

    Args:
        events: The events, usually from :func:`primed`.
        encode: Turns one event into the text of its ``data:`` (default: an SDK event's JSON,
            ``json.dumps`` for anything else).
        done: Send ``data: [DONE]`` after the last event, as OpenAI's own streams do.

    Returns:
        The body, one message at a time; closing it closes ``events``, even before its first
        message.
    """
    return _Closing(_sse(events, encode, done), events)


def _sse(
    events: Iterable[T], encode: Callable[[T], str], done: bool
) -> Generator[bytes, None, None]:
    try:
        for event in events:
            yield _frame(encode(event))
    except openai.OpenAIError as exc:
        yield http_error(exc).sse()
        return
    finally:
        _close(events)
    if done:
        yield b"data: [DONE]\n\n"


def asse(
    events: AsyncIterable[T],
    *,
    encode: Callable[[T], str] = _encode,
    done: bool = False,
) -> AsyncIterator[bytes]:
    """The async twin of :func:`sse`."""
    return _AClosing(_asse(events, encode, done), events)


async def _asse(
    events: AsyncIterable[T], encode: Callable[[T], str], done: bool
) -> AsyncGenerator[bytes, None]:
    try:
        async for event in events:
            yield _frame(encode(event))
    except openai.OpenAIError as exc:
        yield http_error(exc).sse()
        return
    finally:
        await _aclose(events)
    if done:
        yield b"data: [DONE]\n\n"


# -- the customer of a request ------------------------------------------------------------------


class CustomerMiddleware:
    """ASGI middleware that binds the request's customer (:func:`safe_openai.customer`) while
    the application handles it, streamed body included, and closes the streams primed during
    the request (:func:`primed`, :func:`aprimed`) that are still open when it ends.

    Works with FastAPI, Starlette and any ASGI framework: ``app.add_middleware(
    CustomerMiddleware, customer_for=...)``. Sync endpoints run in a thread pool that copies the
    context, so they see the binding too. Lifespan events pass through untouched.

    Starlette never closes a streamed body it stops sending: a client that leaves before the
    first message, or between two, leaves the guarded stream (its connection to OpenAI, its
    quota hold) open until garbage collection. This middleware closes it when the request
    ends, which records its usage estimate and frees its hold.

    Args:
        app: The ASGI application.
        customer_for: The request's ASGI scope -> its customer id, or ``None`` for a request
            that has none (then nothing is bound, and a guarded call raises
            ``CustomerRequired`` unless the policy allows anonymous calls). It may be async.
            Read it from what your authentication established (``scope["user"]``, a verified
            token), never from a value the caller picks. Default: bind nothing (for an
            application that binds its customer otherwise, ``client.for_customer(...)``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        customer_for: Callable[[Scope], str | Awaitable[str | None] | None] | None = None,
    ) -> None:
        self.app = app
        self.customer_for = customer_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        streams: weakref.WeakSet[Any] = weakref.WeakSet()
        token = _request_streams.set(streams)
        try:
            found = None if self.customer_for is None else self.customer_for(scope)
            customer_id = await found if inspect.isawaitable(found) else found
            if customer_id is None:
                await self.app(scope, receive, send)
                return
            with customer(customer_id):
                await self.app(scope, receive, send)
        finally:
            _request_streams.reset(token)
            for events in list(streams):  # closing one read to its end again does nothing
                try:
                    await _aclose(events)
                except Exception:
                    log.exception("safe_openai.stream_close_failed")


class WSGICustomerMiddleware:
    """WSGI middleware that binds the request's customer while the application handles it,
    and while the server reads a streamed body from it.

    For Flask (``app.wsgi_app = WSGICustomerMiddleware(app.wsgi_app, customer_for=...)``),
    Django (wrap the ``application`` of ``wsgi.py``) and any WSGI framework. A WSGI body is
    iterated after the application returned, so the binding is a context of its own, entered
    for the call and for each step of the body (a thread reused for another request never
    sees it).

    Args:
        app: The WSGI application.
        customer_for: The request's WSGI ``environ`` -> its customer id, or ``None`` for none
            (see :class:`CustomerMiddleware`).
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        customer_for: Callable[[WSGIEnvironment], str | None],
    ) -> None:
        self.app = app
        self.customer_for = customer_for

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        customer_id = self.customer_for(environ)
        if customer_id is None:
            return self.app(environ, start_response)
        # A context of this request's own: set in it, never reset, dropped with the body.
        context = contextvars.copy_context()
        context.run(_customer.set, validate_customer_id(customer_id))
        return _BoundBody(context.run(self.app, environ, start_response), context)


class _BoundBody:
    """A WSGI body iterated, and closed, inside the request's context."""

    def __init__(self, body: Iterable[bytes], context: contextvars.Context) -> None:
        self._body = body
        self._iterator = context.run(iter, body)
        self._context = context

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        self._context.run(_close, self._body)
