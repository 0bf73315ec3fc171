"""The python blocks of README.md and docs/*.md type-check under ``mypy --strict`` and pyright.

The blocks a file runs in one namespace (tests/test_docs.py) are checked as one module, in
order; a file whose blocks run alone (docs/webhooks.md) is checked one module per block, and
docs/integrations.md one module per section (one agent framework each: their ``Agent`` classes
share a name). Each module keeps the markdown's line numbers, so an error names the doc's own
line. One mypy run and one pyright run cover every file. Blocks marked ``<!-- not run: ... -->``
are not checked either: they are not complete programs.

A page may define ``main()`` once per example, as readers copy one example at a time:
redefining a name is allowed (mypy's ``no-redef``, pyright's ``reportRedeclaration``), nothing
else is.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs import DOCS, EXCLUDED, ROOT, Block, python_blocks

_STEM = re.compile(r"[^a-z0-9]+")
#: Files whose ``## `` sections are separate programs.
SECTIONS_APART = {"docs/integrations.md"}


def _sections(path: Path, blocks: list[Block]) -> list[list[Block]]:
    """The blocks grouped by the ``## `` heading they fall under."""
    headings = [
        number
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.startswith("## ")
    ]
    groups: dict[int, list[Block]] = {}
    for block in blocks:
        section = max((h for h in headings if h < block.line), default=0)
        groups.setdefault(section, []).append(block)
    return list(groups.values())


def _module(blocks: list[Block]) -> str:
    """The blocks as one module whose lines are the markdown's own."""
    lines: list[str] = []
    for block in blocks:
        lines.extend([""] * (block.line - len(lines)))  # the fence line becomes a blank one
        lines.extend(block.source.splitlines())
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Temp module path -> the doc it came from (``README.md``, ``docs/guide.md``)."""
    for needed in ("django", "django_stubs_ext"):  # the dev extra gained them with docs/web.md
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} is not installed: pip install -e '.[dev]'")
    where = tmp_path_factory.mktemp("doc_blocks")
    found: dict[str, str] = {}
    for path in DOCS:
        name = path.relative_to(ROOT).as_posix()
        blocks = python_blocks(path)
        stem = "doc_" + _STEM.sub("_", name.lower().removesuffix(".md")).strip("_")
        if name in EXCLUDED:
            groups = [[b] for b in blocks]
        elif name in SECTIONS_APART:
            groups = _sections(path, blocks)
        else:
            groups = [blocks] if blocks else []
        for number, group in enumerate(groups):
            module = where / (f"{stem}_{number}.py" if len(groups) > 1 else f"{stem}.py")
            module.write_text(_module(group), encoding="utf-8")
            found[str(module)] = name
    return found


_MODULE = re.compile(r"\S*?(doc_[a-z0-9_]+\.py)")


def _where(modules: dict[str, str], line: str) -> str:
    """The line with each temp module named as its doc (by file name: mypy may print a path
    it cached from an earlier run)."""
    docs = {Path(module).name: doc for module, doc in modules.items()}
    return _MODULE.sub(lambda m: docs.get(m.group(1), m.group(0)), line)


def test_every_doc_with_python_blocks_is_checked(modules: dict[str, str]) -> None:
    assert {"README.md", "docs/guide.md", "docs/web.md", "docs/webhooks.md"} <= set(
        modules.values()
    )


def test_the_blocks_pass_mypy_strict(modules: dict[str, str]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache" / "docs"),
            "--no-error-summary",
            "--disable-error-code",
            "no-redef",
            *modules,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    errors = [_where(modules, line) for line in done.stdout.splitlines() if line.strip()]
    assert errors == [], "\n".join(errors)
    assert done.returncode == 0, done.stderr


def test_the_blocks_pass_pyright(modules: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("pyright")
    if shutil.which("node") is None:
        # Without node, the pyright package would download one: no network in tests.
        pytest.skip("pyright needs node on PATH")
    config = tmp_path / "pyrightconfig.json"
    config.write_text(
        json.dumps(
            {"pythonVersion": "3.10", "typeCheckingMode": "standard", "reportRedeclaration": False}
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyright",
            "--outputjson",
            "--project",
            str(config),
            "--pythonpath",
            sys.executable,
            *modules,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    report = json.loads(done.stdout)
    errors = [
        f"{modules.get(d['file'], d['file'])}:{d['range']['start']['line'] + 1}: "
        f"{d['severity']}: {d['message']} ({d.get('rule', '')})"
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    ]
    assert errors == [], "\n".join(errors)
    assert report["summary"]["filesAnalyzed"] == len(modules)
