"""Stores are chosen by URL through lazily imported backends."""

from __future__ import annotations

import importlib
import subprocess
import sys
from typing import Any

import pytest

from safe_openai import ConfigurationError
from safe_openai.stores import async_store_from_url, store_from_url
from safe_openai.stores._memory import AsyncMemoryStore, MemoryStore


def test_importing_the_package_imports_no_driver() -> None:
    code = "import sys, safe_openai; print(sorted(m for m in ('redis', 'psycopg') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="sqlite://"):
        store_from_url("mongodb://localhost/x")


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def without_redis(name: str, package: str | None = None) -> Any:
        if name == "._redis":
            raise ImportError("No module named 'redis'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", without_redis)
    with pytest.raises(ConfigurationError, match=r"safe-openai\[redis\]"):
        store_from_url("redis://127.0.0.1:6379/0")


def test_password_never_appears_in_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        store_from_url("nosuch://user:hunter2@host/db")
    assert "hunter2" not in str(info.value)


def test_environment_picks_the_default_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFE_OPENAI_STORE_URL", "memory://")
    assert isinstance(store_from_url(), MemoryStore)
    assert isinstance(async_store_from_url(), AsyncMemoryStore)
