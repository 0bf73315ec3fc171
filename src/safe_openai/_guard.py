"""The guarded-call flow, written once for the sync and async clients.

:func:`begin` and :func:`finish` are generators: they decide everything and *yield* the I/O they
need done (a store call, a moderation call) as small command objects. The clients run them with
:func:`drive` / :func:`adrive`, sending back each result or throwing back each exception, the way
httpx's auth flows and tenacity's ``iter()`` work. No I/O happens here, so tests need no network.

The order of a guarded call: customer -> standing -> policy review -> quota reservation ->
moderation -> tagging -> (the SDK call) -> usage.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, TypeVar

from ._extract import (
    EndpointSpec,
    Piece,
    carries_no_model_content,
    extract,
    is_unguarded_content_path,
    resolve_endpoint,
)
from ._identity import current_customer, safety_identifier
from ._log import get_logger
from ._moderation import ModerationInput, VerdictCache, checked_results, inputs_for, roles_of
from ._output import OutputMode
from .alerts import Alert
from .errors import (
    ConfigurationError,
    CustomerRequired,
    CustomerSuspended,
    ModerationBlocked,
    ModerationUnavailable,
    OutputBlocked,
    PolicyDenied,
    QuotaExceeded,
    SafeOpenAIError,
    StoreError,
    UnguardedPathError,
    UnpricedModel,
)
from .policy import (
    OUTPUT_MODES,
    Decision,
    GuardedRequest,
    ModerationResult,
    Policy,
    Quota,
    check_output_settings,
    soft_thresholds,
)
from .stores._types import EVENT_LEASE, QuotaDemand, Reservation, Violation
from .usage import (
    Outcome,
    PriceTable,
    TokenUsage,
    UsageRecord,
    estimate_tokens,
)

__all__ = [
    "Call",
    "DrainSpool",
    "GuardState",
    "Moderate",
    "ModerateMany",
    "SpoolViolation",
    "StoreCall",
    "Together",
    "adrive",
    "alert",
    "begin",
    "check_standing",
    "drive",
    "enforce_strikes",
    "finish",
    "moderate_output",
    "on_store",
    "openai_event_alert",
    "quota_alert",
    "quota_exceeded",
    "reserve",
    "soft_limit_alerts",
    "strike_alert",
    "suspend",
    "suspension_alert",
    "tag",
    "unsent",
    "unsuspend",
]

log = get_logger()

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoreCall:
    """Command: call ``store.<method>(*args, **kwargs)`` and send back the result.

    ``undo`` names the store method that takes back what the call made (``release`` for a
    reservation): a driver interrupted while the call runs (asyncio cancellation) lets the call
    finish and undoes it instead of sending its result back, so nothing is left behind.

    ``settles`` marks a write that closes a decided call (a release, a usage record, a
    violation): :func:`adrive` runs it to its end even when the caller is cancelled meanwhile,
    and delivers the cancellation afterwards (see :func:`adrive`).
    """

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    undo: str | None = None
    settles: bool = False


@dataclass(frozen=True, slots=True)
class Moderate:
    """Command: moderate these inputs and send back one result per input."""

    inputs: tuple[ModerationInput, ...]


@dataclass(frozen=True, slots=True)
class Spool:
    """Command: keep this record locally; the store could not take it."""

    record: UsageRecord
    reservation_id: str | None


@dataclass(frozen=True, slots=True)
class SpoolViolation:
    """Command: keep this violation locally; the store could not take it (or its strike rule)."""

    violation: Violation


@dataclass(frozen=True, slots=True)
class DrainSpool:
    """Command: the store took a write again; write back what the spool kept.

    Answered with whether records are still waiting afterwards.
    """


@dataclass(frozen=True, slots=True)
class ModerateMany:
    """Command: moderate each group of inputs in its own call, up to
    :data:`MODERATION_CONCURRENCY` calls at a time; send back one result list per group."""

    groups: tuple[tuple[ModerationInput, ...], ...]


@dataclass(frozen=True, slots=True)
class Together:
    """Command: run a store call and a moderation call at once (they do not depend on each
    other); send back ``((ok, value), (ok, value))``, each value a result or the exception it
    raised. Only yielded to clients that set :attr:`GuardState.concurrent`."""

    store: StoreCall
    moderate: Moderate


#: Moderation calls a client runs at once for one :class:`ModerateMany` (a batch file).
MODERATION_CONCURRENCY = 4

Command = StoreCall | Moderate | ModerateMany | Spool | SpoolViolation | DrainSpool | Together
Flow = Generator[Command, Any, T]


@dataclass(slots=True)
class GuardState:
    """What a client and all its copies share: policy, store, secret, moderator, caches.

    Attributes:
        policy: The policy in force.
        store: The usage store (sync for SafeClient, async for AsyncSafeClient).
        secret: The HMAC key of safety identifiers.
        moderator: The moderator.
        moderation_model: Part of the verdict cache key, so a model change re-moderates.
        prices: The price table for usage costs.
        cache: Moderation results by content hash.
        spool: Where records go when the store cannot take them (``None``: log and drop).
    """

    policy: Policy
    store: Any
    #: Kept out of ``repr()``: error reporters that capture locals must not pick it up.
    secret: bytes = field(repr=False)
    moderator: Any
    moderation_model: str
    prices: PriceTable
    cache: VerdictCache = field(default_factory=VerdictCache)
    spool: Any = None
    known_identifiers: KnownIdentifiers = field(default_factory=lambda: KnownIdentifiers())
    #: The spool holds records to write back once the store answers again.
    spool_dirty: bool = False
    #: The store was opened from a URL by the client, which closes it.
    owns_store: bool = False
    #: Recent blocks, so a retried block is not a second strike.
    recent_blocks: RecentBlocks = field(default_factory=lambda: RecentBlocks())
    #: The worst case of each batch file this process checked, by file id.
    batch_demands: dict[str, QuotaDemand] = field(default_factory=dict)
    #: The client can run a store call and a moderation call at once (:class:`Together`).
    concurrent: bool = False
    #: Alert ids this process found claimed or fired, so a repeat costs no store round trip.
    alerts_seen: RecentIds = field(default_factory=lambda: RecentIds())

    @property
    def one_trip(self) -> bool:
        """Whether the store takes a call's standing and reservation in one round trip
        (``begin_call``) and its usage and request map in one (``finish_call``)."""
        kind = type(self.store)
        found = _ONE_TRIP.get(kind)
        if found is None:
            found = _ONE_TRIP[kind] = _has_one_trip(kind)
        return found


#: The methods begin_call and finish_call stand for.
_ONE_TRIP_REPLACES = (
    "suspension",
    "reserve",
    "commit",
    "record_usage",
    "remember_identifier",
    "remember_request",
)
_ONE_TRIP: dict[type, bool] = {}


def _has_one_trip(kind: type) -> bool:
    """Whether ``kind`` has begin_call and finish_call that stand for its own methods: a
    subclass that overrides one of the methods they replace (and not them) keeps the separate
    calls, so its override still runs."""
    mro = kind.__mro__

    def depth(name: str) -> int:
        for i, klass in enumerate(mro):
            if name in vars(klass):
                return i
        return len(mro)

    newest = max(depth("begin_call"), depth("finish_call"))
    if newest == len(mro):
        return False
    return all(depth(name) >= newest for name in _ONE_TRIP_REPLACES)


class KnownIdentifiers:
    """The (identifier, customer) pairs already in the store's map, bounded like the verdict
    cache (least recently used first out), thread-safe. A pair that falls out is written again
    the next time it is used, which is harmless."""

    def __init__(self, maxsize: int = 50_000) -> None:
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def __contains__(self, pair: object) -> bool:
        with self._lock:
            if pair not in self._seen:
                return False
            self._seen.move_to_end(pair)  # type: ignore[arg-type]
            return True

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, pair: tuple[str, str]) -> None:
        """Note that ``pair`` is in the store's map."""
        with self._lock:
            self._seen[pair] = None
            self._seen.move_to_end(pair)
            while len(self._seen) > self._maxsize:
                self._seen.popitem(last=False)


class RecentIds:
    """Recently seen ids, bounded (least recently added first out), thread-safe; an id noted
    ``until`` a time is forgotten then."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self._seen: OrderedDict[str, datetime | None] = OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            if not isinstance(key, str) or key not in self._seen:
                return False
            until = self._seen[key]
            if until is not None and until <= _now():
                del self._seen[key]
                return False
            return True

    def add(self, key: str, until: datetime | None = None) -> None:
        """Note ``key`` (till ``until``: ``None`` for good)."""
        with self._lock:
            self._seen[key] = until
            self._seen.move_to_end(key)
            while len(self._seen) > self._maxsize:
                self._seen.popitem(last=False)


class RecentBlocks:
    """When each (customer, content) was last blocked, bounded, thread-safe."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self._seen: OrderedDict[tuple[str, bytes], datetime] = OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def repeat(
        self, customer_id: str, keys: Iterable[bytes], now: datetime, window: timedelta
    ) -> bool:
        """Whether a block of ``keys`` repeats one struck within ``window`` before ``now``."""
        with self._lock:
            last = self._seen.get(self._fingerprint(customer_id, keys))
        return last is not None and now - last < window

    def struck(self, customer_id: str, keys: Iterable[bytes], now: datetime) -> None:
        """Note that a block of ``keys`` was struck at ``now`` (the window runs from here)."""
        fingerprint = self._fingerprint(customer_id, keys)
        with self._lock:
            self._seen.pop(fingerprint, None)
            self._seen[fingerprint] = now
            while len(self._seen) > self._maxsize:
                self._seen.popitem(last=False)

    @staticmethod
    def _fingerprint(customer_id: str, keys: Iterable[bytes]) -> tuple[str, bytes]:
        return customer_id, hashlib.sha256(b"".join(sorted(keys))).digest()


@dataclass(slots=True)
class Call:
    """One guarded logical call in flight (one per ``request()``, whatever the SDK retries)."""

    spec: EndpointSpec
    endpoint: str
    customer_id: str | None
    model: str | None
    body: dict[str, Any]
    created_at: datetime
    started: float
    input_chars: int = 0
    reservation: Reservation | None = None
    hide_usage_chunk: bool = False
    finished: bool = False
    #: What the policy does with this call's output (``None``: not moderated).
    output_mode: OutputMode | None = None
    #: A violation was already recorded for this call's output (one per call).
    output_flagged: bool = False
    #: The call's OpenTelemetry watch (:mod:`safe_openai.telemetry`), when telemetry is on.
    telemetry: Any = None

    @property
    def customer_key(self) -> str:
        """The customer id as stored (``""`` for anonymous calls)."""
        return self.customer_id or ""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def begin(
    state: GuardState,
    *,
    bound_customer: str | None,
    path: str,
    body: dict[str, Any],
    spec: EndpointSpec | None = None,
) -> Flow[Call | None]:
    """Decide a request before it is sent. Returns the :class:`Call`, or ``None`` to pass it.

    ``body`` (``extra_body`` already folded in) is adjusted in place: policy changes, the
    safety identifier, the usage option of chat streams. ``spec`` names the endpoint's rules
    when ``path`` is not an HTTP path (WebSocket events); otherwise they follow from ``path``.

    Raises:
        CustomerRequired, CustomerSuspended, PolicyDenied, QuotaExceeded, ModerationBlocked,
        ModerationUnavailable, StoreError, UnguardedPathError: nothing may be sent.
    """
    spec = spec or resolve_endpoint(path)
    policy = state.policy
    if spec is None:
        # A content path the guard cannot read, or a POST path it does not know at all.
        if carries_no_model_content(path) or policy.allow_unguarded(path):
            return None
        if is_unguarded_content_path(path):
            raise UnguardedPathError(
                f"{path} sends content to a model on a path safe_openai cannot moderate yet; "
                "allow it in the policy (Policy.allow_unguarded) if that is intended."
            )
        raise UnguardedPathError(
            f"{path} is not a path safe_openai knows, so it cannot tell whether it reaches a "
            "model; allow it in the policy (Policy.allow_unguarded) if that is intended."
        )
    customer_id = bound_customer or current_customer()
    if customer_id is None and policy.require_customer:
        raise CustomerRequired(path)
    model = body.get("model")
    call = Call(
        spec=spec,
        endpoint=path,
        customer_id=customer_id,
        model=model if isinstance(model, str) else None,
        body=body,
        created_at=_now(),
        started=time.perf_counter(),
    )

    one_trip = state.one_trip and customer_id is not None
    if not one_trip:
        yield from check_standing(state, call)

    request = GuardedRequest(customer_id, path, call.model, MappingProxyType(body))
    decision = policy.review_request(request)
    if not decision.allowed:
        if one_trip:
            yield from check_standing(state, call)  # a suspended customer hears that first
        yield from _refuse(state, call, "denied")
        log.info("safe_openai.request_denied", customer_id=customer_id, endpoint=path)
        raise PolicyDenied(customer_id, decision)
    if decision.changes_request:
        apply_decision(spec, body, decision)
        model = body.get("model")
        call.model = model if isinstance(model, str) else None
        request = GuardedRequest(customer_id, path, call.model, MappingProxyType(body))

    extraction = extract(spec, body, frozenset(policy.moderate_roles))
    call.input_chars = extraction.input_chars
    if extraction.unmoderatable:
        if not policy.allow_unmoderatable(request, tuple(extraction.unmoderatable)):
            if one_trip:
                yield from check_standing(state, call)
            yield from _refuse(state, call, "denied")
            raise PolicyDenied(
                customer_id,
                Decision.deny(f"content that cannot be moderated: {extraction.unmoderatable}"),
            )
        log.info(
            "safe_openai.unmoderated_content",
            customer_id=customer_id,
            endpoint=path,
            kinds=extraction.unmoderatable,
        )

    call.output_mode = output_mode_of(policy, spec, request)

    lookup = _lookup(state, extraction.pieces)
    prefetched = None
    if one_trip:
        prefetched = yield from start(state, call, lookup)
    else:
        call.reservation = yield from reserve(
            state, call, lambda: _worst_case(state, call), refit=True
        )
    try:
        yield from _moderate(state, call, request, extraction.pieces, lookup, prefetched)
        if customer_id is not None:
            yield from tag(state, spec, body, customer_id)
        if spec.name == "chat.completions" and body.get("stream") is True:
            _ask_for_stream_usage(call, body)
    except BaseException:
        # Every exit before the call is sent gives back what it reserved: a refusal, a store
        # error, a cancelled task, a KeyboardInterrupt or a gevent timeout alike.
        yield from _release(call)
        raise

    if customer_id is not None and spec.identity_field is not None:
        log.debug("safe_openai.request_tagged", customer_id=customer_id, field=spec.identity_field)
    log.debug(
        "safe_openai.request_allowed",
        customer_id=customer_id,
        endpoint=path,
        model=call.model,
    )
    return call


def _ask_for_stream_usage(call: Call, body: dict[str, Any]) -> None:
    """Ask a chat stream for its usage chunk, hidden from a caller that did not ask for it.
    ``stream_options`` that is not an object is left as it is, for the API to refuse."""
    options = body.get("stream_options")
    if options is None or (
        isinstance(options, Mapping) and options.get("include_usage") is not True
    ):
        body["stream_options"] = {**(options or {}), "include_usage": True}
        call.hide_usage_chunk = True


#: Endpoints whose answers output moderation reads.
OUTPUT_ENDPOINTS = frozenset({"chat.completions", "responses", "completions"})


def output_mode_of(
    policy: Policy, spec: EndpointSpec, request: GuardedRequest
) -> OutputMode | None:
    """The policy's output moderation for a request (``None`` on endpoints without text output).

    Raises:
        ConfigurationError: The policy answered something else than ``None``, ``"record"`` or
            ``"block"`` (nothing is sent).
    """
    if spec.name not in OUTPUT_ENDPOINTS:
        return None
    mode = policy.output_moderation_for(request)
    if mode not in OUTPUT_MODES:
        raise ConfigurationError(
            f'Policy.output_moderation_for must return None, "record" or "block", got {mode!r}'
        )
    if mode is not None:
        check_output_settings(mode, policy.output_window_chars, policy.output_window_sentences)
    return mode


def moderate_output(
    state: GuardState, call: Call, texts: Sequence[str], *, request_id: str | None = None
) -> Flow[None]:
    """Moderate text the model returned for ``call`` (a whole answer, or a stream's window).

    Flagged output is recorded as a violation with ``source="output"`` (once per call; a strike
    unless :attr:`Policy.output_strikes` is false, then a violation that is not one). Under
    ``"block"`` it raises; under ``"record"`` the caller gets the output all the same. An
    outage follows ``fail_open``: ``"block"`` failing closed withholds the output, anything
    else lets it through, logged.

    Raises:
        OutputBlocked: ``"block"`` and the policy judged the text blocked.
        ModerationUnavailable: ``"block"``, failing closed, and moderation could not be had.
    """
    mode = call.output_mode
    if mode is None:
        return
    inputs = inputs_for(Piece("text", text, "assistant", "output") for text in texts)
    if not inputs:
        return
    policy = state.policy
    keys = [VerdictCache.key(state.moderation_model, item) for item in inputs]
    results: list[ModerationResult | None] = [state.cache.get(key) for key in keys]
    missing = [i for i, result in enumerate(results) if result is None]
    if missing:
        try:
            fresh = checked_results(
                (yield Moderate(tuple(inputs[i] for i in missing))), len(missing)
            )
        except ModerationUnavailable as exc:
            # as for input: a malformed answer is no outage, so it withholds even failing open
            if mode == "block" and not (policy.fail_open and exc.outage):
                log.error(
                    "safe_openai.output_moderation_unavailable",
                    customer_id=call.customer_id,
                    endpoint=call.endpoint,
                    action="withheld",
                )
                raise
            log.warning(
                "safe_openai.output_moderation_unavailable",
                customer_id=call.customer_id,
                endpoint=call.endpoint,
                action="delivered",
            )
            return
        for i, result in zip(missing, fresh, strict=True):
            results[i] = result
            state.cache.put(keys[i], result)
    judged = [result for result in results if result is not None]
    request = GuardedRequest(
        call.customer_id, call.endpoint, call.model, MappingProxyType(call.body)
    )
    verdict = policy.judge_output(request, judged)
    if not verdict.blocked:
        return
    log.warning(
        "safe_openai.output_flagged",
        customer_id=call.customer_id,
        endpoint=call.endpoint,
        categories=list(verdict.categories),
        top_score=round(verdict.top_score, 4),
        action="withheld" if mode == "block" else "delivered",
    )
    if call.customer_id is not None and not call.output_flagged:
        call.output_flagged = True
        struck = bool(policy.output_strikes)
        if not struck:
            log.info("safe_openai.output_flagged_without_strike", customer_id=call.customer_id)
        violation = Violation(
            customer_id=call.customer_id,
            created_at=_now(),
            source="output",
            categories=verdict.categories,
            top_score=verdict.top_score,
            endpoint=call.endpoint,
            detail=request_id or "",
            strike=struck,
        )
        alone = [
            key
            for key, result in zip(keys, judged, strict=True)
            if policy.judge_output(request, [result]).blocked
        ]
        yield from strike(state, violation, alone or keys)
    if mode == "block":
        raise OutputBlocked(
            call.customer_id,
            categories=verdict.categories,
            scores=verdict.scores,
            endpoint=call.endpoint,
            request_id=request_id,
        )


def check_standing(state: GuardState, call: Call) -> Flow[None]:
    """Refuse a suspended customer's call (recorded as ``denied``); an unreachable store is
    the policy's to decide (``fail_open``)."""
    customer_id = call.customer_id
    if customer_id is None:
        return
    try:
        suspension = yield StoreCall("suspension", (customer_id,), {"now": call.created_at})
    except StoreError:
        if not state.policy.fail_open:
            raise
        log.warning("safe_openai.store_unavailable", customer_id=customer_id, check="standing")
        return
    if suspension is not None:
        yield from _refuse(state, call, "denied")
        log.info("safe_openai.request_refused", customer_id=customer_id, reason="suspended")
        raise CustomerSuspended(customer_id, until=suspension.until, reason=suspension.reason)


def start(state: GuardState, call: Call, lookup: _Lookup) -> Flow[tuple[bool, Any] | None]:
    """The store's side of a call before it is sent, in one round trip (``begin_call``):
    standing, the quota reservation and the identifier map. For a client that runs two calls at
    once, the moderation of the inputs not in the verdict cache overlaps it, and its outcome is
    returned as ``(ok, value)`` for :func:`_moderate`; a refusal by standing or quota discards
    it. An unreachable store is the policy's to decide (``fail_open``).

    Raises:
        CustomerSuspended, QuotaExceeded, UnpricedModel: recorded as ``denied``; nothing may be
            sent.
    """
    customer_id = call.customer_key
    quota = state.policy.quota_for(customer_id)
    if quota is not None and quota.is_unlimited:
        quota = None
    identifier: str | None = identifier_of(state, call.spec, call.body, customer_id)
    if (identifier, customer_id) in state.known_identifiers:
        identifier = None
    try:
        demand = _worst_case(state, call)
    except UnpricedModel:
        yield from check_standing(state, call)  # a suspended customer hears that first
        yield from _refuse(state, call, "denied")
        log.info("safe_openai.request_refused", customer_id=customer_id, reason="unpriced")
        raise
    command = StoreCall(
        "begin_call",
        (customer_id, quota, demand),
        {"identifier": identifier},
        undo="release",
    )
    inputs, _, _, missing = lookup
    prefetched: tuple[bool, Any] | None = None
    try:
        if state.concurrent and missing:
            (ok, begun), prefetched = yield Together(
                command, Moderate(tuple(inputs[i] for i in missing))
            )
            if not ok:
                raise begun
        else:
            begun = yield command
    except StoreError:
        if not state.policy.fail_open:
            raise
        log.warning("safe_openai.store_unavailable", customer_id=customer_id, check="standing")
        return prefetched
    if identifier is not None and begun.identifier_saved:
        state.known_identifiers.add((identifier, customer_id))
    if begun.suspension is not None:
        yield from _refuse(state, call, "denied")
        log.info("safe_openai.request_refused", customer_id=customer_id, reason="suspended")
        raise CustomerSuspended(
            customer_id, until=begun.suspension.until, reason=begun.suspension.reason
        )
    reservation = begun.reservation
    if reservation is not None and not reservation.admitted:
        reservation = yield from _refit_or_fail_open(state, call, reservation)
    if reservation is not None and not reservation.admitted:
        yield from _refuse(state, call, "denied")
        log.info("safe_openai.quota_exceeded", customer_id=customer_id, limit=reservation.limit)
        yield from alert(state, quota_alert(call, quota, reservation))
        raise quota_exceeded(customer_id, reservation)
    call.reservation = reservation
    return prefetched


def identifier_of(
    state: GuardState, spec: EndpointSpec, body: Mapping[str, Any], customer_id: str
) -> str:
    """The safety identifier a call carries: the caller's own when set, else the customer's."""
    given = body.get(spec.identity_field) if spec.identity_field is not None else None
    if isinstance(given, str) and given:
        return given
    return safety_identifier(state.secret, customer_id)


def reserve(
    state: GuardState, call: Call, demand: Callable[[], QuotaDemand], *, refit: bool = False
) -> Flow[Reservation | None]:
    """Reserve ``demand()`` against the customer's quota; ``None`` when there is no quota (or
    the store is unreachable and the policy fails open). A refusal is recorded as ``denied``.
    ``refit``: a refused call without an output cap is tried again on what remains (:func:`_refit`).

    Raises:
        QuotaExceeded: the quota has no room for the demand.
    """
    customer_id = call.customer_id
    quota = state.policy.quota_for(customer_id) if customer_id is not None else None
    if customer_id is None or quota is None or quota.is_unlimited:
        return None
    try:
        wanted = demand()
    except UnpricedModel:
        yield from _refuse(state, call, "denied")
        log.info("safe_openai.request_refused", customer_id=customer_id, reason="unpriced")
        raise
    try:
        reservation: Reservation = yield StoreCall(
            "reserve", (customer_id, quota, wanted), {"now": call.created_at}, undo="release"
        )
    except StoreError:
        if not state.policy.fail_open:
            raise
        log.warning("safe_openai.store_unavailable", customer_id=customer_id, check="quota")
        return None
    if not reservation.admitted and refit:
        refitted = yield from _refit_or_fail_open(state, call, reservation)
        if refitted is None:
            return None
        reservation = refitted
    if not reservation.admitted:
        yield from _refuse(state, call, "denied")
        log.info("safe_openai.quota_exceeded", customer_id=customer_id, limit=reservation.limit)
        yield from alert(state, quota_alert(call, quota, reservation))
        raise quota_exceeded(customer_id, reservation)
    return reservation


def _refit_or_fail_open(
    state: GuardState, call: Call, refused: Reservation
) -> Flow[Reservation | None]:
    """:func:`_refit`, with an unreachable store the policy's to decide (``None``: proceed
    without a reservation, failing open)."""
    try:
        refitted: Reservation = yield from _refit(state, call, refused)
    except StoreError:
        if not state.policy.fail_open:
            raise
        log.warning("safe_openai.store_unavailable", customer_id=call.customer_id, check="quota")
        return None
    return refitted


def quota_exceeded(customer_id: str, reservation: Reservation) -> QuotaExceeded:
    """The error for a refused reservation: the limit, how much of it was used and its value
    (from the usage the store saw, when it reported it), and ``retry_after``."""
    limit = reservation.limit or "quota"
    found = next((u for u in reservation.usage if u.name == limit), None)
    return QuotaExceeded(
        customer_id,
        limit=limit,
        retry_after=reservation.retry_after,
        used=None if found is None else found.used,
        allowed=None if found is None else found.limit,
    )


def tag(
    state: GuardState, spec: EndpointSpec, body: dict[str, Any], customer_id: str
) -> Flow[None]:
    """Put the customer's identifier in ``body`` (a value the caller set is kept) and remember
    which customer the identifier sent stands for, for safety webhooks."""
    identifier = identifier_of(state, spec, body, customer_id)
    field_name = spec.identity_field
    if field_name is not None and body.get(field_name) in (None, ""):
        body[field_name] = identifier
    if (identifier, customer_id) not in state.known_identifiers:
        try:
            yield StoreCall("remember_identifier", (identifier, customer_id))
            state.known_identifiers.add((identifier, customer_id))
        except StoreError:
            log.warning("safe_openai.store_unavailable", check="identifier")


_Lookup = tuple[list[ModerationInput], list[bytes], list[ModerationResult | None], list[int]]


def _lookup(state: GuardState, pieces: list[Piece]) -> _Lookup:
    """A request's moderation inputs, their cache keys, the cached verdicts, and the indexes
    of those still to moderate."""
    inputs = inputs_for(pieces)
    keys = [VerdictCache.key(state.moderation_model, item) for item in inputs]
    results: list[ModerationResult | None] = [
        state.cache.get(key) if VerdictCache.cacheable(item) else None
        for key, item in zip(keys, inputs, strict=True)
    ]
    return inputs, keys, results, [i for i, result in enumerate(results) if result is None]


def _moderate(
    state: GuardState,
    call: Call,
    request: GuardedRequest,
    pieces: list[Piece],
    lookup: _Lookup | None = None,
    prefetched: tuple[bool, Any] | None = None,
) -> Flow[None]:
    inputs, keys, results, missing = lookup if lookup is not None else _lookup(state, pieces)
    if not inputs:
        return
    policy = state.policy
    if missing:
        try:
            if prefetched is not None:
                ok, answer = prefetched
                if not ok:
                    raise answer
            else:
                answer = yield Moderate(tuple(inputs[i] for i in missing))
            fresh = checked_results(answer, len(missing))
        except SafeOpenAIError as exc:
            if not isinstance(exc, ModerationUnavailable):
                raise
            if policy.fail_open and exc.outage:
                log.warning(
                    "safe_openai.moderation_unavailable",
                    customer_id=call.customer_id,
                    endpoint=call.endpoint,
                    action="fail_open",
                )
                return
            log.error(
                "safe_openai.moderation_unavailable",
                customer_id=call.customer_id,
                endpoint=call.endpoint,
                action="fail_closed",
            )
            yield from _release(call)
            yield from _refuse(state, call, "denied")  # refused, never sent
            raise
        for i, result in zip(missing, fresh, strict=True):
            results[i] = result
            if VerdictCache.cacheable(inputs[i]):
                state.cache.put(keys[i], result)
    judged = [result for result in results if result is not None]
    verdict = policy.judge(request, judged)
    if not verdict.blocked:
        return
    if call.reservation is not None:
        yield from _release(call)
    yield from _refuse(state, call, "blocked")
    worst = max(
        range(len(judged)),
        key=lambda i: max((judged[i].scores.get(c, 0.0) for c in verdict.categories), default=0.0),
    )
    log.warning(
        "safe_openai.request_blocked",
        customer_id=call.customer_id,
        endpoint=call.endpoint,
        categories=list(verdict.categories),
        top_score=round(verdict.top_score, 4),
        content_hash=keys[worst].hex()[:16],
    )
    flagged = blocking_alone(policy, request, keys, judged)
    flagged_inputs = [item for key, item in zip(keys, inputs, strict=True) if key in flagged]
    if call.customer_id is not None:
        violation = Violation(
            customer_id=call.customer_id,
            created_at=call.created_at,
            source="moderation",
            categories=verdict.categories,
            top_score=verdict.top_score,
            endpoint=call.endpoint,
            strike=is_strike(policy, request, flagged_inputs, pieces),
        )
        yield from strike(state, violation, flagged)
    raise ModerationBlocked(
        call.customer_id,
        categories=verdict.categories,
        scores=verdict.scores,
        endpoint=call.endpoint,
    )


def blocking_alone(
    policy: Policy,
    request: GuardedRequest,
    keys: Sequence[bytes],
    results: Sequence[ModerationResult],
) -> list[bytes]:
    """The keys of the inputs that block on their own (all of them when only their mix does):
    what a block is about, for strikes and their repeats."""
    alone = [
        key
        for key, result in zip(keys, results, strict=True)
        if policy.judge(request, [result]).blocked
    ]
    return alone or list(keys)


def is_strike(
    policy: Policy,
    request: GuardedRequest,
    flagged: Iterable[ModerationInput],
    pieces: Iterable[Piece],
) -> bool:
    """Whether a block counts against the customer: some ``flagged`` input came from one of
    :attr:`Policy.strike_roles`."""
    roles = roles_of(pieces)
    found = {role for item in flagged for role in roles.get(item, ())}
    if not found or found & set(policy.strike_roles):
        return True
    log.info(
        "safe_openai.blocked_without_strike", customer_id=request.customer_id, roles=sorted(found)
    )
    return False


def strike(state: GuardState, violation: Violation, keys: Iterable[bytes]) -> Flow[None]:
    """Record a moderation block's violation (a strike or not, see :attr:`Violation.strike`),
    unless the same content was just blocked for the same customer (a retry). The block stands
    whatever happens here.

    A violation the store cannot take goes to the spool like a usage record: the drain writes
    it once (by its ``violation_id``) and applies the strike rule then.
    """
    keys = list(keys)
    if not violation.strike:
        # a repeat is judged among violations of its own kind: content first seen where it was
        # no strike (a tool result) still strikes when the customer writes it
        keys.append(b"\x00not a strike")
    window = state.policy.repeat_strike_window
    if state.recent_blocks.repeat(violation.customer_id, keys, violation.created_at, window):
        log.info("safe_openai.repeat_block", customer_id=violation.customer_id)
        return
    if not violation.violation_id:
        violation = replace(violation, violation_id=os.urandom(16).hex())
    try:
        yield from record_violation(state, violation, settles=True)
    except StoreError:
        if state.spool is None:
            # Logged, and not noted as struck: the next block of the same content tries again.
            log.error("safe_openai.violation_not_recorded", customer_id=violation.customer_id)
            return
        try:
            yield SpoolViolation(violation)
        except Exception:
            log.error("safe_openai.violation_not_recorded", customer_id=violation.customer_id)
            return
        log.warning("safe_openai.violation_spooled", customer_id=violation.customer_id)
        state.spool_dirty = True
    state.recent_blocks.struck(violation.customer_id, keys, violation.created_at)


#: Violations read to place one in its strike window; beyond that many, counting is cruder.
_STRIKE_SCAN = 1000


def record_violation(
    state: GuardState, violation: Violation, *, settles: bool = False
) -> Flow[bool]:
    """Store a violation and suspend the customer when it reaches the strike limit.

    ``settles``: the writes run to their end through a cancellation (a moderation block's
    strike, see :attr:`StoreCall.settles`); a webhook delivery keeps them cancellable, so a
    dropped delivery gives its claim back at once.

    Returns whether the customer was suspended by this violation.
    """
    yield StoreCall("record_violation", (violation,), settles=settles)
    log.info(
        "safe_openai.strike_recorded" if violation.strike else "safe_openai.violation_recorded",
        customer_id=violation.customer_id,
        source=violation.source,
        categories=list(violation.categories),
    )
    suspended: bool = yield from enforce_strikes(state, violation, settles=settles)
    return suspended


def enforce_strikes(
    state: GuardState, violation: Violation, *, settles: bool = False
) -> Flow[bool]:
    """Apply the strike rule to a stored violation; returns whether it suspended the customer.

    Strike windows use the time each violation happened (``created_at``: the blocked call's
    start, or the webhook event's own time), so a violation stored late (a spool replay, an
    event OpenAI delivered days later) counts in the window in which it happened: it suspends
    only when ``strike_limit`` violations, itself among them, fall within one
    ``strike_window``. A timed suspension runs from the violation that filled the window, and
    one that would already be over is not applied. Running this twice for one violation
    suspends at most once (a spool replay, a webhook redelivery).
    """
    policy = state.policy
    if violation.strike:
        yield from alert(state, strike_alert(violation))
    limit = policy.strike_limit
    if limit is None or not violation.strike:
        return False
    window = policy.strike_window
    at = violation.created_at
    customer_id = violation.customer_id
    stored = yield StoreCall(
        "violations",
        (),
        {"customer_id": customer_id, "since": at - window, "limit": _STRIKE_SCAN},
        settles=settles,
    )
    if len(stored) >= _STRIKE_SCAN:
        # Too many to place one by one (a customer blocked over and over): count instead.
        count = yield StoreCall(
            "count_violations", (customer_id,), {"since": at - window}, settles=settles
        )
        filled_at = at if count >= limit else None
    else:
        times = sorted(v.created_at for v in stored if v.strike and v.created_at <= at + window)
        filled_at = window_filled(times, at, window, limit)
    if filled_at is None:
        return False
    until = filled_at + policy.suspension if policy.suspension else None
    if until is not None and until <= _now():
        return False  # the suspension these strikes earned is already over
    current = yield StoreCall("suspension", (customer_id,), {"now": filled_at}, settles=settles)
    if current is not None and (
        current.until is None or (until is not None and current.until >= until)
    ):
        return False  # a longer suspension (e.g. after an OpenAI deactivation) stays in force
    reason = f"{limit} violations within {human_span(window)}"
    yield StoreCall(
        "suspend",
        (customer_id,),
        {"reason": reason, "until": until, "now": filled_at},
        settles=settles,
    )
    log.warning(
        "safe_openai.customer_suspended",
        customer_id=customer_id,
        reason=reason,
        until=until.isoformat() if until else None,
    )
    yield from alert(state, suspension_alert(customer_id, filled_at, reason))
    return True


def window_filled(
    times: Sequence[datetime], at: datetime, window: timedelta, limit: int
) -> datetime | None:
    """When ``limit`` of the sorted ``times``, one of them at ``at``, first fell within one
    ``window``; ``None`` if they never did."""
    if at not in times:  # a store that does not list it yet still counts it
        times = sorted([*times, at])
    first, last = bisect.bisect_left(times, at), bisect.bisect_right(times, at)
    filled: datetime | None = None
    # every run of `limit` consecutive times that includes one at `at`
    for start in range(max(0, first - limit + 1), min(last, len(times) - limit + 1)):
        end = times[start + limit - 1]
        if end - times[start] <= window and (filled is None or end < filled):
            filled = end
    return filled


def suspend(
    customer_id: str, *, reason: str, duration: timedelta | None, by: str
) -> Flow[datetime | None]:
    """Suspend a customer now (for ``duration``, or until lifted). Returns when it ends."""
    now = _now()
    until = now + duration if duration is not None else None
    yield StoreCall("suspend", (customer_id,), {"reason": reason, "until": until, "now": now})
    log.warning(
        "safe_openai.customer_suspended",
        customer_id=customer_id,
        reason=reason,
        until=until.isoformat() if until else None,
        by=by,
    )
    return until


def unsuspend(customer_id: str, *, by: str) -> Flow[bool]:
    """Lift a customer's suspension. Returns whether one was in force."""
    lifted = yield StoreCall("unsuspend", (customer_id,))
    if lifted:
        log.warning("safe_openai.customer_unsuspended", customer_id=customer_id, by=by)
    return bool(lifted)


def human_span(span: timedelta) -> str:
    """``1d``, ``12h``, ``90m``: a window as people write it (the largest whole unit), as
    suspension reasons and ``safe-openai status`` both show it."""
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _release(call: Call) -> Flow[None]:
    reservation, call.reservation = call.reservation, None
    if reservation is None:
        return
    try:
        yield StoreCall("release", (reservation,), settles=True)
    except StoreError:
        # An unreleased reservation expires by itself after RESERVATION_TTL.
        log.warning("safe_openai.store_unavailable", check="release")


def _refuse(state: GuardState, call: Call, outcome: Outcome) -> Flow[None]:
    """Record a call that was never sent (zero tokens), so reports show it. The refusal stands
    whatever happens to its record: with the store and the spool both failing, the caller
    still gets the refusal (``ModerationBlocked``, ...), not the spool's ``OSError``."""
    try:
        yield from _write(state, call, _record(state, call, outcome, TokenUsage(), None))
    except Exception:
        log.exception("safe_openai.usage_lost", customer_id=call.customer_id, outcome=outcome)


def _record(
    state: GuardState,
    call: Call,
    outcome: Outcome,
    tokens: TokenUsage,
    request_id: str | None,
) -> UsageRecord:
    return UsageRecord(
        customer_id=call.customer_key,
        endpoint=call.endpoint,
        model=call.model,
        outcome=outcome,
        tokens=tokens,
        cost_usd=state.prices.cost(call.model, tokens) if tokens.total_tokens else 0.0,
        latency_s=time.perf_counter() - call.started,
        created_at=call.created_at,
        request_id=request_id,
        record_id=os.urandom(16).hex(),
    )


def _write(
    state: GuardState, call: Call, record: UsageRecord, *, request_id: str | None = None
) -> Flow[bool]:
    """Commit or record a usage record; if the store fails, spool it so it is never lost.

    With ``request_id``, a store that settles a call in one round trip (``finish_call``) maps
    the request to the customer in it too. Returns whether it did.
    """
    reservation, call.reservation = call.reservation, None
    mapped = False
    try:
        if state.one_trip:
            mapped = bool(request_id)
            yield StoreCall(
                "finish_call", (reservation, record), {"request_id": request_id}, settles=True
            )
        elif reservation is not None:
            yield StoreCall("commit", (reservation, record), settles=True)
        else:
            yield StoreCall("record_usage", (record,), settles=True)
    except StoreError:
        log.warning(
            "safe_openai.usage_spooled",
            customer_id=record.customer_id,
            spooled=state.spool is not None,
        )
        yield Spool(record, reservation.id if reservation else None)
        state.spool_dirty = state.spool is not None
        return False
    if state.spool_dirty:
        state.spool_dirty = False
        try:
            left = yield DrainSpool()
        except Exception:
            left = 1
            log.warning("safe_openai.spool_drain_failed")
        # a drain that stopped part-way keeps the rest for the next successful write
        state.spool_dirty = bool(left)
    return mapped


def unsent(call: Call) -> Flow[None]:
    """Give back a call's reservation when the SDK raised before building its request (a
    value it cannot encode, a cancelled task): nothing was sent, so nothing counts."""
    if call.finished:
        return
    call.finished = True
    yield from _release(call)


def finish(
    state: GuardState,
    call: Call,
    *,
    outcome: Outcome,
    usage: TokenUsage | None,
    request_id: str | None,
    output_chars: int = 0,
) -> Flow[UsageRecord | None]:
    """Record the usage of a call that was sent. Runs once per call; later calls do nothing.

    Returns the record written (``None`` when the call had already finished).
    """
    if call.finished:
        return None
    call.finished = True
    if usage is None and outcome in ("ok", "estimated") and call.spec.output_limit_fields:
        outcome = "estimated"
        usage = TokenUsage(estimate_tokens(call.input_chars), 0, estimate_tokens(output_chars))
    record = _record(state, call, outcome, usage or TokenUsage(), request_id)
    reservation = call.reservation
    mapped = yield from _write(
        state, call, record, request_id=request_id if call.customer_id is not None else None
    )
    if reservation is not None and state.policy.soft_limits is not None:
        for crossed in soft_limit_alerts(state.policy, reservation, record):
            yield from alert(state, crossed)
    if request_id and call.customer_id is not None and not mapped:
        try:
            yield StoreCall("remember_request", (request_id, call.customer_id), settles=True)
        except StoreError:
            log.warning("safe_openai.store_unavailable", check="request_map")
    log.info(
        "safe_openai.usage_recorded",
        customer_id=call.customer_id,
        endpoint=call.endpoint,
        model=call.model,
        outcome=record.outcome,
        input_tokens=record.tokens.input_tokens,
        output_tokens=record.tokens.output_tokens,
        cost_usd=record.cost_usd,
    )
    return record


#: Output tokens a call without a cap must have room for to be admitted on what remains of a
#: token or cost budget (see :func:`_refit` and docs/guide.md, "How reservation works").
MIN_OUTPUT_TOKENS = 16


def _output_cap(call: Call) -> int | None:
    """The output cap the request sets itself (the policy's ``max_output_tokens`` is applied
    to the body before this is read), or ``None`` when it sets none."""
    for name in call.spec.output_limit_fields:
        value = call.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(value, 0)  # a negative cap (the API refuses it) reserves nothing
    return None


def _choices(call: Call) -> int:
    """The outputs a call is billed for: ``n`` choices, or a legacy completion's ``best_of``
    (generated server-side and billed, though only ``n`` are returned)."""
    found = 1
    for name in ("n", "best_of"):
        value = call.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > found:
            found = value
    return found


def _uncapped_output(call: Call) -> int:
    """What a call without a cap reserves for its output: the endpoint's documented default
    (4,096 for chat and Responses). Every current model can return at least that many, so it
    is the worst case capped for concurrency, not the model's own limit (which would make one
    uncapped call hold a whole small budget)."""
    return call.spec.default_output_tokens


#: The most output tokens one hold counts, whatever cap or ``n`` a request names: more than any
#: request can be billed (128 choices of the longest output), and small enough that holds sum
#: to exact integers in every store (64-bit in SQLite and PostgreSQL, doubles in Lua). A cap
#: of 2**63, which the API refuses anyway, made the store fail: a StoreError any customer
#: could raise, and under ``fail_open`` a call sent without its quota check.
MAX_OUTPUT_HOLD = 1_000_000_000


def _demand(state: GuardState, call: Call, output: int) -> QuotaDemand:
    """The input estimate plus ``output`` tokens (at most :data:`MAX_OUTPUT_HOLD`), and their
    cost.

    Raises:
        UnpricedModel: the model has no price and a cost quota applies.
    """
    tokens = TokenUsage(estimate_tokens(call.input_chars), 0, min(output, MAX_OUTPUT_HOLD))
    cost = state.prices.cost(call.model, tokens)
    if cost is None and call.customer_id is not None:
        quota = state.policy.quota_for(call.customer_id)
        if quota is not None and quota.usd_per_month is not None:
            # An unpriced call would spend without limit under a cost quota.
            raise UnpricedModel(call.customer_id, model=call.model)
    return QuotaDemand(tokens=tokens.total_tokens, cost_usd=cost or 0.0)


def _worst_case(state: GuardState, call: Call) -> QuotaDemand:
    """The most a call may consume: its input estimate plus its output cap, or for a call
    without one what :func:`_uncapped_output` justifies, times ``n`` choices."""
    cap = _output_cap(call)
    output = cap if cap is not None else _uncapped_output(call)
    return _demand(state, call, output * _choices(call))


#: The limits an output reservation is held against (requests_per_minute is not).
_SIZED_LIMITS = frozenset({"tokens_per_minute", "tokens_per_day", "usd_per_month"})


def _refit(state: GuardState, call: Call, refused: Reservation) -> Flow[Reservation]:
    """A call without an output cap whose worst case a token or cost limit refused, tried
    again holding what remains of the budget, when that leaves room for the input estimate and
    :data:`MIN_OUTPUT_TOKENS`; else (or for any other refusal) ``refused`` itself. Such a call
    may overshoot a token budget by at most its actual output; the next call is then refused.

    The second reservation is decided by the store like the first (atomically, on what is used
    then), so concurrent calls still cannot hold more than the budget between them. A store
    that reports no usage gets no second try.
    """
    if (
        refused.limit not in _SIZED_LIMITS
        or not refused.usage
        or call.customer_id is None
        or _output_cap(call) is not None
    ):
        return refused
    quota = state.policy.quota_for(call.customer_id)
    worst = _uncapped_output(call) * _choices(call)
    if quota is None or worst <= MIN_OUTPUT_TOKENS:
        return refused
    fits = min(_fitting_output(state, call, refused, worst), worst - 1)
    output = max(fits, MIN_OUTPUT_TOKENS)
    if worst - output > _uncapped_output(call):
        # n choices on what remains would leave up to n - 1 responses unheld: the overshoot
        # stays within one response's reservation, whatever n a customer asks for
        return refused
    demand = _demand(state, call, output)
    try:
        second: Reservation = yield StoreCall(
            "reserve", (call.customer_key, quota, demand), {"now": call.created_at}, undo="release"
        )
    except StoreError:
        if fits >= MIN_OUTPUT_TOKENS:
            raise  # the first answer showed room: an outage now is the policy's (fail_open)
        # The first answer showed no room (this try would only have told when room frees):
        # it stands, or a fail_open policy would send a call the store has just refused.
        log.warning("safe_openai.store_unavailable", customer_id=call.customer_id, check="quota")
        return refused
    if second.admitted:
        log.info(
            "safe_openai.reservation_fitted",
            customer_id=call.customer_id,
            limit=refused.limit,
            output_tokens=output,
        )
    return second


def _fitting_output(state: GuardState, call: Call, refused: Reservation, worst: int) -> int:
    """The most output tokens that fit what ``refused.usage`` shows remains of every token
    and cost limit with the call's input estimate (below 0 when not even the input fits)."""
    input_tokens = estimate_tokens(call.input_chars)
    fits = worst
    for usage in refused.usage:
        if usage.name in ("tokens_per_minute", "tokens_per_day"):
            fits = min(fits, int(usage.remaining) - input_tokens)
    budget = next((u for u in refused.usage if u.name == "usd_per_month"), None)
    if budget is None or fits < 0:
        return fits
    low, high = -1, fits  # the largest output whose cost fits: cost grows with output
    while low < high:
        middle = (low + high + 1) // 2
        cost = state.prices.cost(call.model, TokenUsage(input_tokens, 0, middle)) or 0.0
        if round(cost - budget.remaining, 9) <= 0:
            low = middle
        else:
            high = middle - 1
    return low


def apply_decision(spec: EndpointSpec, body: dict[str, Any], decision: Decision) -> None:
    """Apply a policy's adjustments to a request body in place."""
    if decision.model is not None:
        body["model"] = decision.model
    cap = decision.max_output_tokens
    if cap is not None and spec.output_limit_fields:
        present = [name for name in spec.output_limit_fields if name in body]
        for name in present or spec.output_limit_fields[:1]:
            value = body.get(name)
            if not isinstance(value, int) or value > cap:
                body[name] = cap
    instruction = decision.system_instruction
    if instruction:
        if spec.instructions == "messages" and isinstance(body.get("messages"), list):
            body["messages"] = [{"role": "system", "content": instruction}, *body["messages"]]
        elif spec.instructions == "instructions":
            given = body.get("instructions")
            body["instructions"] = (
                f"{instruction}\n\n{given}" if isinstance(given, str) and given else instruction
            )


def on_store(store: Any) -> Callable[[Command], Any]:
    """An executor for flows that only talk to a sync store (the command line)."""

    def execute(command: Command) -> Any:
        if not isinstance(command, StoreCall):
            raise TypeError(f"only store commands can run here, not {command!r}")
        return getattr(store, command.method)(*command.args, **command.kwargs)

    return execute


def drive(flow: Flow[T], execute: Callable[[Command], Any]) -> T:
    """Run a flow, carrying out each command with ``execute`` (sync).

    Whatever a command raises is thrown back into the flow, ``BaseException`` included (a
    ``KeyboardInterrupt``, a gevent timeout), so the flow's own clean-up runs on every exit.
    """
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            command = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result
        value, error = None, None
        try:
            value = execute(command)
        except BaseException as exc:
            error = exc


async def adrive(flow: Flow[T], execute: Callable[[Command], Awaitable[Any]]) -> T:
    """Run a flow, carrying out each command with ``execute`` (async).

    Whatever a command raises is thrown back into the flow, ``asyncio.CancelledError``
    included, so a cancelled call still releases what it reserved before the cancellation
    goes on. A command that :func:`settles` a call is run to its end even when the caller is
    cancelled meanwhile, once or over and over (anyio cancel scopes cancel at every ``await``):
    its result goes back to the flow, and the cancellation is thrown in at the flow's next
    command that does not settle, or raised when the flow ends. So a cancelled call's release,
    usage record and violation are never cut off halfway.
    """
    value: Any = None
    error: BaseException | None = None
    deferred: BaseException | None = None
    while True:
        try:
            command = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            if deferred is not None:
                raise deferred from None
            result: T = stop.value
            return result
        except BaseException as exc:
            if deferred is not None and exc is not deferred:
                raise deferred from exc
            raise
        value, error = None, None
        if deferred is not None and not settles(command):
            error, deferred = deferred, None
        elif settles(command):
            value, error, cancelled = await _to_its_end(execute(command))
            deferred = deferred or cancelled
        else:
            try:
                value = await execute(command)
            except BaseException as exc:
                error = exc


def settles(command: Command) -> bool:
    """Whether ``command`` closes a decided call (see :attr:`StoreCall.settles`)."""
    if isinstance(command, StoreCall):
        return command.settles
    return isinstance(command, (Spool, SpoolViolation, DrainSpool))


async def _to_its_end(
    pending: Awaitable[Any],
) -> tuple[Any, BaseException | None, BaseException | None]:
    """Await ``pending`` to its end through any cancellation of the caller. Returns its result,
    its own failure, and the caller's cancellation that came meanwhile (each or ``None``)."""
    task = asyncio.ensure_future(pending)
    cancelled: BaseException | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if not task.done():
                cancelled = exc
        except BaseException:
            pass  # the task's own failure, read below
    if task.cancelled():  # the command itself was cancelled (a closing loop): a failure
        return None, cancelled or asyncio.CancelledError(), None
    failure = task.exception()
    return (None if failure is not None else task.result()), failure, cancelled


# --- alerts ----------------------------------------------------------------------------------


def alert(state: GuardState, event: Alert | None) -> Flow[None]:
    """Hand ``event`` to :meth:`Policy.on_alert` once across every process sharing the store:
    its id is claimed in the store first (the webhook events' claims), so a second process, a
    retry or a redelivery finds it claimed and stays quiet. Nothing here reaches the call: a
    raising hook is logged, and a store that cannot take the claim is logged and the alert
    delivered all the same (at least once rather than never)."""
    if event is None or event.id in state.alerts_seen or not _listens(state.policy):
        return
    token = os.urandom(16).hex()
    claimed = True
    now = _now()
    try:
        found = yield StoreCall(
            "claim_event",
            (event.id,),
            {"token": token, "now": now, "lease": EVENT_LEASE},
            settles=True,
        )
    except StoreError:
        log.warning("safe_openai.alert_unclaimed", alert_id=event.id, kind=event.kind)
        found, claimed = "claimed", False
    if found == "held":
        # firing elsewhere, or the claimer died before its hook ran: once its claim lapses,
        # the event coming again claims it (at least once), here as in any other process
        state.alerts_seen.add(event.id, until=now + EVENT_LEASE)
        return
    state.alerts_seen.add(event.id)
    if found != "claimed":
        return  # fired elsewhere
    log.info("safe_openai.alert", alert_id=event.id, kind=event.kind, customer_id=event.customer_id)
    try:
        state.policy.on_alert(event)
    except Exception:
        log.exception("safe_openai.alert_hook_failed", alert_id=event.id, kind=event.kind)
    if claimed:
        try:
            yield StoreCall("finish_event", (event.id,), {"token": token}, settles=True)
        except StoreError:
            # the claim lapses after EVENT_LEASE; the event is unlikely to come again by then
            log.warning("safe_openai.alert_not_finished", alert_id=event.id)


def _listens(policy: Policy) -> bool:
    """Whether anyone hears alerts: sinks, or an ``on_alert`` of the policy's own. Nobody
    listening, alerts cost nothing (no claim is written)."""
    return bool(policy.alert_sinks) or type(policy).on_alert is not Policy.on_alert


def _id_part(value: str) -> str:
    """A customer id inside an alert id: ``%`` and ``:`` escaped, so parts cannot run into
    each other."""
    return value.replace("%", "%25").replace(":", "%3A")


def _window(limit: str, at: datetime) -> str:
    """The alert window of ``limit`` that ``at`` falls in: the UTC hour of the minute limits
    (a customer staying at one hears of it once an hour, not once a minute), the UTC day or
    month of the others."""
    at = at.astimezone(timezone.utc)
    if limit.endswith("_per_minute"):
        return at.strftime("%Y-%m-%dT%H")
    if limit.endswith("_per_day"):
        return at.strftime("%Y-%m-%d")
    return at.strftime("%Y-%m")


#: What a settled call adds to each limit: requests 1, tokens input + output, its cost.
def _added(limit: str, record: UsageRecord) -> float:
    if limit == "requests_per_minute":
        return 1
    if limit == "usd_per_month":
        return record.cost_usd or 0.0
    return record.tokens.total_tokens


def soft_limit_alerts(policy: Policy, reservation: Reservation, record: UsageRecord) -> list[Alert]:
    """The soft limits the settled ``record`` finds reached: each limit of ``reservation.usage``
    (what the store counted before the call) that, with the call's actual usage added, is at or
    above its threshold. One alert per limit, threshold and window: the id names the window the
    usage counted in, so the store fires it once, for the first call that gets there.

    Not only a call that takes the count from below: the count includes other calls' pending
    holds (their demand, not their use), so of concurrent calls the one whose use truly crosses
    may see the count already above, and the others' use below; all of them must report it.
    """
    if not record.counts_as_request or not reservation.usage or not reservation.admitted:
        return []
    try:
        thresholds = soft_thresholds(policy.soft_limits)
    except ConfigurationError:
        log.exception("safe_openai.alert_hook_failed", kind="soft_limit")
        return []
    at = reservation.at or record.created_at
    found = []
    for usage in reservation.usage:
        fraction = thresholds.get(usage.name)
        if fraction is None or usage.limit <= 0:
            continue
        mark = fraction * usage.limit
        after = usage.used + _added(usage.name, record)
        # costs are summed floats: compare at the report's precision, as the quota does
        if round(after - mark, 9) < 0:
            continue
        if usage.name == "usd_per_month":
            after = round(after, 9)
        found.append(
            Alert(
                id=(
                    f"alert:soft_limit:{_id_part(record.customer_id)}:{usage.name}:"
                    f"{fraction:g}:{_window(usage.name, at)}"
                ),
                kind="soft_limit",
                customer_id=record.customer_id,
                at=at,
                limit=usage.name,
                used=after,
                allowed=usage.limit,
                threshold=fraction,
                reason=f"{usage.name} reached {fraction:.0%} of its limit ({after:g} of "
                f"{usage.limit:g})",
            )
        )
    return found


def quota_alert(call: Call, quota: Quota | None, reservation: Reservation) -> Alert | None:
    """The alert of a quota refusal: once per customer, limit and window."""
    if call.customer_id is None or reservation.limit is None:
        return None
    name = reservation.limit
    usage = next((u for u in reservation.usage if u.name == name), None)
    allowed = usage.limit if usage is not None else getattr(quota, name, None)
    at = reservation.at or call.created_at
    return Alert(
        id=f"alert:quota_exceeded:{_id_part(call.customer_id)}:{name}:{_window(name, at)}",
        kind="quota_exceeded",
        customer_id=call.customer_id,
        at=at,
        limit=name,
        used=usage.used if usage is not None else None,
        allowed=float(allowed) if isinstance(allowed, (int, float)) else None,
        reason=f"a call was refused by {name}",
    )


def strike_alert(violation: Violation) -> Alert:
    """The alert of a strike, once per violation."""
    key = (
        violation.violation_id
        or hashlib.sha256(
            f"{violation.customer_id}\0{violation.created_at.isoformat()}\0{violation.source}"
            f"\0{violation.detail}".encode()
        ).hexdigest()[:32]
    )
    return Alert(
        id=f"alert:strike:{key}",
        kind="strike",
        customer_id=violation.customer_id,
        at=violation.created_at,
        categories=violation.categories,
        event_type=violation.source,
        reason=f"a strike ({violation.source}"
        + (f": {', '.join(violation.categories)}" if violation.categories else "")
        + ")",
    )


def suspension_alert(
    customer_id: str, since: datetime, reason: str, *, event_type: str | None = None
) -> Alert:
    """The alert of a suspension, once per customer and start."""
    stamp = since.astimezone(timezone.utc).isoformat()
    return Alert(
        id=f"alert:suspension:{_id_part(customer_id)}:{stamp}",
        kind="suspension",
        customer_id=customer_id,
        at=since,
        event_type=event_type,
        reason=f"suspended: {reason}",
    )


def openai_event_alert(
    event_id: str,
    event_type: str,
    customer_id: str,
    at: datetime,
    *,
    category: str | None,
    reason: str,
) -> Alert:
    """The alert of an OpenAI safety event traced to a customer, once per event id."""
    return Alert(
        id=f"alert:openai_event:{event_id}",
        kind="openai_event",
        customer_id=customer_id,
        at=at,
        categories=(category,) if category else (),
        event_type=event_type,
        reason=reason,
    )
