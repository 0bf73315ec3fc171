"""Safety webhook deliveries signed as OpenAI signs them, for testing a webhook endpoint."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple


class SignedWebhook(NamedTuple):
    """A webhook delivery: the raw body and the headers to post it with.

    It unpacks as ``body, headers = signed_webhook(...)``.

    Attributes:
        body: The JSON event, as the exact bytes the signature covers.
        headers: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` and
            ``content-type``.
    """

    body: bytes
    headers: dict[str, str]


def signed_webhook(
    secret: str,
    event_type: str,
    data: Mapping[str, Any],
    *,
    event_id: str | None = None,
    created_at: int | None = None,
    webhook_id: str | None = None,
    timestamp: int | None = None,
) -> SignedWebhook:
    """Build an OpenAI webhook delivery signed with ``secret`` (Standard Webhooks, ``v1``).

    The signature is an HMAC-SHA256 of ``"{webhook-id}.{webhook-timestamp}.{body}"`` under the
    base64-decoded part of a ``whsec_...`` secret (a secret without that prefix is used as
    text), as ``client.webhooks.verify_signature`` and
    :class:`~safe_openai.webhooks.SafetyWebhookHandler` check it.

    Args:
        secret: The endpoint's signing secret, the same ``whsec_...`` value the handler uses.
        event_type: The event's ``type``, e.g. ``"safety_identifier.blocked"``.
        data: The event's ``data``, e.g. ``{"safety_identifier": identifier_for("acme")}``
            or ``{"id": "case_1"}`` for a warning or a deactivation.
        event_id: The event's ``id`` (default: a new one each call); the handler acts once per
            id, so pass the same id twice to test a redelivery.
        created_at: The event's ``created_at`` in Unix seconds (default: now).
        webhook_id: The ``webhook-id`` header (default: ``"wh_" + event_id``).
        timestamp: The ``webhook-timestamp`` header in Unix seconds (default: now); one more
            than five minutes away from now is refused by the handler as stale or future.

    Returns:
        The body and headers to post to the endpoint.

    Example::

        body, headers = signed_webhook(
            "whsec_...", "safety_identifier.blocked", {"safety_identifier": identifier}
        )
        response = test_client.post("/webhooks/openai", content=body, headers=headers)
    """
    now = int(time.time())
    if event_id is None:
        event_id = f"evt_test_{uuid.uuid4().hex}"
    event = {
        "id": event_id,
        "object": "event",
        "created_at": now if created_at is None else created_at,
        "type": event_type,
        "data": dict(data),
    }
    body = json.dumps(event, separators=(",", ":")).encode()
    wid = f"wh_{event_id}" if webhook_id is None else webhook_id
    stamp = str(now if timestamp is None else timestamp)
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{wid}.{stamp}.".encode() + body, hashlib.sha256).digest()
    headers = {
        "webhook-id": wid,
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
        "content-type": "application/json",
    }
    return SignedWebhook(body, headers)
