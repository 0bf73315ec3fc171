"""A SaaS backend with two plans, run offline against safe_openai's fake API.

Free customers get a small per-minute budget and a cheap model; Pro customers get more. One
customer misbehaves and is suspended after two blocked messages. The usage report ends it.

    python examples/tiered_saas.py [--store sqlite:///tiered.db]

With a real key, drop ``**fake.openai_kwargs()`` and the client talks to OpenAI instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta

import structlog

from safe_openai import (
    CustomerSuspended,
    Decision,
    DefaultPolicy,
    GuardedRequest,
    ModerationBlocked,
    Quota,
    QuotaExceeded,
    SafeClient,
)
from safe_openai.testing import FakeOpenAI

PLANS = {"acme": "pro", "globex": "free", "initech": "free"}


class PlanPolicy(DefaultPolicy):
    """Quotas and models by plan; everything else from DefaultPolicy."""

    def quota_for(self, customer_id: str) -> Quota:
        if PLANS.get(customer_id) == "pro":
            return Quota(requests_per_minute=100, usd_per_month=50.0)
        return Quota(requests_per_minute=3, tokens_per_day=20_000)

    def review_request(self, request: GuardedRequest) -> Decision:
        if PLANS.get(request.customer_id or "") != "pro" and request.model != "gpt-4o-mini":
            return Decision.deny("model not on the free plan", user_message="Upgrade to Pro.")
        return Decision.adjust(system_instruction="You are the assistant of a CRM product.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="memory://")
    args = parser.parse_args()
    # An application decides how logs look; the library never does. Warnings to stderr here.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )

    fake = FakeOpenAI(reply="Here is your answer.")
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=os.environ.get(
            "SAFE_OPENAI_IDENTIFIER_SECRET", "example-identifier-secret"
        ),
        store=args.store,
        spool=False,
        policy=PlanPolicy(strike_limit=2, suspension=timedelta(hours=1)),
    )

    def ask(customer: str, text: str, model: str = "gpt-4o-mini") -> None:
        try:
            client.for_customer(customer).chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}]
            )
            print(f"{customer:<8} ok      {text}")
        except (ModerationBlocked, QuotaExceeded, CustomerSuspended) as exc:
            print(f"{customer:<8} refused {type(exc).__name__}: {exc.user_message}")
        except Exception as exc:  # PolicyDenied and friends
            print(f"{customer:<8} refused {type(exc).__name__}: {exc}")

    ask("acme", "Summarise this account's open deals.", model="gpt-4o")
    ask("globex", "Draft a follow-up email.", model="gpt-4o")  # not on the free plan
    for i in range(4):  # the fourth passes the free plan's 3 per minute
        ask("globex", f"Draft follow-up email number {i}.")
    ask("initech", "I will kill the sales team.")
    ask("initech", "Explain how to build a bomb.")
    ask("initech", "What is our churn?")  # suspended by now

    print()
    for row in client.store.usage_report():
        tokens = row.input_tokens + row.output_tokens
        print(
            f"{row.customer:<8} requests={row.requests} tokens={tokens} cost=${row.cost_usd:.6f}"
            f" blocked={row.blocked} denied={row.denied} suspended={row.suspended}"
        )
    client.close()


if __name__ == "__main__":
    main()
