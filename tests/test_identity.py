"""Customer context and hashed safety identifiers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import threading

import pytest

import safe_openai
from safe_openai import ConfigurationError
from safe_openai._identity import current_customer, resolve_secret, safety_identifier


def test_identifier_is_hmac_sha256_of_customer_under_secret() -> None:
    expected = (
        base64.urlsafe_b64encode(hmac.new(b"secret", b"acme", hashlib.sha256).digest())
        .rstrip(b"=")
        .decode()
    )
    assert safety_identifier(b"secret", "acme") == expected
    assert len(expected) <= 64
    assert "acme" not in expected


def test_identifier_is_stable_and_differs_per_secret_and_customer() -> None:
    assert safety_identifier(b"s", "a") == safety_identifier(b"s", "a")
    assert safety_identifier(b"s", "a") != safety_identifier(b"t", "a")
    assert safety_identifier(b"s", "a") != safety_identifier(b"s", "b")


def test_missing_secret_names_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFE_OPENAI_IDENTIFIER_SECRET", raising=False)
    with pytest.raises(ConfigurationError, match="SAFE_OPENAI_IDENTIFIER_SECRET"):
        resolve_secret(None)
    monkeypatch.setenv("SAFE_OPENAI_IDENTIFIER_SECRET", "from-the-environment")
    assert resolve_secret(None) == b"from-the-environment"


def test_customer_context_nests_and_resets() -> None:
    assert current_customer() is None
    with safe_openai.customer("a"):
        with safe_openai.customer("b"):
            assert current_customer() == "b"
        assert current_customer() == "a"
    assert current_customer() is None


def test_customer_context_follows_tasks_but_not_new_threads() -> None:
    seen: dict[str, str | None] = {}

    async def task() -> str | None:
        await asyncio.sleep(0)
        return current_customer()

    async def main() -> None:
        with safe_openai.customer("acme"):
            seen["task"] = await asyncio.create_task(task())

    asyncio.run(main())
    with safe_openai.customer("acme"):
        thread = threading.Thread(target=lambda: seen.__setitem__("thread", current_customer()))
        thread.start()
        thread.join()
    assert seen == {"task": "acme", "thread": None}


@pytest.mark.parametrize("bad", ["", "   ", None, 5, "x" * 257])
def test_customer_rejects_unusable_ids(bad: object) -> None:
    with pytest.raises(ValueError, match="customer id"), safe_openai.customer(bad):  # type: ignore[arg-type]
        pass
