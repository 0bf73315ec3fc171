"""Which blocks count against the customer: a retried block is one strike (frameworks retry
every exception), and content the customer did not write (a tool's output) is blocked
without a strike unless the policy counts that role."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from safe_openai import BatchBlocked, DefaultPolicy, ModerationBlocked, SafeClient, _guard
from safe_openai.stores._memory import MemoryStore
from safe_openai.testing import FakeOpenAI

from .conftest import make_client

TOOL_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": "Where is my order?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "track", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "News: a man tried to kill a courier."},
]


def ask(client: SafeClient, messages: list[dict[str, Any]]) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]


def test_a_retried_block_is_one_strike(fake: FakeOpenAI) -> None:
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        for _ in range(3):  # what langchain's with_retry() does with any exception
            with pytest.raises(ModerationBlocked):
                ask(acme, [{"role": "user", "content": "I will kill him"}])
        ask(acme, [{"role": "user", "content": "hello"}])  # not suspended

        assert len(client.store.violations(customer_id="acme")) == 1
        blocked = [r for r in client.store.usage_records() if r.outcome == "blocked"]
        assert len(blocked) == 3  # every refusal is still in the usage records


def test_different_blocked_content_strikes_each_time(fake: FakeOpenAI) -> None:
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        for text in ("I will kill him", "kill them all", "go kill yourself"):
            with pytest.raises(ModerationBlocked):
                ask(acme, [{"role": "user", "content": text}])
        assert client.store.suspension("acme", now=client.store.violations()[0].created_at)


def test_the_repeat_window_is_the_policys(fake: FakeOpenAI) -> None:
    class EveryBlockCounts(DefaultPolicy):
        repeat_strike_window = timedelta(0)

    with make_client(fake, policy=EveryBlockCounts()) as client:
        for _ in range(3):
            with pytest.raises(ModerationBlocked):
                ask(client.for_customer("acme"), [{"role": "user", "content": "I will kill him"}])
        assert len(client.store.violations(customer_id="acme")) == 3


def test_a_blocked_tool_output_is_not_the_customers_strike(fake: FakeOpenAI) -> None:
    with make_client(fake) as client:
        with pytest.raises(ModerationBlocked):
            ask(client.for_customer("acme"), TOOL_TURN)
        (violation,) = client.store.violations(customer_id="acme")
        assert (violation.source, violation.strike) == ("moderation", False)
        assert client.store.count_violations("acme", since=violation.created_at) == 0
        assert fake.model_requests == []  # blocked all the same


def test_blocked_tool_outputs_are_stored_but_never_suspend(fake: FakeOpenAI) -> None:
    """Blocks of content the customer did not write are kept as violations that are not
    strikes: past the strike limit, the customer is not suspended."""
    with make_client(fake, policy=DefaultPolicy(strike_limit=1)) as client:
        acme = client.for_customer("acme")
        for news in ("a man tried to kill a courier", "they kill the driver", "kill them all"):
            turn = [*TOOL_TURN[:2], {**TOOL_TURN[2], "content": f"News: {news}."}]
            with pytest.raises(ModerationBlocked):
                ask(acme, turn)
        stored = client.store.violations(customer_id="acme")
        assert [v.strike for v in stored] == [False] * 3
        ask(acme, [{"role": "user", "content": "hello"}])  # not suspended
        [row] = client.store.usage_report(customer_id="acme")
        assert (row.violations, row.strikes) == (3, 0)


def test_content_first_blocked_as_a_tool_output_strikes_when_the_customer_sends_it(
    fake: FakeOpenAI,
) -> None:
    """A repeat is judged among blocks of its kind: the customer writing what a tool returned a
    moment ago is a strike, not a repeat of the earlier block."""
    text = TOOL_TURN[2]["content"]
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        with pytest.raises(ModerationBlocked):
            ask(acme, TOOL_TURN)
        with pytest.raises(ModerationBlocked):
            ask(acme, [{"role": "user", "content": text}])
        assert [v.strike for v in client.store.violations(customer_id="acme")] == [True, False]


def test_a_policy_may_count_tool_content_as_strikes(fake: FakeOpenAI) -> None:
    class ToolsCount(DefaultPolicy):
        strike_roles = ("user", "tool")

    with make_client(fake, policy=ToolsCount()) as client:
        with pytest.raises(ModerationBlocked):
            ask(client.for_customer("acme"), TOOL_TURN)
        assert len(client.store.violations(customer_id="acme")) == 1


def test_the_same_text_from_the_customer_still_strikes(fake: FakeOpenAI) -> None:
    """Text sent both as the user's and as a tool's counts for the user."""
    messages = [*TOOL_TURN, {"role": "user", "content": "News: a man tried to kill a courier."}]
    with make_client(fake) as client:
        with pytest.raises(ModerationBlocked):
            ask(client.for_customer("acme"), messages)
        assert len(client.store.violations(customer_id="acme")) == 1


def test_a_reuploaded_blocked_batch_file_is_one_strike(fake: FakeOpenAI) -> None:
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "kill"}]},
    }
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        for _ in range(2):
            with pytest.raises(BatchBlocked):
                acme.files.create(file=io.BytesIO(json.dumps(line).encode()), purpose="batch")
        assert len(client.store.violations(customer_id="acme")) == 1


def test_a_blocked_message_kept_in_the_history_is_not_struck_again(fake: FakeOpenAI) -> None:
    """A chat app that keeps the blocked turn in its history gets each later turn blocked, but
    the strike is about the blocked message, not about each new turn."""
    history: list[dict[str, Any]] = [{"role": "user", "content": "I will kill him"}]
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        for follow_up in ("sorry", "hello?", "can we talk about my order"):
            with pytest.raises(ModerationBlocked):
                ask(acme, history)
            history.append({"role": "user", "content": follow_up})
        assert len(client.store.violations(customer_id="acme")) == 1


def test_the_repeat_window_runs_from_the_strike(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same content every 9 minutes is a strike every 10 minutes or so, not one ever."""
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with make_client(fake, policy=DefaultPolicy(strike_limit=None)) as client:
        acme = client.for_customer("acme")
        for minute in range(0, 99, 9):
            monkeypatch.setattr(
                _guard, "_now", lambda minute=minute: start + timedelta(minutes=minute)
            )
            with pytest.raises(ModerationBlocked):
                ask(acme, [{"role": "user", "content": "I will kill him"}])
        struck = sorted(v.created_at for v in client.store.violations(customer_id="acme"))
    assert [(at - start).total_seconds() // 60 for at in struck] == [0, 18, 36, 54, 72, 90]


def test_a_strike_the_store_could_not_take_is_tried_again(fake: FakeOpenAI) -> None:
    """A repeat within the window is skipped only once its strike is stored."""

    class FlakyViolations(MemoryStore):
        failures = 1

        def record_violation(self, violation: Any) -> None:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("down")
            super().record_violation(violation)

    with make_client(fake, store=FlakyViolations()) as client:
        acme = client.for_customer("acme")
        for _ in range(3):
            with pytest.raises(ModerationBlocked):
                ask(acme, [{"role": "user", "content": "I will kill him"}])
        assert len(client.store.violations(customer_id="acme")) == 1


# --- which time a strike window uses ------------------------------------------------------------

H = timedelta(hours=1)
T = datetime(2026, 1, 10, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("hours", "at", "limit", "filled"),
    [
        ([0, 1, 2], 2, 3, 2),  # the newest fills it, at its own time
        ([0, 1, 2], 0, 3, 2),  # a late one fills it: the window filled at the third
        ([-72, -1, 0], -72, 3, None),  # three days apart: never three within 24 h
        ([-72, -1, 0], 0, 3, None),
        ([0, 24], 24, 2, 24),  # the window is closed: exactly 24 h apart is within it
        ([0, 25], 25, 2, None),
        ([0, 1, 30, 31], 30, 3, None),
        ([0, 10, 20, 30], 20, 3, 20),  # the earliest window that holds it and fills
        ([5], 5, 1, 5),
        ([5, 5], 5, 2, 5),
    ],
)
def test_a_violation_suspends_only_with_limit_violations_in_one_window(
    hours: list[int], at: int, limit: int, filled: int | None
) -> None:
    times = [T + h * H for h in hours]
    found = _guard.window_filled(times, T + at * H, timedelta(hours=24), limit)
    assert found == (None if filled is None else T + filled * H)


def test_moderation_strikes_a_day_apart_never_suspend(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strikes every 13 hours: never three within 24 hours, so never suspended."""
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with make_client(fake, policy=DefaultPolicy(strike_limit=3)) as client:
        acme = client.for_customer("acme")
        for step in range(5):
            monkeypatch.setattr(_guard, "_now", lambda step=step: start + step * 13 * H)
            with pytest.raises(ModerationBlocked):
                ask(acme, [{"role": "user", "content": f"I will kill him {step}"}])
        assert client.store.suspension("acme", now=start + 60 * H) is None
        assert len(client.store.violations(customer_id="acme")) == 5
