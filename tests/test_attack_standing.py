"""Hostile review of quota status and honest refusals: errors that survive a process boundary,
header values a client can parse, and a ``safe-openai status`` that a confused operator or a
hostile customer id cannot turn into a traceback or a terminal escape."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from safe_openai import (
    BatchBlocked,
    CustomerRequired,
    CustomerSuspended,
    DefaultPolicy,
    LimitUsage,
    ModerationBlocked,
    ModerationUnavailable,
    OutputBlocked,
    PolicyDenied,
    Quota,
    QuotaExceeded,
    SafeClient,
    SafeOpenAIError,
    Standing,
    StoreError,
    UnpricedModel,
    WebhookInProgress,
    rate_limit_headers,
)
from safe_openai.policy import Decision
from safe_openai.stores import store_from_url
from safe_openai.stores._memory import MemoryStore
from safe_openai.stores._types import QuotaDemand
from safe_openai.testing import FakeOpenAI
from safe_openai.usage import TokenUsage, UsageRecord

from .conftest import make_client
from .test_cli_status import workdir  # noqa: F401  (the fixture: acme's store and policy)

UTC = timezone.utc
T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


ERRORS: list[SafeOpenAIError] = [
    QuotaExceeded("acme", limit="tokens_per_day", retry_after=12.5, used=900, allowed=1000),
    QuotaExceeded("acme", limit="usd_per_month", retry_after=None, used=0.25, allowed=0.5),
    CustomerSuspended("acme", until=T0, reason="chargeback"),
    CustomerRequired("/chat/completions"),
    UnpricedModel("acme", model="ft:gpt-4o-mini:acme::x1"),
    PolicyDenied("acme", Decision.deny("no", user_message="Not on your plan.")),
    OutputBlocked(
        "acme", categories=("violence",), scores={"violence": 0.9}, endpoint="/responses"
    ),
    BatchBlocked("acme", lines={3: ("hate",)}, scores={"hate": 0.8}, endpoint="/files"),
    ModerationUnavailable("down", customer_id="acme", outage=False),
    StoreError("The usage store failed on reserve."),
    WebhookInProgress("evt_1"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_and_copy_with_every_attribute(error: SafeOpenAIError) -> None:
    """An error crosses a process boundary (multiprocessing, a task queue) and copy.copy
    intact; before, the keyword-only constructors made unpickling raise TypeError."""
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(again) is type(error)
        assert str(again) == str(error) and again.args == error.args
        assert again.__dict__ == error.__dict__
        assert again.user_message == error.user_message
    if isinstance(error, QuotaExceeded):
        assert pickle.loads(pickle.dumps(error)).headers() == error.headers()


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        (1e-10, "0"),  # below the reports' precision: was "0."
        (2.0000000001, "2"),  # was "2."
        (0.1 + 0.2, "0.3"),
        (123456789.123, "123456789.123"),  # was "123456789.122999996"
        (0.00001, "0.00001"),  # never an exponent
        (2.5, "2.5"),
        (7, "7"),
    ],
)
def test_header_numbers_are_plain_decimals(amount: float, shown: str) -> None:
    """Limits and amounts in headers are plain decimals a client can parse: no trailing
    point, no binary noise, no exponent."""
    usage = LimitUsage("usd_per_month", 0, amount, None)
    standing = Standing("acme", T0, (usage,), None, 0, None, timedelta(days=1))
    assert rate_limit_headers(standing)["X-RateLimit-Limit"] == shown
    refused = QuotaExceeded("acme", limit="usd_per_month", retry_after=1, used=0, allowed=amount)
    assert refused.headers()["X-RateLimit-Limit"] == shown
    assert f"0 of {shown} used" in str(refused)


def status(
    directory: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m safe_openai status ARGV`` in a real subprocess, in ``directory``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_OPENAI")}
    return subprocess.run(
        [sys.executable, "-m", "safe_openai", "status", *argv],
        cwd=directory,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        env={**base, **(env or {})},
    )


POLICIES = """
from safe_openai import DefaultPolicy


class KeyedPolicy(DefaultPolicy):
    def quota_for(self, customer_id):
        return {"known": None}[customer_id]
"""


def test_status_names_a_policy_that_fails_to_load_or_raises(workdir: Path) -> None:  # noqa: F811
    """A policy module that raises on import (not only ImportError), a syntax error, and a
    quota_for that raises are one line on stderr and exit 2, not a traceback."""
    (workdir / "raising_policy.py").write_text("raise RuntimeError('no DATABASE_URL set')\n")
    (workdir / "broken_policy.py").write_text("def policy(:\n")
    (workdir / "keyed_policy.py").write_text(POLICIES)
    for spec, says in (
        ("raising_policy:POLICY", "importing 'raising_policy' raised RuntimeError"),
        ("broken_policy:POLICY", "importing 'broken_policy' raised SyntaxError"),
        ("keyed_policy:KeyedPolicy", "the policy raised KeyError for this customer"),
    ):
        done = status(workdir, "acme", "--store", "sqlite:///usage.db", "--policy", spec)
        assert done.returncode == 2, done.stderr
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_status_table_escapes_what_a_terminal_would_act_on(workdir: Path) -> None:  # noqa: F811
    """A customer id (or a suspension reason) carrying a newline or an escape sequence is
    shown escaped, and a non-ASCII id on a terminal that cannot encode it is shown escaped
    instead of raising UnicodeEncodeError."""
    hostile = "evil\x1b]0;owned\x07\nline"
    store_url = "sqlite:///usage.db"
    store = store_from_url(f"sqlite:///{workdir}/usage.db")
    store.suspend(hostile, reason="spam\x1b[2J", until=None, now=datetime.now(UTC))
    store.close()
    done = status(workdir, hostile, "--store", store_url, "--policy", "app_policy:POLICY")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "customer:   evil\\x1b]0;owned\\x07\\nline\n" in done.stdout
    assert "reason:     spam\\x1b[2J" in done.stdout

    done = status(workdir, "zoë-東京", "--store", store_url, env={"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert "customer:   zo\\xeb-\\u6771\\u4eac" in done.stdout


def test_status_json_keeps_the_id_as_it_is(workdir: Path) -> None:  # noqa: F811
    """Escaping is for the table only: JSON carries the id unchanged."""
    done = status(workdir, "zoë\nx", "--store", "sqlite:///usage.db", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["customer"] == "zoë\nx"


class Holding(MemoryStore):
    """A memory store that notes the demand of every hold it grants."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[QuotaDemand] = []

    def reserve(self, customer_id: str, quota: Quota, demand: QuotaDemand, **kw: Any) -> Any:
        found = super().reserve(customer_id, quota, demand, **kw)
        if found.admitted:
            self.held.append(demand)
        return found


def chat(client: SafeClient, **extra: Any) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], **extra
    )


def test_many_choices_are_not_admitted_on_a_sliver_of_the_budget(fake: FakeOpenAI) -> None:
    """An uncapped call with n=128 under 1,000 tokens a day was admitted holding ~1,000 tokens
    while up to 128 responses of output went unheld (an overshoot of n x 4,096 each window);
    now what remains must hold all but one choice's reservation, as for n=1."""
    store = Holding()
    policy = DefaultPolicy(quota=Quota(tokens_per_day=1000))
    with make_client(fake, policy=policy, store=store) as client:
        acme = client.for_customer("acme")
        for n in (2, 128):
            with pytest.raises(QuotaExceeded) as refused:
                chat(acme, n=n)
            assert refused.value.limit == "tokens_per_day"
        assert store.held == [] and fake.model_requests == []
        chat(acme)  # one choice still fits what remains
        assert len(store.held) == 1 and store.held[0].tokens <= 1000


def test_two_choices_fit_when_what_remains_leaves_one_unheld(fake: FakeOpenAI) -> None:
    """n=2 under 6,000 tokens: 8,192 output tokens do not fit, ~5,990 do, leaving less than one
    choice's 4,096 unheld: admitted on what remains."""
    store = Holding()
    with make_client(
        fake, policy=DefaultPolicy(quota=Quota(tokens_per_day=6000)), store=store
    ) as client:
        chat(client.for_customer("acme"), n=2)
    (held,) = store.held
    assert 4096 < held.tokens <= 6000


def test_best_of_is_held_as_the_completions_it_generates(fake: FakeOpenAI) -> None:
    """A legacy completion with best_of=5 is billed for 5 completions of max_tokens: it held
    one, so a capped call could overshoot its budget five times over."""
    store = Holding()
    policy = DefaultPolicy(quota=Quota(tokens_per_day=400))
    with make_client(fake, policy=policy, store=store) as client:
        acme = client.for_customer("acme")
        with pytest.raises(QuotaExceeded) as refused:
            acme.completions.create(
                model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=100, best_of=5
            )
        assert refused.value.retry_after is None  # 500 output tokens exceed the limit itself
        acme.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=50, best_of=5, n=2
        )
    assert [d.tokens for d in store.held] == [1 + 250]


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_an_absurd_cap_or_n_is_held_within_what_a_store_can_count(
    fake: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture, fail_open: bool
) -> None:
    """max_tokens=2**63 or n=10**20 under a requests-only quota overflowed SQLite's (and
    PostgreSQL's) 64-bit integers: a StoreError any customer could raise and, failing open, a
    call sent without its quota check. The hold is bounded; the quota still counts the call."""
    policy = DefaultPolicy(quota=Quota(requests_per_minute=1), fail_open=fail_open)
    store = store_from_url(f"sqlite:///{tmp_path}/usage.db")
    caplog.set_level(logging.WARNING, logger="safe_openai")
    with make_client(fake, policy=policy, store=store) as client:
        acme = client.for_customer("acme")
        # held, then blocked by moderation: never sent (the fake would build 10**20 choices)
        with pytest.raises(ModerationBlocked):
            acme.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "kill"}], n=10**20
            )
        chat(acme, max_tokens=2**63)
        with pytest.raises(QuotaExceeded):  # it was counted
            chat(acme, max_tokens=2**70)
    store.close()
    assert "store_unavailable" not in caplog.text


class FailingSecondTry(MemoryStore):
    """A memory store whose network fails on every reservation after the first."""

    def __init__(self) -> None:
        super().__init__()
        self.reservations = 0

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        self.reservations += 1
        if self.reservations > 1:
            raise ConnectionError("connection reset by peer")
        return super().reserve(*args, **kwargs)


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_a_failed_second_try_does_not_undo_a_refusal(fake: FakeOpenAI, fail_open: bool) -> None:
    """A customer whose budget is used up sends an uncapped call: the store refuses it, the
    guard asks again holding what remains (to learn when room frees) and the network fails.
    Under fail_open the call was sent without any hold, past the store's own refusal; now the
    refusal stands (and is no StoreError either)."""
    store = FailingSecondTry()
    store.record_usage(
        UsageRecord(
            customer_id="acme",
            endpoint="/chat/completions",
            model="gpt-4o-mini",
            outcome="ok",
            tokens=TokenUsage(1000, 0, 0, 0),
            cost_usd=0.0,
            latency_s=0.1,
            created_at=datetime.now(UTC),
            record_id=uuid.uuid4().hex,
        )
    )
    policy = DefaultPolicy(quota=Quota(tokens_per_day=1000), fail_open=fail_open)
    with (
        make_client(fake, policy=policy, store=store) as client,
        pytest.raises(QuotaExceeded) as refused,
    ):
        chat(client.for_customer("acme"))
    assert (refused.value.used, refused.value.allowed) == (1000, 1000)
    assert store.reservations == 2 and fake.model_requests == []


def test_a_reset_of_usage_that_counts_is_never_zero() -> None:
    """resets_at comes from the store's clock and at from this host's: with the host ahead, a
    used-up limit read as Remaining 0, Reset 0 ("retry at once", in a loop). Something used
    resets in at least 1 s; nothing used still reads 0."""
    skewed = LimitUsage("requests_per_minute", 3, 3, T0 - timedelta(seconds=5))
    idle = LimitUsage("tokens_per_day", 0, 1000, None)
    standing = Standing("acme", T0, (skewed, idle), None, 0, None, timedelta(days=1))
    headers = rate_limit_headers(standing, per_limit=True)
    assert (headers["X-RateLimit-Remaining"], headers["X-RateLimit-Reset"]) == ("0", "1")
    assert headers["X-RateLimit-Reset-Requests-Per-Minute"] == "1"
    assert headers["X-RateLimit-Reset-Tokens-Per-Day"] == "0"
