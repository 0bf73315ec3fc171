"""Usage of a JSON body the caller reads at its own pace (``with_streaming_response``).

The SDK hands such a response over unread, so the guard must not read it first: the body is
watched as the caller's read passes through it (a copy of the raw bytes, up to a bound), and
the usage is recorded once, when the read finishes or the response is closed or dropped. A read
that is cut short, a body too large to keep or one that does not parse records an estimate, as
an abandoned stream does; a decoding error reaches the caller while it iterates, as in the SDK.
"""

from __future__ import annotations

import json
import weakref
import zlib
from collections.abc import AsyncIterator, Iterator

import httpx2

from ._streams import UsageTap
from .usage import token_usage_from_payload

__all__ = ["MAX_KEPT_BYTES", "meter_body"]

#: A JSON body larger than this (raw bytes) is not kept: its usage is estimated.
MAX_KEPT_BYTES = 8 * 1024 * 1024


class _Kept:
    """The raw bytes seen so far, until the bound is passed."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False

    def keep(self, chunk: bytes) -> None:
        if self.size <= MAX_KEPT_BYTES:
            self.chunks.append(chunk)
            self.size += len(chunk)
            if self.size > MAX_KEPT_BYTES:
                self.chunks.clear()


def _read_usage(tap: UsageTap, encoding: str, kept: _Kept) -> None:
    """Take the usage from the kept body, if it was read whole and is a JSON payload."""
    if not kept.complete or kept.size > MAX_KEPT_BYTES:
        return
    body = _decoded(b"".join(kept.chunks), encoding)
    if body is None:
        return
    try:
        tap.usage = token_usage_from_payload(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        return


def _decoded(raw: bytes, encoding: str) -> bytes | None:
    """``raw`` without its content encoding; ``None`` for one this module does not decode."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:
            # 32 + MAX_WBITS reads gzip and zlib headers; raw deflate needs negative bits.
            return zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(raw)
        except zlib.error:
            try:
                return zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw)
            except zlib.error:
                return None
    return None


class _MeteredStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, tap: UsageTap, encoding: str) -> None:
        self._inner = inner
        self._tap = tap
        self._encoding = encoding
        self._kept = _Kept()

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._kept.keep(chunk)
            yield chunk
        self._kept.complete = True

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            _read_usage(self._tap, self._encoding, self._kept)
            self._tap.end()


class _AsyncMeteredStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, tap: UsageTap, encoding: str) -> None:
        self._inner = inner
        self._tap = tap
        self._encoding = encoding
        self._kept = _Kept()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._kept.keep(chunk)
            yield chunk
        self._kept.complete = True

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            _read_usage(self._tap, self._encoding, self._kept)
            await self._tap.aend()


def meter_body(response: httpx2.Response, tap: UsageTap, *, is_async: bool) -> bool:
    """Record ``tap``'s call when the caller's read of ``response`` ends. Returns ``False`` when
    the body was already read (the caller then records it at once).
    """
    if hasattr(response, "_content") or response.is_stream_consumed or response.is_closed:
        return False
    tap.request_id = response.headers.get("x-request-id")
    stream = response.stream
    encoding = response.headers.get("content-encoding", "")
    if is_async and isinstance(stream, httpx2.AsyncByteStream):
        response.stream = _AsyncMeteredStream(stream, tap, encoding)
    elif not is_async and isinstance(stream, httpx2.SyncByteStream):
        response.stream = _MeteredStream(stream, tap, encoding)
    else:
        return False
    # A response dropped unclosed still ends its call (an estimate).
    weakref.finalize(response, tap.end_soon)
    return True
