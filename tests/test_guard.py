"""The guarded-call flow, driven without any I/O: every command is answered by the test."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from safe_openai import (
    CustomerRequired,
    CustomerSuspended,
    DefaultPolicy,
    ModerationBlocked,
    ModerationResult,
    ModerationUnavailable,
    Policy,
    PolicyDenied,
    PriceTable,
    Quota,
    QuotaExceeded,
    StoreError,
    UnguardedPathError,
)
from safe_openai._guard import Command, GuardState, Moderate, Spool, StoreCall, begin, drive, finish
from safe_openai._identity import safety_identifier
from safe_openai.stores._memory import MemoryStore
from safe_openai.usage import TokenUsage

SECRET = b"secret"


def clean(text: str) -> ModerationResult:
    return ModerationResult(False, {"violence": False}, {"violence": 0.01})


def flagged(text: str) -> ModerationResult:
    return ModerationResult(True, {"violence": True}, {"violence": 0.95})


class World:
    """A store and a moderator answering the flow's commands, with a log of what was asked."""

    def __init__(
        self, policy: Policy | None = None, judge: Callable[[str], ModerationResult] = clean
    ) -> None:
        self.store = MemoryStore()
        self.judge = judge
        self.state = GuardState(
            policy=policy or DefaultPolicy(),
            store=self.store,
            secret=SECRET,
            moderator=None,
            moderation_model="omni-moderation-latest",
            prices=PriceTable(),
        )
        self.commands: list[Command] = []
        self.spooled: list[Any] = []
        self.store_down = False
        self.moderation_down = False

    def execute(self, command: Command) -> Any:
        self.commands.append(command)
        if isinstance(command, StoreCall):
            if self.store_down:
                raise StoreError("down")
            return getattr(self.store, command.method)(*command.args, **command.kwargs)
        if isinstance(command, Moderate):
            if self.moderation_down:
                raise ModerationUnavailable("down")
            return [self.judge(item.value) for item in command.inputs]
        if isinstance(command, Spool):
            self.spooled.append(command.record)
            return None
        raise AssertionError(command)

    def begin(
        self,
        body: dict[str, Any],
        *,
        customer: str | None = "acme",
        path: str = "/chat/completions",
    ) -> Any:
        return drive(begin(self.state, bound_customer=customer, path=path, body=body), self.execute)

    @property
    def moderated(self) -> list[str]:
        return [i.value for c in self.commands if isinstance(c, Moderate) for i in c.inputs]


def chat(*texts: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": t} for t in texts],
        **extra,
    }


def test_allowed_call_is_tagged_with_hashed_identifier() -> None:
    world = World()
    body = chat("hello")
    call = world.begin(body)
    assert call is not None
    assert body["safety_identifier"] == safety_identifier(SECRET, "acme")
    assert world.store.customer_for_identifier(body["safety_identifier"]) == "acme"
    assert world.moderated == ["hello"]


def test_caller_identifier_is_kept_and_mapped() -> None:
    world = World()
    body = chat("hello", safety_identifier="mine")
    world.begin(body)
    assert body["safety_identifier"] == "mine"
    assert world.store.customer_for_identifier("mine") == "acme"


def test_user_only_endpoints_get_identifier_in_user() -> None:
    world = World()
    body = {"model": "text-embedding-3-small", "input": "x"}
    world.begin(body, path="/embeddings")
    assert body["user"] == safety_identifier(SECRET, "acme")
    assert "safety_identifier" not in body


def test_no_customer_raises_before_any_command() -> None:
    world = World()
    with pytest.raises(CustomerRequired):
        world.begin(chat("x"), customer=None)
    assert world.commands == []


def test_anonymous_calls_allowed_when_policy_says_so() -> None:
    world = World(DefaultPolicy(require_customer=False))
    body = chat("x")
    assert world.begin(body, customer=None) is not None
    assert "safety_identifier" not in body


def test_untracked_paths_pass_through_and_uncovered_content_paths_are_refused() -> None:
    world = World()
    assert world.begin({"input": "x"}, path="/moderations") is None
    with pytest.raises(UnguardedPathError):
        world.begin({"session": {}}, path="/realtime/client_secrets")


def test_blocked_content_never_returns_a_call_and_records_violation() -> None:
    world = World(judge=lambda t: flagged(t) if "kill" in t else clean(t))
    with pytest.raises(ModerationBlocked) as info:
        world.begin(chat("hello", "I will kill"))
    assert info.value.categories == ("violence",)
    assert info.value.scores["violence"] == 0.95
    assert info.value.customer_id == "acme"
    assert "kill" not in str(info.value)
    [violation] = world.store.violations()
    assert violation.source == "moderation" and violation.categories == ("violence",)
    [record] = world.store.usage_records()
    assert record.outcome == "blocked"
    assert record.tokens == TokenUsage()


def test_strike_limit_suspends_then_suspended_customer_is_refused_before_moderation() -> None:
    world = World(
        DefaultPolicy(strike_limit=2, suspension=timedelta(hours=1)),
        judge=lambda t: flagged(t) if "kill" in t else clean(t),
    )
    for attempt in range(2):
        with pytest.raises(ModerationBlocked):
            world.begin(chat(f"kill {attempt}"))
    world.commands.clear()
    with pytest.raises(CustomerSuspended) as info:
        world.begin(chat("harmless"))
    assert info.value.until is not None
    assert world.moderated == []


def test_second_turn_moderates_only_new_content() -> None:
    world = World()
    world.begin(chat("turn one"))
    world.commands.clear()
    world.begin(chat("turn one", "turn two"))
    assert world.moderated == ["turn two"]


def test_long_text_is_chunked_into_one_batched_call() -> None:
    world = World()
    long_text = "".join(f"{i:05d} " for i in range(1500))  # 9000 distinct characters
    world.begin(chat(long_text, "b"))
    [moderate] = [c for c in world.commands if isinstance(c, Moderate)]
    assert len(moderate.inputs) == 4
    joined = "".join(i.value for i in moderate.inputs)
    assert all(f"{i:05d}" in joined for i in range(1500))
    assert all(len(i.value) <= 4000 for i in moderate.inputs)


def test_moderation_outage_fails_closed_by_default_and_is_recorded_as_refused() -> None:
    """Nothing was sent, so the record must not count against request quotas."""
    world = World(DefaultPolicy(quota=Quota(requests_per_minute=1)))
    world.moderation_down = True
    for _ in range(3):
        with pytest.raises(ModerationUnavailable):
            world.begin(chat("hello"))
    assert {record.outcome for record in world.store.usage_records()} == {"denied"}
    world.moderation_down = False
    assert world.begin(chat("hello")) is not None


def test_moderation_outage_fails_open_when_policy_says_so() -> None:
    world = World(DefaultPolicy(fail_open=True))
    world.moderation_down = True
    assert world.begin(chat("hello")) is not None


def test_store_outage_on_standing_check_fails_closed_unless_fail_open() -> None:
    world = World()
    world.store_down = True
    with pytest.raises(StoreError):
        world.begin(chat("x"))
    world = World(DefaultPolicy(fail_open=True))
    world.store_down = True
    assert world.begin(chat("x")) is not None


def test_policy_denial_is_recorded_and_nothing_moderated() -> None:
    world = World(DefaultPolicy(allowed_models=["gpt-4o"]))
    with pytest.raises(PolicyDenied) as info:
        world.begin(chat("x"))
    assert info.value.user_message == "This model is not available on your plan."
    assert world.moderated == []
    assert world.store.usage_records()[0].outcome == "denied"


def test_policy_adjustments_cap_output_and_add_instruction() -> None:
    world = World(DefaultPolicy(max_output_tokens=50, system_instruction="Only recipes."))
    body = chat("x", max_tokens=1000)
    world.begin(body)
    assert body["max_tokens"] == 50
    assert body["messages"][0] == {"role": "system", "content": "Only recipes."}
    body = {"model": "gpt-4o-mini", "input": "x", "instructions": "Be brief."}
    world.begin(body, path="/responses")
    assert body["max_output_tokens"] == 50
    assert body["instructions"] == "Only recipes.\n\nBe brief."


def test_unmoderatable_content_allowed_by_default_denied_by_policy() -> None:
    body = {"model": "m", "prompt": [1, 2, 3]}
    assert World().begin(dict(body), path="/completions") is not None

    class Strict(DefaultPolicy):
        def allow_unmoderatable(self, request: Any, kinds: Any) -> bool:
            return False

    with pytest.raises(PolicyDenied):
        World(Strict()).begin(dict(body), path="/completions")


def test_quota_reserve_then_commit_actual_usage() -> None:
    world = World(DefaultPolicy(quota=Quota(tokens_per_day=10_000)))
    call = world.begin(chat("hello", max_tokens=100))
    assert call.reservation is not None and call.reservation.admitted
    drive(
        finish(world.state, call, outcome="ok", usage=TokenUsage(7, 0, 3), request_id="req_1"),
        world.execute,
    )
    [record] = world.store.usage_records()
    assert record.tokens.total_tokens == 10
    assert world.store.customer_for_request("req_1") == "acme"


def test_quota_exceeded_raises_with_limit_and_retry_after() -> None:
    world = World(DefaultPolicy(quota=Quota(requests_per_minute=1)))
    call = world.begin(chat("a"))
    drive(
        finish(world.state, call, outcome="ok", usage=TokenUsage(1, 0, 1), request_id=None),
        world.execute,
    )
    with pytest.raises(QuotaExceeded) as info:
        world.begin(chat("b"))
    assert info.value.limit == "requests_per_minute"
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 60


def test_blocked_call_releases_its_reservation() -> None:
    world = World(
        DefaultPolicy(quota=Quota(requests_per_minute=1), strike_limit=None),
        judge=lambda t: flagged(t) if "kill" in t else clean(t),
    )
    with pytest.raises(ModerationBlocked):
        world.begin(chat("kill"))
    assert world.begin(chat("fine")) is not None


def test_chat_stream_gets_usage_injected_and_marked_hidden() -> None:
    world = World()
    body = chat("x", stream=True)
    call = world.begin(body)
    assert body["stream_options"] == {"include_usage": True}
    assert call.hide_usage_chunk
    body = chat("x", stream=True, stream_options={"include_usage": True})
    assert not world.begin(body).hide_usage_chunk


def test_finish_runs_once_and_spools_when_store_fails() -> None:
    world = World()
    call = world.begin(chat("x"))
    world.store_down = True
    flow = finish(world.state, call, outcome="ok", usage=TokenUsage(1, 0, 1), request_id=None)
    drive(flow, world.execute)
    drive(
        finish(world.state, call, outcome="ok", usage=TokenUsage(1, 0, 1), request_id=None),
        world.execute,
    )
    assert len(world.spooled) == 1


def test_missing_usage_on_sent_call_is_recorded_as_estimate() -> None:
    world = World()
    call = world.begin(chat("x" * 400))
    drive(
        finish(world.state, call, outcome="ok", usage=None, request_id=None, output_chars=40),
        world.execute,
    )
    [record] = world.store.usage_records()
    assert record.outcome == "estimated"
    assert record.tokens == TokenUsage(100, 0, 10)
