"""Token counts from responses, prices and cost arithmetic."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from structlog.testing import capture_logs

from safe_openai import Price, PriceTable, TokenUsage, UsageRecord
from safe_openai.usage import token_usage_from_payload


def test_chat_usage_with_details() -> None:
    payload = {
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 30},
        }
    }
    assert token_usage_from_payload(payload) == TokenUsage(100, 40, 50, 30)


def test_responses_usage_with_details() -> None:
    payload = {
        "usage": {
            "input_tokens": 10,
            "output_tokens": 20,
            "input_tokens_details": {"cached_tokens": 5},
            "output_tokens_details": {"reasoning_tokens": 7},
        }
    }
    assert token_usage_from_payload(payload) == TokenUsage(10, 5, 20, 7)


def test_missing_or_partial_usage() -> None:
    assert token_usage_from_payload({"id": "x"}) is None
    assert token_usage_from_payload(
        {"usage": {"prompt_tokens": 3, "total_tokens": 3}}
    ) == TokenUsage(3)


def test_cost_bills_cached_input_at_cached_rate_and_reasoning_as_output() -> None:
    price = Price(input=2.0, cached_input=0.5, output=8.0)
    tokens = TokenUsage(
        input_tokens=1_000_000,
        cached_tokens=400_000,
        output_tokens=500_000,
        reasoning_tokens=200_000,
    )
    assert price.cost(tokens) == pytest.approx(0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8.0)


def test_shipped_table_prices_snapshots_but_not_lookalikes() -> None:
    table = PriceTable()
    assert table.effective
    assert table.price_for("gpt-4o-mini-2024-07-18") == table.price_for("gpt-4o-mini")
    assert table.price_for("gpt-4o-mini") != table.price_for("gpt-4o")
    assert table.price_for("o1-pro") is None


def test_unknown_model_costs_none_and_warns_once() -> None:
    table = PriceTable({"known": Price(1, 1)})
    with capture_logs() as logs:
        assert table.cost("mystery-model", TokenUsage(10, 0, 10)) is None
        assert table.cost("mystery-model", TokenUsage(10, 0, 10)) is None
    assert [e["event"] for e in logs] == ["safe_openai.price_unknown"]


def test_overrides_replace_prices() -> None:
    table = PriceTable().with_overrides({"gpt-4o-mini": Price(input=1.0, output=1.0)})
    assert table.cost("gpt-4o-mini", TokenUsage(1_000_000, 0, 0)) == pytest.approx(1.0)


def test_record_round_trips_through_dict() -> None:
    record = UsageRecord(
        customer_id="acme",
        endpoint="/chat/completions",
        model="gpt-4o-mini",
        outcome="ok",
        tokens=TokenUsage(1, 2, 3, 4),
        cost_usd=0.5,
        latency_s=0.1,
        created_at=datetime(2026, 1, 2, tzinfo=timezone.utc),
        request_id="req_1",
        record_id="r1",
    )
    assert UsageRecord.from_dict(record.to_dict()) == record


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_a_price_table_pickles_and_copies(how: str) -> None:
    """Its lock made ``pickle.dumps`` and ``copy.deepcopy`` raise TypeError (a policy or settings
    object holding a table, sent to a worker process or copied per tenant)."""
    import copy
    import pickle

    table = PriceTable({"m": Price(input=1.0, output=2.0)}, effective="2026-01-01")
    table.cost("unknown", TokenUsage(input_tokens=1))  # warned once: the copy warns afresh
    copied = {
        "pickle": lambda t: pickle.loads(pickle.dumps(t)),
        "deepcopy": copy.deepcopy,
        "copy": copy.copy,
    }[how](table)
    assert type(copied) is PriceTable and copied is not table
    assert (copied.prices, copied.effective) == (table.prices, table.effective)
    assert copied.cost("m", TokenUsage(input_tokens=1_000_000)) == 1.0
    assert pickle.loads(pickle.dumps(PriceTable.shipped())).prices == PriceTable.shipped().prices
