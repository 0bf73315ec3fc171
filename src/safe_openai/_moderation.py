"""Moderators, batching and chunking of moderation inputs, and the verdict cache.

A moderator is any object with ``moderate(inputs) -> results`` (sync, or a coroutine for the
async client): one result per input, in order. The default sends them to OpenAI's moderation
endpoint through the same SDK client, in as few calls as the endpoint allows: every text in one
batched call (a list of strings gets one result per string), and each image in a call of its
own, since the endpoint takes one image per request and answers a multi-modal list with a
single combined result.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from .errors import ModerationUnavailable
from .policy import ModerationResult

if TYPE_CHECKING:
    from ._extract import Piece

__all__ = [
    "AsyncModerator",
    "AsyncOpenAIModerator",
    "ModerationInput",
    "Moderator",
    "OpenAIModerator",
    "VerdictCache",
]

#: Longest text sent as one moderation input; longer texts are split with an overlap so a
#: phrase cut at a boundary is still seen whole in one chunk.
CHUNK_CHARS = 4000
CHUNK_OVERLAP = 200


@dataclass(frozen=True, slots=True)
class ModerationInput:
    """One input to the moderation endpoint: a text, or an image URL (``data:`` URLs too)."""

    kind: Literal["text", "image"]
    value: str

    def as_api_input(self) -> dict[str, Any]:
        """The endpoint's multi-modal input object."""
        if self.kind == "image":
            return {"type": "image_url", "image_url": {"url": self.value}}
        return {"type": "text", "text": self.value}


@runtime_checkable
class Moderator(Protocol):
    """Anything that moderates inputs synchronously."""

    def moderate(self, inputs: Sequence[ModerationInput]) -> Sequence[ModerationResult]:
        """Return one result per input, in order. Raise when moderation cannot be obtained."""
        ...


@runtime_checkable
class AsyncModerator(Protocol):
    """Anything that moderates inputs asynchronously."""

    async def moderate(self, inputs: Sequence[ModerationInput]) -> Sequence[ModerationResult]:
        """Return one result per input, in order. Raise when moderation cannot be obtained."""
        ...


def chunk_text(text: str, size: int = CHUNK_CHARS, overlap: int = CHUNK_OVERLAP) -> list[str]:
    """Split ``text`` into pieces of at most ``size`` characters overlapping by ``overlap``."""
    if len(text) <= size:
        return [text]
    step = size - overlap
    return [text[start : start + size] for start in range(0, len(text) - overlap, step)]


def inputs_for(pieces: Iterable[Piece]) -> list[ModerationInput]:
    """The moderation inputs of a request's pieces: long texts chunked, duplicates dropped."""
    seen: set[tuple[str, str]] = set()
    inputs: list[ModerationInput] = []
    for piece in pieces:
        values = chunk_text(piece.value) if piece.kind == "text" else [piece.value]
        for value in values:
            key = (piece.kind, value)
            if key not in seen:
                seen.add(key)
                inputs.append(ModerationInput(piece.kind, value))
    return inputs


def roles_of(pieces: Iterable[Piece]) -> dict[ModerationInput, set[str]]:
    """The roles each moderation input came from (text sent under several roles has each)."""
    roles: dict[ModerationInput, set[str]] = {}
    for piece in pieces:
        values = chunk_text(piece.value) if piece.kind == "text" else [piece.value]
        for value in values:
            roles.setdefault(ModerationInput(piece.kind, value), set()).add(piece.role)
    return roles


def plan_batches(inputs: Sequence[ModerationInput]) -> list[list[ModerationInput]]:
    """Group inputs into endpoint calls: every text in one call, then one call per image."""
    texts = [i for i in inputs if i.kind == "text"]
    batches = [texts] if texts else []
    batches += [[i] for i in inputs if i.kind == "image"]
    return batches


class VerdictCache:
    """A bounded, thread-safe LRU of moderation results keyed by a hash of the content.

    Results are cached, not judgements: the policy judges each request's results afresh, so
    per-customer thresholds still apply to cached content. Only what was actually judged is
    cached: texts and ``data:`` image URLs, whose key hashes the content itself. A remote image
    URL is never cached (:meth:`cacheable`): what it serves can change between requests, so it
    is moderated again on each new request.
    """

    def __init__(self, maxsize: int = 50_000) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[bytes, ModerationResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: str, item: ModerationInput) -> bytes:
        """The cache key of an input under a moderation model."""
        digest = hashlib.sha256(model.encode())
        # surrogatepass: texts that differ only in lone surrogates get keys of their own
        value = item.value.encode("utf-8", "surrogatepass")
        digest.update(b"\0" + item.kind.encode() + b"\0" + value)
        return digest.digest()

    @staticmethod
    def cacheable(item: ModerationInput) -> bool:
        """Whether a verdict on ``item`` may be reused by a later request: a text or a
        ``data:`` URL (its content is the URL), never a remote image URL."""
        return item.kind == "text" or item.value[:5].lower() == "data:"

    def get(self, key: bytes) -> ModerationResult | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: bytes, result: ModerationResult) -> None:
        with self._lock:
            self._items[key] = result
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (
        exc.status_code == 429 or exc.status_code >= 500
    )


def _retry_after(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``retry-after``)."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                return None
    return None


class _WaitHonouringRetryAfter:
    """Back off exponentially with jitter, unless the server said how long to wait."""

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait
        self._fallback = wait_exponential(multiplier=0.2, max=max_wait) + wait_random(0, 0.2)

    def __call__(self, state: RetryCallState) -> float:
        outcome = state.outcome
        asked = _retry_after(outcome.exception() if outcome is not None else None)
        if asked is not None:
            return min(asked, self.max_wait)
        return float(self._fallback(state))


def _malformed(what: str) -> ModerationUnavailable:
    return ModerationUnavailable(f"The moderator returned {what}.", outage=False)


def _results(raw: object, expected: int) -> list[ModerationResult]:
    """Parse the endpoint's answer: ``expected`` results, one per input of the batch, each
    with ``flagged``, ``categories`` and ``category_scores`` (anything less is malformed)."""
    results = raw.get("results") if isinstance(raw, Mapping) else None
    if not isinstance(results, list):
        raise _malformed("an answer without results")
    parsed = []
    for result in results:
        if (
            not isinstance(result, Mapping)
            or not {
                "flagged",
                "categories",
                "category_scores",
            }
            <= result.keys()
        ):
            raise _malformed("a result with missing fields")
        scores = result["category_scores"]
        parsed.append(
            ModerationResult(
                flagged=result["flagged"],
                categories=result["categories"],
                scores=dict(scores) if isinstance(scores, Mapping) else scores,
            )
        )
    return checked_results(parsed, expected)


def checked_results(results: object, expected: int) -> list[ModerationResult]:
    """Any moderator's answer, checked before anything is judged or cached: one
    :class:`~safe_openai.policy.ModerationResult` per input, each with a boolean ``flagged``,
    categories that map names to booleans and scores that map names to finite numbers.

    Raises:
        ModerationUnavailable: the answer is incomplete or malformed (never an outage, so it
            fails closed even under ``fail_open``).
    """
    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
        raise _malformed("something other than a list of results")
    if len(results) != expected:
        raise _malformed(f"{len(results)} results for {expected} inputs")
    checked: list[ModerationResult] = []
    for result in results:
        if not isinstance(result, ModerationResult) or not isinstance(result.flagged, bool):
            raise _malformed("a result without a boolean 'flagged'")
        categories, scores = result.categories, result.scores
        if not isinstance(categories, Mapping) or not all(
            isinstance(name, str) and isinstance(hit, bool) for name, hit in categories.items()
        ):
            raise _malformed("categories that are not names mapped to booleans")
        if not isinstance(scores, Mapping) or not all(
            isinstance(name, str)
            and isinstance(score, (int, float))
            and not isinstance(score, bool)
            and math.isfinite(score)
            for name, score in scores.items()
        ):
            raise _malformed("scores that are not names mapped to finite numbers")
        checked.append(result)
    return checked


def _body(model: str, batch: Sequence[ModerationInput]) -> dict[str, Any]:
    """A batch of texts as a list of strings (one result each); an image as a multi-modal
    list of one (one result).
    """
    if batch[0].kind == "image":
        return {"model": model, "input": [batch[0].as_api_input()]}
    return {"model": model, "input": [item.value for item in batch]}


class _Settings:
    def __init__(self, model: str, attempts: int, max_wait: float, deadline: float) -> None:
        self.model = model
        self.retry_kwargs: dict[str, Any] = {
            "retry": retry_if_exception(_retryable),
            "wait": _WaitHonouringRetryAfter(max_wait),
            "stop": stop_after_attempt(attempts) | stop_after_delay(deadline),
            "reraise": True,
        }


class _EndpointModerator:
    """What both OpenAI moderators share: the model and the retry settings."""

    def __init__(self, *, model: str, attempts: int, max_wait: float, deadline: float) -> None:
        self._settings = _Settings(model, attempts, max_wait, deadline)

    @property
    def model(self) -> str:
        """The moderation model."""
        return self._settings.model


class OpenAIModerator(_EndpointModerator):
    """Moderation through OpenAI's endpoint, with tenacity retries that honour Retry-After.

    The SDK's own retries are turned off for these calls so the wait policy is ours alone.

    Args:
        client: The ``openai.OpenAI`` (or SafeClient) to send moderation requests with.
        model: The moderation model.
        attempts: Tries per batch before giving up.
        max_wait: Longest single wait between tries, in seconds.
        deadline: Longest total time spent retrying one batch, in seconds.
    """

    def __init__(
        self,
        client: openai.OpenAI,
        *,
        model: str = "omni-moderation-latest",
        attempts: int = 3,
        max_wait: float = 5.0,
        deadline: float = 15.0,
    ) -> None:
        super().__init__(model=model, attempts=attempts, max_wait=max_wait, deadline=deadline)
        self.client = client

    def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        results: list[ModerationResult] = []
        for batch in plan_batches(inputs):
            results += self._call(batch)
        by_input = dict(zip(_order(inputs), results, strict=True))
        return [by_input[item] for item in inputs]

    def _call(self, batch: Sequence[ModerationInput]) -> list[ModerationResult]:
        try:
            for attempt in Retrying(**self._settings.retry_kwargs):
                with attempt:
                    raw = self.client.post(
                        "/moderations",
                        body=_body(self.model, batch),
                        cast_to=object,
                        options={"max_retries": 0},
                    )
        except openai.OpenAIError as exc:
            raise _unavailable(exc) from exc
        return _results(raw, len(batch))


def _unavailable(exc: openai.OpenAIError) -> ModerationUnavailable:
    """A failed moderation call: an outage when it was worth retrying (a connection error, a
    timeout, 429, 5xx); a refusal of the input (400, which a customer can provoke with an
    image URL the endpoint cannot fetch) or of the key is none."""
    if _retryable(exc):
        return ModerationUnavailable("The moderation endpoint could not be reached.")
    status = getattr(exc, "status_code", None)
    return ModerationUnavailable(
        f"The moderation endpoint refused the request (status {status}).", outage=False
    )


class AsyncOpenAIModerator(_EndpointModerator):
    """The async twin of :class:`OpenAIModerator`; image batches are sent concurrently."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        model: str = "omni-moderation-latest",
        attempts: int = 3,
        max_wait: float = 5.0,
        deadline: float = 15.0,
    ) -> None:
        super().__init__(model=model, attempts=attempts, max_wait=max_wait, deadline=deadline)
        self.client = client

    async def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        batches = plan_batches(inputs)
        answers = await asyncio.gather(*(self._call(batch) for batch in batches))
        results = [result for answer in answers for result in answer]
        by_input = dict(zip(_order(inputs), results, strict=True))
        return [by_input[item] for item in inputs]

    async def _call(self, batch: Sequence[ModerationInput]) -> list[ModerationResult]:
        try:
            async for attempt in AsyncRetrying(**self._settings.retry_kwargs):
                with attempt:
                    raw = await self.client.post(
                        "/moderations",
                        body=_body(self.model, batch),
                        cast_to=object,
                        options={"max_retries": 0},
                    )
        except openai.OpenAIError as exc:
            raise _unavailable(exc) from exc
        return _results(raw, len(batch))


def _order(inputs: Sequence[ModerationInput]) -> list[ModerationInput]:
    """Inputs in the order :func:`plan_batches` sends them."""
    return [item for batch in plan_batches(inputs) for item in batch]
