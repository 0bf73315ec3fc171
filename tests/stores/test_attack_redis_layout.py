"""Redis ``quota_usage`` during a rolling upgrade: keys of the layout before buckets (written by
an older replica, or not yet moved by a reservation) count in the read-only usage exactly as the
next reservation counts them, and the read leaves them where they are."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from safe_openai.policy import Quota
from safe_openai.stores import store_from_url
from safe_openai.stores._types import QuotaDemand

from .conftest import REDIS_URL
from .test_redis_postgres_processes import _drop_redis, _reachable

UTC = timezone.utc
QUOTA = Quota(
    requests_per_minute=10, tokens_per_minute=1000, tokens_per_day=10_000, usd_per_month=5.0
)


@pytest.mark.redis
def test_quota_usage_counts_keys_of_the_layout_before_buckets_without_moving_them() -> None:
    """Two committed calls in a version 1 minute window and a version 1 hold, next to a hold
    of this release in the same second: quota_usage sees what the next reservation sees (it
    saw 0 requests, 0 tokens and 0.0 USD of them), and only that reservation moves them."""
    redis = pytest.importorskip("redis")
    _reachable(REDIS_URL)
    prefix = f"safe-openai-layout-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC).replace(microsecond=500_000)
    if (now + timedelta(minutes=1)).date() != now.date():
        pytest.skip("too close to midnight for a day's counter to stay put")
    us = int(now.timestamp() * 1_000_000)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    key = f"{prefix}:{{acme}}"
    store = store_from_url(REDIS_URL, prefix=prefix)
    try:
        # a hold of this release, in the second the version 1 hold below also falls in
        mine = store.reserve("acme", QUOTA, QuotaDemand(7, 0.5), now=now - timedelta(seconds=10))
        assert mine.admitted
        # as version 1 wrote them: two committed calls in the window, one hold
        client.zadd(f"{key}:win", {"100|0.25|r1": us - 30_000_000, "40|0.1|r2": us - 20_000_000})
        client.expire(f"{key}:win", 180)
        client.hset(f"{key}:pending", "held-1", f"{us - 10_000_000 + 1}|50|0.125")
        client.expire(f"{key}:pending", 660)

        read = store.quota_usage("acme", QUOTA, now=now)
        read_again = store.quota_usage("acme", QUOTA, now=now)
        assert client.exists(f"{key}:win", f"{key}:pending") == 2  # the read moved nothing
        counted = store.reserve("acme", QUOTA, QuotaDemand(), now=now)
        assert client.exists(f"{key}:win", f"{key}:pending") == 0
        assert read == read_again == counted.usage
        used = {u.name: u.used for u in read}
        assert used == {
            "requests_per_minute": 4,  # 2 committed + 1 old hold + mine
            "tokens_per_minute": 197,
            "tokens_per_day": 57,  # the holds: committed calls count in the day's counter
            "usd_per_month": 0.625,
        }
        store.release(counted)
        assert store.quota_usage("acme", QUOTA, now=now) == read
    finally:
        store.close()
        client.close()
        _drop_redis(prefix)
