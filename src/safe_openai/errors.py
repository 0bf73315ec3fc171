"""The exceptions safe_openai raises.

Every error subclasses :class:`SafeOpenAIError`, which subclasses ``openai.OpenAIError``, so an
existing ``except openai.OpenAIError`` keeps catching them::

    openai.OpenAIError
    └── SafeOpenAIError
        ├── ConfigurationError       the client or a store is set up wrongly
        │   └── UnpricedModel        a cost quota applies and the model has no price
        ├── InvalidCustomerId        a customer id that is not a usable id (also ValueError)
        ├── CustomerRequired         a guarded call has no end customer
        ├── CustomerSuspended        the customer is suspended; nothing was sent
        ├── QuotaExceeded            a quota would be exceeded; nothing was sent
        ├── PolicyDenied             the policy refused the request; nothing was sent
        ├── ModerationBlocked        moderation flagged the content; nothing was sent
        │   ├── BatchBlocked         ... in lines of a Batch API input file; not uploaded
        │   └── OutputBlocked        ... in the model's answer; withheld from the caller
        ├── ModerationUnavailable    moderation could not be obtained (fail closed)
        ├── UnguardedPathError       an SDK path the guard cannot cover was refused
        ├── BatchFileError           a Batch API file or batch safe_openai cannot accept
        ├── StoreError               the usage store failed (the cause is chained)
        ├── WebhookVerificationError a webhook delivery failed verification
        └── WebhookInProgress        another delivery of the webhook event is acting on it

Messages are one plain sentence. They never contain prompt text or the API key; the
``user_message`` of the errors an end customer may see is safe to show them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import openai

if TYPE_CHECKING:
    from .policy import Decision

__all__ = [
    "BatchBlocked",
    "BatchFileError",
    "ConfigurationError",
    "CustomerRequired",
    "CustomerSuspended",
    "InvalidCustomerId",
    "ModerationBlocked",
    "ModerationUnavailable",
    "OutputBlocked",
    "PolicyDenied",
    "QuotaExceeded",
    "SafeOpenAIError",
    "StoreError",
    "UnguardedPathError",
    "UnpricedModel",
    "WebhookInProgress",
    "WebhookVerificationError",
]


class SafeOpenAIError(openai.OpenAIError):
    """Base class of every error safe_openai raises.

    Attributes:
        customer_id: The end customer the failed call belonged to, when known.
        user_message: A sentence safe to show the end customer.
    """

    user_message: str = "The request could not be processed."

    def __init__(self, message: str, *, customer_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.customer_id = customer_id

    def __reduce__(self) -> tuple[Any, ...]:
        # The constructors take keyword-only arguments that ``args`` (the message) does not
        # hold, so the default (``cls(*args)``) cannot rebuild an error: pickling one (a worker
        # process, a task queue) or ``copy.copy`` raised TypeError. Rebuild it from its state.
        return (_rebuilt, (type(self), self.args, self.__dict__))


def _rebuilt(cls: type[SafeOpenAIError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """An error of ``cls`` with ``args`` and attributes ``state``, without its ``__init__``."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigurationError(SafeOpenAIError, ValueError):
    """The client, policy or store is configured wrongly (raised before any request).

    It is also a ``ValueError``, as a wrong setting is a bad value.
    """


class UnpricedModel(ConfigurationError):
    """A ``usd_per_month`` quota applies and the model has no price, so the call's cost
    cannot be held against it; the request was not sent.

    Attributes:
        model: The model without a price (``None`` when the request names none).
    """

    user_message = "This model is not available on your plan."

    def __init__(self, customer_id: str | None, *, model: str | None) -> None:
        super().__init__(
            f"Model {model!r} has no price, so its cost cannot be held against usd_per_month; "
            "add one with SafeClient(prices=PriceTable().with_overrides({model: Price(...)})).",
            customer_id=customer_id,
        )
        self.model = model


class InvalidCustomerId(SafeOpenAIError, ValueError):
    """A customer id that cannot be used: not a string, blank, longer than 256 characters, or
    not encodable (a lone surrogate). It is also a ``ValueError``."""


class CustomerRequired(SafeOpenAIError):
    """A guarded call was made with no end customer and the policy requires one."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(
            f"No end customer is bound for a call to {endpoint}: use client.for_customer(id) "
            "or `with safe_openai.customer(id):`."
        )
        self.endpoint = endpoint


class CustomerSuspended(SafeOpenAIError):
    """The customer is suspended; the request was not sent.

    Attributes:
        until: When the suspension ends, or ``None`` if it lasts until lifted.
        reason: Why the customer was suspended.
    """

    user_message = "Your access has been suspended. Please contact support."

    def __init__(self, customer_id: str, *, until: datetime | None, reason: str) -> None:
        until_text = f"until {until.isoformat()}" if until else "until lifted"
        super().__init__(f"Customer is suspended {until_text}.", customer_id=customer_id)
        self.until = until
        self.reason = reason


class QuotaExceeded(SafeOpenAIError):
    """A quota of the customer would be exceeded; the request was not sent.

    Attributes:
        limit: Which limit tripped (``"requests_per_minute"``, ``"tokens_per_minute"``,
            ``"tokens_per_day"`` or ``"usd_per_month"``).
        retry_after: Seconds until the window frees enough capacity, or ``None`` when
            waiting cannot help (the request alone is larger than the limit).
        used: What the customer had used of that limit when the store decided (before this
            request), or ``None`` when the store did not say.
        allowed: The limit's value, or ``None`` when unknown.
    """

    user_message = "You have reached your usage limit. Please try again later."
    #: The ``user_message`` when waiting cannot help: the request alone exceeds the limit.
    too_large_message = "This request is larger than your plan allows."

    def __init__(
        self,
        customer_id: str,
        *,
        limit: str,
        retry_after: float | None,
        used: float | None = None,
        allowed: float | None = None,
    ) -> None:
        amount = ""
        if used is not None and allowed is not None:
            amount = f": {_header_number(used)} of {_header_number(allowed)} used"
        hint = (
            f"; retry after {retry_after:.1f}s"
            if retry_after is not None
            else "; the request alone is larger than the limit"
        )
        super().__init__(f"Quota {limit} exceeded{amount}{hint}.", customer_id=customer_id)
        self.limit = limit
        self.retry_after = retry_after
        self.used = used
        self.allowed = allowed
        if retry_after is None:
            self.user_message = self.too_large_message

    def headers(self) -> dict[str, str]:
        """HTTP response headers for this refusal (for a 429 from the application's own API):
        ``Retry-After`` in whole seconds, rounded up (at least 1), when waiting helps, and
                ``X-RateLimit-Limit`` / ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset`` for the
        limit that refused, when known. ``X-RateLimit-Reset`` is ``Retry-After`` here (when
        enough frees for this request), not when the usage first drops as in
        :func:`~safe_openai.rate_limit_headers`. See docs/guide.md, "Quota status"."""
        found: dict[str, str] = {}
        if self.allowed is not None:
            found["X-RateLimit-Limit"] = _header_number(self.allowed)
            if self.used is not None:
                left = max(round(self.allowed - self.used, 9), 0)
                found["X-RateLimit-Remaining"] = _header_number(left)
        if self.retry_after is not None:
            seconds = wait_seconds(self.retry_after)
            if self.allowed is not None:
                found["X-RateLimit-Reset"] = seconds
            found["Retry-After"] = seconds
        return found


def wait_seconds(seconds: float) -> str:
    """A wait as ``Retry-After`` / ``X-RateLimit-Reset`` send it: whole seconds, rounded up, at
    least 1. "0" reads as "retry at once", in a loop, even where clocks disagree (a host ahead
    of the store sees a reset that is still to come as past)."""
    return str(max(math.ceil(seconds), 1))


def _header_number(value: float) -> str:
    """A limit or amount as a header value: a plain decimal at the reports' precision (nine
    places), whole numbers without a fraction, never an exponent or a trailing point."""
    rounded = round(float(value), 9)
    if rounded.is_integer():
        return str(int(rounded))
    # repr is the shortest text that reads back as the same float (no binary noise such as
    # 123456789.122999996); Decimal writes it out without an exponent (1e-05 -> 0.00001)
    return f"{Decimal(repr(rounded)):f}"


class PolicyDenied(SafeOpenAIError):
    """The policy refused the request before moderation; nothing was sent.

    Attributes:
        decision: The :class:`~safe_openai.Decision` the policy returned.
    """

    user_message = "This request is not allowed."

    def __init__(self, customer_id: str | None, decision: Decision) -> None:
        super().__init__(f"Policy denied the request: {decision.reason}", customer_id=customer_id)
        self.decision = decision
        self.user_message = decision.user_message or type(self).user_message


class ModerationBlocked(SafeOpenAIError):
    """Moderation flagged content in the request; the model request was never sent.

    Attributes:
        categories: The categories that blocked the request.
        scores: The highest score seen per category over every moderated piece.
        endpoint: The API path of the blocked call.
    """

    user_message = "Your message was blocked because it may violate our content policy."

    def __init__(
        self,
        customer_id: str | None,
        *,
        categories: tuple[str, ...],
        scores: Mapping[str, float],
        endpoint: str,
    ) -> None:
        super().__init__(
            f"Request to {endpoint} blocked by moderation: {', '.join(categories)}.",
            customer_id=customer_id,
        )
        self.categories = categories
        self.scores = dict(scores)
        self.endpoint = endpoint


class BatchBlocked(ModerationBlocked):
    """Moderation flagged requests in a Batch API input file; the file was not uploaded.

    Attributes:
        lines: Line number (1-based) -> the categories that blocked that line.
    """

    def __init__(
        self,
        customer_id: str | None,
        *,
        lines: Mapping[int, tuple[str, ...]],
        scores: Mapping[str, float],
        endpoint: str,
    ) -> None:
        categories = tuple(sorted({c for found in lines.values() for c in found}))
        super().__init__(customer_id, categories=categories, scores=scores, endpoint=endpoint)
        self.lines = dict(sorted(lines.items()))
        shown = ", ".join(f"{n} ({', '.join(c)})" for n, c in list(self.lines.items())[:10])
        more = f" and {len(self.lines) - 10} more" if len(self.lines) > 10 else ""
        self.args = (f"Batch input file blocked by moderation: line {shown}{more}.",)


class OutputBlocked(ModerationBlocked):
    """Moderation flagged the model's answer, under a policy that blocks output; the caller
    receives none of the flagged text. Unlike its base class, the request **was** sent: its
    usage is recorded. A stream raises it from its iteration, after the text judged clean.

    Attributes:
        request_id: OpenAI's ``x-request-id`` of the answer, when known.
    """

    user_message = "The answer was withheld because it may violate our content policy."

    def __init__(
        self,
        customer_id: str | None,
        *,
        categories: tuple[str, ...],
        scores: Mapping[str, float],
        endpoint: str,
        request_id: str | None = None,
    ) -> None:
        super().__init__(customer_id, categories=categories, scores=scores, endpoint=endpoint)
        self.request_id = request_id
        self.message = f"Output of {endpoint} withheld by moderation: {', '.join(categories)}."
        self.args = (self.message,)


class ModerationUnavailable(SafeOpenAIError):
    """Moderation could not be obtained and the policy fails closed; nothing was sent.

    Attributes:
        outage: Whether the moderator was unreachable (a connection error, a timeout, a 429 or
            5xx after retries), which a ``fail_open`` policy may send through. A refusal of the
            input (a 400, which a customer can provoke) or a malformed or incomplete answer is
            no outage: it fails closed whatever the policy says.
    """

    user_message = "The service is temporarily unavailable. Please try again shortly."

    def __init__(
        self, message: str, *, customer_id: str | None = None, outage: bool = True
    ) -> None:
        super().__init__(message, customer_id=customer_id)
        self.outage = outage


class UnguardedPathError(SafeOpenAIError):
    """The call takes an SDK path the guard cannot inspect, so it was refused."""


class BatchFileError(SafeOpenAIError, ValueError):
    """A Batch API input file that cannot be read as requests, or a batch whose customer is
    unknown; nothing was sent."""


class StoreError(SafeOpenAIError):
    """The usage store failed; the original exception is chained as ``__cause__``."""

    user_message = "The service is temporarily unavailable. Please try again shortly."


class WebhookVerificationError(SafeOpenAIError):
    """A webhook delivery had a missing, forged or stale signature, or a malformed body."""


class WebhookInProgress(SafeOpenAIError):
    """Another delivery of the same webhook event holds its claim and is acting on it now.

    Nothing was changed. Answer with a 5xx (or 409) so that OpenAI delivers the event again
    later: by then the other delivery has finished it (the redelivery is a duplicate) or failed
    and released it (the redelivery acts).

    Attributes:
        event_id: The event being handled elsewhere.
    """

    def __init__(self, event_id: str) -> None:
        super().__init__(
            f"Webhook event {event_id} is being handled by another delivery; retry later."
        )
        self.event_id = event_id
