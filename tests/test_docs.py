"""Every ```python block of README.md and docs/*.md runs against the fake API, in order.

The blocks of one file share one namespace (a later block may use a client built earlier) and
run in a temporary working directory, with ``OPENAI_BASE_URL`` pointing at a served
:class:`~safe_openai.testing.FakeOpenAI`, so snippets written for the real API run unchanged.
A block right after a line ``<!-- not run: REASON -->`` is skipped. docs/webhooks.md has its
own test (tests/test_docs_webhooks.py).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import itertools
import re
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from safe_openai import telemetry
from safe_openai.testing import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md")],
    key=lambda p: p.relative_to(ROOT).as_posix(),
)
EXCLUDED = {"docs/webhooks.md"}
#: Packages a file's blocks import beyond the project's own (the ``compat`` extra; pydantic-ai
#: is not installed on Python 3.10).
NEEDS = {
    "docs/integrations.md": ("agents", "langchain_openai", "pydantic_ai"),
    # a dev extra added with docs/web.md: a venv installed before it skips instead of failing
    "docs/web.md": ("django",),
}
FILES = [p for p in DOCS if p.relative_to(ROOT).as_posix() not in EXCLUDED]

_FENCE = re.compile(r"^(`{3,})(\w*)")
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*\S.*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts (the fence line, 1-based) and its source."""

    path: Path
    line: int
    language: str
    source: str
    skipped: bool

    @property
    def where(self) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{name.as_posix()}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the line of each opening fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language = match.groups()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        skipped = start > 0 and bool(_NOT_RUN.match(lines[start - 1].strip()))
        found.append(Block(path, start + 1, language, "\n".join(body) + "\n", skipped))
        i += 1
    return found


def python_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.language == "python" and not b.skipped]


@pytest.fixture
def doc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """A temp working directory and the environment a deployed application would have."""
    fake = FakeOpenAI()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAFE_OPENAI_STORE_URL", raising=False)
    monkeypatch.delenv("OPENAI_ORG_ID", raising=False)
    monkeypatch.delenv("OPENAI_PROJECT_ID", raising=False)
    monkeypatch.setenv("SAFE_OPENAI_IDENTIFIER_SECRET", "docs-test-identifier-secret")
    monkeypatch.setenv("SAFE_OPENAI_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv(
        "OPENAI_WEBHOOK_SECRET", "whsec_ZG9jcy10ZXN0LXdlYmhvb2stc2VjcmV0LTMyYnl0ZXM="
    )
    structlog.reset_defaults()  # the blocks run as in an application that configured nothing
    with fake.serve() as base_url:
        monkeypatch.setenv("OPENAI_BASE_URL", base_url)
        try:
            yield fake
        finally:
            structlog.reset_defaults()  # a snippet may configure logging for the process
            if "django.urls" in sys.modules:  # docs/web.md's Django app resolves anew next run
                sys.modules["django.urls"].clear_url_caches()
            telemetry.configure()  # ... or give the library providers of its own


def run_blocks(path: Path) -> dict[str, Any]:
    """Run the python blocks of ``path`` in order in one namespace; fail naming the block.

    The namespace is a module's, importable by its name, as a one-file application's would be
    (Django's ``ROOT_URLCONF=__name__``).
    """
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    sys.modules[module.__name__] = module
    namespace: dict[str, Any] = module.__dict__
    for block in python_blocks(path):
        # Leading newlines make tracebacks point at the markdown file's own line numbers.
        source = "\n" * block.line + block.source
        try:
            exec(compile(source, str(block.path), "exec"), namespace)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            pytest.fail(
                f"{block.where}: the python block failed: {type(exc).__name__}: {exc}",
                pytrace=True,
            )
    return namespace


def _parameter_sets(function: Callable[..., Any]) -> list[dict[str, Any]]:
    """The argument sets of ``@pytest.mark.parametrize`` marks on a documented test."""
    sets: list[dict[str, Any]] = [{}]
    for mark in getattr(function, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = [v if len(names) > 1 else (v,) for v in values]
        sets = [
            {**s, **dict(zip(names, row, strict=True))} for s, row in itertools.product(sets, rows)
        ]
    return sets


def run_documented_tests(
    namespace: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture | None = None,
) -> list[str]:
    """Call every ``test_*`` function the blocks defined, as pytest would, with the fixtures
    docs/testing.md uses (``fake_openai``, ``monkeypatch``, ``tmp_path``, and the running test's
    own ``caplog``, cleared for each). Returns their names.
    """
    ran = []
    for name, function in list(namespace.items()):
        if not (name.startswith("test_") and inspect.isfunction(function)):
            continue
        where = f"{function.__code__.co_filename}:{function.__code__.co_firstlineno}"
        for number, params in enumerate(_parameter_sets(function)):
            with pytest.MonkeyPatch.context() as monkeypatch:
                fixtures = {
                    "fake_openai": FakeOpenAI(),
                    "monkeypatch": monkeypatch,
                    "tmp_path": tmp_path / f"{name}-{number}",
                }
                fixtures["tmp_path"].mkdir()
                if caplog is not None:
                    caplog.clear()
                    fixtures["caplog"] = caplog
                arguments = {}
                for parameter in inspect.signature(function).parameters:
                    if parameter in params:
                        arguments[parameter] = params[parameter]
                    elif parameter in fixtures:
                        arguments[parameter] = fixtures[parameter]
                    else:
                        pytest.fail(f"{where}: {name} needs an unknown fixture {parameter!r}")
                try:
                    result = function(**arguments)
                    if inspect.iscoroutine(result):
                        asyncio.run(result)
                except Exception as exc:
                    pytest.fail(f"{where}: the documented test {name} failed: {exc!r}")
            ran.append(name)
    return ran


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_every_python_block_runs(
    path: Path, doc_env: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file's python blocks run in order, sharing one namespace, against the fake; the
    tests they define (docs/testing.md) then run and pass.
    """
    if not python_blocks(path):
        pytest.skip("no python blocks")
    for module in NEEDS.get(path.relative_to(ROOT).as_posix(), ()):
        pytest.importorskip(module)
    namespace = run_blocks(path)
    run_documented_tests(namespace, tmp_path, caplog)


def test_the_testing_guide_defines_tests_and_they_run(
    doc_env: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the documented tests: they exist, and the parametrized one runs per parameter."""
    ran = run_documented_tests(run_blocks(ROOT / "docs" / "testing.md"), tmp_path, caplog)
    assert len(ran) >= 9
    assert "test_a_block_is_logged_for_the_customer" in ran
    assert ran.count("test_threatening_harassment_blocks_at_its_threshold") == 2


def test_the_web_guide_tests_its_apps(
    doc_env: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/web.md's tests of its FastAPI app (refusals, a stream cut mid-way, a signed
    webhook) are defined and pass."""
    pytest.importorskip("django")
    ran = run_documented_tests(run_blocks(ROOT / "docs" / "web.md"), tmp_path, caplog)
    assert {
        "test_a_refused_stream_is_an_http_error",
        "test_a_flag_mid_stream_ends_it_with_an_error_event",
        "test_a_signed_blocked_identifier_strikes_the_customer",
    } <= set(ran)


def test_the_user_docs_exist_and_have_runnable_blocks() -> None:
    """Guards the collection: a moved file or a renamed fence would skip blocks silently."""
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {
        "README.md",
        "docs/guide.md",
        "docs/stores.md",
        "docs/testing.md",
        "docs/web.md",
    } <= names
    for name in ("README.md", "docs/guide.md", "docs/stores.md", "docs/testing.md", "docs/web.md"):
        assert python_blocks(ROOT / name), name


def test_skip_markers_give_a_reason_and_are_rare() -> None:
    for path in FILES:
        found = blocks(path)
        skipped = [b for b in found if b.skipped]
        assert len(skipped) * 4 <= len(found), f"{path.name}: too many blocks are not run"
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            if line.strip().startswith("<!-- not run"):
                assert _NOT_RUN.match(line.strip()), f"{path.name}: {line!r} needs a reason"


def test_the_readme_setup_block_is_unchanged() -> None:
    """The README opens with the two set-up commands, exactly."""
    first = blocks(ROOT / "README.md")[0]
    assert first.language == "bash"
    assert first.source == (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/safe-openai demo\n"
        ".venv/bin/pip install -U 'pip>=25.1' && .venv/bin/pip install -e . --group dev"
        " && .venv/bin/pytest\n"
    )


def test_a_failing_block_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    doc = tmp_path / "probe.md"
    doc.write_text(
        "# Probe\n\n```python\nx = 1\n```\n\n<!-- not run: shows a failure -->\n"
        "```python\nraise SystemExit\n```\n\n```python\nassert x == 2\n```\n"
    )
    assert [(b.line, b.skipped) for b in blocks(doc)] == [(3, False), (8, True), (12, False)]

    with pytest.raises(pytest.fail.Exception, match=r"probe\.md:12: the python block failed"):
        run_blocks(doc)


def _log_events() -> dict[str, set[str]]:
    """Every dotted event name the package logs, with the levels it is logged at."""
    events: dict[str, set[str]] = {}
    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    for source in sorted((ROOT / "src" / "safe_openai").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in levels
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.startswith("safe_openai.")
            ):
                events.setdefault(node.args[0].value, set()).add(node.func.attr)
    return events


def test_the_guide_lists_every_log_event_the_library_emits() -> None:
    """A new or renamed event must reach the guide's table (webhook events: by name)."""
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    events = _log_events()
    assert "safe_openai.usage_recorded" in events  # the scan itself works
    missing = sorted(
        name
        for name in events
        if f"`{name}`" not in guide and f"`{name.removeprefix('safe_openai.')}`" not in guide
    )
    assert missing == []


def test_the_guide_lists_every_defaultpolicy_argument_with_its_default() -> None:
    """The DefaultPolicy table of docs/guide.md names each argument of the constructor, with
    the default the code has: a new or changed setting must reach the table."""
    from datetime import timedelta

    from safe_openai import DefaultPolicy

    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    section = guide.split("### DefaultPolicy", 1)[1].split("```", 1)[0]
    rows = re.findall(r"^\| `(\w+)`\s*\| `([^`]*)`", section, flags=re.MULTILINE)
    documented = {name: eval(default, {"timedelta": timedelta}) for name, default in rows}
    parameters = inspect.signature(DefaultPolicy.__init__).parameters
    actual = {name: p.default for name, p in parameters.items() if name != "self"}
    assert documented == actual


def test_the_guides_error_tree_names_every_error() -> None:
    """Each exception of safe_openai.errors is drawn in the guide's tree, under its base."""
    from safe_openai import errors

    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    tree = guide.split("## Errors", 1)[1].split("```", 2)[1]
    drawn = {
        line.split("── ", 1)[1].split()[0]: (len(line) - len(line.lstrip("│ ├└─")))
        for line in tree.splitlines()
        if "── " in line
    }
    assert set(drawn) == set(errors.__all__)
    for name in set(drawn) - {"SafeOpenAIError"}:
        base = getattr(errors, name).__mro__[1].__name__
        assert drawn[name] > drawn[base], f"{name} is not drawn under {base}"
