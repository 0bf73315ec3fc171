"""Policy defaults, DefaultPolicy settings and the threshold judgement."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from safe_openai import Decision, DefaultPolicy, GuardedRequest, ModerationResult, Policy, Quota
from safe_openai.policy import judge_by_thresholds


def result(scores: dict[str, float], flagged: set[str] = frozenset()) -> ModerationResult:  # type: ignore[assignment]
    return ModerationResult(
        flagged=bool(flagged),
        categories={c: c in flagged for c in scores},
        scores=scores,
    )


def request(model: str | None = "gpt-4o-mini") -> GuardedRequest:
    return GuardedRequest("acme", "/chat/completions", model, MappingProxyType({}))


def test_without_threshold_a_category_blocks_only_when_flagged() -> None:
    verdict = judge_by_thresholds([result({"violence": 0.99})], {})
    assert not verdict.blocked
    verdict = judge_by_thresholds([result({"violence": 0.4}, {"violence"})], {})
    assert verdict.blocked
    assert verdict.categories == ("violence",)


def test_threshold_blocks_at_score_even_when_not_flagged_and_overrides_flag() -> None:
    thresholds = {"violence": 0.3, "harassment": 0.9}
    verdict = judge_by_thresholds(
        [result({"violence": 0.31, "harassment": 0.5}, {"harassment"})], thresholds
    )
    assert verdict.categories == ("violence",)
    assert verdict.top_score == pytest.approx(0.31)


def test_verdict_keeps_highest_score_per_category_across_pieces() -> None:
    verdict = judge_by_thresholds(
        [result({"violence": 0.2}), result({"violence": 0.7}, {"violence"})], {}
    )
    assert verdict.scores["violence"] == 0.7
    assert verdict.blocked


def test_categories_ordered_most_severe_first() -> None:
    verdict = judge_by_thresholds([result({"a": 0.5, "b": 0.9, "c": 0.7}, {"a", "b", "c"})], {})
    assert verdict.categories == ("b", "c", "a")


def test_base_policy_safe_defaults() -> None:
    policy = Policy()
    assert policy.require_customer is True
    assert policy.fail_open is False
    assert policy.moderate_roles == ("user", "tool")
    assert policy.quota_for("x") is None
    assert policy.review_request(request()) == Decision.allow()
    assert policy.allow_unguarded("/realtime/client_secrets") is False
    assert policy.action_for_safety_event("safety.deactivation_issued") == "suspend"
    assert policy.action_for_safety_event("safety_identifier.blocked") == "strike"
    assert policy.action_for_safety_event("something.else") == "ignore"


def test_default_policy_model_allow_list_denies_other_models() -> None:
    policy = DefaultPolicy(allowed_models=["gpt-4o-mini"])
    assert policy.review_request(request("gpt-4o-mini")).allowed
    decision = policy.review_request(request("o1"))
    assert not decision.allowed
    assert decision.user_message


def test_default_policy_adjusts_output_cap_and_instruction() -> None:
    decision = DefaultPolicy(
        max_output_tokens=100, system_instruction="Only cooking."
    ).review_request(request())
    assert decision.allowed and decision.changes_request
    assert decision.max_output_tokens == 100
    assert decision.system_instruction == "Only cooking."


def test_tiers_by_subclassing_quota_for() -> None:
    class Tiered(DefaultPolicy):
        def quota_for(self, customer_id: str) -> Quota | None:
            return Quota(requests_per_minute=100 if customer_id.startswith("pro-") else 5)

    policy = Tiered()
    assert policy.quota_for("pro-acme") == Quota(requests_per_minute=100)
    assert policy.quota_for("free-bob") == Quota(requests_per_minute=5)


@pytest.mark.parametrize(
    "kwargs",
    [{"thresholds": {"violence": 1.5}}, {"strike_limit": 0}],
)
def test_default_policy_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        DefaultPolicy(**kwargs)  # type: ignore[arg-type]


def test_quota_rejects_negative_limits_and_knows_when_unlimited() -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        Quota(requests_per_minute=-1)
    assert Quota().is_unlimited
    assert Quota(usd_per_month=5).limits_tokens
    assert not Quota(requests_per_minute=5).limits_tokens
