"""No usage record is lost when the store goes away mid-run: it waits in the local spool and is
written back, exactly once, on the first write that succeeds again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from safe_openai import SafeClient, StoreError
from safe_openai.stores import Spool
from safe_openai.stores._memory import MemoryStore
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
