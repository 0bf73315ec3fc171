"""The wheel a user installs carries what a careful user checks: the license file, the
classifiers, the project URLs and an index readme that opens with ``pip install`` and links
absolutely."""

from __future__ import annotations

import email
import re
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [built] = out.glob("safe_openai-*.whl")
    return zipfile.ZipFile(built)


def metadata(wheel: zipfile.ZipFile) -> Message:
    [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_the_license_file_ships_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    [license_file] = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert b"MIT License" in wheel.read(license_file)
    meta = metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert meta["License-File"] == "LICENSE"


def test_classifiers_name_python_versions_typing_and_status(wheel: zipfile.ZipFile) -> None:
    classifiers = metadata(wheel).get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    minimum = re.search(r">=3\.(\d+)", metadata(wheel)["Requires-Python"])
    assert minimum is not None
    assert f"Programming Language :: Python :: 3.{minimum.group(1)}" in classifiers


def test_project_urls_point_home_docs_changelog_and_issues(wheel: zipfile.ZipFile) -> None:
    urls = dict(u.split(", ", 1) for u in metadata(wheel).get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= urls.keys()
    assert all(u.startswith("https://") for u in urls.values())


def test_the_index_readme_opens_with_pip_install_and_links_absolutely(
    wheel: zipfile.ZipFile,
) -> None:
    meta = metadata(wheel)
    assert meta["Description-Content-Type"] == "text/markdown"
    readme = str(meta.get_payload())
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.splitlines()[0] == "pip install safe-openai"
    assert ".venv/bin" not in readme  # the repository's own set-up commands stay in README.md
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links and all(link.startswith(("https://", "#")) for link in links)
    assert "**safe-openai** is a drop-in replacement" in readme


def test_py_typed_ships(wheel: zipfile.ZipFile) -> None:
    assert "safe_openai/py.typed" in wheel.namelist()


def test_no_test_tooling_is_published_as_an_extra(wheel: zipfile.ZipFile) -> None:
    """The test tooling is a dependency group (PEP 735), not an extra a user could install."""
    extras = set(metadata(wheel).get_all("Provides-Extra") or [])
    assert extras == {"redis", "postgres", "otel"}
    requires = metadata(wheel).get_all("Requires-Dist") or []
    assert not [r for r in requires if "pytest" in r or "openai-agents" in r]
