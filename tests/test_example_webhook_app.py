"""examples/webhook_app.py: signed safety events posted to the Flask app act on customers."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import pytest
from flask.testing import FlaskClient

from safe_openai.stores import UsageStore, store_from_url
from tests.test_webhooks import (
    IDENTIFIER_SECRET,
    OTHER_SECRET,
    WEBHOOK_SECRET,
    Api,
    blocked,
    case_event,
    ident,
    make_client,
    signed,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "webhook_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("webhook_app_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The environment the example reads, with a fresh SQLite store."""
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    monkeypatch.setenv("SAFE_OPENAI_STORE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("SAFE_OPENAI_IDENTIFIER_SECRET", IDENTIFIER_SECRET)
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[UsageStore]:
    """The same store as the app's, as the guarded application would write it."""
    opened = store_from_url(store_url)
    opened.remember_identifier(ident("acme"), "acme")
    yield opened
    opened.close()


@pytest.fixture
def http(store: UsageStore) -> FlaskClient:
    return load_example().create_app().test_client()


def post(http: FlaskClient, body: str, **sign: str) -> tuple[int, dict[str, str]]:
    response = http.post(
        "/webhooks/openai",
        data=body,
        headers=signed(body, **sign),  # type: ignore[arg-type]
        content_type="application/json",
    )
    return response.status_code, response.get_json()


def test_blocked_events_strike_until_the_customer_is_suspended(
    http: FlaskClient, store: UsageStore
) -> None:
    """Three blocked-identifier events (the default strike limit) suspend the customer."""
    replies = [post(http, blocked(event_id=f"evt_{n}")) for n in range(3)]

    assert replies == [(200, {"action": "strike"})] * 2 + [(200, {"action": "suspended"})]
    assert len(store.violations(customer_id="acme")) == 3
    assert store.suspension("acme", now=datetime.now(timezone.utc)) is not None


def test_replayed_event_is_acknowledged_as_duplicate_and_counted_once(
    http: FlaskClient, store: UsageStore
) -> None:
    body = blocked()
    assert post(http, body) == (200, {"action": "strike"})
    assert post(http, body, webhook_id="wh_again") == (200, {"action": "duplicate"})
    assert len(store.violations(customer_id="acme")) == 1


def test_forged_event_gets_400_and_changes_nothing(http: FlaskClient, store: UsageStore) -> None:
    status, reply = post(http, blocked(), secret=OTHER_SECRET)
    assert status == 400
    assert "does not match" in reply["error"]
    assert store.violations() == []


def test_reply_to_openai_never_names_the_customer(http: FlaskClient) -> None:
    status, reply = post(http, blocked())
    assert status == 200
    assert "acme" not in repr(reply)


def test_deactivation_case_suspends_through_an_injected_client(tmp_path: Path) -> None:
    """With a client given to create_app, the case look-up goes through that client."""
    api = Api()
    api.add_case("C-1", "acme", "deactivation")
    with make_client(api, store=f"sqlite:///{tmp_path / 'app.db'}") as client:
        client.store.remember_identifier(ident("acme"), "acme")
        http = load_example().create_app(client).test_client()

        assert post(http, case_event("deactivation", "C-1")) == (200, {"action": "suspended"})
        suspension = client.store.suspension("acme", now=datetime.now(timezone.utc))
        assert suspension is not None
        assert suspension.until is None
