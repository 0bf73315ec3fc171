"""Every POST path of the installed SDK is classified: guarded (moderated, tagged, metered),
refused (content the guard cannot read), or known to carry no end-customer content to a model.
A new SDK release that adds a path fails here until someone decides which it is."""

from __future__ import annotations

import re
from pathlib import Path

import openai

from safe_openai._extract import is_unguarded_content_path, normalize_path, resolve_endpoint

# Paths whose bodies carry no end-customer content to a model: administration, files and
# uploads (their bytes are not read by a model until a guarded or refused call uses them),
# developer-written definitions, metadata updates, cancellations.
NO_MODEL_CONTENT_PREFIXES = (
    "/organization/",
    "/projects/",
    "/files",
    "/uploads",
    "/vector_stores",
    "/containers",
    "/skills",
    "/webhook_endpoints",
    "/vaults",
    "/batches",
    "/fine_tuning/jobs",
    "/audio/voice_consents",
    "/agents/environments",
)
NO_MODEL_CONTENT = {
    "/moderations",
    "/assistants",
    "/assistants/{}",
    "/audio/voices",
    "/content_provenance_checks",
    "/responses/input_tokens",
    "/fine_tuning/alpha/graders/validate",
    "/agents",
    "/agents/{}",
    "/evals",
    "/chat/completions/{}",
    "/conversations/{}",
    "/threads/{}",
    "/threads/{}/messages/{}",
    "/threads/{}/runs/{}",
}
ENDS_A_RUN = re.compile(r"/(cancel|pause|resume|archive)$")


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
    if (
        path in NO_MODEL_CONTENT
        or path.startswith(NO_MODEL_CONTENT_PREFIXES)
        or ENDS_A_RUN.search(path)
    ):
        return "no model content"
    return "UNCLASSIFIED"


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
