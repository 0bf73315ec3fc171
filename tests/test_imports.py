"""What each import loads: the public names resolve on first use, and what a guarded call does
not need (the command line, webhooks, batches, WebSockets, testing, structlog) is not imported
with the client. Pinned by the modules in ``sys.modules`` of a fresh interpreter, not by time
(benchmarks/import_time.py measures that)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_the_public_submodules_are_attributes_after_a_bare_import() -> None:
    """As when the package imported them all: ``import safe_openai`` then ``safe_openai.stores``
    (an AttributeError unless something had imported the submodule first). Only the submodule
    used loads."""
    code = (
        "import safe_openai\n"
        "assert callable(safe_openai.stores.store_from_url)\n"
        "assert issubclass(safe_openai.errors.QuotaExceeded, Exception)\n"
        "assert callable(safe_openai.telemetry.configure)\n"
        "assert safe_openai.web.__name__ == 'safe_openai.web'\n"
        "assert 'safe_openai' in dir(safe_openai.testing) or safe_openai.testing\n"
    )
    assert loaded_after(code, "safe_openai._client", "safe_openai.webhooks") == []
    for name in vars(safe_openai)["_SUBMODULES"]:
        assert getattr(safe_openai, name).__name__ == f"safe_openai.{name}"


def test_an_attribute_error_while_a_name_loads_is_an_import_error_that_says_why() -> None:
    """An SDK without an attribute the client's module uses: ``from safe_openai import
    SafeClient`` said only "cannot import name 'SafeClient'" (the module ``__getattr__``'s
    AttributeError), and ``hasattr`` answered False."""
    code = (
        "import openai\n"
        "del openai.OpenAI.copy\n"
        "import safe_openai\n"
        "try:\n"
        "    hasattr(safe_openai, 'SafeClient')\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('hasattr hid it')\n"
        "from safe_openai import SafeClient\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: safe_openai.SafeClient could not be loaded")
    assert "AttributeError: type object 'OpenAI' has no attribute 'copy'" in last


#: A user's module: every public name, star-imported and by attribute; three errors.
USER_MODULE = """\
from __future__ import annotations

import safe_openai
from safe_openai import *  # noqa: F403
from safe_openai import SafeClinet  # error: misspelt

{uses}
version: str = safe_openai.__version__
client: safe_openai.SafeClient = SafeClient(api_key="k")
number: int = client  # error: a SafeClient is not an int
safe_openai.SafeClinet  # error: misspelt
"""


def test_type_checkers_see_every_public_name_and_refuse_others(tmp_path: Path) -> None:
    """A module ``__getattr__`` seen by a type checker answers any name (``Any``): mypy --strict
    and pyright passed ``from safe_openai import SafeClinet``. Both see the public names with
    their types and flag exactly the three errors."""
    uses = "\n".join(
        f"print(safe_openai.{name}, {name})"
        for name in safe_openai.__all__
        if name != "__version__"
    )
    source = USER_MODULE.format(uses=uses)
    user = tmp_path / "user_module.py"
    user.write_text(source, encoding="utf-8")
    expected = [n for n, line in enumerate(source.splitlines(), 1) if "# error:" in line]
    pytest.importorskip("mypy", reason="mypy is not installed (the lowest-pins venv has none)")
    mypy = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), user],
        capture_output=True,
        text=True,
    )
    flagged = [int(line.split(":")[1]) for line in mypy.stdout.splitlines() if ": error:" in line]
    assert flagged == expected, mypy.stdout
    pyright = shutil.which("pyright", path=str(Path(sys.executable).parent))
    if pyright is None:
        pytest.skip("pyright is not installed")
    done = subprocess.run(
        [pyright, "--outputjson", "--pythonpath", sys.executable, str(user)],
        capture_output=True,
        text=True,
    )
    report = json.loads(done.stdout)
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    assert [d["range"]["start"]["line"] + 1 for d in errors] == expected, errors
