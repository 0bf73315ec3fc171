"""What each import loads: the public names resolve on first use, and what a guarded call does
not need (the command line, webhooks, batches, WebSockets, testing, structlog) is not imported
with the client. Pinned by the modules in ``sys.modules`` of a fresh interpreter, not by time
(benchmarks/import_time.py measures that)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import safe_openai

#: Modules a guarded call does not need, so ``from safe_openai import SafeClient`` leaves them.
NOT_WITH_THE_CLIENT = (
    "safe_openai._batches",
    "safe_openai._cli",
    "safe_openai._connections",
    "safe_openai._demo",
    "safe_openai._sockets",
    "safe_openai.testing",
    "safe_openai.web",
    "safe_openai.webhooks",
    "safe_openai.stores._memory",
    "safe_openai.stores._postgres",
    "safe_openai.stores._redis",
    "safe_openai.stores._sqlite",
    "openai.types.safety",
    "openai.resources.realtime",
    "structlog",
    "opentelemetry",
    "redis",
    "psycopg",
)


def loaded_after(code: str, *prefixes: str) -> list[str]:
    """The modules starting with one of ``prefixes`` that ``code`` leaves in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.splitlines()[-1])
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_importing_the_package_imports_neither_the_sdk_nor_the_guard() -> None:
    assert loaded_after("import safe_openai", "safe_openai", "openai", "httpx2") == ["safe_openai"]


def test_the_client_leaves_what_a_guarded_call_does_not_need() -> None:
    loaded = loaded_after(
        "from safe_openai import SafeClient, AsyncSafeClient", *NOT_WITH_THE_CLIENT
    )
    assert loaded == []


def test_a_guarded_call_leaves_them_too() -> None:
    """A client made and a call guarded (the memory store opens; nothing else does)."""
    code = """
import httpx2
from safe_openai import SafeClient
from safe_openai.stores._memory import MemoryStore
def answer(request):
    if request.url.path.endswith("/moderations"):
        return httpx2.Response(200, json={"id": "m", "model": "m", "results": [{"flagged": False,
            "categories": {}, "category_scores": {}}]})
    return httpx2.Response(200, json={"id": "c", "object": "chat.completion", "created": 0,
        "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "hi"}}]})
client = SafeClient(api_key="k", base_url="http://test/v1", identifier_secret="s" * 32,
    store=MemoryStore(), spool=False, http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))
reply = client.for_customer("acme").chat.completions.create(model="gpt-4o-mini",
    messages=[{"role": "user", "content": "hello"}])
assert reply.choices[0].message.content == "hi"
"""
    hidden = tuple(m for m in NOT_WITH_THE_CLIENT if m != "safe_openai.stores._memory")
    assert loaded_after(code, *hidden) == []


def test_the_command_line_help_imports_neither_the_sdk_nor_the_guard() -> None:
    code = (
        "import contextlib, io\nfrom safe_openai._cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])"
    )
    assert loaded_after(code, "openai", "httpx2", "safe_openai._guard", "safe_openai.stores") == []


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert safe_openai.__all__ == sorted(safe_openai.__all__)
    for name in safe_openai.__all__:
        assert getattr(safe_openai, name) is not None, name
    assert set(safe_openai.__all__) <= set(dir(safe_openai))


def test_every_lazy_name_is_public_and_lives_where_it_is_said_to() -> None:
    sources = vars(safe_openai)["_SOURCES"]
    assert set(sources) | {"__version__"} == set(safe_openai.__all__)
    for name, module in sources.items():
        assert getattr(safe_openai, name).__module__.startswith("safe_openai"), name
        assert module.startswith(".")


def test_a_name_the_package_does_not_have_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'SafeClinet'"):
        _ = safe_openai.SafeClinet  # type: ignore[attr-defined]
    assert not hasattr(safe_openai, "SafeClinet")


def test_from_import_and_the_attribute_give_the_same_object() -> None:
    from safe_openai import SafeClient, SafeOpenAIError, __version__

    assert safe_openai.SafeClient is SafeClient
    assert safe_openai.SafeOpenAIError is SafeOpenAIError
    assert isinstance(__version__, str) and __version__
