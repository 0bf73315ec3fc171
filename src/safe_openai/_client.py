"""SafeClient and AsyncSafeClient: thin shells over the SDK's choke points.

Every SDK call passes ``request()`` once per logical call (plain, streamed, raw, streaming
response, ``parse`` helpers, ``with_options`` copies); the guard runs there, before the SDK's
own retry loop, so it runs once however often the SDK retries. The decisions live in
:mod:`safe_openai._guard`; here they are only carried out.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from functools import cached_property
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx2
import openai
from openai._legacy_response import LegacyAPIResponse
from openai._models import FinalRequestOptions
from openai._response import APIResponse, AsyncAPIResponse
from openai._utils._json import openapi_dumps
from typing_extensions import Self, override

from . import telemetry
from ._bodies import meter_body
from ._copies import GUARD_PARAMETERS, signed_copy
from ._extract import body_from_content, is_guarded, normalize_path, resolve_endpoint, route_of
from ._guard import (
    MODERATION_CONCURRENCY,
    Call,
    Command,
    DrainSpool,
    Flow,
    GuardState,
    Moderate,
    ModerateMany,
    Spool,
    SpoolViolation,
    StoreCall,
    Together,
    adrive,
    begin,
    drive,
    enforce_strikes,
    finish,
    moderate_output,
    suspend,
    unsent,
    unsuspend,
)
from ._identity import current_customer, resolve_secret, safety_identifier, validate_customer_id
from ._log import get_logger
from ._moderation import AsyncOpenAIModerator, ModerationInput, OpenAIModerator, VerdictCache
from ._output import OutputWindows, answer_texts
from ._streams import TAP_KEY, UsageTap, guarded_stream_cls, windowed_bytes_only
from .errors import (
    BatchFileError,
    ConfigurationError,
    CustomerRequired,
    ModerationUnavailable,
    SafeOpenAIError,
    StoreError,
    UnguardedPathError,
)
from .policy import DefaultPolicy, ModerationResult, Policy
from .standing import Standing, standing_of
from .stores import (
    AsyncUsageStore,
    UsageStore,
    async_store_from_url,
    default_store_url,
    store_from_url,
    store_identity,
)
from .stores import Spool as LocalSpool
from .stores._spool import default_spool_dir
from .usage import Outcome, PriceTable, TokenUsage, UsageRecord, token_usage_from_payload

if TYPE_CHECKING:
    # Imported when first used: the WebSocket resources pull in the SDK's beta types, which a
    # plain guarded call does not need (import time).
    from ._connections import GuardedAsyncBeta, GuardedAsyncResponses, GuardedBeta, GuardedResponses

__all__ = ["AsyncSafeClient", "SafeClient"]

log = get_logger()

#: The oldest openai release the test suite passes on (pyproject.toml pins it too).
SDK_FLOOR = "3.42.1"

#: Hooks of the SDK without which a path would pass the guard silently (older releases lack
#: some: a socket opened without ``_websocket_query_params`` would never be asked about).
#: tests/test_sdk_hooks.py pins the shape of every hook; these are checked at import too, so an
#: SDK installed past the pin (``--no-deps``, a lock file) fails loudly instead.
_REQUIRED_HOOKS = tuple(
    (owner, name, guards)
    for name, guards in (
        ("request", "every HTTP call"),
        ("_build_request", "streamed usage"),
        ("_websocket_query_params", "WebSockets"),
        ("_prepare_url", "the path of a call"),
        ("_refresh_api_key", "code that takes the API key for a socket of its own"),
    )
    for owner in (openai.OpenAI, openai.AsyncOpenAI)
)


def missing_hook(owner: type, name: str, guards: str) -> ImportError:
    """The refusal of an SDK without ``owner.name``, which the guard overrides to see ``guards``
    (an override of a method the SDK no longer has, or calls by another name, is never called).
    """
    return ImportError(
        f"safe-openai needs openai>={SDK_FLOOR},<4: openai {openai.__version__} has no "
        f"{owner.__name__}.{name}, through which the guard sees {guards}."
    )


def _check_sdk() -> None:
    """Refuse an SDK that lacks a hook the guard needs, rather than guard it partly."""
    for owner, name, guards in _REQUIRED_HOOKS:
        if not callable(getattr(owner, name, None)):
            raise missing_hook(owner, name, guards)


_check_sdk()


class _Sending:
    """The guarded call the SDK is sending in this thread or task, as ``_build_request`` sees
    it: the tap of a streamed call, and whether a request was built (and so may have been
    sent) at all."""

    __slots__ = ("built", "tap")

    def __init__(self, tap: UsageTap | None) -> None:
        self.tap = tap
        self.built = False


_sending: ContextVar[_Sending | None] = ContextVar("safe_openai_sending", default=None)

_STATE_KWARG = "_safe_state"
# A relative path of plain segments: the URL the SDK builds from it is the base URL plus it.
_PLAIN_PATH = re.compile(r"/?[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*/?")
_CUSTOMER_KWARG = "_safe_customer"
_ROOT_KWARG = "_safe_root"


def _is_async_store(store: object) -> bool:
    return inspect.iscoroutinefunction(getattr(store, "reserve", None))


def _fold_body(options: FinalRequestOptions) -> tuple[FinalRequestOptions, dict[str, Any]]:
    """``options`` with its JSON body's ``extra_body`` folded in (it wins, as in the SDK) and
    put through the SDK's own JSON encoding, so moderation sees exactly what will be sent:
    tuples become lists and pydantic objects dicts, as they will on the wire.

    The options are changed in place: the SDK builds them for this one call and copies them
    before its first attempt, and the body dict is a new one (the caller's is never touched).
    """
    body: dict[str, Any]
    if isinstance(options.json_data, Mapping):
        body = dict(options.json_data)
    elif options.json_data is None and options.content is None:
        body = {}
    elif options.json_data is None and isinstance(options.content, (bytes, bytearray)):
        parsed = body_from_content(options.content)
        if parsed is None:
            raise UnguardedPathError(
                f"The raw request body for {options.url} is not a JSON object, so it cannot "
                "be moderated."
            )
        body, options.content = parsed, None
    else:
        raise UnguardedPathError(
            f"The request body for {options.url} cannot be inspected, so it cannot be moderated."
        )
    if options.extra_json:
        body.update(options.extra_json)
        options.extra_json = None
    _refuse_form_fields(options)
    body = _as_sent(body)
    options.json_data = body
    return options, body


def _refuse_form_fields(options: FinalRequestOptions) -> None:
    """Refuse ``files`` entries without a file name: they go out as plain form fields (a
    ``prompt`` among an image edit's files), which the body the guard reads does not show.
    The SDK itself sends every form field from the body; only hand-built requests do this.
    """
    files = options.files
    entries = list(files.items()) if isinstance(files, Mapping) else list(files or [])
    for entry in entries:
        value = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else None
        if isinstance(value, tuple) and value and value[0] is None:
            raise UnguardedPathError(
                f"A form field ({entry[0]!r}) passed as a file to {options.url} cannot be "
                "moderated; pass it in the request body."
            )


#: Types whose JSON encoding is their value. Compared exactly: a subclass (a ``str`` with its
#: own ``strip`` or ``encode``, a ``dict`` with its own ``get``) could read differently from
#: how the encoder sends it, so it is re-encoded like any other object.
_PLAIN = frozenset({str, int, float, bool, type(None)})


def _as_sent(value: Any) -> Any:
    """``value`` as the SDK's JSON encoding will send it: tuples as lists, pydantic objects as
    their JSON dicts, subclasses of JSON types as their plain values. A value that is already
    plain JSON comes back as the very same object, so the common case costs a walk and no copy.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is dict:
        changed: dict[Any, Any] | None = None
        for key, item in value.items():
            if type(key) is not str:
                return json.loads(openapi_dumps(value))
            sent = _as_sent(item)
            if sent is not item:
                if changed is None:
                    changed = dict(value)
                changed[key] = sent
        return value if changed is None else changed
    if kind is list or kind is tuple:
        items = [_as_sent(item) for item in value]
        if kind is list and all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return items
    # Pydantic models, datetimes, subclasses and anything else: exactly what the SDK's encoder
    # makes of it.
    return json.loads(openapi_dumps(value))


def _json_usage(response: httpx2.Response) -> TokenUsage | None:
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        return token_usage_from_payload(response.json())
    except (ValueError, httpx2.ResponseNotRead):
        return None


def _setup_state(
    *,
    policy: Policy | None,
    store: Any,
    identifier_secret: str | bytes | None,
    moderator: Any,
    prices: PriceTable | None,
    spool: LocalSpool | Literal[False] | None,
    is_async: bool,
) -> GuardState:
    if not is_async and inspect.iscoroutinefunction(getattr(moderator, "moderate", None)):
        raise ConfigurationError("SafeClient needs a sync moderator.")
    policy = policy if policy is not None else DefaultPolicy()
    if not isinstance(policy, Policy):
        raise ConfigurationError(
            "policy must be a safe_openai.Policy (subclass it or use DefaultPolicy)."
        )
    secret = resolve_secret(identifier_secret)
    owns_store = store is None or isinstance(store, str)
    if store is None or isinstance(store, str):
        url = store or default_store_url()
        store = async_store_from_url(url) if is_async else store_from_url(url)
    elif not isinstance(store, AsyncUsageStore if is_async else UsageStore):
        raise ConfigurationError(
            f"store must be a URL or an object with the {'Async' if is_async else ''}UsageStore "
            f"methods, got {type(store).__name__}"
        )
    elif _is_async_store(store) != is_async:
        kind = "an async" if is_async else "a sync"
        raise ConfigurationError(f"This client needs {kind} usage store.")
    if spool is None:
        # One spool directory per store's data (an object as a URL, never its password), so a
        # drain never writes one store's records into another's on a shared machine.
        identity = store_identity(store).encode()
        spool = LocalSpool(default_spool_dir() / hashlib.sha256(identity).hexdigest()[:16])
    elif spool is False:
        spool = None
    return GuardState(
        policy=policy,
        store=store,
        secret=secret,
        moderator=moderator,
        moderation_model=getattr(moderator, "model", None) or policy.moderation_model,
        prices=prices or PriceTable(),
        cache=VerdictCache(),
        spool=spool,
        # records a crashed or disconnected process left behind are written back on the
        # first successful write
        spool_dirty=spool is not None and spool.waiting(),
        owns_store=owns_store,
        # the async client runs a call's store round trip and its moderation at once
        concurrent=is_async,
    )


def derive_state(
    state: GuardState, changes: Mapping[str, Any], *, is_async: bool
) -> tuple[GuardState, bool]:
    """The state of a copy given guard settings of its own (``copy(policy=...)``), and whether
    the copy owns (and closes) the store it gets. Unchanged parts are shared with ``state``:
    the store and its spool, the verdict cache while the moderator and its model stay, the
    identifier map while the secret and the store stay.
    """
    if not changes:
        return state, False
    new_store = "store" in changes
    moderator = changes.get("moderator", state.moderator)
    if "moderator" not in changes and "policy" in changes and _is_default_moderator(moderator):
        moderator = None  # the default moderator follows the new policy's moderation model
    spool = changes.get("spool", None if new_store else (state.spool or False))
    derived = _setup_state(
        policy=changes.get("policy", state.policy),
        store=changes["store"] if new_store else state.store,
        identifier_secret=changes.get("identifier_secret", state.secret),
        moderator=moderator,
        prices=changes.get("prices", state.prices),
        spool=spool,
        is_async=is_async,
    )
    if not new_store:
        derived.owns_store = False
        derived.recent_blocks = state.recent_blocks
        derived.batch_demands = state.batch_demands
        derived.alerts_seen = state.alerts_seen  # claimed in the same store: fired for both
        if derived.secret == state.secret:
            derived.known_identifiers = state.known_identifiers
    if derived.moderator is state.moderator and derived.moderation_model == state.moderation_model:
        derived.cache = state.cache
    return derived, derived.owns_store


def _is_default_moderator(moderator: object) -> bool:
    return isinstance(moderator, (OpenAIModerator, AsyncOpenAIModerator))


class _Guarded:
    """What both clients add to the SDK's: the shared state, the bound customer, copies that
    keep both, and the steps of a guarded call that involve no I/O.
    """

    _safe: GuardState
    _safe_customer: str | None
    _safe_root: bool

    def _adopt(self, state: GuardState, customer_id: str | None, *, root: bool) -> None:
        self._safe = state
        self._safe_customer = customer_id
        # Copies share the root's state; only the root closes a store it opened.
        self._safe_root = root

    @property
    def spool(self) -> LocalSpool | None:
        """The local spool usage records wait in while the store is unreachable."""
        spool: LocalSpool | None = self._safe.spool
        return spool

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._safe.policy

    @property
    def customer_id(self) -> str | None:
        """The customer this client is bound to, if any."""
        return self._safe_customer

    def identifier_for(self, customer_id: str | None = None) -> str:
        """The ``safety_identifier`` this client sends for ``customer_id`` (default: the bound
        customer), under its identifier secret.

        Raises:
            CustomerRequired: No customer given and none bound.
        """
        customer_id = customer_id if customer_id is not None else self._safe_customer
        if customer_id is None:
            raise CustomerRequired("identifier_for")
        return safety_identifier(self._safe.secret, validate_customer_id(customer_id))

    def _standing_flow(self, customer_id: str | None) -> Flow[Standing]:
        """The standing read of ``customer_id`` (default: the bound customer, else the one of
        the ``customer()`` context) under this client's policy and store."""
        customer_id = customer_id if customer_id is not None else self._safe_customer
        if customer_id is None:
            customer_id = current_customer()
        if customer_id is None:
            raise CustomerRequired("client.standing()")
        state = self._safe
        # now None: the usage on the store's clock, the one its reservations decide on
        return standing_of(state.policy, state.store, validate_customer_id(customer_id), None)

    def for_customer(self, customer_id: str) -> Self:
        """A client bound to one end customer, sharing this client's connections and state."""
        bound: Self = self._safe_copy(
            {"_extra_kwargs": {_CUSTOMER_KWARG: validate_customer_id(customer_id)}}
        )
        return bound

    def _safe_copy(self, kwargs: dict[str, Any]) -> Self:
        """The SDK's ``copy`` that keeps the guard, the store and the bound customer, or gives
        the copy guard settings of its own (``policy=``, ``store=``, ...).

        Libraries copy clients with any mix of arguments (``http_client=client._client``,
        ``_extra_kwargs={}``, ``max_retries=...``): the state rides along whatever is given.
        """
        changes = {name: kwargs.pop(name) for name in GUARD_PARAMETERS if name in kwargs}
        # None keeps the client's setting, as it does for the SDK's own options.
        changes = {name: value for name, value in changes.items() if value is not None}
        extra = dict(kwargs.pop("_extra_kwargs", None) or {})
        state, owns = derive_state(self._safe, changes, is_async=isinstance(self, AsyncSafeClient))
        extra[_STATE_KWARG] = state
        extra[_ROOT_KWARG] = owns
        extra.setdefault(_CUSTOMER_KWARG, self._safe_customer)
        copied: Self = cast(Any, super()).copy(_extra_kwargs=extra, **kwargs)
        return copied

    def _begin(
        self, options: FinalRequestOptions, path: str
    ) -> tuple[FinalRequestOptions, Flow[Call | None]] | None:
        """The folded options and the guard's flow for a call, or ``None`` to pass it through."""
        if not is_guarded(options.method, path):
            return None
        if resolve_endpoint(path) is None:
            # A content path the guard cannot inspect (Realtime calls, Live, evals): only the
            # policy decides, whatever the body is (SDP, multipart), so it is not parsed.
            return options, begin(
                self._safe, bound_customer=self._safe_customer, path=path, body={}
            )
        options, body = _fold_body(options)
        flow = begin(self._safe, bound_customer=self._safe_customer, path=path, body=body)
        customer = self._safe_customer or current_customer()
        return options, telemetry.watch_begin(flow, path=path, body=body, customer_id=customer)

    def _websocket_query_params(self, url: httpx2.URL, extra_query: Any) -> httpx2.QueryParams:
        """Every WebSocket the SDK opens (Responses, Realtime and its beta, Live, translations)
        asks for its query here first: the last point to refuse one the guard does not watch.
        """
        refuse_websocket(self._safe, self._socket_path(url, sys._getframe(1)))
        params: httpx2.QueryParams = cast(Any, super())._websocket_query_params(url, extra_query)
        return params

    def _socket_path(self, url: httpx2.URL, caller: FrameType) -> str:
        """The API path of the socket whose query is built for ``url``. Helpers that build the
        query from the base URL, before the socket's path is known (the SDK's
        ``TranslationSession``), are named by the socket they open.
        """
        path = normalize_path(str(url))
        client = cast("openai.OpenAI | openai.AsyncOpenAI", self)
        if path == normalize_path(str(client.base_url)):
            module = str(caller.f_globals.get("__name__", ""))
            return _BASE_URL_SOCKETS.get(module, path)
        return path

    def _api_path(self, url: str) -> str:
        """The API route the SDK will really request for ``url``, relative to the base URL.

        Classified from the URL the SDK builds (:meth:`_prepare_url`, as ``_build_request``
        does): the fragment is not sent, percent-escapes, dot segments and repeated slashes
        are folded (:func:`~safe_openai._extract.route_of`), so no spelling of a path can
        skip the guard. The SDK's own plain paths (``/chat/completions``) take a short cut
        with the same result.
        """
        if _PLAIN_PATH.fullmatch(url):
            return normalize_path("/" + url.lstrip("/"))
        client = cast("openai.OpenAI | openai.AsyncOpenAI", self)
        return route_of(client._prepare_url(url).path, client.base_url.path)

    def _output_flow(self, call: Call, texts: list[str], rid: str | None) -> Flow[Any]:
        flow = moderate_output(self._safe, call, texts, request_id=rid)
        return flow if call.telemetry is None else telemetry.watch_output(flow, call)

    def _windows(self, call: Call) -> OutputWindows | None:
        """The output windows of a streamed call whose output is moderated."""
        if call.output_mode is None:
            return None
        policy = self._safe.policy
        return OutputWindows(
            chars=policy.output_window_chars,
            sentences=policy.output_window_sentences,
            hold=call.output_mode == "block",
        )

    def _finish_flow(
        self, call: Call, outcome: Outcome, usage: TokenUsage | None, rid: str | None, chars: int
    ) -> Flow[Any]:
        flow = finish(
            self._safe, call, outcome=outcome, usage=usage, request_id=rid, output_chars=chars
        )
        if call.telemetry is None:
            return flow
        # Called from the except block of a failed send: that error is the call's.
        return telemetry.watch_finish(flow, call, outcome, sys.exc_info()[1])

    def _unsent_flow(self, call: Call) -> Flow[Any]:
        flow = unsent(call)
        if call.telemetry is None:
            return flow
        # Called from the except block of the SDK's refusal: that error ends the call.
        error = sys.exc_info()[1]
        outcome = telemetry.outcome_of(error) if error is not None else "error"
        return telemetry.watch_finish(flow, call, outcome, error)


class SafeClient(_Guarded, openai.OpenAI):
    """A drop-in ``openai.OpenAI`` that guards every model call for one end customer.

    Args:
        policy: The :class:`~safe_openai.Policy` (default :class:`~safe_openai.DefaultPolicy`).
        store: A usage store or its URL (default ``SAFE_OPENAI_STORE_URL`` or ``memory://``).
        identifier_secret: The HMAC key of safety identifiers (default
            ``SAFE_OPENAI_IDENTIFIER_SECRET``).
        moderator: Replaces the OpenAI moderation endpoint (any object with ``moderate``).
        prices: The price table for costs (default: the table shipped with the package).
        spool: A :class:`~safe_openai.stores.Spool` where usage records wait while the store is
            unreachable (default: one in ``SAFE_OPENAI_SPOOL_DIR`` or the user cache
            directory; ``False`` disables it, and such records are then logged and lost).
        **openai_kwargs: Everything ``openai.OpenAI`` accepts.

    Raises:
        ConfigurationError: No identifier secret, or a store or policy of the wrong kind.
    """

    def __init__(
        self,
        *,
        policy: Policy | None = None,
        store: UsageStore | str | None = None,
        identifier_secret: str | bytes | None = None,
        moderator: Any = None,
        prices: PriceTable | None = None,
        spool: LocalSpool | Literal[False] | None = None,
        **openai_kwargs: Any,
    ) -> None:
        state: GuardState | None = openai_kwargs.pop(_STATE_KWARG, None)
        bound: str | None = openai_kwargs.pop(_CUSTOMER_KWARG, None)
        root: bool = openai_kwargs.pop(_ROOT_KWARG, state is None)
        super().__init__(**openai_kwargs)
        if state is None:
            state = _setup_state(
                policy=policy,
                store=store,
                identifier_secret=identifier_secret,
                moderator=moderator,
                prices=prices,
                spool=spool,
                is_async=False,
            )
        if state.moderator is None:
            state.moderator = OpenAIModerator(self, model=state.moderation_model)
        self._adopt(state, bound, root=root)

    @signed_copy(
        openai.OpenAI.copy,
        {
            "policy": Policy | None,
            "store": UsageStore | str | None,
            "identifier_secret": str | bytes | None,
            "moderator": Any,
            "prices": PriceTable | None,
            "spool": LocalSpool | Literal[False] | None,
        },
    )
    def copy(self, **kwargs: Any) -> Self:
        """A copy of this client, as ``openai.OpenAI.copy``: the SDK's options override this
        client's, and the guard's settings (``policy``, ``store``, ``identifier_secret``,
        ``moderator``, ``prices``, ``spool``) too; everything not given (or ``None``) is kept,
        the bound customer included.
        """
        return self._safe_copy(kwargs)

    # The SDK binds ``with_options`` to its own ``copy``; rebind it or copies lose the guard.
    with_options = copy

    @property
    def store(self) -> UsageStore:
        """The usage store in use."""
        store: UsageStore = self._safe.store
        return store

    @cached_property
    @override
    def responses(self) -> GuardedResponses:
        """The SDK's ``responses``; ``connect()`` opens a guarded WebSocket."""
        from ._connections import GuardedResponses

        return GuardedResponses(self)

    @cached_property
    @override
    def beta(self) -> GuardedBeta:
        """The SDK's ``beta``; ``responses.connect()`` opens a guarded WebSocket."""
        from ._connections import GuardedBeta

        return GuardedBeta(self)

    @override
    def close(self) -> None:
        """Close the HTTP client, and the store if this client opened it from a URL."""
        try:
            super().close()
        finally:
            if self._safe_root and self._safe.owns_store:
                self._safe.store.close()

    def suspend(
        self, customer_id: str, *, reason: str, duration: timedelta | None = None
    ) -> datetime | None:
        """Suspend a customer: their guarded calls raise ``CustomerSuspended`` until it ends.

        Args:
            customer_id: The customer.
            reason: Why (kept in the store and logged).
            duration: How long; ``None`` until :meth:`unsuspend`.

        Returns:
            When the suspension ends, or ``None``.
        """
        flow = suspend(
            validate_customer_id(customer_id), reason=reason, duration=duration, by="api"
        )
        until: datetime | None = drive(flow, self._execute)
        return until

    def unsuspend(self, customer_id: str) -> bool:
        """Lift a customer's suspension. Returns whether one was in force."""
        lifted: bool = drive(unsuspend(validate_customer_id(customer_id), by="api"), self._execute)
        return lifted

    def standing(self, customer_id: str | None = None) -> Standing:
        """A customer's standing now: each quota limit's usage (``used``, ``limit``,
        ``remaining``, ``resets_at``), the suspension in force and the strikes in the current
        window. Only reads: nothing is reserved.

        Args:
            customer_id: The customer; default the bound customer (``for_customer``), else the
                one of the ``customer()`` context.

        Raises:
            CustomerRequired: No customer given, bound or in context.
            StoreError: The store could not be read.
        """
        found: Standing = drive(self._standing_flow(customer_id), self._execute)
        return found

    @override
    def request(
        self,
        cast_to: Any,
        options: FinalRequestOptions,
        *,
        stream: bool = False,
        stream_cls: Any = None,
    ) -> Any:
        path = self._api_path(options.url)
        step = _batch_step(options, path)
        if step is not None:
            return self._batch_request(step, cast_to, options)
        planned = self._begin(options, path)
        call = None
        if planned is not None:
            options, flow = planned
            call = drive(flow, self._execute)
        if call is None:
            return super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        tap: UsageTap | None = None
        if stream and stream_cls is not None:
            tap = UsageTap(
                hide_usage_chunk=call.hide_usage_chunk,
                finisher=lambda outcome, usage, rid, chars: self._finish(
                    call, outcome, usage, rid, chars
                ),
                windows=self._windows(call),
                check=lambda texts, rid: drive(self._output_flow(call, texts, rid), self._execute),
            )
            stream_cls = guarded_stream_cls(stream_cls, is_async=False)
        sending = _Sending(tap)
        token = _sending.set(sending)
        span = telemetry.sending(call, tap)
        try:
            result = super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        except BaseException as exc:
            if sending.built:
                self._finish(call, "error", None, getattr(exc, "request_id", None), 0)
            else:  # refused by the SDK before anything was built: nothing counts
                self._unsent(call)
            raise
        finally:
            _sending.reset(token)
            telemetry.sent(span)
        if tap is not None:
            _end_unread_stream(result, tap)
            windowed_bytes_only(result, tap)
            return result
        if (
            call.output_mode is None
            and isinstance(result, APIResponse)
            and _is_json(result.http_response)
        ):
            # with_streaming_response: the usage is recorded as the caller's read ends (output
            # moderation, when on, reads the answer first: it must be checked before it is seen)
            body_tap = UsageTap(
                hide_usage_chunk=False,
                finisher=lambda outcome, usage, rid, chars: self._finish(
                    call, outcome, usage, rid, chars
                ),
            )
            if meter_body(result.http_response, body_tap, is_async=False):
                return result
        telemetry.response(call, result)
        self._finish(call, "ok", *_usage_of(result), 0)
        if call.output_mode is not None:
            texts, rid = _answer_of(result, _read_answer(result))
            drive(self._output_flow(call, texts, rid), self._execute)
        return result

    def _batch_request(self, step: str, cast_to: Any, options: FinalRequestOptions) -> Any:
        """Upload a checked batch file, or create a batch from one; remember whose it is."""
        from ._batches import BATCH_KEY, check_batch, check_upload, remember, remember_file

        if step == "create":
            options, body = _fold_body(options)
            customer = drive(check_batch(self._safe, body), self._execute)
            result = super().request(cast_to, options)
            drive(remember(BATCH_KEY + _created_id(result), customer), self._execute)
            return result
        content, with_content = _upload(options)
        flow = check_upload(self._safe, bound_customer=self._safe_customer, content=content)
        upload = drive(flow, self._execute)
        result = super().request(cast_to, with_content(upload.content))
        drive(remember_file(self._safe, _created_id(result), upload), self._execute)
        return result

    def record_batch_usage(self, batch: str | openai.types.Batch) -> list[UsageRecord]:
        """Record the usage of a finished batch for the customer whose file it ran.

        Reads the batch's output and error files; records carry ids derived from the batch and
        each request, so calling this again (a retried webhook) stores nothing twice. Costs are
        the price table's at the Batch API's half price.

        Args:
            batch: The batch or its id (from ``batches.create`` on this client or its copies,
                or any SafeClient on the same store).

        Returns:
            The records written, one per request.

        Raises:
            BatchFileError: The batch is not finished, or was not created through safe_openai.
        """
        from ._batches import BATCH_KEY, batch_records, record_batch

        found = self.batches.retrieve(batch) if isinstance(batch, str) else batch
        customer = self._safe.store.customer_for_request(BATCH_KEY + found.id)
        records = batch_records(
            self._safe,
            batch_id=found.id,
            endpoint=found.endpoint,
            customer_id=_batch_customer(found, customer),
            output=self._file_bytes(found.output_file_id),
            errors=self._file_bytes(found.error_file_id),
            created_at=_finished_at(found),
        )
        drive(record_batch(self._safe, records), self._execute)
        return records

    def _file_bytes(self, file_id: str | None) -> bytes:
        return self.files.content(file_id).read() if file_id else b""

    @override
    def _refresh_api_key(self) -> str:
        refuse_foreign_credentials(self._safe, sys._getframe(1))
        return super()._refresh_api_key()

    @override
    def _build_request(
        self, options: FinalRequestOptions, *, retries_taken: int = 0
    ) -> httpx2.Request:
        return _with_tap(super()._build_request(options, retries_taken=retries_taken))

    def _unsent(self, call: Call) -> None:
        try:
            drive(self._unsent_flow(call), self._execute)
        except Exception:
            log.warning("safe_openai.store_unavailable", check="release")

    def _finish(
        self, call: Call, outcome: Outcome, usage: TokenUsage | None, rid: str | None, chars: int
    ) -> None:
        try:
            drive(self._finish_flow(call, outcome, usage, rid, chars), self._execute)
        except Exception:
            # Recording must never break the caller's response; _write already spooled.
            log.exception("safe_openai.usage_record_failed", customer_id=call.customer_id)

    def _execute(self, command: Command) -> Any:
        state = self._safe
        if isinstance(command, StoreCall):
            try:
                return getattr(state.store, command.method)(*command.args, **command.kwargs)
            except SafeOpenAIError:
                raise
            except Exception as exc:  # any driver error: a StoreError with the cause chained
                raise StoreError(f"The usage store failed on {command.method}.") from exc
        if isinstance(command, Moderate):
            with _moderator_errors():
                return list(state.moderator.moderate(list(command.inputs)))
        if isinstance(command, ModerateMany):
            with _moderator_errors():
                return _moderate_many(state.moderator, command.groups)
        if isinstance(command, DrainSpool):
            if state.spool is not None:
                state.spool.drain(
                    state.store,
                    on_violation=lambda v: drive(enforce_strikes(state, v), self._execute),
                )
            return _left_in_spool(state)
        return _run_local(state, command)


class AsyncSafeClient(_Guarded, openai.AsyncOpenAI):
    """A drop-in ``openai.AsyncOpenAI`` that guards every model call for one end customer.

    Takes the same arguments as :class:`SafeClient`; the store must be an async store (or a
    URL) and the moderator may be sync or async.
    """

    def __init__(
        self,
        *,
        policy: Policy | None = None,
        store: AsyncUsageStore | str | None = None,
        identifier_secret: str | bytes | None = None,
        moderator: Any = None,
        prices: PriceTable | None = None,
        spool: LocalSpool | Literal[False] | None = None,
        **openai_kwargs: Any,
    ) -> None:
        state: GuardState | None = openai_kwargs.pop(_STATE_KWARG, None)
        bound: str | None = openai_kwargs.pop(_CUSTOMER_KWARG, None)
        root: bool = openai_kwargs.pop(_ROOT_KWARG, state is None)
        super().__init__(**openai_kwargs)
        if state is None:
            state = _setup_state(
                policy=policy,
                store=store,
                identifier_secret=identifier_secret,
                moderator=moderator,
                prices=prices,
                spool=spool,
                is_async=True,
            )
        if state.moderator is None:
            state.moderator = AsyncOpenAIModerator(self, model=state.moderation_model)
        self._adopt(state, bound, root=root)

    @signed_copy(
        openai.AsyncOpenAI.copy,
        {
            "policy": Policy | None,
            "store": AsyncUsageStore | str | None,
            "identifier_secret": str | bytes | None,
            "moderator": Any,
            "prices": PriceTable | None,
            "spool": LocalSpool | Literal[False] | None,
        },
    )
    def copy(self, **kwargs: Any) -> Self:
        """A copy of this client, as ``openai.AsyncOpenAI.copy``: the SDK's options override this
        client's, and the guard's settings (``policy``, ``store``, ``identifier_secret``,
        ``moderator``, ``prices``, ``spool``) too; everything not given (or ``None``) is kept,
        the bound customer included.
        """
        return self._safe_copy(kwargs)

    # The SDK binds ``with_options`` to its own ``copy``; rebind it or copies lose the guard.
    with_options = copy

    @property
    def store(self) -> AsyncUsageStore:
        """The usage store in use."""
        store: AsyncUsageStore = self._safe.store
        return store

    @cached_property
    @override
    def responses(self) -> GuardedAsyncResponses:
        """The SDK's ``responses``; ``connect()`` opens a guarded WebSocket."""
        from ._connections import GuardedAsyncResponses

        return GuardedAsyncResponses(self)

    @cached_property
    @override
    def beta(self) -> GuardedAsyncBeta:
        """The SDK's ``beta``; ``responses.connect()`` opens a guarded WebSocket."""
        from ._connections import GuardedAsyncBeta

        return GuardedAsyncBeta(self)

    @override
    async def close(self) -> None:
        """Close the HTTP client, and the store if this client opened it from a URL."""
        try:
            await super().close()
        finally:
            if self._safe_root and self._safe.owns_store:
                await self._safe.store.close()

    async def suspend(
        self, customer_id: str, *, reason: str, duration: timedelta | None = None
    ) -> datetime | None:
        """Suspend a customer (see :meth:`SafeClient.suspend`)."""
        flow = suspend(
            validate_customer_id(customer_id), reason=reason, duration=duration, by="api"
        )
        until: datetime | None = await adrive(flow, self._execute)
        return until

    async def unsuspend(self, customer_id: str) -> bool:
        """Lift a customer's suspension. Returns whether one was in force."""
        lifted: bool = await adrive(
            unsuspend(validate_customer_id(customer_id), by="api"), self._execute
        )
        return lifted

    async def standing(self, customer_id: str | None = None) -> Standing:
        """A customer's standing now (see :meth:`SafeClient.standing`)."""
        found: Standing = await adrive(self._standing_flow(customer_id), self._execute)
        return found

    @override
    async def request(
        self,
        cast_to: Any,
        options: FinalRequestOptions,
        *,
        stream: bool = False,
        stream_cls: Any = None,
    ) -> Any:
        path = self._api_path(options.url)
        step = _batch_step(options, path)
        if step is not None:
            return await self._batch_request(step, cast_to, options)
        planned = self._begin(options, path)
        call = None
        if planned is not None:
            options, flow = planned
            call = await adrive(flow, self._execute)
        if call is None:
            return await super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        tap: UsageTap | None = None

        async def finisher(
            outcome: Outcome, usage: TokenUsage | None, rid: str | None, chars: int
        ) -> None:
            await self._finish(call, outcome, usage, rid, chars)

        if stream and stream_cls is not None:

            async def check(texts: list[str], rid: str | None) -> None:
                await adrive(self._output_flow(call, texts, rid), self._execute)

            tap = UsageTap(
                hide_usage_chunk=call.hide_usage_chunk,
                async_finisher=finisher,
                windows=self._windows(call),
                async_check=check,
            )
            stream_cls = guarded_stream_cls(stream_cls, is_async=True)
        sending = _Sending(tap)
        token = _sending.set(sending)
        span = telemetry.sending(call, tap)
        try:
            result = await super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        except BaseException as exc:
            if sending.built:
                await self._finish(call, "error", None, getattr(exc, "request_id", None), 0)
            else:  # refused by the SDK before anything was built, or cancelled: nothing counts
                await self._unsent(call)
            raise
        finally:
            _sending.reset(token)
            telemetry.sent(span)
        if tap is not None:
            _end_unread_stream(result, tap)
            windowed_bytes_only(result, tap)
            return result
        if (
            call.output_mode is None
            and isinstance(result, AsyncAPIResponse)
            and _is_json(result.http_response)
        ):
            # with_streaming_response: the usage is recorded as the caller's read ends (output
            # moderation, when on, reads the answer first: it must be checked before it is seen)
            body_tap = UsageTap(hide_usage_chunk=False, async_finisher=finisher)
            if meter_body(result.http_response, body_tap, is_async=True):
                return result
        telemetry.response(call, result)
        await self._finish(call, "ok", *_usage_of(result), 0)
        if call.output_mode is not None:
            texts, rid = _answer_of(result, await _aread_answer(result))
            await adrive(self._output_flow(call, texts, rid), self._execute)
        return result

    async def _batch_request(self, step: str, cast_to: Any, options: FinalRequestOptions) -> Any:
        """Upload a checked batch file, or create a batch from one (see :class:`SafeClient`)."""
        from ._batches import BATCH_KEY, check_batch, check_upload, remember, remember_file

        if step == "create":
            options, body = _fold_body(options)
            customer = await adrive(check_batch(self._safe, body), self._execute)
            result = await super().request(cast_to, options)
            await adrive(remember(BATCH_KEY + await _acreated_id(result), customer), self._execute)
            return result
        content, with_content = _upload(options)
        flow = check_upload(self._safe, bound_customer=self._safe_customer, content=content)
        upload = await adrive(flow, self._execute)
        result = await super().request(cast_to, with_content(upload.content))
        await adrive(remember_file(self._safe, await _acreated_id(result), upload), self._execute)
        return result

    async def record_batch_usage(self, batch: str | openai.types.Batch) -> list[UsageRecord]:
        """Record the usage of a finished batch (see :meth:`SafeClient.record_batch_usage`)."""
        from ._batches import BATCH_KEY, batch_records, record_batch

        found = await self.batches.retrieve(batch) if isinstance(batch, str) else batch
        customer = await self._safe.store.customer_for_request(BATCH_KEY + found.id)
        records = batch_records(
            self._safe,
            batch_id=found.id,
            endpoint=found.endpoint,
            customer_id=_batch_customer(found, customer),
            output=await self._file_bytes(found.output_file_id),
            errors=await self._file_bytes(found.error_file_id),
            created_at=_finished_at(found),
        )
        await adrive(record_batch(self._safe, records), self._execute)
        return records

    async def _file_bytes(self, file_id: str | None) -> bytes:
        return (await self.files.content(file_id)).read() if file_id else b""

    @override
    async def _refresh_api_key(self) -> str:
        refuse_foreign_credentials(self._safe, sys._getframe(1))
        return await super()._refresh_api_key()

    @override
    def _build_request(
        self, options: FinalRequestOptions, *, retries_taken: int = 0
    ) -> httpx2.Request:
        return _with_tap(super()._build_request(options, retries_taken=retries_taken))

    async def _unsent(self, call: Call) -> None:
        try:
            await adrive(self._unsent_flow(call), self._execute)
        except Exception:
            log.warning("safe_openai.store_unavailable", check="release")

    async def _finish(
        self, call: Call, outcome: Outcome, usage: TokenUsage | None, rid: str | None, chars: int
    ) -> None:
        try:
            await adrive(self._finish_flow(call, outcome, usage, rid, chars), self._execute)
        except Exception:
            log.exception("safe_openai.usage_record_failed", customer_id=call.customer_id)

    async def _together(self, command: Together) -> Any:
        return await _both(
            self._execute(command.store), self._execute(command.moderate), self._safe.store.release
        )

    async def _execute(self, command: Command) -> Any:
        state = self._safe
        if isinstance(command, StoreCall):
            try:
                pending = getattr(state.store, command.method)(*command.args, **command.kwargs)
                if command.undo is None and not command.settles:
                    return await pending
                undo = getattr(state.store, command.undo) if command.undo else None
                return await _settled(pending, undo)
            except SafeOpenAIError:
                raise
            except Exception as exc:  # any driver error: a StoreError with the cause chained
                raise StoreError(f"The usage store failed on {command.method}.") from exc
        if isinstance(command, Together):
            return await self._together(command)
        if isinstance(command, Moderate):
            with _moderator_errors():
                return await _amoderate(state.moderator, command.inputs)
        if isinstance(command, ModerateMany):
            with _moderator_errors():
                limit = asyncio.Semaphore(MODERATION_CONCURRENCY)

                async def one(group: tuple[ModerationInput, ...]) -> list[ModerationResult]:
                    async with limit:
                        return await _amoderate(state.moderator, group)

                return list(await asyncio.gather(*(one(group) for group in command.groups)))
        if isinstance(command, DrainSpool):
            if state.spool is not None:
                await state.spool.adrain(
                    state.store,
                    on_violation=lambda v: adrive(enforce_strikes(state, v), self._execute),
                )
            return _left_in_spool(state)
        return _run_local(state, command)


async def _both(
    store_call: Awaitable[Any], moderation: Awaitable[Any], release: Callable[[Any], Awaitable[Any]]
) -> tuple[tuple[bool, Any], tuple[bool, Any]]:
    """Run a call's store round trip and its moderation at once; each outcome is
    ``(ok, result or exception)``. If the caller is cancelled meanwhile, the moderation is
    dropped and a reservation the store call made (or makes) is released before the
    cancellation goes on."""
    store_task = asyncio.ensure_future(store_call)
    moderation_task = asyncio.ensure_future(moderation)
    try:
        await asyncio.wait((store_task, moderation_task))
    except asyncio.CancelledError:
        moderation_task.cancel()
        made = getattr(await _outlast(store_task), "reservation", None)
        if made is not None and made.admitted:
            await _outlast(asyncio.ensure_future(release(made)))
        raise
    return _outcome(store_task), _outcome(moderation_task)


def _outcome(task: asyncio.Future[Any]) -> tuple[bool, Any]:
    if task.cancelled():
        return False, asyncio.CancelledError()
    error = task.exception()
    return (False, error) if error is not None else (True, task.result())


async def _settled(pending: Awaitable[Any], undo: Callable[[Any], Awaitable[Any]] | None) -> Any:
    """Await a store call that makes or settles a reservation; if the caller is cancelled
    meanwhile, let the call finish (and ``undo`` what it made), then go on with the
    cancellation, so a cancelled call never leaves a reservation behind."""
    task = asyncio.ensure_future(pending)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        made = await _outlast(task)
        made = getattr(made, "reservation", made)  # a begin_call's answer holds it
        if undo is not None and made is not None and getattr(made, "admitted", True):
            await _outlast(asyncio.ensure_future(undo(made)))
        raise


async def _outlast(task: asyncio.Future[Any]) -> Any:
    """The result of ``task``, waiting it out through further cancellations (``None`` if it
    failed); those cancellations are delivered by the caller's re-raise."""
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            continue
        except Exception:
            return None
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _batch_step(options: FinalRequestOptions, path: str) -> str | None:
    """``"upload"`` for a Batch API input file, ``"create"`` for ``batches.create``."""
    if path not in _BATCH_PATHS or options.method.lower() != "post":
        return None
    if path == "/batches":
        return "create"
    return "upload" if _purpose(options) == "batch" else None


_BATCH_PATHS = frozenset({"/files", "/batches"})


def _purpose(options: FinalRequestOptions) -> object:
    """The ``purpose`` field of an upload, ``extra_body`` winning as it does on the wire."""
    extra = options.extra_json if isinstance(options.extra_json, Mapping) else {}
    data = options.json_data if isinstance(options.json_data, Mapping) else {}
    return extra.get("purpose", data.get("purpose"))


def _upload(
    options: FinalRequestOptions,
) -> tuple[bytes, Callable[[bytes], FinalRequestOptions]]:
    """The bytes of an upload's one file, and a function that puts others in their place."""
    files = options.files
    entries = list(files.items()) if isinstance(files, Mapping) else list(files or [])
    if len(entries) != 1:
        raise BatchFileError("A batch upload must carry exactly one file.")
    name, value = entries[0]
    head: tuple[Any, ...] = ()
    tail: tuple[Any, ...] = ()
    content: Any = value
    if isinstance(value, tuple):
        head, content, tail = value[:1], value[1], value[2:]
    if hasattr(content, "read"):
        content = content.read()
    if isinstance(content, str):
        content = content.encode()
    if not isinstance(content, (bytes, bytearray)):
        raise BatchFileError("The batch file's content cannot be read before it is uploaded.")

    def with_content(checked: bytes) -> FinalRequestOptions:
        copy = options.model_copy()
        entry = (*head, checked, *tail) if head else ("batch.jsonl", checked)
        copy.files = [(name, entry)]
        return copy

    return bytes(content), with_content


def _created_id(result: object) -> str:
    """The ``id`` of what a create call returned, parsed or raw."""
    if isinstance(result, (LegacyAPIResponse, APIResponse, AsyncAPIResponse)):
        if isinstance(result, (LegacyAPIResponse, APIResponse)):
            result.http_response.read()
        return str(result.http_response.json().get("id"))
    return str(getattr(result, "id", ""))


async def _acreated_id(result: object) -> str:
    """:func:`_created_id` for the async client (a raw response is read asynchronously)."""
    if isinstance(result, AsyncAPIResponse):
        await result.http_response.aread()
    return _created_id(result)


def _batch_customer(batch: openai.types.Batch, customer: str | None) -> str:
    """The customer a batch's records go to (``""``: checked anonymously)."""
    if customer is None:
        raise BatchFileError(
            f"Batch {batch.id} was not created through safe_openai, so its customer is unknown."
        )
    if batch.output_file_id is None and batch.error_file_id is None:
        raise BatchFileError(f"Batch {batch.id} has no output yet (status {batch.status}).")
    return customer


def _finished_at(batch: openai.types.Batch) -> datetime:
    stamp = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.failed_at
    return datetime.fromtimestamp(stamp, timezone.utc) if stamp else datetime.now(timezone.utc)


def _with_tap(request: httpx2.Request) -> httpx2.Request:
    """Note that the guarded call being sent built a request, and attach the tap of a streamed
    call for the stream built from its response."""
    sending = _sending.get()
    if sending is not None:
        sending.built = True
        if sending.tap is not None:
            request.extensions[TAP_KEY] = sending.tap
    return request


def _end_unread_stream(result: object, tap: UsageTap) -> None:
    """A raw response whose stream is never parsed still records its usage (an estimate)."""
    if not isinstance(result, (openai.Stream, openai.AsyncStream)):
        tap.unread = weakref.finalize(result, tap.end_soon)


def _is_json(response: httpx2.Response) -> bool:
    return "json" in response.headers.get("content-type", "")


_RAW_RESPONSES = (LegacyAPIResponse, APIResponse, AsyncAPIResponse)


def _read_answer(result: object) -> object:
    """The answer whose output is moderated: the parsed object, or a raw response's JSON body
    (read now: output moderation needs it before the caller gets the response)."""
    if not isinstance(result, _RAW_RESPONSES):
        return result
    if not isinstance(result, AsyncAPIResponse):
        result.http_response.read()
    return _json_body(result.http_response)


async def _aread_answer(result: object) -> object:
    """:func:`_read_answer` for the async client."""
    if isinstance(result, AsyncAPIResponse):
        await result.http_response.aread()
    return _read_answer(result)


def _json_body(response: httpx2.Response) -> object:
    if not _is_json(response):
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _answer_of(result: object, answer: object) -> tuple[list[str], str | None]:
    """The output texts of an answer, and its request id."""
    if isinstance(result, _RAW_RESPONSES):
        return answer_texts(answer), result.request_id
    return answer_texts(answer), getattr(result, "_request_id", None)


def _usage_of(result: object) -> tuple[TokenUsage | None, str | None]:
    """Token usage and request id of a non-streamed result, parsed or raw."""
    if isinstance(result, (LegacyAPIResponse, APIResponse, AsyncAPIResponse)):
        return _json_usage(result.http_response), result.request_id
    return token_usage_from_payload(result), getattr(result, "_request_id", None)


def _moderate_many(
    moderator: Any, groups: tuple[tuple[ModerationInput, ...], ...]
) -> list[list[ModerationResult]]:
    """Each group in its own call, up to :data:`MODERATION_CONCURRENCY` at a time (threads)."""

    def one(group: tuple[ModerationInput, ...]) -> list[ModerationResult]:
        return list(moderator.moderate(list(group)))

    if len(groups) <= 1:
        return [one(group) for group in groups]
    with ThreadPoolExecutor(min(MODERATION_CONCURRENCY, len(groups))) as pool:
        return list(pool.map(one, groups))


async def _amoderate(moderator: Any, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
    results = moderator.moderate(list(inputs))
    if inspect.isawaitable(results):
        results = await results
    return list(results)


@contextmanager
def _moderator_errors() -> Iterator[None]:
    """Any moderator failure means moderation is unavailable (the policy then decides)."""
    try:
        yield
    except SafeOpenAIError:
        raise
    except Exception as exc:
        raise ModerationUnavailable("The moderator failed.") from exc


def _left_in_spool(state: GuardState) -> bool:
    return state.spool is not None and bool(state.spool.waiting())


def _run_local(state: GuardState, command: Command) -> None:
    """Commands with no store or network I/O, the same for both clients."""
    if isinstance(command, SpoolViolation):
        state.spool.append_violation(command.violation)  # the guard spools only with a spool
        return
    if not isinstance(command, Spool):
        raise TypeError(f"unknown command {command!r}")
    if state.spool is None:
        log.error("safe_openai.usage_lost", customer_id=command.record.customer_id)
        return
    state.spool.append(command.record, command.reservation_id)


#: Sockets whose query the SDK builds from the base URL, by the module that builds it.
_BASE_URL_SOCKETS = {"openai.lib.realtime_translation": "/realtime/translations"}


def refuse_websocket(state: GuardState, url: str) -> None:
    """Refuse to open a WebSocket the guard does not watch (Realtime, Live, or a Responses
    connection built around the SDK's own ``Responses`` class) unless the policy allows it: a
    drop-in must not open an unguarded socket silently. Every WebSocket the SDK opens builds
    its query first (:meth:`_Guarded._websocket_query_params`); the guarded Responses
    connections say so while they open.
    """
    from ._connections import opening_guarded_socket

    if opening_guarded_socket():
        return
    endpoint = "wss:" + normalize_path(url)
    if not state.policy.allow_unguarded(endpoint):
        raise UnguardedPathError(
            f"WebSocket sessions ({endpoint}) are not moderated by safe_openai yet; allow them "
            "in the policy (Policy.allow_unguarded) if that is intended."
        )
    log.warning("safe_openai.unguarded_websocket_allowed", endpoint=endpoint)


def refuse_foreign_credentials(state: GuardState, caller: FrameType) -> None:
    """Refuse to hand the API key to code outside the SDK that asks for it fresh.

    Libraries that open a WebSocket of their own from a client (openai-agents' Responses
    WebSocket transport, pydantic-ai's realtime models) call ``_refresh_api_key`` just before
    they read the client's auth headers; nothing they send then passes the guard. The SDK's own
    calls (request options, its WebSocket managers) come from its own modules and pass.
    """
    module = str(caller.f_globals.get("__name__", ""))
    if module == "openai" or module.startswith(("openai.", "safe_openai.")):
        return
    if not state.policy.allow_unguarded("wss:credentials"):
        raise UnguardedPathError(
            f"{module or 'Code outside the SDK'} asked for this client's API key to open a "
            "connection of its own, which safe_openai cannot moderate (for openai-agents, keep "
            "the default HTTP transport); allow 'wss:credentials' in the policy if that is "
            "intended."
        )
    log.warning("safe_openai.unguarded_websocket_allowed", endpoint="wss:credentials", by=module)
