"""Batch API files: the requests of a JSONL file uploaded with purpose ``batch`` are checked,
moderated and tagged before the upload, and a finished batch's usage is recorded per customer.

A batch file belongs to the customer who uploads it. Its requests pass the same steps as HTTP
calls (standing, policy, quota admission, moderation, tagging), line by line but with one
moderation pass over the whole file: every distinct text is moderated once, in calls of
:data:`MODERATION_INPUTS_PER_CALL` that the client runs several at a time, and the verdict
cache is used and filled. The file ids and
batch ids safe_openai has checked are kept in the store's request map (``file:<id>``,
``batch:<id>``), so ``batches.create`` refuses a file that never passed the guard, and the
usage of a finished batch can be traced back to its customer.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from ._extract import (
    EndpointSpec,
    Piece,
    extract,
    is_unguarded_content_path,
    normalize_path,
)
from ._extract import resolve_endpoint as endpoint_spec
from ._guard import (
    Call,
    Flow,
    GuardState,
    ModerateMany,
    Spool,
    StoreCall,
    _refuse,
    _worst_case,
    apply_decision,
    blocking_alone,
    check_standing,
    is_strike,
    reserve,
    strike,
    tag,
)
from ._identity import current_customer
from ._log import get_logger
from ._moderation import ModerationInput, VerdictCache, checked_results, inputs_for
from .errors import (
    BatchBlocked,
    BatchFileError,
    CustomerRequired,
    ModerationUnavailable,
    PolicyDenied,
    SafeOpenAIError,
    StoreError,
    UnguardedPathError,
)
from .policy import Decision, GuardedRequest, ModerationResult
from .stores._types import QuotaDemand, Violation
from .usage import TokenUsage, UsageRecord, token_usage_from_payload

__all__ = [
    "BATCH_DISCOUNT",
    "MODERATION_INPUTS_PER_CALL",
    "check_batch",
    "check_upload",
    "record_batch",
    "remember",
    "remember_file",
]

log = get_logger()

#: Texts per moderation call when a batch file is moderated.
MODERATION_INPUTS_PER_CALL = 32
#: The Batch API bills half the price of the same synchronous call.
BATCH_DISCOUNT = 0.5
#: Request-map key prefixes of checked batch files and batches.
FILE_KEY = "file:"
BATCH_KEY = "batch:"
UPLOAD_PATH = "/files"
_DEMANDS_KEPT = 10_000

_UPLOAD = EndpointSpec("files.batch", lambda body, out: None)
_BATCH = EndpointSpec("batches", lambda body, out: None)
BATCH_PATH = "/batches"
#: Batch endpoints whose requests carry nothing to a model (passed as they are).
NO_MODEL_CONTENT = frozenset({"/moderations"})


@dataclass(frozen=True, slots=True)
class Upload:
    """A checked batch file: what to upload, whose it is, and the most it may consume."""

    content: bytes
    customer_id: str | None
    demand: QuotaDemand


@dataclass(slots=True)
class _Line:
    number: int
    request: dict[str, Any]
    path: str
    spec: EndpointSpec | None
    body: dict[str, Any]
    keys: list[bytes]
    inputs: list[ModerationInput]
    pieces: list[Piece]


def _parse(content: bytes) -> list[_Line]:
    lines: list[_Line] = []
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BatchFileError(f"Line {number} of the batch file is not JSON.") from None
        if not isinstance(request, dict):
            raise BatchFileError(f"Line {number} of the batch file is not a JSON object.")
        url, body = request.get("url"), request.get("body")
        if not isinstance(url, str) or not isinstance(body, dict):
            raise BatchFileError(
                f"Line {number} of the batch file needs a string 'url' and an object 'body'."
            )
        path = _api_path(url)
        lines.append(_Line(number, request, path, endpoint_spec(path), body, [], [], []))
    if not lines:
        raise BatchFileError("The batch file holds no requests.")
    return lines


def _api_path(url: str) -> str:
    """The API path a line's ``url`` names, read as the API would resolve it (``chat/completions``,
    ``//v1/responses`` and ``/v1/./embeddings`` are all found), so no spelling skips the check."""
    if "://" in url:
        url = urlsplit(url).path
    url = url.split("#", 1)[0].strip()
    return normalize_path(posixpath.normpath("/" + url.lstrip("/")))


def _serialize(lines: Sequence[_Line]) -> bytes:
    return b"".join(
        json.dumps({**line.request, "body": line.body}, ensure_ascii=False).encode() + b"\n"
        for line in lines
    )


def check_upload(state: GuardState, *, bound_customer: str | None, content: bytes) -> Flow[Upload]:
    """Check a batch input file before it is uploaded. Returns the file to upload instead
    (each request tagged, policy changes applied), its customer and its worst case.

    Raises:
        BatchFileError, CustomerRequired, CustomerSuspended, PolicyDenied, QuotaExceeded,
        BatchBlocked, ModerationUnavailable, UnguardedPathError: nothing is uploaded.
    """
    policy = state.policy
    lines = _parse(content)
    customer_id = bound_customer or current_customer()
    if customer_id is None and policy.require_customer:
        raise CustomerRequired(UPLOAD_PATH)
    upload = _call(_UPLOAD, UPLOAD_PATH, customer_id)
    yield from check_standing(state, upload)

    demand = QuotaDemand(tokens=0, cost_usd=0.0)
    roles = frozenset(policy.moderate_roles)
    for line in lines:
        if line.spec is None:
            if line.path in NO_MODEL_CONTENT:
                continue
            if is_unguarded_content_path(line.path):
                if policy.allow_unguarded(line.path):
                    continue
                raise UnguardedPathError(
                    f"Line {line.number} of the batch file calls {line.path}, which "
                    "safe_openai cannot moderate; allow it in the policy if that is intended."
                )
            raise BatchFileError(
                f"Line {line.number} of the batch file calls {line.request['url']!r}, an "
                "endpoint safe_openai does not know, so its request cannot be checked."
            )
        request = _request(customer_id, line)
        decision = policy.review_request(request)
        if not decision.allowed:
            yield from _refuse(state, upload, "denied")
            raise PolicyDenied(customer_id, _on_line(line, decision))
        if decision.changes_request:
            apply_decision(line.spec, line.body, decision)
            request = _request(customer_id, line)
        extraction = extract(line.spec, line.body, roles)
        if extraction.unmoderatable and not policy.allow_unmoderatable(
            request, tuple(extraction.unmoderatable)
        ):
            yield from _refuse(state, upload, "denied")
            reason = f"content that cannot be moderated: {extraction.unmoderatable}"
            raise PolicyDenied(customer_id, _on_line(line, Decision.deny(reason)))
        line.pieces = extraction.pieces
        line.inputs = inputs_for(extraction.pieces)
        line.keys = [VerdictCache.key(state.moderation_model, item) for item in line.inputs]
        one = replace(upload, spec=line.spec, model=request.model, body=line.body)
        one.input_chars = extraction.input_chars
        worst = _worst_case(state, one)
        demand = QuotaDemand(demand.tokens + worst.tokens, demand.cost_usd + worst.cost_usd)

    yield from _admit(state, upload, demand)
    found = yield from _moderate(state, upload, lines)
    if found is not None:
        yield from _judge(state, upload, lines, found)

    if customer_id is not None:
        for line in lines:
            if line.spec is not None:
                yield from tag(state, line.spec, line.body, customer_id)
    log.info("safe_openai.batch_file_checked", customer_id=customer_id, requests=len(lines))
    return Upload(_serialize(lines), customer_id, demand)


def _call(spec: EndpointSpec, endpoint: str, customer_id: str | None) -> Call:
    """The call a batch step is recorded as when it is refused."""
    return Call(
        spec=spec,
        endpoint=endpoint,
        customer_id=customer_id,
        model=None,
        body={},
        created_at=datetime.now(timezone.utc),
        started=time.perf_counter(),
    )


def _request(customer_id: str | None, line: _Line) -> GuardedRequest:
    model = line.body.get("model")
    return GuardedRequest(
        customer_id,
        line.path,
        model if isinstance(model, str) else None,
        MappingProxyType(line.body),
    )


def _on_line(line: _Line, decision: Decision) -> Decision:
    return replace(decision, reason=f"line {line.number}: {decision.reason}")


def _admit(state: GuardState, call: Call, demand: QuotaDemand) -> Flow[None]:
    """A batch is admitted when its worst case fits the customer's quota now; its usage counts
    when it is recorded, so the reservation is released at once."""
    reservation = yield from reserve(state, call, lambda: demand)
    if reservation is not None:
        yield StoreCall("release", (reservation,))


def _moderate(
    state: GuardState, upload: Call, lines: Sequence[_Line]
) -> Flow[dict[bytes, ModerationResult] | None]:
    """Every distinct input of the file, from the cache or moderated in calls of
    :data:`MODERATION_INPUTS_PER_CALL`, several at a time. ``None`` when moderation failed and
    the policy fails open."""
    found: dict[bytes, ModerationResult] = {}
    missing: dict[bytes, ModerationInput] = {}
    for line in lines:
        for key, item in zip(line.keys, line.inputs, strict=True):
            if key in found or key in missing:
                continue
            cached = state.cache.get(key) if VerdictCache.cacheable(item) else None
            if cached is not None:
                found[key] = cached
            else:
                missing[key] = item
    texts = [key for key, item in missing.items() if item.kind == "text"]
    step = MODERATION_INPUTS_PER_CALL
    calls = [texts[i : i + step] for i in range(0, len(texts), step)]
    calls += [[key] for key, item in missing.items() if item.kind == "image"]
    try:
        answers = yield ModerateMany(tuple(tuple(missing[key] for key in keys) for keys in calls))
        for keys, results in zip(calls, answers, strict=True):
            for key, result in zip(keys, checked_results(results, len(keys)), strict=True):
                found[key] = result
                if VerdictCache.cacheable(missing[key]):
                    state.cache.put(key, result)
    except SafeOpenAIError as exc:
        if not isinstance(exc, ModerationUnavailable):
            raise
        fail_open = state.policy.fail_open and exc.outage
        action = "fail_open" if fail_open else "fail_closed"
        log.warning(
            "safe_openai.moderation_unavailable",
            customer_id=upload.customer_id,
            endpoint=UPLOAD_PATH,
            action=action,
        )
        if fail_open:
            return None
        yield from _refuse(state, upload, "denied")
        raise
    return found


def _judge(
    state: GuardState, upload: Call, lines: Sequence[_Line], found: Mapping[bytes, ModerationResult]
) -> Flow[None]:
    blocked: dict[int, tuple[str, ...]] = {}
    scores: dict[str, float] = {}
    counts = False
    flagged: list[bytes] = []
    for line in lines:
        if not line.keys:
            continue
        request = _request(upload.customer_id, line)
        results = [found[key] for key in line.keys]
        verdict = state.policy.judge(request, results)
        if verdict.blocked:
            blocked[line.number] = verdict.categories
            alone = blocking_alone(state.policy, request, line.keys, results)
            flagged += alone
            items = [item for key, item in zip(line.keys, line.inputs, strict=True) if key in alone]
            counts = counts or is_strike(state.policy, request, items, line.pieces)
            for category, score in verdict.scores.items():
                scores[category] = max(score, scores.get(category, 0.0))
    if not blocked:
        return
    yield from _refuse(state, upload, "blocked")
    error = BatchBlocked(upload.customer_id, lines=blocked, scores=scores, endpoint=UPLOAD_PATH)
    log.warning(
        "safe_openai.request_blocked",
        customer_id=upload.customer_id,
        endpoint=UPLOAD_PATH,
        categories=list(error.categories),
        top_score=round(max(scores.values(), default=0.0), 4),
        lines=list(error.lines)[:10],
    )
    if upload.customer_id is not None:
        violation = Violation(
            customer_id=upload.customer_id,
            created_at=upload.created_at,
            source="moderation",
            categories=error.categories,
            top_score=max(scores.values(), default=0.0),
            endpoint=UPLOAD_PATH,
            strike=counts,
        )
        yield from strike(state, violation, flagged)
    raise error


def remember(key: str, customer_id: str | None) -> Flow[None]:
    """Keep whose a checked batch file or batch is (``file:<id>`` / ``batch:<id>``; an
    anonymous one as ``""``)."""
    try:
        yield StoreCall("remember_request", (key, customer_id or ""))
    except StoreError:
        log.warning("safe_openai.store_unavailable", check="request_map")


def remember_file(state: GuardState, file_id: str, upload: Upload) -> Flow[None]:
    """Keep a checked file's customer (in the store) and worst case (here, for the quota check
    of ``batches.create``)."""
    state.batch_demands[file_id] = upload.demand
    while len(state.batch_demands) > _DEMANDS_KEPT:
        state.batch_demands.pop(next(iter(state.batch_demands)))
    yield from remember(FILE_KEY + file_id, upload.customer_id)


def check_batch(state: GuardState, body: Mapping[str, Any]) -> Flow[str | None]:
    """Before ``batches.create``: the input file must be one safe_openai checked, its customer
    in good standing, and its worst case must fit the customer's quota now (the reservation is
    released at once: the batch's usage counts when it is recorded). Returns the customer.

    Raises:
        UnguardedPathError: the file never passed the guard (and the policy does not allow
            ``"/batches"`` unguarded).
        CustomerSuspended: the file's customer is suspended now.
        QuotaExceeded: the customer's quota has no room for the file's worst case.
    """
    file_id = body.get("input_file_id")
    customer_id = None
    if isinstance(file_id, str):
        customer_id = yield StoreCall("customer_for_request", (FILE_KEY + file_id,))
    if customer_id is None:
        if state.policy.allow_unguarded("/batches"):
            log.warning("safe_openai.unguarded_batch_allowed", input_file_id=file_id)
            return None
        raise UnguardedPathError(
            f"The batch input file {file_id!r} was not uploaded through safe_openai, so its "
            "requests were never moderated; upload it with files.create(purpose='batch') on a "
            "SafeClient, or allow '/batches' in the policy."
        )
    if customer_id == "":
        return None  # checked, anonymously
    call = _call(_BATCH, BATCH_PATH, str(customer_id))
    yield from check_standing(state, call)
    # Another process may have checked the file: its worst case is then unknown here, and the
    # check is that the customer is not over quota already.
    yield from _admit(
        state, call, state.batch_demands.get(str(file_id), QuotaDemand(tokens=0, cost_usd=0.0))
    )
    return str(customer_id)


def batch_records(
    state: GuardState,
    *,
    batch_id: str,
    endpoint: str,
    customer_id: str,
    output: bytes,
    errors: bytes,
    created_at: datetime,
) -> list[UsageRecord]:
    """The usage records of a finished batch: one per request line of its output and error
    files, with ids derived from the batch and line, so recording twice stores them once."""
    records: list[UsageRecord] = []
    for raw in (*output.splitlines(), *errors.splitlines()):
        try:
            line = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(line, dict):
            continue
        response = _object(line.get("response"))
        body = _object(response.get("body"))
        ok = response.get("status_code") == 200 and not line.get("error")
        tokens = (token_usage_from_payload(body) if ok else None) or TokenUsage()
        model = _text(body.get("model"))
        cost = state.prices.cost(model, tokens) if tokens.total_tokens else 0.0
        digest = hashlib.sha256(f"{batch_id}\0{line.get('custom_id')}".encode()).hexdigest()
        records.append(
            UsageRecord(
                customer_id=customer_id,
                endpoint=f"batch:{_api_path(endpoint)}",
                model=model,
                outcome="ok" if ok else "error",
                tokens=tokens,
                cost_usd=None if cost is None else cost * BATCH_DISCOUNT,
                latency_s=0.0,
                created_at=created_at,
                request_id=_text(response.get("request_id")),
                record_id=digest[:32],
            )
        )
    return records


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def record_batch(state: GuardState, records: Sequence[UsageRecord]) -> Flow[None]:
    """Store a finished batch's records (those the store refuses are spooled) and map their
    request ids to the customer, for safety webhooks."""
    for record in records:
        try:
            yield StoreCall("record_usage", (record,))
        except StoreError:
            yield Spool(record, None)
            state.spool_dirty = state.spool is not None
        if record.request_id:
            yield from remember(record.request_id, record.customer_id)
