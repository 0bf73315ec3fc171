"""Which store closing a client closes: the one it opened from a URL, never one passed in, and
never from a copy that shares it (docs/guide.md and docs/stores.md say the same)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from safe_openai import AsyncSafeClient, SafeClient, StoreError
from safe_openai.stores import async_store_from_url, store_from_url

SECRET = "close-tests-identifier-secret"


def sqlite(tmp_path: Path, name: str = "usage.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def is_open(store: object) -> bool:
    try:
        store.usage_records()  # type: ignore[attr-defined]
    except StoreError:
        return False
    return True


def test_closing_a_client_closes_the_store_it_opened_from_a_url(tmp_path: Path) -> None:
    client = SafeClient(api_key="k", identifier_secret=SECRET, store=sqlite(tmp_path), spool=False)
    store = client.store
    with client:
        pass
    assert not is_open(store)


def test_a_store_passed_in_stays_open(tmp_path: Path) -> None:
    store = store_from_url(sqlite(tmp_path))
    with SafeClient(api_key="k", identifier_secret=SECRET, store=store, spool=False):
        pass
    assert is_open(store)
    store.close()


def test_copies_close_only_a_store_of_their_own(tmp_path: Path) -> None:
    client = SafeClient(api_key="k", identifier_secret=SECRET, store=sqlite(tmp_path), spool=False)
    client.for_customer("acme").close()
    client.with_options(max_retries=0).close()
    assert is_open(client.store)
    own = client.with_options(store=sqlite(tmp_path, "other.db"))
    own.close()
    assert not is_open(own.store) and is_open(client.store)
    client.close()
    assert not is_open(client.store)


def test_the_async_client_closes_the_store_it_opened_and_keeps_one_passed_in(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[bool, bool]:
        async def still_open(store: object) -> bool:
            try:
                await store.usage_records()  # type: ignore[attr-defined]
            except StoreError:
                return False
            return True

        opened = AsyncSafeClient(
            api_key="k", identifier_secret=SECRET, store=sqlite(tmp_path), spool=False
        )
        async with opened:
            pass
        given = async_store_from_url(sqlite(tmp_path, "given.db"))
        async with AsyncSafeClient(api_key="k", identifier_secret=SECRET, store=given, spool=False):
            pass
        result = (await still_open(opened.store), await still_open(given))
        await given.close()
        return result

    assert asyncio.run(main()) == (False, True)


@pytest.mark.parametrize("doc", ["docs/guide.md", "docs/stores.md"])
def test_the_docs_do_not_say_closing_a_client_leaves_its_store_open(doc: str) -> None:
    text = (Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8")
    flat = " ".join(text.split())
    assert "Closing a client does not close its store" not in flat
    assert "Copies (`for_customer`, `with_options`) never close the store" not in flat
