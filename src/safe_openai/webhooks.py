"""OpenAI safety events, traced back to your customers and acted on.

OpenAI reports enforcement against a ``safety_identifier`` through webhooks. A
:class:`SafetyWebhookHandler` (or :class:`AsyncSafetyWebhookHandler`) verifies a delivery with
the SDK, maps the event back to the customer through the client's store, and acts per policy:

========================== =============================================== ==================
event type                 how the customer is found                       default action
========================== =============================================== ==================
safety_identifier.blocked  ``data.safety_identifier`` (else request id)    strike
safety.warning_issued      case ``entity_identifier`` (``cases.retrieve``) strike
safety.deactivation_issued case ``entity_identifier`` (``cases.retrieve``) suspend at once
safety.alert.created       alert ``request_id`` (``alerts.retrieve``)      ignore
safety.org_alert.created   alert ``request_id`` (``alerts.retrieve``)      ignore
anything else              not looked up                                   ignore
========================== =============================================== ==================

The action comes from :meth:`Policy.action_for_safety_event <safe_openai.Policy>`. A
warning, deactivation or blocked identifier traced to a customer also raises an
``"openai_event"`` :class:`~safe_openai.alerts.Alert` (and its strike or suspension theirs),
once per event, through :meth:`Policy.on_alert <safe_openai.Policy.on_alert>`. A strike
goes through the same strike rule as a moderation block, so strikes from both add up. Every
strike or suspension is stored as a violation whose ``source`` is the event type, so it is
listed beside moderation violations.

A delivery is idempotent on its event id, which it claims in the store before acting: one
event acts once however many deliveries of it arrive, at once or one after another. A later
delivery returns ``action="duplicate"`` and changes nothing; one arriving while another holds
the claim raises :class:`~safe_openai.WebhookInProgress`. Identifiers the store does not know
are logged (``safe_openai.webhook_unmatched``) and returned as ``"unmatched"``, never guessed.

FastAPI (async)::

    from fastapi import FastAPI, HTTPException, Request
    from safe_openai import AsyncSafeClient, WebhookVerificationError
    from safe_openai.webhooks import AsyncSafetyWebhookHandler

    app = FastAPI()
    handler = AsyncSafetyWebhookHandler(AsyncSafeClient())

    @app.post("/webhooks/openai")
    async def openai_webhook(request: Request) -> dict[str, str]:
        try:
            event = await handler.handle(await request.body(), request.headers)
        except WebhookVerificationError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"action": event.action}

Flask::

    from flask import Flask, request
    from safe_openai import SafeClient, WebhookVerificationError
    from safe_openai.webhooks import SafetyWebhookHandler

    app = Flask(__name__)
    handler = SafetyWebhookHandler(SafeClient())

    @app.post("/webhooks/openai")
    def openai_webhook():
        try:
            event = handler.handle(request.get_data(), request.headers)
        except WebhookVerificationError as exc:
            return {"error": str(exc)}, 400
        return {"action": event.action}

``docs/webhooks.md`` holds the same endpoints, run by its tests. Answer 2xx for every returned
event (duplicates and unmatched ones included) and 4xx for a
:class:`~safe_openai.WebhookVerificationError`. Let any other error (the store or a case
look-up failing, :class:`~safe_openai.WebhookInProgress`) become a 5xx: nothing was marked
handled, so OpenAI's redelivery acts on it, or finds it done.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, get_args

import openai
from openai.types.safety import SafetyAlert, SafetyCase

from ._client import AsyncSafeClient, SafeClient
from ._guard import (
    Flow,
    GuardState,
    StoreCall,
    adrive,
    alert,
    drive,
    enforce_strikes,
    openai_event_alert,
    record_violation,
    suspension_alert,
)
from ._log import get_logger
from .errors import ConfigurationError, StoreError, WebhookInProgress, WebhookVerificationError
from .policy import Policy, SafetyAction
from .stores._types import EVENT_LEASE, Violation

__all__ = [
    "SAFETY_ALERT_CREATED",
    "SAFETY_DEACTIVATION_ISSUED",
    "SAFETY_IDENTIFIER_BLOCKED",
    "SAFETY_ORG_ALERT_CREATED",
    "SAFETY_WARNING_ISSUED",
    "AsyncSafetyWebhookHandler",
    "EventAction",
    "HeaderSource",
    "SafetyEvent",
    "SafetyWebhookHandler",
]

log = get_logger()

SAFETY_IDENTIFIER_BLOCKED = "safety_identifier.blocked"
SAFETY_WARNING_ISSUED = "safety.warning_issued"
SAFETY_DEACTIVATION_ISSUED = "safety.deactivation_issued"
SAFETY_ALERT_CREATED = "safety.alert.created"
SAFETY_ORG_ALERT_CREATED = "safety.org_alert.created"

#: What handling a delivery did: ``"strike"`` recorded a violation, ``"suspended"`` suspended
#: the customer (at once, or because the strike reached the limit), ``"ignored"`` did nothing
#: (policy or event type), ``"unmatched"`` found no customer, ``"duplicate"`` had been handled.
EventAction = Literal["strike", "suspended", "ignored", "unmatched", "duplicate"]

_Kind = Literal["identifier", "case", "alert"]
_KINDS: Mapping[str, _Kind] = {
    SAFETY_IDENTIFIER_BLOCKED: "identifier",
    SAFETY_WARNING_ISSUED: "case",
    SAFETY_DEACTIVATION_ISSUED: "case",
    SAFETY_ALERT_CREATED: "alert",
    SAFETY_ORG_ALERT_CREATED: "alert",
}
_POLICY_ACTIONS = frozenset(get_args(SafetyAction))

# What the case or alert look-up gave: the object, the SDK error, or nothing to look up.
_Found = SafetyCase | SafetyAlert | openai.APIError | None


class HeaderSource(Protocol):
    """Request headers as any web framework gives them: anything with ``items()``.

    A ``dict``, Starlette's ``request.headers`` and Werkzeug's ``request.headers`` all fit.
    """

    def items(self) -> Iterable[tuple[str, str]]:
        """The ``(name, value)`` pairs."""
        ...


class _Verifier(Protocol):
    def verify_signature(
        self, payload: str | bytes, headers: Mapping[str, str], *, secret: str | None = None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class SafetyEvent:
    """What handling one webhook delivery found and did.

    Attributes:
        event_id: The event's id (``evt_...``), the key of idempotency.
        type: The raw event type, e.g. ``"safety.warning_issued"``.
        action: What was done (see :data:`EventAction`).
        customer_id: The customer the event was traced to, or ``None``.
        identifier: The safety identifier the event names (directly or through its case).
        request_id: The OpenAI request id the event or its alert names.
        case_id: The safety case id of a warning or deactivation.
        alert_id: The safety alert id of an alert.
        category: The safety category (blocked), policy reason (case) or error type (alert).
        created_at: When OpenAI created the event (UTC), when the payload says.
        reason: Why this action was taken, in one plain sentence.
    """

    event_id: str
    type: str
    action: EventAction
    customer_id: str | None = None
    identifier: str | None = None
    request_id: str | None = None
    case_id: str | None = None
    alert_id: str | None = None
    category: str | None = None
    created_at: datetime | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Delivery:
    """A verified, parsed delivery, before any look-up."""

    event: SafetyEvent
    kind: _Kind | None
    lookup_id: str | None = None


def _flatten(headers: HeaderSource | Mapping[str, str]) -> dict[str, str]:
    return {str(name).lower(): str(value) for name, value in headers.items()}


def _reject(reason: str, **ids: str | None) -> WebhookVerificationError:
    log.warning("safe_openai.webhook_rejected", reason=reason, **ids)
    return WebhookVerificationError(f"Webhook delivery rejected: {reason}.")


def _text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def _read_delivery(
    webhooks: _Verifier,
    payload: bytes | str,
    headers: HeaderSource | Mapping[str, str],
    *,
    secret: str,
) -> _Delivery:
    """Verify a delivery's signature with the SDK, then parse the event out of it.

    Raises:
        WebhookVerificationError: Missing headers, a forged, stale or future signature, a body
            that is not UTF-8 JSON, or an event without the fields its type requires.
    """
    flat = _flatten(headers)
    webhook_id = flat.get("webhook-id")
    if not isinstance(payload, str):
        payload = bytes(payload)
    try:
        webhooks.verify_signature(payload, flat, secret=secret)
    except openai.InvalidWebhookSignatureError as exc:
        # "does not match", "timestamp is too old/new", "invalid timestamp format"
        raise _reject(f"signature check failed ({exc})", webhook_id=webhook_id) from exc
    except UnicodeDecodeError as exc:
        # Its message quotes payload bytes, so it is not repeated.
        raise _reject("the body is not UTF-8", webhook_id=webhook_id) from exc
    except ValueError as exc:
        # The SDK says which header is missing.
        raise _reject(str(exc), webhook_id=webhook_id) from exc

    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise _reject("the body is not valid JSON", webhook_id=webhook_id) from exc
    if not isinstance(body, dict):
        raise _reject("the body is not a JSON object", webhook_id=webhook_id)
    event_id, event_type = _text(body, "id"), _text(body, "type")
    if event_id is None or event_type is None:
        raise _reject("the event has no id or no type", webhook_id=webhook_id)
    created_at = _timestamp(body.get("created_at"))
    kind = _KINDS.get(event_type)
    if kind is None:
        return _Delivery(SafetyEvent(event_id, event_type, "ignored", created_at=created_at), None)

    data = body.get("data")
    if created_at is None or not isinstance(data, dict):
        raise _reject(
            f"the {event_type} event has no created_at or no data",
            webhook_id=webhook_id,
            event_id=event_id,
        )
    if kind == "identifier":
        identifier = _text(data, "safety_identifier")
        if identifier is None:
            raise _reject(
                f"the {event_type} event has no safety_identifier",
                webhook_id=webhook_id,
                event_id=event_id,
            )
        event = SafetyEvent(
            event_id,
            event_type,
            "ignored",
            identifier=identifier,
            request_id=_text(data, "request_id"),
            category=_text(data, "safety_category"),
            created_at=created_at,
        )
        return _Delivery(event, kind)
    object_id = _text(data, "id")
    if object_id is None:
        raise _reject(
            f"the {event_type} event has no data.id", webhook_id=webhook_id, event_id=event_id
        )
    event = SafetyEvent(
        event_id,
        event_type,
        "ignored",
        case_id=object_id if kind == "case" else None,
        alert_id=object_id if kind == "alert" else None,
        created_at=created_at,
    )
    return _Delivery(event, kind, object_id)


def _optional_text(obj: object, name: str) -> str | None:
    # The SDK builds responses without validation: a missing field is a missing attribute.
    value = getattr(obj, name, None)
    return value if isinstance(value, str) and value else None


def _with_found(event: SafetyEvent, found: SafetyCase | SafetyAlert | None) -> SafetyEvent:
    """Fold what the case or alert look-up returned into the event."""
    if isinstance(found, SafetyCase):
        return replace(
            event,
            identifier=_optional_text(found, "entity_identifier"),
            # Cases carry no request id today; use one if the API starts sending it.
            request_id=_optional_text(found, "request_id"),
            category=_optional_text(found, "reason"),
        )
    if isinstance(found, SafetyAlert):
        return replace(
            event,
            request_id=_optional_text(found, "request_id"),
            category=_optional_text(found, "error_type"),
        )
    return event


def _policy_action(policy: Policy, event_type: str) -> SafetyAction:
    action = policy.action_for_safety_event(event_type)
    if action not in _POLICY_ACTIONS:
        raise ConfigurationError(
            f"Policy.action_for_safety_event returned {action!r} for {event_type}; "
            "expected 'strike', 'suspend' or 'ignore'."
        )
    return action


def _detail(event: SafetyEvent) -> str:
    """The violation's reference: the event id, then the case, alert or request it names.

    It is also how a redelivery recognises its own violation, so it depends on the payload only.
    """
    for label, value in (
        ("case", event.case_id),
        ("alert", event.alert_id),
        ("request", event.request_id if event.case_id is None else None),
    ):
        if value:
            return f"{event.event_id} {label}={value}"
    return event.event_id


def _settle(state: GuardState, delivery: _Delivery, found: _Found) -> Flow[SafetyEvent]:
    """Decide and carry out what a verified delivery means for its customer.

    Order: claim the event id -> find the customer (reads only) -> act -> mark the event done.
    The claim is atomic in the store, so of any number of concurrent deliveries one acts and
    the others raise :class:`~safe_openai.WebhookInProgress` (answered 5xx, so OpenAI delivers
    them again later). A delivery that fails while acting releases its claim, so a redelivery
    acts; one that dies without releasing it holds the event for :data:`EVENT_LEASE` at most.

    Raises:
        openai.APIError: The case or alert look-up failed for an event the policy acts on.
        StoreError: The store failed; the event is not done, so a redelivery acts.
        WebhookInProgress: Another delivery of this event holds its claim right now.
        ConfigurationError: The policy returned an unknown action.
    """
    event = delivery.event
    ids: dict[str, str | None] = {"event_id": event.event_id, "event_type": event.type}
    if delivery.kind is None:
        log.info("safe_openai.webhook_ignored", **ids, reason="unhandled event type")
        return replace(event, reason=f"{event.type} is not a safety event this handler acts on")
    policy_action = _policy_action(state.policy, event.type)
    lookup_failed = False
    if isinstance(found, openai.APIError):
        if policy_action != "ignore":
            raise found
        # The event would be ignored anyway: a failed look-up only costs the customer's name.
        log.warning("safe_openai.webhook_lookup_failed", **ids, error=type(found).__name__)
        lookup_failed, found = True, None
    event = _with_found(event, found)
    ids.update(case_id=event.case_id, alert_id=event.alert_id)

    token = uuid.uuid4().hex
    claim = yield StoreCall(
        "claim_event",
        (event.event_id,),
        {"token": token, "now": datetime.now(timezone.utc), "lease": EVENT_LEASE},
    )
    if claim == "held":
        log.warning("safe_openai.webhook_concurrent_delivery", **ids)
        raise WebhookInProgress(event.event_id)
    if claim != "claimed":
        customer_id = yield from _find_customer(event)
        log.info("safe_openai.webhook_handled", **ids, customer_id=customer_id, action="duplicate")
        return replace(
            event,
            customer_id=customer_id,
            action="duplicate",
            reason="this event id was handled before",
        )

    try:
        customer_id = yield from _find_customer(event)
        action: EventAction
        if customer_id is None and lookup_failed:
            action, reason = (
                "ignored",
                f"the policy ignores {event.type} (its {delivery.kind} could not be retrieved)",
            )
        elif customer_id is None:
            action = "unmatched"
            reason = "no customer is known for its safety identifier or request"
            log.warning(
                "safe_openai.webhook_unmatched",
                **ids,
                identifier=event.identifier,
                request_id=event.request_id,
            )
        elif policy_action == "ignore":
            action, reason = "ignored", f"the policy ignores {event.type}"
        else:
            action, reason = yield from _act(state, event, customer_id, policy_action)
        if customer_id is not None and delivery.kind != "alert" and event.created_at is not None:
            yield from alert(
                state,
                openai_event_alert(
                    event.event_id,
                    event.type,
                    customer_id,
                    event.created_at,
                    category=event.category,
                    reason=reason,
                ),
            )
    except GeneratorExit:
        raise  # abandoned by its driver: nothing can be sent now; the lease runs out
    except BaseException:
        try:
            yield StoreCall("release_event", (event.event_id,), {"token": token})
        except StoreError:
            log.warning("safe_openai.webhook_claim_not_released", **ids)
        raise
    try:
        yield StoreCall("finish_event", (event.event_id,), {"token": token})
    except StoreError:
        # Acted, but not marked done: the claim lapses after EVENT_LEASE, and a redelivery then
        # finds this event's violation and writes nothing twice.
        log.warning("safe_openai.webhook_claim_not_finished", **ids, customer_id=customer_id)
    log.info(
        "safe_openai.webhook_handled",
        **ids,
        customer_id=customer_id,
        action=action,
        category=event.category,
    )
    return replace(event, customer_id=customer_id, action=action, reason=reason)


def _find_customer(event: SafetyEvent) -> Flow[str | None]:
    """The customer of the event's identifier, else of its request id; never a guess."""
    if event.identifier:
        customer_id: str | None = yield StoreCall("customer_for_identifier", (event.identifier,))
        if customer_id:
            return customer_id
    if event.request_id:
        customer_id = yield StoreCall("customer_for_request", (event.request_id,))
        if customer_id:
            return customer_id
    return None


def _act(
    state: GuardState, event: SafetyEvent, customer_id: str, policy_action: SafetyAction
) -> Flow[tuple[EventAction, str]]:
    """Strike or suspend, once per event, whatever was done by an earlier, failed delivery."""
    assert event.created_at is not None  # _read_delivery requires it for safety events
    detail = _detail(event)
    stored = yield StoreCall(
        "violations", (), {"customer_id": customer_id, "since": event.created_at}
    )
    done = any(v.source == event.type and v.detail == detail for v in stored)
    violation = Violation(
        customer_id=customer_id,
        created_at=event.created_at,
        source=event.type,
        categories=(event.category,) if event.category else (),
        detail=detail,
        # the same for every delivery of the event, so the store keeps it once
        violation_id=f"webhook:{event.event_id}",
    )
    if policy_action == "suspend":
        if done:
            return "suspended", f"{event.type} was already acted on"
        reason = f"OpenAI {event.type}" + (f" (case {event.case_id})" if event.case_id else "")
        # Suspend before recording: the violation marks the event done, so it goes last.
        yield StoreCall(
            "suspend", (customer_id,), {"reason": reason, "until": None, "now": event.created_at}
        )
        yield StoreCall("record_violation", (violation,))
        log.warning("safe_openai.customer_suspended", customer_id=customer_id, reason=reason)
        yield from alert(
            state, suspension_alert(customer_id, event.created_at, reason, event_type=event.type)
        )
        return "suspended", f"{reason}: suspended until lifted"
    if done:
        # An earlier delivery stored the strike and may have failed before the strike limit
        # was applied: apply it now (it suspends at most once for the same strikes).
        suspended = yield from enforce_strikes(state, violation)
        if suspended:
            return "suspended", f"{event.type} reached the strike limit"
        return "strike", f"{event.type} was already recorded as a violation"
    # record_violation never shortens a suspension already in force (a deactivation).
    suspended = yield from record_violation(state, violation)
    if suspended:
        return "suspended", f"{event.type} reached the strike limit"
    return "strike", f"{event.type} recorded as a violation"


def _resolve_secret(client: openai.OpenAI | openai.AsyncOpenAI, secret: str | None) -> str:
    resolved = secret if secret is not None else client.webhook_secret
    if not resolved:
        raise ConfigurationError(
            "No webhook secret: pass secret=... , or set OPENAI_WEBHOOK_SECRET (or "
            "webhook_secret=... on the client) to the endpoint's whsec_... signing secret."
        )
    return resolved


class SafetyWebhookHandler:
    """Handles OpenAI safety webhooks for a :class:`~safe_openai.SafeClient`.

    Args:
        client: The client whose store and policy are used; it also retrieves safety cases
            and alerts, so its API key needs the ``api.safety.read`` scope.
        secret: The endpoint's ``whsec_...`` signing secret (default: the client's
            ``webhook_secret``, which the SDK reads from ``OPENAI_WEBHOOK_SECRET``).

    Raises:
        ConfigurationError: No webhook secret is configured.
    """

    def __init__(self, client: SafeClient, *, secret: str | None = None) -> None:
        self._client = client
        self._secret = _resolve_secret(client, secret)

    def handle(
        self, payload: bytes | str, headers: HeaderSource | Mapping[str, str]
    ) -> SafetyEvent:
        """Verify one delivery, trace it to a customer and act on it per policy.

        Args:
            payload: The raw request body, exactly as received (not re-serialised JSON).
            headers: The request headers (``webhook-id``, ``webhook-timestamp``,
                ``webhook-signature``).

        Returns:
            What was found and done; duplicates, unknown types and unknown identifiers are
            returned, not raised.

        Raises:
            WebhookVerificationError: The delivery is unsigned, forged, stale or malformed;
                nothing was changed.
            StoreError: The store failed; the event is not marked handled, so a redelivery acts.
            openai.APIError: The case or alert look-up failed (same: a redelivery acts).
            WebhookInProgress: Another delivery of the same event is acting on it right now;
                nothing was changed (answer 5xx: the redelivery finds it done or acts).
        """
        delivery = _read_delivery(self._client.webhooks, payload, headers, secret=self._secret)
        found: _Found = None
        try:
            if delivery.kind == "case" and delivery.lookup_id:
                found = self._client.safety.cases.retrieve(delivery.lookup_id)
            elif delivery.kind == "alert" and delivery.lookup_id:
                found = self._client.safety.alerts.retrieve(delivery.lookup_id)
        except openai.APIError as exc:
            found = exc
        return drive(_settle(self._client._safe, delivery, found), self._client._execute)


class AsyncSafetyWebhookHandler:
    """The async twin of :class:`SafetyWebhookHandler`, for an
    :class:`~safe_openai.AsyncSafeClient`. Takes the same arguments.
    """

    def __init__(self, client: AsyncSafeClient, *, secret: str | None = None) -> None:
        self._client = client
        self._secret = _resolve_secret(client, secret)

    async def handle(
        self, payload: bytes | str, headers: HeaderSource | Mapping[str, str]
    ) -> SafetyEvent:
        """Verify one delivery, trace it to a customer and act on it per policy.

        See :meth:`SafetyWebhookHandler.handle`.
        """
        delivery = _read_delivery(self._client.webhooks, payload, headers, secret=self._secret)
        found: _Found = None
        try:
            if delivery.kind == "case" and delivery.lookup_id:
                found = await self._client.safety.cases.retrieve(delivery.lookup_id)
            elif delivery.kind == "alert" and delivery.lookup_id:
                found = await self._client.safety.alerts.retrieve(delivery.lookup_id)
        except openai.APIError as exc:
            found = exc
        return await adrive(_settle(self._client._safe, delivery, found), self._client._execute)
