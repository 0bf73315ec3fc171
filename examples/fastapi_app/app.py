"""A multi-tenant FastAPI service on safe-openai: two plans, streamed answers, quota headers,
OpenAI's safety webhooks and an alert sink.

Each tenant authenticates with its API key (``Authorization: Bearer ...``); the key names the
tenant, and the tenant's plan sets its quota (``PlanPolicy``). Every answer carries the tenant's
``X-RateLimit-*`` headers; a refusal is an HTTP error with a message safe to show (422 blocked,
429 over quota with ``Retry-After``, 403 suspended), streams included: the stream is started
and pulled to its first output before the ``200`` goes out. At 80 % of a limit, and on every
refusal, strike or suspension, an alert is posted (signed) to the operators' URL.

Run it (``pip install safe-openai fastapi uvicorn``)::

    export OPENAI_API_KEY=sk-... SAFE_OPENAI_IDENTIFIER_SECRET=... OPENAI_WEBHOOK_SECRET=whsec_...
    export SAFE_OPENAI_STORE_URL=sqlite:///usage.db
    export ALERT_WEBHOOK_URL=https://ops.example.com/hooks/safe-openai ALERT_WEBHOOK_SECRET=...
    export TENANT_KEYS='{"key-acme": ["acme", "pro"], "key-globex": ["globex", "free"]}'
    uvicorn --factory app:production_app

Its tests (``test_app.py``, run by the project's suite) build the same app on
:class:`~safe_openai.testing.FakeOpenAI`: no network, no key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

import openai
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types.chat import ChatCompletionChunk
from pydantic import BaseModel

from safe_openai import AsyncSafeClient, DefaultPolicy, Quota, rate_limit_headers
from safe_openai.alerts import AlertSink, WebhookAlertSink
from safe_openai.web import CustomerMiddleware, aprimed, asse, http_error
from safe_openai.webhooks import AsyncSafetyWebhookHandler

MODEL = "gpt-4o-mini"

#: What each plan may use. Free: a trial's worth; pro: a paying team's.
PLANS: Mapping[str, Quota] = {
    "free": Quota(requests_per_minute=5, tokens_per_day=2_000),
    "pro": Quota(requests_per_minute=120, tokens_per_day=1_000_000, usd_per_month=200),
}


@dataclass(frozen=True)
class Tenant:
    id: str
    plan: str


class PlanPolicy(DefaultPolicy):
    """The default moderation and strike rules, with each tenant's quota from its plan, a
    warning at 80 % of any limit, and answers kept short and on topic."""

    def __init__(self, plans: Mapping[str, str], alerts: AlertSink | None = None) -> None:
        super().__init__(
            system_instruction="You are the assistant of Ledgerly, a bookkeeping product.",
            soft_limits=0.8,
            alerts=alerts,
        )
        self.plans = dict(plans)

    def quota_for(self, customer_id: str) -> Quota | None:
        return PLANS[self.plans.get(customer_id, "free")]


class Question(BaseModel):
    question: str


def delta_text(chunk: ChatCompletionChunk) -> str:
    """One SSE message per chunk: ``{"text": "..."}``."""
    text = chunk.choices[0].delta.content if chunk.choices else None
    return json.dumps({"text": text or ""})


def caller(request: Request, authorization: Annotated[str, Header()]) -> Tenant:
    """The tenant whose API key the request carries (``Authorization: Bearer <key>``)."""
    tenants: Mapping[str, Tenant] = request.app.state.tenants
    found = tenants.get(authorization.removeprefix("Bearer "))
    if found is None:
        raise HTTPException(401, "Unknown API key.")
    return found


Caller = Annotated[Tenant, Depends(caller)]


def alert_sink_from_env() -> AlertSink | None:
    """The operators' alert webhook, when ``ALERT_WEBHOOK_URL`` is set."""
    url = os.environ.get("ALERT_WEBHOOK_URL")
    if not url:
        return None
    return WebhookAlertSink(url, secret=os.environ["ALERT_WEBHOOK_SECRET"])


def create_app(ai: AsyncSafeClient, tenants: Mapping[str, Tenant]) -> FastAPI:
    """The service, on ``ai`` (whose policy should be a :class:`PlanPolicy` of the same
    tenants). ``tenants`` maps each API key to its tenant."""
    app = FastAPI(title="Ledgerly assistant")
    # closes a stream whose client left before its end (Starlette never closes the body)
    app.add_middleware(CustomerMiddleware)
    app.state.tenants = dict(tenants)
    webhooks = AsyncSafetyWebhookHandler(ai)

    @app.exception_handler(openai.OpenAIError)
    async def refused(request: Request, exc: openai.OpenAIError) -> JSONResponse:
        error = http_error(exc)
        return JSONResponse(error.body(), error.status, headers=error.headers)

    async def limits(who: Tenant) -> dict[str, str]:
        return rate_limit_headers(await ai.standing(who.id))

    @app.post("/v1/answers")
    async def answer(body: Question, response: Response, who: Caller) -> dict[str, str]:
        reply = await ai.for_customer(who.id).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": body.question}]
        )
        response.headers.update(await limits(who))
        return {"answer": reply.choices[0].message.content or ""}

    @app.post("/v1/answers/stream")
    async def stream_answer(body: Question, who: Caller) -> StreamingResponse:
        stream = await ai.for_customer(who.id).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": body.question}], stream=True
        )
        events = await aprimed(stream)  # a refusal is raised here, before the 200
        return StreamingResponse(
            asse(events, encode=delta_text),
            media_type="text/event-stream",
            headers=await limits(who),  # the quota as it stands once this call is admitted
        )

    @app.get("/v1/usage")
    async def usage(who: Caller) -> dict[str, object]:
        standing = await ai.standing(who.id)
        return {
            "plan": who.plan,
            "suspended": standing.suspension is not None,
            "strikes": standing.strikes,
            "limits": [
                {"name": u.name, "used": u.used, "limit": u.limit, "remaining": u.remaining}
                for u in standing.limits
            ],
        }

    @app.post("/webhooks/openai")
    async def openai_webhook(request: Request) -> JSONResponse:
        try:
            event = await webhooks.handle(await request.body(), request.headers)
        except openai.OpenAIError as exc:  # WebhookVerificationError: 400; in progress: 409
            error = http_error(exc)
            return JSONResponse(error.body(), error.status)
        return JSONResponse({"action": event.action})  # never the tenant: this goes to OpenAI

    return app


def tenants_from_env() -> dict[str, Tenant]:
    """``TENANT_KEYS='{"key-1": ["acme", "pro"], "key-2": ["globex", "free"]}'``."""
    raw: dict[str, list[str]] = json.loads(os.environ.get("TENANT_KEYS", "{}"))
    return {key: Tenant(tenant_id, plan) for key, (tenant_id, plan) in raw.items()}


def production_app() -> FastAPI:
    """The service configured from the environment (``uvicorn --factory app:production_app``)."""
    tenants = tenants_from_env()
    policy = PlanPolicy({t.id: t.plan for t in tenants.values()}, alerts=alert_sink_from_env())
    return create_app(AsyncSafeClient(policy=policy), tenants)
