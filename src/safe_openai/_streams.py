"""Usage capture on streams: watch each event, hide the usage chunk nobody asked for, and record
usage exactly once when the stream ends, whether it is read to the end, closed, broken out of,
fails, or is garbage-collected unread (then the usage is an estimate, marked ``estimated``).

Under output moderation the tap also carries the stream's output windows
(:class:`~safe_openai._output.OutputWindows`): in ``"block"`` mode events are held and released
window by window, each window moderated first (a flag ends the stream with ``OutputBlocked``);
in ``"record"`` mode events flow as they come and the whole output is moderated once when the
stream ends or is closed. Usage is noted as each event arrives, so a stream that is blocked, or
whose last events are never released, still records what it spent.

The stream classes subclass the SDK's ``Stream`` / ``AsyncStream``, so callers still get the
SDK's own type. They reach their call's :class:`UsageTap` through the httpx request's
extensions, which works in every SDK mode (plain, ``with_raw_response``,
``with_streaming_response``) because each mode builds its stream from the same response.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import httpx2
from openai import AsyncStream, Stream
from openai._streaming import extract_stream_chunk_type

from ._log import get_logger
from ._output import OutputWindows
from .errors import SafeOpenAIError, UnguardedPathError
from .usage import Outcome, TokenUsage, token_usage_from_payload

__all__ = [
    "TAP_KEY",
    "GuardedAsyncStream",
    "GuardedStream",
    "UsageTap",
    "guarded_stream_cls",
    "run_soon",
    "windowed_bytes_only",
]

log = get_logger()

#: Key of the :class:`UsageTap` in ``httpx2.Request.extensions``.
TAP_KEY = "safe_openai.tap"

_T = TypeVar("_T")

Finisher = Callable[[Outcome, "TokenUsage | None", "str | None", int], None]
AsyncFinisher = Callable[[Outcome, "TokenUsage | None", "str | None", int], Awaitable[None]]
#: Moderates output texts of the call (the request id for the error); raises to block.
Checker = Callable[[list[str], "str | None"], None]
AsyncChecker = Callable[[list[str], "str | None"], Awaitable[None]]

_USAGE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class UsageTap:
    """Watches the events of one streamed call and ends it exactly once.

    Args:
        hide_usage_chunk: Drop the chat usage-only chunk (the caller did not ask for it).
        finisher: Records the usage (sync client).
        async_finisher: Records the usage (async client).
        windows: The output windows, when the call's output is moderated.
        check: Moderates output texts (sync client).
        async_check: Moderates output texts (async client).
    """

    def __init__(
        self,
        *,
        hide_usage_chunk: bool,
        finisher: Finisher | None = None,
        async_finisher: AsyncFinisher | None = None,
        windows: OutputWindows | None = None,
        check: Checker | None = None,
        async_check: AsyncChecker | None = None,
    ) -> None:
        self.hide_usage_chunk = hide_usage_chunk
        self.windows = windows
        self._check = check
        self._async_check = async_check
        self._said_checked = False
        #: A guarded stream was built on the response (its bytes are read through windows).
        self.bound = False
        self.usage: TokenUsage | None = None
        self.output_chars = 0
        self.request_id: str | None = None
        #: The model that answered, as the stream's events name it.
        self.model: str | None = None
        self._finisher = finisher
        self._async_finisher = async_finisher
        self._ended = False
        self._lock = threading.Lock()
        #: Ends the call if a raw response is dropped without its stream ever being built.
        self.unread: weakref.finalize[Any, Any] | None = None

    def bind(self, response: httpx2.Response) -> None:
        """Take the request id of the response the stream reads; the stream now owns the end."""
        self.request_id = response.headers.get("x-request-id")
        self.bound = True
        if self.unread is not None:
            # ``create(...).parse()`` drops the raw response at once: that must not end a
            # stream that is about to be read.
            self.unread.detach()
            self.unread = None

    def observe(self, item: Any) -> bool:
        """Account for one event. Returns ``True`` when the event must be hidden."""
        kind = getattr(item, "type", None)
        if kind is not None and isinstance(kind, str):
            if kind == "response.output_text.delta":
                delta = getattr(item, "delta", None)
                self.output_chars += len(delta) if isinstance(delta, str) else 0
            elif kind in _USAGE_EVENTS:
                response = getattr(item, "response", None)
                self.usage = token_usage_from_payload(response)
                self.model = getattr(response, "model", None)
            return False
        model = getattr(item, "model", None)
        if isinstance(model, str):
            self.model = model
        choices = getattr(item, "choices", None)
        if choices:
            for choice in choices:
                delta = getattr(choice, "delta", None)
                text = getattr(delta, "content", None) if delta is not None else None
                if text is None:
                    text = getattr(choice, "text", None)
                if isinstance(text, str):
                    self.output_chars += len(text)
        if getattr(item, "usage", None) is not None:
            self.usage = token_usage_from_payload(item)
            return self.hide_usage_chunk and not choices
        return False

    def _claim(self) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._ended = True
            return True

    def _outcome(self) -> Outcome:
        return "ok" if self.usage is not None else "estimated"

    def check_window(self) -> None:
        """Moderate the window that is due (``"block"``); raises when it is blocked."""
        windows = self.windows
        if windows is not None and self._check is not None:
            self._check(windows.texts(), self.request_id)
            windows.judged()

    async def acheck_window(self) -> None:
        """Moderate the window that is due (``"block"``, async client)."""
        windows = self.windows
        if windows is not None and self._async_check is not None:
            await self._async_check(windows.texts(), self.request_id)
            windows.judged()

    def _said(self) -> list[str] | None:
        """The whole output to moderate once at the end (``"record"``), or ``None``."""
        windows = self.windows
        if windows is None or windows.hold or self._said_checked:
            return None
        self._said_checked = True
        return windows.said()

    def end(self, *, moderate: bool = True) -> None:
        """Record the usage now (sync client), once; under ``"record"``, moderate the output
        first (not from a finalizer)."""
        said = self._said() if moderate else None
        if said and self._check is not None:
            try:
                self._check(said, self.request_id)
            except Exception:
                log.exception("safe_openai.output_check_failed")
        if self._finisher is not None and self._claim():
            self._finisher(self._outcome(), self.usage, self.request_id, self.output_chars)

    async def aend(self, *, moderate: bool = True) -> None:
        """Record the usage now (async client), once (see :meth:`end`)."""
        said = self._said() if moderate else None
        if said and self._async_check is not None:
            try:
                await self._async_check(said, self.request_id)
            except Exception:
                log.exception("safe_openai.output_check_failed")
        if self._async_finisher is not None and self._claim():
            await self._async_finisher(
                self._outcome(), self.usage, self.request_id, self.output_chars
            )

    def end_soon(self) -> None:
        """Record the usage from a finalizer: now for sync, as a task on the loop for async."""
        if self._finisher is not None:
            self.end(moderate=False)
        else:
            run_soon(lambda: self.aend(moderate=False))


_PENDING: set[asyncio.Task[None]] = set()


def run_soon(finisher: Callable[[], Awaitable[None]]) -> None:
    """Run an async finisher from a finalizer: as a task on the running loop, or on a loop of
    its own when none runs (interpreter shutdown, GC in a plain thread)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None and not loop.is_closed():
        task: asyncio.Task[None] = loop.create_task(finisher())  # type: ignore[arg-type]
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)
    else:
        _run_detached(finisher())


def _run_detached(coro: Awaitable[None]) -> None:
    """Run a finisher with no running loop (interpreter shutdown, GC in a plain thread)."""

    async def run() -> None:
        await coro

    # The store may be bound to a dead loop; the finisher spools what it cannot write.
    with contextlib.suppress(Exception):
        asyncio.run(run())


def _check_window(tap: UsageTap, windows: OutputWindows, iterator: Iterator[Any]) -> None:
    """Moderate the due window; when it blocks as the answer ends, read the answer's tail (its
    usage event) without delivering it, so the real usage is recorded, not an estimate."""
    try:
        tap.check_window()
    except SafeOpenAIError:
        if windows.closing:
            with contextlib.suppress(Exception):
                for item in iterator:
                    tap.observe(item)
        raise


async def _acheck_window(
    tap: UsageTap, windows: OutputWindows, iterator: AsyncIterator[Any]
) -> None:
    """:func:`_check_window` for the async client."""
    try:
        await tap.acheck_window()
    except SafeOpenAIError:
        if windows.closing:
            with contextlib.suppress(Exception):
                async for item in iterator:
                    tap.observe(item)
        raise


def _tap_sync(iterator: Iterator[_T], tap: UsageTap) -> Iterator[_T]:
    windows = tap.windows
    if windows is None or not windows.hold:
        try:
            for item in iterator:
                if not tap.observe(item):
                    if windows is not None:
                        windows.add(item)
                    yield item
        finally:
            tap.end()
        return
    try:
        for item in iterator:
            if tap.observe(item):
                continue
            windows.add(item)
            if windows.due:
                _check_window(tap, windows, iterator)
            yield from windows.release()
        windows.end()
        if windows.due:
            _check_window(tap, windows, iterator)
        yield from windows.release()
    except BaseException:
        # Blocked, failed or abandoned: what is held is never delivered; stop the answer.
        close = getattr(iterator, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        raise
    finally:
        tap.end()


async def _tap_async(iterator: AsyncIterator[_T], tap: UsageTap) -> AsyncIterator[_T]:
    windows = tap.windows
    if windows is None or not windows.hold:
        try:
            async for item in iterator:
                if not tap.observe(item):
                    if windows is not None:
                        windows.add(item)
                    yield item
        finally:
            await tap.aend()
        return
    try:
        async for item in iterator:
            if tap.observe(item):
                continue
            windows.add(item)
            if windows.due:
                await _acheck_window(tap, windows, iterator)
            for released in windows.release():
                yield released
        windows.end()
        if windows.due:
            await _acheck_window(tap, windows, iterator)
        for released in windows.release():
            yield released
    except BaseException:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        raise
    finally:
        await tap.aend()


class GuardedStream(Stream[_T], Generic[_T]):
    """The SDK's ``Stream``, with usage recorded once and the unasked usage chunk hidden."""

    def __init__(
        self, *, cast_to: type[_T], response: httpx2.Response, client: Any, options: Any = None
    ) -> None:
        super().__init__(cast_to=cast_to, response=response, client=client, options=options)
        tap = response.request.extensions.get(TAP_KEY)
        self._safe_tap: UsageTap | None = tap if isinstance(tap, UsageTap) else None
        if self._safe_tap is not None:
            self._safe_tap.bind(response)
            self._iterator = _tap_sync(self._iterator, self._safe_tap)
            weakref.finalize(self, self._safe_tap.end_soon)

    def close(self) -> None:
        """Close the response; a stream closed before its end records an estimate."""
        try:
            super().close()
        finally:
            if self._safe_tap is not None:
                self._safe_tap.end()


class GuardedAsyncStream(AsyncStream[_T], Generic[_T]):
    """The SDK's ``AsyncStream``, with usage recorded once and the unasked usage chunk hidden."""

    def __init__(
        self, *, cast_to: type[_T], response: httpx2.Response, client: Any, options: Any = None
    ) -> None:
        super().__init__(cast_to=cast_to, response=response, client=client, options=options)
        tap = response.request.extensions.get(TAP_KEY)
        self._safe_tap: UsageTap | None = tap if isinstance(tap, UsageTap) else None
        if self._safe_tap is not None:
            self._safe_tap.bind(response)
            self._iterator = _tap_async(self._iterator, self._safe_tap)
            weakref.finalize(self, self._safe_tap.end_soon)

    async def close(self) -> None:
        """Close the response; a stream closed before its end records an estimate."""
        try:
            await super().close()
        finally:
            if self._safe_tap is not None:
                await self._safe_tap.aend()


def guarded_stream_cls(stream_cls: Any, *, is_async: bool) -> Any:
    """The guarded twin of an SDK stream class such as ``Stream[ChatCompletionChunk]``."""
    chunk = extract_stream_chunk_type(stream_cls)
    return GuardedAsyncStream[chunk] if is_async else GuardedStream[chunk]  # type: ignore[valid-type]


class _WindowedBytes(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """The body of a streamed raw response under ``"block"``: read only by the stream its
    ``parse()`` builds, whose windows moderate it; read any other way, it refuses."""

    def __init__(self, inner: Any, tap: UsageTap) -> None:
        self._inner = inner
        self._tap = tap

    def _check(self) -> None:
        if not self._tap.bound:
            raise UnguardedPathError(
                "This streamed answer is moderated before it is delivered (output moderation "
                '"block"): read it through parse(), not as raw bytes or lines.'
            )

    def __iter__(self) -> Iterator[bytes]:
        self._check()
        yield from self._inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._check()
        async for chunk in self._inner:
            yield chunk

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


def windowed_bytes_only(result: object, tap: UsageTap) -> None:
    """Under ``"block"``, let a streamed raw response's body be read only through ``parse()``:
    its bytes read directly (``iter_lines()``, ``iter_bytes()``, ``read()``) would deliver text
    no window judged."""
    windows = tap.windows
    response = getattr(result, "http_response", None)
    if windows is None or not windows.hold or not isinstance(response, httpx2.Response):
        return
    response.stream = _WindowedBytes(response.stream, tap)
