"""Every POST path of the installed SDK is classified: guarded (moderated, tagged, metered),
refused (content the guard cannot read), or known to carry no end-customer content to a model
(``safe_openai._extract.NO_MODEL_CONTENT``). A new SDK release that adds a path fails here until
someone decides which it is; until then the guard refuses it (the unguarded-path rule)."""

from __future__ import annotations

import re
from pathlib import Path

import openai

from safe_openai._extract import (
    carries_no_model_content,
    is_unguarded_content_path,
    normalize_path,
    resolve_endpoint,
)


def sdk_post_paths() -> set[str]:
    root = Path(openai.__file__).parent / "resources"
    found: set[str] = set()
    for source in root.rglob("*.py"):
        text = source.read_text()
        for match in re.finditer(r'_post\(\s*(?:f?"([^"]+)"|path_template\(\s*"([^"]+)")', text):
            raw = match.group(1) or match.group(2)
            found.add(normalize_path(re.sub(r"\{[^}]+\}", "{}", raw)))
    return found


def classify(path: str) -> str:
    concrete = path.replace("{}", "x1")
    if resolve_endpoint(concrete) is not None:
        return "guarded"
    if is_unguarded_content_path(concrete):
        return "refused"
    if carries_no_model_content(concrete):
        return "no model content"
    return "UNCLASSIFIED"  # refused by the guard unless the policy allows it


def test_sdk_has_post_paths_to_classify() -> None:
    assert len(sdk_post_paths()) > 50


def test_every_sdk_post_path_is_classified() -> None:
    unclassified = sorted(p for p in sdk_post_paths() if classify(p) == "UNCLASSIFIED")
    assert unclassified == []


def test_the_model_endpoints_are_guarded() -> None:
    for path in (
        "/chat/completions",
        "/responses",
        "/embeddings",
        "/completions",
        "/decisions",
        "/images/generations",
        "/audio/speech",
        "/conversations/{}/items",
    ):
        assert classify(path) == "guarded", path
