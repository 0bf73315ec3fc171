"""Batch API files: every request of a file uploaded with purpose ``batch`` is checked,
moderated (one pass over the file, batched and cached) and tagged before the upload; a batch
can only be created from a checked file; a finished batch's usage is recorded per customer."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path
from typing import Any

import openai
import pytest

from safe_openai import (
    AsyncSafeClient,
    BatchBlocked,
    BatchFileError,
    CustomerRequired,
    CustomerSuspended,
    DefaultPolicy,
    ModerationInput,
    ModerationResult,
    PolicyDenied,
    Quota,
    QuotaExceeded,
    SafeClient,
    StoreError,
    UnguardedPathError,
)
from safe_openai._batches import BATCH_DISCOUNT, MODERATION_INPUTS_PER_CALL
from safe_openai._identity import safety_identifier
from safe_openai.stores._memory import MemoryStore
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET, make_async_client, make_client

ACME_ID = safety_identifier(SECRET.encode(), "acme")


def chat_line(n: int, text: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"request-{n}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": text}],
            **body,
        },
    }


def jsonl(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def uploaded(fake: FakeOpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in fake.files[file_id]["content"].splitlines()]


@pytest.fixture
def acme(client: SafeClient) -> SafeClient:
    return client.for_customer("acme")


def test_every_request_is_moderated_and_tagged_before_the_upload(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    content = jsonl(chat_line(1, "hello"), chat_line(2, "bonjour"), chat_line(3, "hello"))
    created = acme.files.create(file=("requests.jsonl", content), purpose="batch")

    assert [r.path for r in fake.requests] == ["/moderations", "/files"]
    assert sorted(fake.moderation_inputs) == ["bonjour", "hello"]  # distinct texts, once
    lines = uploaded(fake, created.id)
    assert [line["custom_id"] for line in lines] == ["request-1", "request-2", "request-3"]
    assert {line["body"]["safety_identifier"] for line in lines} == {ACME_ID}
    assert fake.requests[-1].json == {"purpose": "batch"}


def test_a_flagged_line_blocks_the_upload_with_its_line_numbers(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    content = jsonl(
        chat_line(1, "hello"),
        chat_line(2, "I will kill you"),
        chat_line(3, "fine"),
        chat_line(4, "kill it with fire"),
    )
    with pytest.raises(BatchBlocked) as blocked:
        acme.files.create(file=io.BytesIO(content), purpose="batch")

    assert blocked.value.lines == {2: ("violence",), 4: ("violence",)}
    assert blocked.value.categories == ("violence",)
    assert "line 2 (violence), 4 (violence)" in str(blocked.value)
    assert "kill" not in str(blocked.value)
    assert all(r.path == "/moderations" for r in fake.requests)  # nothing uploaded
    [violation] = acme.store.violations(customer_id="acme")
    assert violation.endpoint == "/files"
    [record] = acme.store.usage_records(customer_id="acme")
    assert (record.endpoint, record.outcome) == ("/files", "blocked")


def test_the_file_is_moderated_in_calls_of_a_bounded_size_and_cached(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    count = MODERATION_INPUTS_PER_CALL + 8
    content = jsonl(*(chat_line(n, f"question number {n}") for n in range(count)))
    acme.files.create(file=("a.jsonl", content), purpose="batch")
    sizes = [len(r.json["input"]) for r in fake.moderation_requests]  # type: ignore[index]
    # the calls run concurrently: their order is not promised, their sizes and bound are
    assert sorted(sizes) == [8, MODERATION_INPUTS_PER_CALL]
    assert max(sizes) <= MODERATION_INPUTS_PER_CALL and sum(sizes) == count

    fake.reset()
    acme.files.create(file=("b.jsonl", content), purpose="batch")
    assert [r.path for r in fake.requests] == ["/files"]  # every verdict came from the cache


def test_the_policy_applies_to_each_line(fake: FakeOpenAI) -> None:
    policy = DefaultPolicy(allowed_models=["gpt-4o-mini"], system_instruction="Be kind.")
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")
        created = acme.files.create(file=("ok.jsonl", jsonl(chat_line(1, "hi"))), purpose="batch")
        [line] = uploaded(fake, created.id)
        assert line["body"]["messages"][0] == {"role": "system", "content": "Be kind."}

        wrong = jsonl(chat_line(1, "hi"), chat_line(2, "hi", model="gpt-4o"))
        with pytest.raises(PolicyDenied, match="line 2"):
            acme.files.create(file=("bad.jsonl", wrong), purpose="batch")


def test_bad_files_are_refused_with_the_line_before_anything_is_sent(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    with pytest.raises(BatchFileError, match=r"Line 2 .* not JSON"):
        acme.files.create(
            file=("x.jsonl", b'{"url": "/v1/responses", "body": {}}\n{oops'), purpose="batch"
        )
    with pytest.raises(BatchFileError, match=r"Line 1 .*'url'"):
        acme.files.create(file=("x.jsonl", b'{"body": {}}\n'), purpose="batch")
    with pytest.raises(BatchFileError, match="no requests"):
        acme.files.create(file=("x.jsonl", b"\n\n"), purpose="batch")
    assert fake.requests == []


def test_standing_customer_and_quota_are_checked(fake: FakeOpenAI) -> None:
    content = jsonl(chat_line(1, "hello", max_completion_tokens=900))
    with make_client(fake, policy=DefaultPolicy(quota=Quota(tokens_per_day=1000))) as client:
        with pytest.raises(CustomerRequired):
            client.files.create(file=("a.jsonl", content), purpose="batch")
        acme = client.for_customer("acme")
        acme.files.create(file=("a.jsonl", content), purpose="batch")  # fits
        double = jsonl(*(chat_line(n, "hello", max_completion_tokens=900) for n in (1, 2)))
        with pytest.raises(QuotaExceeded):
            acme.files.create(file=("b.jsonl", double), purpose="batch")
        client.suspend("acme", reason="test")
        with pytest.raises(CustomerSuspended):
            acme.files.create(file=("a.jsonl", content), purpose="batch")
    assert [r.path for r in fake.requests].count("/files") == 1


def test_every_upload_form_is_read(acme: SafeClient, fake: FakeOpenAI, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl(chat_line(1, "from a path")))
    for file in (path, ("named.jsonl", path.read_bytes(), "application/jsonl"), path.open("rb")):
        created = acme.files.create(file=file, purpose="batch")
        assert uploaded(fake, created.id)[0]["body"]["safety_identifier"] == ACME_ID
    raw = acme.files.with_raw_response.create(file=path, purpose="batch").parse()
    assert uploaded(fake, raw.id)[0]["body"]["safety_identifier"] == ACME_ID
    via_extra_body = acme.files.create(
        file=path, purpose="assistants", extra_body={"purpose": "batch"}
    )
    assert uploaded(fake, via_extra_body.id)[0]["body"]["safety_identifier"] == ACME_ID


def test_other_uploads_pass_untouched(acme: SafeClient, fake: FakeOpenAI) -> None:
    content = jsonl(chat_line(1, "I will kill you"))
    created = acme.files.create(file=("notes.jsonl", content), purpose="assistants")
    assert fake.files[created.id]["content"] == content
    assert fake.moderation_requests == []


def test_a_batch_needs_a_checked_file(acme: SafeClient, fake: FakeOpenAI) -> None:
    plain = openai.OpenAI(**fake.openai_kwargs())
    unchecked = plain.files.create(file=("x.jsonl", jsonl(chat_line(1, "kill"))), purpose="batch")
    with pytest.raises(UnguardedPathError, match="not uploaded through safe_openai"):
        acme.batches.create(
            input_file_id=unchecked.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert fake.batches == {}

    class AllowBatches(DefaultPolicy):
        def allow_unguarded(self, endpoint: str) -> bool:
            return endpoint == "/batches"

    with make_client(fake, policy=AllowBatches()) as client:
        client.for_customer("acme").batches.create(
            input_file_id=unchecked.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert len(fake.batches) == 1


def test_a_finished_batch_records_its_usage_once_per_request(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    bad = {**chat_line(3, "no model"), "body": {"messages": [{"role": "user", "content": "x"}]}}
    content = jsonl(chat_line(1, "hello"), chat_line(2, "hello again"), bad)
    created = acme.files.create(file=("in.jsonl", content), purpose="batch")
    batch = acme.batches.create(
        input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(BatchFileError, match="no output yet"):
        acme.record_batch_usage(batch.id)
    fake.run_batch(batch.id)

    records = acme.record_batch_usage(batch.id)
    acme.record_batch_usage(batch.id)  # a retried webhook stores nothing twice

    stored = acme.store.usage_records(customer_id="acme")
    assert sorted(r.record_id for r in stored) == sorted(r.record_id for r in records)
    ok = [r for r in records if r.outcome == "ok"]
    assert [r.outcome for r in records] == ["ok", "ok", "error"]
    assert {r.endpoint for r in records} == {"batch:/chat/completions"}  # failed ones too
    output = [
        json.loads(line)
        for line in fake.files[fake.batches[batch.id]["output_file_id"]]["content"].splitlines()
    ]
    for record, line in zip(ok, output, strict=True):
        usage = line["response"]["body"]["usage"]
        assert (record.tokens.input_tokens, record.tokens.output_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        full = acme._safe.prices.cost("gpt-4o-mini", record.tokens)
        assert record.cost_usd == pytest.approx(full * BATCH_DISCOUNT)  # type: ignore[operator]
        assert record.endpoint == "batch:/chat/completions"
        assert acme.store.customer_for_request(line["response"]["request_id"]) == "acme"


def test_an_unknown_batch_is_refused(acme: SafeClient, fake: FakeOpenAI) -> None:
    plain = openai.OpenAI(**fake.openai_kwargs())
    file = plain.files.create(file=("x.jsonl", jsonl(chat_line(1, "hi"))), purpose="batch")
    batch = plain.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    fake.run_batch(batch.id)
    with pytest.raises(BatchFileError, match="not created through safe_openai"):
        acme.record_batch_usage(batch.id)


async def test_the_async_client_checks_creates_and_records(
    aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    acme = aclient.for_customer("acme")
    with pytest.raises(BatchBlocked):
        await acme.files.create(file=("x.jsonl", jsonl(chat_line(1, "kill"))), purpose="batch")
    created = await acme.files.create(file=("x.jsonl", jsonl(chat_line(1, "hi"))), purpose="batch")
    assert uploaded(fake, created.id)[0]["body"]["safety_identifier"] == ACME_ID
    batch = await acme.batches.create(
        input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    fake.run_batch(batch.id)
    [record] = await acme.record_batch_usage(batch.id)
    assert (record.customer_id, record.outcome) == ("acme", "ok")
    assert record.tokens.total_tokens > 0


class MeetingModerator:
    """Answers every input as clean, but only once two calls are in flight at the same time:
    a batch file whose calls ran one after another would break the barrier."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=5)
        self.calls = 0

    def moderate(self, inputs: list[ModerationInput]) -> list[ModerationResult]:
        self.calls += 1
        self.barrier.wait()
        return [ModerationResult(flagged=False, categories={}, scores={}) for _ in inputs]


def test_a_large_file_is_moderated_several_calls_at_a_time(fake: FakeOpenAI) -> None:
    moderator = MeetingModerator()
    content = jsonl(*(chat_line(n, f"text {n}") for n in range(2 * MODERATION_INPUTS_PER_CALL)))
    with make_client(fake, moderator=moderator) as client:
        client.for_customer("acme").files.create(file=("a.jsonl", content), purpose="batch")
    assert moderator.calls == 2


async def test_the_async_client_moderates_a_file_several_calls_at_a_time(
    fake: FakeOpenAI,
) -> None:
    class AsyncMeetingModerator:
        def __init__(self) -> None:
            self.arrived = 0
            self.both = asyncio.Event()

        async def moderate(self, inputs: list[ModerationInput]) -> list[ModerationResult]:
            self.arrived += 1
            if self.arrived == 2:
                self.both.set()
            await asyncio.wait_for(self.both.wait(), 5)  # Python 3.10 has no asyncio.Barrier
            return [ModerationResult(flagged=False, categories={}, scores={}) for _ in inputs]

    content = jsonl(*(chat_line(n, f"text {n}") for n in range(2 * MODERATION_INPUTS_PER_CALL)))
    async with make_async_client(fake, moderator=AsyncMeetingModerator()) as client:
        await client.for_customer("acme").files.create(file=("a.jsonl", content), purpose="batch")


@pytest.mark.parametrize(
    "url",
    [
        "/v1/chat/completions",
        "chat/completions",
        "v1/chat/completions",
        "//v1/chat/completions",
        "/v1//chat/completions",
        "/v1/./chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions?x=1",
        "https://api.openai.com/v1/chat/completions",
    ],
)
def test_every_spelling_of_a_model_endpoint_is_checked(
    acme: SafeClient, fake: FakeOpenAI, url: str
) -> None:
    line = {**chat_line(1, "I will kill him"), "url": url}
    with pytest.raises(BatchBlocked):
        acme.files.create(file=("a.jsonl", jsonl(line)), purpose="batch")
    assert fake.files == {}


@pytest.mark.parametrize("url", ["/V1/chat/completions", "/v1/chat/complete", "/v2/responses"])
def test_an_endpoint_the_guard_does_not_know_is_refused(
    acme: SafeClient, fake: FakeOpenAI, url: str
) -> None:
    line = {**chat_line(1, "hello"), "url": url}
    with pytest.raises(BatchFileError, match="endpoint safe_openai does not know"):
        acme.files.create(file=("a.jsonl", jsonl(line)), purpose="batch")
    assert fake.requests == []


def test_moderation_requests_in_a_batch_pass_as_they_are(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    line = {"custom_id": "m", "method": "POST", "url": "/v1/moderations", "body": {"input": "x"}}
    created = acme.files.create(file=("a.jsonl", jsonl(line)), purpose="batch")
    assert uploaded(fake, created.id) == [line]


def test_batches_create_checks_the_quota_again(fake: FakeOpenAI) -> None:
    """One checked file cannot be run as batch after batch once the budget is spent."""
    policy = DefaultPolicy(quota=Quota(tokens_per_day=5000))
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")
        content = jsonl(chat_line(1, "hello", max_completion_tokens=4000))
        created = acme.files.create(file=("a.jsonl", content), purpose="batch")
        acme.batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        acme.chat.completions.create(  # about 2,250 tokens: what is left no longer fits
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "spend " * 1500}],
            max_completion_tokens=100,
        )
        with pytest.raises(QuotaExceeded):
            acme.batches.create(
                input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
    assert len(fake.batches) == 1


def test_an_anonymous_file_can_run_as_a_batch(fake: FakeOpenAI) -> None:
    with make_client(fake, policy=DefaultPolicy(require_customer=False)) as client:
        created = client.files.create(file=("a.jsonl", jsonl(chat_line(1, "hi"))), purpose="batch")
        batch = client.batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        fake.run_batch(batch.id)
        [record] = client.record_batch_usage(batch.id)
    assert (record.customer_id, record.outcome) == ("", "ok")


async def test_async_streaming_response_uploads_are_remembered(fake: FakeOpenAI) -> None:
    """Over real HTTP, a streamed raw response is read asynchronously before its id is kept."""
    with fake.serve() as base_url:
        async with AsyncSafeClient(
            base_url=base_url,
            api_key="sk-test",
            identifier_secret=SECRET,
            store="memory://",
            spool=False,
        ) as client:
            acme = client.for_customer("acme")
            content = jsonl(chat_line(1, "hi"))
            async with acme.files.with_streaming_response.create(
                file=("a.jsonl", content), purpose="batch"
            ) as response:
                created = await response.parse()
            async with acme.batches.with_streaming_response.create(
                input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
            ) as response:
                batch = await response.parse()
            assert await client.store.customer_for_request(f"batch:{batch.id}") == "acme"


class StandingUnknown(MemoryStore):
    """A store that cannot answer for anyone's standing (an outage)."""

    def suspension(self, customer_id: str, *, now: Any) -> Any:
        raise ConnectionError("down")


def test_an_outage_during_the_check_is_the_policys_to_decide(fake: FakeOpenAI) -> None:
    content = jsonl(chat_line(1, "hello"))
    with make_client(fake, store=StandingUnknown()) as closed, pytest.raises(StoreError):
        closed.for_customer("acme").files.create(file=("a.jsonl", content), purpose="batch")
    with make_client(fake, store=StandingUnknown(), policy=DefaultPolicy(fail_open=True)) as open_:
        open_.for_customer("acme").files.create(file=("a.jsonl", content), purpose="batch")
    assert len(fake.files) == 1


def test_an_identifier_the_caller_set_on_a_line_is_traced_to_the_customer(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    line = chat_line(1, "hello", safety_identifier="app-chosen-id")
    created = acme.files.create(file=("a.jsonl", jsonl(line)), purpose="batch")
    assert uploaded(fake, created.id)[0]["body"]["safety_identifier"] == "app-chosen-id"
    assert acme.store.customer_for_identifier("app-chosen-id") == "acme"


def test_a_suspended_customers_batch_is_refused_and_recorded(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    created = acme.files.create(file=("a.jsonl", jsonl(chat_line(1, "hi"))), purpose="batch")
    acme.suspend("acme", reason="test")
    with pytest.raises(CustomerSuspended):
        acme.batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert fake.batches == {}
    [record] = acme.store.usage_records(customer_id="acme")
    assert (record.endpoint, record.outcome) == ("/batches", "denied")
