"""docs/webhooks.md: every python block runs, and its endpoints handle signed events."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from safe_openai.stores import UsageStore, store_from_url
from tests.test_webhooks import (
    IDENTIFIER_SECRET,
    OTHER_SECRET,
    WEBHOOK_SECRET,
    blocked,
    ident,
    signed,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "webhooks.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.MULTILINE | re.DOTALL)


def run_block(marker: str) -> dict[str, Any]:
    """Execute the one python block of the doc that contains ``marker``; return its globals."""
    [block] = [block for block in BLOCKS if marker in block]
    namespace: dict[str, Any] = {"__name__": "docs_webhooks"}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_the_doc_has_a_fastapi_a_flask_and_a_policy_block() -> None:
    """Guards the extraction itself: a renamed fence would otherwise skip a snippet silently."""
    assert len(BLOCKS) == 3
    assert [any(marker in block for block in BLOCKS) for marker in ("FastAPI(", "Flask(")] == [
        True,
        True,
    ]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[UsageStore]:
    """The environment the snippets read, and the store the guarded application wrote."""
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    for name, value in {
        "SAFE_OPENAI_STORE_URL": url,
        "SAFE_OPENAI_IDENTIFIER_SECRET": IDENTIFIER_SECRET,
        "SAFE_OPENAI_SPOOL_DIR": str(tmp_path / "spool"),
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    opened = store_from_url(url)
    opened.remember_identifier(ident("acme"), "acme")
    yield opened
    opened.close()


def post_both(post: Any) -> list[tuple[int, Any]]:
    """A genuine blocked event, its replay, and a forged one."""
    body = blocked()
    forged = blocked(event_id="evt_forged")
    replies = []
    for payload, headers in (
        (body, signed(body)),
        (body, signed(body, webhook_id="wh_2")),
        (forged, signed(forged, secret=OTHER_SECRET)),
    ):
        response = post("/webhooks/openai", content=payload, headers=headers)
        replies.append((response.status_code, response.json()))
    return replies


def test_fastapi_snippet_strikes_on_a_signed_event(store: UsageStore) -> None:
    app = run_block("FastAPI(")["app"]
    with TestClient(app) as http:
        replies = post_both(http.post)

    assert replies[:2] == [(200, {"action": "strike"}), (200, {"action": "duplicate"})]
    assert replies[2][0] == 400
    assert "does not match" in replies[2][1]["detail"]
    assert [v.source for v in store.violations(customer_id="acme")] == ["safety_identifier.blocked"]


def test_flask_snippet_strikes_on_a_signed_event(store: UsageStore) -> None:
    app = run_block("Flask(")["app"]
    http = app.test_client()

    def post(path: str, *, content: str, headers: dict[str, str]) -> Any:
        response = http.post(path, data=content, headers=headers)
        return _Reply(response.status_code, response.get_json())  # the FastAPI client's shape

    replies = post_both(post)

    assert replies[:2] == [(200, {"action": "strike"}), (200, {"action": "duplicate"})]
    assert replies[2][0] == 400
    assert "does not match" in replies[2][1]["error"]
    assert len(store.violations(customer_id="acme")) == 1
    assert store.suspension("acme", now=datetime.now(timezone.utc)) is None


class _Reply:
    def __init__(self, status_code: int, body: Any) -> None:
        self.status_code = status_code
        self._body = body

    def json(self) -> Any:
        return self._body


def test_policy_snippet_strikes_on_project_alerts_only() -> None:
    policy = run_block("class MyPolicy")["MyPolicy"]()
    assert policy.action_for_safety_event("safety.alert.created") == "strike"
    assert policy.action_for_safety_event("safety.org_alert.created") == "ignore"
    assert policy.action_for_safety_event("safety.deactivation_issued") == "suspend"
