"""OpenTelemetry spans and metrics of guarded calls: optional, and free when unused.

Install the API with ``pip install safe-openai[otel]``; the application brings the SDK and its
exporters. With a tracer or meter provider configured (globally, or here with
:func:`configure`), every guarded call gets:

- a span (``chat gpt-4o-mini``, kind ``CLIENT``) from the guard's first step to the end of the
  call (for streams: when the stream ends or is abandoned), current while the SDK sends the
  request, so an HTTP instrumentation's span is its child. Attributes: ``safe_openai.outcome``,
  ``safe_openai.customer_id``, ``safe_openai.endpoint``, the GenAI semantic conventions'
  ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
  ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, and
  ``error.type`` on errors. The guard's log events at info level and above (strikes,
  suspensions, blocks) are events of the span;
- a child span ``safe_openai.moderation`` for the moderation call;
- the metrics ``safe_openai.requests`` (calls, by ``safe_openai.outcome``,
  ``safe_openai.endpoint``, ``gen_ai.request.model``), ``safe_openai.tokens`` (by
  ``gen_ai.token.type``), ``safe_openai.cost`` (USD), and the histograms
  ``safe_openai.guard.duration`` (the guard's own time, store and moderation included) and
  ``safe_openai.moderation.duration`` (seconds).

No prompt or output text is ever put in an attribute. Metrics carry the customer id only when
:func:`configure` asks for it (one time series per customer). Without OpenTelemetry imported by
the application, or without a provider, the cost is a dictionary lookup per call (and, while the
API is imported but no provider is set, one look for a provider a second); anything the
OpenTelemetry SDK, a span processor or an exporter raises is contained, never the caller's
problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Generator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import _log
from ._extract import resolve_endpoint
from ._guard import Moderate, ModerateMany, Together
from .errors import (
    CustomerRequired,
    CustomerSuspended,
    ModerationBlocked,
    ModerationUnavailable,
    OutputBlocked,
    PolicyDenied,
    QuotaExceeded,
    StoreError,
    UnguardedPathError,
)

__all__ = ["configure"]

#: The instrumentation scope of the tracer and the meter.
NAME = "safe_openai"

#: ``gen_ai.operation.name`` by endpoint (others use the endpoint's own name).
_OPERATIONS = {
    "chat.completions": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}

#: ``safe_openai.outcome`` of a call the guard refused, by the error it raised.
_REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (OutputBlocked, "output_blocked"),
    (ModerationBlocked, "blocked"),
    (CustomerSuspended, "suspended"),
    (QuotaExceeded, "quota_exceeded"),
    (PolicyDenied, "denied"),
    (ModerationUnavailable, "moderation_unavailable"),
    (CustomerRequired, "customer_required"),
    (StoreError, "store_unavailable"),
    (UnguardedPathError, "unguarded"),
    (GeneratorExit, "cancelled"),
    (asyncio.CancelledError, "cancelled"),
    (KeyboardInterrupt, "cancelled"),
)
#: Outcomes that are the guard doing its job, not failures (no ERROR status).
_REFUSED = frozenset(
    {"blocked", "output_blocked", "suspended", "quota_exceeded", "denied", "customer_required"}
)


@dataclass(slots=True)
class _Settings:
    tracer_provider: Any = None
    meter_provider: Any = None
    customer_metrics: bool = False


_settings = _Settings()


def configure(
    *, tracer_provider: Any = None, meter_provider: Any = None, customer_metrics: bool = False
) -> None:
    """Choose the providers and the metric attributes of the library's telemetry.

    Not needed with global providers (``opentelemetry.trace.set_tracer_provider`` and
    ``opentelemetry.metrics.set_meter_provider``): they are found on their own. Calling it
    again replaces every setting; ``configure()`` restores the defaults.

    Args:
        tracer_provider: The ``TracerProvider`` for spans (default: the global one).
        meter_provider: The ``MeterProvider`` for metrics (default: the global one).
        customer_metrics: Add ``safe_openai.customer_id`` to the metrics' attributes, one time
            series per customer: only with few customers or a backend that copes.
    """
    global _settings, _active, _next_check
    _settings = _Settings(tracer_provider, meter_provider, customer_metrics)
    _active, _next_check = None, 0.0
    _log.event_hook = None


class _Instruments:
    """The tracer and the metric instruments, made once a provider is found."""

    def __init__(self, tracer_provider: Any, meter_provider: Any) -> None:
        from opentelemetry import metrics, trace

        try:
            release = version("safe-openai")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            release = None
        self.trace = trace
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(NAME, release)
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(NAME, release)
        self.requests = meter.create_counter(
            "safe_openai.requests", unit="{request}", description="Guarded calls, by outcome"
        )
        self.tokens = meter.create_counter(
            "safe_openai.tokens", unit="{token}", description="Tokens used by guarded calls"
        )
        self.cost = meter.create_counter(
            "safe_openai.cost", unit="USD", description="Cost of guarded calls"
        )
        self.overhead = meter.create_histogram(
            "safe_openai.guard.duration",
            unit="s",
            description="Time a guarded call spent in the guard (store and moderation included)",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self.moderation = meter.create_histogram(
            "safe_openai.moderation.duration",
            unit="s",
            description="Moderation calls",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self.client_kind = trace.SpanKind.CLIENT
        self.error_status = trace.Status(trace.StatusCode.ERROR)
        self.customer_metrics = _settings.customer_metrics


#: Histogram buckets (seconds): the guard takes well under a millisecond to a few seconds.
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_active: _Instruments | None = None
_next_check = 0.0
#: How often to look again for a provider while none is configured (seconds).
_RECHECK = 1.0


def _instruments() -> _Instruments | None:
    """The instruments, or ``None`` when no provider is configured (looked for at most once a
    second, and never imported: an application that has a provider has imported the API)."""
    global _active, _next_check
    if _active is not None:
        return _active
    settings = _settings
    if settings.tracer_provider is None and settings.meter_provider is None:
        modules = sys.modules
        if "opentelemetry.trace" not in modules and "opentelemetry.metrics" not in modules:
            return None
        now = time.monotonic()
        if now < _next_check:
            return None
        _next_check = now + _RECHECK
        if not _global_provider_set():
            return None
    try:
        _active = _Instruments(settings.tracer_provider, settings.meter_provider)
    except Exception:
        return None
    _log.event_hook = _on_log_event
    return _active


def _global_provider_set() -> bool:
    """Whether the application set a global tracer or meter provider (not the API's proxies)."""
    names = {
        "ProxyTracerProvider",
        "NoOpTracerProvider",
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
    }
    try:
        trace = sys.modules.get("opentelemetry.trace")
        if trace is not None and type(trace.get_tracer_provider()).__name__ not in names:
            return True
        metrics = sys.modules.get("opentelemetry.metrics")
        return metrics is not None and type(metrics.get_meter_provider()).__name__ not in names
    except Exception:
        return False


# The watch whose flow step is running (for log events that become span events).
_watching: ContextVar[Watch | None] = ContextVar("safe_openai_watch", default=None)


def _on_log_event(level: int, event: str, fields: Mapping[str, Any]) -> None:
    watch = _watching.get()
    if watch is not None and level >= 20:
        with contextlib.suppress(Exception):  # the event is still logged
            watch.span.add_event(event, _attributes(fields))


def _attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Log fields as span attributes (OpenTelemetry takes scalars and lists of them)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (str, bool, int, float)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[key] = tuple(value)
        else:
            out[key] = str(value)
    return out


Flow = Generator[Any, Any, Any]

#: Commands that moderate (a :class:`Together` runs a store call beside its moderation).
_MODERATION = (Moderate, ModerateMany, Together)


def _failed(answer: Any) -> BaseException | None:
    """The moderation error a :class:`Together` answered with, if any: ``(store, moderate)``,
    each ``(ok, value)``."""
    try:
        ok, value = answer[1]
    except Exception:
        return None
    return value if not ok and isinstance(value, BaseException) else None


class Watch:
    """The telemetry of one guarded call: its span, its timings, how it ended."""

    __slots__ = (
        "attrs",
        "customer_id",
        "ended",
        "guard_s",
        "ins",
        "output_blocked",
        "pending",
        "response_model",
        "span",
        "started",
        "tap",
    )

    def __init__(
        self, ins: _Instruments, spec_name: str, path: str, body: Mapping[str, Any]
    ) -> None:
        self.ins = ins
        model = body.get("model")
        operation = _OPERATIONS.get(spec_name, spec_name)
        self.attrs: dict[str, Any] = {
            "safe_openai.endpoint": path,
            "gen_ai.operation.name": operation,
        }
        if isinstance(model, str):
            self.attrs["gen_ai.request.model"] = model
        self.span = ins.tracer.start_span(
            f"{operation} {model}" if isinstance(model, str) else operation,
            kind=ins.client_kind,
            attributes={**self.attrs, "gen_ai.provider.name": "openai"},
        )
        self.customer_id: str | None = None
        self.started = time.perf_counter()
        self.guard_s = 0.0
        self.ended = False
        self.response_model: str | None = None
        self.tap: Any = None
        #: How :meth:`end` is to be called once the output is moderated (calls not streamed).
        self.pending: tuple[str, Any, BaseException | None] | None = None
        self.output_blocked: OutputBlocked | None = None

    def __del__(self) -> None:
        # A call dropped between its record and its output check still ends its span.
        pending = getattr(self, "pending", None)  # None too when __init__ failed part-way
        if pending is not None:
            self.pending = None
            self.end(pending[0], record=pending[1], error=pending[2])

    def step(self, flow: Flow, moderation: tuple[type, ...]) -> Flow:
        """Run ``flow`` with this call's span current in each step; moderation commands get a
        child span current while they run."""
        trace = self.ins.trace
        context = trace.set_span_in_context(self.span)
        value: Any = None
        error: BaseException | None = None
        while True:
            token = _attach(context)
            watching = _watching.set(self)
            try:
                command = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration as stop:
                return stop.value
            finally:
                _watching.reset(watching)
                _detach(token)
            value, error = None, None
            if not isinstance(command, moderation):
                try:
                    value = yield command
                except Exception as exc:
                    error = exc
                continue
            child, child_token, started = self._moderation_start(context)
            try:
                value = yield command
            except Exception as exc:
                error = exc
            finally:
                if error is None and isinstance(command, Together):
                    error = _failed(value)
                self._moderation_end(child, child_token, started, error)

    def _moderation_start(self, context: Any) -> tuple[Any, Any, float]:
        try:
            child = self.ins.tracer.start_span("safe_openai.moderation", context=context)
            token = _attach(self.ins.trace.set_span_in_context(child))
        except Exception:
            child, token = None, None
        return child, token, time.perf_counter()

    def _moderation_end(
        self, child: Any, token: Any, started: float, error: BaseException | None
    ) -> None:
        try:
            _detach(token)
            elapsed = time.perf_counter() - started
            attrs = dict(self.attrs)
            if error is not None:
                attrs["error.type"] = type(error).__qualname__
            self.ins.moderation.record(elapsed, self._metric(attrs))
            if child is not None:
                if error is not None:
                    child.set_attribute("error.type", type(error).__qualname__)
                    child.set_status(self.ins.error_status)
                child.end()
        except Exception:
            pass

    def _metric(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.ins.customer_metrics and self.customer_id is not None:
            attrs["safe_openai.customer_id"] = self.customer_id
        return attrs

    def end(
        self,
        outcome: str,
        *,
        record: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """End the span and count the call (once)."""
        if self.ended:
            return
        self.ended = True
        if self.output_blocked is not None:
            outcome, error = "output_blocked", self.output_blocked
        try:
            span, ins = self.span, self.ins
            span.set_attribute("safe_openai.outcome", outcome)
            attrs = self._metric({**self.attrs, "safe_openai.outcome": outcome})
            if isinstance(error, ModerationBlocked):
                span.set_attribute("safe_openai.categories", tuple(error.categories))
            if error is not None and outcome not in _REFUSED:
                span.set_attribute("error.type", type(error).__qualname__)
                span.set_status(ins.error_status)
            model = self.response_model
            if model is None and self.tap is not None:
                model = getattr(self.tap, "model", None)
            if isinstance(model, str):
                span.set_attribute("gen_ai.response.model", model)
            if record is not None:
                tokens = record.tokens
                span.set_attribute("gen_ai.usage.input_tokens", tokens.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", tokens.output_tokens)
                if record.cost_usd:
                    span.set_attribute("safe_openai.cost_usd", record.cost_usd)
                    ins.cost.add(record.cost_usd, attrs)
                if record.request_id:
                    span.set_attribute("safe_openai.request_id", record.request_id)
                for kind, count in (
                    ("input", tokens.input_tokens),
                    ("output", tokens.output_tokens),
                ):
                    if count:
                        ins.tokens.add(count, {**attrs, "gen_ai.token.type": kind})
            ins.requests.add(1, attrs)
            ins.overhead.record(self.guard_s, attrs)
            span.end()
        except Exception:
            pass


def _attach(context: Any) -> Any:
    """Make ``context`` current; ``None`` (nothing to detach) if OpenTelemetry fails."""
    try:
        from opentelemetry import context as otel_context

        return otel_context.attach(context)
    except Exception:
        return None


def _detach(token: Any) -> None:
    if token is None:
        return
    from opentelemetry import context as otel_context

    with contextlib.suppress(Exception):
        otel_context.detach(token)


def outcome_of(error: BaseException) -> str:
    """``safe_openai.outcome`` of a call that raised ``error``."""
    for kind, outcome in _REFUSALS:
        if isinstance(error, kind):
            return outcome
    return "error"


def watch_begin(
    flow: Flow,
    *,
    path: str,
    body: Mapping[str, Any],
    customer_id: str | None,
) -> Flow:
    """``flow`` (the guard's :func:`~safe_openai._guard.begin`), watched when telemetry is on.

    The watch rides on the returned call (``call.telemetry``); a refused call's span ends here.
    """
    ins = _instruments()
    if ins is None:
        return flow
    spec = resolve_endpoint(path)
    if spec is None:
        return flow
    try:
        watch = Watch(ins, spec.name, path, body)
    except Exception:
        return flow
    watch.customer_id = customer_id
    if customer_id is not None:
        watch.span.set_attribute("safe_openai.customer_id", customer_id)
    return _begin(watch, flow)


def _begin(watch: Watch, flow: Flow) -> Flow:
    try:
        call = yield from watch.step(flow, _MODERATION)
    except BaseException as exc:
        watch.guard_s += time.perf_counter() - watch.started
        error = getattr(exc, "customer_id", None)
        if isinstance(error, str) and watch.customer_id is None:
            watch.customer_id = error
            watch.span.set_attribute("safe_openai.customer_id", error)
        watch.end(outcome_of(exc), error=exc)
        raise
    watch.guard_s += time.perf_counter() - watch.started
    if call is None:
        watch.end("passed")
        return None
    call.telemetry = watch
    try:
        if call.customer_id is not None and watch.customer_id is None:
            watch.customer_id = call.customer_id
            watch.span.set_attribute("safe_openai.customer_id", call.customer_id)
        if call.model is not None:
            watch.attrs["gen_ai.request.model"] = call.model
            watch.span.set_attribute("gen_ai.request.model", call.model)
    except Exception:
        pass
    return call


def sending(call: Any, tap: Any) -> Any:
    """Make the call's span current while the SDK sends it; returns what :func:`sent` takes."""
    watch: Watch | None = call.telemetry
    if watch is None:
        return None
    watch.tap = tap
    try:
        return _attach(watch.ins.trace.set_span_in_context(watch.span))
    except Exception:
        return None


def sent(token: Any) -> None:
    """The SDK returned (or raised): the call's span is no longer current."""
    if token is not None:
        _detach(token)


def response(call: Any, result: Any) -> None:
    """Note the model that answered a call that was not streamed."""
    watch: Watch | None = call.telemetry
    if watch is None:
        return
    try:
        model = getattr(result, "model", None)
        if model is None and hasattr(result, "http_response"):
            payload = result.http_response.json()
            model = payload.get("model") if isinstance(payload, dict) else None
        watch.response_model = model if isinstance(model, str) else None
    except Exception:
        pass


def watch_finish(flow: Flow, call: Any, outcome: str, error: BaseException | None) -> Flow:
    """``flow`` (the guard's :func:`~safe_openai._guard.finish`), ending the call's span with
    the record it wrote; for a call not streamed whose output is moderated next, the span ends
    after that check (:func:`watch_output`)."""
    watch: Watch | None = call.telemetry
    if watch is None or watch.ended:
        return flow
    defer = outcome == "ok" and watch.tap is None and call.output_mode is not None
    return _finish(watch, flow, outcome, error, defer)


def _finish(
    watch: Watch, flow: Flow, outcome: str, error: BaseException | None, defer: bool
) -> Flow:
    started = time.perf_counter()
    record = None
    try:
        record = yield from watch.step(flow, ())
    finally:
        watch.guard_s += time.perf_counter() - started
        final = getattr(record, "outcome", outcome)
        failure = None if final in ("ok", "estimated") else error
        if defer:
            watch.pending = (final, record, failure)
        else:
            watch.end(final, record=record, error=failure)
    return record


def watch_output(flow: Flow, call: Any) -> Flow:
    """``flow`` (the guard's output check), with its moderation span; a block makes the call's
    outcome ``output_blocked``."""
    watch: Watch | None = call.telemetry
    if watch is None or watch.ended:
        return flow
    return _output(watch, flow)


def _output(watch: Watch, flow: Flow) -> Flow:
    started = time.perf_counter()
    try:
        yield from watch.step(flow, _MODERATION)
    except OutputBlocked as exc:
        watch.output_blocked = exc
        raise
    finally:
        watch.guard_s += time.perf_counter() - started
        pending, watch.pending = watch.pending, None
        if pending is not None:
            watch.end(pending[0], record=pending[1], error=pending[2])
