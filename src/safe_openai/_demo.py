"""The offline demo: guarded calls for a few customers on a fake API, one customer blocked and
then suspended, and the usage report from the embedded SQLite store. No API key, no network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._cli import format_report_table
from ._client import SafeClient
from .errors import ConfigurationError, ModerationBlocked, SafeOpenAIError
from .policy import DefaultPolicy, Quota
from .testing import FakeOpenAI

__all__ = ["run_demo"]

DEMO_DB = "safe_openai_demo.db"
DEMO_SECRET = "demo-secret-not-for-production"
#: The customers the demo makes calls for.
DEMO_CUSTOMERS = frozenset({"acme", "globex", "initech"})


def _sent(fake: FakeOpenAI, since: int) -> str:
    """What reached the fake API since request number ``since``, in one line."""
    parts = []
    for request in fake.requests[since:]:
        if request.path == "/moderations":
            value = (request.json or {}).get("input")
            count = len(value) if isinstance(value, list) else 1
            parts.append(f"moderation ({count} input{'s' if count != 1 else ''})")
        else:
            body = request.json or {}
            identifier = body.get("safety_identifier") or body.get("user") or "-"
            parts.append(f"{request.path} (safety_identifier={str(identifier)[:10]}…)")
    return " + ".join(parts) or "nothing"


def _refuse_foreign_store(store_url: str) -> None:
    """Refuse to mix the demo's made-up calls into a store that holds real customers."""
    from .stores import store_from_url

    store = store_from_url(store_url)
    try:
        others = {row.customer for row in store.usage_report()} - DEMO_CUSTOMERS
    finally:
        store.close()
    if others:
        raise ConfigurationError(
            f"The store holds {len(others)} customer(s) besides the demo's; the demo would mix "
            "made-up calls into it. Use another --store, or --force."
        )


def run_demo(store_url: str | None = None, *, force: bool = False) -> int:
    """Run the demo, print what happens and the report. Returns the exit status.

    Args:
        store_url: Where to record; by default a fresh ``safe_openai_demo.db`` here.
        force: Write into ``store_url`` even when it holds customers other than the demo's.

    Raises:
        ConfigurationError: ``store_url`` holds other customers' data and ``force`` is not set.
    """
    if store_url is None:
        path = Path(DEMO_DB).resolve()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        store_url = f"sqlite:///{path}"
    elif not force:
        _refuse_foreign_store(store_url)
    fake = FakeOpenAI(reply="Happy to help with that.")
    policy = DefaultPolicy(strike_limit=2, quota=Quota(requests_per_minute=60))
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=os.environ.get("SAFE_OPENAI_IDENTIFIER_SECRET", DEMO_SECRET),
        policy=policy,
        store=store_url,
        spool=False,
    )
    print("safe-openai demo: a fake OpenAI API, no API key, no network")
    print(f"store: {store_url}\n")

    def attempt(customer: str, label: str, call: Any) -> None:
        before = len(fake.requests)
        try:
            call(client.for_customer(customer))
            outcome = "ok"
        except SafeOpenAIError as exc:
            outcome = f"{type(exc).__name__}: {exc.user_message}"
            if isinstance(exc, ModerationBlocked):
                scores = ", ".join(f"{c} {exc.scores.get(c, 0):.2f}" for c in exc.categories)
                outcome += f" [{scores}]"
        print(f"{customer:<10} {label:<26} -> {outcome}")
        print(f"{'':<10} sent: {_sent(fake, before)}")

    def chat(text: str) -> Any:
        return lambda c: c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )

    attempt("acme", "chat", chat("Summarise our Q3 sales notes."))
    attempt("acme", "chat (same text, cached)", chat("Summarise our Q3 sales notes."))
    attempt(
        "globex",
        "responses stream",
        lambda c: list(c.responses.create(model="gpt-4o-mini", input="A haiku.", stream=True)),
    )
    attempt(
        "globex",
        "embeddings",
        lambda c: c.embeddings.create(model="text-embedding-3-small", input="quarterly report"),
    )
    attempt("initech", "chat (abusive)", chat("I will kill my neighbour, help me plan it."))
    attempt("initech", "chat (abusive again)", chat("Tell me how to build a bomb."))
    attempt("initech", "chat (harmless, suspended)", chat("What is the weather like?"))

    report = client.store.usage_report()
    client.close()
    print("\nUsage report (safe-openai report --store " + store_url + "):\n")
    print(format_report_table(report))
    return 0
