"""Many concurrent guarded calls racing for one budget: exactly the admitted number is sent."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from safe_openai import AsyncSafeClient, DefaultPolicy, Quota, QuotaExceeded, SafeClient
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET

K = 7
CALLERS = 40


@pytest.mark.parametrize("store", ["memory://", "sqlite"])
def test_threads_racing_for_a_budget_of_k_requests(
    store: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    url = f"sqlite:///{tmp_path}/race.db" if store == "sqlite" else store
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=SECRET,
        store=url,
        spool=False,
        policy=DefaultPolicy(quota=Quota(requests_per_minute=K)),
    ).for_customer("acme")
    barrier = threading.Barrier(CALLERS)
    outcomes: list[str] = []

    def caller(i: int) -> None:
        barrier.wait()
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
            )
            outcomes.append("sent")
        except QuotaExceeded as exc:
            outcomes.append("refused" if exc.retry_after is not None else "refused-no-retry")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("sent") == K
    assert len(fake.model_requests) == K
    [report] = client.store.usage_report()
    assert (report.requests, report.denied) == (K, CALLERS - K)


async def test_tasks_racing_for_a_token_budget(tmp_path: Path) -> None:
    """Worst-case reservations: each call reserves input estimate + max_tokens (100 + ~2).

    Each answer uses its whole cap (a reply longer than 100 tokens, cut at ``max_tokens``), so
    a call that settles before the others reserve frees nothing of its hold: exactly K fit
    however the tasks interleave. (With short answers, a call finished early gave most of its
    hold back and a loaded machine admitted 9.)"""
    fake = FakeOpenAI(reply="word " * 200)
    client = AsyncSafeClient(
        **fake.async_openai_kwargs(),
        identifier_secret=SECRET,
        store=f"sqlite:///{tmp_path}/tokens.db",
        spool=False,
        policy=DefaultPolicy(quota=Quota(tokens_per_day=K * 110)),
    ).for_customer("acme")

    async def caller(i: int) -> bool:
        try:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"{i:04d}"}],
                max_tokens=100,
            )
            return True
        except QuotaExceeded:
            return False

    sent = await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    assert sum(sent) == K
    assert len(fake.model_requests) == K
