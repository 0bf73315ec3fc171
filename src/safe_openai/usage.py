"""Usage records, token counts read from responses, and cost arithmetic.

Prices ship as data (``_prices.json``, with the date they took effect) and can be overridden per
client with a :class:`PriceTable`. A model the table does not know records its tokens and a
``None`` cost, with a one-time warning: a made-up price is worse than none.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Literal

from ._log import get_logger

__all__ = [
    "Outcome",
    "Price",
    "PriceTable",
    "TokenUsage",
    "UsageRecord",
    "estimate_tokens",
    "token_usage_from_payload",
]

log = get_logger()

#: How a guarded call ended. ``ok``: the model answered; ``blocked``: moderation blocked it;
#: ``denied``: the policy, a quota, a suspension or a moderation outage (failing closed) refused
#: it; ``error``: the API call failed; ``estimated``: a stream ended before its usage arrived
#: (closed early, abandoned, or broken by an error), tokens are estimated.
Outcome = Literal["ok", "blocked", "denied", "error", "estimated"]

#: Outcomes of calls that reached the model, which count against request-rate quotas.
SENT_OUTCOMES: frozenset[str] = frozenset({"ok", "error", "estimated"})


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one call. Cached tokens are part of input; reasoning part of output."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens: what token quotas count."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input_tokens + other.input_tokens,
            self.cached_tokens + other.cached_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One guarded call, as stored.

    Attributes:
        customer_id: The end customer (``""`` for an anonymous call).
        endpoint: The API path, e.g. ``"/chat/completions"``.
        model: The model asked for, when the endpoint takes one.
        outcome: How the call ended (see :data:`Outcome`).
        tokens: Token counts (zero for calls that were never sent).
        cost_usd: Cost from the price table; ``None`` when the model has no price.
        latency_s: Seconds from the call to its end (to the last chunk for streams).
        created_at: When the call started (UTC).
        request_id: OpenAI's ``x-request-id``, used to trace safety alerts back.
        record_id: A unique id, so a record replayed from the spool is written once.
    """

    customer_id: str
    endpoint: str
    model: str | None
    outcome: Outcome
    tokens: TokenUsage = field(default_factory=TokenUsage)
    cost_usd: float | None = None
    latency_s: float = 0.0
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    request_id: str | None = None
    record_id: str = ""

    @property
    def counts_as_request(self) -> bool:
        """Whether the call reached the model (and counts against request quotas)."""
        return self.outcome in SENT_OUTCOMES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (used by stores and the spool)."""
        return {
            "record_id": self.record_id,
            "customer_id": self.customer_id,
            "endpoint": self.endpoint,
            "model": self.model,
            "outcome": self.outcome,
            "input_tokens": self.tokens.input_tokens,
            "cached_tokens": self.tokens.cached_tokens,
            "output_tokens": self.tokens.output_tokens,
            "reasoning_tokens": self.tokens.reasoning_tokens,
            "cost_usd": self.cost_usd,
            "latency_s": self.latency_s,
            "created_at": self.created_at.isoformat(),
            "request_id": self.request_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UsageRecord:
        """The inverse of :meth:`to_dict`."""
        created = datetime.fromisoformat(str(data["created_at"]))
        if created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)
        cost = data.get("cost_usd")
        return cls(
            customer_id=str(data["customer_id"]),
            endpoint=str(data["endpoint"]),
            model=data.get("model"),
            outcome=data["outcome"],
            tokens=TokenUsage(
                int(data.get("input_tokens") or 0),
                int(data.get("cached_tokens") or 0),
                int(data.get("output_tokens") or 0),
                int(data.get("reasoning_tokens") or 0),
            ),
            cost_usd=None if cost is None else float(cost),
            latency_s=float(data.get("latency_s") or 0.0),
            created_at=created,
            request_id=data.get("request_id"),
            record_id=str(data.get("record_id") or ""),
        )

    def with_cost(self, prices: PriceTable) -> UsageRecord:
        """This record with its cost computed from ``prices``."""
        return replace(self, cost_usd=prices.cost(self.model, self.tokens))


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens for one model. Reasoning tokens are billed as output."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, tokens: TokenUsage) -> float:
        """The cost of ``tokens`` at this price."""
        cached = min(tokens.cached_tokens, tokens.input_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return (
            (tokens.input_tokens - cached) * self.input
            + cached * cached_rate
            + tokens.output_tokens * self.output
        ) / 1_000_000


class PriceTable:
    """Model -> :class:`Price`, matched by exact name, then as a dated snapshot of a known model.

    A snapshot is the known name followed by ``-`` and a digit (``gpt-4o-mini-2024-07-18``), so
    ``o1-pro`` is not priced as ``o1``.

    Args:
        prices: Model name -> price. Defaults to the prices shipped with the package.
        effective: The date the prices took effect (for reports).
    """

    def __init__(self, prices: Mapping[str, Price] | None = None, *, effective: str = "") -> None:
        if prices is None:
            shipped = PriceTable.shipped()
            prices, effective = shipped.prices, shipped.effective
        self.prices: dict[str, Price] = dict(prices)
        self.effective: str = effective
        self._by_length = sorted(self.prices, key=len, reverse=True)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled and deep-copied as its prices (its lock cannot be: a policy or settings
        object holding a table raised TypeError in ``pickle`` and ``copy.deepcopy``)."""
        return (_price_table, (self.prices, self.effective))

    @classmethod
    def shipped(cls) -> PriceTable:
        """The price table shipped with this release."""
        raw = json.loads(resources.files("safe_openai").joinpath("_prices.json").read_text())
        prices = {
            name: Price(
                input=float(entry["input"]),
                output=float(entry["output"]),
                cached_input=None if entry.get("cached_input") is None else entry["cached_input"],
            )
            for name, entry in raw["models"].items()
        }
        return cls(prices, effective=str(raw["effective"]))

    def with_overrides(self, overrides: Mapping[str, Price]) -> PriceTable:
        """A copy of this table with some models' prices replaced or added."""
        return PriceTable({**self.prices, **overrides}, effective=self.effective)

    def price_for(self, model: str | None) -> Price | None:
        """The price of ``model``, or ``None`` when unknown."""
        if not model:
            return None
        price = self.prices.get(model)
        if price is not None:
            return price
        for name in self._by_length:
            if (
                len(model) > len(name) + 1
                and model.startswith(name)
                and model[len(name)] == "-"
                and model[len(name) + 1].isdigit()
            ):
                return self.prices[name]
        return None

    def cost(self, model: str | None, tokens: TokenUsage) -> float | None:
        """The cost of ``tokens`` on ``model``; ``None`` (warned once) when the model is unknown."""
        price = self.price_for(model)
        if price is None:
            if model and tokens.total_tokens:
                with self._lock:
                    first = model not in self._warned
                    self._warned.add(model)
                if first:
                    log.warning("safe_openai.price_unknown", model=model)
            return None
        return price.cost(tokens)


def _price_table(prices: Mapping[str, Price], effective: str) -> PriceTable:
    """A table rebuilt from a pickle (``effective`` is keyword-only in the constructor)."""
    return PriceTable(prices, effective=effective)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    # SDK models keep their fields in __dict__; a missing attribute on a pydantic model costs an
    # exception, so look there first.
    fields = getattr(obj, "__dict__", None)
    if fields is not None:
        return fields.get(name)
    return getattr(obj, name, None)


def token_usage_from_payload(payload: Any) -> TokenUsage | None:
    """Read token counts from a response body, parsed or raw.

    Understands chat/completions/embeddings usage (``prompt_tokens``, ``completion_tokens``) and
    Responses/images usage (``input_tokens``, ``output_tokens``), with their cached and reasoning
    details. Returns ``None`` when the payload carries no usage.
    """
    usage = _get(payload, "usage")
    if usage is None:
        return None
    if _get(usage, "input_tokens") is not None or _get(usage, "output_tokens") is not None:
        input_tokens = _int(_get(usage, "input_tokens"))
        output_tokens = _int(_get(usage, "output_tokens"))
        input_details = _get(usage, "input_tokens_details")
        output_details = _get(usage, "output_tokens_details")
    else:
        input_tokens = _int(_get(usage, "prompt_tokens"))
        output_tokens = _int(_get(usage, "completion_tokens"))
        input_details = _get(usage, "prompt_tokens_details")
        output_details = _get(usage, "completion_tokens_details")
    cached = _int(_get(input_details, "cached_tokens")) if input_details is not None else 0
    reasoning = _int(_get(output_details, "reasoning_tokens")) if output_details is not None else 0
    return TokenUsage(input_tokens, cached, output_tokens, reasoning)


def estimate_tokens(characters: int) -> int:
    """A rough token estimate for ``characters`` of text (about four characters a token)."""
    return (characters + 3) // 4
