"""Issue 10's guard-side defects, each pinned: path spellings, remote image verdicts, cancelled
calls, incomplete moderation answers, unpriced models under a cost quota, reasoning items, and
the smaller ones (secrets, quotas, ids, URLs, thresholds, local refusals, fail-open, spool)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

from safe_openai import (
    AsyncSafeClient,
    ConfigurationError,
    DefaultPolicy,
    InvalidCustomerId,
    ModerationBlocked,
    ModerationUnavailable,
    PolicyDenied,
    Price,
    PriceTable,
    Quota,
    QuotaExceeded,
    SafeClient,
    SafeOpenAIError,
    UnguardedPathError,
    UnpricedModel,
    customer,
    testing,
)
from safe_openai._identity import safety_identifier
from safe_openai._moderation import ModerationInput, VerdictCache
from safe_openai.policy import MODERATION_CATEGORIES, ModerationResult
from safe_openai.stores import Spool as LocalSpool
from safe_openai.stores import async_store_from_url, store_from_url
from safe_openai.stores._memory import AsyncMemoryStore, MemoryStore
from safe_openai.testing import PNG_BYTES, FakeOpenAI

from .conftest import SECRET, make_async_client, make_client

BAD = "I will kill them all"
CLEAN = ModerationResult(flagged=False, categories={"violence": False}, scores={"violence": 0.0})


class FakeModerator:
    """Clean verdicts for everything (sync or async client alike)."""

    def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        return [CLEAN for _ in inputs]


SID = safety_identifier(SECRET.encode(), "acme")

BODIES: dict[str, dict[str, Any]] = {
    "/chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": BAD}]},
    "/responses": {"model": "gpt-4o-mini", "input": BAD},
    "/embeddings": {"model": "text-embedding-3-small", "input": BAD},
    "/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": BAD},
    "/images/generations": {"model": "gpt-image-1", "prompt": BAD},
}

SPELLINGS: dict[str, Callable[[str], str]] = {
    "plain": lambda path: path,
    "fragment": lambda path: path + "#",
    "named-fragment": lambda path: path + "#part",
    "slash-fragment": lambda path: path + "/#",
    "query-fragment": lambda path: path + "?x=1#",
    "base-fragment": lambda path: "/v1" + path + "#",
    "dot": lambda path: "/." + path,
    "double-slash": lambda path: "/v1/" + path,
    "other-host": lambda path: "//elsewhere" + path,
    "absolute": lambda path: "http://elsewhere/v1" + path + "#",
    "trailing-dot": lambda path: path + "/.",
    "dot-dot": lambda path: "/chat/.." + path,
    "trailing-slash": lambda path: path + "/",
    "escaped-slash": lambda path: path[:1] + path[1:].replace("/", "%2F"),
    "upper-case": lambda path: path.upper(),
    "backslash": lambda path: path.replace("/", "\\"),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("path", list(BODIES))
def test_every_spelling_of_a_model_path_is_guarded(
    fake: FakeOpenAI, path: str, spelling: str
) -> None:
    """Defect 1: the guard classifies the URL the SDK will send (the fragment dropped, dot
    segments, slashes, escapes and case folded), so no spelling reaches a model unmoderated."""
    with make_client(fake) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").post(
            SPELLINGS[spelling](path), body=BODIES[path], cast_to=object
        )
    assert fake.model_requests == []


@pytest.mark.parametrize("path", list(BODIES))
async def test_async_fragment_paths_are_guarded(fake: FakeOpenAI, path: str) -> None:
    async with make_async_client(fake) as client:
        with pytest.raises(ModerationBlocked):
            await client.for_customer("acme").post(path + "#", body=BODIES[path], cast_to=object)
        clean = {**BODIES[path]}
        for key in ("input", "prompt"):
            if key in clean:
                clean[key] = "hello"
        if "messages" in clean:
            clean["messages"] = [{"role": "user", "content": "hello"}]
        await client.for_customer("acme").post(path + "#", body=clean, cast_to=object)
    sent = fake.model_requests
    assert len(sent) == 1
    assert SID in (sent[0].json or {}).values()


def test_unknown_post_path_is_refused_unless_the_policy_allows_it(fake: FakeOpenAI) -> None:
    """Defect 1: a POST to a path the guard does not know follows the unguarded-path rule."""
    with make_client(fake) as client, pytest.raises(UnguardedPathError, match="/brand_new"):
        client.post("/brand_new/thing", body={"input": BAD}, cast_to=object)
    assert fake.requests == []

    class AllowNew(DefaultPolicy):
        def allow_unguarded(self, endpoint: str) -> bool:
            return endpoint == "/brand_new/thing"

    with make_client(fake, policy=AllowNew()) as client, pytest.raises(openai.NotFoundError):
        client.post("/brand_new/thing#", body={"input": "x"}, cast_to=object)  # sent
    assert [r.path for r in fake.requests] == ["/brand_new/thing"]


def test_known_administrative_posts_still_pass(client: SafeClient, fake: FakeOpenAI) -> None:
    client.post(
        "/moderations", body={"model": "omni-moderation-latest", "input": "x"}, cast_to=object
    )
    assert [r.path for r in fake.requests] == ["/moderations"]


async def test_async_unknown_post_path_is_refused(
    aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    with pytest.raises(UnguardedPathError):
        await aclient.post("/brand_new#", body={"input": BAD}, cast_to=object)
    assert fake.requests == []


# --- defect 3: every exit from a guarded call releases its reservation ----------------------


class Interrupt(BaseException):
    """Stands for a gevent timeout or a KeyboardInterrupt."""


class _Raising:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        raise self.exc


class _Hanging:
    async def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        await asyncio.sleep(30)
        raise AssertionError("not reached")


ONE_A_MINUTE = DefaultPolicy(quota=Quota(requests_per_minute=1))


def _hello() -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def test_base_exception_during_moderation_releases_the_reservation(fake: FakeOpenAI) -> None:
    moderator = _Raising(Interrupt())
    with make_client(fake, policy=ONE_A_MINUTE, moderator=moderator) as client:
        acme = client.for_customer("acme")
        with pytest.raises(Interrupt):
            acme.chat.completions.create(**_hello())
        client._safe.moderator = FakeModerator()
        acme.chat.completions.create(**_hello())  # admitted: nothing was held
    assert len(fake.model_requests) == 1


async def test_cancelled_moderation_releases_the_reservation(fake: FakeOpenAI) -> None:
    async with make_async_client(fake, policy=ONE_A_MINUTE, moderator=_Hanging()) as client:
        acme = client.for_customer("acme")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(acme.chat.completions.create(**_hello()), 0.05)
        client._safe.moderator = FakeModerator()
        await acme.chat.completions.create(**_hello())
    assert len(fake.model_requests) == 1


class _SlowReserve:
    """An async store whose reserve answers late: the caller may be cancelled meanwhile."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        made = await self._store.reserve(*args, **kwargs)
        await asyncio.sleep(0.1)
        return made


async def test_cancelled_reserve_round_trip_is_undone(fake: FakeOpenAI) -> None:
    store = _SlowReserve(AsyncMemoryStore())
    async with make_async_client(fake, policy=ONE_A_MINUTE, store=store) as client:
        acme = client.for_customer("acme")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(acme.chat.completions.create(**_hello()), 0.02)
        await acme.chat.completions.create(**_hello())
    assert len(fake.model_requests) == 1


def test_a_call_the_sdk_refuses_locally_does_not_count(fake: FakeOpenAI) -> None:
    """Defect 12: ``temperature=nan`` fails the SDK's JSON encoding before anything is built."""
    with make_client(fake, policy=ONE_A_MINUTE) as client:
        acme = client.for_customer("acme")
        for _ in range(2):
            with pytest.raises(ValueError, match="JSON"):
                acme.chat.completions.create(**_hello(), temperature=float("nan"))
        acme.chat.completions.create(**_hello())
    assert len(fake.model_requests) == 1


async def test_async_call_the_sdk_refuses_locally_does_not_count(fake: FakeOpenAI) -> None:
    async with make_async_client(fake, policy=ONE_A_MINUTE) as client:
        acme = client.for_customer("acme")
        with pytest.raises(ValueError, match="JSON"):
            await acme.chat.completions.create(**_hello(), temperature=float("nan"))
        await acme.chat.completions.create(**_hello())
    assert len(fake.model_requests) == 1


# --- defect 5: an answer without categories is no clean answer ------------------------------

FLAGGED_BARE = {"flagged": True, "categories": {}, "category_scores": {}}
MALFORMED_ANSWERS = {
    "flagged-only": {"results": [{"flagged": True}]},
    "empty-result": {"results": [{}]},
    "no-results": {},
    "results-not-a-list": {"results": {"flagged": True}},
    "too-few": {"results": []},
    "flagged-not-bool": {"results": [{**FLAGGED_BARE, "flagged": "no"}]},
    "score-not-number": {"results": [{**FLAGGED_BARE, "category_scores": {"violence": "0.1"}}]},
    "score-nan": {"results": [{**FLAGGED_BARE, "category_scores": {"violence": float("nan")}}]},
}


def _answer_moderation_with(fake: FakeOpenAI, answer: object) -> None:
    fake.fail("/moderations", 200, body=answer)


@pytest.mark.parametrize("answer", list(MALFORMED_ANSWERS))
def test_malformed_moderation_answers_fail_closed(fake: FakeOpenAI, answer: str) -> None:
    _answer_moderation_with(fake, MALFORMED_ANSWERS[answer])
    with make_client(fake) as client, pytest.raises(ModerationUnavailable) as caught:
        client.for_customer("acme").chat.completions.create(**_hello())
    assert caught.value.outage is False
    assert fake.model_requests == []


@pytest.mark.parametrize("answer", list(MALFORMED_ANSWERS))
async def test_async_malformed_moderation_answers_fail_closed_even_when_failing_open(
    fake: FakeOpenAI, answer: str
) -> None:
    """Under ``fail_open`` too: a malformed answer is no outage."""
    _answer_moderation_with(fake, MALFORMED_ANSWERS[answer])
    async with make_async_client(fake, policy=DefaultPolicy(fail_open=True)) as client:
        with pytest.raises(ModerationUnavailable):
            await client.for_customer("acme").chat.completions.create(**_hello())
    assert fake.model_requests == []


@pytest.mark.parametrize(
    "result",
    [
        FLAGGED_BARE,
        {**FLAGGED_BARE, "categories": {"violence": False, "sexual": False}},
    ],
    ids=["no-categories", "none-flagged"],
)
def test_flagged_without_a_category_blocks(fake: FakeOpenAI, result: dict[str, Any]) -> None:
    _answer_moderation_with(fake, {"results": [result]})
    with make_client(fake) as client, pytest.raises(ModerationBlocked) as caught:
        client.for_customer("acme").chat.completions.create(**_hello())
    assert caught.value.categories == ("flagged",)
    assert fake.model_requests == []


async def test_async_flagged_without_a_category_blocks(fake: FakeOpenAI) -> None:
    _answer_moderation_with(fake, {"results": [FLAGGED_BARE]})
    async with make_async_client(fake) as client:
        with pytest.raises(ModerationBlocked):
            await client.for_customer("acme").chat.completions.create(**_hello())
    assert fake.model_requests == []


class _Answering:
    """A custom moderator that answers whatever it is told to."""

    def __init__(self, answer: Callable[[int], object]) -> None:
        self.answer = answer

    def moderate(self, inputs: Sequence[ModerationInput]) -> object:
        return self.answer(len(inputs))


class _AsyncAnswering(_Answering):
    async def moderate(self, inputs: Sequence[ModerationInput]) -> object:  # type: ignore[override]
        return self.answer(len(inputs))


CUSTOM_MALFORMED: dict[str, Callable[[int], object]] = {
    "fewer": lambda n: [CLEAN] * (n - 1),
    "dicts": lambda n: [{}] * n,
    "none": lambda n: None,
    "flagged-none": lambda n: [ModerationResult(None, {}, {})] * n,  # type: ignore[arg-type]
    "scores-none": lambda n: [ModerationResult(False, {}, None)] * n,  # type: ignore[arg-type]
}


@pytest.mark.parametrize("answer", list(CUSTOM_MALFORMED))
@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_custom_moderators_are_checked_like_the_endpoint(
    fake: FakeOpenAI, answer: str, flavour: str
) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    body = {"model": "gpt-4o-mini", "messages": messages}
    if flavour == "sync":
        moderator = _Answering(CUSTOM_MALFORMED[answer])
        with make_client(fake, moderator=moderator) as client, pytest.raises(ModerationUnavailable):
            client.for_customer("acme").chat.completions.create(**body)
    else:
        moderator = _AsyncAnswering(CUSTOM_MALFORMED[answer])
        async with make_async_client(fake, moderator=moderator) as aclient:
            with pytest.raises(ModerationUnavailable):
                await aclient.for_customer("acme").chat.completions.create(**body)
    assert fake.model_requests == []


def test_custom_moderator_flagging_without_categories_blocks(fake: FakeOpenAI) -> None:
    bare = ModerationResult(flagged=True, categories={}, scores={})
    moderator = _Answering(lambda n: [bare] * n)
    with make_client(fake, moderator=moderator) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(**_hello())
    assert fake.model_requests == []


def test_a_threshold_clears_a_flag_only_with_a_score_below_it(fake: FakeOpenAI) -> None:
    policy = DefaultPolicy(thresholds={"violence": 0.9})
    no_score = ModerationResult(flagged=True, categories={"violence": True}, scores={})
    low = ModerationResult(True, {"violence": True}, {"violence": 0.5})
    moderator = _Answering(lambda n: [no_score] * n)
    with (
        make_client(fake, policy=policy, moderator=moderator) as c,
        pytest.raises(ModerationBlocked) as caught,
    ):
        c.for_customer("acme").chat.completions.create(**_hello())
    assert caught.value.categories == ("violence",)
    with make_client(fake, policy=policy, moderator=_Answering(lambda n: [low] * n)) as c:
        c.for_customer("acme").chat.completions.create(**_hello())  # explicitly cleared
    assert len(fake.model_requests) == 1


def test_fail_open_does_not_send_past_a_moderation_400(fake: FakeOpenAI) -> None:
    """Defect 12: a customer can provoke a 400 (an image URL the endpoint cannot fetch)."""
    fake.fail("/moderations", 400)
    with (
        make_client(fake, policy=DefaultPolicy(fail_open=True)) as client,
        pytest.raises(ModerationUnavailable) as caught,
    ):
        client.for_customer("acme").chat.completions.create(**_hello())
    assert caught.value.outage is False
    assert fake.model_requests == []


async def test_fail_open_still_sends_through_an_outage(fake: FakeOpenAI) -> None:
    fake.fail("/moderations", 503, times=10, headers={"retry-after-ms": "1"})
    async with make_async_client(fake, policy=DefaultPolicy(fail_open=True)) as client:
        await client.for_customer("acme").chat.completions.create(**_hello())
    assert len(fake.model_requests) == 1


# --- defect 2: a remote image URL is moderated again on every request -----------------------

REMOTE = "https://images.example/cat.png"
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()


def _with_image(url: str) -> dict[str, Any]:
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": parts}]}


def test_a_remote_image_url_is_moderated_on_every_request(fake: FakeOpenAI) -> None:
    """The file behind a URL can be swapped between requests: its verdict is not reused."""
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        acme.chat.completions.create(**_with_image(REMOTE))
        fake.scores[REMOTE] = {"sexual": 0.99}  # the customer swaps the file
        with pytest.raises(ModerationBlocked):
            acme.chat.completions.create(**_with_image(REMOTE))
    assert fake.moderation_inputs.count(REMOTE) == 2
    assert fake.moderation_inputs.count("what is this?") == 1  # texts are still cached
    assert len(fake.model_requests) == 1


async def test_async_remote_image_urls_are_not_cached_but_data_urls_are(fake: FakeOpenAI) -> None:
    async with make_async_client(fake) as client:
        acme = client.for_customer("acme")
        for url in (REMOTE, REMOTE, DATA_URL, DATA_URL):
            await acme.chat.completions.create(**_with_image(url))
    assert fake.moderation_inputs.count(REMOTE) == 2
    assert fake.moderation_inputs.count(DATA_URL) == 1  # judged by its content


# --- defect 8: no spending without limit on an unpriced model --------------------------------

CENT_A_MONTH = DefaultPolicy(quota=Quota(usd_per_month=0.01))


def test_an_unpriced_model_is_refused_under_a_cost_quota(fake: FakeOpenAI) -> None:
    with make_client(fake, policy=CENT_A_MONTH) as client:
        acme = client.for_customer("acme")
        with pytest.raises(UnpricedModel, match="with_overrides") as caught:
            acme.chat.completions.create(
                **{**_hello(), "model": "my-fine-tune"}, max_tokens=100_000
            )
        assert caught.value.model == "my-fine-tune"
        assert isinstance(caught.value, ConfigurationError)
        [record] = client.store.usage_records()
        assert record.outcome == "denied"
    assert fake.model_requests == []


async def test_a_priced_model_runs_under_a_cost_quota(fake: FakeOpenAI) -> None:
    prices = PriceTable().with_overrides({"my-fine-tune": Price(input=0.3, output=1.2)})
    async with make_async_client(fake, policy=CENT_A_MONTH, prices=prices) as client:
        acme = client.for_customer("acme")
        await acme.chat.completions.create(**{**_hello(), "model": "my-fine-tune"}, max_tokens=50)
        with pytest.raises(UnpricedModel):
            await acme.responses.create(model="another-model", input="hello")
    assert len(fake.model_requests) == 1


def test_an_unpriced_model_runs_without_a_cost_quota(fake: FakeOpenAI) -> None:
    policy = DefaultPolicy(quota=Quota(requests_per_minute=10))
    with make_client(fake, policy=policy) as client:
        client.for_customer("acme").chat.completions.create(**{**_hello(), "model": "my-fine-tune"})
    assert len(fake.model_requests) == 1


# --- defect 11: reasoning items sent back by the client are moderated ------------------------

EVERY_ROLE = DefaultPolicy(moderate_roles=("user", "tool", "assistant", "system", "developer"))


@pytest.mark.parametrize("where", ["summary", "content"])
def test_reasoning_item_text_is_moderated(fake: FakeOpenAI, where: str) -> None:
    kind = "summary_text" if where == "summary" else "reasoning_text"
    item = {"type": "reasoning", "id": "rs_1", where: [{"type": kind, "text": BAD}]}
    with make_client(fake, policy=EVERY_ROLE) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").responses.create(
            model="gpt-4o-mini", input=[item, {"role": "user", "content": "go on"}]
        )
    assert fake.model_requests == []
    assert BAD in fake.moderation_inputs


async def test_async_reasoning_items_are_moderated(fake: FakeOpenAI) -> None:
    item = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": BAD}]}
    async with make_async_client(fake, policy=EVERY_ROLE) as client:
        with pytest.raises(ModerationBlocked):
            await client.for_customer("acme").responses.create(model="gpt-4o-mini", input=[item])
    assert fake.model_requests == []


# --- defect 12: the smaller ones -------------------------------------------------------------


def test_repr_of_the_client_state_hides_the_identifier_secret(client: SafeClient) -> None:
    assert SECRET not in repr(client._safe)
    assert SECRET not in repr(vars(client))


@pytest.mark.parametrize(
    "secret", [123, 1.5, True, ["x" * 20], "x", "short-secret", " " * 32, b"\t" * 20, "\ud800" * 20]
)
def test_identifier_secret_must_be_a_long_enough_str_or_bytes(
    fake: FakeOpenAI, secret: Any
) -> None:
    with pytest.raises(ConfigurationError, match="identifier secret") as caught:
        make_client(fake, identifier_secret=secret)
    assert str(secret) not in str(caught.value) or len(str(secret)) < 3


def test_a_long_random_secret_is_accepted(fake: FakeOpenAI) -> None:
    make_client(fake, identifier_secret=b"\x00\x01" * 8).close()
    make_client(fake, identifier_secret="s" * 16).close()


@pytest.mark.parametrize("field", ["requests_per_minute", "tokens_per_day", "usd_per_month"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, -0.5])
def test_quota_rejects_nan_infinity_and_negatives(field: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Quota(**{field: value})


@pytest.mark.parametrize("bad", ["", "   ", 5, None, "x" * 257, "\ud800", "acme\udfff"])
def test_bad_customer_ids_raise_a_library_error_that_is_a_value_error(
    client: SafeClient, bad: Any
) -> None:
    for attempt in (lambda: client.for_customer(bad), lambda: customer(bad).__enter__()):
        with pytest.raises(InvalidCustomerId) as caught:
            attempt()
        assert isinstance(caught.value, ValueError)
        assert isinstance(caught.value, SafeOpenAIError)


def test_a_lone_surrogate_customer_leaves_no_reservation(fake: FakeOpenAI) -> None:
    with make_client(fake, policy=ONE_A_MINUTE) as client:
        with pytest.raises(InvalidCustomerId):
            client.for_customer("acme\ud800").chat.completions.create(**_hello())
        with pytest.raises(InvalidCustomerId), customer("acme\ud800"):
            pass
        assert client.store.usage_records() == []


@pytest.mark.parametrize(
    "url", ["redis://[::1", "redis://127.0.0.1:port/0", "rediss://u:pw@[::1/0"]
)
def test_a_malformed_store_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot be parsed") as caught:
        store_from_url(url)
    assert "pw" not in str(caught.value)
    with pytest.raises(ConfigurationError):
        async_store_from_url(url)


@pytest.mark.parametrize("category", ["violance", "self_harm", "Violence", "flagged"])
def test_a_threshold_for_an_unknown_category_is_a_configuration_error(category: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown category"):
        DefaultPolicy(thresholds={category: 0.5})


def test_a_policy_for_a_custom_moderator_names_its_own_categories() -> None:
    class KeywordPolicy(DefaultPolicy):
        categories = frozenset({"profanity"})

    assert KeywordPolicy(thresholds={"profanity": 0.5}).thresholds == {"profanity": 0.5}


def test_the_policy_knows_the_categories_the_fake_api_scores() -> None:
    assert set(MODERATION_CATEGORIES) == set(testing.MODERATION_CATEGORIES)


class _WriteFailingStore(MemoryStore):
    def commit(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store down")

    record_usage = record_violation = remember_identifier = commit


class _FullDisk(LocalSpool):
    def append(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")


def test_a_refusal_stands_when_store_and_spool_both_fail(fake: FakeOpenAI, tmp_path: Path) -> None:
    """The refusal's record is lost (and logged as such), the refusal is not: the caller gets
    ``ModerationBlocked`` or ``PolicyDenied``, not the spool's ``OSError``."""
    spool = _FullDisk(tmp_path)
    bad = [{"role": "user", "content": BAD}]
    with (
        make_client(fake, store=_WriteFailingStore(), spool=spool) as client,
        pytest.raises(ModerationBlocked),
    ):
        client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=bad)
    policy = DefaultPolicy(allowed_models=["gpt-4o"])
    with (
        make_client(fake, store=_WriteFailingStore(), spool=spool, policy=policy) as client,
        pytest.raises(PolicyDenied),
    ):
        client.for_customer("acme").chat.completions.create(**_hello())
    assert fake.model_requests == []


class _SlowCommit(_SlowReserve):
    """An async store whose commit answers late: the caller may be cancelled meanwhile."""

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        return await self._store.reserve(*args, **kwargs)

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.1)
        return await self._store.commit(*args, **kwargs)


async def test_a_commit_under_way_when_the_caller_is_cancelled_still_settles(
    fake: FakeOpenAI,
) -> None:
    """Defect 3: the call was sent; its usage is recorded and its reservation settled, not
    left pending for the reservation's lifetime."""
    store = _SlowCommit(AsyncMemoryStore())
    two = DefaultPolicy(quota=Quota(requests_per_minute=2))
    async with make_async_client(fake, policy=two, store=store) as client:
        acme = client.for_customer("acme")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(acme.chat.completions.create(**_hello()), 0.05)
        [record] = await client.store.usage_records()
        assert record.outcome == "ok"
        await acme.chat.completions.create(**_hello())  # one of two used, none held
        with pytest.raises(QuotaExceeded):
            await acme.chat.completions.create(**_hello())
    assert len(fake.model_requests) == 2


def test_texts_that_differ_only_in_lone_surrogates_have_verdicts_of_their_own() -> None:
    """The verdict cache keys the text itself: no two texts share a verdict by encoding."""
    keys = {VerdictCache.key("m", ModerationInput("text", t)) for t in ("a\ud800", "a\udc00", "a?")}
    assert len(keys) == 3


def test_unsuspend_checks_the_customer_id(client: SafeClient) -> None:
    with pytest.raises(InvalidCustomerId):
        client.unsuspend("")
