"""Where untrusted content lives in each endpoint's request body.

Extraction never raises on odd shapes: a value of an unexpected type is skipped if it cannot
carry content, and reported as unmoderatable if it might. Bodies arrive as plain JSON values
(the client puts them through the SDK's JSON encoding first), so containers are ``dict`` and
``list``. The SDK (or the API) rejects truly
malformed requests; extraction only has to make sure nothing readable slips past moderation.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ENDPOINTS", "EndpointSpec", "Extraction", "Piece", "extract", "resolve_endpoint"]


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece of untrusted content to moderate.

    Attributes:
        kind: ``"text"`` or ``"image"`` (an image URL or ``data:`` URL).
        value: The text, or the image URL.
        role: The role it came from (``"user"``, ``"tool"``, ...).
        where: Its place in the body, e.g. ``"messages[2].content[0]"`` (for logs and tests).
    """

    kind: Literal["text", "image"]
    value: str
    role: str
    where: str


@dataclass(slots=True)
class Extraction:
    """The untrusted content of one request.

    Attributes:
        pieces: Text and images to moderate.
        unmoderatable: Kinds of content found that moderation cannot read (``"audio"``,
            ``"file"``, ``"token_ids"``, ``"image_file"``).
        input_chars: Characters of every text in the request, trusted or not (for estimates).
    """

    roles: frozenset[str]
    pieces: list[Piece] = field(default_factory=list)
    unmoderatable: list[str] = field(default_factory=list)
    input_chars: int = 0

    def text(self, value: str, role: str, where: str) -> None:
        self.input_chars += len(value)
        if role in self.roles and value.strip():
            self.pieces.append(Piece("text", value, role, where))

    def image(self, url: object, role: str, where: str) -> None:
        if role not in self.roles:
            return
        if isinstance(url, str) and url:
            self.pieces.append(Piece("image", url, role, where))
        else:
            self.opaque("image_file", role)

    def opaque(self, kind: str, role: str) -> None:
        if role in self.roles and kind not in self.unmoderatable:
            self.unmoderatable.append(kind)


Extractor = Callable[[Mapping[str, Any], Extraction], None]


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """How the guard treats one endpoint.

    Attributes:
        name: A short name used in logs and usage records.
        extract: Fills an :class:`Extraction` from a request body.
        identity_field: ``"safety_identifier"`` or ``"user"``: where the hashed id goes.
        output_limit_fields: Body fields that cap output tokens (for caps and reservations).
        default_output_tokens: Output tokens to reserve when the request sets no cap.
        instructions: How a policy's system instruction is added: ``"messages"``,
            ``"instructions"`` or ``None`` (not applicable).
    """

    name: str
    extract: Extractor
    identity_field: Literal["safety_identifier", "user"] | None = None
    output_limit_fields: tuple[str, ...] = ()
    default_output_tokens: int = 0
    instructions: Literal["messages", "instructions"] | None = None


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _text_or_parts(value: object, role: str, where: str, out: Extraction) -> None:
    """A ``content`` value: a string or a list of typed parts (chat or Responses style)."""
    if isinstance(value, str):
        out.text(value, role, where)
    elif isinstance(value, list):
        for i, part in enumerate(value):
            _part(part, role, f"{where}[{i}]", out)
    elif isinstance(value, dict):
        _part(value, role, where, out)
    elif value is not None:
        out.opaque("unknown", role)


def _part(part: object, role: str, where: str, out: Extraction) -> None:
    if isinstance(part, str):
        out.text(part, role, where)
        return
    if not isinstance(part, dict):
        if part is not None:
            out.opaque("unknown", role)
        return
    kind = part.get("type")
    if kind in ("text", "input_text", "output_text"):
        text = part.get("text")
        if isinstance(text, str):
            out.text(text, role, where)
    elif kind == "refusal":
        text = part.get("refusal")
        if isinstance(text, str):
            out.text(text, role, where)
    elif kind == "image_url":
        image = part.get("image_url")
        out.image(image.get("url") if isinstance(image, dict) else image, role, where)
    elif kind in ("input_image", "computer_screenshot"):
        out.image(part.get("image_url"), role, where)
    elif kind in ("input_audio", "audio"):
        out.opaque("audio", role)
    elif kind in ("file", "input_file"):
        out.opaque("file", role)
    else:
        # An unknown part type may carry text under any key: moderate every string in it.
        _strings(part, role, where, out, skip=("type", "id", "detail", "format"))


def _strings(
    value: object, role: str, where: str, out: Extraction, skip: Sequence[str] = ()
) -> None:
    """Every string inside an unknown structure, so new part types cannot smuggle text."""
    if isinstance(value, str):
        out.text(value, role, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in skip:
                _strings(item, role, f"{where}.{key}", out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _strings(item, role, f"{where}[{i}]", out)


def _chat(body: Mapping[str, Any], out: Extraction) -> None:
    messages = _as_list(body.get("messages"))
    if messages is None:
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = str(message.get("role") or "user")
        if role == "function":
            role = "tool"
        where = f"messages[{i}]"
        _text_or_parts(message.get("content"), role, f"{where}.content", out)
        # The model reads the participant's name (a function message's is the function's)
        # and a legacy function call too.
        for key in ("refusal",) if message.get("role") == "function" else ("refusal", "name"):
            text = message.get(key)
            if isinstance(text, str):
                out.text(text, role, f"{where}.{key}")
        legacy = message.get("function_call")
        if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
            out.text(legacy["arguments"], role, f"{where}.function_call.arguments")
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for j, call in enumerate(calls):
                if not isinstance(call, dict):
                    continue
                function, custom = call.get("function"), call.get("custom")
                args = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(args, str):
                    out.text(args, role, f"{where}.tool_calls[{j}].arguments")
                given = custom.get("input") if isinstance(custom, dict) else None
                if isinstance(given, str):
                    out.text(given, role, f"{where}.tool_calls[{j}].input")
        if message.get("audio") is not None:
            out.opaque("audio", role)
    prediction = body.get("prediction")
    if isinstance(prediction, dict):
        # Predicted output is usually the customer's own document, and the model reads it.
        _text_or_parts(prediction.get("content"), "user", "prediction.content", out)


def _as_list(value: object) -> list[Any] | None:
    """A list of items, a single item (an object where a list belongs) as a list of one, else
    ``None``: an API that takes the one object must not get it unread."""
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, dict) else None


def _responses_input(value: object, out: Extraction, where: str = "input") -> None:
    if isinstance(value, str):
        out.text(value, "user", where)
        return
    items = _as_list(value)
    if items is None:
        return
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            out.text(item, "user", here)
            continue
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in (None, "message"):
            role = str(item.get("role") or "user")
            _text_or_parts(item.get("content"), role, f"{here}.content", out)
        elif kind in (
            "function_call_output",
            "custom_tool_call_output",
            "local_shell_call_output",
            "shell_call_output",
            "computer_call_output",
            "apply_patch_call_output",
            "mcp_call_output",
        ):
            _tool_output(item.get("output"), f"{here}.output", out)
        elif kind in ("function_call", "custom_tool_call"):
            for key in ("arguments", "input"):
                value = item.get(key)
                if isinstance(value, str):
                    out.text(value, "assistant", f"{here}.{key}")
        elif kind == "reasoning":
            # The model's reasoning, sent back by the client in manual context management:
            # its summary and content texts are the client's to write, so they are read (as
            # the assistant's, like function call arguments); encrypted_content is opaque.
            for key in ("summary", "content"):
                _text_or_parts(item.get(key), "assistant", f"{here}.{key}", out)
        elif kind in ("item_reference", "compaction"):
            # Server-side state: it was moderated when it was first sent.
            continue
        else:
            _strings(item, "tool", here, out, skip=("type", "id", "call_id", "status"))


def _tool_output(output: object, where: str, out: Extraction) -> None:
    if isinstance(output, (str, list)) or (
        isinstance(output, dict) and output.get("type") is not None
    ):
        _text_or_parts(output, "tool", where, out)
    elif isinstance(output, dict):
        _strings(output, "tool", where, out)


def _responses(body: Mapping[str, Any], out: Extraction) -> None:
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        out.text(instructions, "developer", "instructions")
    elif isinstance(instructions, list):
        _responses_input(instructions, out, "instructions")
    _responses_input(body.get("input"), out)
    prompt = body.get("prompt")
    if isinstance(prompt, dict) and isinstance(prompt.get("variables"), dict):
        for name, value in prompt["variables"].items():
            _text_or_parts(value, "user", f"prompt.variables.{name}", out)


def _conversation(body: Mapping[str, Any], out: Extraction) -> None:
    _responses_input(body.get("items"), out, "items")


def _prompt_like(*fields: str) -> Extractor:
    """Endpoints whose untrusted input is a string, a list of strings, or token ids."""

    def extract(body: Mapping[str, Any], out: Extraction) -> None:
        for name in fields:
            value = body.get(name)
            if isinstance(value, str):
                out.text(value, "user", name)
            elif isinstance(value, list):
                if _is_str_list(value):
                    for i, text in enumerate(value):
                        out.text(text, "user", f"{name}[{i}]")
                elif value:
                    # Token ids, or a list the API may refuse: every string in it is read.
                    _strings(value, "user", name, out)
                    out.opaque("token_ids", "user")

    return extract


def _image_edit(body: Mapping[str, Any], out: Extraction) -> None:
    _prompt_like("prompt")(body, out)
    out.opaque("image_file", "user")


def _audio_in(body: Mapping[str, Any], out: Extraction) -> None:
    _prompt_like("prompt")(body, out)
    out.opaque("audio", "user")


def _thread_messages(body: Mapping[str, Any], out: Extraction) -> None:
    for key in ("instructions", "additional_instructions"):
        text = body.get(key)
        if isinstance(text, str):  # a run's, like Responses ``instructions``
            out.text(text, "developer", key)
    if "content" in body:
        _text_or_parts(body.get("content"), str(body.get("role") or "user"), "content", out)
    for key in ("messages", "additional_messages"):
        messages = body.get(key)
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict):
                    role = str(message.get("role") or "user")
                    _text_or_parts(message.get("content"), role, f"{key}[{i}].content", out)
    thread = body.get("thread")
    if isinstance(thread, dict):
        _thread_messages(thread, out)
    outputs = body.get("tool_outputs")
    if isinstance(outputs, list):
        for i, output in enumerate(outputs):
            text = output.get("output") if isinstance(output, dict) else None
            if isinstance(text, str):
                out.text(text, "tool", f"tool_outputs[{i}]")


_CHAT_LIMITS = ("max_completion_tokens", "max_tokens")

#: Guarded endpoints, by path (placeholders match one path segment).
ENDPOINTS: dict[str, EndpointSpec] = {
    "/chat/completions": EndpointSpec(
        "chat.completions", _chat, "safety_identifier", _CHAT_LIMITS, 4096, "messages"
    ),
    "/responses": EndpointSpec(
        "responses", _responses, "safety_identifier", ("max_output_tokens",), 4096, "instructions"
    ),
    "/responses/compact": EndpointSpec("responses.compact", _responses, None, (), 4096),
    "/completions": EndpointSpec(
        "completions", _prompt_like("prompt", "suffix"), "user", ("max_tokens",), 16
    ),
    "/embeddings": EndpointSpec("embeddings", _prompt_like("input"), "user"),
    "/images/generations": EndpointSpec(
        "images.generate", _prompt_like("prompt"), "safety_identifier"
    ),
    "/images/edits": EndpointSpec("images.edit", _image_edit, "safety_identifier"),
    "/images/variations": EndpointSpec(
        "images.variations", lambda body, out: out.opaque("image_file", "user"), "user"
    ),
    "/audio/speech": EndpointSpec("audio.speech", _prompt_like("input", "instructions")),
    "/audio/transcriptions": EndpointSpec("audio.transcriptions", _audio_in),
    "/audio/translations": EndpointSpec("audio.translations", _audio_in),
    "/decisions": EndpointSpec("decisions", _responses, "safety_identifier"),
    "/conversations": EndpointSpec("conversations", _conversation),
    "/conversations/{}/items": EndpointSpec("conversations.items", _conversation),
    "/videos": EndpointSpec("videos", _prompt_like("prompt")),
    "/videos/{}/remix": EndpointSpec("videos.remix", _prompt_like("prompt")),
    "/videos/edits": EndpointSpec("videos.edits", _prompt_like("prompt")),
    "/videos/extensions": EndpointSpec("videos.extensions", _prompt_like("prompt")),
    "/videos/characters": EndpointSpec(
        "videos.characters", lambda body, out: out.opaque("file", "user")
    ),
    "/threads": EndpointSpec("threads", _thread_messages),
    "/threads/runs": EndpointSpec("threads.runs", _thread_messages),
    "/threads/{}/messages": EndpointSpec("threads.messages", _thread_messages),
    "/threads/{}/runs": EndpointSpec("threads.runs", _thread_messages),
    "/threads/{}/runs/{}/submit_tool_outputs": EndpointSpec("threads.runs", _thread_messages),
}

#: ``response.steer`` events on a Responses WebSocket: input for a response already running
#: (no identifier, no output cap: the response it steers carries both).
RESPONSES_STEER = EndpointSpec("responses.steer", _responses)

#: Endpoints that carry content to a model but are not guarded yet: refused unless the policy
#: allows them explicitly (a drop-in must never offer an unguarded path silently).
UNGUARDED_CONTENT_PATHS: tuple[str, ...] = (
    "/agents/sessions",
    "/agents/automations",
    "/chatkit/sessions",
    "/realtime/",
    "/live/",
    "/evals/",
    "/fine_tuning/alpha/graders/run",
)

#: POST paths whose bodies carry no end-customer content to a model: administration, files
#: and uploads (their bytes reach a model only through a guarded or refused call that names
#: them), developer-written definitions, metadata updates, cancellations. Every other POST
#: path is either guarded or refused unless the policy allows it (:func:`is_guarded`).
NO_MODEL_CONTENT_PREFIXES: tuple[str, ...] = (
    "/organization",
    "/projects",
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
NO_MODEL_CONTENT: frozenset[str] = frozenset(
    {
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
)
#: ``.../cancel`` and the like end or pause a run; they send nothing to a model.
_ENDS_A_RUN = re.compile(r"/(cancel|pause|resume|archive)$")


def _template(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(path).replace(r"\{\}", "[^/]+") + "$")


_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (_template(path), path) for path in ENDPOINTS if "{}" in path
]
_NO_MODEL_PATTERNS = [_template(path) for path in NO_MODEL_CONTENT if "{}" in path]


def normalize_path(url: str) -> str:
    """The API path of ``url``: relative, without query and without the ``/v1`` base."""
    if "://" in url:
        url = "/" + url.split("://", 1)[1].partition("/")[2]
    path = url.split("?", 1)[0].rstrip("/")
    if path.startswith("/v1/"):
        path = path[3:]
    return path or "/"


_SLASHES = re.compile(r"/{2,}")


def route_of(path: str, base: str = "/") -> str:
    """The API route a request reaches, spelled one way, relative to the base URL's path.

    ``path`` is the decoded path of the URL that will be sent (fragment and query already
    gone). Servers and proxies differ in what they fold together, so this folds everything any
    of them might: backslashes as slashes, repeated slashes, dot segments, a trailing slash.
    Classification (:func:`resolve_endpoint`, :func:`is_guarded`) also ignores case.
    """
    path = posixpath.normpath(_SLASHES.sub("/", "/" + path.replace("\\", "/")))
    base = posixpath.normpath(_SLASHES.sub("/", "/" + base.replace("\\", "/"))).rstrip("/")
    if base and (path.lower() == base.lower() or path.lower().startswith(base.lower() + "/")):
        path = path[len(base) :]
    return normalize_path(_SLASHES.sub("/", path or "/"))


def resolve_endpoint(path: str) -> EndpointSpec | None:
    """The spec of a guarded endpoint, or ``None`` for paths the guard does not moderate."""
    path = path.lower()
    spec = ENDPOINTS.get(path)
    if spec is not None:
        return spec
    for pattern, template in _PATTERNS:
        if pattern.match(path):
            return ENDPOINTS[template]
    return None


def is_unguarded_content_path(path: str) -> bool:
    """Whether ``path`` sends content to a model through a route the guard does not cover."""
    return path.lower().startswith(UNGUARDED_CONTENT_PATHS)


def carries_no_model_content(path: str) -> bool:
    """Whether a POST to ``path`` is known to send no end-customer content to a model."""
    path = path.lower()
    if is_unguarded_content_path(path):
        return False
    if path in NO_MODEL_CONTENT or _ENDS_A_RUN.search(path):
        return True
    if any(path == prefix or path.startswith(prefix + "/") for prefix in NO_MODEL_CONTENT_PREFIXES):
        return True
    return any(pattern.match(path) for pattern in _NO_MODEL_PATTERNS)


def is_guarded(method: str, path: str) -> bool:
    """Whether a request goes through the guard: every POST except those known to carry no
    content to a model. A guarded path without an :class:`EndpointSpec` (a content path the
    guard cannot read, or one it does not know) is refused unless the policy allows it.
    Reads, deletes and the known administrative posts pass untouched.
    """
    return method.lower() == "post" and (
        resolve_endpoint(path) is not None or not carries_no_model_content(path)
    )


def extract(spec: EndpointSpec, body: Mapping[str, Any], roles: frozenset[str]) -> Extraction:
    """The untrusted content of ``body`` for the roles the policy moderates."""
    out = Extraction(roles)
    spec.extract(body, out)
    return out


def body_from_content(content: bytes | bytearray) -> dict[str, Any] | None:
    """A JSON object body sent as raw bytes, or ``None`` when it is not one."""
    try:
        parsed = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None
