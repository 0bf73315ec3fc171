"""No usage record is lost when the store goes away mid-run: it waits in the local spool and is
written back, exactly once, on the first write that succeeds again."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from safe_openai import AsyncSafeClient, DefaultPolicy, ModerationBlocked, SafeClient, StoreError
from safe_openai.stores import Spool, Violation, store_from_url
from safe_openai.stores._memory import MemoryStore
from safe_openai.stores._sqlite import AsyncSQLiteStore, SQLiteStore
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET


class FlakyStore(MemoryStore):
    """A memory store whose writes fail while ``down`` is set."""

    down = False

    def _guard(self) -> None:
        if self.down:
            raise ConnectionError("store unreachable")

    def record_usage(self, record: Any) -> None:
        self._guard()
        super().record_usage(record)

    def commit(self, reservation: Any, record: Any) -> None:
        self._guard()
        super().commit(reservation, record)

    def remember_request(self, request_id: str, customer_id: str) -> None:
        self._guard()
        super().remember_request(request_id, customer_id)


def chat(client: SafeClient, text: str) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
    )


def test_records_spooled_during_outage_are_written_back_once(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    store = FlakyStore()
    client = SafeClient(
        **fake.openai_kwargs(), identifier_secret=SECRET, store=store, spool=Spool(tmp_path)
    ).for_customer("acme")
    chat(client, "one")
    store.down = True
    chat(client, "two")
    chat(client, "three")
    assert len(store.usage_records()) == 1
    assert len(Spool(tmp_path)) == 2
    store.down = False
    chat(client, "four")
    assert len(store.usage_records()) == 4
    assert len(Spool(tmp_path)) == 0
    [report] = store.usage_report()
    assert report.requests == 4


def test_a_new_client_writes_back_what_a_previous_process_spooled(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    store = FlakyStore()
    first = SafeClient(
        **fake.openai_kwargs(), identifier_secret=SECRET, store=store, spool=Spool(tmp_path)
    )
    store.down = True
    chat(first.for_customer("acme"), "lost?")
    first.close()
    store.down = False
    second = SafeClient(
        **fake.openai_kwargs(), identifier_secret=SECRET, store=store, spool=Spool(tmp_path)
    )
    chat(second.for_customer("globex"), "hello")
    assert sorted(r.customer_id for r in store.usage_records()) == ["acme", "globex"]


def test_without_a_spool_a_failed_write_is_logged_not_raised(fake: FakeOpenAI) -> None:
    store = FlakyStore()
    client = SafeClient(**fake.openai_kwargs(), identifier_secret=SECRET, store=store, spool=False)
    store.down = True
    chat(client.for_customer("acme"), "x")  # the caller still gets the model's answer
    assert store.usage_records() == []


def test_store_outage_on_standing_check_fails_closed(fake: FakeOpenAI) -> None:
    store = FlakyStore()
    store.suspension = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down"))  # type: ignore[method-assign]
    client = SafeClient(**fake.openai_kwargs(), identifier_secret=SECRET, store=store, spool=False)
    with pytest.raises(StoreError) as info:
        chat(client.for_customer("acme"), "x")
    assert isinstance(info.value.__cause__, ConnectionError)
    assert fake.requests == []


# --- violations are as durable as usage records ------------------------------------------------


def _block(client: SafeClient, text: str) -> None:
    with pytest.raises(ModerationBlocked):
        chat(client, text)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_violations_blocked_while_sqlite_is_write_locked_are_replayed_and_suspend(
    tmp_path: Path, fake: FakeOpenAI, flavour: str
) -> None:
    """Three blocks while another process holds the SQLite write lock: the usage records and
    the violations wait in the spool; the next write that succeeds replays them, each once,
    and the third strike suspends the customer as it would have at the time."""
    db = tmp_path / "usage.db"
    url = f"sqlite:///{db}"
    spool = Spool(tmp_path / "spool")
    policy = DefaultPolicy(strike_limit=3)
    texts = ["I will kill him", "I will kill her", "I will kill them"]
    if flavour == "sync":
        store = SQLiteStore(db, timeout=0.05)
        client = SafeClient(
            **fake.openai_kwargs(), identifier_secret=SECRET, store=store, spool=spool,
            policy=policy,
        ).for_customer("acme")  # fmt: skip
        store.usage_records()  # creates the file and its schema before the lock is taken
        with sqlite3.connect(db, isolation_level=None) as holder:
            holder.execute("BEGIN IMMEDIATE")
            for text in texts:
                _block(client, text)
            assert store.violations() == []
            holder.execute("ROLLBACK")
        assert len(spool) == 6  # three usage records, three violations
        chat(client, "hello again")  # a write that succeeds drains the spool
    else:
        store = AsyncSQLiteStore(db, timeout=0.05)

        async def run() -> None:
            aclient = AsyncSafeClient(
                **fake.async_openai_kwargs(), identifier_secret=SECRET, store=store,
                spool=spool, policy=policy,
            ).for_customer("acme")  # fmt: skip
            await store.usage_records()
            with sqlite3.connect(db, isolation_level=None) as holder:
                holder.execute("BEGIN IMMEDIATE")
                for text in texts:
                    with pytest.raises(ModerationBlocked):
                        await aclient.chat.completions.create(
                            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
                        )
                holder.execute("ROLLBACK")
            assert len(spool) == 6
            await aclient.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello again"}]
            )

        asyncio.run(run())
        store = SQLiteStore(db)

    assert len(spool) == 0
    [report] = store_from_url(url).usage_report()
    assert (report.blocked, report.violations, report.suspended) == (3, 3, True)
    assert spool.drain(store_from_url(url)) == 0  # nothing is replayed twice


def test_a_violation_replayed_twice_after_a_crash_counts_once(tmp_path: Path) -> None:
    """A drain that died after writing a violation but before dropping it from its file
    writes it again on the next drain; the store keeps it once, by its violation_id."""
    store = MemoryStore()
    violation = Violation("acme", datetime.now(timezone.utc), "moderation", violation_id="v1")
    spool = Spool(tmp_path)
    spool.append_violation(violation)
    spool.append_violation(violation)  # what a crash between write and keep amounts to
    assert spool.drain(store) == 2
    assert store.violations() == [violation]


def test_a_spooled_violation_keeps_whether_it_is_a_strike(tmp_path: Path) -> None:
    """The spool writes back the strike flag as it was; a line spooled before the flag
    existed (no "strike" key) is a strike, as every violation then was."""
    now = datetime.now(timezone.utc)
    spared = Violation("acme", now, "output", violation_id="v1", strike=False)
    spool = Spool(tmp_path)
    spool.append_violation(spared)
    old = {"customer_id": "acme", "created_at": now.isoformat(), "source": "moderation"}
    old |= {"categories": [], "top_score": None, "endpoint": None, "detail": ""}
    with open(next(tmp_path.glob("*.jsonl")), "a") as file:
        file.write(json.dumps({"violation": {**old, "violation_id": "v0"}}) + "\n")
    store = MemoryStore()
    assert spool.drain(store) == 2
    assert {v.violation_id: v.strike for v in store.violations()} == {"v1": False, "v0": True}
    assert store.count_violations("acme", since=now) == 1


def test_a_violation_without_an_id_gets_one_before_it_is_spooled(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append_violation(Violation("acme", datetime.now(timezone.utc), "moderation"))
    store = MemoryStore()
    spool.drain(store)
    [stored] = store.violations()
    assert stored.violation_id


def test_the_strike_rule_failing_during_a_drain_keeps_the_violation_for_the_next(
    tmp_path: Path,
) -> None:
    """on_violation raising StoreError stops the drain there; the next drain replays the
    violation (stored once) and applies the rule again."""
    store = MemoryStore()
    spool = Spool(tmp_path)
    spool.append_violation(
        Violation("acme", datetime.now(timezone.utc), "moderation", violation_id="v1")
    )
    seen: list[str] = []

    def rule_down(violation: Violation) -> None:
        raise StoreError("down")

    assert spool.drain(store, on_violation=rule_down) == 0
    assert len(spool) == 1
    assert spool.drain(store, on_violation=lambda v: seen.append(v.violation_id)) == 1
    assert seen == ["v1"]
    assert len(store.violations()) == 1


# --- one spool per store's data ----------------------------------------------------------------


def test_two_apps_with_store_objects_never_drain_into_each_other(
    tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """App A's store is down, so A's record waits in the default spool; app B (another store
    object of the same class) writing successfully must not drain it into B's store."""
    monkeypatch.setenv("SAFE_OPENAI_SPOOL_DIR", str(tmp_path))
    store_a, store_b = FlakyStore(), FlakyStore()
    app_a = SafeClient(**fake.openai_kwargs(), identifier_secret=SECRET, store=store_a)
    app_b = SafeClient(**fake.openai_kwargs(), identifier_secret=SECRET, store=store_b)
    assert app_a.spool is not None and app_b.spool is not None
    assert app_a.spool.directory != app_b.spool.directory

    store_a.down = True
    chat(app_a.for_customer("acme"), "one")
    chat(app_b.for_customer("beta"), "two")
    assert [r.customer_id for r in store_b.usage_records()] == ["beta"]

    store_a.down = False
    chat(app_a.for_customer("acme"), "three")
    assert sorted(r.customer_id for r in store_a.usage_records()) == ["acme", "acme"]


def _spool_dir(store: Any) -> Path:
    client = SafeClient(api_key="k", identifier_secret=SECRET, store=store)
    assert client.spool is not None
    return client.spool.directory


def test_the_spool_is_keyed_by_the_stores_data_for_objects_as_for_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same file or namespace, opened by URL or as an object, sync or async, shares one
    spool; another file, schema or key prefix gets its own; a password changes nothing."""
    monkeypatch.setenv("SAFE_OPENAI_SPOOL_DIR", str(tmp_path / "spool"))
    db = tmp_path / "a.db"
    same = {
        _spool_dir(f"sqlite:///{db}"),
        _spool_dir(SQLiteStore(db)),
        _spool_dir(SQLiteStore(tmp_path / "." / "a.db")),
    }
    assert len(same) == 1
    assert AsyncSQLiteStore(db).identity == SQLiteStore(db).identity
    assert _spool_dir(SQLiteStore(tmp_path / "b.db")) not in same
    assert _spool_dir("sqlite:///:memory:") != _spool_dir("sqlite:///:memory:")


@pytest.mark.parametrize(
    ("opener", "same", "other"),
    [
        (
            "redis",
            [("redis://:pw1@10.0.0.1:6379/2", {}), ("redis://user:pw2@10.0.0.1:6379/2", {})],
            [
                ("redis://10.0.0.1:6379/2", {"prefix": "other_app"}),
                ("redis://10.0.0.1:6379/3", {}),
                ("redis://10.0.0.2:6379/2", {}),
            ],
        ),
        (
            "postgres",
            [("postgresql://app:pw1@db:5432/app", {}), ("postgresql://ops:pw2@db/app", {})],
            [
                ("postgresql://app@db:5432/app", {"schema": "other_app"}),
                ("postgresql://app@db:5432/billing", {}),
                ("postgresql://app@db2:5432/app", {}),
            ],
        ),
    ],
)
def test_server_stores_are_keyed_by_server_database_and_namespace_without_secrets(
    opener: str, same: list[tuple[str, dict[str, Any]]], other: list[tuple[str, dict[str, Any]]]
) -> None:
    """Nothing connects: the identity comes from the URL and options."""
    from safe_openai.stores import async_store_from_url, store_identity

    def identity(url: str, options: dict[str, Any], *, is_async: bool = False) -> str:
        store = (async_store_from_url if is_async else store_from_url)(url, **options)
        return store_identity(store)

    first = identity(*same[0])
    assert {identity(u, o) for u, o in same} == {first}
    assert identity(*same[0], is_async=True) == first
    assert "pw" not in first
    assert len({first, *(identity(u, o) for u, o in other)}) == 1 + len(other)
