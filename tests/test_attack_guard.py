"""An adversarial pass over the moderation gate and the quota reservation, after issue 10's
fixes: request shapes that carried text past moderation, reservations left behind, and the
fixes pinned (each test failed before its fix)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

from safe_openai import (
    AsyncSafeClient,
    DefaultPolicy,
    ModerationBlocked,
    Quota,
    QuotaExceeded,
    UnguardedPathError,
)
from safe_openai._moderation import ModerationInput
from safe_openai.policy import ModerationResult
from safe_openai.stores import Spool
from safe_openai.stores._memory import AsyncMemoryStore
from safe_openai.testing import FakeOpenAI

from .conftest import make_async_client, make_client

BAD = "I will kill them all"
MODEL = "gpt-4o-mini"
EVERY_ROLE = ("user", "tool", "assistant", "system", "developer")
ONE_A_MINUTE = DefaultPolicy(quota=Quota(requests_per_minute=1))


def _sent_bad(fake: FakeOpenAI) -> bool:
    return any("kill" in json.dumps(r.json or {}) for r in fake.model_requests)


def _hello(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **extra}


# --- values that look like JSON but read differently from how they are sent ----------------


class HidingDict(dict[str, Any]):
    """A dict whose ``get`` hides its content: ``json`` still sends every item."""

    def get(self, key: str, default: Any = None) -> Any:
        return default if key == "content" else super().get(key, default)


class BlankStr(str):
    """A str that claims to be blank: ``json`` still sends its characters."""

    __slots__ = ()

    def strip(self, chars: str | None = None) -> str:
        return ""


class OtherBytes(str):
    """A str whose ``encode`` (the verdict cache key) names other, clean, text."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"hello"


@pytest.mark.parametrize(
    "message",
    [
        HidingDict(role="user", content=BAD),
        {"role": "user", "content": BlankStr(BAD)},
        {"role": "user", "content": [{"type": "text", "text": BlankStr(BAD)}]},
        {"role": "user", "content": OtherBytes(BAD)},
    ],
    ids=["dict-subclass", "str-subclass", "str-subclass-part", "str-subclass-cache-key"],
)
def test_subclasses_of_json_types_are_moderated_as_sent(
    fake: FakeOpenAI, message: dict[str, Any]
) -> None:
    """The guard reads the body as the SDK's JSON encoding will send it: a ``dict`` or ``str``
    subclass is read through its plain value, not its overridden methods."""
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        acme.chat.completions.create(**_hello())  # "hello" is in the verdict cache now
        with pytest.raises(ModerationBlocked):
            acme.post(
                "/chat/completions",
                body={"model": MODEL, "messages": [message]},
                cast_to=object,
            )
        with pytest.raises(ModerationBlocked):
            acme.chat.completions.create(model=MODEL, messages=[message])  # type: ignore[list-item]
    assert not _sent_bad(fake)


# --- quota: every exit after the reservation gives it back; no demand below zero -----------


@pytest.mark.parametrize("stream_options", [["include_usage"], "include_usage", 1])
def test_a_stream_option_that_is_no_object_holds_no_reservation(
    fake: FakeOpenAI, stream_options: object
) -> None:
    """``stream_options`` that is not an object is the API's to refuse (400): the guard neither
    crashes on it (a TypeError after the reservation) nor keeps the call's reservation."""
    policy = DefaultPolicy(quota=Quota(tokens_per_minute=5000))  # room for one 4096 worst case
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")
        with pytest.raises(openai.BadRequestError):
            acme.chat.completions.create(
                **_hello(),
                stream=True,
                stream_options=stream_options,  # type: ignore[arg-type]
            )
        acme.chat.completions.create(**_hello())  # admitted: the first call holds nothing


def test_a_negative_output_cap_reserves_no_negative_tokens(fake: FakeOpenAI) -> None:
    """``max_tokens=-10**9`` must not reserve a negative amount, which would make room in the
    window for other calls while it is in flight."""
    with make_client(fake, policy=DefaultPolicy(quota=Quota(tokens_per_minute=100))) as client:
        acme = client.for_customer("acme")
        demands: list[Any] = []
        store = client._safe.store
        reserve = store.reserve

        def spy(customer_id: str, quota: Quota, demand: Any, **kwargs: Any) -> Any:
            demands.append(demand)
            return reserve(customer_id, quota, demand, **kwargs)

        store.reserve = spy
        acme.chat.completions.create(**_hello(max_tokens=-(10**9)))
    assert demands and all(d.tokens >= 0 and d.cost_usd >= 0 for d in demands)


# --- cancellation that comes again at every await (anyio cancel scopes) --------------------


class _AwaitingStore:
    """An async store whose writes take a round trip, as Redis and PostgreSQL do: a caller
    cancelled at every ``await`` (an anyio cancel scope) would cut each one off."""

    def __init__(self) -> None:
        self.inner = AsyncMemoryStore()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _later(self, name: str, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.01)
        return await getattr(self.inner, name)(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> Any:
        return await self._later("release", *args, **kwargs)

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        return await self._later("commit", *args, **kwargs)

    async def record_usage(self, *args: Any, **kwargs: Any) -> Any:
        return await self._later("record_usage", *args, **kwargs)

    async def record_violation(self, *args: Any, **kwargs: Any) -> Any:
        return await self._later("record_violation", *args, **kwargs)


class _SlowCleanModerator:
    async def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        await asyncio.sleep(0.3)
        return [CLEAN for _ in inputs]


class _FlaggingModerator:
    def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        return [FLAGGED for _ in inputs]


CLEAN = ModerationResult(flagged=False, categories={"violence": False}, scores={"violence": 0.0})
FLAGGED = ModerationResult(flagged=True, categories={"violence": True}, scores={"violence": 0.9})
#: Room for one call's worst case (4096 output tokens): a second call is admitted only if the
#: first holds nothing (sent calls that failed record zero tokens).
ROOM_FOR_ONE = DefaultPolicy(quota=Quota(tokens_per_minute=5000))


async def _admitted(client: AsyncSafeClient) -> bool:
    """Whether a clean call for acme is admitted now."""
    client._safe.moderator = _Clean()
    try:
        await client.for_customer("acme").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a clean question"}]
        )
    except QuotaExceeded:
        return False
    return True


async def test_scope_cancelled_during_moderation_releases_the_reservation(
    fake: FakeOpenAI,
) -> None:
    store = _AwaitingStore()
    async with make_async_client(
        fake, policy=ROOM_FOR_ONE, store=store, moderator=_SlowCleanModerator()
    ) as client:
        acme = client.for_customer("acme")
        with anyio.move_on_after(0.05) as scope:
            await acme.chat.completions.create(**_hello())
        assert scope.cancelled_caught
        assert fake.model_requests == []
        assert await _admitted(client)


async def test_scope_cancelled_while_sending_records_the_call(fake: FakeOpenAI) -> None:
    """The call went out: its usage record is written (an error, zero tokens) and its
    reservation settled, however often the scope cancels."""
    store = _AwaitingStore()
    fake.delay = 0.3
    async with make_async_client(
        fake, policy=ROOM_FOR_ONE, store=store, moderator=_Clean()
    ) as client:
        with anyio.move_on_after(0.05) as scope:
            await client.for_customer("acme").chat.completions.create(**_hello())
        assert scope.cancelled_caught
        records = await store.usage_records(customer_id="acme")
        assert len(fake.model_requests) == 1
        assert [r.outcome for r in records] == ["error"]
        fake.delay = 0
        assert await _admitted(client)


async def test_scope_cancelled_during_a_block_keeps_the_violation(fake: FakeOpenAI) -> None:
    """A block is decided before the scope's cancellation reaches its writes: the blocked
    record and the violation are written, and the cancellation then goes on."""
    store = _AwaitingStore()
    async with make_async_client(
        fake, policy=ROOM_FOR_ONE, store=store, moderator=_FlaggingModerator()
    ) as client:
        acme = client.for_customer("acme")
        with anyio.CancelScope() as scope:

            async def cancel_soon() -> None:
                await asyncio.sleep(0.005)  # while the release round trip runs
                scope.cancel()

            task = asyncio.ensure_future(cancel_soon())
            try:
                await acme.chat.completions.create(**_hello())
            finally:
                await task
        violations = await store.violations(customer_id="acme")
        records = await store.usage_records(customer_id="acme")
        assert len(violations) == 1
        assert [r.outcome for r in records] == ["blocked"]
        assert fake.model_requests == []
        assert await _admitted(client)


class _Clean:
    def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        return [CLEAN for _ in inputs]


# --- content the extractor did not read -----------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("path", ["/images/edits", "/audio/transcriptions"])
def test_form_fields_passed_as_files_are_refused(fake: FakeOpenAI, path: str) -> None:
    """``files=[("prompt", (None, text))]`` goes out as the ``prompt`` form field, which the
    body the guard reads does not show."""
    with make_client(fake) as client, pytest.raises(UnguardedPathError, match="form field"):
        client.for_customer("acme").post(
            path,
            body={"model": "gpt-image-1"},
            files=[("image", ("a.png", PNG, "image/png")), ("prompt", (None, BAD.encode()))],
            options={"headers": {"Content-Type": "multipart/form-data"}},
            cast_to=object,
        )
    assert fake.model_requests == []


def test_sdk_file_uploads_still_pass(fake: FakeOpenAI) -> None:
    # sent: the fake answers 404, having no transcription route
    with make_client(fake) as client, pytest.raises(openai.NotFoundError):
        client.for_customer("acme").audio.transcriptions.create(
            model="whisper-1", file=("a.wav", b"RIFF0000WAVE", "audio/wav"), prompt="hello"
        )
    assert [r.path for r in fake.model_requests] == ["/audio/transcriptions"]
    assert fake.moderation_inputs == ["hello"]


SMUGGLED_MESSAGES: dict[str, dict[str, Any]] = {
    "function_call-arguments": {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "f", "arguments": BAD},
    },
    "custom-tool-input": {
        "role": "assistant",
        "tool_calls": [{"id": "c1", "type": "custom", "custom": {"name": "f", "input": BAD}}],
    },
    "user-name": {"role": "user", "content": "hello", "name": BAD},
}


@pytest.mark.parametrize("name", list(SMUGGLED_MESSAGES))
def test_every_text_of_a_moderated_message_is_moderated(fake: FakeOpenAI, name: str) -> None:
    policy = DefaultPolicy(moderate_roles=EVERY_ROLE)
    with make_client(fake, policy=policy) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}, SMUGGLED_MESSAGES[name]],  # type: ignore[list-item]
        )
    assert fake.model_requests == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/embeddings", {"model": "text-embedding-3-small", "input": [[BAD]]}),
        ("/embeddings", {"model": "text-embedding-3-small", "input": [1, BAD]}),
        ("/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": [[BAD], "hello"]}),
    ],
    ids=["nested-list", "mixed-list", "nested-prompt"],
)
def test_strings_among_token_ids_are_moderated(
    fake: FakeOpenAI, path: str, body: dict[str, Any]
) -> None:
    """A list that is not all strings is not all token ids either: its strings are read."""
    with make_client(fake) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").post(path, body=body, cast_to=object)
    assert fake.model_requests == []


@pytest.mark.parametrize("field", ["instructions", "additional_instructions"])
def test_run_instructions_are_moderated_like_responses_instructions(
    fake: FakeOpenAI, field: str
) -> None:
    policy = DefaultPolicy(moderate_roles=EVERY_ROLE)
    with make_client(fake, policy=policy) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").post(
            "/threads/thread_1/runs", body={"assistant_id": "asst_1", field: BAD}, cast_to=object
        )
    assert fake.model_requests == []


class _DownAfterARoundTrip(_AwaitingStore):
    """Writes fail after their round trip (the store went away meanwhile)."""

    async def _later(self, name: str, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.01)
        raise ConnectionError("store went away")


async def test_scope_cancelled_while_the_store_fails_still_spools(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The write fails while the cancellation waits: the record and the violation go to the
    spool instead of being dropped by the cancellation."""
    spool = Spool(tmp_path)
    async with make_async_client(
        fake, store=_DownAfterARoundTrip(), moderator=_FlaggingModerator(), spool=spool
    ) as client:
        with anyio.CancelScope() as scope:

            async def cancel_soon() -> None:
                await asyncio.sleep(0.005)
                scope.cancel()

            task = asyncio.ensure_future(cancel_soon())
            try:
                await client.for_customer("acme").chat.completions.create(**_hello())
            finally:
                await task
    assert spool.waiting()
    assert fake.model_requests == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/responses", {"model": MODEL, "input": {"role": "user", "content": BAD}}),
        ("/chat/completions", {"model": MODEL, "messages": {"role": "user", "content": BAD}}),
        ("/conversations", {"items": {"type": "message", "role": "user", "content": BAD}}),
    ],
    ids=["responses-input-object", "chat-messages-object", "conversation-items-object"],
)
def test_a_single_object_where_a_list_belongs_is_read_as_one_item(
    fake: FakeOpenAI, path: str, body: dict[str, Any]
) -> None:
    """An API that accepts one item where it documents a list must not get it unread."""
    with make_client(fake) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").post(path, body=body, cast_to=object)
    assert fake.model_requests == []
