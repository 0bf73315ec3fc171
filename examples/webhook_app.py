"""A Flask app that receives OpenAI's safety webhooks and acts on the customers they name.

Run it::

    export OPENAI_API_KEY=sk-...              # needs the api.safety.read scope (case look-ups)
    export OPENAI_WEBHOOK_SECRET=whsec_...    # the endpoint's signing secret
    export SAFE_OPENAI_IDENTIFIER_SECRET=...  # the same secret your guarded app uses
    export SAFE_OPENAI_STORE_URL=sqlite:///usage.db   # the store your guarded app writes
    flask --app examples/webhook_app.py run --port 8000

then register ``https://<your host>/webhooks/openai`` in the OpenAI dashboard for
``safety_identifier.blocked``, ``safety.warning_issued``, ``safety.deactivation_issued`` and
``safety.alert.created``. The store must be the one your guarded application writes: that is
where safety identifiers and request ids map back to customers.
"""

from __future__ import annotations

import os

from flask import Flask, request

from safe_openai import SafeClient, WebhookVerificationError
from safe_openai.webhooks import SafetyWebhookHandler

DEFAULT_STORE_URL = "sqlite:///safe_openai.db"


def create_app(client: SafeClient | None = None) -> Flask:
    """Build the app. ``client`` defaults to a SafeClient configured from the environment."""
    if client is None:
        client = SafeClient(
            store=os.environ.get("SAFE_OPENAI_STORE_URL", DEFAULT_STORE_URL),
            # This client sends no model calls, so it has no usage to spool.
            spool=False,
        )
    handler = SafetyWebhookHandler(client)
    app = Flask(__name__)

    @app.post("/webhooks/openai")
    def openai_webhook() -> tuple[dict[str, str], int]:
        try:
            event = handler.handle(request.get_data(), request.headers)
        except WebhookVerificationError as exc:
            return {"error": str(exc)}, 400
        # Any other error (store down, case look-up failed) becomes a 500: the event was not
        # marked handled, so OpenAI's redelivery acts on it.
        # The reply goes back to OpenAI: it names the action only, never the customer id.
        return {"action": event.action}, 200

    return app


if __name__ == "__main__":
    create_app().run(port=8000)
