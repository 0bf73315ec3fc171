"""The policy: the rules a SaaS company owns and publishes to its customers.

Subclass :class:`Policy` and override only the hooks you need, or configure
:class:`DefaultPolicy` with plain settings. Every hook is plain code with no I/O: the client calls
them while deciding a request, so they must be fast and must not block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from ._log import get_logger
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .alerts import Alert, AlertSink

__all__ = [
    "OUTPUT_MODES",
    "Decision",
    "DefaultPolicy",
    "GuardedRequest",
    "ModerationResult",
    "Policy",
    "Quota",
    "SafetyAction",
    "Verdict",
    "soft_thresholds",
]

log = get_logger()


@dataclass(frozen=True, slots=True)
class Quota:
    """Usage limits of one customer. ``None`` means unlimited.

    Per-minute limits are sliding windows over the last 60 seconds; ``tokens_per_day`` and
    ``usd_per_month`` follow calendar days and months in UTC.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    usd_per_month: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "usd_per_month"):
            value = getattr(self, name)
            if value is None:
                continue
            number = (int, float) if name == "usd_per_month" else (int,)
            if (
                isinstance(value, bool)
                or not isinstance(value, number)
                or not math.isfinite(value)  # nan would mean unlimited, inf is no limit
                or value < 0
            ):
                raise ConfigurationError(
                    f"Quota.{name} must be a finite number >= 0 (None for no limit), got {value!r}"
                )

    @property
    def limits_tokens(self) -> bool:
        """Whether any limit needs a token or cost reservation."""
        return (
            self.tokens_per_minute is not None
            or self.tokens_per_day is not None
            or self.usd_per_month is not None
        )

    @property
    def is_unlimited(self) -> bool:
        """Whether no limit is set at all."""
        return self.requests_per_minute is None and not self.limits_tokens


@dataclass(frozen=True, slots=True)
class GuardedRequest:
    """What a policy sees of a request before it is moderated.

    Attributes:
        customer_id: The end customer, or ``None`` for an anonymous call.
        endpoint: The API path, e.g. ``"/chat/completions"``.
        model: The requested model, when the endpoint takes one.
        body: The JSON body as it would be sent (``extra_body`` already folded in). Read only.
    """

    customer_id: str | None
    endpoint: str
    model: str | None
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer to a request: allow it as is, adjust it, or deny it.

    Build one with :meth:`allow`, :meth:`adjust` or :meth:`deny`.

    Attributes:
        allowed: Whether the request may proceed.
        reason: Why it was denied (for logs and the error; not shown to end customers).
        user_message: A sentence safe to show the end customer when denied.
        max_output_tokens: Cap on the output tokens the request may ask for.
        system_instruction: An extra system instruction placed before the conversation.
        model: A model to use instead of the requested one.
    """

    allowed: bool = True
    reason: str = ""
    user_message: str | None = None
    max_output_tokens: int | None = None
    system_instruction: str | None = None
    model: str | None = None

    @classmethod
    def allow(cls) -> Decision:
        """Let the request through unchanged."""
        return _ALLOW

    @classmethod
    def adjust(
        cls,
        *,
        max_output_tokens: int | None = None,
        system_instruction: str | None = None,
        model: str | None = None,
    ) -> Decision:
        """Let the request through with changes."""
        return cls(
            max_output_tokens=max_output_tokens, system_instruction=system_instruction, model=model
        )

    @classmethod
    def deny(cls, reason: str, *, user_message: str | None = None) -> Decision:
        """Refuse the request; nothing is sent."""
        return cls(allowed=False, reason=reason, user_message=user_message)

    @property
    def changes_request(self) -> bool:
        """Whether applying this decision modifies the request body."""
        return (
            self.max_output_tokens is not None
            or self.system_instruction is not None
            or self.model is not None
        )


_ALLOW = Decision()

#: The categories of ``omni-moderation-latest``, in the SDK's order.
MODERATION_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

#: Roles a policy may name in ``moderate_roles``.
KNOWN_ROLES = frozenset({"user", "tool", "assistant", "system", "developer"})

#: What a policy may do with a call's output: nothing (``None``), ``"record"`` a violation and
#: return the output, or ``"block"`` flagged output (see :meth:`Policy.output_moderation_for`).
OUTPUT_MODES: tuple[str | None, ...] = (None, "record", "block")

#: What a policy does about an OpenAI safety event.
SafetyAction = Literal["strike", "suspend", "ignore"]


@dataclass(frozen=True, slots=True)
class ModerationResult:
    """The moderation endpoint's answer for one piece of content.

    Attributes:
        flagged: The endpoint's own overall verdict.
        categories: Category name -> whether the endpoint flagged it.
        scores: Category name -> score between 0 and 1.
    """

    flagged: bool
    categories: Mapping[str, bool]
    scores: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A policy's judgement of the moderation results of one request.

    Attributes:
        blocked: Whether the request must not be sent.
        categories: The categories that blocked it, most severe first.
        scores: The highest score per category over every piece of the request.
    """

    blocked: bool
    categories: tuple[str, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)

    @property
    def top_score(self) -> float:
        """The highest score among the blocking categories (0 when none)."""
        return max((self.scores.get(c, 0.0) for c in self.categories), default=0.0)


class Policy:
    """The base policy: safe defaults, every hook overridable.

    The defaults: a customer is required, user and tool content is moderated, a category blocks
    when the endpoint flags it, moderation outages fail closed, three violations within 24 hours
    suspend a customer until lifted, and there is no quota.
    """

    #: Roles whose content is untrusted and therefore moderated. Responses ``input`` strings
    #: and ``prompt`` variables count as ``"user"``; tool and function outputs as ``"tool"``.
    moderate_roles: tuple[str, ...] = ("user", "tool")
    #: Proceed (and log a warning) when moderation or the store cannot be reached.
    fail_open: bool = False
    #: Refuse guarded calls that have no end customer.
    require_customer: bool = True
    #: Violations within :attr:`strike_window` that suspend a customer.
    strike_limit: int | None = 3
    strike_window: timedelta = timedelta(hours=24)
    #: How long a strike suspension lasts; ``None`` until lifted.
    suspension: timedelta | None = None
    #: Roles whose blocked content is a strike against the customer. Content of other
    #: moderated roles (a tool's output, a fetched page) is blocked all the same and recorded
    #: as a violation that is not a strike: the customer did not write it.
    strike_roles: tuple[str, ...] = ("user",)
    #: The same blocked content from the same customer within this span is one strike, not
    #: several: retries by a client or a framework (langchain's ``with_retry``) are not repeat
    #: offences. Kept per client process.
    repeat_strike_window: timedelta = timedelta(minutes=10)
    #: The moderation model.
    moderation_model: str = "omni-moderation-latest"
    #: What to do with the model's output on chat completions, Responses and completions:
    #: ``None`` (not moderated), ``"record"`` (returned; a flag is recorded as a violation) or
    #: ``"block"`` (flagged output never reaches the caller: ``OutputBlocked``).
    output_moderation: Literal["record", "block"] | None = None
    #: Whether flagged output is a strike against the customer (counted towards
    #: :attr:`strike_limit`). Either way it is recorded as a violation (``source="output"``),
    #: with :attr:`Violation.strike <safe_openai.stores.Violation.strike>` saying which.
    output_strikes: bool = True
    #: A streamed answer under ``"block"`` is held back in windows moderated before they are
    #: released: a window closes at this many characters of one output...
    output_window_chars: int = 200
    #: ...or at this many sentence ends in it (``None``: characters only), or when the output
    #: or the stream ends.
    output_window_sentences: int | None = 2
    #: Warning thresholds below the quota: a fraction of every limit (``0.8``: at 80 %), or
    #: fractions by limit name (``{"tokens_per_day": 0.8, "usd_per_month": 0.5}``; limits not
    #: named have none). Each within (0, 1]. The first call in a window that settles with a
    #: limit at or above its threshold raises a ``"soft_limit"``
    #: :class:`~safe_openai.alerts.Alert` (once per window, however many calls follow).
    soft_limits: float | Mapping[str, float] | None = None
    #: Where :meth:`on_alert` hands alerts by default (callables taking an ``Alert``, such as
    #: :class:`~safe_openai.alerts.WebhookAlertSink`).
    alert_sinks: tuple[AlertSink, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "soft_limits" in vars(cls):
            soft_thresholds(cls.soft_limits)  # a bad class setting fails at import, not later

    def on_alert(self, alert: Alert) -> None:
        """Receive an alert: a soft limit crossed, a quota refusal, a strike, a suspension or
        an OpenAI safety event traced to a customer (see :mod:`safe_openai.alerts`).

        Called once per event across every process sharing the store, inside the guarded call
        (or webhook delivery) that caused it, so it must not block: hand the alert to a queue.
        Whatever it raises is logged and never reaches the call. The default hands the alert
        to each of :attr:`alert_sinks`; one that raises does not keep it from the others.
        """
        for sink in self.alert_sinks:
            try:
                sink(alert)
            except Exception:
                log.exception(
                    "safe_openai.alert_sink_failed",
                    alert_id=alert.id,
                    kind=alert.kind,
                    customer_id=alert.customer_id,
                )

    def quota_for(self, customer_id: str) -> Quota | None:
        """Return the customer's quota (override for tiers). ``None`` means unlimited."""
        return None

    def review_request(self, request: GuardedRequest) -> Decision:
        """Review a request before moderation: allow, adjust or deny it."""
        return Decision.allow()

    def judge(self, request: GuardedRequest, results: Sequence[ModerationResult]) -> Verdict:
        """Judge the moderation results of one request.

        The default blocks on every category the endpoint flagged.
        """
        return judge_by_thresholds(results, {})

    def output_moderation_for(self, request: GuardedRequest) -> Literal["record", "block"] | None:
        """Whether and how to moderate the output of this request (override per customer, model
        or endpoint, e.g. ``"block"`` for a free tier only). The default:
        :attr:`output_moderation`. Called only for chat completions, Responses and completions.
        """
        return self.output_moderation

    def judge_output(self, request: GuardedRequest, results: Sequence[ModerationResult]) -> Verdict:
        """Judge the moderation results of a call's output. The default judges it as
        :meth:`judge` judges requests."""
        return self.judge(request, results)

    def action_for_safety_event(self, event_type: str) -> SafetyAction:
        """What to do when OpenAI reports enforcement against one of your customers.

        ``"strike"`` records a violation (which suspends at the strike limit), ``"suspend"``
        suspends the customer at once, ``"ignore"`` only logs it. The default: a blocked
        identifier or a warning is a strike; a deactivation suspends.
        """
        if event_type == "safety.deactivation_issued":
            return "suspend"
        if event_type in ("safety_identifier.blocked", "safety.warning_issued"):
            return "strike"
        return "ignore"

    def allow_unguarded(self, endpoint: str) -> bool:
        """Whether to let through a path that sends content the guard cannot inspect.

        ``endpoint`` is an HTTP path (``"/realtime/client_secrets"``, ``"/agents/sessions"``,
        ``"/evals/..."``) or a WebSocket one prefixed ``"wss:"`` (``"wss:/responses"`` for
        ``responses.connect``, ``"wss:/realtime"``). The default refuses them all with
        :class:`~safe_openai.errors.UnguardedPathError`.
        """
        return False

    def allow_unmoderatable(self, request: GuardedRequest, kinds: Sequence[str]) -> bool:
        """Decide whether content that cannot be moderated may be sent.

        ``kinds`` names what could not be moderated (``"audio"``, ``"file"``, ``"token_ids"``,
        ``"image_file"``). The default allows it; the client logs it once per call.
        """
        return True


class DefaultPolicy(Policy):
    """A policy configured with plain settings.

    Args:
        thresholds: Category name (``"violence"``, ``"harassment/threatening"``) -> score at or
            above which the category blocks. Categories without a threshold block when the
            endpoint flags them.
        moderate_roles: Roles whose content is moderated.
        fail_open: Proceed when moderation or the store is unreachable (logged as a warning).
        require_customer: Refuse guarded calls without an end customer.
        quota: The same quota for every customer.
        strike_limit: Violations within ``strike_window`` that suspend a customer (``None``:
            never suspend automatically).
        strike_window: The window strikes are counted over.
        suspension: How long a strike suspension lasts; ``None`` until lifted.
        allowed_models: When given, requests for any other model are denied.
        max_output_tokens: Cap on the output tokens a request may ask for.
        system_instruction: An instruction placed before every chat or Responses request, to
            keep the model inside the customer's domain.
        output_moderation: ``None`` (the default: output is not moderated), ``"record"`` or
            ``"block"`` (see :attr:`Policy.output_moderation`).
        output_strikes: Whether flagged output is a strike; it is recorded as a violation
            either way.
        output_window_chars: Characters of streamed output held back per window (``"block"``).
        output_window_sentences: Sentence ends that close a window sooner (``None``: never).
        soft_limits: Warning thresholds: a fraction of each quota limit, or fractions by limit
            name (see :attr:`Policy.soft_limits`).
        alerts: A sink (a callable taking an :class:`~safe_openai.alerts.Alert`, such as
            :class:`~safe_openai.alerts.WebhookAlertSink`) or a sequence of sinks that
            :meth:`Policy.on_alert` hands every alert to.

    Raises:
        ConfigurationError: A setting is out of range, or a threshold names a category that is
            not in :attr:`categories` (a misspelled category would never block).
    """

    #: The categories ``thresholds`` may name: the moderation endpoint's. A subclass used with
    #: a custom moderator that reports other categories sets its own.
    categories: frozenset[str] = frozenset(MODERATION_CATEGORIES)

    def __init__(
        self,
        *,
        thresholds: Mapping[str, float] | None = None,
        moderate_roles: Sequence[str] = ("user", "tool"),
        fail_open: bool = False,
        require_customer: bool = True,
        quota: Quota | None = None,
        strike_limit: int | None = 3,
        strike_window: timedelta = timedelta(hours=24),
        suspension: timedelta | None = None,
        allowed_models: Sequence[str] | None = None,
        max_output_tokens: int | None = None,
        system_instruction: str | None = None,
        output_moderation: Literal["record", "block"] | None = None,
        output_strikes: bool = True,
        output_window_chars: int = 200,
        output_window_sentences: int | None = 2,
        soft_limits: float | Mapping[str, float] | None = None,
        alerts: AlertSink | Sequence[AlertSink] | None = None,
    ) -> None:
        check_output_settings(output_moderation, output_window_chars, output_window_sentences)
        soft_thresholds(soft_limits)
        self.alert_sinks = _as_sinks(alerts)
        self.soft_limits = dict(soft_limits) if isinstance(soft_limits, Mapping) else soft_limits
        for category, limit in (thresholds or {}).items():
            if (
                isinstance(limit, bool)
                or not isinstance(limit, (int, float))
                or not 0 <= limit <= 1
            ):
                raise ConfigurationError(
                    f"threshold for {category!r} must be a number within [0, 1], got {limit!r}"
                )
            if category not in self.categories:
                raise ConfigurationError(
                    f"threshold for unknown category {category!r}: the categories are "
                    f"{', '.join(sorted(self.categories))}"
                )
        if isinstance(moderate_roles, str):
            raise ConfigurationError(
                f"moderate_roles must be a sequence of roles, e.g. ({moderate_roles!r},)"
            )
        unknown = set(moderate_roles) - KNOWN_ROLES
        if unknown:
            raise ConfigurationError(f"unknown roles in moderate_roles: {sorted(unknown)}")
        if strike_limit is not None and (
            isinstance(strike_limit, bool) or not isinstance(strike_limit, int) or strike_limit < 1
        ):
            raise ConfigurationError(f"strike_limit must be >= 1 or None, got {strike_limit!r}")
        if not isinstance(strike_window, timedelta) or strike_window <= timedelta(0):
            raise ConfigurationError(
                f"strike_window must be a positive timedelta, got {strike_window!r}"
            )
        if suspension is not None and (
            not isinstance(suspension, timedelta) or suspension <= timedelta(0)
        ):
            raise ConfigurationError(
                f"suspension must be a positive timedelta or None, got {suspension!r}"
            )
        if quota is not None and not isinstance(quota, Quota):
            raise ConfigurationError(f"quota must be a safe_openai.Quota, got {quota!r}")
        self.thresholds: dict[str, float] = dict(thresholds or {})
        self.moderate_roles = tuple(moderate_roles)
        self.fail_open = fail_open
        self.require_customer = require_customer
        self.quota = quota
        self.strike_limit = strike_limit
        self.strike_window = strike_window
        self.suspension = suspension
        self.allowed_models = frozenset(allowed_models) if allowed_models is not None else None
        self.max_output_tokens = max_output_tokens
        self.system_instruction = system_instruction
        self.output_moderation = output_moderation
        self.output_strikes = bool(output_strikes)
        self.output_window_chars = output_window_chars
        self.output_window_sentences = output_window_sentences

    def quota_for(self, customer_id: str) -> Quota | None:
        return self.quota

    def review_request(self, request: GuardedRequest) -> Decision:
        if self.allowed_models is not None and request.model not in self.allowed_models:
            # A request naming no model (a stored prompt picks its own) is not on the list.
            return Decision.deny(
                f"model {request.model!r} is not allowed",
                user_message="This model is not available on your plan.",
            )
        if self.max_output_tokens is None and self.system_instruction is None:
            return Decision.allow()
        return Decision.adjust(
            max_output_tokens=self.max_output_tokens, system_instruction=self.system_instruction
        )

    def judge(self, request: GuardedRequest, results: Sequence[ModerationResult]) -> Verdict:
        return judge_by_thresholds(results, self.thresholds)


#: The limits a :class:`Quota` sets, as :attr:`Policy.soft_limits` names them.
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "usd_per_month")


def _as_sinks(alerts: object) -> tuple[AlertSink, ...]:
    """``DefaultPolicy(alerts=...)``: one sink, several, or none, as a tuple.

    Raises:
        ConfigurationError: Something that is not a sink.
    """
    if alerts is None:
        return ()
    if callable(alerts):
        return (alerts,)
    if isinstance(alerts, (str, bytes)) or not isinstance(alerts, Iterable):
        raise ConfigurationError(f"alerts must be a sink or a sequence of sinks, got {alerts!r}")
    sinks = tuple(alerts)
    for sink in sinks:
        if not callable(sink):
            raise ConfigurationError(f"an alert sink must be callable, got {sink!r}")
    return sinks


def soft_thresholds(soft_limits: object) -> dict[str, float]:
    """The soft limit fraction of each limit name that has one.

    Raises:
        ConfigurationError: A fraction outside (0, 1], or a name that is no quota limit.
    """
    if soft_limits is None:
        return {}
    if isinstance(soft_limits, Mapping):
        found = dict(soft_limits)
        unknown = sorted(str(name) for name in found if name not in LIMIT_NAMES)
        if unknown:
            raise ConfigurationError(
                f"soft_limits names unknown limits {unknown}; the limits are "
                f"{', '.join(LIMIT_NAMES)}"
            )
    else:
        found = dict.fromkeys(LIMIT_NAMES, soft_limits)
    for name, fraction in found.items():
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction <= 1
        ):
            raise ConfigurationError(
                f"soft limit for {name} must be a fraction within (0, 1], got {fraction!r}"
            )
    return {name: float(fraction) for name, fraction in found.items()}


#: The category a block names when the endpoint flagged a result without naming a category.
FLAGGED = "flagged"


def check_output_settings(mode: object, chars: object, sentences: object) -> None:
    """Raise :class:`ConfigurationError` for an output moderation setting that cannot work."""
    if mode not in OUTPUT_MODES:
        raise ConfigurationError(
            f'output_moderation must be None, "record" or "block", got {mode!r}'
        )
    if isinstance(chars, bool) or not isinstance(chars, int) or chars < 1:
        raise ConfigurationError(f"output_window_chars must be an int >= 1, got {chars!r}")
    if sentences is not None and (
        isinstance(sentences, bool) or not isinstance(sentences, int) or sentences < 1
    ):
        raise ConfigurationError(
            f"output_window_sentences must be an int >= 1 or None, got {sentences!r}"
        )


def judge_by_thresholds(
    results: Sequence[ModerationResult], thresholds: Mapping[str, float]
) -> Verdict:
    """Block on categories whose score reaches their threshold, or that the endpoint flagged.

    A result the endpoint flagged blocks unless the thresholds explicitly clear it: every
    category it flagged has a threshold and a score below it. Flagged with no category named,
    or with a thresholded category that has no score, blocks (as :data:`FLAGGED`, or as that
    category).

    Args:
        results: One moderation result per piece of content.
        thresholds: Category -> blocking score. Categories missing here block when flagged.
    """
    blocking: set[str] = set()
    for result in results:
        hits = [c for c, hit in result.categories.items() if hit]
        for category in hits:
            if category not in thresholds or category not in result.scores:
                blocking.add(category)
        for category, limit in thresholds.items():
            if result.scores.get(category, 0.0) >= limit:
                blocking.add(category)
        if result.flagged and not hits:
            blocking.add(FLAGGED)
    if not blocking:
        return _PASS
    top: dict[str, float] = {}
    for result in results:
        for category, score in result.scores.items():
            if score > top.get(category, -1.0):
                top[category] = score
    ordered = tuple(sorted(blocking, key=lambda c: (-top.get(c, 0.0), c)))
    return Verdict(blocked=True, categories=ordered, scores=top)


_PASS = Verdict(blocked=False)
