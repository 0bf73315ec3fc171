"""Alerts: soft limits, quota refusals, strikes and suspensions raise one alert each, once per
event across clients sharing a store; a sink or hook that fails never reaches the call."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from safe_openai import (
    ConfigurationError,
    DefaultPolicy,
    ModerationBlocked,
    Policy,
    Quota,
    QuotaExceeded,
    SafeClient,
    _guard,
)
from safe_openai._guard import quota_alert, soft_limit_alerts
from safe_openai.alerts import Alert
from safe_openai.stores import Reservation, store_from_url
from safe_openai.stores._memory import MemoryStore
from safe_openai.stores._types import LimitUsage
from safe_openai.testing import FakeOpenAI
from safe_openai.usage import TokenUsage, UsageRecord

from .conftest import SECRET, make_async_client, make_client
from .topologies import drop_postgres_schema, drop_redis_prefix, require

HELLO = [{"role": "user", "content": "hello"}]
NOW = datetime(2026, 12, 4, 19, 10, 30, tzinfo=timezone.utc)


def ask(client: SafeClient, content: str = "hello", **extra: Any) -> Any:
    return client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
        **extra,
    )


def kinds(alerts: list[Alert]) -> list[str]:
    return [a.kind for a in alerts]


# --- the alert ---------------------------------------------------------------------------------


def test_an_alert_round_trips_through_json_with_every_field() -> None:
    alert = Alert(
        id="alert:soft_limit:acme:tokens_per_day:0.8:2026-12-04",
        kind="soft_limit",
        customer_id="acme",
        at=NOW,
        limit="tokens_per_day",
        used=820,
        allowed=1000,
        threshold=0.8,
        reason="tokens_per_day reached 80% of its limit",
    )
    data = json.loads(alert.to_json())
    assert data["at"] == "2026-12-04T19:10:30+00:00"
    assert set(data) == {
        "id",
        "kind",
        "customer_id",
        "at",
        "limit",
        "used",
        "allowed",
        "threshold",
        "categories",
        "event_type",
        "reason",
    }
    assert Alert.from_json(alert.to_json()) == alert
    with pytest.raises(ValueError, match="not a safe-openai alert"):
        Alert.from_json('{"kind": "nope"}')


# --- policy settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "soft_limits",
    [0, -0.1, 1.01, float("nan"), True, "0.8", {"tokens_per_week": 0.5}, {"tokens_per_day": 0}],
)
def test_soft_limits_outside_zero_to_one_are_refused(soft_limits: Any) -> None:
    with pytest.raises(ConfigurationError, match="soft"):
        DefaultPolicy(soft_limits=soft_limits)


def test_a_subclass_with_a_bad_soft_limit_fails_when_it_is_defined() -> None:
    with pytest.raises(ConfigurationError, match="within \\(0, 1\\]"):

        class Bad(Policy):  # pyright: ignore[reportUnusedClass]
            soft_limits = 80


@pytest.mark.parametrize("soft_limits", [1, 1.0, 0.8, {"tokens_per_day": 0.5}, None])
def test_soft_limits_within_zero_to_one_are_taken(soft_limits: Any) -> None:
    assert DefaultPolicy(soft_limits=soft_limits).soft_limits == soft_limits


def test_alerts_take_one_sink_or_several_and_refuse_what_is_not_callable() -> None:
    def sink(alert: Alert) -> None: ...

    assert DefaultPolicy(alerts=sink).alert_sinks == (sink,)
    assert DefaultPolicy(alerts=[sink, print]).alert_sinks == (sink, print)
    assert DefaultPolicy().alert_sinks == ()
    with pytest.raises(ConfigurationError, match="callable"):
        DefaultPolicy(alerts=[sink, "http://example.com"])  # type: ignore[list-item]


def test_a_policy_loads_no_alert_machinery_until_used() -> None:
    """``from safe_openai import DefaultPolicy`` leaves the sink (and tenacity) unloaded."""
    code = (
        "import sys\nfrom safe_openai import DefaultPolicy\nDefaultPolicy(soft_limits=0.8)\n"
        "print(sorted(m for m in sys.modules if m in ('safe_openai.alerts', 'tenacity')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- the soft limit crossing, as plain code ----------------------------------------------------


def _record(tokens: int = 0, cost: float = 0.0) -> UsageRecord:
    return UsageRecord(
        "acme", "/chat/completions", "m", "ok", TokenUsage(tokens, 0, 0), cost, 0.1, NOW
    )


def _reservation(*usage: LimitUsage) -> Reservation:
    return Reservation("r1", "acme", True, at=NOW, usage=usage)


@pytest.mark.parametrize(
    ("usage", "record", "crossed"),
    [
        (LimitUsage("requests_per_minute", 7, 10, None), _record(), []),
        (LimitUsage("requests_per_minute", 8, 10, None), _record(), ["requests_per_minute"]),
        # already at or above it: reported too (the id fires it once per window); the count
        # may be high by other calls' pending holds, and the call that truly crossed not know
        (LimitUsage("requests_per_minute", 9, 10, None), _record(), ["requests_per_minute"]),
        (LimitUsage("tokens_per_day", 700, 1000, None), _record(100), []),
        (LimitUsage("tokens_per_day", 700, 1000, None), _record(200), ["tokens_per_day"]),
        (LimitUsage("tokens_per_day", 900, 1000, None), _record(500), ["tokens_per_day"]),
        (LimitUsage("usd_per_month", 0.7, 1.0, None), _record(cost=0.2), ["usd_per_month"]),
        (LimitUsage("tokens_per_minute", 0, 10, None), _record(50), ["tokens_per_minute"]),
    ],
)
def test_a_soft_limit_fires_when_a_call_leaves_usage_at_or_above_its_threshold(
    usage: LimitUsage, record: UsageRecord, crossed: list[str]
) -> None:
    policy = DefaultPolicy(soft_limits=0.9)
    found = soft_limit_alerts(policy, _reservation(usage), record)
    assert [a.limit for a in found] == crossed


def test_soft_limit_ids_name_the_customer_limit_threshold_and_window() -> None:
    policy = DefaultPolicy(soft_limits={"requests_per_minute": 0.5, "tokens_per_day": 0.5})
    usage = (
        LimitUsage("requests_per_minute", 4, 10, None),
        LimitUsage("tokens_per_day", 400, 1000, None),
        LimitUsage("usd_per_month", 0.0, 1.0, None),
    )
    found = soft_limit_alerts(policy, _reservation(*usage), _record(100, 1.0))
    assert [a.id for a in found] == [
        "alert:soft_limit:acme:requests_per_minute:0.5:2026-12-04T19",
        "alert:soft_limit:acme:tokens_per_day:0.5:2026-12-04",
    ]
    assert (found[1].used, found[1].allowed, found[1].threshold) == (500, 1000, 0.5)
    colon = UsageRecord("a:b", "/x", "m", "ok", TokenUsage(100, 0, 0), 0, 0.1, NOW)
    [odd] = soft_limit_alerts(policy, _reservation(usage[1]), colon)
    assert odd.id == "alert:soft_limit:a%3Ab:tokens_per_day:0.5:2026-12-04"


def test_minute_limits_alert_once_per_utc_hour_day_and_month_limits_per_their_window() -> None:
    """A customer who stays at a minute limit hears of it once an hour, not once a minute: the
    soft-limit and quota ids of the minute limits name the UTC hour; the day and month limits
    keep their day and month."""
    policy = DefaultPolicy(soft_limits=0.5)
    usage = (
        LimitUsage("requests_per_minute", 9, 10, None),
        LimitUsage("tokens_per_minute", 900, 1000, None),
        LimitUsage("tokens_per_day", 900, 1000, None),
        LimitUsage("usd_per_month", 0.9, 1.0, None),
    )

    def ids(at: datetime) -> list[str]:
        reservation = Reservation("r1", "acme", True, at=at, usage=usage)
        soft = [a.id for a in soft_limit_alerts(policy, reservation, _record(10, 0.01))]
        refused = []
        for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day"):
            found = quota_alert(
                cast("Any", SimpleNamespace(customer_id="acme", created_at=at)),
                None,
                Reservation("", "acme", False, name, None, at=at, usage=usage),
            )
            assert found is not None
            refused.append(found.id)
        return soft + refused

    first = ids(datetime(2026, 12, 4, 19, 0, tzinfo=timezone.utc))
    assert first == [
        "alert:soft_limit:acme:requests_per_minute:0.5:2026-12-04T19",
        "alert:soft_limit:acme:tokens_per_minute:0.5:2026-12-04T19",
        "alert:soft_limit:acme:tokens_per_day:0.5:2026-12-04",
        "alert:soft_limit:acme:usd_per_month:0.5:2026-12",
        "alert:quota_exceeded:acme:requests_per_minute:2026-12-04T19",
        "alert:quota_exceeded:acme:tokens_per_minute:2026-12-04T19",
        "alert:quota_exceeded:acme:tokens_per_day:2026-12-04",
    ]
    # every minute of the hour gives the same ids: one alert per hour
    hour = datetime(2026, 12, 4, 19, 0, tzinfo=timezone.utc)
    assert all(ids(hour + timedelta(minutes=m, seconds=59)) == first for m in range(60))
    later = ids(hour + timedelta(hours=1))
    assert [a != b for a, b in zip(first, later, strict=True)] == [
        True,
        True,
        False,
        False,
        True,
        True,
        False,
    ]


def test_a_refused_or_unsent_call_crosses_no_soft_limit() -> None:
    policy = DefaultPolicy(soft_limits=0.5)
    usage = LimitUsage("tokens_per_day", 400, 1000, None)
    blocked = UsageRecord("acme", "/x", "m", "blocked", TokenUsage(500, 0, 0), 0, 0.1, NOW)
    assert soft_limit_alerts(policy, _reservation(usage), blocked) == []
    refused = Reservation("", "acme", False, "tokens_per_day", None, usage=(usage,))
    assert soft_limit_alerts(policy, refused, _record(500)) == []
    assert soft_limit_alerts(policy, _reservation(), _record(500)) == []  # a store without usage


# --- through the client ------------------------------------------------------------------------


def test_a_soft_limit_fires_once_as_usage_crosses_it(fake: FakeOpenAI) -> None:
    received: list[Alert] = []
    policy = DefaultPolicy(
        quota=Quota(requests_per_minute=5), soft_limits=0.6, alerts=received.append
    )
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")
        for _ in range(2):
            ask(acme)
        assert received == []
        ask(acme)  # the third of five: 60 %
        ask(acme)
        [alert] = received
        assert (alert.kind, alert.customer_id, alert.limit) == (
            "soft_limit",
            "acme",
            "requests_per_minute",
        )
        assert (alert.used, alert.allowed, alert.threshold) == (3, 5, 0.6)
        assert alert.id.startswith("alert:soft_limit:acme:requests_per_minute:0.6:")


def test_a_soft_limit_crossed_by_concurrent_calls_is_not_missed(fake: FakeOpenAI) -> None:
    """Two streams open at once: the second's count includes the first's hold (its whole
    demand), so neither call sees its own use take the count from below the threshold, yet
    together they reach it. The crossing still fires, once."""
    received: list[Alert] = []
    policy = DefaultPolicy(
        quota=Quota(tokens_per_day=1000), soft_limits=0.5, alerts=received.append
    )
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")

        def used() -> float:
            [day] = [u for u in acme.standing().limits if u.name == "tokens_per_day"]
            return day.used

        while used() < 490:  # 5 tokens a call
            ask(acme, max_tokens=20)
        assert received == []
        streams = [
            ask(acme, max_tokens=150, stream=True, stream_options={"include_usage": True})
            for _ in range(2)
        ]
        for stream in streams:
            for _ in stream:
                pass
        assert used() >= 500
        ask(acme, max_tokens=20)  # a later call in the window: no second alert
        [alert] = received
        assert (alert.kind, alert.limit, alert.threshold) == ("soft_limit", "tokens_per_day", 0.5)


def test_a_quota_refusal_fires_once_per_limit_and_window(fake: FakeOpenAI) -> None:
    received: list[Alert] = []
    policy = DefaultPolicy(quota=Quota(tokens_per_day=200), alerts=received.append)
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")
        for _ in range(3):
            with pytest.raises(QuotaExceeded):
                ask(acme, max_tokens=1000)  # more than the whole day's budget
        [alert] = received
        today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        assert alert.id == f"alert:quota_exceeded:acme:tokens_per_day:{today}"
        assert (alert.kind, alert.limit, alert.allowed, alert.used) == (
            "quota_exceeded",
            "tokens_per_day",
            200,
            0,
        )


def test_strikes_and_the_suspension_they_earn_each_fire_once(fake: FakeOpenAI) -> None:
    received: list[Alert] = []
    policy = DefaultPolicy(strike_limit=2, alerts=received.append)
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")
        for text in ("I will kill him", "kill them all"):
            with pytest.raises(ModerationBlocked):
                ask(acme, text)
        assert kinds(received) == ["strike", "strike", "suspension"]
        strike, _, suspension = received
        violations = client.store.violations(customer_id="acme")
        assert {f"alert:strike:{v.violation_id}" for v in violations} == {
            a.id for a in received[:2]
        }
        assert (strike.categories, strike.event_type) == (("violence",), "moderation")
        assert suspension.id.startswith("alert:suspension:acme:")
        assert suspension.reason == "suspended: 2 violations within 1d"


def test_a_violation_that_is_not_a_strike_raises_no_alert(fake: FakeOpenAI) -> None:
    received: list[Alert] = []
    tool_turn: list[dict[str, Any]] = [
        {"role": "user", "content": "Where is my order?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "News: a man tried to kill a courier."},
    ]
    with make_client(fake, policy=DefaultPolicy(alerts=received.append)) as client:
        with pytest.raises(ModerationBlocked):
            client.for_customer("acme").chat.completions.create(
                model="gpt-4o-mini",
                messages=tool_turn,  # type: ignore[arg-type]
            )
        assert len(client.store.violations()) == 1
    assert received == []


def test_without_sinks_or_a_hook_alerts_cost_no_store_writes(fake: FakeOpenAI) -> None:
    """A policy nobody listens to claims nothing: strikes and refusals write no event rows."""
    store = MemoryStore()
    policy = DefaultPolicy(quota=Quota(tokens_per_day=200), soft_limits=0.5)
    with make_client(fake, policy=policy, store=store) as client:
        acme = client.for_customer("acme")
        with pytest.raises(QuotaExceeded):
            ask(acme, max_tokens=1000)
        with pytest.raises(ModerationBlocked):
            ask(acme, "I will kill him", max_tokens=10)
    assert store._events == {}


def test_a_raising_sink_or_hook_never_breaks_the_call(fake: FakeOpenAI) -> None:
    received: list[Alert] = []

    def broken(alert: Alert) -> None:
        raise RuntimeError("sink down")

    policy = DefaultPolicy(quota=Quota(tokens_per_day=200), alerts=[broken, received.append])
    with (
        make_client(fake, policy=policy) as client,
        capture_logs() as logs,
        pytest.raises(QuotaExceeded),
    ):
        ask(client.for_customer("acme"), max_tokens=1000)
    assert kinds(received) == ["quota_exceeded"]  # the next sink still got it
    assert any(e["event"] == "safe_openai.alert_sink_failed" for e in logs)

    class Raising(DefaultPolicy):
        def on_alert(self, alert: Alert) -> None:
            raise RuntimeError("hook down")

    raising = Raising(quota=Quota(requests_per_minute=2), soft_limits=0.5)
    with make_client(fake, policy=raising) as client, capture_logs() as logs:
        assert ask(client.for_customer("acme")).choices  # crosses 50 %: the hook raises
    assert any(e["event"] == "safe_openai.alert_hook_failed" for e in logs)


def test_the_async_client_fires_the_same_alerts(fake: FakeOpenAI) -> None:
    received: list[Alert] = []
    policy = DefaultPolicy(
        quota=Quota(requests_per_minute=2), soft_limits=0.5, strike_limit=1, alerts=received.append
    )

    async def main() -> None:
        async with make_async_client(fake, policy=policy) as client:
            acme = client.for_customer("acme")
            await acme.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # type: ignore[arg-type]
            with pytest.raises(ModerationBlocked):
                await acme.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "I will kill him"}],
                )

    asyncio.run(main())
    assert kinds(received) == ["soft_limit", "strike", "suspension"]


# --- once across clients and processes ---------------------------------------------------------


def _shared_store_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/usage.db"
    return require(backend)


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
def test_an_alert_fires_once_across_clients_sharing_a_store(
    backend: str, tmp_path: Path, fake: FakeOpenAI, request: pytest.FixtureRequest
) -> None:
    """Two clients (two processes' worth of state) on one store: the refusal and the strike
    alert once in all, whichever client sees them."""
    url = _shared_store_url(backend, tmp_path)
    tag = f"alerts_{uuid.uuid4().hex[:10]}"
    options: dict[str, Any] = {}
    if backend != "sqlite":
        options = {"prefix": tag} if backend == "redis" else {"schema": tag}

    received: list[tuple[int, Alert]] = []
    clients = []
    try:
        for n in (1, 2):

            def sink(alert: Alert, n: int = n) -> None:
                received.append((n, alert))

            policy = DefaultPolicy(quota=Quota(tokens_per_day=200), strike_limit=None, alerts=sink)
            clients.append(make_client(fake, policy=policy, store=store_from_url(url, **options)))
        for client in clients * 2:
            with pytest.raises(QuotaExceeded):
                ask(client.for_customer("acme"), max_tokens=1000)
        assert [(n, a.kind) for n, a in received] == [(1, "quota_exceeded")]
        # one strike, written twice (a replay in another process): one alert
        with pytest.raises(ModerationBlocked):
            ask(clients[1].for_customer("beta"), "I will kill him", max_tokens=10)
        [violation] = clients[0].store.violations(customer_id="beta")
        _guard.drive(_guard.enforce_strikes(clients[0]._safe, violation), clients[0]._execute)
        assert [(n, a.kind) for n, a in received] == [(1, "quota_exceeded"), (2, "strike")]
    finally:
        for client in clients:
            client.store.close()
            client.close()
        if backend == "redis":
            drop_redis_prefix(url, tag)
        elif backend == "postgres":
            drop_postgres_schema(tag)


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
def test_a_soft_limit_crossed_by_either_client_fires_once(
    backend: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    """Calls of two clients add up in the store's usage: the call that reaches 50 % fires,
    whichever client made it, and none after it does."""
    url = _shared_store_url(backend, tmp_path)
    tag = f"alerts_{uuid.uuid4().hex[:10]}"
    options: dict[str, Any] = {}
    if backend != "sqlite":
        options = {"prefix": tag} if backend == "redis" else {"schema": tag}
    received: list[tuple[int, Alert]] = []
    clients = []
    try:
        for n in (1, 2):

            def sink(alert: Alert, n: int = n) -> None:
                received.append((n, alert))

            policy = DefaultPolicy(
                quota=Quota(requests_per_minute=10), soft_limits=0.5, alerts=sink
            )
            clients.append(make_client(fake, policy=policy, store=store_from_url(url, **options)))
        for client in [*clients, *clients, clients[0]]:  # the 5th call is the first client's
            ask(client.for_customer("acme"))
        assert [(n, a.kind, a.used) for n, a in received] == [(1, "soft_limit", 5)]
        for client in clients * 2:
            ask(client.for_customer("acme"))
        assert len(received) == 1
    finally:
        for client in clients:
            client.store.close()
            client.close()
        if backend == "redis":
            drop_redis_prefix(url, tag)
        elif backend == "postgres":
            drop_postgres_schema(tag)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from safe_openai import DefaultPolicy, Quota, QuotaExceeded, SafeClient
    from safe_openai.testing import FakeOpenAI

    received = []
    policy = DefaultPolicy(quota=Quota(tokens_per_day=200), alerts=received.append)
    client = SafeClient(**FakeOpenAI().openai_kwargs(), identifier_secret=sys.argv[2],
                        store=sys.argv[1], spool=False, policy=policy)
    for _ in range(2):
        try:
            client.for_customer("acme").chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                max_tokens=1000)
        except QuotaExceeded:
            pass
    client.close()
    print(json.dumps([a.id for a in received]))
    """
)


def test_an_alert_fires_once_across_two_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/usage.db"
    seen = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, url, SECRET],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        seen.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = seen
    assert len(first) == 1 and first[0].startswith("alert:quota_exceeded:acme:tokens_per_day:")
    assert second == []


def test_an_alert_whose_claimer_died_fires_once_its_claim_lapses(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process claimed the alert and died before its hook ran: this one stays quiet
    while that claim holds, and fires when the event comes again after it lapsed."""
    from datetime import timedelta

    from safe_openai.stores._types import EVENT_LEASE

    received: list[Alert] = []
    store = MemoryStore()
    policy = DefaultPolicy(quota=Quota(tokens_per_day=200), alerts=received.append)
    with make_client(fake, policy=policy, store=store) as client:
        acme = client.for_customer("acme")
        now = datetime.now(timezone.utc)
        alert_id = f"alert:quota_exceeded:acme:tokens_per_day:{now:%Y-%m-%d}"
        assert store.claim_event(alert_id, token="dead", now=now, lease=EVENT_LEASE) == "claimed"
        with pytest.raises(QuotaExceeded):
            ask(acme, max_tokens=1000)
        assert received == []
        later = now + EVENT_LEASE + timedelta(seconds=1)
        monkeypatch.setattr(_guard, "_now", lambda: later)
        for _ in range(2):
            with pytest.raises(QuotaExceeded):
                ask(acme, max_tokens=1000)
        assert [a.id for a in received] == [alert_id]


def test_copies_of_a_client_on_one_store_share_the_alerts_they_saw(fake: FakeOpenAI) -> None:
    """A copy with a policy of its own (a tier per request) on the same store does not claim
    again what the client already found claimed: no store round trip per refused call."""
    claims: list[str] = []

    class Counting(MemoryStore):
        def claim_event(self, event_id: str, **kwargs: Any) -> Any:
            claims.append(event_id)
            return super().claim_event(event_id, **kwargs)

    policy = DefaultPolicy(quota=Quota(tokens_per_day=200), alerts=lambda alert: None)
    with make_client(fake, policy=policy, store=Counting()) as client:
        for _ in range(3):
            tier = client.copy(policy=policy).for_customer("acme")
            with pytest.raises(QuotaExceeded):
                ask(tier, max_tokens=1000)
    assert len(claims) == 1
