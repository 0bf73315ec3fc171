"""SafeClient and AsyncSafeClient: thin shells over the SDK's choke points.

Every SDK call passes ``request()`` once per logical call (plain, streamed, raw, streaming
response, ``parse`` helpers, ``with_options`` copies); the guard runs there, before the SDK's
own retry loop, so it runs once however often the SDK retries. The decisions live in
:mod:`safe_openai._guard`; here they are only carried out.
"""

from __future__ import annotations

import hashlib
import inspect
import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import openai
import structlog
from openai._legacy_response import LegacyAPIResponse
from openai._models import FinalRequestOptions
from openai._response import APIResponse, AsyncAPIResponse
from typing_extensions import Self, override

from ._extract import body_from_content, is_guarded, normalize_path
from ._guard import (
    Call,
    Command,
    DrainSpool,
    GuardState,
    Moderate,
    Spool,
    StoreCall,
    adrive,
    begin,
    drive,
    finish,
    suspend,
    unsuspend,
)
from ._identity import resolve_secret, validate_customer_id
from ._moderation import AsyncOpenAIModerator, OpenAIModerator, VerdictCache
from ._streams import TAP_KEY, UsageTap, guarded_stream_cls
from .errors import (
    ConfigurationError,
    ModerationUnavailable,
    SafeOpenAIError,
    StoreError,
    UnguardedPathError,
)
from .policy import DefaultPolicy, Policy
from .stores import Spool as LocalSpool
from .stores import async_store_from_url, default_store_url, store_from_url
from .stores._spool import default_spool_dir
from .usage import Outcome, PriceTable, TokenUsage, token_usage_from_payload

if TYPE_CHECKING:
    from .stores import AsyncUsageStore, UsageStore

__all__ = ["AsyncSafeClient", "SafeClient"]

log = structlog.get_logger("safe_openai")

# The tap of the streamed call being sent, picked up by _build_request (same thread or task).
_active_tap: ContextVar[UsageTap | None] = ContextVar("safe_openai_tap", default=None)

_STATE_KWARG = "_safe_state"
_CUSTOMER_KWARG = "_safe_customer"


def _is_async_store(store: object) -> bool:
    return inspect.iscoroutinefunction(getattr(store, "reserve", None))


def _fold_body(options: FinalRequestOptions) -> tuple[FinalRequestOptions, dict[str, Any]]:
    """A copy of ``options`` whose JSON body has ``extra_body`` folded in (it wins, as in the
    SDK), so moderation sees exactly what will be sent.
    """
    options = options.model_copy()
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
    options.json_data = body
    return options, body


def _json_usage(response: httpx2.Response) -> TokenUsage | None:
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        return token_usage_from_payload(response.json())
    except ValueError:
        return None


def _setup_state(
    *,
    policy: Policy | None,
    store: Any,
    identifier_secret: str | bytes | None,
    moderator: Any,
    prices: PriceTable | None,
    spool: Any,
    is_async: bool,
) -> GuardState:
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
    elif _is_async_store(store) != is_async:
        kind = "an async" if is_async else "a sync"
        raise ConfigurationError(f"This client needs {kind} usage store.")
    else:
        url = f"{type(store).__module__}.{type(store).__qualname__}:{getattr(store, 'url', '')}"
    if spool is None:
        # One spool directory per store, so a drain never writes one store's records into
        # another's when several applications share a machine.
        spool = LocalSpool(default_spool_dir() / hashlib.sha256(url.encode()).hexdigest()[:16])
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
        spool_dirty=spool is not None and _spool_waiting(spool),
        owns_store=owns_store,
    )


def _spool_waiting(spool: Any) -> bool:
    """Whether a spool holds files to write back (a directory listing; no file is read)."""
    directory = getattr(spool, "directory", None)
    if not isinstance(directory, Path):
        return len(spool) > 0
    try:
        return any(p.suffix in (".jsonl", ".draining") for p in directory.iterdir())
    except OSError:
        return False


class SafeClient(openai.OpenAI):
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

    _safe: GuardState
    _safe_customer: str | None

    def __init__(
        self,
        *,
        policy: Policy | None = None,
        store: UsageStore | str | None = None,
        identifier_secret: str | bytes | None = None,
        moderator: Any = None,
        prices: PriceTable | None = None,
        spool: Any = None,
        **openai_kwargs: Any,
    ) -> None:
        state: GuardState | None = openai_kwargs.pop(_STATE_KWARG, None)
        bound: str | None = openai_kwargs.pop(_CUSTOMER_KWARG, None)
        root = state is None  # copies share the root's state and never close its store
        super().__init__(**openai_kwargs)
        if state is None:
            if moderator is not None and inspect.iscoroutinefunction(
                getattr(moderator, "moderate", None)
            ):
                raise ConfigurationError("SafeClient needs a sync moderator.")
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
        self._safe = state
        self._safe_customer = bound
        self._safe_root = root

    @override
    def close(self) -> None:
        """Close the HTTP client, and the store if this client opened it from a URL."""
        try:
            super().close()
        finally:
            if self._safe_root and self._safe.owns_store:
                self._safe.store.close()

    @property
    def store(self) -> UsageStore:
        """The usage store in use."""
        store: UsageStore = self._safe.store
        return store

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._safe.policy

    @property
    def customer_id(self) -> str | None:
        """The customer this client is bound to, if any."""
        return self._safe_customer

    def for_customer(self, customer_id: str) -> Self:
        """A client bound to one end customer, sharing this client's connections and state."""
        return self.copy(_extra_kwargs={_CUSTOMER_KWARG: validate_customer_id(customer_id)})

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
        until: datetime | None = drive(
            suspend(validate_customer_id(customer_id), reason=reason, duration=duration, by="api"),
            self._execute,
        )
        return until

    def unsuspend(self, customer_id: str) -> bool:
        """Lift a customer's suspension. Returns whether one was in force."""
        lifted: bool = drive(unsuspend(customer_id, by="api"), self._execute)
        return lifted

    @override
    def copy(self, **kwargs: Any) -> Self:
        """``openai.OpenAI.copy`` that keeps the guard, the store and the bound customer."""
        extra = dict(kwargs.pop("_extra_kwargs", None) or {})
        extra[_STATE_KWARG] = self._safe
        extra.setdefault(_CUSTOMER_KWARG, self._safe_customer)
        return super().copy(_extra_kwargs=extra, **kwargs)

    with_options = copy

    @override
    def request(
        self,
        cast_to: Any,
        options: FinalRequestOptions,
        *,
        stream: bool = False,
        stream_cls: Any = None,
    ) -> Any:
        path = normalize_path(options.url)
        if not is_guarded(options.method, path):
            return super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        options, body = _fold_body(options)
        call = drive(
            begin(self._safe, bound_customer=self._safe_customer, path=path, body=body),
            self._execute,
        )
        if call is None:
            return super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        tap: UsageTap | None = None
        if stream and stream_cls is not None:
            tap = UsageTap(
                hide_usage_chunk=call.hide_usage_chunk,
                finisher=lambda outcome, usage, rid, chars: self._finish(
                    call, outcome, usage, rid, chars
                ),
            )
            stream_cls = guarded_stream_cls(stream_cls, is_async=False)
        token = _active_tap.set(tap)
        try:
            result = super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        except BaseException as exc:
            self._finish(call, "error", None, getattr(exc, "request_id", None), 0)
            raise
        finally:
            _active_tap.reset(token)
        if tap is not None:
            if not isinstance(result, openai.Stream):
                weakref.finalize(result, tap.end_soon)
            return result
        if isinstance(result, LegacyAPIResponse):
            usage, request_id = _json_usage(result.http_response), result.request_id
        elif isinstance(result, APIResponse):
            if "json" in result.http_response.headers.get("content-type", ""):
                result.http_response.read()
            usage, request_id = _json_usage(result.http_response), result.request_id
        else:
            usage = token_usage_from_payload(result)
            request_id = getattr(result, "_request_id", None)
        self._finish(call, "ok", usage, request_id, 0)
        return result

    @override
    def _build_request(
        self, options: FinalRequestOptions, *, retries_taken: int = 0
    ) -> httpx2.Request:
        request = super()._build_request(options, retries_taken=retries_taken)
        tap = _active_tap.get()
        if tap is not None:
            request.extensions[TAP_KEY] = tap
        return request

    def _finish(
        self,
        call: Call,
        outcome: Outcome,
        usage: TokenUsage | None,
        request_id: str | None,
        output_chars: int,
    ) -> None:
        try:
            drive(
                finish(
                    self._safe,
                    call,
                    outcome=outcome,
                    usage=usage,
                    request_id=request_id,
                    output_chars=output_chars,
                ),
                self._execute,
            )
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
            except Exception as exc:
                raise StoreError(f"The usage store failed on {command.method}.") from exc
        if isinstance(command, Moderate):
            try:
                results = state.moderator.moderate(list(command.inputs))
            except SafeOpenAIError:
                raise
            except Exception as exc:
                raise ModerationUnavailable("The moderator failed.") from exc
            return list(results)
        if isinstance(command, Spool):
            _spool(state, command)
            return None
        if isinstance(command, DrainSpool):
            if state.spool is None:
                return 0
            state.spool.drain(state.store)
            return int(_spool_waiting(state.spool))
        raise TypeError(f"unknown command {command!r}")


class AsyncSafeClient(openai.AsyncOpenAI):
    """A drop-in ``openai.AsyncOpenAI`` that guards every model call for one end customer.

    Takes the same arguments as :class:`SafeClient`; the store must be an async store (or a
    URL) and the moderator may be sync or async.
    """

    _safe: GuardState
    _safe_customer: str | None

    def __init__(
        self,
        *,
        policy: Policy | None = None,
        store: AsyncUsageStore | str | None = None,
        identifier_secret: str | bytes | None = None,
        moderator: Any = None,
        prices: PriceTable | None = None,
        spool: Any = None,
        **openai_kwargs: Any,
    ) -> None:
        state: GuardState | None = openai_kwargs.pop(_STATE_KWARG, None)
        bound: str | None = openai_kwargs.pop(_CUSTOMER_KWARG, None)
        root = state is None  # copies share the root's state and never close its store
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
        self._safe = state
        self._safe_customer = bound
        self._safe_root = root

    @override
    async def close(self) -> None:
        """Close the HTTP client, and the store if this client opened it from a URL."""
        try:
            await super().close()
        finally:
            if self._safe_root and self._safe.owns_store:
                await self._safe.store.close()

    @property
    def store(self) -> AsyncUsageStore:
        """The usage store in use."""
        store: AsyncUsageStore = self._safe.store
        return store

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._safe.policy

    @property
    def customer_id(self) -> str | None:
        """The customer this client is bound to, if any."""
        return self._safe_customer

    def for_customer(self, customer_id: str) -> Self:
        """A client bound to one end customer, sharing this client's connections and state."""
        return self.copy(_extra_kwargs={_CUSTOMER_KWARG: validate_customer_id(customer_id)})

    async def suspend(
        self, customer_id: str, *, reason: str, duration: timedelta | None = None
    ) -> datetime | None:
        """Suspend a customer (see :meth:`SafeClient.suspend`)."""
        until: datetime | None = await adrive(
            suspend(validate_customer_id(customer_id), reason=reason, duration=duration, by="api"),
            self._execute,
        )
        return until

    async def unsuspend(self, customer_id: str) -> bool:
        """Lift a customer's suspension. Returns whether one was in force."""
        lifted: bool = await adrive(unsuspend(customer_id, by="api"), self._execute)
        return lifted

    @override
    def copy(self, **kwargs: Any) -> Self:
        """``openai.AsyncOpenAI.copy`` that keeps the guard, the store and the bound customer."""
        extra = dict(kwargs.pop("_extra_kwargs", None) or {})
        extra[_STATE_KWARG] = self._safe
        extra.setdefault(_CUSTOMER_KWARG, self._safe_customer)
        return super().copy(_extra_kwargs=extra, **kwargs)

    with_options = copy

    @override
    async def request(
        self,
        cast_to: Any,
        options: FinalRequestOptions,
        *,
        stream: bool = False,
        stream_cls: Any = None,
    ) -> Any:
        path = normalize_path(options.url)
        if not is_guarded(options.method, path):
            return await super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        options, body = _fold_body(options)
        call = await adrive(
            begin(self._safe, bound_customer=self._safe_customer, path=path, body=body),
            self._execute,
        )
        if call is None:
            return await super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        tap: UsageTap | None = None
        if stream and stream_cls is not None:

            async def finisher(
                outcome: Outcome, usage: TokenUsage | None, rid: str | None, chars: int
            ) -> None:
                await self._finish(call, outcome, usage, rid, chars)

            tap = UsageTap(hide_usage_chunk=call.hide_usage_chunk, async_finisher=finisher)
            stream_cls = guarded_stream_cls(stream_cls, is_async=True)
        token = _active_tap.set(tap)
        try:
            result = await super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        except BaseException as exc:
            await self._finish(call, "error", None, getattr(exc, "request_id", None), 0)
            raise
        finally:
            _active_tap.reset(token)
        if tap is not None:
            if not isinstance(result, openai.AsyncStream):
                weakref.finalize(result, tap.end_soon)
            return result
        if isinstance(result, LegacyAPIResponse):
            usage, request_id = _json_usage(result.http_response), result.request_id
        elif isinstance(result, AsyncAPIResponse):
            if "json" in result.http_response.headers.get("content-type", ""):
                await result.http_response.aread()
            usage, request_id = _json_usage(result.http_response), result.request_id
        else:
            usage = token_usage_from_payload(result)
            request_id = getattr(result, "_request_id", None)
        await self._finish(call, "ok", usage, request_id, 0)
        return result

    @override
    def _build_request(
        self, options: FinalRequestOptions, *, retries_taken: int = 0
    ) -> httpx2.Request:
        request = super()._build_request(options, retries_taken=retries_taken)
        tap = _active_tap.get()
        if tap is not None:
            request.extensions[TAP_KEY] = tap
        return request

    async def _finish(
        self,
        call: Call,
        outcome: Outcome,
        usage: TokenUsage | None,
        request_id: str | None,
        output_chars: int,
    ) -> None:
        try:
            await adrive(
                finish(
                    self._safe,
                    call,
                    outcome=outcome,
                    usage=usage,
                    request_id=request_id,
                    output_chars=output_chars,
                ),
                self._execute,
            )
        except Exception:
            log.exception("safe_openai.usage_record_failed", customer_id=call.customer_id)

    async def _execute(self, command: Command) -> Any:
        state = self._safe
        if isinstance(command, StoreCall):
            try:
                return await getattr(state.store, command.method)(*command.args, **command.kwargs)
            except SafeOpenAIError:
                raise
            except Exception as exc:
                raise StoreError(f"The usage store failed on {command.method}.") from exc
        if isinstance(command, Moderate):
            try:
                results = state.moderator.moderate(list(command.inputs))
                if inspect.isawaitable(results):
                    results = await results
            except SafeOpenAIError:
                raise
            except Exception as exc:
                raise ModerationUnavailable("The moderator failed.") from exc
            return list(results)
        if isinstance(command, Spool):
            _spool(state, command)
            return None
        if isinstance(command, DrainSpool):
            if state.spool is None:
                return 0
            await state.spool.adrain(state.store)
            return int(_spool_waiting(state.spool))
        raise TypeError(f"unknown command {command!r}")


def _spool(state: GuardState, command: Spool) -> None:
    if state.spool is None:
        log.error("safe_openai.usage_lost", customer_id=command.record.customer_id)
        return
    state.spool.append(command.record, command.reservation_id)
